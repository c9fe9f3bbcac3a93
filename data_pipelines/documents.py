"""Decode raw webdataset samples (dicts of member bytes) into documents, or say why not.

Interleaved sample: ``KEY.json`` = ``{"texts": [str|null, ...], "images": [member|null, ...]}``
(same length, exactly one of the two non-null at each index) plus the image members named in
``images`` (``KEY.img0.png`` is named ``img0.png`` or the full ``KEY.img0.png``).
Pair sample: an image member (``png``/``jpg``/``jpeg``/``webp``) and ``txt``, or ``json`` with a
``caption``. A document is a list of ``str`` and ``PIL.Image`` items in reading order.

Every failure raises :class:`SkipSample` with a short reason; the loader counts reasons so no
sample is ever lost without a trace.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key (e.g. ``corrupt_image``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes fully (truncated files fail here, not later) to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as exn:  # PIL raises many types for bad bytes
        raise SkipSample("corrupt_image", f"{name}: {exn}") from exn


def decode_json(data: bytes, name: str) -> Any:
    """Parse JSON bytes, raising ``SkipSample('bad_json')`` on any error."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exn:
        raise SkipSample("bad_json", f"{name}: {exn}") from exn


def _member(sample: dict, name: str) -> bytes:
    """Find an image member by its name with or without the ``KEY.`` prefix."""
    key = sample.get("__key__", "")
    for candidate in (name, name[len(key) + 1 :] if name.startswith(key + ".") else None):
        if candidate is not None and isinstance(sample.get(candidate.lower()), bytes):
            return sample[candidate.lower()]
    raise SkipSample("missing_image", f"{key}: no member {name!r}")


def decode_interleaved(sample: dict) -> list:
    """Interleaved webdataset sample -> document (list of ``str`` and ``PIL.Image``)."""
    key = sample.get("__key__", "?")
    if "json" not in sample:
        raise SkipSample("missing_json", key)
    meta = decode_json(sample["json"], key)
    texts = meta.get("texts") if isinstance(meta, dict) else None
    images = meta.get("images") if isinstance(meta, dict) else None
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise SkipSample("bad_json", f"{key}: needs 'texts' and 'images' lists of equal length")
    items: list = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise SkipSample("bad_json", f"{key}: index {i} must hold exactly one of text/image")
        if text is not None:
            if not isinstance(text, str):
                raise SkipSample("bad_json", f"{key}: texts[{i}] is not a string")
            items.append(text)
        else:
            items.append(decode_image(_member(sample, str(image)), f"{key}.{image}"))
    return items


def decode_pair(sample: dict) -> list:
    """Image-caption webdataset sample -> document ``[image, caption]``."""
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise SkipSample("missing_image", key)
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as exn:
            raise SkipSample("bad_text", key) from exn
    elif "json" in sample:
        meta = decode_json(sample["json"], key)
        caption = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise SkipSample("missing_caption", key)
    else:
        raise SkipSample("missing_caption", key)
    if not caption.strip():
        raise SkipSample("missing_caption", key)
    return [decode_image(sample[ext], f"{key}.{ext}"), caption]


DECODERS = {"interleaved": decode_interleaved, "pairs": decode_pair}
