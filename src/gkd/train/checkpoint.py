"""Checkpoints: atomic on disk (temp folder, fsync, rename), resumable to the exact same losses."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from gkd.atomic import sha256_file
from gkd.errors import GKDError
from gkd.rollout import decode
from gkd.train import outdir

_DONE = outdir.DONE  # written last: a folder without it is not a checkpoint
# what the checkpoint's optimizer and schedule carry: a resume with other values would silently keep the saved ones
PINNED = ("learning_rate", "weight_decay", "lr_scheduler_type", "warmup_ratio", "global_batch_size", "seed",
          "freeze_parameters")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # (another machine's GPUs keep their own)


def _options(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # LoRA: only the adapter (and its optimizer state); the frozen base comes from --model and is left
    # alone on load (not strict)
    # optimizer state keyed by each parameter's name (flattened): a pipeline stage saves and loads its own
    # parameters' entries, so a checkpoint moves between pipeline sizes
    lora = hasattr(model, "peft_config")
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora, flatten_optimizer_state_dict=True)


@contextlib.contextmanager
def _single_process_quiet(par):
    """DCP warns that it assumes one process when there is no process group; that is what we mean."""
    with warnings.catch_warnings():
        if par.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _trains(optimizer) -> bool:
    """Whether this rank's optimizer holds any parameter (a wholly frozen pipeline stage's holds none)."""
    return any(group["params"] for group in optimizer.param_groups)


def _sharded_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if not _trains(optimizer):  # (get_state_dict refuses an optimizer without state)
        return {"model": get_model_state_dict(model, options=_options(model)), "optimizer": {}}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
    return {"model": model_sd, "optimizer": optim_sd}


def save(output_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int, par) -> Path:
    """Every rank writes its shards (torch.distributed.checkpoint) into a temp folder; rank 0 adds the
    scheduler and trainer state, fsyncs, and renames it into place. Loadable on another mesh. A failed
    write (disk full, read-only folder) removes the temp folder and is one line; earlier checkpoints
    are untouched."""
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f".checkpoint-{step}.tmp"
    with outdir.writing(f"saving {final.name}", output_dir,
                        cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True) if par.is_main else None):
        _save(final, tmp, step, model, optimizer, scheduler, trainer_state, par)
    if par.is_main:
        with outdir.writing("removing old checkpoints", output_dir):
            _prune(Path(output_dir), keep)
    par.barrier()
    return final


def _save(final: Path, tmp: Path, step: int, model, optimizer, scheduler, trainer_state: dict, par) -> None:
    import torch.distributed.checkpoint as dcp

    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    with _single_process_quiet(par):
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng-{par.rank}.pt")
    (tmp / f"forms-{par.rank}.json").write_text(json.dumps(decode.chosen_forms()))
    if par.is_main:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "trainer.pt")
    par.barrier()
    files = _digests(tmp, par)
    if par.is_main:
        mesh = {"world": par.world, "dp_replicate": par.dp_replicate, "dp_shard": par.dp_shard, "tp": par.tp}
        (tmp / _DONE).write_text(json.dumps({"step": step, **trainer_state, "mesh": mesh, "sha256": files}, indent=2))
        with open(tmp / _DONE, "rb") as fh:
            os.fsync(fh.fileno())
        if final.exists():
            if not (final / _DONE).is_file():  # another tool's, put there during this run: never deleted
                raise GKDError(f"saving {final.name}: {final} appeared during this run and gkd did not write it "
                               f"(no {_DONE} inside); move it away, then resume with --resume_from_checkpoint latest")
            outdir.delete_checkpoint(final)
        os.replace(tmp, final)


def _digests(folder: Path, par) -> dict[str, str]:
    """{file: sha256} of every file in ``folder``, each fsynced; every rank reads a share of the files, and
    rank 0 gets them all (others get {})."""
    names = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
    mine = {n: sha256_file(folder / n, sync=True) for n in names[par.rank::par.world]}
    if par.world == 1:
        return mine
    import torch.distributed as dist

    parts = [None] * par.world if par.is_main else None
    dist.gather_object(mine, parts, dst=0)
    return {n: d for part in parts for n, d in part.items()} if par.is_main else {}


def read_info(path: Path) -> dict:
    """The checkpoint's gkd_checkpoint.json, checked: one line where it is damaged."""
    where = f"--resume_from_checkpoint {path}: {_DONE}"
    try:
        info = json.loads((path / _DONE).read_text())
    except (OSError, ValueError) as e:
        raise GKDError(f"{where} does not read as JSON ({type(e).__name__}); the checkpoint is damaged") from None
    step = info.get("step") if isinstance(info, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise GKDError(f"{where}: step must be a whole number >= 0, got {step!r}; the checkpoint is damaged")
    if not isinstance(info.get("sha256", {}), dict):
        raise GKDError(f"{where}: sha256 must map file names to digests; the checkpoint is damaged")
    return info


def verify(path: Path, info: dict, par) -> None:
    """Every file the save wrote has the digest it had then (each rank reads a share); one line naming the
    first damaged or missing file, on every rank, before any of it is loaded."""
    sums = info.get("sha256")
    if sums is None:
        if par.is_main:
            print(f"[gkd] {path} has no checksums (saved by an earlier gkd): its files are not verified")
        return
    names = sorted(sums)
    bad = 0
    for i in range(par.rank, len(names), par.world):
        f = path / names[i]
        if not f.is_file() or sha256_file(f) != sums[names[i]]:
            bad = i + 1
            break
    bad = int(par.most(bad))
    if bad:
        raise GKDError(f"--resume_from_checkpoint {path}: {names[bad - 1]} is damaged or missing (its sha256 differs "
                       "from the one saved); resume from an earlier checkpoint")


def check_settings(path: Path, info: dict, cfg) -> None:
    """The flags whose values the checkpoint carries (its optimizer's learning rate and weight decay, its
    schedule, its data order) must be the saved ones: a resume would otherwise keep the saved values silently."""
    saved = info.get("settings", {})
    for name in PINNED:
        if name in saved and saved[name] != getattr(cfg, name):
            given, kept = (" ".join(v) if isinstance(v, list) else v for v in (getattr(cfg, name), saved[name]))
            raise GKDError(f"--resume_from_checkpoint {path}: --{name} {given} differs from the checkpoint's {kept} "
                           f"(its optimizer, schedule, data order and frozen weights carry the saved one); resume "
                           f"with --{name} {kept}, or start a new run")


def settings(cfg) -> dict:
    return {name: getattr(cfg, name) for name in PINNED}


def _prune(output_dir: Path, keep: int) -> None:
    outdir.remove_leftovers(output_dir)  # what killed saves and prunes left (never counted, never kept)
    for _, p in outdir.checkpoints(output_dir)[:-keep]:
        outdir.delete_checkpoint(p)


def resolve(spec: str, output_dir: Path) -> Path:
    """A checkpoint folder from --resume_from_checkpoint (a path, or 'latest' in output_dir)."""
    if spec == "latest":
        if not Path(output_dir).is_dir():
            raise GKDError(f"--resume_from_checkpoint latest: --output_dir {output_dir} does not exist")
        found = outdir.checkpoints(output_dir)
        if not found:
            raise GKDError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1][1]
    p = Path(spec)
    if not p.is_dir():
        raise GKDError(f"--resume_from_checkpoint {spec}: no such folder")
    if not (p / _DONE).is_file():
        raise GKDError(f"--resume_from_checkpoint {spec}: incomplete or not a checkpoint (no {_DONE})")
    return p


