"""Where each optimizer step's completions come from: the dataset (off-policy), fresh samples of the student
(on-policy), or -- with DistiLLM's adaptive off-policy schedule -- earlier student samples replayed.

``--lmbda_schedule fixed`` (GKD): a step samples when its lmbda draw u(seed, step) < --lmbda.

``--lmbda_schedule adaptive`` (DistiLLM, Ko et al. 2024): the share s of steps on student data starts at
--lmbda and rises by --adaptive_lmbda_step (to at most 1) whenever a held-out divergence (--eval_steps) is
--adaptive_lmbda_eps or more above the reference, which is then moved to it (the first evaluation sets the
reference). A step with u < s trains on student data: fresh samples when u < s x (1 - progress) or while the
replay buffer holds fewer rows than --replay_capacity, else a batch replayed from the buffer
(rows drawn without replacement, seeded by the step); fresh samples enter the buffer (the oldest leave past its
capacity). Every decision is a function of (seed, step) and of values all ranks share (the evaluations are
reduced; the buffer holds the global batch's rows, gathered over data parallel), so the run does not depend on
its layout. Replaying saves the generation, the costly part of an on-policy step.
"""

from __future__ import annotations

import collections

import torch

from gkd.data.order import lmbda_draw, sample_seed

DATA, FRESH, REPLAY = "data", "fresh", "replay"


def choose(u: float, share: float, progress: float, buffered: int, capacity: int) -> str:
    """DistiLLM's per-step choice for the draw ``u`` at student-data share ``share`` and ``progress`` in [0, 1]
    with ``buffered`` rows in a replay buffer of ``capacity`` (at least one batch)."""
    if u >= share:
        return DATA
    return FRESH if u < share * (1.0 - progress) or buffered < capacity else REPLAY


class FixedLmbda:
    """GKD's schedule: the same share of on-policy steps throughout."""

    adaptive = False

    def __init__(self, method):
        self.method = method

    def source(self, step: int, progress: float) -> str:
        return FRESH if lmbda_draw(self.method.seed, step) < self.method.lmbda else DATA

    def observe(self, metrics: dict) -> None:
        pass

    def rows(self, step: int, source: str, data) -> tuple[list[int], None, None]:
        """The step's rows (indices), and replayed completions with their version (never, here)."""
        return data.indices(step), None, None

    def keep(self, source: str, step: int, rows: list[int], completions: list[list[int]], version, par) -> None:
        pass

    def metrics(self) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass


class AdaptiveLmbda:
    """DistiLLM's schedule (see the module's text). ``rows`` are indices into the training rows."""

    adaptive = True

    def __init__(self, method, global_batch: int):
        self.method, self.batch = method, global_batch
        self.share, self.reference = method.lmbda, None
        self.buffer: collections.deque = collections.deque(maxlen=method.replay_capacity)

    def source(self, step: int, progress: float) -> str:
        return choose(lmbda_draw(self.method.seed, step), self.share, progress, len(self.buffer),
                      self.method.replay_capacity)

    def observe(self, metrics: dict) -> None:
        """After an evaluation: its held-out divergence (the mean over teachers when there are several)."""
        values = [v for k, v in metrics.items() if k.startswith("eval_") and k.endswith("divergence")]
        if not values:
            return
        loss = sum(values) / len(values)
        if self.reference is None:
            self.reference = loss
        elif loss >= self.reference + self.method.adaptive_lmbda_eps:
            self.share = min(1.0, self.share + self.method.adaptive_lmbda_step)
            self.reference = loss

    def rows(self, step: int, source: str, data) -> tuple[list[int], list[list[int]] | None, int | None]:
        """The step's rows (indices into the training rows), and on a replayed step their completions and the
        oldest policy version among them (else None, None)."""
        return self.replay(step) if source == REPLAY else (data.indices(step), None, None)

    def keep(self, source: str, step: int, rows: list[int], completions: list[list[int]], version, par) -> None:
        """After a fresh step: its global batch (this rank's ``completions`` gathered over data parallel)."""
        if source == FRESH:
            self.record(step, rows, [c for part in par.dp_gather(completions) for c in part], version)

    def record(self, step: int, rows: list[int], completions: list[list[int]], version: int) -> None:
        """A fresh step's global batch: row indices and the samples, in the batch's order."""
        self.buffer.extend((r, list(c), version) for r, c in zip(rows, completions))

    def replay(self, step: int) -> tuple[list[int], list[list[int]], int]:
        """The replayed batch of ``step``: row indices, their samples, and the oldest policy version among them."""
        g = torch.Generator().manual_seed(sample_seed(self.method.seed, step, 2))
        picked = [self.buffer[i] for i in torch.randperm(len(self.buffer), generator=g)[:self.batch].tolist()]
        return [p[0] for p in picked], [p[1] for p in picked], min(p[2] for p in picked)

    def metrics(self) -> dict:
        """Logged after each evaluation: the share it left and the buffer's size."""
        return {"student_data_share": self.share, "replay_buffer_rows": len(self.buffer)}

    def state(self) -> dict:
        return {"share": self.share, "reference": self.reference, "buffer": [list(b) for b in self.buffer]}

    def load(self, state: dict) -> None:
        if state:
            self.share, self.reference = state["share"], state["reference"]
            self.buffer.extend(tuple(b) for b in state["buffer"])


def schedule(method, global_batch: int):
    return AdaptiveLmbda(method, global_batch) if method.lmbda_schedule == "adaptive" else FixedLmbda(method)
