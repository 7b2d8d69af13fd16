"""A step's completions: the student's samples (on-policy) or the dataset's completions (off-policy), which the
teacher writes where a row has none or --seq_kd is on. Which of them a step takes is gkd.train.sources'."""

from __future__ import annotations

import torch

from gkd import parallel
from gkd.data.order import StepData, lmbda_draw, sample_seed
from gkd.data.rows import Example


class Completions:
    def __init__(self, method, rollout, sampler, teacher, student, train_rows: list[Example], par,
                 gather_for_generation: bool, ahead: "Ahead | None" = None):
        self.method, self.rollout, self.sampler, self.teacher, self.student, self.par = (
            method, rollout, sampler, teacher, student, par)
        self.ahead = ahead  # --async_generation: the next on-policy step's request, made while this one trains
        # an FSDP student is gathered whole once per generation unless vLLM holds its own copy
        self.gather = gather_for_generation and rollout is sampler
        # whether off-policy steps can need teacher completions at all (else no rank asks the others)
        self.teacher_completes = method.seq_kd or any(e.completion_ids is None for e in train_rows)

    def __call__(self, rows: list[Example], step: int, first: int, inputs, teacher_inputs, sample: bool
                 ) -> tuple[list[list[int]], int | None]:
        """Completion ids for each row and the policy version that sampled them: the number of optimizer steps
        whose updates the student's weights held (``step`` itself when exactly on-policy; None: the dataset's
        or the teacher's completions). ``sample`` (the same on every rank): the student samples them. ``first``
        is the index of rows[0] in the global batch: it seeds each row's sample. ``inputs`` / ``teacher_inputs``:
        each row's other model inputs (images) for the student / the teacher."""
        if sample:
            drawn, version = self._sampled(rows, step, first, inputs)
        else:
            drawn, version = self._not_sampled(rows, step, first, inputs, teacher_inputs), None
        if self.ahead is not None:  # this step's request has returned: the next may go out
            self.ahead.request_after(step, self.student)
        return drawn, version

    def _sampled(self, rows: list[Example], step: int, first: int, inputs) -> tuple[list[list[int]], int]:
        """The student's samples: requested ahead during an earlier step (--async_generation), or drawn now."""
        got = None if self.ahead is None else self.ahead.take(step)
        if got is None:
            ids = list(range(first, first + len(rows)))
            with parallel.gathered_for_generation(self.student, self.gather):
                got = self.rollout.generate(self.student, [r.prompt_ids for r in rows], ids, inputs,
                                            sample_seed(self.method.seed, step, 0)), step
        drawn, version = got
        return self.par.share_in_tp(drawn), version

    def _not_sampled(self, rows: list[Example], step: int, first: int, inputs, teacher_inputs
                     ) -> list[list[int]]:
        m, prompts = self.method, [r.prompt_ids for r in rows]
        ids = list(range(first, first + len(rows)))
        completions = [None if m.seq_kd else r.completion_ids for r in rows]
        if not self.teacher_completes:
            return completions
        missing = [i for i, c in enumerate(completions) if c is None]
        # sequence-level KD, and prompt-only rows on off-policy steps: the teacher completes. A sharded
        # teacher needs every rank in each forward, so all ranks generate as many prompts (repeats fill in).
        count = int(self.par.dp_reduce(torch.tensor(len(missing)), op=torch.distributed.ReduceOp.MAX))
        if count:
            fill = missing + [missing[0] if missing else 0] * (count - len(missing))
            theirs = teacher_inputs or inputs
            drawn = self.teacher.generate([prompts[i] for i in fill], self.sampler, [ids[i] for i in fill],
                                          None if theirs is None else [theirs[i] for i in fill],
                                          sample_seed(m.seed, step, 1))
            for i, c in zip(missing, self.par.share_in_tp(drawn)):
                completions[i] = c
        return completions


class Ahead:
    """--async_generation N (a vLLM server samples): once a step's completions are in hand, the next on-policy
    step within N steps is requested from the weights of this step (version = its index), and a thread waits
    on the server while this step trains. One request at a time: the next weight sync comes after it returned.
    Every rank requests its own rows of that step with their usual seeds. Nothing of it is checkpointed: a
    resumed run samples its first step anew."""

    def __init__(self, bound: int, method, data: StepData, last_step: int, par, rollout):
        self.bound, self.method, self.data, self.last_step, self.par, self.rollout = (
            bound, method, data, last_step, par, rollout)
        self.pending = None  # (step, answer, server weight tag, policy version) of the request in flight

    def _next_on_policy(self, step: int) -> int | None:
        ahead = range(step + 1, min(step + self.bound, self.last_step) + 1)
        return next((s for s in ahead if lmbda_draw(self.method.seed, s) < self.method.lmbda), None)

    def request_after(self, step: int, model) -> None:
        """Request the next on-policy step within N of ``step`` from the current weights (synced first)."""
        target = None if self.pending is not None else self._next_on_policy(step)
        if target is None:
            return
        everyone = self.data.rows(target)
        lo, hi = self.par.dp_slice(len(everyone))
        answer, tag = self.rollout.generate_ahead(model, [r.prompt_ids for r in everyone[lo:hi]],
                                                  list(range(lo, hi)), sample_seed(self.method.seed, target, 0))
        self.pending = (target, answer, tag, step)

    def take(self, step: int) -> tuple[list[list[int]], int] | None:
        """``step``'s completions and their policy version if they were requested ahead and the server kept
        those weights throughout (else None: the caller samples now)."""
        if self.pending is None or self.pending[0] != step:
            return None
        _, answer, tag, version = self.pending
        self.pending = None
        drawn = self.rollout.take(answer, tag)
        return None if drawn is None else (drawn, version)
