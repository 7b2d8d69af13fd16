"""One optimizer step's forward and backward over its micro-batches: the one place where a parallelism
that changes how a forward runs (pipeline stages, a context split) would branch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gkd import parallel
from gkd.data import Batch
from gkd.losses import fused_linear_gkd_loss


@dataclass
class LossArgs:
    beta: float
    temperature: float
    sft_alpha: float
    chunk_size: int | None
    tp_group: object = None


@dataclass
class MicroBatch:
    batch: Batch
    sampled: list[bool]  # per row: the student wrote the completion (no cross-entropy on it)


STATS = ("loss", "divergence", "sft", "agree", "sft_tokens")


def forward_backward(micro_batches: list[MicroBatch], student, adapter, teacher, args: LossArgs, normaliser: float,
                     skip_empty: bool, par=None) -> torch.Tensor:
    """Accumulates the gradients of sum(token losses) / ``normaliser`` over the micro-batches; returns this
    rank's sums of STATS (float64). ``skip_empty``: a micro-batch with no completion token is skipped
    (only where no other rank waits for this one's collectives)."""
    if par is not None and par.pp > 1:
        from gkd.parallel.pipeline import forward_backward as pipelined

        return pipelined(micro_batches, student, teacher, args, normaliser, par.pipeline,
                         lambda hidden, weight, mb, batch, scored: micro_loss(hidden, parallel.local(weight), mb, batch,
                                                                             scored, args, normaliser))
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    for mb in micro_batches:
        batch = mb.batch
        if skip_empty and batch.tokens == 0:
            continue
        scored = teacher.score(batch)
        hidden = adapter.final_hidden(student, batch.model_inputs())
        weight = parallel.local(adapter.lm_head(student))  # read after the forward that gathered it
        loss, row = micro_loss(hidden, weight, mb, batch, scored, args, normaliser)
        loss.backward()
        stats += row
    return stats


def micro_loss(hidden, weight, mb: MicroBatch, batch: Batch, scored, args: LossArgs, normaliser: float):
    """The fused loss of one micro-batch (``batch``: its rows, possibly padded) from the student's final
    hidden states and lm_head weight and the teacher's output; (loss, its STATS row)."""
    ce_labels = batch.labels.clone()
    ce_labels[torch.tensor(mb.sampled, device=ce_labels.device)] = -100
    out = fused_linear_gkd_loss(
        hidden, weight, **scored.loss_kwargs(), labels=ce_labels, sft_alpha=args.sft_alpha, beta=args.beta,
        temperature=args.temperature, mask=batch.loss_mask, reduction="sum", normalizer=normaliser,
        chunk_size=args.chunk_size, tp_group=args.tp_group)
    row = torch.tensor([float(out.loss.detach()), float(out.divergence_sum), float(out.sft_sum),
                        float(out.agree_count), float((ce_labels[batch.loss_mask] >= 0).sum())], dtype=torch.float64)
    return out.loss, row
