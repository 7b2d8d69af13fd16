"""Llama-shaped text decoders: Llama, Mistral, Qwen2, Qwen3 (and SmolLM2, a Llama).

Their layers share module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, the two norms), so
one tensor-parallel plan serves all: q/k/v and gate/up split by output column, o and down by input row
(one all-reduce each), Megatron-style.
"""

from __future__ import annotations

from gkd.models.adapter import Adapter, register


def llama_layer_plan(layer) -> dict:
    """The tensor-parallel plan of a Llama-shaped decoder layer."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from gkd.parallel.tensor_parallel import replicated

    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(),
        "input_layernorm": replicated(Replicate()), "post_attention_layernorm": replicated(Replicate()),
    }
    for norm in ("q_norm", "k_norm"):  # Qwen3: over head_dim of [batch, seq, heads, head_dim]
        if hasattr(layer.self_attn, norm):
            plan[f"self_attn.{norm}"] = replicated(Shard(2))
    return plan


class LlamaLike(Adapter):
    name = "llama-like text"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def tp_layer_plan(self, layer) -> dict:
        return llama_layer_plan(layer)


TEXT = register(LlamaLike())
