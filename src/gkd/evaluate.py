"""Held-out metrics of a student against its teacher (`gkd eval`, and before/after in the demo)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gkd import parallel
from gkd.data.batch import collate
from gkd.losses import fused_linear_gkd_loss, sft_cross_entropy
from gkd.models import adapter_for
from gkd.parallel import pipeline
from gkd.parallel.pipeline import staged
from gkd.rollout.base import SamplingConfig
from gkd.rollout.hf import HFSampler


def _hidden(model, batch, teacher: bool = False):
    """The final hidden states of ``batch``; for a model split into pipeline stages, on the rank of its last
    stage (None elsewhere)."""
    if staged(model) is not None:
        return pipeline.final_hidden(model, batch, teacher)
    return adapter_for(model).final_hidden(model, batch.model_inputs(teacher))


def _head(model):
    """The model's logit head, this rank's vocabulary shard of it under tensor parallelism."""
    return parallel.local_head(adapter_for(model).logit_head(model))


def _token_logprobs(model, batch, chunk: int = 256, teacher: bool = False, tp_group=None) -> torch.Tensor:
    """Per row, the sum of log p(token) over its completion tokens, lm_head applied a chunk at a time (zeros off
    a pipeline's last stage)."""
    h = _hidden(model, batch, teacher)
    if h is None:
        return torch.zeros(batch.loss_mask.shape[0], dtype=torch.float64)
    h = h[batch.loss_mask]
    y = batch.labels[batch.loss_mask]
    head = _head(model)
    lp = torch.cat([-sft_cross_entropy(head.logits(h[i:i + chunk]), y[i:i + chunk], reduction="none",
                                       tp_group=tp_group).double()
                    for i in range(0, h.shape[0], chunk)]) if h.shape[0] else torch.zeros(0, dtype=torch.float64)
    row_of = torch.arange(batch.loss_mask.shape[0]).repeat_interleave(batch.loss_mask.sum(1).cpu())
    return torch.zeros(batch.loss_mask.shape[0], dtype=torch.float64).index_add_(0, row_of, lp.cpu())


def _sampler(model, cfg: SamplingConfig, eos_ids, pad_id, device, synced: bool):
    """HF generate / the decode loop, or the pipelined sampler for a model split into stages."""
    if staged(model) is not None:
        from gkd.rollout.pipelined import PipelineSampler

        return PipelineSampler(cfg, eos_ids, pad_id, device)
    return HFSampler(cfg, eos_ids, pad_id, device, synced=synced)


def greedy(model, prompts, eos_ids, pad_id, max_new_tokens, device, batch_size=16, inputs=None, synced=False):
    sampler = _sampler(model, SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size),
                       eos_ids, pad_id, device, synced)
    return sampler.generate(model, prompts, None, inputs)


def sampled(model, prompts, seeds: int, eos_ids, pad_id, max_new_tokens, temperature, device, batch_size=16,
            inputs=None, synced=False) -> list[list[list[int]]]:
    """``seeds`` samples per prompt at ``temperature``: sample s of prompt i is drawn with seed s for row i
    (gkd.rollout.row_seed), so it depends on nothing else. Returns [prompt][seed] -> completion ids."""
    sampler = _sampler(model, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, do_sample=True,
                                             batch_size=batch_size), eos_ids, pad_id, device, synced)
    per_seed = [sampler.generate(model, prompts, None, inputs, seed=s) for s in range(seeds)]
    return [[per_seed[s][i] for s in range(seeds)] for i in range(len(prompts))]


SUMS = ("divergence", "sft", "agree", "tokens", "teacher_lp", "student_tokens", "prompts", "sample_lp", "sample_tokens",
        *(f"{who}_{count}" for who in ("student", "teacher")
          for count in ("repeated_4grams", "4grams", "distinct_2grams", "2grams")))


