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


def local_mib(tensors) -> float:
    """MiB this rank holds of ``tensors`` (its shards only)."""
    return sum(local(t).numel() * t.element_size() for t in tensors) / 2**20
