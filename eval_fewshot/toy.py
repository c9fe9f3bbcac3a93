"""A toy evaluation world: the synthetic world's evaluation sets at a tiny size, and a tiny
untrained model.

Used by the tests, the evaluation benchmark and smoke runs of the CLI. The datasets are the
synthetic world's (:func:`data_pipelines.synthetic.evalsets.write_eval_sets`: layout
``ROOT/eval/{captioning,vqa,classification,label_binding}``, real benchmark formats) with a few
small images each, so every task reader and metric runs end to end in seconds on a CPU.
"""

from __future__ import annotations

import os
import random

from data_pipelines.synthetic.documents import corpus_line
from data_pipelines.synthetic.evalsets import write_eval_sets
from data_pipelines.synthetic.scenes import UniqueImages


def write_toy_eval_sets(root: str, seed: int = 0, n_train: int = 12, n_test: int = 6,
                        n_episodes: int = 2, image_size: int = 32) -> str:
    """Write ``root/eval/...``: ``n_train`` demonstration and ``n_test`` query images per task
    and ``n_episodes`` label-binding episodes; returns ``root``."""
    write_eval_sets(os.path.join(root, "eval"), UniqueImages(image_size), seed,
                    {"train": n_train, "test": n_test}, n_episodes)
    return root


def build_toy_model(out_dir: str, seed: int = 0, image_size: int = 32, hidden_size: int = 64,
                    num_layers: int = 2, open_gates: bool = True) -> str:
    """Save an untrained tiny FlamingoModel + processor to ``out_dir``; returns ``out_dir``.

    ``open_gates`` sets the cross-attention gates to 1: at their initial 0 the images have no
    effect at all, which would hide image-handling mistakes in checks built on this model.
    """
    from data_pipelines.tokenizer import train_tokenizer
    from flamingo_kit import FlamingoProcessor, from_scratch

    rng = random.Random(f"{seed}/toy tokenizer")
    tokenizer = train_tokenizer([corpus_line(rng) for _ in range(300)], vocab_size=300)
    processor = FlamingoProcessor(tokenizer, from_scratch.image_processor(image_size))
    lm = from_scratch.build_lm("llama", seed=seed, vocab_size=len(tokenizer),
                               hidden_size=hidden_size, num_layers=num_layers, max_positions=1024)
    vision = from_scratch.build_vision("clip", seed=seed, image_size=image_size, hidden_size=32,
                                       num_layers=1, num_heads=2)
    model = from_scratch.build_flamingo(lm, vision, seed, processor)
    if open_gates:
        from_scratch.open_gates(model)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