def content(completion: list[int], eos_ids) -> list[int]:
    """The completion's tokens before its first EOS (greedy's completions carry no padding: it only ever
    follows an EOS, which cut_at_eos keeps as their last token)."""
    return completion[:next((j for j, t in enumerate(completion) if t in eos_ids), len(completion))]


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetition_counts(tokens: list[int]) -> tuple[int, int, int, int]:
    """(4-grams that already occurred earlier in ``tokens``, 4-grams, distinct bigrams, bigrams): counts, so
    that they sum over prompts and ranks. Fewer than n tokens have no n-grams."""
    fours, twos = _ngrams(tokens, 4), _ngrams(tokens, 2)
    repeated = len(fours) - len(set(fours))  # every occurrence of a 4-gram but its first
    return repeated, len(fours), len(set(twos)), len(twos)


def _repetition_sums(completions: list[list[int]], eos_ids, counted: list[bool]) -> torch.Tensor:
    """[prompts, 4] repetition_counts of each completion's content; padding rows (not counted) count 0."""
    return torch.tensor([repetition_counts(content(c, eos_ids)) if real else (0, 0, 0, 0)
                         for c, real in zip(completions, counted)], dtype=torch.float64).reshape(-1, 4)


@dataclass
class Evaluation:
    metrics: dict  # over all prompts (all ranks' when sharded)
    teacher_completions: list[list[int]]  # greedy, per prompt
    student_completions: list[list[int]]  # greedy, per prompt
    samples: list[list[list[int]]]  # the student's seeded samples, [prompt][seed]
    rows: list[dict]  # per prompt (this rank's): its sums and means, as in metrics


