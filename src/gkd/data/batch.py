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
    images: list[list] | None = None  # each sequence's decoded images, for a teacher server (None: text only)
    sampled: bool = False  # the student sampled the completions (on-policy): a teacher cache skips them
    # packed rows (collate's ``pack``): each sequence's own positions, from 0 at its first token [B, T];
    # None: one sequence per row, from position 0
    position_ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.loss_mask.sum())

    def model_inputs(self, teacher: bool = False) -> dict[str, torch.Tensor]:
        extra = self.teacher_inputs if teacher and self.teacher_inputs is not None else self.inputs
        if self.position_ids is not None:
            # no 2D mask: transformers confines attention to each sequence from where its positions restart
            return {"input_ids": self.input_ids, "position_ids": self.position_ids, **extra}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **extra}

    def sequences(self) -> list[tuple[int, int, int]]:
        """(row, start, end) of every sequence in order: each row's tokens, or each sequence packed in a row."""
        if self.position_ids is None:
            return [(b, 0, int(n)) for b, n in enumerate(self.attention_mask.sum(1).tolist())]
        out = []
        for b, (pos, att) in enumerate(zip(self.position_ids.tolist(), self.attention_mask.tolist())):
            starts = [i for i, p in enumerate(pos) if p == 0 and att[i]]
            ends = starts[1:] + [sum(att)]
            out += [(b, s, e) for s, e in zip(starts, ends)]
        return out

    def scored_sequences(self) -> list[tuple[list[int], int]]:
        """(token ids, first scored position in them or -1) per sequence, in ``sequences()`` order."""
        out = []
        for b, start, end in self.sequences():
            scored = self.loss_mask[b, start:end].nonzero()
            out.append((self.input_ids[b, start:end].tolist(), int(scored[0]) if len(scored) else -1))
        return out

    def sequence_index(self) -> torch.Tensor:
        """[B, T]: the number of the sequence (in ``sequences()`` order) each token belongs to, -1 on padding."""
        index = torch.full(self.input_ids.shape, -1, dtype=torch.long, device=self.input_ids.device)
        for s, (b, start, end) in enumerate(self.sequences()):
            index[b, start:end] = s
        return index

    def to(self, device) -> "Batch":
        moved = {k: v.to(device) for k, v in self.inputs.items()}
        theirs = None if self.teacher_inputs is None else {k: v.to(device) for k, v in self.teacher_inputs.items()}
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device),
                     self.labels.to(device), moved, theirs, self.images, self.sampled,
                     None if self.position_ids is None else self.position_ids.to(device))


def join_rows(rows: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """Per-row model inputs (a row without images has none) as one mapping: each key's tensors
    concatenated along dim 0, in row order."""
    keys = dict.fromkeys(k for r in rows or [] for k in r)
    return {k: torch.cat([r[k] for r in rows if k in r]) for k in keys}


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
            inputs: list[dict] | None = None, teacher_inputs: list[dict] | None = None,
            images: list[list] | None = None, sampled: bool = False, pack: int | None = None) -> Batch:
    """A batch of prompt + completion sequences; ``inputs`` / ``teacher_inputs``: each sequence's other model
    inputs; ``images``: each one's decoded images; ``sampled``: the student wrote the completions. ``pack``:
    sequences packed in order into rows of at most that many tokens (a longer sequence gets a row of its own),
    instead of one row each."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    rows = _packed_rows(lengths, pack) if pack else [[i] for i in range(len(lengths))]
    T = max(sum(lengths[i] for i in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), -100, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            p, c = prompts[i], completions[i]
            seq = torch.tensor(p + c, dtype=torch.long)
            end = at + len(seq)
            input_ids[b, at:end] = seq
            attention[b, at:end] = 1
            positions[b, at:end] = torch.arange(len(seq))
            if c:
                # logits at positions len(p)-1 .. len(seq)-2 predict the completion tokens
                loss_mask[b, at + len(p) - 1:end - 1] = True
                labels[b, at + len(p) - 1:end - 1] = seq[len(p):]
            at = end
        positions[b, at:] = torch.arange(T - at)  # padding: a sequence of its own, never attended to
    return Batch(input_ids, attention, loss_mask, labels, join_rows(inputs),
                 None if teacher_inputs is None else join_rows(teacher_inputs),
                 images if images and any(images) else None, sampled, positions if pack else None)


def _packed_rows(lengths: list[int], limit: int) -> list[list[int]]:
    """Sequence numbers per row, in order: a row is closed when the next sequence would exceed ``limit``."""
    rows, used = [[]], 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > limit:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, the layout generation wants."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask
