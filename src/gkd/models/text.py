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


def layer_attention(config, i: int) -> str:
    """A layer's attention kind as these bodies choose its mask: Qwen2/Qwen3 by ``layer_types``, Mistral
    slides every layer when it has a window, Llama never."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


class LlamaLike(Adapter):
    name = "llama-like text"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    pipelines = True

    def tp_layer_plan(self, layer) -> dict:
        return llama_layer_plan(layer)

    def stage_masks(self, config, hidden, attention_mask, position_ids, cache, layer_ids: list[int]) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        made, out = {}, {}
        for i in layer_ids:
            kind = layer_attention(config, i)
            if kind not in made:  # the cache sizes of this kind come from the stage's first such layer
                make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                kw = {"layer_idx": i} if cache is not None else {}
                made[kind] = make(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  past_key_values=cache, position_ids=position_ids, **kw)
            out[i] = made[kind]
        return out


TEXT = register(LlamaLike())
