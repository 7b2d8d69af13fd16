"""Held-out metrics of a student against its teacher (`gkd eval`, and before/after in the demo)."""

from __future__ import annotations

import math

import torch

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


def greedy(model, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size=16, inputs=None):
    sampler = HFSampler(SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size),
                        eos_ids, pad_id, device)
    return sampler.generate(model, prompts, None, inputs)


@torch.no_grad()
def evaluate(student, teacher, prompts: list[list[int]], *, eos_ids, pad_id, beta: float, temperature: float,
             max_new_tokens: int, device, batch_size: int = 16, teacher_completions=None, inputs=None,
             teacher_inputs=None) -> dict:
    """divergence and top-1 agreement on the teacher's greedy completions, the student's perplexity
    on them, and the teacher's mean log-prob of the student's own greedy completions. ``inputs`` /
    ``teacher_inputs``: each prompt's other model inputs (images), for the student / the teacher."""
    inputs = inputs or [{} for _ in prompts]
    theirs = teacher_inputs or inputs
    if teacher_completions is None:
        teacher_completions = greedy(teacher, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size, theirs)
    student_completions = greedy(student, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size, inputs)
    div = ce = agree = tokens = 0.0
    teacher_lp = student_tokens = 0.0
    for i in range(0, len(prompts), batch_size):
        p = prompts[i:i + batch_size]
        rows = slice(i, i + batch_size)
        batch = collate(p, teacher_completions[rows], pad_id, inputs[rows], theirs[rows]).to(device)
        if batch.tokens:
            out = fused_linear_gkd_loss(
                _hidden(student, batch), adapter_for(student).logit_head(student),
                teacher_hidden=_hidden(teacher, batch, teacher=True),
                teacher_lm_head_weight=adapter_for(teacher).logit_head(teacher), labels=batch.labels, beta=beta,
                temperature=temperature, mask=batch.loss_mask, reduction="sum")
            div += float(out.divergence_sum)
            ce += float(out.sft_sum)
            agree += float(out.agree_count)
            tokens += out.tokens
        sbatch = collate(p, student_completions[rows], pad_id, inputs[rows], theirs[rows]).to(device)
        if sbatch.tokens:
            teacher_lp += _token_logprob_sum(teacher, sbatch, teacher=True)
            student_tokens += sbatch.tokens
    return {
        "divergence": div / max(tokens, 1),
        "top1_agreement": agree / max(tokens, 1),
        "student_ppl_on_teacher": math.exp(ce / max(tokens, 1)),
        "teacher_logprob_of_student": teacher_lp / max(student_tokens, 1),
        "teacher_tokens": int(tokens),
        "student_completion_length": student_tokens / max(len(prompts), 1),
        "prompts": len(prompts),
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
