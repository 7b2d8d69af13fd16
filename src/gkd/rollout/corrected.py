"""Teacher-corrected sampling (speculative knowledge distillation, Xu et al. 2024): the student proposes each
token, and where the teacher does not rank it among its top K the teacher's own draw takes its place.

Per row and position, with the student's and the teacher's warped distributions p_s, p_t (the sampling
temperature, top-k and top-p applied to both) and two uniforms u, v from the row's own streams:

    x = draw(p_s, u)                       the student's proposal
    token = x            if x is among the teacher's K likeliest tokens (its raw logits)
            draw(p_t, v) otherwise

and both models read ``token`` next. K = the vocabulary keeps every proposal: plain on-policy samples. The
samples stay the student's where the teacher finds them plausible and are pulled back where the student
strays, early in training above all, when its own samples are poorest. Like on-policy completions they get no
cross-entropy (the student wrote most of them). The teacher runs beside the student position by position with
its own KV cache, so it must be a model in this process (a teacher server scores whole sequences only).
"""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.rollout.base import RowSeededSampling, SamplingConfig, row_seed
from gkd.rollout.decode import few_row_linears

# the teacher's uniforms: another stream per row than the student's (row_seed of a shifted call seed)
_TEACHER_STREAM = 7_919


class TeacherCorrectedSampling(RowSeededSampling):
    """``draw(student_logits)``, once per position as the decode loop and HF generate call it, returns the
    corrected tokens; the teacher reads the previous position's tokens first (lazily: no forward after the
    last draw). ``ids``/``mask``: the left-padded prompts both models start from. Counts the proposals
    and the replaced ones (``proposed``, ``replaced``) over the rows still writing."""

    def __init__(self, teacher, ids: torch.Tensor, mask: torch.Tensor, topk: int, seeds: list[int],
                 teacher_seeds: list[int], cfg: SamplingConfig, eos_ids: list[int], device: torch.device):
        super().__init__(seeds, cfg, device)
        self.theirs = RowSeededSampling(teacher_seeds, cfg, device)
        self.teacher, self.topk = teacher, topk
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.writing = torch.ones(ids.shape[0], dtype=torch.bool, device=device)
        self.proposed = self.replaced = 0
        from transformers import DynamicCache

        self.cache = DynamicCache(config=teacher.config)
        self.mask = mask
        self.pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        self.pending = ids  # what the teacher reads before its next logits: the prompts, then each token
        self.given = None  # this position's teacher logits when a pipeline ran the teacher (gkd.rollout.pipelined)

    def _teacher_logits(self) -> torch.Tensor:
        if self.given is not None:
            logits, self.given = self.given, None
            return logits
        n = self.pending.shape[1]
        if self.cache.get_seq_length() > 0:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], 1)
            self.pos = self.pos[:, -1:] + 1
        logits = self.teacher(input_ids=self.pending, attention_mask=self.mask, position_ids=self.pos[:, -n:],
                              past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits.float()

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        theirs = self._teacher_logits()
        proposal = super().draw(scores)
        ranked = theirs.topk(min(self.topk, theirs.shape[-1]), dim=-1).indices
        kept = (ranked == proposal[:, None]).any(-1)
        token = torch.where(kept, proposal, self.theirs.draw(theirs))
        self.proposed += int(self.writing.sum())
        self.replaced += int((self.writing & ~kept).sum())
        self.writing &= ~torch.isin(token, self.eos)
        self.pending = token[:, None]
        return token

    def check_finite(self) -> None:
        super().check_finite()
        if not bool(self.theirs.finite):
            raise GKDError("sampling stopped: the teacher's next-token logits are not finite (NaN or inf); check "
                           "--teacher_model and --torch_dtype")


class TeacherCorrectedRollout:
    """The student's on-policy sampler with teacher-corrected tokens (``topk``: K), sampling through
    ``sampler`` (gkd.rollout.hf.HFSampler, or the pipelined sampler) with ``teacher`` (a gkd.teacher Teacher that can generate: a model
    in this process, offloaded or sharded like the student)."""

    def __init__(self, sampler, teacher, topk: int):
        self.sampler, self.teacher, self.topk = sampler, teacher, topk
        self.eos_ids = sampler.eos_ids
        self.proposed = self.replaced = 0

    def check_model(self, model, where: str) -> None:
        self.sampler.check_model(model, where)
        self.teacher.check_generation(self.sampler, "--speculative_kd_topk (the teacher corrects the student's "
                                                    "samples token by token)")

    def generate(self, student, prompts: list[list[int]], rows: list[int] | None = None,
                 inputs: list[dict] | None = None, seed: int = 0) -> list[list[int]]:
        if inputs and any(inputs):
            raise GKDError("--speculative_kd_topk with image rows is not supported: the teacher reads text tokens "
                           "beside the student; leave it at 0 for image data")
        rollout = self

        class _WithStudent:  # what the teacher's generate calls with the teacher model on its device
            def generate(self, teacher_model, prompts, rows, inputs, seed):
                return rollout._sample(student, teacher_model, prompts, rows, seed)

        return self.teacher.generate(prompts, _WithStudent(), rows, inputs, seed)

    def _sample(self, student, teacher_model, prompts, rows, seed):
        sampler, made = self.sampler, []

        def sampling(ids, mask, chunk_rows):
            made.append(TeacherCorrectedSampling(
                teacher_model.eval(), ids, mask, self.topk, [row_seed(seed, r) for r in chunk_rows],
                [row_seed(seed + _TEACHER_STREAM, r) for r in chunk_rows], sampler.cfg, sampler.eos_ids,
                sampler.device))
            return made[-1]

        with torch.no_grad(), few_row_linears(teacher_model):
            out = sampler.generate_with(student, prompts, rows, sampling)
        self.proposed += sum(c.proposed for c in made)
        self.replaced += sum(c.replaced for c in made)
        return out

    def take_counts(self) -> tuple[int, int]:
        """(tokens proposed, tokens replaced by the teacher) since the last call, on this process."""
        counts = (self.proposed, self.replaced)
        self.proposed = self.replaced = 0
        return counts

    def weights_changed(self) -> None:
        self.sampler.weights_changed()

    def close(self) -> None:
        self.sampler.close()
