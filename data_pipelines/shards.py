"""Write webdataset shards reproducibly: same samples in, same bytes out.

Members get ``mtime=0`` so a seed fully determines the files, and each shard is written to a
temporary name and renamed, so an interrupted run never leaves a half shard that looks whole.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from typing import Any

import webdataset as wds
from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    """Encode an image as PNG (low compression: shards are written often and read often)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def json_bytes(obj: Any) -> bytes:
    """Encode a JSON member (compact, UTF-8, keys in insertion order)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def interleaved_sample(key: str, items: Iterable[str | Image.Image | bytes]) -> dict[str, bytes]:
    """A document (``str`` and image items in order) as one interleaved webdataset sample.

    Image ``i`` is stored as member ``KEY.img{i}.png`` (already-encoded bytes are stored as given,
    named ``.png`` only if they are PNG, else ``.jpg``).
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits on it)")
    texts: list[str | None] = []
    names: list[str | None] = []
    sample: dict[str, bytes] = {}
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            names.append(None)
            continue
        data = png_bytes(item) if isinstance(item, Image.Image) else bytes(item)
        ext = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpg"
        name = f"img{sum(n is not None for n in names)}.{ext}"
        texts.append(None)
        names.append(name)
        sample[name] = data
    sample["json"] = json_bytes({"texts": texts, "images": names})
    sample["__key__"] = key
    return sample


def write_shards(
    samples: Iterable[dict[str, Any]], out_dir: str, prefix: str, shard_size: int
) -> list[str]:
    """Write ``samples`` (dicts with ``__key__`` and bytes members) as ``prefix-000000.tar``, ...

    Returns the shard paths. ``shard_size`` is the number of samples per shard.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    writer, count = None, 0
    for sample in samples:
        if writer is None or count == shard_size:
            _close(writer, paths)
            path = os.path.join(out_dir, f"{prefix}-{len(paths):06d}.tar")
            writer, count = wds.TarWriter(path + ".tmp", encoder=False, mtime=0), 0
            writer.final_path = path
        writer.write(sample)
        count += 1
    _close(writer, paths)
    return paths


def _close(writer, paths: list[str]) -> None:
    if writer is None:
        return
    writer.close()
    os.replace(writer.final_path + ".tmp", writer.final_path)
    paths.append(writer.final_path)
