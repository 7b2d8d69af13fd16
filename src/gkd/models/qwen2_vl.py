"""Qwen2-VL and Qwen2.5-VL: a ViT whose patches a merger folds into the Qwen2 text decoder's embeddings.

Images become ``pixel_values`` (all rows' patches, concatenated) and ``image_grid_thw`` (one row per
image); an image is ``grid.prod() / merge_size**2`` ``<|image_pad|>`` tokens. The model also wants
``mm_token_type_ids`` (1 on image tokens), which is position-aligned, so it is made from the padded
input ids at each forward rather than carried in the batch.
"""

from __future__ import annotations

import torch

from gkd.models.adapter import Adapter, register, unwrap, vision_outside_units
from gkd.models.text import llama_layer_plan
from gkd.models.images import VLLM_NEEDS_TORCHVISION, ImageProcessing, load_image_processor


class Qwen2VL(Adapter):
    name = "qwen2-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vllm_blocker = VLLM_NEEDS_TORCHVISION
    auto_class = "AutoModelForImageTextToText"
    pipeline_gap = ""

    def prepare(self, model, inputs: dict) -> dict:
        if "position_ids" in inputs and "attention_mask" not in inputs and inputs["position_ids"].dim() == 2:
            return self._packed(model, inputs)
        if "image_grid_thw" not in inputs or "mm_token_type_ids" in inputs:
            return inputs
        return {**inputs, "mm_token_type_ids": self._token_types(model, inputs["input_ids"])}

    @staticmethod
    def _token_types(model, ids: torch.Tensor) -> torch.Tensor:
        config = unwrap(model).config
        return (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()

    def _packed(self, model, inputs: dict) -> dict:
        """Packed rows (--packing): each sequence's M-RoPE positions as if it were alone (the model's own
        get_rope_index over the sequences one per row, images in order), with the sequence positions first,
        [4, B, T]: the text model confines attention to each sequence by that first row."""
        from gkd.models.packed import segments

        ids, text = inputs["input_ids"], inputs["position_ids"]
        mrope = text[None].expand(3, -1, -1).clone()
        if "image_grid_thw" in inputs:
            spans = [(b, start, end) for b in range(ids.shape[0]) for start, end in segments(text[b])]
            width = max(end - start for _, start, end in spans)
            alone = ids.new_zeros(len(spans), width)
            mask = ids.new_zeros(len(spans), width)
            for i, (b, start, end) in enumerate(spans):
                alone[i, :end - start], mask[i, :end - start] = ids[b, start:end], 1
            made, _ = unwrap(model).model.get_rope_index(alone, mm_token_type_ids=self._token_types(model, alone),
                                                         image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
            for i, (b, start, end) in enumerate(spans):
                mrope[:, b, start:end] = made[:, i, :end - start]
        rest = {k: v for k, v in inputs.items() if k != "position_ids"}
        if "image_grid_thw" in inputs:
            rest["mm_token_type_ids"] = self._token_types(model, ids)
        return {**rest, "position_ids": torch.cat([text[None], mrope])}

    def stage_position_ids(self, model, ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict):
        """The M-RoPE positions [3, B, T] of rows with images and each row's offset of its next positions
        [B, 1], as the model's forward and generate make them (its own get_rope_index; plain text: None)."""
        if "image_grid_thw" not in inputs:
            return None, None
        return unwrap(model).model.get_rope_index(ids, mm_token_type_ids=self._token_types(model, ids),
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=attention_mask)

    def stage_positions(self, position_ids: torch.Tensor):
        """As the text model splits them: [3, B, T] M-RoPE positions rotate and leave the masks to the 2D mask;
        [4, B, T] lead with the text positions; plain [B, T] positions serve all three sections."""
        if position_ids.dim() == 3:
            return (position_ids[0] if position_ids.shape[0] == 4 else None), position_ids[-3:]
        return position_ids, position_ids

    def placeholder_ids(self, model) -> list[int]:
        config = unwrap(model).config
        return [config.image_token_id, config.video_token_id]

    def blank_image(self, model) -> dict:
        v = unwrap(model).config.vision_config
        m = v.spatial_merge_size
        weight = next(self.vision_tower(model).parameters())
        patches = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size**2, dtype=weight.dtype,
                              device=weight.device)
        return {"pixel_values": patches, "image_grid_thw": torch.tensor([[1, m, m]], device=weight.device)}

    def tp_layer_plan(self, layer) -> dict:
        return llama_layer_plan(layer)

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        return vision_outside_units(self, model)

    def vision_tower(self, model) -> torch.nn.Module:
        return unwrap(model).model.visual

    def aligner(self, model) -> torch.nn.Module:
        visual = unwrap(model).model.visual
        return visual.merger if visual is not None else None  # (None on a later pipeline stage)

    def image_processing(self, folder, tokenizer, config) -> ImageProcessing:
        processor = load_image_processor(folder, str(folder))
        merge = processor.merge_size

        def counts(inputs: dict) -> list[int]:
            return [int(n) for n in inputs["image_grid_thw"].prod(-1) // merge**2]

        return ImageProcessing(processor, config.image_token_id, counts, ("pixel_values", "image_grid_thw"))


QWEN2_VL = register(Qwen2VL())
