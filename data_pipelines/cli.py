"""``flamingo-data``: write the synthetic world, convert corpora, inspect shards.

    flamingo-data synth --out data/synth --seed 0 --n-pairs 2000 --n-docs 1000
    flamingo-data convert --format mmc4 --input docs.jsonl --images imgs/ --out shards/
    flamingo-data inspect data/synth/interleaved --kind interleaved -n 3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from data_pipelines.synthetic.world import WorldConfig


def _synth(args: argparse.Namespace) -> None:
    from data_pipelines.synthetic import synthesize

    config = WorldConfig(seed=args.seed, n_pairs=args.n_pairs, n_docs=args.n_docs,
                         n_anchored=args.n_anchored, n_corpus=args.n_corpus, n_eval=args.n_eval,
                         n_episodes=args.n_episodes, n_heldout=args.n_heldout,
                         image_size=args.image_size, shard_size=args.shard_size)
    summary = synthesize(args.out, config)
    print(json.dumps(summary, indent=2))


def _convert(args: argparse.Namespace) -> None:
    from data_pipelines.convert import convert

    counts = convert(args.format, args.input, args.images, args.out, shard_size=args.shard_size,
                     sim_threshold=args.sim_threshold, max_images=args.max_images,
                     prefix=args.prefix)
    print(json.dumps(counts, indent=2, sort_keys=True))


def _inspect(args: argparse.Namespace) -> None:
    from data_pipelines.inspection import inspect_shards, sample_texts

    if args.tokenizer:
        from transformers import AutoTokenizer

        from flamingo_kit.backbones import require_local_dir

        tokenizer = AutoTokenizer.from_pretrained(require_local_dir(args.tokenizer, "--tokenizer"))
    else:
        from data_pipelines.tokenizer import train_tokenizer

        print("(no --tokenizer given: using a small tokenizer trained on these shards)")
        tokenizer = train_tokenizer(sample_texts(args.shards, args.kind), vocab_size=300)
    print(inspect_shards(args.shards, args.kind, tokenizer, n=args.n,
                         max_length=args.max_length, max_images=args.max_images))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flamingo-data`` (one sub-command per job)."""
    parser = argparse.ArgumentParser(prog="flamingo-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = WorldConfig()

    synth = sub.add_parser("synth", help="write the synthetic world (shards, corpus, eval sets)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--n-pairs", type=int, default=defaults.n_pairs,
                       help="image-caption pairs")
    synth.add_argument("--n-docs", type=int, default=defaults.n_docs,
                       help="interleaved documents")
    synth.add_argument("--n-anchored", type=int, default=defaults.n_anchored,
                       help="label-binding documents that sometimes say the class word")
    synth.add_argument("--n-corpus", type=int, default=defaults.n_corpus,
                       help="text-only corpus lines")
    synth.add_argument("--n-eval", type=int, default=defaults.n_eval,
                       help="images per eval split and task")
    synth.add_argument("--n-episodes", type=int, default=defaults.n_episodes,
                       help="label-binding episodes")
    synth.add_argument("--n-heldout", type=int, default=defaults.n_heldout,
                       help="held-out pairs and documents (each), never trained on")
    synth.add_argument("--image-size", type=int, default=defaults.image_size)
    synth.add_argument("--shard-size", type=int, default=defaults.shard_size,
                       help="samples per shard")
    synth.set_defaults(run=_synth)

    conv = sub.add_parser("convert", help="MMC4 / OBELICS-style jsonl -> interleaved shards")
    conv.add_argument("--format", required=True, choices=["mmc4", "obelics"])
    conv.add_argument("--input", required=True, nargs="+", help="jsonl file(s)")
    conv.add_argument("--images", required=True, help="directory holding the image files")
    conv.add_argument("--out", required=True, help="output directory for the shards")
    conv.add_argument("--prefix", default="docs", help="shard name prefix")
    conv.add_argument("--shard-size", type=int, default=1000)
    conv.add_argument("--sim-threshold", type=float, default=None,
                      help="MMC4: drop images whose matched_sim is below this")
    conv.add_argument("--max-images", type=int, default=None, help="images kept per document")
    conv.set_defaults(run=_convert)

    insp = sub.add_parser("inspect", help="print decoded samples with their token/label layout")
    insp.add_argument("shards", help="directory, brace pattern or .tar path")
    insp.add_argument("--kind", default="interleaved", choices=["interleaved", "pairs"])
    insp.add_argument("-n", type=int, default=3, help="samples to show")
    insp.add_argument("--tokenizer", default=None, help="local tokenizer directory")
    insp.add_argument("--max-length", type=int, default=256)
    insp.add_argument("--max-images", type=int, default=8)
    insp.set_defaults(run=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flamingo-data`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as exn:
        print(f"flamingo-data {args.command}: error: {exn}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
