"""How models are spread over processes. The trainer calls these and never asks which parallelism is on."""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.parallel.loading import load_sharded
from gkd.parallel.mesh import Parallel, check_options, setup, teardown
from gkd.parallel.expert import split_experts
from gkd.parallel.tensors import local, local_head, local_mib, scale, squared_norm  # noqa: F401 - the layer's API


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, par: Parallel | None = None, model=None) -> float:
    """The global gradient norm (over every shard and pipeline stage), after scaling the gradients down to
    ``max_norm`` (0 = no clipping). Works on plain tensors and on DTensors (FSDP and/or TP); experts under
    expert parallelism live on a mesh of their own, so the norm is taken per mesh and combined."""
    if par is not None and par.pp > 1:
        from gkd.parallel.pipeline import clip_grad_norm as over_stages
        from gkd.parallel.pipeline import tied_copy

        return over_stages(params, max_norm, par.pp_group, once=tied_copy(model) if model is not None else None)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(squared_norm(grads)) ** 0.5
    coef = max_norm / (norm + 1e-6) if max_norm else 1.0
    if coef < 1.0:
        scale(grads, coef)
    return norm


def _tensor_parallel(model, par: Parallel) -> None:
    if par.cp > 1:
        from gkd.parallel.context import use_context_parallel_attention

        use_context_parallel_attention(model)
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, par.tp_mesh)


def shard_student(model, par: Parallel) -> None:
    """Tensor parallel first (within a node), expert parallel, then FSDP over the data- (and context-)
    parallel ranks (pipeline stages first of all: gkd.parallel.pipeline)."""
    if par.pp > 1:
        from gkd.parallel.pipeline import shard

        return shard(model, par, par.pipeline, student=True)
    _tensor_parallel(model, par)
    ignored = split_experts(model, par)
    if par.dp_mesh is not None:
        from gkd.parallel.fsdp import shard_student as fsdp

        fsdp(model, par.dp_mesh, ignored)


def shard_teacher(model, par: Parallel, offload: bool = False) -> None:
    """The same tensor and expert parallelism; FSDP over the shard ranks only (replicas keep whole copies).
    ``offload``: the FSDP shards stay in CPU memory between uses (see teacher_offload)."""
    if par.pp > 1:
        from gkd.parallel.pipeline import shard

        return shard(model, par, par.pipeline, student=False)
    _tensor_parallel(model, par)
    ignored = split_experts(model, par, reshard_after_forward=True, student=False)
    if par.shard_mesh is not None:
        from gkd.parallel.fsdp import shard_teacher as fsdp

        fsdp(model, par.shard_mesh, ignored, offload=offload)


def teacher_offload(par: Parallel, requested: bool, device) -> str:
    """Who keeps the teacher on CPU between uses: "fsdp" (its shards, under FSDP's CPU offload policy),
    "move" (the local teacher moves the whole unsharded model) or "" (nothing to do: training runs on CPU)."""
    if not requested or device.type == "cpu":
        return ""
    if par.shard_mesh is not None and par.pp == 1:
        return "fsdp"
    if par.tp > 1 or par.pp > 1 or par.ep > 1:
        raise GKDError("--offload_teacher_model with tensor, pipeline or expert parallelism but no FSDP shards is "
                       "not supported yet: shard the teacher over the data-parallel ranks, or drop the flag")
    return "move"


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


def check_model(model, par: Parallel, lora: bool, lora_experts: bool = False) -> None:
    """Fail before the teacher is loaded when the student cannot be split (``lora_experts``: LoRA will
    adapt the experts)."""
    if par.cp > 1:
        from gkd.parallel.context import check_context_parallel

        check_context_parallel(model, par.cp)
    if par.tp > 1:
        from gkd.parallel.tensor_parallel import check_plan

        check_plan(model, par.tp, lora, lora and lora_experts)
    if par.ep > 1:
        from gkd.parallel.expert import check

        check(model, par.ep, lora and lora_experts)
    if par.pp > 1:
        from gkd.parallel.pipeline import check_model

        check_model(model, par.pp * par.pipeline.virtual, par.pipeline.layers)


__all__ = ["Parallel", "check_options", "setup", "teardown", "load_sharded", "local", "local_head", "local_mib",
           "clip_grad_norm", "shard_student", "shard_teacher", "check_model", "sync_gradients", "gathered_for_generation"]
