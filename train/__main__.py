"""Command line: ``python -m train --config FILE [key=value ...]`` (also ``flamingo-train``).

The config is validated before torch or deepspeed are imported, so a typo fails in a fraction
of a second with the key's name. The ``deepspeed`` launcher's ``--local_rank`` is accepted and
ignored (the rank comes from the environment it also sets).
"""

from __future__ import annotations

import argparse
import os
import sys

from train.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``--config FILE`` plus free ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        prog="flamingo-train",
        description="Train a flamingo-kit stage (lm, contrastive, flamingo) with DeepSpeed.",
    )
    parser.add_argument("--config", help="YAML config (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=3e-4")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the config, then run the recipe; returns the process exit code."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"flamingo-train: {error}", file=sys.stderr)
        return 2
    # Launchers do not limit intra-op threads; N processes x all cores each thrash a CPU host.
    if int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from train.checkpoint import CheckpointError
    from train.distributed import shutdown_distributed
    from train.recipe import run

    try:
        final = run(cfg)
    except (ConfigError, CheckpointError) as error:  # a resume that cannot be accepted
        print(f"flamingo-train: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"flamingo-train: exported {final}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
