"""Text decoders: the Llama-shaped families (Llama, Mistral, Qwen2/2.5, Qwen3, SmolLM3, and SmolLM2, a
Llama), Granite, Cohere, Gemma 2/3, Phi-3 and OLMo 2.

Everything a family does differently before the final norm (Gemma's embedding scaling, sliding windows and
attention softcapping, Granite's multipliers, Cohere's parallel block, OLMo 2's post-norms, SmolLM3's NoPE
layers) runs inside the model's own forward, which ``final_hidden`` calls; only the logit head after it
needs describing (``head_form``), and a tiny model of each family checks that the description is exact
(tests/test_families.py).

The Llama-shaped layers share module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), so one
tensor-parallel plan serves them all: q/k/v and gate/up split by output column, o and down by input row
(one all-reduce each), Megatron-style, and every norm of the layer held whole. Phi-3 (fused projections) and
OLMo 2 (q/k norms over every head) adapt it.
"""

from __future__ import annotations

from gkd.models.adapter import Adapter, register

# the per-layer norms these families use (whichever a layer has), all over the hidden size
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def llama_layer_plan(layer) -> dict[str, str]:
    """The tensor-parallel plan of a Llama-shaped decoder layer: submodule -> style name (the styles are
    gkd.parallel.tensor_parallel's: colwise, rowwise, replicated, replicated_heads, replicated_experts)."""
    plan = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
    plan.update({norm: "replicated" for norm in _LAYER_NORMS if hasattr(layer, norm)})
    if not hasattr(layer, "self_attn"):  # (a hybrid's other token mixer: its adapter plans it)
        return plan
    plan.update({"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
                 "self_attn.o_proj": "rowwise"})
    for norm in ("q_norm", "k_norm"):  # Qwen3, Gemma 3: over head_dim of [batch, seq, heads, head_dim]
        if hasattr(layer.self_attn, norm):
            plan[f"self_attn.{norm}"] = "replicated_heads"
    return plan


class LlamaLike(Adapter):
    name = "llama-like text"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    vllm_sync = ("llama", "mistral", "qwen2", "qwen3", "smollm3")
    pipeline_gap = ""  # (stages build masks and rotary embeddings as the base adapter does)

    def tp_layer_plan(self, layer) -> dict:
        return llama_layer_plan(layer)


class Granite(LlamaLike):
    """Granite divides its logits by ``logits_scaling`` (its embedding, attention and residual multipliers
    are inside the model)."""

    name = "granite"
    model_types = ("granite",)
    head_attrs = ("logits_scaling",)
    head_note = "h·Wᵀ / logits_scaling"
    vllm_sync = ("granite",)

    def head_form(self, config) -> dict:
        return {"scale": 1.0 / config.logits_scaling}

    def stage_embed(self, config, embed_tokens, ids):
        return embed_tokens(ids) * config.embedding_multiplier  # as GraniteModel scales its inputs


class Cohere(LlamaLike):
    """Cohere (Command-R) multiplies its logits by ``logit_scale``; attention and MLP read one input norm
    in parallel. Its optional per-head q/k LayerNorms (``use_qk_norm``, Command R+) hold a [heads, head_dim]
    weight: under tensor parallelism it stays whole (replicated) and the norm runs on the DTensor of every
    head, of which this rank holds its own (llama_layer_plan's replicated_heads)."""

    name = "cohere"
    model_types = ("cohere",)
    head_attrs = ("logit_scale",)
    head_note = "h·Wᵀ · logit_scale"
    vllm_sync = ("cohere",)

    def head_form(self, config) -> dict:
        return {"scale": float(config.logit_scale)}


