"""Held-out metrics of a student against its teacher (`gkd eval`, and before/after in the demo)."""

from __future__ import annotations

import math

import torch

from gkd import parallel
from gkd.data import collate
from gkd.losses import fused_linear_gkd_loss, sft_cross_entropy
from gkd.models import adapter_for
from gkd.rollout import HFSampler, SamplingConfig


def _hidden(model, batch, teacher: bool = False):
    return adapter_for(model).final_hidden(model, batch.model_inputs(teacher))


def _token_logprob_sum(model, batch, chunk: int = 256, teacher: bool = False) -> float:
    """Sum of log p(token) over the batch's completion tokens, lm_head applied a chunk at a time."""
    h = _hidden(model, batch, teacher)[batch.loss_mask]
    y = batch.labels[batch.loss_mask]
    head = adapter_for(model).logit_head(model)
    return -sum(float(sft_cross_entropy(head.logits(h[i:i + chunk]), y[i:i + chunk], reduction="sum"))
                for i in range(0, h.shape[0], chunk))


def greedy(model, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size=16, inputs=None, synced=False):
    sampler = HFSampler(SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size),
                        eos_ids, pad_id, device, synced=synced)
    return sampler.generate(model, prompts, None, inputs)


SUMS = ("divergence", "sft", "agree", "tokens", "teacher_lp", "student_tokens", "prompts")


@torch.no_grad()
def evaluate(student, teacher, prompts: list[list[int]], *, eos_ids, pad_id, beta: float, temperature: float,
             max_new_tokens: int, device, batch_size: int = 16, teacher_completions=None, inputs=None,
             teacher_inputs=None, counted: list[bool] | None = None, reduce=None) -> dict:
    """divergence and top-1 agreement on the teacher's greedy completions, the student's perplexity
    on them, and the teacher's mean log-prob of the student's own greedy completions. ``inputs`` /
    ``teacher_inputs``: each prompt's other model inputs (images), for the student / the teacher.

    Sharded over data-parallel ranks: each rank passes its prompts (padded to the same count; ``counted``
    says which are real) and ``reduce``, which sums a float64 tensor over the ranks; every rank then joins
    every forward, as sharded weights need."""
    inputs = inputs or [{} for _ in prompts]
    theirs = teacher_inputs or inputs
    counted = counted or [True] * len(prompts)
    sharded = reduce is not None
    if teacher_completions is None:
        teacher_completions = greedy(teacher, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size, theirs,
                                     synced=sharded)
    with parallel.gathered_for_generation(student, sharded):
        student_completions = greedy(student, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size, inputs,
                                     synced=sharded)
    sums = torch.zeros(len(SUMS), dtype=torch.float64)
    for i in range(0, len(prompts), batch_size):
        rows = slice(i, i + batch_size)
        real = torch.tensor(counted[rows])
        batch = collate(prompts[rows], teacher_completions[rows], pad_id, inputs[rows], theirs[rows])
        batch.loss_mask[~real] = False
        batch = batch.to(device)
        if batch.tokens or sharded:
            out = fused_linear_gkd_loss(
                _hidden(student, batch), adapter_for(student).logit_head(student),
                teacher_hidden=_hidden(teacher, batch, teacher=True),
                teacher_lm_head_weight=adapter_for(teacher).logit_head(teacher), labels=batch.labels, beta=beta,
                temperature=temperature, mask=batch.loss_mask, reduction="sum")
            sums[:4] += torch.tensor([float(out.divergence_sum), float(out.sft_sum), float(out.agree_count),
                                      out.tokens], dtype=torch.float64)
        sbatch = collate(prompts[rows], student_completions[rows], pad_id, inputs[rows], theirs[rows])
        sbatch.loss_mask[~real] = False
        sbatch = sbatch.to(device)
        if sbatch.tokens or sharded:
            sums[4] += _token_logprob_sum(teacher, sbatch, teacher=True)
            sums[5] += sbatch.tokens
    sums[6] = sum(counted)
    if sharded:
        sums = reduce(sums)
    div, ce, agree, tokens, teacher_lp, student_tokens, n = sums.tolist()
    return {
        "divergence": div / max(tokens, 1),
        "top1_agreement": agree / max(tokens, 1),
        "student_ppl_on_teacher": math.exp(ce / max(tokens, 1)),
        "teacher_logprob_of_student": teacher_lp / max(student_tokens, 1),
        "teacher_tokens": int(tokens),
        "student_completion_length": student_tokens / max(n, 1),
        "prompts": int(n),
    }, teacher_completions, student_completions


def format_table(columns: dict[str, dict]) -> str:
    keys = list(next(iter(columns.values())).keys())
    width = max(len(k) for k in keys)
    lines = [" " * width + "".join(f"{name:>14}" for name in columns)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{_fmt(col[k]):>14}" for col in columns.values()))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
