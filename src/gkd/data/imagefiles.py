"""Image references in dataset rows -> decoded PIL images: a path (relative to the dataset file), a data
URI or bare base64, ``{"bytes"/"path"}`` as the datasets library stores images, or a PIL image."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from gkd.errors import GKDError


def open_image(ref, base: Path | None, where: str):
    """The RGB image ``ref`` names, decoded now (a bad file fails here, naming the row and the path)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return _decode(ref["bytes"], where, "the image bytes")
        ref = ref.get("path") or ref.get("image") or ref.get("url")
    if not isinstance(ref, str) or not ref:
        raise GKDError(f"{where}: an image must be a path, a data URI / base64 string or {{'bytes'|'path'}}, "
                       f"got {type(ref).__name__}")
    if ref.startswith("data:"):
        return _decode(_b64(ref.partition(",")[2], where, ref[:30]), where, ref[:30] + "...")
    if ref.startswith(("http://", "https://")):
        raise GKDError(f"{where}: image {ref}: URLs are not fetched; download the image and give its path")
    path = Path(ref).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if path.is_file():
        try:
            with Image.open(path) as im:
                return _rgb(im, str(path))
        except Image.DecompressionBombError as e:
            raise GKDError(f"{where}: image {path}: too large to decode ({e})") from None
        except (OSError, UnidentifiedImageError) as e:
            raise GKDError(f"{where}: image {path}: unreadable ({type(e).__name__}: {e})") from None
    if len(ref) > 64 and "/" not in ref[:8]:  # bare base64, not a short path
        try:
            return _decode(base64.b64decode(ref, validate=True), where, ref[:30] + "...")
        except (binascii.Error, ValueError):
            pass
    raise GKDError(f"{where}: image {path}: no such file")


def _b64(text: str, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GKDError(f"{where}: image {what}...: not valid base64") from None


def _decode(data: bytes, where: str, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _rgb(im, what)
    except Image.DecompressionBombError as e:
        raise GKDError(f"{where}: image {what}: too large to decode ({e})") from None
    except (OSError, UnidentifiedImageError) as e:
        raise GKDError(f"{where}: image {what}: unreadable ({type(e).__name__})") from None


def _rgb(im, source: str):
    """The image in RGB, remembering where it came from (``info['gkd_source']``, for messages)."""
    out = im.convert("RGB")
    out.info["gkd_source"] = source
    return out


def image_name(image) -> str:
    """Where an image came from (its file, or the start of its data), and its size."""
    return f"{image.info.get('gkd_source', 'image')} ({image.width} x {image.height} pixels)"


def to_base64_png(image) -> str:
    """An image as base64 PNG (lossless: the server decodes exactly the pixels we process)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
