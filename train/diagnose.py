"""``python -m train.diagnose RUN_OR_MODEL_DIR --data ...``: does a saved model use its images?

Reports the numbers the Flamingo stage logs during training (``train.diagnostics``): held-out
loss with true, permuted and blank images, image reliance (nats per supervised token), the
tanh of every gate and the across-image spread of the vision tower's and the resampler's
outputs. Works on any directory written by ``FlamingoModel.save_pretrained`` (with its
processor), or a run directory (its ``final/`` model and, unless ``--data`` says otherwise,
the held-out sources and sizes of its ``config.yaml``).

``--history`` prints instead what the trainer logged in ``RUN/metrics.jsonl``: image reliance,
its per-source parts, the gates and the resampler spread at every measured step.

``--data`` is repeatable: ``KIND:SHARDS`` (``pairs:data/synth/heldout/pairs``,
``interleaved:dir/docs-{000000..000003}.tar``) or a synthetic world root written by
``flamingo-data synth`` (its ``heldout/`` pairs and documents).

    python -m train.diagnose runs/flamingo --data data/synth
    python -m train.diagnose runs/flamingo/final --data pairs:my/heldout/pairs --json
    python -m train.diagnose runs/flamingo --history
"""

from __future__ import annotations

import argparse
import json
import os
import sys

SOURCE_KINDS = ("pairs", "interleaved")
SOURCE_NAMES = {"pairs": "pairs", "interleaved": "docs"}


def parse_data(spec: str) -> list[tuple[str, str, str]]:
    """``(name, kind, shards)`` of the held-out sources that one ``--data`` value names."""
    kind, sep, shards = spec.partition(":")
    if sep and kind in SOURCE_KINDS:
        return [(SOURCE_NAMES[kind], kind, shards)]
    heldout = os.path.join(spec, "heldout")
    if os.path.isdir(heldout):
        return [(SOURCE_NAMES[k], k, os.path.join(heldout, k)) for k in SOURCE_KINDS
                if os.path.isdir(os.path.join(heldout, k))]
    raise ValueError(f"--data {spec!r}: give KIND:SHARDS with KIND in {list(SOURCE_KINDS)}, or "
                     "a synthetic world root that has a heldout/ directory")


def resolve(path: str) -> tuple[str, object | None]:
    """``(model directory, run config or None)`` for a run or a model directory."""
    from train.config import load_config

    if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isdir(
            os.path.join(path, "final")):
        return os.path.join(path, "final"), load_config(os.path.join(path, "config.yaml"))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    raise ValueError(f"{path}: neither a run directory (config.yaml + final/) nor a saved model "
                     "(config.json)")


def format_report(values: dict[str, float], n_samples: int) -> str:
    """Human-readable report, one number per line."""
    lines = [f"held-out samples              {n_samples}"]
    for key in ("heldout_loss", "heldout_loss_permuted", "heldout_loss_blank"):
        lines.append(f"{key:<29}{values[key]:.4f} nats/token")
    for key in sorted(k for k in values if k.startswith(("image_reliance", "blank_reliance"))):
        lines.append(f"{key:<29}{values[key]:+.4f} nats/token")
    gates = ", ".join(f"{values[k]:+.4f}" for k in sorted(values) if k.startswith("gate_attn_"))
    ff = ", ".join(f"{values[k]:+.4f}" for k in sorted(values) if k.startswith("gate_ff_"))
    lines.append(f"{'tanh(attn gates)':<29}{gates}")
    lines.append(f"{'tanh(ff gates)':<29}{ff}")
    for key in ("vision_spread", "perceiver_spread"):
        lines.append(f"{key:<29}{values[key]:.3f}")
    return "\n".join(lines)


def format_history(records: list[dict]) -> str:
    """One line per measured step of a run's metrics: loss, image reliance, gates, spread."""
    rows = [r for r in records if "image_reliance" in r]
    if not rows:
        return "no image-reliance measurements in this run (logging.image_reliance_every=0?)"
    sources = sorted(k.removeprefix("image_reliance_") for k in rows[-1]
                     if k.startswith("image_reliance_"))
    lines = [f"{'step':>6} {'loss':>7} {'reliance':>9} " + " ".join(f"{s:>8}" for s in sources)
             + f" {'max|gate|':>9} {'spread':>7}"]
    for r in rows:
        gate = max((abs(v) for k, v in r.items() if k.startswith("gate_")), default=0.0)
        parts = " ".join(f"{r.get(f'image_reliance_{s}', float('nan')):>8.3f}" for s in sources)
        lines.append(f"{r['step']:>6} {r['loss']:>7.3f} {r['image_reliance']:>9.3f} {parts} "
                     f"{gate:>9.3f} {r['perceiver_spread']:>7.3f}")
    for r in records:
        if r.get("event") == "warning_images_ignored":
            lines.append(f"step {r['step']}: {r['message']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Load the model and held-out data, print the diagnostics; exit code 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m train.diagnose",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="run directory or saved model directory")
    parser.add_argument("--data", action="append", default=[],
                        help="held-out data: KIND:SHARDS or a synthetic world root (repeatable)")
    parser.add_argument("--samples", type=int, help="held-out samples (default: the run's "
                        "logging.image_reliance_samples, else 32)")
    parser.add_argument("--batch-size", type=int, help="rows per forward pass; images are "
                        "permuted within a batch (default: the run's micro batch size, else 8)")
    parser.add_argument("--seed", type=int, help="held-out sampling seed (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON object to FILE")
    parser.add_argument("--history", action="store_true",
                        help="print the measurements logged during training (run directory)")
    args = parser.parse_args(argv)
    if args.history:
        from train.metrics import read_metrics

        try:
            print(format_history(read_metrics(args.path)))
        except FileNotFoundError as error:
            print(f"train.diagnose: {error}; --history needs a run directory", file=sys.stderr)
            return 2
        return 0
    try:
        model_dir, run_cfg = resolve(args.path)
        specs = [s for spec in args.data for s in parse_data(spec)]
        if not specs and run_cfg is None:
            raise ValueError("no held-out data: pass --data KIND:SHARDS or a world root")
        # Without overrides a run is measured exactly as its trainer measured it.
        samples = args.samples or (run_cfg.logging.image_reliance_samples if run_cfg else 32)
        batch_size = args.batch_size or (run_cfg.deepspeed.micro_batch_size if run_cfg else 8)
        seed = args.seed if args.seed is not None else (run_cfg.seed if run_cfg else 0)
        import torch

        from data_pipelines.loading import SourceConfig
        from flamingo_kit import FlamingoModel, FlamingoProcessor
        from train import diagnostics
        from train.stages.flamingo import source_configs

        sources = ([SourceConfig(name=n, kind=k, shards=s) for n, k, s in specs] if specs else
                   source_configs(run_cfg.flamingo.heldout_sources, run_cfg.flamingo.data_root))
        model = FlamingoModel.from_pretrained(model_dir)
        processor = FlamingoProcessor.from_pretrained(model_dir)
        data = diagnostics.load_heldout(
            sources, processor.tokenizer, processor.image_processor, samples,
            batch_size=batch_size, max_length=processor.max_length or 256,
            max_images=processor.max_images or 8, seed=seed)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"train.diagnose: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(seed)
    values = diagnostics.diagnose(model, model, data)
    report = {"model": os.path.abspath(model_dir), "samples": data.n_samples, **values}
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save, "w") as f:
            json.dump(report, f, indent=1)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"model {os.path.abspath(model_dir)}")
        print(format_report(values, data.n_samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
