"""Batches: prompt + completion rows padded into tensors, with each row's other model inputs joined."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    sampled: bool = False  # the student sampled the completions (on-policy): a teacher cache skips them

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
                     self.labels.to(device), moved, theirs, self.images, self.sampled)


def join_rows(rows: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """Per-row model inputs (a row without images has none) as one mapping: each key's tensors
    concatenated along dim 0, in row order."""
    keys = dict.fromkeys(k for r in rows or [] for k in r)
    return {k: torch.cat([r[k] for r in rows if k in r]) for k in keys}


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
            inputs: list[dict] | None = None, teacher_inputs: list[dict] | None = None,
            images: list[list] | None = None, sampled: bool = False) -> Batch:
    """A batch of prompt + completion rows; ``inputs`` / ``teacher_inputs``: each row's other model inputs;
    ``images``: each row's decoded images; ``sampled``: the student wrote the completions."""
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
                 images if images and any(images) else None, sampled)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, the layout generation wants."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask
