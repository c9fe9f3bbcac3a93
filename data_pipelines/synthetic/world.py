"""Write the whole synthetic world for a seed: corpus, pair shards, document shards, eval sets.

Layout under ``out`` (see the shared formats): ``corpus.txt``, ``pairs/pairs-*.tar``,
``interleaved/docs-*.tar``, ``binding_anchored/docs-*.tar`` (label-binding documents whose
demonstrations sometimes say the class word: a curriculum source for binding),
``eval/{captioning,vqa,classification,label_binding}/``,
``heldout/{pairs,interleaved}/`` (the same kinds of training data, never trained on: the
trainer's image-reliance diagnostics read them) and a ``world.json`` summary. Each part
draws from its own seeded RNG, and all images come from one uniqueness registry, so the output
is a pure function of the arguments and no image repeats.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass

from tqdm import tqdm

from data_pipelines.shards import interleaved_sample, json_bytes, png_bytes, write_shards
from data_pipelines.synthetic.documents import (
    anchored_binding_doc,
    corpus_line,
    interleaved_document,
)
from data_pipelines.synthetic.evalsets import write_eval_sets
from data_pipelines.synthetic.language import caption
from data_pipelines.synthetic.scenes import UniqueImages


@dataclass
class WorldConfig:
    """Size knobs of the synthetic world (defaults write a small world in seconds)."""

    seed: int = 0
    n_pairs: int = 2000
    n_docs: int = 2500
    n_anchored: int = 6000  # anchored label-binding documents (binding_anchored/)
    n_corpus: int = 80000  # text lines; enough that LM pretraining never repeats an episode
    n_eval: int = 100  # images per eval split (train and test) for each task
    n_episodes: int = 20  # label-binding episodes
    n_heldout: int = 64  # held-out pairs and held-out documents (each) for diagnostics
    image_size: int = 64
    shard_size: int = 250

    def __post_init__(self):
        for name in ("n_pairs", "n_docs", "n_anchored", "n_corpus", "n_eval", "n_episodes", "n_heldout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")


def _pairs(rng: random.Random, images: UniqueImages, n: int):
    for i in tqdm(range(n), desc="pairs", leave=False, disable=None):
        objects, image = images.draw(rng)
        text = caption(objects)
        yield {
            "__key__": f"pair{i:08d}",
            "png": png_bytes(image),
            "txt": text.encode("utf-8"),
            "json": json_bytes({"caption": text, "objects": [o.as_dict() for o in objects]}),
        }


def _documents(rng: random.Random, images: UniqueImages, n: int, kinds: dict):
    for i in tqdm(range(n), desc="documents", leave=False, disable=None):
        kind, items = interleaved_document(rng, images)
        kinds[kind] = kinds.get(kind, 0) + 1
        yield interleaved_sample(f"doc{i:08d}", items)


def _anchored_documents(rng: random.Random, images: UniqueImages, n: int):
    for i in tqdm(range(n), desc="anchored binding documents", leave=False, disable=None):
        yield interleaved_sample(f"anchored{i:08d}", anchored_binding_doc(rng, images))


def synthesize(out: str, config: WorldConfig | None = None) -> dict:
    """Write the world to ``out``; returns (and saves as ``world.json``) a summary."""
    config = config or WorldConfig()
    os.makedirs(out, exist_ok=True)
    images = UniqueImages(config.image_size)

    def rng(part: str) -> random.Random:
        return random.Random(f"{config.seed}/{part}")

    corpus_rng = rng("corpus")
    with open(os.path.join(out, "corpus.txt"), "w", encoding="utf-8") as f:
        for _ in tqdm(range(config.n_corpus), desc="corpus", leave=False, disable=None):
            f.write(corpus_line(corpus_rng) + "\n")
    pair_shards = write_shards(_pairs(rng("pairs"), images, config.n_pairs),
                               os.path.join(out, "pairs"), "pairs", config.shard_size)
    kinds: dict[str, int] = {}
    doc_shards = write_shards(_documents(rng("docs"), images, config.n_docs, kinds),
                              os.path.join(out, "interleaved"), "docs", config.shard_size)
    eval_images = write_eval_sets(os.path.join(out, "eval"), images, config.seed, config.n_eval,
                                  config.n_episodes)
    # Written last so the parts above stay what they were before held-out data existed.
    heldout_shards = write_shards(_pairs(rng("heldout/pairs"), images, config.n_heldout),
                                  os.path.join(out, "heldout", "pairs"), "pairs",
                                  config.shard_size)
    heldout_shards += write_shards(
        _documents(rng("heldout/docs"), images, config.n_heldout, {}),
        os.path.join(out, "heldout", "interleaved"), "docs", config.shard_size)
    anchored_shards = write_shards(
        _anchored_documents(rng("binding_anchored"), images, config.n_anchored),
        os.path.join(out, "binding_anchored"), "docs", config.shard_size)
    summary = {
        "config": asdict(config),
        "pair_shards": [os.path.relpath(p, out) for p in pair_shards],
        "doc_shards": [os.path.relpath(p, out) for p in doc_shards],
        "heldout_shards": [os.path.relpath(p, out) for p in heldout_shards],
        "anchored_shards": [os.path.relpath(p, out) for p in anchored_shards],
        "doc_kinds": dict(sorted(kinds.items())),
        "eval_images": eval_images,
    }
    with open(os.path.join(out, "world.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
