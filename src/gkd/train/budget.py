"""The run's length and the learning-rate schedule along it.

A run is bounded by optimizer steps (``--max_steps`` or ``--num_train_epochs``), by seconds of training
(``--max_train_seconds``), or by both, and ends at the first bound it reaches. With a time bound the
schedule's progress is the larger of the steps' and the seconds' share used, so the warm-up and the decay
fit the budget whatever the step time turns out to be (a cosine ends near zero when the time does).
Every rank reads the same clock: the largest rank's elapsed seconds, agreed by one all-reduce a step,
so their learning rates and their last step are the same.
"""

from __future__ import annotations

import math
import sys
import time

import torch


class Budget:
    def __init__(self, o, n_rows: int, par, spent: float = 0.0):
        """``o``: the optim section; ``n_rows``: training rows (the epochs' step count); ``spent``: seconds of
        training a resumed run had used."""
        self.seconds = o.max_train_seconds
        by_steps = o.max_steps or (0 if self.seconds else max(1, math.ceil(o.num_train_epochs * n_rows / o.global_batch_size)))
        self.steps = by_steps or None  # None: the time alone ends the run
        self.kind, self.warmup_ratio, self.par = o.lr_scheduler_type, o.warmup_ratio, par
        self.spent, self.elapsed, self.started = spent, spent, None

    @property
    def step_bound(self) -> int:
        """The last step the run may reach (unbounded with a time budget alone)."""
        return self.steps or sys.maxsize

    def start(self) -> None:
        self.started = time.perf_counter()

    def tick(self) -> None:
        """After each optimizer step, before the schedule moves: read the (agreed) clock."""
        if self.seconds and self.started is not None:
            self.elapsed = self.par.most(self.spent + time.perf_counter() - self.started)

    def over(self, done: int) -> bool:
        """Whether the run ends after ``done`` optimizer steps."""
        return (self.steps is not None and done >= self.steps) or (bool(self.seconds) and self.elapsed >= self.seconds)

    def metrics(self) -> dict:
        """Logged with each step of a timed run: the seconds used."""
        return {"train_seconds": self.elapsed} if self.seconds else {}

    def progress(self, step: int) -> float:
        """The share of the budget used when ``step`` (0-based) starts."""
        shares = [step / self.steps if self.steps else 0.0, self.elapsed / self.seconds if self.seconds else 0.0]
        return min(1.0, max(shares))

    def schedule(self, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        if not self.seconds:  # by steps alone: the warm-up counts whole steps, as it always has
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lr_lambda(self.kind, int(self.warmup_ratio * self.steps), self.steps))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(self.kind, self.warmup_ratio,
                                                                                 self.progress(step)))


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def factor(kind: str, warmup_ratio: float, progress: float) -> float:
    """The schedule's multiplier at ``progress`` in [0, 1] of the budget (a step's start): linear warm-up over
    the first ``warmup_ratio``, then constant, cosine or linear decay to zero at 1."""
    if progress < warmup_ratio:
        return progress / warmup_ratio
    if kind == "constant":
        return 1.0
    rest = (progress - warmup_ratio) / (1.0 - warmup_ratio)
    return 0.5 * (1.0 + math.cos(math.pi * rest)) if kind == "cosine" else 1.0 - rest
