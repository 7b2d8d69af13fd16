"""Tensor-parallel plans (DTensor ``parallelize_module``) for transformers' Llama-shaped decoders.

Attention heads and MLP columns are split Megatron-style (q/k/v and gate/up by output column, o and
down by input row, one all-reduce each); the embedding and the lm_head are split over the vocabulary.
Training never calls the lm_head: the loss takes this rank's vocabulary shard of its weight and the
tensor-parallel group (gkd.losses' vocab-parallel path), so the full vocabulary is never gathered. The
lm_head module itself returns replicated logits, for ``generate``.
"""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.models import decoder

# Same module names in each: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, embed_tokens, lm_head.
FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _replicated(input_layout):
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

            return distribute_module(module, mesh, input_fn=inputs, output_fn=lambda _, out, mesh: out.to_local())

    return Replicated()


def _layer_plan(layer) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
        "input_layernorm": _replicated(Replicate()), "post_attention_layernorm": _replicated(Replicate()),
    }
    for norm in ("q_norm", "k_norm"):  # Qwen3: over head_dim of [batch, seq, heads, head_dim]
        if hasattr(layer.self_attn, norm):
            plan[f"self_attn.{norm}"] = _replicated(Shard(2))
    return plan


def check_plan(model, tp: int, lora: bool = False) -> None:
    """A one-line error for a model tensor parallelism of size ``tp`` cannot split."""
    name = type(model).__name__
    if lora or hasattr(model, "peft_config"):
        raise GKDError("--train_type lora with --tensor_model_parallel_size > 1 is not supported yet; "
                       "use data parallelism (FSDP) for LoRA")
    if name not in FAMILIES:
        raise GKDError(f"--tensor_model_parallel_size {tp}: no tensor-parallel plan for {name} "
                       f"(plans exist for {', '.join(FAMILIES)})")
    c = model.config
    sizes = {"num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
             "intermediate_size": c.intermediate_size, "vocab_size": model.get_output_embeddings().weight.shape[0]}
    for what, n in sizes.items():
        if n % tp:
            raise GKDError(f"--tensor_model_parallel_size {tp}: {name} has {what} {n}, which {tp} does not divide")


def apply_tensor_parallel(model, tp_mesh) -> None:
    """Shard ``model`` in place over ``tp_mesh``; tied embeddings stay one (vocabulary-sharded) weight."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_plan(model, tp_mesh.size())
    body = decoder(model)
    tied = model.get_output_embeddings().weight is body.embed_tokens.weight
    for layer in body.layers:
        parallelize_module(layer, tp_mesh, _layer_plan(layer))
    parallelize_module(body.norm, tp_mesh, _replicated(Replicate()))
    parallelize_module(model.get_output_embeddings(), tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    parallelize_module(body.embed_tokens, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    if tied:
        body.embed_tokens.weight = model.get_output_embeddings().weight
