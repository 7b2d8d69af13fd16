"""Tensor parallelism (DTensor ``parallelize_module``) with a decoder-layer plan from the model's adapter.

Each family's adapter gives the plan of one decoder layer (gkd.models.text for the Llama-shaped ones);
here the layers are split by it, and the embedding and the lm_head are split over the vocabulary.
Training never calls the lm_head: the loss takes this rank's vocabulary shard of its weight and the
tensor-parallel group (gkd.losses' vocab-parallel path), so the full vocabulary is never gathered. The
lm_head module itself returns replicated logits, for ``generate``.
"""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.models.adapter import adapter_for, families, unwrap


def replicated(input_layout):
    """A style for norms: weights whole on every rank but held as replicated DTensors (the optimizer and
    gradient clipping take one kind of tensor); activations enter split as ``input_layout`` says and
    leave as plain tensors. Per-head norms (Qwen3's q_norm/k_norm) see only this rank's heads, Shard(2),
    so their weight gradient is a partial sum that DTensor reduces over the group."""
    from torch.distributed.tensor import DTensor, distribute_module
    from torch.distributed.tensor.parallel import ParallelStyle

    class Replicated(ParallelStyle):
        def _apply(self, module, mesh):
            def inputs(_, args, mesh):
                return tuple(DTensor.from_local(a, mesh, [input_layout], run_check=False)
                             if isinstance(a, torch.Tensor) else a for a in args)

            def outputs(_, out, mesh):  # a router returns (logits, weights, expert ids)
                return tuple(o.to_local() for o in out) if isinstance(out, tuple) else out.to_local()

            return distribute_module(module, mesh, input_fn=inputs, output_fn=outputs)

    return Replicated()


def styles(plan: dict[str, str]) -> dict:
    """An adapter's plan (submodule -> style name) as DTensor parallel styles."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from gkd.parallel.expert import replicated_experts

    make = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel, "replicated": lambda: replicated(Replicate()),
            "replicated_heads": lambda: replicated(Shard(2)),  # per-head norms see this rank's heads
            "replicated_experts": replicated_experts}
    return {name: make[style]() for name, style in plan.items()}


def check_plan(model, tp: int, lora: bool = False) -> None:
    """A one-line error for a model tensor parallelism of size ``tp`` cannot split."""
    adapter = adapter_for(model)
    name = adapter.class_name(model)
    if lora or hasattr(model, "peft_config"):
        raise GKDError("--train_type lora with --tensor_model_parallel_size > 1 is not supported yet; "
                       "use data parallelism (FSDP) for LoRA")
    if not adapter.has_tp_plan:
        planned = ", ".join(a.name for a in families() if a.has_tp_plan)
        raise GKDError(f"--tensor_model_parallel_size {tp}: no tensor-parallel plan for {name} "
                       f"(plans exist for the families {planned}; use data parallelism)")
    for what, n in adapter.tp_sizes(model).items():
        if n % tp:
            raise GKDError(f"--tensor_model_parallel_size {tp}: {name} has {what} {n}, which {tp} does not divide")


def apply_tensor_parallel(model, tp_mesh) -> None:
    """Shard ``model`` in place over ``tp_mesh``; tied embeddings stay one (vocabulary-sharded) weight."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    adapter = adapter_for(model)
    body = adapter.decoder(model)
    head = unwrap(model).get_output_embeddings()
    staged = isinstance(body.layers, torch.nn.ModuleDict)  # a pipeline stage's share (gkd.parallel.pipeline)
    if not staged:
        check_plan(model, tp_mesh.size())
    tied = head is not None and body.embed_tokens is not None and head.weight is body.embed_tokens.weight
    for layer in (body.layers.values() if staged else body.layers):
        parallelize_module(layer, tp_mesh, styles(adapter.tp_layer_plan(layer)))
    if body.norm is not None:
        parallelize_module(body.norm, tp_mesh, replicated(Replicate()))
    if head is not None:
        parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if body.embed_tokens is not None:
        parallelize_module(body.embed_tokens, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    if tied:
        body.embed_tokens.weight = head.weight