def load(path: Path, model, optimizer, scheduler, par) -> dict:
    """Restore weights, optimizer, scheduler, RNG and the few-row forms of sampling (each rank its own, or rank 0's
    when the saving run had no such rank); returns the trainer state (step, ...). The saving mesh may differ from
    this one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    info = read_info(path)
    verify(path, info, par)
    try:
        state = _sharded_state(model, optimizer)
        with _single_process_quiet(par):
            dcp.load({"model": state["model"]}, checkpoint_id=str(path / "state"))
            # a weight that never had a gradient (e.g. a vision layer after the one LLaVA reads features
            # from) has no optimizer state in the checkpoint; it keeps the fresh one, as it would have
            alias = _tied_aliases(path, model, state["optimizer"])
            optim = {alias.get(k, k): v for k, v in state["optimizer"].items()}
            dcp.load({"optimizer": optim}, checkpoint_id=str(path / "state"),
                     planner=DefaultLoadPlanner(allow_partial_load=True))
            state["optimizer"] = {k: optim[alias.get(k, k)] for k in state["optimizer"]}
        if _trains(optimizer):
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=_options(model))
        else:
            set_model_state_dict(model, state["model"], options=_options(model))
        scheduler.load_state_dict(torch.load(path / "trainer.pt", weights_only=False)["scheduler"])
        own = path / f"rng-{par.rank}.pt"  # a rank the saving run did not have takes rank 0's
        set_rng_state(torch.load(own if own.is_file() else path / "rng-0.pt", weights_only=False))
        forms = path / f"forms-{par.rank}.json"  # (none in a checkpoint saved before gkd kept them)
        forms = forms if forms.is_file() else path / "forms-0.json"
        if forms.is_file():
            decode.restore_forms(json.loads(forms.read_text()))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a damaged or foreign checkpoint
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        raise GKDError(f"--resume_from_checkpoint {path}: corrupt checkpoint, or saved for another model or "
                       f"--train_type ({type(e).__name__}: {detail})") from None
    return info


def _tied_aliases(path: Path, model, optim: dict) -> dict[str, str]:
    """{optimizer key: the key to read it from}: a pipeline's last-stage copy of a tied lm_head reads the
    embedding's optimizer state from a checkpoint that kept the weight once (saved without a pipeline)."""
    import torch.distributed.checkpoint as dcp

    from gkd.parallel.pipeline import tied_copy_names

    names = tied_copy_names(model)
    if not names:
        return {}
    saved = dcp.FileSystemReader(str(path / "state")).read_metadata().state_dict_metadata
    alias = {}
    for key in optim:
        for copy, one in names.items():
            other = key.replace(f".{copy}", f".{one}", 1)
            if f".{copy}" in key and f"optimizer.{key}" not in saved and f"optimizer.{other}" in saved:
                alias[key] = other
    return alias


