"""Datasets: read and validate rows, tokenise them once with the student's chat template, collate.

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

from gkd.errors import GKDError

_ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    prompt_ids: list[int]  # image placeholders already expanded to the processor's token counts
    completion_ids: list[int] | None  # None: prompt only (usable on-policy only)
    source: str  # file:line, for messages
    images: list = field(default_factory=list)  # the prompt's images, decoded (PIL), in placeholder order


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise GKDError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
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


def read_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs from a JSONL/JSON/Parquet file or a saved ``datasets`` folder."""
    p = Path(path)
    if not p.exists():
        raise GKDError(f"dataset {path}: no such file or folder")
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
        return _read_json(p) if _is_single_json(p) else _read_jsonl(p)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise GKDError(f"dataset {path}: reading Parquet needs `pip install pyarrow`") from None
        return _read_table(pq.read_table(p).to_pylist(), str(p))
    raise GKDError(f"dataset {path}: unknown format {suffix!r} (use .jsonl, .json, .parquet or a datasets folder)")


def _is_single_json(p: Path) -> bool:
    try:
        json.loads(p.read_text(encoding="utf-8"))
        return True
    except json.JSONDecodeError:
        return False


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


def text_of(content) -> str:
    """A message content's text (typed parts' text joined)."""
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


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


def _base(path: str) -> Path:
    """Where a dataset's relative image paths start: the file's folder (a saved datasets folder itself)."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def load_examples(paths: list[str], tokenizer, *, max_length: int, truncation_strategy: str,
                  max_completion_length: int, warn=print, images=None, teacher_images=None) -> list[Example]:
    """Read, validate and tokenise every row; too-long prompts are cut from the left or dropped.

    ``images`` (gkd.models.images.ImageProcessing, None for a text-only student) expands each image
    placeholder to the processor's token count; ``teacher_images`` must expand every image alike."""
    from gkd.render import row_images

    examples, dropped = [], []
    for path in paths:
        for where, row in read_rows(path):
            messages, has_completion = to_messages(where, row)
            messages, pics = row_images(where, row, messages, _base(path), multimodal=images is not None)
            prompt, completion = tokenize(tokenizer, messages, has_completion, where)
            if pics:
                counts = images.counts(images(pics))
                if teacher_images is not None and not teacher_images.same_as(images):
                    theirs = teacher_images.counts(teacher_images(pics))
                    if theirs != counts:
                        raise GKDError(f"{where}: the student's processor makes {counts} image tokens of the "
                                       f"row's images, the teacher's {theirs}; they must agree token for token")
                prompt = images.expand(prompt, counts, where)
            if len(prompt) > max_length:
                if truncation_strategy == "delete" or pics:  # cutting would split an image's tokens
                    dropped.append(where)
                    continue
                prompt = prompt[-max_length:]
            if completion is not None:
                completion = completion[:max_completion_length]
            examples.append(Example(prompt, completion, where, pics))
    if not examples:
        raise GKDError(f"dataset {', '.join(paths)}: no usable rows"
                       + (f" (all {len(dropped)} prompts exceed --max_length {max_length})" if dropped else ""))
    if dropped:
        warn(f"[gkd] dropped {len(dropped)} row(s) whose prompt exceeds --max_length {max_length} "
             f"(--truncation_strategy delete, or images in the prompt): "
             f"{', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
    return examples


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


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Right-padded sequences = prompt + completion, and whatever else the model family reads.

    ``loss_mask[b, i]`` is True where the logits at position i are scored, i.e. token i+1 is a
    completion token; ``labels[b, i]`` is token i+1 there (and -100 elsewhere). ``inputs`` holds the
    family's other model inputs (``pixel_values``, ``image_grid_thw``, ...) with the rows' entries
    concatenated along dim 0 in row order; ``teacher_inputs`` the teacher's, where its processor makes
    other ones (None: the same). The mapping is open: collate, the student, the teacher, generation and
    the remote teacher pass it on unchanged.
    """

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor  # [B, T]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_inputs: dict[str, torch.Tensor] | None = None
    images: list[list] | None = None  # each row's decoded images, for a teacher server (None: text only)

    @property
    def tokens(self) -> int:
        return int(self.loss_mask.sum())

    def model_inputs(self, teacher: bool = False) -> dict[str, torch.Tensor]:
        extra = self.teacher_inputs if teacher and self.teacher_inputs is not None else self.inputs
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **extra}

    def to(self, device) -> "Batch":
        moved = {k: v.to(device) for k, v in self.inputs.items()}
        theirs = None if self.teacher_inputs is None else {k: v.to(device) for k, v in self.teacher_inputs.items()}
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                     self.labels.to(device), moved, theirs, self.images)


def join_rows(rows: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """Per-row model inputs (a row without images has none) as one mapping: each key's tensors
    concatenated along dim 0, in row order."""
    keys = dict.fromkeys(k for r in rows or [] for k in r)
    return {k: torch.cat([r[k] for r in rows if k in r]) for k in keys}


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
            inputs: list[dict] | None = None, teacher_inputs: list[dict] | None = None,
            images: list[list] | None = None) -> Batch:
    """A batch of prompt + completion rows; ``inputs`` / ``teacher_inputs``: each row's other model inputs;
    ``images``: each row's decoded images."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    T = max(lengths)
    B = len(prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c, dtype=torch.long)
        input_ids[b, : len(seq)] = seq
        attention[b, : len(seq)] = 1
        if c:
            # logits at positions len(p)-1 .. len(seq)-2 predict the completion tokens
            loss_mask[b, len(p) - 1 : len(seq) - 1] = True
            labels[b, len(p) - 1 : len(seq) - 1] = seq[len(p):]
    return Batch(input_ids, attention, loss_mask, labels, join_rows(inputs),
                 None if teacher_inputs is None else join_rows(teacher_inputs),
                 images if images and any(images) else None)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, the layout generation wants."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask
