"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's image inputs and M-RoPE (interleaved), plus DeepStack.

The vision tower (learned position grid interpolated per image, patch 16) returns the merged features and,
from some of its layers, DeepStack features (one more merger each). The model adds the k-th of those to the
hidden states at the image tokens after decoder layer k. Positions, image tokens and ``mm_token_type_ids``
are Qwen2-VL's, so its adapter serves; what differs is said here.
"""

from __future__ import annotations

import torch

from gkd.models.adapter import register, unwrap
from gkd.models.moe import QwenMoE
from gkd.models.qwen2_vl import Qwen2VL


class Qwen3VL(Qwen2VL):
    name = "qwen3-vl"
    model_types = ("qwen3_vl",)
    pipeline_gap = ""

    def layer_inputs(self, image_features, image_tokens: torch.Tensor, embeds: torch.Tensor) -> dict:
        """DeepStack: the image-token mask and, per feature level, one row per image token (images in order)."""
        deep = [torch.cat(list(f)).to(embeds.device, embeds.dtype) for f in image_features.deepstack_features]
        return {"visual_pos_masks": image_tokens, "deepstack_visual_embeds": deep}

    def stage_first_layers(self, config) -> int:
        """The layers DeepStack adds to stay on the first stage, which runs the vision tower."""
        return len(config.vision_config.deepstack_visual_indexes)

    def after_layer(self, i: int, hidden: torch.Tensor, given: dict) -> torch.Tensor:
        """As the text model: the i-th DeepStack features added at the image tokens after layer i."""
        deep = given.get("deepstack_visual_embeds")
        if deep is None or i >= len(deep):
            return hidden
        mask = given["visual_pos_masks"]
        return hidden.index_put((mask,), hidden[mask] + deep[i])

    def blank_outputs(self, model) -> list:
        """The blank image's merged and DeepStack features: every vision weight a batch with images reaches."""
        out = unwrap(model).model.get_image_features(**self.blank_image(model))
        return [out.pooler_output, out.deepstack_features]


class Qwen3VLMoe(Qwen3VL):
    name = "qwen3-vl-moe"
    model_types = ("qwen3_vl_moe",)
    experts = QwenMoE.experts
    routers_of = QwenMoE.routers_of
    router_aux_loss_coef = QwenMoE.router_aux_loss_coef
    tp_layer_plan = QwenMoE.tp_layer_plan


QWEN3_VL = register(Qwen3VL())
QWEN3_VL_MOE = register(Qwen3VLMoe())
