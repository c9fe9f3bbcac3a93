"""``flamingo-convert``: import other implementations' checkpoints.

    flamingo-convert openflamingo --checkpoint checkpoint.pt --lm LM_DIR --vision CLIP_DIR \\
        --out OUT_DIR [--cross-attn-every N] [--tokenizer DIR] [--dtype float32] \\
        [--vision-features last_hidden_state|post_layernorm] [--self-contained]
"""

from __future__ import annotations

import argparse
import sys

import torch

from flamingo_kit.config import VISION_FEATURES
from flamingo_kit.convert.openflamingo import REPORT_NAME, convert_openflamingo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "auto": None}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one subcommand per source format)."""
    parser = argparse.ArgumentParser(
        prog="flamingo-convert",
        description="Import checkpoints of other Flamingo implementations into flamingo-kit's "
                    "format.")
    formats = parser.add_subparsers(dest="format", required=True)
    of = formats.add_parser(
        "openflamingo",
        help="an OpenFlamingo checkpoint.pt (+ its LM and CLIP directories) -> flamingo-kit",
        description="Convert an OpenFlamingo checkpoint.pt into a directory that "
                    "FlamingoModel.from_pretrained and FlamingoProcessor.from_pretrained load.",
    )
    of.add_argument("--checkpoint", required=True,
                    help="OpenFlamingo checkpoint.pt (read with torch.load(weights_only=True))")
    of.add_argument("--lm", required=True,
                    help="local Hugging Face directory of the language model it was trained on")
    of.add_argument("--vision", required=True,
                    help="local Hugging Face CLIP directory (CLIPVisionModel or CLIPModel) of its "
                         "vision encoder, e.g. openai/clip-vit-large-patch14 for ViT-L-14 openai")
    of.add_argument("--out", required=True, help="new output directory")
    of.add_argument("--cross-attn-every", type=int, default=None,
                    help="OpenFlamingo's cross_attn_every_n_layers; inferred from the checkpoint, "
                         "checked against this value when given")
    of.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --lm)")
    of.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype of the LM (default float32, as OpenFlamingo loaded it; auto: as "
                         "stored in --lm)")
    of.add_argument("--vision-features", choices=VISION_FEATURES, default="last_hidden_state",
                    help="CLIP patch tokens before (last_hidden_state: open_clip < 2.23, what the "
                         "released models were trained with) or after the final LayerNorm "
                         "(post_layernorm: OpenFlamingo run with open_clip >= 2.23)")
    of.add_argument("--self-contained", action="store_true",
                    help="also copy the vision tower (and an unchanged LM) into --out, so the "
                         "directory can be moved on its own")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the converter; errors exit with status 2 and a one-paragraph message."""
    args = build_parser().parse_args(argv)
    try:
        report = convert_openflamingo(
            args.checkpoint, args.lm, args.vision, args.out,
            cross_attn_every=args.cross_attn_every, tokenizer=args.tokenizer,
            dtype=DTYPES[args.dtype], vision_features=args.vision_features,
            self_contained=args.self_contained,
        )
    except (ValueError, OSError) as error:  # ConversionError is a ValueError
        print(f"flamingo-convert: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report)
    print(f"wrote {args.out} (this report: {args.out}/{REPORT_NAME})")


if __name__ == "__main__":
    main()
