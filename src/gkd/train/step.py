"""One optimizer step's forward and backward over its micro-batches: the one place where a parallelism
that changes how a forward runs (pipeline stages, a context split) would branch.

Mixture-of-experts students add the router load-balancing loss here (Switch Transformer's, in
transformers' form: E * sum_e f_e * P_e with f_e the share of top-k assignments to expert e and P_e its
mean router probability, both over all MoE layers). A mean over a micro-batch would make the gradient
depend on how the step is split into micro-batches and ranks (f and P are means; their product is not a
sum over tokens). So each *sequence* gets its own value over its own tokens (attention-mask tokens:
prompt and completion, as the router sees them), and the step's loss is their token-weighted mean:
sum_r n_r * aux_r / (routed tokens of the whole optimizer step, over every rank), the way the divergence
is normalised. A sequence sits wholly in one micro-batch, so any split gives the same gradient; a
one-sequence batch gives transformers' own ``aux_loss``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import torch

from gkd import parallel
from gkd.data.batch import Batch
from gkd.losses import GKDLossOutput, fused_linear_gkd_loss
from gkd.models.adapter import text_config, unwrap
from gkd.models.dropout import identities, token_identities
from gkd.models.packed import packed_attention
from gkd.models.routing import aux_sum, recording, router_stats, row_sums
from gkd.teacher.multi import RoutedTeacher
from gkd.train.malloc import release_free_heap


@dataclass
class LossArgs:
    beta: object  # the generalized JSD's beta (a float), or a gkd.losses.Skew
    temperature: float
    sft_alpha: float
    chunk_size: int | None
    tp_group: object = None
    router_aux_loss_coef: float = 0.0
    dropout_seed: int | None = None  # LoRA dropout by token (gkd.models.dropout) with this seed; None: no dropout


@dataclass
class MicroBatch:
    batch: Batch
    sampled: list[bool]  # per sequence: the student wrote the completion (no cross-entropy on it)
    teachers: list[str] | None = None  # per sequence: the teacher its row is routed to (gkd.teacher.multi)
    first_row: int = 0  # its first sequence's row in the step's global batch, and the step (LoRA dropout's masks)
    step: int = 0


STATS = ("loss", "divergence", "sft", "agree", "sft_tokens", "router_aux", "aligned", "alignable")
TEACHER_STATS = ("divergence", "agree", "tokens")  # per routed teacher, after STATS


def forward_backward(micro_batches: list[MicroBatch], student, adapter, teacher, args: LossArgs, normaliser: float,
                     skip_empty: bool, dims=None, reduce_scatter_each: bool = True, routed: float = 0.0) -> torch.Tensor:
    """Accumulates the gradients of sum(token losses) / ``normaliser`` (+ the router aux loss over
    ``routed``, the step's attention-mask tokens, for MoE students) over the micro-batches; returns this
    rank's sums of STATS (float64), followed by the tokens each expert got per MoE layer ([layers * E];
    nothing for dense students). ``skip_empty``: a micro-batch with no completion token is skipped (only
    where no other rank waits for this one's collectives). ``dims`` (gkd.parallel.Parallel): with context
    parallelism each sequence is split over the cp ranks and this rank scores its tokens. Under FSDP only
    the last micro-batch syncs gradients over the replicas (and, unless ``reduce_scatter_each``, over the
    shards). A routed teacher (gkd.teacher.multi.RoutedTeacher) adds TEACHER_STATS per teacher after STATS:
    each teacher's group of rows gets its own fused loss on the same student hidden states and the same
    ``normaliser``, so their sum is the loss of the whole micro-batch."""
    routers = adapter.routers(student)
    names = teacher.names if isinstance(teacher, RoutedTeacher) else None
    if dims is not None and dims.pp > 1:
        from gkd.parallel import pipeline

        batches = pipeline.padded([mb.batch for mb in micro_batches])
        splits = None
        if dims.cp > 1:  # each stage runs this rank's tokens of every micro-batch
            from gkd.parallel.context import ContextSplit

            splits = [ContextSplit(b, dims.cp_group, dims.cp_rank, dims.cp) for b in batches]
        last = pipeline.holds_last_stage(student)
        scored = (teacher.score_pipelined(batches, last, splits) if names is None
                  else teacher.groups_pipelined(batches, [mb.teachers for mb in micro_batches], last, splits))
        return pipeline.forward_backward(
            micro_batches, batches, scored, student, len(STATS) + len(TEACHER_STATS) * len(names or ()),
            dims.pipeline, lambda hidden, head, mb, batch, out, routing, split: micro_loss(
                hidden, parallel.local_head(head), mb, batch, out, args, normaliser,
                None if routing is None else _carried_router_loss(routing, batch, split) / routed, names, split),
            splits, [functools.partial(_dropout_identities, batch, mb, split, args)
                     for batch, mb, split in zip(batches, micro_batches, splits or [None] * len(batches))])
    stats = torch.zeros(len(STATS) + len(TEACHER_STATS) * len(names or ()), dtype=torch.float64)
    load = None
    for i, mb in enumerate(micro_batches):
        batch = mb.batch
        if skip_empty and batch.tokens == 0 and not routers:  # (a MoE batch still has router tokens)
            continue
        ce_labels = _ce_labels(mb, batch)
        split = None
        if dims is not None and dims.cp > 1:
            from gkd.parallel.context import ContextSplit

            split = ContextSplit(batch, dims.cp_group, dims.cp_rank, dims.cp)
        # also for recomputation in backward (gradient checkpointing): the split, or packed rows' attention, and
        # the tokens' identities for LoRA dropout
        with split.active() if split else packed_attention(text_config(unwrap(student).config), batch.model_inputs()), \
                _dropout_identities(batch, mb, split, args):
            scored = None
            if names is None:
                scored = teacher.score(batch, split)
            else:
                groups = teacher.score_groups(batch, mb.teachers, everyone=not skip_empty, split=split)
            with recording(routers) as seen:
                hidden = adapter.final_hidden(student, split.model_inputs() if split else batch.model_inputs())
            head = parallel.local_head(adapter.logit_head(student))  # read after the forward that gathered it
            mask = split.local(batch.loss_mask, False) if split else batch.loss_mask
            labels = split.local(ce_labels, -100) if split else ce_labels
            release_free_heap()  # the forwards' freed activations, before the loss's buffers (gkd.train.malloc)
            if names is None:
                out = _fused(hidden, head, scored, labels, mask, args, normaliser)
            else:
                out, per_teacher = _routed(hidden, head, groups, names, labels, args, normaliser)
                stats[len(STATS):] += per_teacher
            loss, aux = out.loss, torch.zeros(())
            if seen:
                aux, counts = _router_loss(seen, batch, split)
                load = counts if load is None else load + counts
                loss, aux = _with_router_loss(loss, aux / routed, args)
            parallel.sync_gradients(student, last=i == len(micro_batches) - 1, reduce_scatter_each=reduce_scatter_each)
            release_free_heap()  # and the loss's, before the gradients
            loss.backward()
        stats[:len(STATS)] += _row(loss, out, labels, mask, float(aux.detach()),
                                   None if scored is None else scored.aligned)
    if routers:  # every rank reports a row per layer, even one that skipped its micro-batches
        E = adapter.num_experts(student)
        load = torch.zeros(len(routers), E, dtype=torch.float64) if load is None else load
        return torch.cat([stats, load.flatten()])
    return stats


def _dropout_identities(batch: Batch, mb: MicroBatch, split, args: LossArgs):
    """LoRA dropout's token identities for this micro-batch's forward and backward (``batch``: its rows, possibly
    padded; this rank's tokens of each sequence under a context split); nothing without LoRA dropout."""
    if args.dropout_seed is None:
        return contextlib.nullcontext()
    ids = token_identities(batch, mb.first_row)
    return identities(split.local(ids) if split else ids, mb.step, args.dropout_seed)


def _router_loss(seen, batch: Batch, split) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the batch's sequences of n_r * aux_r, with grad; tokens routed to each expert per layer). Under
    context parallelism a sequence's tokens are on every rank of the group: each rank's sums over its own
    tokens are summed over the group (their gradients too), so every rank forms the whole sequences' loss, and
    takes 1/C of it (the ranks' losses add up to it once)."""
    index = batch.sequence_index()
    if split is None:
        return router_stats(seen, index)
    sums, counts = row_sums(seen, split.local(index, -1), count=len(batch.sequences()))
    return _carried_router_loss(sums, batch, split), counts


def _carried_router_loss(sums: torch.Tensor, batch: Batch, split) -> torch.Tensor:
    """The sum over the batch's sequences of n_r * aux_r from the routing sums a pipeline carried to its last
    stage; under a context split they are this rank's tokens' and are summed over the group as in
    ``_router_loss``."""
    if split is not None:
        sums = torch.cat([split.summed(sums[:, :-1]), sums[:, -1:]], dim=1)  # (the layer count is every rank's)
        return aux_sum(sums, batch.sequence_index()) / split.size
    return aux_sum(sums, batch.sequence_index())


def micro_loss(hidden, head, mb: MicroBatch, batch: Batch, scored, args: LossArgs, normaliser: float, aux=None,
               names: list[str] | None = None, split=None):
    """The fused loss of one micro-batch (``batch``: its rows, possibly padded) from the student's final
    hidden states and logit head (gkd.losses.LogitHead) and the teacher's output (with ``names``, a routed
    teacher's: its groups), plus a MoE student's router loss ``aux`` (its rows' share of the step's, before the
    coefficient); (loss, its STATS row, followed by TEACHER_STATS per teacher when routed). ``split``: the
    hidden states and the teacher's output are this rank's tokens of the batch."""
    labels = _ce_labels(mb, batch)
    mask = batch.loss_mask
    if split is not None:
        labels, mask = split.local(labels, -100), split.local(mask, False)
    if names is None:
        out = _fused(hidden, head, scored, labels, mask, args, normaliser)
    else:
        out, per_teacher = _routed(hidden, head, scored, names, labels, args, normaliser)
    loss, aux = _with_router_loss(out.loss, aux, args) if aux is not None else (out.loss, torch.zeros(()))
    row = _row(loss, out, labels, mask, float(aux.detach()), None if names else scored.aligned)
    return loss, row if names is None else torch.cat([row, per_teacher])


def _with_router_loss(loss, aux, args: LossArgs):
    """(the loss with the router loss ``aux`` times its coefficient added, aux)."""
    return (loss + args.router_aux_loss_coef * aux if args.router_aux_loss_coef else loss), aux


def _ce_labels(mb: MicroBatch, batch: Batch) -> torch.Tensor:
    """The labels of the cross-entropy term: none on completions the student sampled."""
    labels = batch.labels.clone()
    for (b, start, end), sampled in zip(batch.sequences(), mb.sampled, strict=True):
        if sampled:
            labels[b, start:end] = -100
    return labels


def _fused(hidden, head, scored, labels, mask, args: LossArgs, normaliser: float):
    out = fused_linear_gkd_loss(
        hidden, head, **scored.loss_kwargs(), labels=labels, sft_alpha=args.sft_alpha, beta=args.beta,
        temperature=args.temperature, mask=mask, reduction="sum", normalizer=normaliser, chunk_size=args.chunk_size,
        tp_group=args.tp_group)
    if scored.spans is None:
        return out
    # a teacher with another tokenizer: its unaligned spans' term joins the divergence (same normaliser)
    from gkd.teacher.cross_tokenizer import span_divergence

    extra = span_divergence(hidden, head, scored.spans, mask)
    return dataclasses.replace(out, loss=out.loss + extra / normaliser,
                               divergence_sum=out.divergence_sum + extra.detach().to(out.divergence_sum))


def _routed(hidden, head, groups, names: list[str], labels, args: LossArgs, normaliser: float):
    """The fused loss of each teacher's group (its rows of the student's hidden states, its sequences'
    positions) summed: (a GKDLossOutput of the whole micro-batch, TEACHER_STATS per teacher in ``names``
    order)."""
    per_teacher = torch.zeros(len(names), len(TEACHER_STATS), dtype=torch.float64)
    parts = []
    for g in groups:
        h = hidden if g.rows is None else hidden.index_select(0, g.rows)
        y = labels if g.rows is None else labels.index_select(0, g.rows)
        part = _fused(h, head, g.output, y, g.mask, args, normaliser)
        per_teacher[names.index(g.name)] = torch.tensor(
            [float(part.divergence_sum), float(part.agree_count), part.tokens], dtype=torch.float64)
        parts.append(part)
    if not parts:  # no loss position in this micro-batch: a zero loss that still reaches the student's graph
        zero = hidden.sum() * 0.0
        return GKDLossOutput(zero, zero.detach(), zero.detach(), zero.detach(), 0), per_teacher.flatten()
    return GKDLossOutput(loss=sum(p.loss for p in parts), divergence_sum=sum(p.divergence_sum for p in parts),
                         sft_sum=sum(p.sft_sum for p in parts), agree_count=sum(p.agree_count for p in parts),
                         tokens=sum(p.tokens for p in parts)), per_teacher.flatten()


def _row(loss, out, labels, mask, aux: float = 0.0, aligned=None) -> torch.Tensor:
    """One micro-batch's STATS (``aligned``: the teacher output's mask, from a teacher with another tokenizer:
    the scored positions aligned, of those it scored; None: 0 of 0)."""
    return torch.tensor([float(loss.detach()), float(out.divergence_sum), float(out.sft_sum), float(out.agree_count),
                         float((labels[mask] >= 0).sum()), aux,
                         *((0.0, 0.0) if aligned is None else (float((mask & aligned).sum()), float(mask.sum())))],
                        dtype=torch.float64)
