"""Generalized Jensen-Shannon divergence for knowledge distillation, and the SFT term.

For one position with student logits ``zs`` and teacher logits ``zt`` over the vocabulary::

    s = log_softmax(zs / T)      t = log_softmax(zt / T)
    beta == 0 : KL(t || s)                       (forward KL)
    beta == 1 : KL(s || t)                       (reverse KL)
    otherwise : m = log((1 - beta) e^s + beta e^t)
                beta * KL(t || m) + (1 - beta) * KL(s || m)

``beta`` may instead be a :class:`Skew`, DistiLLM's skew divergences (Ko et al. 2024) at ``alpha``:
``Skew("kl", a)`` is KL(t || a e^t + (1 - a) e^s), ``Skew("reverse_kl", a)`` KL(s || a e^s + (1 - a) e^t).

Every function here:

- does its math in float32 whatever the input dtype (float64 inputs stay float64) and returns that;
- takes ``mask`` (bool over the leading dims, True = counted); masked positions give neither value
  nor gradient, even when their logits are NaN;
- reduces with ``reduction`` = ``"mean"`` (over counted positions; 0 when none), ``"sum"`` or
  ``"none"`` (per position, 0 where masked);
- takes ``tp_group``: when the vocabulary dimension is sharded contiguously over a tensor-parallel
  process group (rank r holds ids ``[r * V_local, (r + 1) * V_local)``), the result and the gradient of
  every shard are those of the full vocabulary. Softmax normalisers and sums over the vocabulary are
  all-reduced inside custom autograd functions whose backward passes are analytic, so no shard loses
  its share of the normaliser's gradient.

Gradients are closed-form (see ``_divergence``), which is what lets the fused variant compute the
loss and both gradients in one pass over the lm_head, chunk by chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from gkd.errors import GKDError
from gkd.machine import onednn_faster, onednn_linear, onednn_takes, transposed_rows

__all__ = [
    "GKDLossOutput",
    "LogitHead",
    "Skew",
    "fused_linear_generalized_jsd",
    "fused_linear_gkd_loss",
    "generalized_jsd",
    "sft_cross_entropy",
    "topk_generalized_jsd",
    "mixture_logprobs",
    "mixture_topk",
    "topk_logprobs",
]

_REDUCTIONS = ("mean", "sum", "none")
# Servers report log-probs of impossible tokens as -inf or -9999; keep them finite so 0 * (-inf)
# never appears, while e^x is still exactly 0.
_MIN_LOGPROB = -1e4


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skew:
    """A skew divergence in place of the generalized JSD's ``beta``: ``kind`` "kl" is the skew KL
    KL(t || alpha e^t + (1 - alpha) e^s), "reverse_kl" the skew reverse KL KL(s || alpha e^s + (1 - alpha) e^t),
    with ``alpha`` in (0, 1) (DistiLLM's default 0.1). Both are one of the generalized JSD's two terms, with
    the mixture's weight ``mix`` on the teacher: ``_divergence`` computes them on the same pass."""

    kind: str
    alpha: float

    KINDS = ("kl", "reverse_kl")

    def __post_init__(self):
        if self.kind not in self.KINDS or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha < 1.0:
            raise GKDError(f"Skew needs a kind in {self.KINDS} and alpha in (0, 1), got {self.kind!r}, {self.alpha!r}")

    @property
    def mix(self) -> float:
        """The mixture's weight on the teacher, m = (1 - mix) e^s + mix e^t."""
        return self.alpha if self.kind == "kl" else 1.0 - self.alpha

    @property
    def weights(self) -> tuple[float, float]:
        """(weight of KL(t || m), weight of KL(s || m))."""
        return (1.0, 0.0) if self.kind == "kl" else (0.0, 1.0)


def _as_beta(beta):
    """A float beta, or the Skew as it is."""
    return beta if isinstance(beta, Skew) else float(beta)


def _check_common(beta, temperature: float, reduction: str) -> None:
    if not isinstance(beta, Skew) and (not isinstance(beta, (int, float)) or not 0.0 <= float(beta) <= 1.0):
        raise GKDError(f"beta must be a number in [0, 1] (or a losses.Skew), got {beta!r}")
    if not isinstance(temperature, (int, float)) or not float(temperature) > 0.0 or math.isinf(temperature):
        raise GKDError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise GKDError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise GKDError(f"{name} must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() < 1:
        raise GKDError(f"{name} must have a vocabulary (last) dimension, got a scalar")


def _check_mask(mask: Tensor | None, lead: torch.Size) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise GKDError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != lead:
        raise GKDError(f"mask shape {tuple(mask.shape)} must equal the leading dims {tuple(lead)}")


def _check_topk(ids: Tensor, logprobs: Tensor, lead: torch.Size, vocab: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise GKDError(f"teacher_topk_ids must be an int32/int64 tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    _check_float("teacher_topk_logprobs", logprobs)
    if ids.shape != logprobs.shape:
        raise GKDError(
            f"teacher_topk_ids shape {tuple(ids.shape)} must equal teacher_topk_logprobs shape {tuple(logprobs.shape)}"
        )
    if ids.shape[:-1] != lead:
        raise GKDError(f"teacher_topk_ids leading dims {tuple(ids.shape[:-1])} must equal the student's {tuple(lead)}")
    k = ids.shape[-1]
    if k < 1 or k > vocab:
        raise GKDError(f"teacher top-k K={k} must be in [1, V={vocab}] (teacher_topk_ids last dim)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise GKDError(f"teacher_topk_ids must be token ids in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")


def _group(tp_group) -> dist.ProcessGroup | None:
    """The tensor-parallel group, or None when there is nothing to reduce over."""
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return None
    return tp_group if dist.get_world_size(tp_group) > 1 else None


def _shard_info(local_vocab: int, group) -> tuple[int, int]:
    """(first global id of this rank's shard, global vocabulary size)."""
    if group is None:
        return 0, local_vocab
    world = dist.get_world_size(group)
    return dist.get_rank(group) * local_vocab, world * local_vocab


# --------------------------------------------------------------------------------------------------
# Reductions over a (possibly sharded) vocabulary dimension
# --------------------------------------------------------------------------------------------------


def _math(x: Tensor) -> Tensor:
    """x in the dtype the math runs in: at least float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _allreduce(x: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x


def _logsumexp(xs: list[Tensor], group) -> list[Tensor]:
    """Row-wise logsumexp of several [M, V_local] tensors, with one collective per stage."""
    maxes = torch.stack([x.amax(-1) for x in xs])
    _allreduce(maxes, group, dist.ReduceOp.MAX)
    maxes = torch.where(torch.isfinite(maxes), maxes, torch.zeros_like(maxes))
    sums = torch.stack([(x - m[:, None]).exp_().sum(-1) for x, m in zip(xs, maxes)])  # (one temporary, not two)
    _allreduce(sums, group)
    return list(sums.log_() + maxes)


def _shifted_softmax_(xs: list[Tensor], group) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Row-wise softmax of several [M, V_local] tensors, in place.

    Returns, for each x, ``(x - max, log of the sum of exps as float64 [M], probabilities)``: the
    log-probs are ``x - max - log_sum``, but they are never formed, because rounding them at the
    magnitude of the normaliser would shift a whole row by up to half an ulp of ~log V.
    """
    maxes = torch.stack([x.amax(-1) for x in xs])
    _allreduce(maxes, group, dist.ReduceOp.MAX)
    maxes = torch.where(torch.isfinite(maxes), maxes, torch.zeros_like(maxes))
    exps = [torch.exp(x.sub_(m[:, None])) for x, m in zip(xs, maxes)]
    sums = torch.stack([e.sum(-1) for e in exps])
    _allreduce(sums, group)
    log_sums = sums.double().log()
    return [(x, ls, e.div_(sm[:, None])) for x, e, ls, sm in zip(xs, exps, log_sums, sums)]


def _gather_vocab(z: Tensor, ids: Tensor, group) -> Tensor:
    """z[..., ids] for global ids when z holds this rank's vocabulary shard (no autograd)."""
    start, _ = _shard_info(z.shape[-1], group)
    local = ids - start
    owned = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1)) * owned
    return _allreduce(picked, group), owned, local.clamp(0, z.shape[-1] - 1)


def _argmax_vocab(z: Tensor, group) -> Tensor:
    """Global argmax over a sharded last dim (ties go to the lowest id)."""
    val, idx = z.max(-1)
    if group is None:
        return idx
    start, _ = _shard_info(z.shape[-1], group)
    world = dist.get_world_size(group)
    vals = [torch.empty_like(val) for _ in range(world)]
    idxs = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(vals, val.contiguous(), group=group)
    dist.all_gather(idxs, (idx + start).contiguous(), group=group)
    best = torch.stack(vals).argmax(0)  # first max = lowest shard
    return torch.stack(idxs).gather(0, best[None]).squeeze(0)


def logprobs_at(logits: Tensor, ids: Tensor, *, tp_group=None) -> Tensor:
    """The log-softmax (temperature 1) of ``[N, V]`` logits read at global token ids ``[N, M]``; under tensor
    parallelism the logits are this rank's vocabulary shard and every rank gets the whole result (no autograd)."""
    group = _group(tp_group)
    logits = _math(logits)
    if group is None:
        return torch.log_softmax(logits, -1).gather(-1, ids)
    (lse,) = _logsumexp([logits], group)
    picked, _, _ = _gather_vocab(logits, ids, group)
    return picked - lse[:, None]


def topk_logprobs(logits: Tensor, k: int, *, tp_group=None) -> tuple[Tensor, Tensor]:
    """The top-k token ids and their log-probs (temperature 1) of ``[..., V]`` logits.

    With ``tp_group`` the logits are a vocabulary shard and the result is the global top-k across
    shards (ids are global), identical on every rank. Returns ``(ids int64, logprobs float32)``
    sorted by descending log-prob.
    """
    _check_float("logits", logits)
    group = _group(tp_group)
    start, vocab = _shard_info(logits.shape[-1], group)
    if not 1 <= k <= vocab:
        raise GKDError(f"k={k} must be in [1, V={vocab}]")
    lead = logits.shape[:-1]
    z = _math(logits.detach().reshape(-1, logits.shape[-1]))
    (lse,) = _logsumexp([z], group)
    val, idx = z.topk(min(k, z.shape[-1]), dim=-1)
    idx = idx + start
    if group is not None:
        world = dist.get_world_size(group)
        vals = [torch.empty_like(val) for _ in range(world)]
        idxs = [torch.empty_like(idx) for _ in range(world)]
        dist.all_gather(vals, val.contiguous(), group=group)
        dist.all_gather(idxs, idx.contiguous(), group=group)
        val, pos = torch.cat(vals, -1).topk(k, dim=-1)
        idx = torch.cat(idxs, -1).gather(-1, pos)
    lp = val - lse[:, None]
    return idx.reshape(*lead, k), lp.reshape(*lead, k)


# --------------------------------------------------------------------------------------------------
# The divergence and its closed-form gradients
# --------------------------------------------------------------------------------------------------


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product of two [M, V] tensors: a product and a sum where their temporary fits BLOCK_BYTES
    (batched products of a few rows are 15x as slow), else batched products (no [M, V] temporary)."""
    if x.numel() * x.element_size() <= BLOCK_BYTES:
        return torch.linalg.vecdot(x, y)
    return (x.unsqueeze(1) @ y.unsqueeze(2)).reshape(x.shape[0])


def _divergence(a: Tensor, b: Tensor, beta: float, group, grads: str = ""):
    """Per-row divergence of student logits ``a`` and teacher logits ``b``, both already divided by T.

    ``a`` and ``b`` are float32 (or float64) [M, V_local] and are overwritten. ``grads`` says which
    gradients to return: ``""`` none, ``"s"`` the student's, ``"st"`` both. Returns ``(L [M], ga, gb)``
    with ``ga = dL/da`` and ``gb = dL/db`` (None where not asked). Peak extra memory: two [M, V_local].

    Everything is written in d = t - s, computed from the max-shifted logits and the difference of the
    two normalisers in float64, so rounding error scales with |t - s| rather than with |log V|.
    With p = e^s, q = e^t and the mixture m = log((1 - beta) p + beta q):
        beta = 0 :  L = sum q d               dL/da = p - q                 dL/db = q (d - L)
        beta = 1 :  L = -sum p d              dL/da = -p (d + L)            dL/db = q - p
        otherwise:  s - m = -log((1 - beta) + beta e^d),  t - m = -log(beta + (1 - beta) e^-d)
                    L = beta KL(t||m) + (1 - beta) KL(s||m)
                    dL/da = (1 - beta) p ((s - m) - KL(s||m))   dL/db = beta q ((t - m) - KL(t||m))
    """
    skew = beta if isinstance(beta, Skew) else None
    if skew is not None:
        beta = skew.mix
    (x, ls_a, p), (y, ls_b, q) = _shifted_softmax_([a, b], group)
    d = y.sub_(x).add_((ls_a - ls_b).to(x.dtype)[:, None])
    ga = gb = None
    if skew is not None:
        return _skew(x, d, p, q, beta, skew.weights, group, grads)
    if beta == 0.0:
        loss = _allreduce(_rowdot(q, d), group)
        if "t" in grads:
            gb = d.sub_(loss[:, None]).mul_(q)
        if "s" in grads:
            ga = p.sub_(q)
        return loss, ga, gb
    if beta == 1.0:
        loss = _allreduce(_rowdot(p, d), group).neg_()
        if "s" in grads:
            ga = d.add_(loss[:, None]).mul_(p).neg_()
        if "t" in grads:
            gb = q.sub_(p)
        return loss, ga, gb
    ds, dt, kl_s, kl_t = _to_mixture(x, d, p, q, beta, group)
    loss = kl_t * beta + kl_s * (1.0 - beta)
    if "s" in grads:
        ga = ds.sub_(kl_s[:, None]).mul_(p).mul_(1.0 - beta)
    if "t" in grads:
        gb = dt.sub_(kl_t[:, None]).mul_(q).mul_(beta)
    return loss, ga, gb


def _to_mixture(x: Tensor, d: Tensor, p: Tensor, q: Tensor, beta: float, group):
    """(s - m, t - m, KL(s||m), KL(t||m)) for m = log((1 - beta) p + beta q), from d = t - s; ``x`` and ``d``
    become the first two. Each side from its own logaddexp: t - m = d + (s - m) would cancel catastrophically."""
    log_b, log_1mb = (torch.tensor(v, device=d.device, dtype=d.dtype) for v in (math.log(beta), math.log1p(-beta)))
    ds = torch.logaddexp(torch.add(d, log_b, out=x), log_1mb, out=x).neg_()
    dt = torch.logaddexp(d.neg_().add_(log_1mb), log_b, out=d).neg_()
    kls = torch.stack([_rowdot(p, ds), _rowdot(q, dt)])
    _allreduce(kls, group)
    return ds, dt, kls[0], kls[1]


def _skew(x: Tensor, d: Tensor, p: Tensor, q: Tensor, beta: float, weights: tuple[float, float], group, grads: str):
    """``_divergence`` for L = w_t KL(t||m) + w_s KL(s||m) with m = log((1 - beta) p + beta q) (``x``, ``d``: its
    buffers, overwritten). With r = e^(t - m), u = e^(s - m) (so (1 - beta) u + beta r = 1):
        dL/da = w_s p ((s - m) - KL(s||m)) + (w_s beta - w_t (1 - beta)) p (r - sum p r)
        dL/db = w_t q ((t - m) - KL(t||m)) + (w_t (1 - beta) - w_s beta) q (u - sum q u)
    (for w_t = beta, w_s = 1 - beta the second terms vanish: the generalized JSD's gradients)."""
    w_t, w_s = weights
    ds, dt, kl_s, kl_t = _to_mixture(x, d, p, q, beta, group)
    loss = kl_t * w_t + kl_s * w_s
    ga = gb = None
    if "t" in grads:  # first: it reads ds and dt, which the student's gradient then overwrites
        u = ds.exp()
        sum_qu = _allreduce(_rowdot(q, u), group)
        gb = u.sub_(sum_qu[:, None]).mul_(q).mul_(w_t * (1.0 - beta) - w_s * beta)
        if w_t:
            gb.add_((dt - kl_t[:, None]).mul_(q), alpha=w_t)
    if "s" in grads:
        r = dt.exp_()
        sum_pr = _allreduce(_rowdot(p, r), group)
        ga = r.sub_(sum_pr[:, None]).mul_(p).mul_(w_s * beta - w_t * (1.0 - beta))
        if w_s:
            ga.add_(ds.sub_(kl_s[:, None]).mul_(p), alpha=w_s)
    return loss, ga, gb


def _topk_terms(zk: Tensor, tk: Tensor, beta: float, temperature: float, want_grads: bool, pad: Tensor | None = None):
    """Divergence over K gathered entries: both sides divided by T and renormalised over K.
    ``pad`` [M, K] (True: an absent entry, as a mixture's union has) counts on neither side.
    Returns ``(L [M], dL/dzk or None)``; the gradient at a pad is exactly 0."""
    a = _math(zk) / temperature
    b = _math(tk).clamp_min(_MIN_LOGPROB) / temperature
    if pad is not None and bool(pad.any()):
        a, b = _absent(a, pad), _absent(b, pad)
    loss, ga, _ = _divergence(a, b, beta, None, "s" if want_grads else "")
    return loss, (ga.div_(temperature) if want_grads else None)


def _absent(x: Tensor, pad: Tensor) -> Tensor:
    """``x`` with its pad entries at (the row's largest other entry - 1e4): after the max shift their
    e^x is exactly 0 on both sides, and d = t - s there is the finite difference of the two normalisers,
    so neither the loss, e^d (beta in (0, 1)) nor the gradient meets an inf or a NaN. Every row keeps
    at least one entry that is not a pad."""
    top = x.masked_fill(pad, -math.inf).amax(-1, keepdim=True)
    return torch.where(pad, top + _MIN_LOGPROB, x)


def mixture_logprobs(logprobs: list[Tensor], weights: list[float]) -> Tensor:
    """log m = logsumexp_i(log w_i + lp_i) of tempered full-vocabulary log-probs ``lp_i [M, V_local]``
    (each a log-softmax over the whole, possibly sharded, vocabulary), ``weights`` summing to 1."""
    logw = torch.tensor(weights, dtype=logprobs[0].dtype, device=logprobs[0].device).log()
    return torch.logsumexp(torch.stack(logprobs) + logw[:, None, None], dim=0)


def mixture_topk(ids: list[Tensor], logprobs: list[Tensor], weights: list[float], temperature: float
                 ) -> tuple[Tensor, Tensor]:
    """The mixture of top-k teachers over the union of their ids: each teacher's tempered top-k
    (``logprobs / T``, renormalised over its own K, zero elsewhere) weighted by ``weights``; an id that
    several teachers give is one entry. Returns ``(ids [M, sum K], T * log m [M, sum K])``, each row's
    union first and its unused tail as pads (id -1, log-prob -inf); T * log m is what the top-k loss
    divides by T and renormalises to log m unchanged."""
    parts = []
    for lp, w in zip(logprobs, weights):
        t = _math(lp).clamp_min(_MIN_LOGPROB) / temperature
        parts.append(t - torch.logsumexp(t, -1, keepdim=True) + math.log(w) if w > 0 else torch.full_like(t, -math.inf))
    allids = torch.cat([i.long() for i in ids], -1)
    vals = torch.cat(parts, -1)
    sid, order = allids.sort(-1)
    svals = vals.gather(-1, order)
    first = torch.ones_like(sid, dtype=torch.bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]
    slot = first.long().cumsum(-1) - 1  # the union entry each (sorted) id belongs to
    top = torch.full_like(svals, -math.inf).scatter_reduce(-1, slot, svals, "amax")
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sums = torch.zeros_like(svals).scatter_add_(-1, slot, torch.exp(svals - shift.gather(-1, slot)))
    logm = sums.log() + shift  # -inf where a slot is unused or every weight on it is 0
    out_ids = torch.full_like(sid, -1).scatter_(-1, slot, sid)
    out_ids = torch.where(torch.isfinite(logm), out_ids, torch.full_like(out_ids, -1))
    return out_ids, logm * temperature


class _LogitsDivergence(torch.autograd.Function):
    """L per row of [M, V_local] student/teacher logits; backward recomputes in closed form."""

    @staticmethod
    def forward(ctx, zs: Tensor, zt: Tensor, beta: float, temperature: float, group):
        ctx.save_for_backward(zs, zt)
        ctx.args = (beta, temperature, group)
        a = _math(zs) / temperature
        b = _math(zt) / temperature
        loss, _, _ = _divergence(a, b, beta, group)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        zs, zt = ctx.saved_tensors
        beta, temperature, group = ctx.args
        a = _math(zs) / temperature
        b = _math(zt) / temperature
        which = ("s" if ctx.needs_input_grad[0] else "") + ("t" if ctx.needs_input_grad[1] else "")
        _, ga, gb = _divergence(a, b, beta, group, which)
        scale = (grad_loss.to(a.dtype) / temperature)[:, None]
        gs = ga.mul_(scale).to(zs.dtype) if ga is not None else None
        gt = gb.mul_(scale).to(zt.dtype) if gb is not None else None
        return gs, gt, None, None, None


class _ReduceFromShards(torch.autograd.Function):
    """All-reduce (sum) of per-shard partial values whose consumer is replicated on every rank.

    The gradient of the replicated consumer is the same on every rank, and each rank's partial value
    enters the sum with coefficient 1, so the backward is the identity.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group):
        return _allreduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _CrossEntropy(torch.autograd.Function):
    """Per-row CE = logsumexp(z) - z[label] over a (possibly sharded) vocabulary."""

    @staticmethod
    def forward(ctx, z: Tensor, labels: Tensor, group):
        zf = _math(z)
        (lse,) = _logsumexp([zf], group)
        picked, _, _ = _gather_vocab(zf, labels[:, None], group)
        ctx.save_for_backward(z, labels, lse)
        ctx.group = group
        return lse - picked[:, 0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, labels, lse = ctx.saved_tensors
        g = _cross_entropy_grad(_math(z), labels, lse, ctx.group).mul_(grad.to(lse.dtype)[:, None])
        return g.to(z.dtype), None, None


def _cross_entropy_grad(zf: Tensor, labels: Tensor, lse: Tensor, group) -> Tensor:
    """softmax(z) - onehot(label) on this rank's shard (overwrites nothing)."""
    start, _ = _shard_info(zf.shape[-1], group)
    g = (zf - lse[:, None]).exp_()  # (one temporary, not two)
    local = labels - start
    owned = (local >= 0) & (local < zf.shape[-1])
    rows = owned.nonzero().squeeze(-1)
    g[rows, local[rows]] -= 1.0
    return g


# --------------------------------------------------------------------------------------------------
# Public unfused functions
# --------------------------------------------------------------------------------------------------


def _select_rows(x: Tensor, rows: Tensor | None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _counted_rows(mask: Tensor | None, extra: Tensor | None = None) -> Tensor | None:
    keep = mask
    if extra is not None:
        keep = extra if keep is None else keep & extra
    return None if keep is None else keep.reshape(-1).nonzero().squeeze(-1)


def _reduce(per_row: Tensor, rows: Tensor | None, lead: torch.Size, reduction: str) -> Tensor:
    if reduction == "sum":
        return per_row.sum()
    if reduction == "mean":
        return per_row.sum() / max(per_row.shape[0], 1)
    if rows is not None:
        per_row = per_row.new_zeros(lead.numel()).index_copy(0, rows, per_row)
    return per_row.reshape(lead)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    tp_group=None,
) -> Tensor:
    """Generalized JSD between student and teacher ``[..., V]`` logits (see the module docstring).

    Gradients flow to both inputs (the teacher's is usually unused). With ``tp_group`` both logits
    are the same vocabulary shard on each rank.
    """
    _check_common(beta, temperature, reduction)
    _check_float("student_logits", student_logits)
    _check_float("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise GKDError(
            f"student_logits shape {tuple(student_logits.shape)} and teacher_logits shape "
            f"{tuple(teacher_logits.shape)} differ (vocab mismatch?)"
        )
    lead = student_logits.shape[:-1]
    _check_mask(mask, lead)
    rows = _counted_rows(mask)
    zs, zt = _select_rows(student_logits, rows), _select_rows(teacher_logits, rows)
    per_row = _LogitsDivergence.apply(zs, zt, _as_beta(beta), float(temperature), _group(tp_group))
    return _reduce(per_row, rows, lead, reduction)


def topk_generalized_jsd(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    tp_group=None,
) -> Tensor:
    """Generalized JSD when the teacher gives only K token ids and log-probs per position.

    The student's logits are gathered at the teacher's ids; both sides are divided by T and
    renormalised over the K entries. With K = V this equals :func:`generalized_jsd`. Under
    ``tp_group`` the ids are global and ``student_logits`` is this rank's vocabulary shard.
    """
    _check_common(beta, temperature, reduction)
    _check_float("student_logits", student_logits)
    group = _group(tp_group)
    lead = student_logits.shape[:-1]
    _check_topk(teacher_topk_ids, teacher_topk_logprobs, lead, _shard_info(student_logits.shape[-1], group)[1])
    _check_mask(mask, lead)
    rows = _counted_rows(mask)
    zs = _select_rows(student_logits, rows)
    ids = _select_rows(teacher_topk_ids, rows).long()
    tk = _select_rows(teacher_topk_logprobs, rows)
    start, _ = _shard_info(zs.shape[-1], group)
    local = ids - start
    owned = (local >= 0) & (local < zs.shape[-1])
    zk = zs.gather(-1, local.clamp(0, zs.shape[-1] - 1)) * owned
    if group is not None:
        zk = _ReduceFromShards.apply(zk, group)
    b = tk.clamp_min(_MIN_LOGPROB)
    per_row = _LogitsDivergence.apply(zk, b, _as_beta(beta), float(temperature), None)
    return _reduce(per_row, rows, lead, reduction)


def sft_cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    tp_group=None,
) -> Tensor:
    """Cross-entropy of ``[..., V]`` logits against ``labels`` aligned with them (temperature 1).

    Positions are counted where ``mask`` is True and the label is not ``ignore_index``. This is the
    ``sft_alpha`` term; the caller shifts labels so that logits at i are scored against token i+1.
    """
    _check_common(0.0, 1.0, reduction)
    _check_float("student_logits", student_logits)
    lead = student_logits.shape[:-1]
    if not isinstance(labels, Tensor) or labels.shape != lead or labels.is_floating_point():
        raise GKDError(f"labels must be an integer tensor of shape {tuple(lead)}, got {getattr(labels, 'shape', labels)}")
    _check_mask(mask, lead)
    group = _group(tp_group)
    vocab = _shard_info(student_logits.shape[-1], group)[1]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    if mask is not None:
        bad &= mask
    if bool(bad.any()):
        raise GKDError(f"labels must be in [0, {vocab}) or {ignore_index}, got {int(labels[bad][0])}")
    rows = _counted_rows(mask, valid)
    z = _select_rows(student_logits, rows)
    y = labels.reshape(-1) if rows is None else labels.reshape(-1).index_select(0, rows)
    per_row = _CrossEntropy.apply(z, y.long(), group)
    return _reduce(per_row, rows, lead, reduction)


# --------------------------------------------------------------------------------------------------
# Fused lm_head + loss, chunked over positions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitHead:
    """How a model turns final hidden states ``h [..., H]`` into logits, exactly::

        u = (scale * h) @ weight.T + bias      scale_hidden=True  (the scale multiplies h, before the product)
        u = scale * (h @ weight.T + bias)      scale_hidden=False (after it)
        z = softcap * tanh(u / softcap)        softcap=None: z = u

    ``weight [V, H]`` and ``bias [V]`` (or None) are this rank's vocabulary shard under tensor parallelism.
    Granite is ``scale = 1 / logits_scaling``, Cohere ``scale = logit_scale``, Gemma 2/3
    ``softcap = final_logit_softcapping``; most families are the weight alone.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    scale_hidden: bool = False
    softcap: float | None = None

    @property
    def plain(self) -> bool:
        return self.bias is None and self.scale == 1.0 and self.softcap is None

    def logits(self, h: Tensor) -> Tensor:
        """The logits of ``h`` (math in at least float32), for callers that want a chunk of them."""
        return _apply_head(self, h, False)[0]

    def through(self, lm_head, h: Tensor) -> Tensor:
        """The logits of ``h`` with the product ``h @ weight.T + bias`` left to the ``lm_head`` module (a
        tensor-parallel one gathers the vocabulary), the scale and softcap applied here in float32 or more."""
        z = _math(lm_head(h * self.scale if self.scale_hidden else h))
        if self.scale != 1.0 and not self.scale_hidden:
            z = z * self.scale
        return z if self.softcap is None else torch.tanh(z / self.softcap) * self.softcap

    def detach(self) -> "LogitHead":
        return replace(self, weight=self.weight.detach(), bias=None if self.bias is None else self.bias.detach())

    def to(self, dtype: torch.dtype) -> "LogitHead":
        return replace(self, weight=self.weight.to(dtype), bias=None if self.bias is None else self.bias.to(dtype))

    def check(self, name: str) -> None:
        _check_matrix(name, self.weight)
        if self.bias is not None:
            _check_float(f"{name} bias", self.bias)
            if self.bias.shape != self.weight.shape[:1]:
                raise GKDError(f"{name} bias shape {tuple(self.bias.shape)} must be [{self.weight.shape[0]}] (the weight's rows)")
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale == 0:
            raise GKDError(f"{name} scale must be a finite non-zero number, got {self.scale!r}")
        if self.softcap is not None and (not isinstance(self.softcap, (int, float)) or not 0 < self.softcap < math.inf):
            raise GKDError(f"{name} softcap must be a finite number > 0 or None, got {self.softcap!r}")


def _as_head(x) -> LogitHead | None:
    return x if isinstance(x, LogitHead) or x is None else LogitHead(x)


def _by_onednn(x: Tensor, w: Tensor) -> bool:
    """Whether a product of float32 CPU tensors outside autograd runs on oneDNN's product: where this machine runs it
    faster (gkd.machine.onednn_faster: twice torch's rate at the vocabulary products on one AMD VM)."""
    return (onednn_takes(x, w) and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and onednn_faster())


def _times_t(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` (by oneDNN where ``_by_onednn``)."""
    return onednn_linear(x, w) if _by_onednn(x, w) else x @ w.T


def _t_times(g: Tensor, h: Tensor, spare: Tensor | None) -> Tensor:
    """``g.T @ h`` (by oneDNN where ``_by_onednn``, on g's transpose in ``spare``'s storage where it has the room:
    gkd.machine.transposed_rows)."""
    return onednn_linear(transposed_rows(g, spare), h.T) if _by_onednn(g, h) else g.T @ h


def _apply_head(head: LogitHead, hc: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(logits z [c, V_local] in math precision, dz/du [c, V_local] for the softcap or None).

    The product runs in the inputs' dtype, as the model's own lm_head does; the rest in float32 or more,
    in place, so that a plain head costs nothing beyond ``h @ W.T``."""
    z = _math(_times_t(hc, head.weight))
    if head.bias is not None and not head.scale_hidden:
        z.add_(head.bias.to(z.dtype))
    if head.scale != 1.0:
        z.mul_(head.scale)
    if head.bias is not None and head.scale_hidden:
        z.add_(head.bias.to(z.dtype))
    if head.softcap is None:
        return z, None
    t = z.div_(head.softcap).tanh_()
    dcap = (1.0 - t * t) if want_grad else None  # d(c tanh(u / c)) / du
    return t.mul_(head.softcap), dcap


@dataclass
class _Teacher:
    """The teacher side of a fused call, already restricted to the counted rows."""

    hidden: Tensor | None = None  # [n, H_t]
    head: LogitHead | None = None  # weight [V_local, H_t]
    topk: int | None = None  # take the teacher's top-k of its own logits
    ids: Tensor | None = None  # [n, K] global ids (-1: absent)
    logprobs: Tensor | None = None  # [n, K]
    members: list["_Teacher"] | None = None  # a mixture of these teachers
    weights: list[float] | None = None  # the mixture's weights, summing to 1
    temperature: float = 1.0  # the mixture is of the tempered distributions

    def chunk(self, r0: int, r1: int, group) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(full logits [c, V_local] or None, top-k ids [c, K] or None, top-k values [c, K] or None).
        A mixture's are T * log m: the divergence divides by T and renormalises them to log m unchanged."""
        if self.members is not None:
            return self._mixed(r0, r1, group)
        if self.hidden is None:
            return None, self.ids[r0:r1], self.logprobs[r0:r1]
        zt, _ = _apply_head(self.head, self.hidden[r0:r1], False)
        if self.topk is None:
            return zt, None, None
        ids, lp = topk_logprobs(zt, self.topk, tp_group=group)
        return None, ids, lp

    def _mixed(self, r0: int, r1: int, group):
        T = self.temperature
        parts = [m.chunk(r0, r1, group) for m in self.members]
        if len({zt is None for zt, _, _ in parts}) > 1:
            raise GKDError("a teacher mixture is of full-vocabulary teachers or of top-k teachers, not both")
        if parts[0][0] is not None:
            lps = []
            for zt, _, _ in parts:
                zt = zt.div_(T)
                (lse,) = _logsumexp([zt], group)
                lps.append(zt.sub_(lse[:, None]))
            return mixture_logprobs(lps, self.weights).mul_(T), None, None
        ids, lp = mixture_topk([i for _, i, _ in parts], [v for _, _, v in parts], self.weights, T)
        return None, ids, lp


def _row_terms(zs, zt, ids, pad, tk, yc, *, beta, temperature, sft_alpha, want, group):
    """One block of rows' divergence [b], cross-entropy [b] or None (no labels) and, with ``want``, the gradient of
    div + sft_alpha * ce with respect to the logits zs [b, V_local] (else None); zs and zt (the teacher's full
    logits, or None for top-k ``ids``, absent where ``pad``, and values ``tk``) are overwritten."""
    g = ce = None
    if yc is not None:
        counted = (yc >= 0).to(zs.dtype)
        (lse,) = _logsumexp([zs], group)
        picked, _, _ = _gather_vocab(zs, yc.clamp_min(0)[:, None], group)
        ce = (lse - picked[:, 0]) * counted
        if want and sft_alpha:
            g = _cross_entropy_grad(zs, yc, lse, group).mul_(counted[:, None] * sft_alpha)
    if zt is not None:
        # zs is not needed after this point: divide in place
        loss, ga, _ = _divergence(zs.div_(temperature), zt.div_(temperature), beta, group, "s" if want else "")
        if want:
            ga.mul_(1.0 / temperature)
            g = ga if g is None else g.add_(ga)
    else:
        zk, owned, local = _gather_vocab(zs, ids.long(), group)
        loss, gk = _topk_terms(zk, tk, beta, temperature, want, pad)
        if want:
            if g is None:
                g = torch.zeros_like(zs)
            g.scatter_add_(-1, local, gk * owned)
    return loss, ce, g


def _fused_pass(h, head: LogitHead, teacher: _Teacher, labels, *, beta, temperature, sft_alpha, chunk_size, group,
                weights, head_grads=(True, True)):
    """One pass over row chunks: per-row divergence, CE and top-1 agreement, and, when ``weights``
    (per-row dLoss/dL_i) is given, the gradients of sum_i weights_i * (div_i + sft_alpha * ce_i)
    with respect to ``h``, the head's weight ``W`` and its bias (``head_grads``: whether W's and b's are
    wanted; a frozen head's [V, H] gradient is neither zero-filled nor accumulated). Holds one chunk of each side's
    logits at a time (and a softcap's derivative, kept for the backward).

    The chain rule through the head, from g = dL/dz: dL/du = g (1 - tanh^2(u/c)) with a softcap; then
    dL/dh = scale (dL/du) W, dL/dW = scale (dL/du)^T h, and dL/db = sum_rows dL/du times the scale when
    it comes after the bias.
    """
    W, b = head.weight, head.bias
    n = h.shape[0]
    dt = torch.promote_types(h.dtype, torch.float32)
    div = torch.empty(n, dtype=dt, device=h.device)
    ce = torch.zeros(n, dtype=dt, device=h.device)
    agree = torch.empty(n, dtype=torch.bool, device=h.device)
    grad_h = grad_w = grad_b = None
    want = weights is not None
    if want:
        grad_h = torch.empty(n, h.shape[1], dtype=dt, device=h.device)
        grad_b = torch.zeros(b.shape, dtype=dt, device=b.device) if b is not None and head_grads[1] else None
    for r0, r1 in _chunk_bounds(n, chunk_size):
        hc = h[r0:r1]
        zs, dcap = _apply_head(head, hc, want)
        zt, ids, tk = teacher.chunk(r0, r1, group)
        pad = None if ids is None else ids < 0  # absent entries of a mixture's union
        if pad is not None:
            ids = ids.clamp_min(0)
        top1 = _argmax_vocab(zt, group) if zt is not None else ids.gather(-1, tk.argmax(-1, keepdim=True))[:, 0]
        agree[r0:r1] = _argmax_vocab(zs, group) == top1
        # the element-wise terms a few rows at a time: their [rows, V_local] temporaries then fit in a core's cache
        # and are reused from the heap instead of being fresh pages each (gkd.train.malloc); g, the logits' gradient,
        # goes back into zs's rows, which are not needed after their own block
        blocks = _row_blocks(r1 - r0, zs)
        for b0, b1 in blocks:
            loss, ce_b, g = _row_terms(zs[b0:b1], *(_rows(x, b0, b1) for x in (zt, ids, pad, tk)),
                                       _rows(labels, r0 + b0, r0 + b1), beta=beta, temperature=temperature,
                                       sft_alpha=sft_alpha, want=want, group=group)
            div[r0 + b0:r0 + b1] = loss
            if ce_b is not None:
                ce[r0 + b0:r0 + b1] = ce_b
            if g is not None and len(blocks) > 1 and g.data_ptr() != zs[b0:b1].data_ptr():
                zs[b0:b1] = g
        if len(blocks) > 1:
            g = zs if want else None
        # the teacher's logits' storage takes g's transpose for the [V, H] product where oneDNN computes it (and g
        # is not in it); else it goes before that product
        spare = zt if (want and head_grads[0] and grad_w is None and zt is not None and _by_onednn(zt, W)
                       and zt.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()) else None
        zs = zt = None
        if want:
            g = g.mul_(weights[r0:r1, None])  # dL/dz
            if dcap is not None:
                g.mul_(dcap)  # dL/du
            if grad_b is not None:
                grad_b.add_(g.sum(0), alpha=1.0 if head.scale_hidden else head.scale)
            if head.scale != 1.0:
                g.mul_(head.scale)  # dL/d(h W^T)
            g = g.to(W.dtype)
            grad_h[r0:r1] = _times_t(g, W.T)
            if head_grads[0]:
                # the first chunk's product is the [V, H] weight gradient (no zero-filled buffer to add it to); the
                # others add into it, low-precision products in float32
                if grad_w is None:
                    grad_w = _t_times(g, hc, spare).to(dt)
                elif W.dtype == dt:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w.add_(g.T @ hc)
        spare = None
    if want and head_grads[0] and grad_w is None:  # no counted rows
        grad_w = torch.zeros(W.shape, dtype=dt, device=W.device)
    if weights is not None:
        # h is replicated over the TP group and each shard's logits depend on it: sum the parts.
        _allreduce(grad_h, group)
    return div, ce, agree, grad_h, grad_w, grad_b


def _chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """Row ranges of ``size`` rows, except that a last range of under a quarter of ``size`` joins the one before
    (so a chunk has at most 1.25 x ``size`` rows): every chunk reads both heads' weights and, with gradients, adds
    into the [V, H] weight gradient, whatever its rows, so a small tail costs nearly a whole chunk (184 rows of a
    49,152-token vocabulary at 170 per chunk: 390 ms forward and backward, against 356 in one chunk)."""
    starts = list(range(0, n, size))
    if len(starts) > 1 and 4 * (n - starts[-1]) < size:
        starts.pop()
    return [(r0, r1) for r0, r1 in zip(starts, [*starts[1:], n])]

# bytes of one [rows, V_local] temporary of the loss's element-wise terms on the CPU: under a core's L2 cache and
# under gkd.train.malloc's mmap threshold (then the heap reuses it instead of fresh pages)
BLOCK_BYTES = 3 << 18


def _row_blocks(n: int, z: Tensor) -> list[tuple[int, int]]:
    """Ranges of ``z``'s n rows whose [rows, V_local] temporaries hold at most BLOCK_BYTES (at least a row each); on
    an accelerator one range (a few rows at a time would be many small kernels)."""
    size = max(1, BLOCK_BYTES // (z.shape[1] * z.element_size())) if z.device.type == "cpu" else max(n, 1)
    return [(r0, min(r0 + size, n)) for r0 in range(0, n, size)]


def _rows(x: Tensor | None, r0: int, r1: int) -> Tensor | None:
    return None if x is None else x[r0:r1]


def _head_of(W, b, form: dict) -> LogitHead:
    """The student's head from the tensors autograd saw and its static form (scale, softcap)."""
    return LogitHead(W.detach(), None if b is None else b.detach(), **form)


class _FusedReduced(torch.autograd.Function):
    """Scalar sum_i w_i (div_i + alpha ce_i); gradients computed in the forward pass, scaled in backward."""

    @staticmethod
    def forward(ctx, h, W, b, form, weights, teacher, labels, opts, want_grads):
        with torch.no_grad():
            div, ce, agree, gh, gw, gb = _fused_pass(h.detach(), _head_of(W, b, form), teacher, labels,
                                                     weights=weights if want_grads else None,
                                                     head_grads=ctx.needs_input_grad[1:3], **opts)
        ctx.save_for_backward(gh, gw, gb)
        ctx.dtypes = (h.dtype, W.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(div, ce, agree)
        total = (weights * (div + opts["sft_alpha"] * ce)).sum()
        return total, div, ce, agree

    @staticmethod
    def backward(ctx, grad_total, *_):
        grads = ctx.saved_tensors
        # The [V, H] weight gradient is the largest buffer here: hand it over as is when the loss
        # is not rescaled afterwards (pass `normalizer` instead of dividing the result).
        if not bool(grad_total == 1):
            grads = [None if g is None else g * grad_total for g in grads]
        dh, dw, db = (g.to(dtype) if ctx.needs_input_grad[i] and g is not None else None
                      for i, (g, dtype) in enumerate(zip(grads, ctx.dtypes)))
        return dh, dw, db, None, None, None, None, None, None


class _FusedPerRow(torch.autograd.Function):
    """Per-row div_i + alpha ce_i; backward recomputes the chunks with the incoming row weights."""

    @staticmethod
    def forward(ctx, h, W, b, form, teacher, labels, opts):
        with torch.no_grad():
            div, ce, agree, *_ = _fused_pass(h.detach(), _head_of(W, b, form), teacher, labels, weights=None, **opts)
        ctx.save_for_backward(h, W, b)
        ctx.teacher, ctx.labels, ctx.opts, ctx.form = teacher, labels, opts, form
        ctx.mark_non_differentiable(div, ce, agree)
        return div + opts["sft_alpha"] * ce, div, ce, agree

    @staticmethod
    def backward(ctx, grad_rows, *_):
        h, W, b = ctx.saved_tensors
        with torch.no_grad():
            _, _, _, gh, gw, gb = _fused_pass(h, _head_of(W, b, ctx.form), ctx.teacher, ctx.labels,
                                              weights=_math(grad_rows), head_grads=ctx.needs_input_grad[1:3],
                                              **ctx.opts)
        dh = gh.to(h.dtype) if ctx.needs_input_grad[0] else None
        dw = gw.to(W.dtype) if ctx.needs_input_grad[1] else None
        db = gb.to(b.dtype) if b is not None and ctx.needs_input_grad[2] else None
        return dh, dw, db, None, None, None, None


@dataclass
class GKDLossOutput:
    """Result of :func:`fused_linear_gkd_loss`.

    ``loss`` carries the gradient; ``divergence_sum``, ``sft_sum`` and ``agree_count`` are sums over
    the counted positions (``tokens`` of them), for logging.
    """

    loss: Tensor
    divergence_sum: Tensor
    sft_sum: Tensor
    agree_count: Tensor
    tokens: int


def _check_matrix(name: str, x: Tensor, cols: int | None = None) -> None:
    _check_float(name, x)
    if x.dim() != 2 or (cols is not None and x.shape[1] != cols):
        want = f"[*, {cols}]" if cols is not None else "2-D"
        raise GKDError(f"{name} must be {want}, got shape {tuple(x.shape)}")


def _teacher_of(kw: dict, rows, lead, vocab: int, student_vocab_local: int) -> _Teacher:
    """One teacher of a fused call, from its arguments (fused_linear_gkd_loss's), checked and restricted
    to the counted ``rows``."""
    teacher_hidden, teacher_topk = kw.get("teacher_hidden"), kw.get("teacher_topk")
    teacher_topk_ids, teacher_topk_logprobs = kw.get("teacher_topk_ids"), kw.get("teacher_topk_logprobs")
    teacher_head = _as_head(kw.get("teacher_lm_head_weight"))
    teacher_lm_head_weight = None if teacher_head is None else teacher_head.weight
    by_hidden = teacher_hidden is not None or teacher_lm_head_weight is not None
    by_topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if by_hidden == by_topk:
        raise GKDError(
            "give the teacher either as teacher_hidden + teacher_lm_head_weight or as "
            "teacher_topk_ids + teacher_topk_logprobs (exactly one of the two)"
        )
    for name, x in (("teacher_hidden", teacher_hidden), ("teacher_lm_head_weight", teacher_lm_head_weight),
                    ("teacher_lm_head_weight bias", teacher_head and teacher_head.bias),
                    ("teacher_topk_logprobs", teacher_topk_logprobs)):
        if x is not None and x.requires_grad and torch.is_grad_enabled():
            raise GKDError(f"{name} requires grad; the teacher is a constant here: pass {name}.detach()")

    if by_hidden:
        if teacher_hidden is None or teacher_lm_head_weight is None:
            raise GKDError("teacher_hidden and teacher_lm_head_weight must be given together")
        teacher_head.check("teacher_lm_head_weight")
        if teacher_hidden.shape[:-1] != lead or teacher_hidden.shape[-1] != teacher_lm_head_weight.shape[1]:
            raise GKDError(
                f"teacher_hidden shape {tuple(teacher_hidden.shape)} must be {tuple(lead)} + "
                f"[{teacher_lm_head_weight.shape[1]}] (teacher_lm_head_weight dim 1)"
            )
        if teacher_lm_head_weight.shape[0] != student_vocab_local:
            raise GKDError(
                f"vocab mismatch: student_lm_head_weight has {student_vocab_local} rows, "
                f"teacher_lm_head_weight {teacher_lm_head_weight.shape[0]}"
            )
        if teacher_topk is not None and not 1 <= teacher_topk <= vocab:
            raise GKDError(f"teacher_topk={teacher_topk} must be in [1, V={vocab}]")
        return _Teacher(hidden=_select_rows(teacher_hidden, rows).detach(), head=teacher_head.detach(), topk=teacher_topk)
    else:
        if teacher_topk_ids is None or teacher_topk_logprobs is None:
            raise GKDError("teacher_topk_ids and teacher_topk_logprobs must be given together")
        _check_topk(teacher_topk_ids, teacher_topk_logprobs, lead, vocab)
        return _Teacher(ids=_select_rows(teacher_topk_ids, rows).long(), logprobs=_select_rows(teacher_topk_logprobs, rows).detach())


def fused_linear_gkd_loss(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor | LogitHead,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_lm_head_weight: Tensor | LogitHead | None = None,
    teacher_topk: int | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    labels: Tensor | None = None,
    sft_alpha: float = 0.0,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    normalizer: float | None = None,
    chunk_size: int | None = None,
    tp_group=None,
    teacher_mixture: list[dict] | None = None,
    teacher_mixture_weights: list[float] | None = None,
) -> GKDLossOutput:
    """The trainer's loss: divergence (+ ``sft_alpha`` * CE against ``labels``) from hidden states.

    Logits are formed ``chunk_size`` counted positions at a time (``hidden @ weight.T``; a last chunk of
    under a quarter of that joins the one before), so the extra memory is O(chunk_size x V), never O(N x V);
    masked positions never reach the lm_head.

    Either lm_head may be a :class:`LogitHead` instead of a bare weight: its bias, scale and softcap are
    applied exactly, chunk by chunk, and the student's gradients flow through them into the hidden
    states, the weight and the bias (a ``bias`` that requires grad gets its gradient).

    The teacher is either ``teacher_hidden [..., H_t]`` + ``teacher_lm_head_weight [V, H_t]`` (full
    distribution, or its top-``teacher_topk``), or ``teacher_topk_ids`` + ``teacher_topk_logprobs``
    ``[..., K]``. The teacher is a constant: pass detached tensors. ``teacher_mixture`` (a list of such
    teacher arguments, as dicts) with ``teacher_mixture_weights`` instead: the divergence to their mixture
    m = sum_i w_i softmax(z_i / T), w normalised (full-vocabulary teachers: over the vocabulary; top-k
    teachers: over the union of their ids, the student renormalised over it).

    ``normalizer`` divides a ``"sum"`` (a trainer passes the token count of the whole optimizer step);
    dividing here rather than afterwards lets the weight gradient be handed over without a copy.
    ``chunk_size`` defaults to about 2**23 / V_local positions (32 MiB of float32 logits per chunk).

    For ``"mean"``/``"sum"`` the gradients of ``student_hidden`` and ``student_lm_head_weight`` are
    computed during the forward pass (one matmul each per chunk, no recomputation); ``"none"``
    recomputes the chunks in backward. Under ``tp_group`` the weight is this rank's vocabulary shard,
    ``student_hidden`` is replicated, and its gradient is the full one on every rank.
    """
    _check_common(beta, temperature, reduction)
    head = _as_head(student_lm_head_weight)
    head.check("student_lm_head_weight")
    student_lm_head_weight = head.weight
    hsize = student_lm_head_weight.shape[1]
    _check_float("student_hidden", student_hidden)
    if student_hidden.shape[-1] != hsize:
        raise GKDError(
            f"student_hidden last dim {student_hidden.shape[-1]} must equal student_lm_head_weight dim 1 ({hsize})"
        )
    if chunk_size is None:
        chunk_size = max(16, 2**23 // student_lm_head_weight.shape[0])
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise GKDError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if normalizer is not None and (reduction != "sum" or not normalizer > 0):
        raise GKDError(f"normalizer must be > 0 and goes with reduction='sum', got {normalizer!r} with {reduction!r}")
    if not isinstance(sft_alpha, (int, float)) or sft_alpha < 0:
        raise GKDError(f"sft_alpha must be a number >= 0, got {sft_alpha!r}")
    group = _group(tp_group)
    lead = student_hidden.shape[:-1]
    vocab = _shard_info(student_lm_head_weight.shape[0], group)[1]
    _check_mask(mask, lead)
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != lead or labels.is_floating_point()):
        raise GKDError(f"labels must be an integer tensor of shape {tuple(lead)}")
    rows = _counted_rows(mask)
    h = _select_rows(student_hidden, rows)
    one = dict(teacher_hidden=teacher_hidden, teacher_lm_head_weight=teacher_lm_head_weight, teacher_topk=teacher_topk,
               teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs)
    if teacher_mixture is None:
        teacher = _teacher_of(one, rows, lead, vocab, student_lm_head_weight.shape[0])
    else:
        if any(v is not None for v in one.values()):
            raise GKDError("give the teacher either alone or as teacher_mixture, not both")
        weights = [float(w) for w in teacher_mixture_weights or []]
        if len(weights) != len(teacher_mixture) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
            raise GKDError(f"teacher_mixture_weights must be one number >= 0 per teacher ({len(teacher_mixture)}), "
                           f"not all 0; got {teacher_mixture_weights!r}")
        members = [_teacher_of(kw, rows, lead, vocab, student_lm_head_weight.shape[0]) for kw in teacher_mixture]
        if len({m.hidden is None or m.topk is not None for m in members}) > 1:
            raise GKDError("a teacher mixture is of full-vocabulary teachers or of top-k teachers, not both")
        teacher = _Teacher(members=members, weights=[w / sum(weights) for w in weights], temperature=float(temperature))
    y = None
    if labels is not None:
        y = labels.reshape(-1) if rows is None else labels.reshape(-1).index_select(0, rows)
        y = y.long()
        bad = (y != -100) & ((y < 0) | (y >= vocab))
        if bool(bad.any()):
            raise GKDError(f"labels must be in [0, {vocab}) or -100, got {int(y[bad][0])}")
    opts = dict(beta=_as_beta(beta), temperature=float(temperature), sft_alpha=float(sft_alpha),
                chunk_size=chunk_size, group=group)
    n = h.shape[0]
    W, b = head.weight, head.bias
    form = dict(scale=float(head.scale), scale_hidden=bool(head.scale_hidden),
                softcap=None if head.softcap is None else float(head.softcap))
    if reduction == "none":
        per_row, div, ce, agree = _FusedPerRow.apply(h, W, b, form, teacher, y, opts)
        loss = _reduce(per_row, rows, lead, "none")
    else:
        scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0 / (normalizer or 1.0)
        w = torch.full((n,), scale, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        want_grads = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, W, b))
        loss, div, ce, agree = _FusedReduced.apply(h, W, b, form, w, teacher, y, opts, want_grads)
    return GKDLossOutput(loss=loss, divergence_sum=div.sum(), sft_sum=ce.sum(), agree_count=agree.sum(), tokens=n)


def fused_linear_generalized_jsd(
    student_hidden: Tensor,
    student_lm_head_weight: Tensor | LogitHead,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_lm_head_weight: Tensor | LogitHead | None = None,
    teacher_topk: int | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    tp_group=None,
) -> Tensor:
    """:func:`generalized_jsd` of ``student_hidden @ student_lm_head_weight.T`` (or a :class:`LogitHead`'s
    logits) against the teacher,
    without ever holding the logits of all positions. See :func:`fused_linear_gkd_loss` for the
    arguments; this returns the divergence alone.
    """
    return fused_linear_gkd_loss(
        student_hidden, student_lm_head_weight, teacher_hidden=teacher_hidden,
        teacher_lm_head_weight=teacher_lm_head_weight, teacher_topk=teacher_topk,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs, beta=beta,
        temperature=temperature, mask=mask, reduction=reduction, chunk_size=chunk_size, tp_group=tp_group,
    ).loss
