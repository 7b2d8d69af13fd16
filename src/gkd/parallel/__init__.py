"""How models are spread over processes. The trainer calls these and never asks which parallelism is on."""

from __future__ import annotations

import torch

from gkd.parallel.loading import load_sharded
from gkd.parallel.mesh import Parallel, check_options, setup, teardown


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a tensor-parallel weight (the tensor itself when it is not a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_mib(tensors) -> float:
    """MiB this rank holds of ``tensors`` (its shards only)."""
    return sum(local(t).numel() * t.element_size() for t in tensors) / 2**20


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm (over every shard), after scaling the gradients down to ``max_norm``
    (0 = no clipping). Works on plain tensors and on DTensors of one mesh (FSDP and/or TP)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _tensor_parallel(model, par: Parallel) -> None:
    if par.cp > 1:
        from gkd.parallel.context import use_context_parallel_attention

        use_context_parallel_attention(model)
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, par.tp_mesh)


def shard_student(model, par: Parallel) -> None:
    """Tensor parallel first (within a node), then FSDP over the data- (and context-) parallel ranks."""
    _tensor_parallel(model, par)
    if par.dp_mesh is not None:
        from gkd.parallel.fsdp import shard_student as fsdp

        fsdp(model, par.dp_mesh)


def shard_teacher(model, par: Parallel) -> None:
    """The same tensor parallelism; FSDP over the shard ranks only (replicas keep whole copies)."""
    _tensor_parallel(model, par)
    if par.shard_mesh is not None:
        from gkd.parallel.fsdp import shard_teacher as fsdp

        fsdp(model, par.shard_mesh)


def sync_gradients(model, last: bool, reduce_scatter_each: bool = True) -> None:
    """Before a micro-batch's backward (see gkd.parallel.fsdp.sync_gradients); nothing without FSDP."""
    from gkd.parallel.fsdp import sync_gradients as fsdp

    fsdp(model, last, reduce_scatter_each)


def gathered_for_generation(model, enabled: bool = True):
    """A context in which ``model``'s FSDP units stay gathered (one all-gather per generation instead of
    one per decoded token and layer); a no-op without FSDP or when not ``enabled``."""
    import contextlib

    from gkd.parallel.fsdp import gathered

    return gathered(model) if enabled else contextlib.nullcontext(model)


def check_model(model, par: Parallel, lora: bool) -> None:
    """Fail before the teacher is loaded when the student cannot be split."""
    if par.cp > 1:
        from gkd.parallel.context import check_context_parallel

        check_context_parallel(model, par.cp)
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import check_plan

        check_plan(model, par.tp, lora)


__all__ = ["Parallel", "check_options", "setup", "teardown", "load_sharded", "local", "local_mib", "clip_grad_norm",
           "shard_student", "shard_teacher", "check_model", "sync_gradients", "gathered_for_generation"]
