"""Loader throughput: samples/s of the full pipeline (read, decode, tokenise, transform, collate).

    python -m benchmarks.data [--workers 0 1 2] [--batches 40]

Writes a small synthetic world to a temp directory, trains a tokenizer on its corpus and times
``build_loader`` over the docs + pairs mixture. Reports samples/s overall and per worker.
Shared flags (``benchmarks.common.benchmark_parser``): ``--threads`` (default 1: the workers
are the parallelism measured), ``--seed``, ``--smoke``; no model runs, so the device, dtype,
repeat and shape flags do not apply.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from benchmarks.common import benchmark_parser, setup_process  # noqa: E402
from data_pipelines.loading import SourceConfig, build_loader  # noqa: E402
from data_pipelines.synthetic import WorldConfig, synthesize  # noqa: E402
from data_pipelines.tokenizer import train_tokenizer  # noqa: E402
from flamingo_kit.from_scratch import image_processor  # noqa: E402


def samples_per_second(root: str, tokenizer, processor, workers: int, batches: int,
                       batch_size: int, seed: int) -> float:
    """Samples/s of ``batches`` batches after the first (start-up is not throughput)."""
    sources = [SourceConfig("docs", "interleaved", os.path.join(root, "interleaved")),
               SourceConfig("pairs", "pairs", os.path.join(root, "pairs"), weight=0.5)]
    loader = build_loader(sources, tokenizer, processor, batch_size=batch_size, max_length=256,
                          max_images=8, seed=seed, num_workers=workers)
    iterator = iter(loader)
    next(iterator)  # start-up (worker fork, first shard open) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Write the world, time the loader per worker count, print and return samples/s."""
    parser = benchmark_parser(__doc__, model=False, matched=False)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224,
                        help="vision tower input size (the synthetic images are 64 px)")
    args = parser.parse_args(argv)
    world = WorldConfig(seed=args.seed, n_pairs=600, n_docs=300, n_anchored=0, n_corpus=500, n_eval=1,
                        n_episodes=0, shard_size=100)
    if args.smoke:
        args.workers, args.batches, args.batch_size, args.image_size = [0], 2, 2, 32
        world = WorldConfig(seed=args.seed, n_pairs=20, n_docs=10, n_anchored=0, n_corpus=50, n_eval=1,
                            n_episodes=0, shard_size=10)
    setup_process(args)
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        synthesize(root, world)
        with open(os.path.join(root, "corpus.txt")) as f:
            tokenizer = train_tokenizer(f.read().splitlines())
        processor = image_processor(args.image_size)
        for workers in args.workers:
            rates[workers] = samples_per_second(root, tokenizer, processor, workers,
                                                args.batches, args.batch_size, args.seed)
            print(f"workers={workers}: {rates[workers]:8.1f} samples/s  "
                  f"({rates[workers] / max(workers, 1):.1f} per worker)")
    return rates


if __name__ == "__main__":
    main()
