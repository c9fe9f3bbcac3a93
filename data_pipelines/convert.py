"""Convert MMC4 and OBELICS-style interleaved corpora into our interleaved webdataset shards.

MMC4 rows: ``{"text_list": [sentence, ...], "image_info": [{"image_name", "matched_text_index",
"matched_sim"}, ...]}``. Each image is placed right before the sentence it was matched to, so an
image matched to sentence 2 stays at sentence 2 whatever its position in ``image_info``; images
matched to the same sentence keep their ``image_info`` order.

OBELICS-style rows: ``{"texts": [str|null, ...], "images": [path|null, ...]}``, already in
reading order. Image paths are read relative to ``image_dir`` (URLs cannot be fetched offline
and count as missing).

Image bytes are copied unchanged after checking that they decode; unusable images are dropped
and counted, and documents left without images are counted and not written.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from data_pipelines.shards import interleaved_sample, write_shards


class ImageName(str):
    """An item that names an image file (as opposed to a text item)."""


class ImageFiles:
    """Reads and checks image files under a directory, counting what cannot be used."""

    def __init__(self, image_dir: str, counts: Counter):
        self.image_dir = image_dir
        self.counts = counts

    def load(self, name: str) -> bytes | None:
        """The file's bytes if it is a decodable image, else ``None`` (and a count)."""
        path = name if os.path.isabs(name) else os.path.join(self.image_dir, name)
        if "://" in name or not os.path.isfile(path):
            self.counts["missing_image"] += 1
            return None
        with open(path, "rb") as f:
            data = f.read()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception:  # PIL raises many types for bad bytes
            self.counts["corrupt_image"] += 1
            return None
        return data


def _join_sentences(items: list) -> list:
    """Separate consecutive text items by a space; text right after an image starts bare."""
    out: list = []
    for item in items:
        if isinstance(item, str) and out and isinstance(out[-1], str):
            out[-1] = out[-1] + " " + item
        else:
            out.append(item)
    return out


def mmc4_items(row: dict, sim_threshold: float | None = None) -> list:
    """An MMC4 row -> items (sentences and image *names*) with images at their sentences."""
    sentences = row.get("text_list")
    if not isinstance(sentences, list):
        raise ValueError("MMC4 row needs a 'text_list' list")
    by_sentence: dict[int, list[str]] = {}
    for info in row.get("image_info") or []:
        if sim_threshold is not None and info.get("matched_sim", 0.0) < sim_threshold:
            continue
        index = info.get("matched_text_index")
        if not isinstance(index, int) or not 0 <= index < len(sentences):
            continue
        by_sentence.setdefault(index, []).append(info["image_name"])
    items: list = []
    for i, sentence in enumerate(sentences):
        items += [ImageName(name) for name in by_sentence.get(i, [])]
        items.append(sentence)
    return items


def obelics_items(row: dict) -> list:
    """An OBELICS-style row -> items (texts and image *names*) in reading order."""
    texts, images = row.get("texts"), row.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise ValueError("OBELICS row needs 'texts' and 'images' lists of equal length")
    return [ImageName(img) if img is not None else txt for txt, img in zip(texts, images)
            if img is not None or txt]


def resolve_images(items: Sequence, files: ImageFiles, max_images: int | None = None) -> list:
    """Replace image names by their bytes; drop unusable images and images over the limit."""
    out: list = []
    n_images = 0
    for item in items:
        if isinstance(item, ImageName):
            if max_images is not None and n_images >= max_images:
                continue
            data = files.load(item)
            if data is not None:
                out.append(data)
                n_images += 1
        elif item:
            out.append(item)
    return _join_sentences(out)


def _rows(paths: Sequence[str], counts: Counter) -> Iterator[dict]:
    """Parsed jsonl rows; lines that are not JSON objects are counted as ``bad_row``."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict):
                    yield row
                else:
                    counts["bad_row"] += 1


FORMATS = {"mmc4": "MMC4 jsonl", "obelics": "OBELICS-style jsonl"}


def _documents(rows: Iterable[dict], fmt: str, files: ImageFiles, counts: Counter,
               sim_threshold: float | None, max_images: int | None) -> Iterator[dict]:
    for row in rows:
        try:
            names = (mmc4_items(row, sim_threshold) if fmt == "mmc4"
                     else obelics_items(row))
        except (ValueError, KeyError, TypeError):
            counts["bad_row"] += 1
            continue
        items = resolve_images(names, files, max_images)
        n_images = sum(isinstance(i, bytes) for i in items)
        if n_images == 0:
            counts["no_images"] += 1
            continue
        counts["documents"] += 1
        counts["images"] += n_images
        yield interleaved_sample(f"{fmt}{counts['documents'] - 1:09d}", items)


def convert(
    fmt: str,
    inputs: Sequence[str],
    image_dir: str,
    out_dir: str,
    shard_size: int = 1000,
    sim_threshold: float | None = None,
    max_images: int | None = None,
    prefix: str = "docs",
) -> dict[str, int]:
    """Convert jsonl files of ``fmt`` (``mmc4`` or ``obelics``) into interleaved shards.

    Returns counts: ``documents``, ``images``, ``shards`` and every reason something was dropped.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    counts: Counter = Counter()
    files = ImageFiles(image_dir, counts)
    rows = _rows(inputs, counts)
    docs = _documents(tqdm(rows, desc=f"convert {fmt}", unit="doc", disable=None), fmt, files,
                      counts, sim_threshold, max_images)
    counts["shards"] = len(write_shards(docs, out_dir, prefix, shard_size))
    return dict(counts)