class Gemma(LlamaLike):
    """Gemma 2 and Gemma 3 (text) soft-cap their logits, ``c * tanh(z / c)`` with c the
    ``final_logit_softcapping`` (Gemma 3 has none by default); attention softcapping (Gemma 2's, which needs
    transformers' eager attention: see ``attention``), sliding windows and the sqrt(hidden) embedding scale (the
    embedding module's own) are inside the model."""

    name = "gemma"
    model_types = ("gemma2",)
    head_attrs = ("final_logit_softcapping",)
    inner_attrs = ("attn_logit_softcapping",)
    head_note = "c·tanh(h·Wᵀ / c), c = final_logit_softcapping"
    vllm_sync = ("gemma2",)

    def attention(self, config) -> str | None:
        # transformers' SDPA drops ``softcap``: only the eager path caps attention scores
        return "eager" if getattr(config, "attn_logit_softcapping", None) else None

    def head_form(self, config) -> dict:
        cap = getattr(config, "final_logit_softcapping", None)
        return {"softcap": float(cap)} if cap else {}

    def vllm_weight_name(self, name: str) -> str | None:
        # vLLM's Gemma 2/3 have no lm_head: their logits always come from the (tied) embedding
        return None if name == "lm_head.weight" else name


class Gemma3(Gemma):
    """Gemma 3 (text): Gemma 2's head; its rotary embedding differs by layer kind (local and global bases)."""

    name = "gemma3"
    model_types = ("gemma3_text",)
    vllm_sync = ("gemma3_text",)

    def pipeline_refusal(self, config) -> str:
        if getattr(config, "use_bidirectional_attention", False):
            return "its use_bidirectional_attention masks are not built by the stages"
        return super().pipeline_refusal(config)

    def stage_rotary(self, config, rotary_emb, hidden, position_ids, layer_ids: list[int]) -> dict:
        kinds = {config.layer_types[i] for i in layer_ids}
        made = {kind: rotary_emb(hidden, position_ids, kind) for kind in kinds}
        return {i: made[config.layer_types[i]] for i in layer_ids}


def phi3_layer_plan(layer) -> dict:
    """Phi-3's fused projections, split by column with their weights as stored (checkpoints keep their layout),
    their outputs regrouped so that each rank holds its heads' q, k and v and its columns of gate and of up: the
    attention then counts this rank's heads, o_proj and down_proj split by row as Llama's."""
    attn = layer.self_attn
    q, kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
    plan = {"self_attn": "local_heads", "self_attn.qkv_proj": ("colwise_parts", q, kv, kv),
            "self_attn.o_proj": "rowwise", "mlp.gate_up_proj": ("colwise_parts", *[layer.mlp.down_proj.in_features] * 2),
            "mlp.down_proj": "rowwise"}
    plan.update({norm: "replicated" for norm in _LAYER_NORMS if hasattr(layer, norm)})
    return plan


def whole_width_qk_norms(plan: dict[str, str]) -> dict[str, str]:
    """``plan`` with OLMo 2's / OLMoE's q_norm and k_norm, RMSNorms over the whole q / k projection (every head),
    split with their projection's columns and their variance summed over the ranks."""
    return {**plan, "self_attn.q_norm": "split_norm", "self_attn.k_norm": "split_norm"}


class Phi3(Adapter):
    """Phi-3: a plain head; fused qkv_proj and gate_up_proj (``phi3_layer_plan``). Its body builds masks and
    positions as Llama's does, so stages do too."""

    name = "phi3"
    model_types = ("phi3",)
    vllm_sync = ("phi3",)
    pipeline_gap = ""

    def tp_layer_plan(self, layer) -> dict:
        return phi3_layer_plan(layer)


class Olmo2(Adapter):
    """OLMo 2: a plain head, Llama's module names, post-norms, and q/k norms over all heads at once."""

    name = "olmo2"
    model_types = ("olmo2",)
    vllm_sync = ("olmo2",)
    pipeline_gap = ""

    def tp_layer_plan(self, layer) -> dict:
        return whole_width_qk_norms(llama_layer_plan(layer))


TEXT = register(LlamaLike())
register(Granite())
register(Cohere())
register(Gemma())
register(Gemma3())
register(Phi3())
register(Olmo2())
