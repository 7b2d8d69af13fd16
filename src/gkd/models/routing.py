"""The router load-balancing loss of mixture-of-experts students, from what their routers return.

gkd.train.step says why each sequence gets its own value. Per sequence r, over its n_r tokens and
every MoE layer: A_e the top-k assignments to expert e, P_e its summed router probabilities (with grad) and
L the MoE layers; transformers' ``aux_loss`` of the row alone is E * sum_e A_e P_e / (L n_r)^2. A, P and L are
sums over layers, so pipeline stages each add their own layers' share to a row's sums (:func:`row_sums`) and
the last stage forms the loss from the totals (:func:`aux_sum`): the same value and gradient as one process.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def recording(routers):
    """The routers' outputs (logits [N, E], top-k expert ids [N, k]) of the forwards run inside, per layer;
    recomputed forwards in backward (gradient checkpointing) happen outside and are not recorded."""
    seen = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: seen.append((out[0], out[2]))) for r in routers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def row_sums(seen, index: torch.Tensor, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per sequence [S, 2E + 1]: A_e, P_e (with grad) and L over the layers that produced ``seen``; the tokens
    routed to each expert per layer [layers, E], float64 on the CPU). ``index`` [B, T]: each token's sequence
    (gkd.data.batch.Batch.sequence_index; packed rows hold several), -1 on padding, which does not count;
    ``count``: S, where ``index`` holds only some of the tokens (a context-parallel rank's)."""
    flat = index.reshape(-1)
    mask = (flat >= 0).float()
    row = flat.clamp(min=0)
    S = count if count is not None else int(flat.max()) + 1 if len(flat) else 0
    E = seen[0][0].shape[-1]
    assigned = torch.zeros(S, E, dtype=torch.float32, device=mask.device)
    prob = torch.zeros(S, E, dtype=torch.float32, device=mask.device)
    load = []
    for logits, ids in seen:
        hits = torch.zeros(ids.shape[0], E, device=mask.device).scatter_add_(
            1, ids, torch.ones(ids.shape, device=mask.device)) * mask[:, None]
        assigned.index_add_(0, row, hits)
        prob = prob.index_add(0, row, torch.softmax(logits.float(), dim=-1) * mask[:, None])
        load.append(hits.sum(0))
    layers = assigned.new_full((S, 1), float(len(seen)))
    return torch.cat([assigned, prob, layers], dim=1), torch.stack(load).double().cpu()


def aux_sum(sums: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The sum over sequences of n_r * aux_r (each one's transformers aux_loss weighted by its tokens), from
    their ``row_sums`` over every MoE layer; ``index`` as there."""
    E = (sums.shape[1] - 1) // 2
    assigned, prob, layers = sums[:, :E], sums[:, E:2 * E], sums[:, -1]
    flat = index.reshape(-1)
    n = torch.zeros(sums.shape[0], device=sums.device).index_add_(
        0, flat.clamp(min=0), (flat >= 0).float()).clamp(min=1)
    return (E * (assigned * prob).sum(1) / (layers * n) ** 2 * n).sum()


def router_stats(seen, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over sequences of n_r * aux_r, with grad; tokens routed to each expert [layers, E]) for a batch
    whose routers produced ``seen``; ``index`` as in :func:`row_sums`."""
    sums, load = row_sums(seen, index)
    return aux_sum(sums, index), load
