"""Checkpoints: atomic on disk (temp folder, fsync, rename), resumable to the exact same losses."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from gkd.errors import GKDError

_DONE = "gkd_checkpoint.json"  # written last: a folder without it is not a checkpoint


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int) -> Path:
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "model"), safe_serialization=True)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               tmp / "state.pt")
    (tmp / _DONE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _prune(Path(output_dir), keep)
    return final


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / _DONE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(output_dir: Path, keep: int) -> None:
    for _, p in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def resolve(spec: str, output_dir: Path) -> Path:
    """A checkpoint folder from --resume_from_checkpoint (a path, or 'latest' in output_dir)."""
    if spec == "latest":
        found = _checkpoints(output_dir)
        if not found:
            raise GKDError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1][1]
    p = Path(spec)
    if not p.is_dir():
        raise GKDError(f"--resume_from_checkpoint {spec}: no such folder")
    if not (p / _DONE).is_file():
        raise GKDError(f"--resume_from_checkpoint {spec}: incomplete or not a checkpoint (no {_DONE})")
    return p


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the trainer state (step, ...)."""
    try:
        info = json.loads((path / _DONE).read_text())
        state = torch.load(path / "state.pt", weights_only=False)
        _load_weights(model, path / "model")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except GKDError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged checkpoint
        raise GKDError(f"--resume_from_checkpoint {path}: corrupt checkpoint ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    set_rng_state(state["rng"])
    return info


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        adapter = folder / "adapter_model.safetensors"
        if not adapter.is_file():
            raise GKDError(f"{folder}: no LoRA adapter here (was this checkpoint saved with --train_type full?)")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GKDError(f"{folder}: no model weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied lm_head weights are saved once
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise GKDError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
