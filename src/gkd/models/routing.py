"""The router load-balancing loss of mixture-of-experts students, from what their routers return.

gkd.train.step says why each sequence gets its own value. Per row r, over its n_r attention-mask tokens and
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


def row_sums(seen, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row [B, 2E + 1]: A_e, P_e (with grad) and L over the layers that produced ``seen``; the tokens
    routed to each expert per layer [layers, E], float64 on the CPU); only attention-mask tokens count."""
    B, T = attention_mask.shape
    mask = attention_mask.reshape(-1).float()
    row = torch.arange(B, device=mask.device).repeat_interleave(T)
    E = seen[0][0].shape[-1]
    assigned = torch.zeros(B, E, dtype=torch.float32, device=mask.device)
    prob = torch.zeros(B, E, dtype=torch.float32, device=mask.device)
    load = []
    for logits, ids in seen:
        hits = torch.zeros(ids.shape[0], E, device=mask.device).scatter_add_(
            1, ids, torch.ones(ids.shape, device=mask.device)) * mask[:, None]
        assigned.index_add_(0, row, hits)
        prob = prob.index_add(0, row, torch.softmax(logits.float(), dim=-1) * mask[:, None])
        load.append(hits.sum(0))
    layers = assigned.new_full((B, 1), float(len(seen)))
    return torch.cat([assigned, prob, layers], dim=1), torch.stack(load).double().cpu()


def aux_sum(sums: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sum over rows of n_r * aux_r (each row's transformers aux_loss weighted by its tokens), from the
    rows' ``row_sums`` over every MoE layer."""
    E = (sums.shape[1] - 1) // 2
    assigned, prob, layers = sums[:, :E], sums[:, E:2 * E], sums[:, -1]
    n = attention_mask.sum(1).float().clamp(min=1)
    return (E * (assigned * prob).sum(1) / (layers * n) ** 2 * n).sum()


def router_stats(seen, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of n_r * aux_r, with grad; tokens routed to each expert [layers, E]) for a batch
    whose routers produced ``seen``."""
    sums, load = row_sums(seen, attention_mask)
    return aux_sum(sums, attention_mask), load
