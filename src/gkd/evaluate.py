"""Held-out metrics of a student against its teacher (`gkd eval`, and before/after in the demo)."""

from __future__ import annotations

import math

import torch

from gkd.data import collate
from gkd.losses import fused_linear_gkd_loss, sft_cross_entropy
from gkd.models import decoder, lm_head_weight
from gkd.rollout import HFSampler, SamplingConfig


def _hidden(model, batch):
    return decoder(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state


def _token_logprob_sum(model, batch, chunk: int = 256) -> float:
    """Sum of log p(token) over the batch's completion tokens, lm_head applied a chunk at a time."""
    h = _hidden(model, batch)[batch.loss_mask]
    y = batch.labels[batch.loss_mask]
    w = lm_head_weight(model)
    return -sum(float(sft_cross_entropy(h[i:i + chunk] @ w.T, y[i:i + chunk], reduction="sum"))
                for i in range(0, h.shape[0], chunk))


def greedy(model, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size=16):
    sampler = HFSampler(SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size),
                        eos_ids, pad_id, device)
    return sampler.generate(model, prompts)


@torch.no_grad()
def evaluate(student, teacher, prompts: list[list[int]], *, eos_ids, pad_id, beta: float, temperature: float,
             max_new_tokens: int, device, batch_size: int = 16, teacher_completions=None) -> dict:
    """divergence and top-1 agreement on the teacher's greedy completions, the student's perplexity
    on them, and the teacher's mean log-prob of the student's own greedy completions."""
    if teacher_completions is None:
        teacher_completions = greedy(teacher, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size)
    student_completions = greedy(student, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size)
    div = ce = agree = tokens = 0.0
    teacher_lp = student_tokens = 0.0
    for i in range(0, len(prompts), batch_size):
        p = prompts[i:i + batch_size]
        batch = collate(p, teacher_completions[i:i + batch_size], pad_id).to(device)
        if batch.tokens:
            out = fused_linear_gkd_loss(
                _hidden(student, batch), lm_head_weight(student), teacher_hidden=_hidden(teacher, batch),
                teacher_lm_head_weight=lm_head_weight(teacher), labels=batch.labels, beta=beta,
                temperature=temperature, mask=batch.loss_mask, reduction="sum")
            div += float(out.divergence_sum)
            ce += float(out.sft_sum)
            agree += float(out.agree_count)
            tokens += out.tokens
        sbatch = collate(p, student_completions[i:i + batch_size], pad_id).to(device)
        if sbatch.tokens:
            teacher_lp += _token_logprob_sum(teacher, sbatch)
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
