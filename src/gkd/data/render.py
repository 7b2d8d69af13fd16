"""A row's images: placeholders in the messages matched with the row's image references, decoded once.

Two row forms: ms-swift's (``"images": [...]`` beside the messages, an ``<image>`` tag in the text where
each goes) and Hugging Face's typed parts (``{"type": "image", "image": PATH}`` in a message's content;
a part without a reference takes the next of ``images``). Either way the messages come out as typed
parts, which the model's chat template renders with one placeholder token per image.
"""

from __future__ import annotations

from pathlib import Path

from gkd.data.imagefiles import open_image
from gkd.errors import GKDError

IMAGE_TAG = "<image>"


def text_of(content) -> str:
    """A message content's text (typed parts' text joined)."""
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")


def _ref(part: dict):
    """An image part's own reference, or None (then it takes the next of 'images'); the datasets library
    stores a missing image as {'bytes': None, 'path': None}."""
    ref = part.get("image") or part.get("path") or part.get("url")
    if isinstance(ref, dict) and not (ref.get("bytes") or ref.get("path")):
        return None
    return ref


def _parts(text: str) -> list[dict]:
    """ms-swift's tagged text as typed parts."""
    out: list[dict] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            out.append({"type": "image"})
        if piece.strip():
            out.append({"type": "text", "text": piece})
    return out


def row_images(where: str, row: dict, messages: list[dict], base: Path | None,
               multimodal: bool) -> tuple[list[dict], list]:
    """(messages with typed image parts, the row's decoded images in order). A text-only model's rows
    must have no images; for one that reads images, every placeholder needs exactly one image."""
    listed = row.get("images")
    if listed is None:
        listed = []
    if isinstance(listed, (str, dict)):
        listed = [listed]
    if not isinstance(listed, list):
        raise GKDError(f"{where}: 'images' must be a list of paths (or base64 strings), got {type(listed).__name__}")
    typed = any(isinstance(m["content"], list) and any(p["type"] == "image" for p in m["content"]) for m in messages)
    if not multimodal:
        if listed or typed:
            raise GKDError(f"{where}: the row has images but the model is text-only; use a vision-language "
                           "model or drop the images")
        return [{**m, "content": text_of(m["content"])} for m in messages], []
    out, placeholders = [], 0
    for m in messages:
        content = _parts(m["content"]) if isinstance(m["content"], str) and IMAGE_TAG in m["content"] else m["content"]
        if isinstance(content, list):
            for part in content:
                if part["type"] != "image":
                    continue
                if _ref(part) is None:
                    placeholders += 1
                if m["role"] == "assistant" and m is messages[-1]:
                    raise GKDError(f"{where}: the completion (last assistant turn) has an image; images belong "
                                   "to the prompt")
        out.append({**m, "content": content})
    if placeholders != len(listed):
        raise GKDError(f"{where}: {placeholders} image placeholder(s) ({IMAGE_TAG} tags or image parts without a "
                       f"path) for {len(listed)} image(s) in 'images'")
    # images in placeholder order: inline references where they stand, listed ones fill the others
    images, pending = [], iter(listed)
    for m in out:
        if isinstance(m["content"], list):
            for part in m["content"]:
                if part["type"] == "image":
                    ref = _ref(part)
                    images.append(open_image(ref if ref is not None else next(pending), base, where))
    return [{**m, "content": [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                              for p in m["content"]] if isinstance(m["content"], list) else m["content"]}
            for m in out], images
