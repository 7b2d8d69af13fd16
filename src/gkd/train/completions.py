"""Where a step's completions come from: the lmbda draw picks the student's samples (on-policy) or the
dataset's completions (off-policy), which the teacher writes where a row has none or --seq_kd is on."""

from __future__ import annotations

import torch

from gkd import parallel
from gkd.data.order import lmbda_draw, sample_seed
from gkd.data.rows import Example


class Completions:
    def __init__(self, method, rollout, sampler, teacher, student, train_rows: list[Example], par,
                 gather_for_generation: bool):
        self.method, self.rollout, self.sampler, self.teacher, self.student, self.par = (
            method, rollout, sampler, teacher, student, par)
        # an FSDP student is gathered whole once per generation unless vLLM holds its own copy
        self.gather = gather_for_generation and rollout is sampler
        # whether off-policy steps can need teacher completions at all (else no rank asks the others)
        self.teacher_completes = method.seq_kd or any(e.completion_ids is None for e in train_rows)

    def __call__(self, rows: list[Example], step: int, first: int, inputs, teacher_inputs
                 ) -> tuple[list[list[int]], bool]:
        """Completion ids for each row and whether the student sampled them (the lmbda draw, the same on every
        rank). ``first`` is the index of rows[0] in the global batch: it seeds each row's sample. ``inputs``
        / ``teacher_inputs``: each row's other model inputs (images) for the student / the teacher."""
        m, prompts = self.method, [r.prompt_ids for r in rows]
        ids = list(range(first, first + len(rows)))
        if lmbda_draw(m.seed, step) < m.lmbda:
            with parallel.gathered_for_generation(self.student, self.gather):
                drawn = self.rollout.generate(self.student, prompts, ids, inputs, sample_seed(m.seed, step, 0))
            return self.par.share_in_tp(drawn), True
        completions = [None if m.seq_kd else r.completion_ids for r in rows]
        if not self.teacher_completes:
            return completions, False
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
        return completions, False