def export(model, tokenizer, out_dir: Path, cfg, par) -> None:
    """The final student as one Hugging Face folder. Sharded weights are gathered to rank 0, which puts
    them into a skeleton of the model (no second read from disk) and writes it (LoRA: the adapter, or
    merged with --merge_lora)."""
    from gkd.models import save_pretrained_atomic

    write = outdir.writing(f"writing the final model {Path(out_dir).name}", Path(out_dir).parent)
    if par.world == 1:
        with write:
            save_pretrained_atomic(model, tokenizer, out_dir, merge_lora=cfg.merge_lora, source=cfg.model)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if par.pp > 1:
        full = _gather_stages(model, par)
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if par.is_main:
        with write:
            save_pretrained_atomic(_plain_copy(model, full, cfg), tokenizer, out_dir, merge_lora=cfg.merge_lora,
                                   source=cfg.model)
    par.barrier()


def _gather_stages(model, par) -> dict:
    """Every pipeline stage's whole weights (gathered over its FSDP/CP/TP ranks) on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gkd.parallel.pipeline import on_rank0

    mine = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return on_rank0({k: v.detach().cpu() for k, v in mine.items()}, par)


def _plain_copy(model, full: dict, cfg):
    """An unsharded CPU model with the weights ``full`` and ``model``'s buffers."""
    from gkd.models import apply_lora, frozen_vision
    from gkd.parallel.loading import meta_skeleton, set_buffer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    plain = meta_skeleton(type(base), base.config, base.generation_config)
    if cfg.train_type == "lora":
        plain = apply_lora(plain, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, cfg.seed,
                           exclude=frozen_vision(plain, cfg.freeze_vit, cfg.freeze_aligner), experts=cfg.lora_experts)
    plain.load_state_dict(full, assign=True)
    (plain.get_base_model() if hasattr(plain, "get_base_model") else plain).tie_weights()  # as the config says
    for name, buf in model.named_buffers():  # rotary frequencies and the like, never sharded
        set_buffer(plain, name, buf.detach().cpu().clone())
    return plain