@torch.no_grad()
def evaluate(student, teacher, prompts: list[list[int]], *, eos_ids, pad_id, beta: float, temperature: float,
             max_new_tokens: int, device, batch_size: int = 16, teacher_completions=None, inputs=None,
             teacher_inputs=None, counted: list[bool] | None = None, reduce=None, samples: int = 0,
             tp_group=None) -> Evaluation:
    """divergence and top-1 agreement on the teacher's greedy completions, the student's perplexity
    on them, and the teacher's mean log-prob of the student's own greedy completions; with ``samples``,
    also of that many seeded samples per prompt at ``temperature``. ``inputs`` / ``teacher_inputs``: each
    prompt's other model inputs (images), for the student / the teacher.

    Repetition of the student's greedy completions (and the teacher's, for reference), on their tokens
    before EOS: ``repeated_4gram_share`` = 4-grams that already occurred earlier in the same completion /
    all 4-grams; ``distinct_2`` = per completion its distinct bigrams, summed over completions / all
    bigrams (per completion, not corpus-wide: a set union over ranks is no sum). Both are ratios of counts
    summed over prompts (and ranks), so sharding leaves them exact.

    Sharded over data-parallel ranks: each rank passes its prompts (padded to the same count; ``counted``
    says which are real) and ``reduce``, which sums a float64 tensor over the ranks; every rank then joins
    every forward, as sharded weights need. Under tensor parallelism the heads' vocabulary is split over
    ``tp_group``, whose ranks hold the same prompts; context-parallel peers do too, and evaluate them whole. Models
    split into pipeline stages sample through them and give their hidden states on the last stage, which alone
    counts (``reduce`` then also sums over the pipeline's ranks)."""
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
        drawn = sampled(student, prompts, samples, eos_ids, pad_id, max_new_tokens, temperature, device, batch_size,
                        inputs, synced=sharded) if samples else [[] for _ in prompts]
    per_row = torch.zeros(len(prompts), len(SUMS), dtype=torch.float64)
    per_row[:, 6] = torch.tensor(counted, dtype=torch.float64)
    for i in range(0, len(prompts), batch_size):
        rows = slice(i, i + batch_size)
        real = torch.tensor(counted[rows])
        batch = collate(prompts[rows], teacher_completions[rows], pad_id, inputs[rows], theirs[rows])
        batch.loss_mask[~real] = False
        batch = batch.to(device)
        if batch.tokens or sharded:
            s_hidden, t_hidden = _hidden(student, batch), _hidden(teacher, batch, teacher=True)
            for r in range(batch.loss_mask.shape[0] if s_hidden is not None else 0):  # (the last stage's)  # one row's tokens at a time: per-prompt sums
                mask = torch.zeros_like(batch.loss_mask)
                mask[r] = batch.loss_mask[r]
                out = fused_linear_gkd_loss(
                    s_hidden, _head(student), teacher_hidden=t_hidden, teacher_lm_head_weight=_head(teacher),
                    labels=batch.labels, beta=beta, temperature=temperature, mask=mask, reduction="sum",
                    tp_group=tp_group)
                per_row[i + r, :4] = torch.tensor([float(out.divergence_sum), float(out.sft_sum),
                                                   float(out.agree_count), out.tokens], dtype=torch.float64)
        for col, completions in ((4, student_completions[rows]), (7, None)):
            group = [[c] for c in completions] if completions is not None else drawn[rows]
            for s in range(max((len(g) for g in group), default=0)):
                sbatch = collate(prompts[rows], [g[s] for g in group], pad_id, inputs[rows], theirs[rows])
                sbatch.loss_mask[~real] = False
                sbatch = sbatch.to(device)
                if sbatch.tokens or sharded:
                    per_row[rows, col] += _token_logprobs(teacher, sbatch, teacher=True, tp_group=tp_group)
                    per_row[rows, col + 1] += sbatch.loss_mask.sum(1).cpu().double()
    for who, completions in (("student", student_completions), ("teacher", teacher_completions)):
        first = SUMS.index(f"{who}_repeated_4grams")
        per_row[:, first:first + 4] = _repetition_sums(completions, eos_ids, counted)
    if staged(student) is not None and not pipeline.holds_last_stage(student):
        per_row.zero_()  # the last stage's sums alone: ``reduce`` sums over the pipeline's ranks too
    sums = per_row.sum(0)
    if sharded:
        sums = reduce(sums)
    metrics = _means(sums)
    if not samples:
        del metrics["teacher_logprob_of_samples"], metrics["sample_completion_length"]
    rows = [{k: v for k, v in _means(r).items() if samples or "sample" not in k} for r in per_row]
    return Evaluation(metrics, teacher_completions, student_completions, drawn, rows)


def _means(sums: torch.Tensor) -> dict:
    s = dict(zip(SUMS, sums.tolist()))
    tokens, n = max(s["tokens"], 1), max(s["prompts"], 1)
    return {
        "divergence": s["divergence"] / tokens,
        "top1_agreement": s["agree"] / tokens,
        "student_ppl_on_teacher": math.exp(s["sft"] / tokens),
        "teacher_logprob_of_student": s["teacher_lp"] / max(s["student_tokens"], 1),
        "teacher_tokens": int(s["tokens"]),
        "student_completion_length": s["student_tokens"] / n,
        **{f"{who}_{name}": s[f"{who}_{part}"] / max(s[f"{who}_{whole}"], 1)
           for who in ("student", "teacher") for name, part, whole in (
               ("repeated_4gram_share", "repeated_4grams", "4grams"), ("distinct_2", "distinct_2grams", "2grams"))},
        "prompts": int(s["prompts"]),
        "teacher_logprob_of_samples": s["sample_lp"] / max(s["sample_tokens"], 1),
        "sample_completion_length": s["sample_tokens"] / n,
    }


def format_table(columns: dict[str, dict]) -> str:
    keys = list(next(iter(columns.values())).keys())
    width = max(len(k) for k in keys)
    lines = [" " * width + "".join(f"{name:>14}" for name in columns)]
    for k in keys:
        lines.append(f"{k:<{width}}" + "".join(f"{_fmt(col[k]):>14}" for col in columns.values()))
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)
