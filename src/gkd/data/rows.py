"""Datasets: read and validate rows, tokenise them once with the student's chat template.

Rows are ``{"messages": [{"role", "content"}, ...]}`` (a final assistant turn is the completion;
without one the row is a prompt for on-policy steps only) or ``{"prompt": str, "completion": str}``
(rendered as a user turn and an assistant turn when the tokenizer has a chat template, as raw text
otherwise). Everything downstream works on token ids; nothing is re-tokenised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from gkd.data.render import row_images, text_of
from gkd.errors import GKDError

_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    prompt_ids: list[int]  # image placeholders already expanded to the processor's token counts
    completion_ids: list[int] | None  # None: prompt only (usable on-policy only)
    source: str  # file:line, for messages
    images: list = field(default_factory=list)  # the prompt's images, decoded (PIL), in placeholder order
    prompt_messages: list | None = None  # the prompt's messages, for a teacher with its own chat template
    teacher: str | None = None  # the teacher that scores it (its 'teacher' column, or its dataset's route)
    dataset: str = ""  # the --dataset entry it came from


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _no_duplicate_keys(pairs):
    """json's object hook: a key given twice would silently keep only its last value."""
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _loads(text: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise GKDError(f"{where}: malformed JSON, line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError as e:  # a duplicate key
        raise GKDError(f"{where}: {e} in one object (each field once)") from None
    except RecursionError:
        raise GKDError(f"{where}: JSON nested too deeply to read (a row is an object of plain text fields)") from None


def _text(path: Path, data: bytes, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GKDError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
                       "save the file as UTF-8") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        offset = 0
        for n, raw in enumerate(fh, 1):
            line = _text(path, raw, offset)
            offset += len(raw)
            if line.strip():
                yield f"{path}:{n}", _loads(line, f"{path}:{n}")


def _read_json(path: Path, data) -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict):  # a single row
        data = [data]
    if not isinstance(data, list):
        raise GKDError(f"{path}: a .json dataset must be a list of rows (or JSONL, one row per line)")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _read_table(rows, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(rows):
        yield f"{name} row {i}", dict(row)


def _read_parquet(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GKDError(f"dataset {p}: reading Parquet needs `pip install pyarrow`") from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
        raise GKDError(f"dataset {p}: not a readable Parquet file ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:200]})") from None
    return _read_table(rows, str(p))


_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows(path: str, num_proc: int = 0) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs from a JSONL/JSON/Parquet file, a saved ``datasets`` folder or a hub dataset ID
    (``org/name[@revision][:split]``, from the hub's cache; ``num_proc`` prepares it in parallel)."""
    p = Path(path)
    if not p.exists():
        from gkd import hub

        if hub.looks_like_id(path) and p.suffix.lower() not in _FILE_SUFFIXES:  # a file name is a mistyped path
            return _read_table(hub.load_dataset_rows(path, num_proc), path)
        raise GKDError(f"dataset {path}: no such file or folder (nor a hub dataset ID org/name[@revision][:split])")
    if p.is_dir():
        try:
            import datasets
        except ImportError:
            raise GKDError(f"dataset {path}: reading a saved datasets folder needs `pip install datasets`") from None
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - the library raises many types for a bad folder
            raise GKDError(f"dataset {path}: not a saved datasets folder ({type(e).__name__}: {e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise GKDError(f"dataset {path}: a DatasetDict needs a 'train' split, has {list(ds)}")
            ds = ds["train"]
        return _read_table(ds, str(p))
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        # one JSON document holding a list, or JSON Lines saved as .json (common)
        text = _text(p, p.read_bytes())
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError:  # JSON Lines (or a mistake, which the line reader names)
            return _read_jsonl(p)
        except (ValueError, RecursionError):
            _loads(text, str(p))  # a duplicate key or too deep: raises its one-line message
        return _read_json(p, data)
    if suffix == ".parquet":
        return _read_parquet(p)
    raise GKDError(f"dataset {path}: unknown format {suffix!r} (use .jsonl, .json, .parquet, a datasets folder "
                   "or a hub dataset ID)")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_text(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise GKDError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return value


def _check_content(where: str, name: str, value: Any):
    """A message's content: a string, or Hugging Face's typed parts ({"type": "text", "text"} /
    {"type": "image", "image"?})."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise GKDError(f"{where}: {name} must be a string or a list of typed parts, got {type(value).__name__}")
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _check_text(where, f"{name}[{j}].text", part.get("text"))
        elif kind != "image":
            raise GKDError(f"{where}: {name}[{j}] must be {{'type': 'text', 'text': ...}} or "
                           f"{{'type': 'image', 'image': PATH}}, got {str(part)[:80]}")
    return value


def to_messages(where: str, row: Any) -> tuple[list[dict], bool]:
    """The row as chat messages, and whether its last turn is a completion."""
    if not isinstance(row, dict):
        raise GKDError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise GKDError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GKDError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise GKDError(f"{where}: messages[{i}].role must be one of {_ROLES}, got {m['role']!r}")
            out.append({"role": m["role"], "content": _check_content(where, f"messages[{i}].content", m["content"])})
        if not any(m["role"] == "user" for m in out):
            raise GKDError(f"{where}: no user turn in 'messages' (roles {[m['role'] for m in out]}); "
                           "a prompt needs at least one {\"role\": \"user\"} message")
        has_completion = out[-1]["role"] == "assistant"
        if has_completion and not text_of(out[-1]["content"]).strip():
            raise GKDError(f"{where}: the completion (last assistant turn) is empty")
        if has_completion and len(out) == 1:
            raise GKDError(f"{where}: the only message is the assistant's: there is no prompt")
        return out, has_completion
    if "prompt" in row:
        prompt = _check_text(where, "'prompt'", row["prompt"])
        if not prompt.strip():
            raise GKDError(f"{where}: 'prompt' is empty")
        msgs = [{"role": "user", "content": prompt}]
        if row.get("completion") is None:
            return msgs, False
        completion = _check_text(where, "'completion'", row["completion"])
        if not completion.strip():
            raise GKDError(f"{where}: 'completion' is empty")
        return msgs + [{"role": "assistant", "content": completion}], True
    raise GKDError(f"{where}: a row needs 'messages' or 'prompt' (+ 'completion'), has {sorted(row)}")


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def _ids(x) -> list[int]:
    if hasattr(x, "input_ids"):  # BatchEncoding from newer transformers
        x = x["input_ids"]
    if isinstance(x, dict):
        x = x["input_ids"]
    return [int(t) for t in x]


def tokenize(tokenizer, messages: list[dict], has_completion: bool,
             where: str = "row") -> tuple[list[int], list[int] | None]:
    """(prompt ids, completion ids or None) with the tokenizer's chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        prompt_msgs = messages[:-1] if has_completion else messages
        prompt = _ids(tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=True))
        if not has_completion:
            return prompt, None
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            return prompt, full[len(prompt):]
        # a template that renders the prompt differently inside the conversation: fall back to the
        # completion text followed by EOS
        completion = _ids(tokenizer(text_of(messages[-1]["content"]), add_special_tokens=False)) + [tokenizer.eos_token_id]
        return prompt, completion
    if any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages):
        raise GKDError(f"{where}: the tokenizer has no chat template to place the row's images with")
    text = "\n".join(text_of(m["content"]) for m in (messages[:-1] if has_completion else messages))
    prompt = _ids(tokenizer(text, add_special_tokens=True))
    if not has_completion:
        return prompt, None
    completion = _ids(tokenizer(text_of(messages[-1]["content"]), add_special_tokens=False))
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return prompt, completion


def warn_unused_num_proc(paths: list[str], num_proc: int, warn=print) -> None:
    if num_proc and all(Path(p).exists() for p in paths):
        warn(f"[gkd] --dataset_num_proc {num_proc} is not used: it prepares hub datasets, and these are local files")


def used_columns(row: dict) -> set[str]:
    return {"messages", "images", "teacher"} if "messages" in row else {"prompt", "completion", "images", "teacher"}


def _base(path: str) -> Path:
    """Where a dataset's relative image paths start: the file's folder (a saved datasets folder itself)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def _no_stray_image_tokens(where: str, tokenizer, image_token: int, prompt: list[int], completion: list[int] | None,
                           n_images: int) -> None:
    """An image placeholder token typed as text (e.g. a literal <|image_pad|>) has no image to stand for."""
    name = tokenizer.convert_ids_to_tokens(image_token)
    if completion is not None and image_token in completion:
        raise GKDError(f"{where}: the completion holds the image placeholder token {name!r} as text; images belong "
                       "to the prompt (remove it from the text)")
    if not n_images and image_token in prompt:
        raise GKDError(f"{where}: the prompt holds the image placeholder token {name!r} as text but the row has no "
                       "images (remove it from the text, or give the row its image)")


def load_examples(paths: list[str], tokenizer, *, max_length: int, truncation_strategy: str,
                  max_completion_length: int, warn=print, num_proc: int = 0, images=None,
                  teacher_images=None, warn_cut_completions: bool = False) -> list[Example]:
    """Read, validate and tokenise every row; too-long prompts are cut from the left or dropped (either
    way with a warning), completions cut to ``max_completion_length`` (with a warning when
    ``warn_cut_completions``: training uses them; eval drops them), and columns no row format uses are
    named in a warning.

    ``images`` (gkd.models.images.ImageProcessing, None for a text-only student) expands each image
    placeholder to the processor's token count; ``teacher_images`` must expand every image alike."""

    examples, dropped, cut, cut_completions = [], [], [], []
    for path in paths:
        unused: dict[str, str] = {}  # column -> first row holding it
        for where, row in read_rows(path, num_proc):
            messages, has_completion = to_messages(where, row)
            for col in sorted(set(row) - used_columns(row)):
                unused.setdefault(col, where)
            messages, pics = row_images(where, row, messages, _base(path), multimodal=images is not None)
            prompt, completion = tokenize(tokenizer, messages, has_completion, where)
            if images is not None:
                _no_stray_image_tokens(where, tokenizer, images.image_token_id, prompt, completion, len(pics))
            if pics:
                counts = images.process(pics, where)[1]
                if teacher_images is not None and not teacher_images.same_as(images):
                    theirs = teacher_images.process(pics, where)[1]
                    if theirs != counts:
                        raise GKDError(f"{where}: the student's processor makes {counts} image tokens of the "
                                       f"row's images, the teacher's {theirs}; they must agree token for token")
                prompt = images.expand(prompt, counts, where)
            if len(prompt) > max_length:
                if truncation_strategy == "delete" or pics:  # cutting would split an image's tokens
                    dropped.append(where)
                    continue
                cut.append(where)
                prompt = prompt[-max_length:]
            if completion is not None and len(completion) > max_completion_length:
                cut_completions.append(where)
                completion = completion[:max_completion_length]
            teacher = row.get("teacher")
            if teacher is not None:
                teacher = _check_text(where, "teacher", teacher)
            examples.append(Example(prompt, completion, where, pics, messages[:-1] if has_completion else messages,
                                    teacher, path))
        if unused:
            warn(f"[gkd] dataset {path}: column(s) {', '.join(repr(c) for c in unused)} are not used "
                 f"(first at {next(iter(unused.values()))}); rows are read as 'messages' or 'prompt' + 'completion'")
    if not examples:
        raise GKDError(f"dataset {', '.join(paths)}: no usable rows"
                       + (f" (all {len(dropped)} prompts exceed --max_length {max_length})" if dropped else ""))
    notes = [(dropped, max_length, ("dropped {n} row(s) whose prompt exceeds --max_length {m} (--truncation_strategy "
                                    "delete, or images in the prompt: cutting would split an image's tokens)")),
             (cut, max_length, ("cut {n} prompt(s) longer than --max_length {m} to their last {m} tokens "
                                "(--truncation_strategy left; 'delete' drops them instead)"))]
    if warn_cut_completions:
        notes.append((cut_completions, max_completion_length, ("cut {n} dataset completion(s) longer than "
                      "--max_completion_length {m} to their first {m} tokens (a cut completion loses its end of "
                      "sequence)")))
    for rows, m, what in notes:
        if rows:
            warn(f"[gkd] {what.format(n=len(rows), m=m)}: {', '.join(rows[:3])}{' ...' if len(rows) > 3 else ''}")
    return examples


def longest_sequence(examples: list[Example], new_tokens: int, sampled: bool) -> tuple[int, Example]:
    """The longest prompt + completion training can make, and its row: ``new_tokens`` for sampled completions
    (``sampled``: on-policy or sequence-level KD steps happen) and for prompt-only rows, else the dataset's."""
    def need(e: Example) -> int:
        made = new_tokens if sampled or e.completion_ids is None else 0
        return len(e.prompt_ids) + max(made, len(e.completion_ids or []))

    row = max(examples, key=need)
    return need(row), row


def model_context(model) -> int | None:
    """The positions a model was built for (max_position_embeddings), if it says."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context(examples: list[Example], new_tokens: int, sampled: bool, contexts: dict[str, int | None]) -> None:
    """Refuse, before any work, sequences longer than a model's context (they would fail or crawl late)."""
    longest, row = longest_sequence(examples, new_tokens, sampled)
    for who, ctx in contexts.items():
        if ctx is not None and longest > ctx:
            raise GKDError(f"sequences reach {longest} tokens (prompt {len(row.prompt_ids)} at {row.source} + up to "
                           f"{longest - len(row.prompt_ids)} completion tokens), beyond the {who}'s context of {ctx} "
                           "positions (max_position_embeddings): lower --max_completion_length or --max_length")


def split_examples(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split into (train, held-out); at least one row on each side when ratio > 0."""
    if ratio <= 0:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(len(examples) * ratio)), len(examples) - 1)
    if n_val < 1:
        raise GKDError(f"--split_dataset_ratio {ratio}: the dataset has too few rows ({len(examples)}) to split")
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val
