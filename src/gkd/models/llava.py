"""LLaVA-style models: a CLIP-like vision tower, a projector, a Llama-shaped text decoder.

An image is resized to the tower's square input (``pixel_values`` [images, 3, H, W]) and becomes one
``<image>`` token per patch, plus one for the CLS feature when the config keeps it
(``vision_feature_select_strategy`` "full").
"""

from __future__ import annotations

import torch

from gkd.models.adapter import Adapter, register, unwrap, vision_outside_units
from gkd.models.text import llama_layer_plan
from gkd.models.images import VLLM_NEEDS_TORCHVISION, ImageProcessing, load_image_processor


class Llava(Adapter):
    name = "llava"
    model_types = ("llava",)
    vllm_blocker = VLLM_NEEDS_TORCHVISION
    auto_class = "AutoModelForImageTextToText"
    pipeline_gap = ""

    def placeholder_ids(self, model) -> list[int]:
        return [unwrap(model).config.image_token_index]

    def blank_image(self, model) -> dict:
        v = unwrap(model).config.vision_config
        weight = next(self.vision_tower(model).parameters())
        pixels = torch.zeros(1, v.num_channels, v.image_size, v.image_size, dtype=weight.dtype, device=weight.device)
        return {"pixel_values": pixels}

    def tp_layer_plan(self, layer) -> dict:
        return llama_layer_plan(layer)

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        return vision_outside_units(self, model)

    def vision_tower(self, model) -> torch.nn.Module:
        return unwrap(model).model.vision_tower

    def aligner(self, model) -> torch.nn.Module:
        return unwrap(model).model.multi_modal_projector

    def image_processing(self, folder, tokenizer, config) -> ImageProcessing:
        processor = load_image_processor(folder, str(folder))
        patch = config.vision_config.patch_size
        cls = 1 if config.vision_feature_select_strategy == "full" else 0

        def counts(inputs: dict) -> list[int]:
            h, w = inputs["pixel_values"].shape[-2:]
            return [(h // patch) * (w // patch) + cls] * inputs["pixel_values"].shape[0]

        return ImageProcessing(processor, config.image_token_index, counts, ("pixel_values",))


LLAVA = register(Llava())
