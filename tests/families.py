"""A tiny random model of each supported text family, written to a folder with the tiny tokenizer.

Sizes: vocabulary 96, hidden 128, 4 heads of 32 (vLLM's CPU attention takes head_dim 32), 2 KV heads, so
that tensor parallelism of 2 divides every split. Each family keeps what makes it itself, at values that
matter on short test sequences: sliding windows of 4 tokens, a final logit softcap of 2 (Gemma), logits
divided by 8 (Granite), a logit scale of 0.5 and per-head q/k norms (Cohere), q/k norm weights that differ per
head, NoPE layers (SmolLM3), 4 experts routed top-2 with the
router aux loss on (mixture of experts). Weights are drawn with a larger spread than the families' defaults so that
the distributions are far from uniform and the logit transforms change them visibly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import write_tokenizer

VOCAB = 96
_SIZES = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=4, pad_token_id=0, initializer_range=0.2)

_MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.05, tie_word_embeddings=False)

_GROUPED = dict(n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=64,
                first_k_dense_replace=lambda n: min(1, n - 1), n_group=2, topk_group=1, routed_scaling_factor=2.5,
                norm_topk_prob=True, tie_word_embeddings=False)

# family -> (config class, extra config arguments)
FAMILIES = {
    "llama": ("LlamaConfig", dict(head_dim=32, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(head_dim=32, sliding_window=4, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),  # q/k/v with bias
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False)),  # per-head q/k norms
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                    final_logit_softcapping=2.0, attn_logit_softcapping=5.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                             layer_types=lambda n: ["sliding_attention", "full_attention"] * n,
                                             final_logit_softcapping=2.0)),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),  # fused qkv_proj and gate_up_proj
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False)),
    "granite": ("GraniteConfig", dict(logits_scaling=8.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                      attention_multiplier=0.05, tie_word_embeddings=False)),
    "cohere": ("CohereConfig", dict(logit_scale=0.5, use_qk_norm=True)),  # Command R+'s per-head q/k norms
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=lambda n: [1, 0] * n, tie_word_embeddings=True)),
    # mixture of experts: 4 experts, top-2, the router aux loss on (the naive step adds it as transformers does)
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=32, num_experts=4, moe_intermediate_size=64, norm_topk_prob=True,
                                         **_MOE)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                         **_MOE)),  # a shared expert beside the routed ones
    "mixtral": ("MixtralConfig", dict(head_dim=32, num_local_experts=4, **_MOE)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, **_MOE)),  # q/k norms over all heads
    # sigmoid routing, bias-corrected and group-limited (2 groups of 2, top-1 group), a shared expert, a dense first
    # layer (none in a 1-layer model: vLLM's GLM-4.5 needs a sparse one); no aux loss: their balancing moves the
    # bias, outside the gradient (as transformers trains them). GLM-4.5 rotates half of each head, q/k norms on
    "glm4_moe": ("Glm4MoeConfig", dict(head_dim=32, **_GROUPED, use_qk_norm=True, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # DeepSeek-V3's latent attention: q/k heads of 32 (16 rotated), values of 16; keys and values come per head
    # (num_key_value_heads is the head count, as in its folders); vLLM reads topk_method / scoring_func
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32,
                                             qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, **_GROUPED,
                                             topk_method="noaux_tc", scoring_func="sigmoid")),
    # attention sinks, sliding / full layers, YaRN rope, experts with biases and a clamped SwiGLU, a router bias
    "gpt_oss": ("GptOssConfig", dict(head_dim=32, num_local_experts=4, sliding_window=4, swiglu_limit=2.0,
                                     layer_types=lambda n: ["sliding_attention", "full_attention"] * n,
                                     rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                      "original_max_position_embeddings": 64}, **_MOE)),
    # hybrid: Gated DeltaNet (linear attention: 2 key heads, 4 value heads of 32, a conv1d of 4) and gated full
    # attention (q/k norms, a quarter of each head rotated) alternating; 4 experts top-2 and a gated shared expert
    "qwen3_next": ("Qwen3NextConfig", dict(head_dim=32, num_experts=4, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=64, norm_topk_prob=True,
                                           linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
                                           linear_value_head_dim=32, linear_conv_kernel_dim=4,
                                           layer_types=lambda n: ["linear_attention", "full_attention"] * n,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "partial_rotary_factor": 0.25}, **_MOE)),
}


def _of_depth(value, layers: int):
    """A config value that depends on the depth (a callable of it): per-layer lists cut to ``layers``."""
    if not callable(value):
        return value
    value = value(layers)
    return value[:layers] if isinstance(value, list) else value


def family_config(family: str, layers: int = 2, **overrides):
    import transformers

    cls, extra = FAMILIES[family]
    extra = {k: _of_depth(v, layers) for k, v in {**extra, **overrides}.items()}
    return getattr(transformers, cls)(num_hidden_layers=layers, **{**_SIZES, **extra})


# the vision-language families (tests/tiny.py's fixtures; their image paths are tested in test_multimodal.py)
VISION = {"qwen2_vl": dict(), "qwen2_5_vl": dict(qwen25=True), "llava": dict(), "internvl": dict(),
          "qwen3_vl": dict(layers=3),
          "qwen3_vl_moe": dict(moe=True, layers=3)}  # (at least 3 layers: a pipeline's first stage holds 2 DeepStack ones)
ALL = [*FAMILIES, *VISION]


def write_family(folder: Path, family: str, *, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """A random ``family`` model (its own transformers class) and the tiny tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM

    if family in VISION:
        from transformers import AutoModelForImageTextToText

        from tiny import write_internvl, write_llava, write_qwen2vl, write_qwen3vl

        write = {"llava": write_llava, "internvl": write_internvl, "qwen3_vl": write_qwen3vl,
                 "qwen3_vl_moe": write_qwen3vl}.get(family, write_qwen2vl)
        kw = dict(VISION[family])
        write(folder, layers=max(layers, kw.pop("layers", 0)), seed=seed, **kw)  # (a fixture's "layers": the least)
        # the fixture's lm_head (std 0.02) gives logits of std ~0.1, nearly uniform: scaled, their distributions
        # differ visibly, so that a sample or a loss taken from the wrong one shows
        model = AutoModelForImageTextToText.from_pretrained(str(folder))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10.0)
        model.save_pretrained(str(folder))
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, layers, **overrides), dtype=torch.float32)
    with torch.no_grad():  # q/k norm weights start at 1: made to differ per head, so a split that mixes heads shows
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith(("sinks", "proj_bias")):  # GPT-OSS's sinks (std 0.2) and expert biases (0): made to matter
                p.add_(torch.randn_like(p))
        for name, b in model.named_buffers():  # the routing bias starts at 0: made to change which experts win
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand_like(b) * 0.5)
    model.generation_config.update(pad_token_id=0, eos_token_id=4, bos_token_id=1)
    model.save_pretrained(str(folder))
    write_tokenizer(folder, VOCAB)
    return folder


def frozen_prefixes(model) -> list[str]:
    """What the frozen-parameter tests freeze: the input embedding (the lm_head too, where it is tied) and the
    first decoder layer, by their names in ``model``."""
    from gkd.models import adapter_for, unwrap

    names = {id(m): n for n, m in unwrap(model).named_modules()}
    return [names[id(unwrap(model).get_input_embeddings())],
            names[id(adapter_for(model).decoder(model).layers[0])] + "."]
