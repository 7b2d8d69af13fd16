"""GPT-OSS: a mixture-of-experts decoder with attention sinks.

What sets it apart from the other MoE families, and where gkd follows it:

- attention sinks: a learned logit per head in each softmax's denominator. Of transformers' attention paths only
  eager (and flash / flex kernels gkd does not run on CPU) honour them; SDPA has no sink, so the family runs on
  eager attention (``attention``), whose block-diagonal mask also keeps packed rows apart. Under tensor
  parallelism the sinks are split with their heads (``head_parameters``).
- alternating sliding / full attention (``layer_types``) and YaRN rope: inside the model's forward; pipeline
  stages build the masks by layer kind as the base adapter does, one rotary embedding for every layer.
- experts stored transposed ([E, H, 2I] with gate and up interleaved, [E, I, H]), each with a bias, and a
  clamped SwiGLU (alpha, limit): gkd.parallel.expert runs the module's own gate on its rows and shards the
  biases over the expert-parallel ranks with their experts.
- a router (``mlp.router``) with a bias, returning (logits, top-k weights, expert ids) as the others do.

Its Hugging Face folders hold the module's own tensors (transformers converts nothing for it when it saves),
so checkpoints and exports write the state dict as it is. vLLM 0.32 (CPU) loads and runs the family exactly from a
folder, but its in-place reload, which the weight sync uses, leaves the sinks and experts stale (``vllm_blocker``).
"""

from __future__ import annotations

import torch

from gkd.models.adapter import Adapter, register
from gkd.models.moe import MixtureOfExperts, _base


def _mlps(layers) -> list[torch.nn.Module]:
    """The sparse blocks of decoder ``layers`` (a list, or a pipeline stage's ModuleDict share): every layer's."""
    return [layer.mlp for layer in (layers.values() if isinstance(layers, torch.nn.ModuleDict) else layers)]


class GptOss(MixtureOfExperts):
    name = "gpt-oss"
    model_types = ("gpt_oss",)
    vllm_sync = ()
    # measured: vLLM's engine built from the folder gives HF's greedy tokens and prompt log-probs; after the trainer's
    # first sync, at unchanged weights, it no longer does (the reload warns "OAIAttention / GptOssRoutedExperts:
    # Failed to load weights")
    vllm_blocker = ("vLLM 0.32's in-place weight reload skips GPT-OSS's sinks and experts: its gpt_oss loader copies "
                    "them with param.data.copy_, not their weight_loader, so the reload counts nothing loaded for "
                    "them and puts back tensors that no longer hold them")

    def attention(self, config) -> str | None:
        return "eager"  # the only transformers path on CPU that adds the sinks to the softmax

    def experts(self, model) -> list[torch.nn.Module]:
        return [_base(mlp.experts) for mlp in _mlps(self.decoder(model).layers)]

    def routers_of(self, layers) -> list[torch.nn.Module]:
        return [mlp.router for mlp in _mlps(layers)]

    def checkpoint_tensors(self, name: str, tensor: torch.Tensor):
        return Adapter.checkpoint_tensors(self, name, tensor)  # the folders hold the fused tensors as they are

    def tp_layer_plan(self, layer) -> dict:
        from gkd.models.text import llama_layer_plan

        plan = {k: v for k, v in llama_layer_plan(layer).items() if not k.startswith("mlp.")}
        plan.update({"self_attn": "head_parameters",  # the sinks, split with the heads of this rank's q columns
                     "mlp.router": "replicated", "mlp.experts": "replicated_experts"})
        return plan


GPT_OSS = register(GptOss())
