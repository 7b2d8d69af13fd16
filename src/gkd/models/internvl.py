"""InternVL (3 and 3.5 in transformers' layout): an InternViT vision tower, a pixel-shuffle projector and a
Qwen2 / Qwen3 (or Llama-shaped) text decoder.

The image processor cuts an image into tiles of the tower's input size (with a thumbnail, up to its
``max_patches``; ``pixel_values`` [tiles, 3, H, W], ``num_patches`` per image); each tile becomes
(H / patch)² × downsample_ratio² ``<IMG_CONTEXT>`` tokens (the class token dropped, the pixel shuffle folding
each 2 x 2 block into one token), and the processor puts ``<img>`` before and ``</img>`` after an image's
tokens: the chat template renders one ``<IMG_CONTEXT>`` per image, which gkd expands the same way.
"""

from __future__ import annotations

import torch

from gkd.errors import GKDError
from gkd.models.adapter import register, unwrap
from gkd.models.images import ImageProcessing, load_image_processor
from gkd.models.llava import Llava


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class InternVL(Llava):
    """LLaVA's layout (model.vision_tower, model.multi_modal_projector, model.language_model) with its own
    placeholder, tile size and image processing."""

    name = "internvl"
    model_types = ("internvl",)

    def placeholder_ids(self, model) -> list[int]:
        return [unwrap(model).config.image_token_id]

    def blank_image(self, model) -> dict:
        v = unwrap(model).config.vision_config
        weight = next(self.vision_tower(model).parameters())
        h, w = _pair(v.image_size)
        return {"pixel_values": torch.zeros(1, v.num_channels, h, w, dtype=weight.dtype, device=weight.device)}

    def image_processing(self, folder, tokenizer, config) -> ImageProcessing:
        processor = load_image_processor(folder, str(folder))
        (h, w), (ph, pw) = _pair(config.vision_config.image_size), _pair(config.vision_config.patch_size)
        per_tile = int((h // ph) * (w // pw) * config.downsample_ratio ** 2)

        def counts(inputs: dict) -> list[int]:
            tiles = inputs.get("num_patches")
            tiles = [1] * inputs["pixel_values"].shape[0] if tiles is None else torch.as_tensor(tiles).tolist()
            return [per_tile * t for t in tiles]

        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>")]
        if tokenizer.unk_token_id in ids or None in ids:
            raise GKDError(f"model {folder}: its tokenizer has no <img> / </img> tokens, which InternVL puts around "
                           "an image's tokens")
        return ImageProcessing(processor, config.image_token_id, counts, ("pixel_values",), count_keys=("num_patches",),
                               around=(ids[0], ids[1]))


INTERNVL = register(InternVL())
