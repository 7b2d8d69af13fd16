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


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, par: Parallel | None = None) -> float:
    """The global gradient norm (over every shard and pipeline stage), after scaling the gradients down to
    ``max_norm`` (0 = no clipping). Works on plain tensors and on DTensors of one mesh (FSDP and/or TP)."""
    from torch.distributed.tensor import DTensor

    if par is not None and par.pp > 1:
        from gkd.parallel.pipeline import clip_grad_norm as over_stages

        return over_stages(params, max_norm, par.pp_group)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _tensor_parallel(model, par: Parallel) -> None:
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, par.tp_mesh)


def shard_student(model, par: Parallel) -> None:
    """Tensor parallel first (within a node), then FSDP over the data-parallel ranks (pipeline stages
    first of all: gkd.parallel.pipeline)."""
    if par.pp > 1:
        from gkd.parallel.pipeline import shard

        return shard(model, par, par.pipeline, student=True)
    _tensor_parallel(model, par)
    if par.dp_size > 1:
        from gkd.parallel.fsdp import shard_student as fsdp

        fsdp(model, par.dp_mesh)


def shard_teacher(model, par: Parallel) -> None:
    """The same tensor parallelism; FSDP over the shard ranks only (replicas keep whole copies)."""
    if par.pp > 1:
        from gkd.parallel.pipeline import shard

        return shard(model, par, par.pipeline, student=False)
    _tensor_parallel(model, par)
    if par.dp_shard > 1:
        from gkd.parallel.fsdp import shard_teacher as fsdp

        fsdp(model, par.mesh["dp_shard"])


def check_model(model, par: Parallel, lora: bool) -> None:
    """Fail before the teacher is loaded when the student cannot be split."""
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import check_plan

        check_plan(model, par.tp, lora)
    if par.pp > 1:
        from gkd.parallel.pipeline import check_model

        check_model(model, par.pp * par.pipeline.virtual, par.pipeline.layers)


__all__ = ["Parallel", "check_options", "setup", "teardown", "load_sharded", "local", "local_mib", "clip_grad_norm",
           "shard_student", "shard_teacher", "check_model"]
