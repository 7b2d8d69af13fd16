"""One optimizer step's forward and backward over its micro-batches: the one place where a parallelism
that changes how a forward runs (pipeline stages, a context split) would branch."""

from __future__ import annotations

import contextlib

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
                     skip_empty: bool, dims=None, reduce_scatter_each: bool = True) -> torch.Tensor:
    """Accumulates the gradients of sum(token losses) / ``normaliser`` over the micro-batches; returns this
    rank's sums of STATS (float64). ``skip_empty``: a micro-batch with no completion token is skipped
    (only where no other rank waits for this one's collectives). ``dims`` (gkd.parallel.Parallel): with
    context parallelism each sequence is split over the cp ranks and this rank scores its tokens. Under
    FSDP only the last micro-batch syncs gradients over the replicas (and, unless ``reduce_scatter_each``,
    over the shards)."""
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        batch = mb.batch
        if skip_empty and batch.tokens == 0:
            continue
        ce_labels = batch.labels.clone()
        ce_labels[torch.tensor(mb.sampled, device=ce_labels.device)] = -100
        split = None
        if dims is not None and dims.cp > 1:
            from gkd.parallel.context import ContextSplit

            split = ContextSplit(batch, dims.cp_group, dims.cp_rank, dims.cp)
        with split.active() if split else contextlib.nullcontext():  # also for recomputation in backward
            scored = teacher.score(batch, split)
            hidden = adapter.final_hidden(student, split.model_inputs() if split else batch.model_inputs())
            weight = parallel.local(adapter.lm_head(student))  # read after the forward that gathered it
            mask = split.local(batch.loss_mask, False) if split else batch.loss_mask
            labels = split.local(ce_labels, -100) if split else ce_labels
            out = fused_linear_gkd_loss(
                hidden, weight, **scored.loss_kwargs(), labels=labels, sft_alpha=args.sft_alpha, beta=args.beta,
                temperature=args.temperature, mask=mask, reduction="sum", normalizer=normaliser,
                chunk_size=args.chunk_size, tp_group=args.tp_group)
            parallel.sync_gradients(student, last=i == len(micro_batches) - 1, reduce_scatter_each=reduce_scatter_each)
            out.loss.backward()
        stats += torch.tensor([float(out.loss.detach()), float(out.divergence_sum), float(out.sft_sum),
                               float(out.agree_count), float((labels[mask] >= 0).sum())], dtype=torch.float64)
    return stats
