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
    aligned: torch.Tensor | None = None  # [B, T] bool: a token-level teacher distribution there (another tokenizer)
    spans: "SpanScores | None" = None  # unaligned spans scored by their text's log-probability (another tokenizer)
    mixture: list["TeacherOutput"] | None = None  # several teachers' outputs, scored against their mixture
    weights: list[float] | None = None  # the mixture's weights, summing to 1

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        """The head's weight alone (the logits need the whole ``head``: bias, scale, softcap)."""
        return None if self.head is None else self.head.weight

    def local(self, split) -> "TeacherOutput":
        """A whole batch's top-K output at this rank's positions of a context split (``None``: unchanged)."""
        if split is None:
            return self
        return TeacherOutput(topk_ids=split.local(self.topk_ids), topk_logprobs=split.local(self.topk_logprobs),
                             aligned=None if self.aligned is None else split.local(self.aligned, False))

    def loss_kwargs(self) -> dict:
        if self.mixture is not None:
            return dict(teacher_mixture=[m.loss_kwargs() for m in self.mixture], teacher_mixture_weights=self.weights)
        if self.hidden is not None:
            return dict(teacher_hidden=self.hidden, teacher_lm_head_weight=self.head, teacher_topk=self.topk)
        return dict(teacher_topk_ids=self.topk_ids, teacher_topk_logprobs=self.topk_logprobs)


@dataclass
class SpanScores:
    """Spans of the student's tokens that no teacher token lines up with, and the teacher's log-probability of
    each span's text (gkd.teacher.cross_tokenizer, docs/cross_tokenizer.md)."""

    index: torch.Tensor  # [B, T] long: the span whose token position i predicts (-1: none)
    tokens: torch.Tensor  # [B, T] long: the student token predicted there
    teacher_logprobs: torch.Tensor  # [S] float32: sum of the teacher's log-probs of its tokens of each span


class Teacher(Protocol):
    """Everything training asks of a teacher; nothing outside gkd.teacher knows which one it has.

    ``topk``: the K entries per position it gives the loss (None: the full vocabulary). ``context``: the
    longest sequence it scores (None: unknown, or checked by ``check_rows`` itself)."""

    topk: int | None
    context: int | None

    def check_rows(self, examples: list, new_tokens: int, sampled: bool) -> None:
        """Fail before training on rows it cannot score (images it cannot take, sequences too long)."""

    def score(self, batch: Batch, split=None) -> TeacherOutput:
        """The teacher's side of the loss for ``batch``; with ``split`` (gkd.parallel.context.ContextSplit)
        only for this rank's tokens of each sequence."""

    def logit_head(self, device) -> LogitHead:
        """The head the loss applies to the hidden states it gives (teachers that give them: a local one, a
        server on the hidden wire), on ``device``, without a forward (the teacher cache's full-vocabulary rows)."""

    def score_pipelined(self, batches: list[Batch], last_stage: bool, splits=None) -> list[TeacherOutput | None]:
        """Each micro-batch's output for a pipelined student (every pipeline rank calls it); outputs on the
        rank that holds the last stage (``last_stage``), None elsewhere; ``splits``: each batch's context split
        (outputs of this rank's tokens)."""

    def check_generation(self, rollout, why: str) -> None:
        """Fail now unless it can write completions through ``rollout`` (``why``: what needs them)."""

    def generate(self, prompts: list[list[int]], rollout, rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        """Completions written by the teacher, sampled by ``rollout`` (gkd.rollout.base.Rollout)."""

    def evaluate(self, student, prompts: list[list[int]], **kw):
        """Held-out metrics of ``student`` against this teacher (gkd.evaluate.evaluate's arguments)."""

    def evaluation_groups(self, examples: list) -> list[tuple[str, "Teacher", list]]:
        """(name, teacher, its held-out rows) for each set of metrics --eval_steps reports: ("", itself, every
        row) for one teacher (OneTeacher); a member per teacher for several."""

    def memory_mib(self, most, device) -> dict[str, float]:
        """MiB of its weights per rank (``most``: the largest over ranks) and of those on ``device``."""

    def close(self) -> None:
        """Release what outlives training (connections, threads)."""


class OneTeacher:
    """What a single teacher answers that several answer otherwise."""

    def evaluation_groups(self, examples: list) -> list[tuple[str, "Teacher", list]]:
        return [("", self, examples)]
