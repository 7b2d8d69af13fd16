"""What a teacher gives the loss, and the protocol every teacher satisfies. The loss never knows which
teacher it got."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from gkd.data.batch import Batch
from gkd.losses import LogitHead


@dataclass
class TeacherOutput:
    """Either final hidden states + the logit head (full distribution, or its top-``topk``), or
    per-position top-k ids + log-probs. Positions align with the batch: row i predicts token i+1."""

    hidden: torch.Tensor | None = None  # [B, T, H_t]
    head: LogitHead | None = None  # weight [V, H_t], and the family's bias, scale, softcap
    topk: int | None = None
    topk_ids: torch.Tensor | None = None  # [B, T, K]
    topk_logprobs: torch.Tensor | None = None  # [B, T, K]

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        """The head's weight alone (the logits need the whole ``head``: bias, scale, softcap)."""
        return None if self.head is None else self.head.weight

    def loss_kwargs(self) -> dict:
        if self.hidden is not None:
            return dict(teacher_hidden=self.hidden, teacher_lm_head_weight=self.head, teacher_topk=self.topk)
        return dict(teacher_topk_ids=self.topk_ids, teacher_topk_logprobs=self.topk_logprobs)


class Teacher(Protocol):
    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """The teacher's side of the loss for ``batch``; with ``split`` (gkd.parallel.context.ContextSplit)
        only for this rank's tokens of each sequence."""
