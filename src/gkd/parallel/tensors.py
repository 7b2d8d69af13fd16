"""This rank's pieces of tensors that may be sharded (DTensors under FSDP or tensor parallelism)."""

from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor-parallel weight (the tensor itself when it is not a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_head(head):
    """A LogitHead with this rank's pieces of its weight and bias."""
    from dataclasses import replace

    return replace(head, weight=local(head.weight), bias=None if head.bias is None else local(head.bias))


def vocabulary_shard(head, rank: int, size: int):
    """A whole LogitHead's rows of vocabulary shard ``rank`` of ``size``, as a tensor-parallel (Shard(0)) head
    splits them."""
    from dataclasses import replace

    def rows(t):
        return torch.chunk(t, size, dim=0)[rank]

    return replace(head, weight=rows(head.weight), bias=None if head.bias is None else rows(head.bias))


def local_mib(tensors) -> float:
    """MiB this rank holds of ``tensors`` (its shards only)."""
    return sum(local(t).numel() * t.element_size() for t in tensors) / 2**20


def squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The squared norm of ``grads`` over every shard (float64): plain tensors and DTensors, the experts' on a
    mesh of their own under expert parallelism, so each mesh's norm is taken apart and combined."""
    from torch.distributed.tensor import DTensor

    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = [torch.nn.utils.get_total_norm(gs) for gs in by_mesh.values()]
    return sum(((n.full_tensor() if isinstance(n, DTensor) else n).double() ** 2 for n in norms),
               torch.zeros((), dtype=torch.float64))


def scale(grads: list[torch.Tensor], coef: float) -> None:
    """Every gradient times ``coef`` (a Python number: it scales plain tensors and DTensors of any mesh alike)."""
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(g.device_mesh if hasattr(g, "device_mesh") else None, []).append(g)
    for gs in by_mesh.values():
        torch._foreach_mul_(gs, coef)
