"""Show decoded samples with their token and label layout: data is debugged by looking at it.

Each sample prints its key, its images, and the token sequence cut into runs that do or do not
carry a loss, e.g.::

    doc00000003  interleaved  2 images [64x64, 64x64]  31 tokens, 22 with loss
      ---- 'intro text. <image>'
      LOSS 'Output: a small red circle.<|endofchunk|>'
      ---- '<image>'
      ...
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import islice

import torch
import webdataset as wds

from data_pipelines.documents import DECODERS, SkipSample
from data_pipelines.sequence import IGNORE_INDEX, SequenceBuilder, TokenizedDocument
from data_pipelines.shard_access import expand_shards, shard_samples
from data_pipelines.streams import read_error_reason


def label_runs(doc: TokenizedDocument, tokenizer) -> list[tuple[bool, str]]:
    """Split a document into maximal runs of supervised / unsupervised tokens, decoded."""
    supervised = doc.labels != IGNORE_INDEX
    if len(supervised) == 0:
        return []
    boundaries = (torch.nonzero(supervised[1:] != supervised[:-1]).flatten() + 1).tolist()
    starts, ends = [0, *boundaries], [*boundaries, len(supervised)]
    return [
        (bool(supervised[s]), tokenizer.decode(doc.input_ids[s:e], skip_special_tokens=False))
        for s, e in zip(starts, ends)
    ]


def describe(key: str, kind: str, doc: TokenizedDocument, tokenizer) -> str:
    """Text block for one sample (see the module docstring)."""
    sizes = ", ".join(f"{img.width}x{img.height}" for img in doc.images)
    lines = [f"{key}  {kind}  {len(doc.images)} images [{sizes}]  {len(doc.input_ids)} tokens, "
             f"{doc.n_supervised} with loss"]
    lines += [f"  {'LOSS' if loss else '----'} {text!r}" for loss, text in label_runs(doc,
                                                                                         tokenizer)]
    return "\n".join(lines)


def _shard_paths(shards: str | Sequence[str]) -> list[str]:
    paths = expand_shards(shards, "inspect")  # local shards only
    if not paths:
        raise ValueError(f"no shards found for {shards!r}; pass a directory of .tar files, a "
                         "brace pattern or a list of paths")
    return paths


def inspect_shards(
    shards: str | Sequence[str],
    kind: str,
    tokenizer,
    n: int = 3,
    max_length: int = 256,
    max_images: int | None = 8,
) -> str:
    """The first ``n`` usable samples of ``shards`` as text, then the skip counts met on the way."""
    if kind not in DECODERS:
        raise ValueError(f"kind must be one of {sorted(DECODERS)}, got {kind!r}")
    paths = _shard_paths(shards)
    counts: Counter = Counter()

    def count(exn: BaseException) -> bool:
        counts[read_error_reason(exn)] += 1
        return True

    builder = SequenceBuilder(tokenizer, max_length=max_length, max_images=max_images)
    samples = shard_samples(paths, count, "inspect")
    blocks = []
    for raw in samples:
        try:
            doc = builder(DECODERS[kind](raw))
        except SkipSample as skip:
            counts[skip.reason] += 1
            continue
        blocks.append(describe(raw.get("__key__", "?"), kind, doc, tokenizer))
        if len(blocks) == n:
            break
    blocks.append(f"skipped: {dict(counts) if counts else 'none'}")
    return "\n\n".join(blocks)


def sample_texts(shards: str | Sequence[str], kind: str, limit: int = 200) -> list[str]:
    """Texts of the first ``limit`` samples (to train a throwaway tokenizer for inspection)."""
    texts = []
    for raw in islice(shard_samples(_shard_paths(shards), wds.ignore_and_continue, "inspect"),
                      limit):
        try:
            texts += [item for item in DECODERS[kind](raw) if isinstance(item, str)]
        except SkipSample:
            continue
    return texts
