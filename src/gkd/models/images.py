"""Images as model inputs: a family's image processor, and how many image tokens each image becomes.

The model's own processor does the work: ``AutoProcessor`` where it loads (its image processor is
used), else the image processor alone from the folder (e.g. Qwen2-VL's processor cannot be built without
torchvision; its image processor can). Text goes through the tokenizer's chat template, which renders
one placeholder token per image; :meth:`ImageProcessing.expand` then repeats each placeholder as many
times as the processor would, on token ids.
"""

from __future__ import annotations

from typing import Callable

import torch

from gkd.errors import GKDError

# why vLLM does not sample these families here, in the refusal and in `gkd models` (a cause outside gkd)
VLLM_NEEDS_TORCHVISION = ("vLLM 0.32's vision-language classes import torchvision, whose PyPI wheels are CUDA builds "
                          "that do not load beside torch's CPU build (scripts/setup_vllm.sh removes it)")


class ImageProcessing:
    def __init__(self, image_processor, image_token_id: int, counts: Callable[[dict], list[int]],
                 keys: tuple[str, ...], count_keys: tuple[str, ...] = (), around: tuple[int, int] | None = None):
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self._counts = counts  # image tokens per image, from the processor's outputs (keys and count_keys)
        self.keys = keys  # the model inputs it makes (e.g. pixel_values, image_grid_thw)
        self.count_keys = count_keys  # outputs that count tokens only (e.g. InternVL's tiles per image)
        self.around = around  # (start, end) token ids the processor puts around each image's tokens

    def __call__(self, images: list, where: str = "images") -> dict[str, torch.Tensor]:
        """The model inputs of one row's images (rows are later concatenated along dim 0). An image the
        processor refuses (e.g. Qwen2-VL's aspect ratio over 200) is a GKDError naming it and ``where``."""
        return self.process(images, where)[0]

    def process(self, images: list, where: str = "images") -> tuple[dict[str, torch.Tensor], list[int]]:
        """(the model inputs of one row's images, the image tokens of each)."""
        if not images:
            return {}, []
        try:
            out = self.image_processor(images=images, return_tensors="pt")
        except ValueError as e:
            raise GKDError(f"{where}: {self._refused(images, e)}") from None
        model_inputs = {k: out[k] for k in self.keys}
        return model_inputs, self._counts({**model_inputs, **{k: out[k] for k in self.count_keys if k in out}})

    def _refused(self, images: list, error: Exception) -> str:
        from gkd.data.imagefiles import image_name

        for image in images:  # which one: the first the processor refuses alone
            try:
                self.image_processor(images=[image], return_tensors="pt")
            except ValueError as e:
                error = e
                break
        else:
            image = None
        what = f"image {image_name(image)}" if image is not None else f"the {len(images)} images"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{what}: this model's image processor refuses it ({first})"

    def expand(self, ids: list[int], counts: list[int], where: str) -> list[int]:
        """``ids`` with the k-th image placeholder repeated counts[k] times (between the start and end tokens
        where the family has them)."""
        found = ids.count(self.image_token_id)
        if found != len(counts):
            raise GKDError(f"{where}: the rendered prompt has {found} image placeholder(s) for {len(counts)} "
                           "image(s)")
        start, end = ([self.around[0]], [self.around[1]]) if self.around else ([], [])
        out, k = [], 0
        for t in ids:
            if t == self.image_token_id:
                out += start + [t] * counts[k] + end
                k += 1
            else:
                out.append(t)
        return out

    def same_as(self, other: "ImageProcessing | None") -> bool:
        """Whether ``other`` makes the same inputs from the same images (then they are shared)."""
        return (other is not None and type(other.image_processor) is type(self.image_processor)
                and other.image_processor.to_dict() == self.image_processor.to_dict() and other.keys == self.keys)


def load_image_processor(folder, what: str):
    """The folder's image processor: the processor's where AutoProcessor builds, else the image processor."""
    from transformers import AutoImageProcessor, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(folder))
        if getattr(processor, "image_processor", None) is not None:
            return processor.image_processor
    except Exception:  # noqa: BLE001 - e.g. a video processor that needs torchvision: the image part still works
        pass
    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise GKDError(f"model {what}: cannot load its image processor (preprocessor_config.json): "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
