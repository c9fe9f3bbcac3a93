"""Loader throughput: samples/s of the full pipeline (read, decode, tokenise, transform, collate).

    python benchmarks/data.py [--workers 0 1 2] [--batches 40]

Writes a small synthetic world to a temp directory, trains a tokenizer on its corpus and times
``build_loader`` over the docs + pairs mixture. Reports samples/s overall and per worker.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from data_pipelines.loading import SourceConfig, build_loader  # noqa: E402
from data_pipelines.synthetic import WorldConfig, synthesize  # noqa: E402
from data_pipelines.tokenizer import train_tokenizer  # noqa: E402
from flamingo_kit.from_scratch import image_processor  # noqa: E402


def samples_per_second(root: str, tokenizer, processor, workers: int, batches: int,
                       batch_size: int) -> float:
    sources = [SourceConfig("docs", "interleaved", os.path.join(root, "interleaved")),
               SourceConfig("pairs", "pairs", os.path.join(root, "pairs"), weight=0.5)]
    loader = build_loader(sources, tokenizer, processor, batch_size=batch_size, max_length=256,
                          max_images=8, seed=0, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # start-up (worker fork, first shard open) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224,
                        help="vision tower input size (the synthetic images are 64 px)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        synthesize(root, WorldConfig(n_pairs=600, n_docs=300, n_corpus=500, n_eval=1,
                                     n_episodes=0, shard_size=100))
        tokenizer = train_tokenizer(open(os.path.join(root, "corpus.txt")).read().splitlines())
        processor = image_processor(args.image_size)
        for workers in args.workers:
            rate = samples_per_second(root, tokenizer, processor, workers, args.batches,
                                      args.batch_size)
            per_worker = rate / max(workers, 1)
            print(f"workers={workers}: {rate:8.1f} samples/s  ({per_worker:.1f} per worker)")


if __name__ == "__main__":
    main()
