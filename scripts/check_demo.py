"""Check the learning targets of ``make demo`` on the k-shot tables written by ``flamingo-eval``.

    python scripts/check_demo.py runs/eval

Reads ``synth_vqa.json``, ``synth_label_binding.json`` and ``synth_captioning.json`` from the
directory and checks that the model learned in context:

- VQA accuracy at 4 shots is at least 20 points above 0 shots;
- 2-way label binding (fresh nonsense names, chance 50%) reaches 70% top-1 at 4 shots;
- captioning CIDEr-D is higher at 4 shots than at 0 shots.

Prints one PASS/FAIL line per target with the numbers; exits 1 if any target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

SHOTS = 4
VQA_MIN_GAIN = 20.0
BINDING_MIN_TOP1 = 70.0


@dataclass(frozen=True)
class Target:
    """One learning target: the eval file it reads and how it judges the k-shot table."""

    name: str
    task: str
    judge: Callable[[dict[int, dict[str, float]]], tuple[bool, str]]


def shot_means(report: dict) -> dict[int, dict[str, float]]:
    """``{shots: {metric: mean over trials}}`` from one ``flamingo-eval`` JSON report."""
    return {int(row["shots"]): row["mean"] for row in report["results"]}


def _scores(table: dict[int, dict[str, float]], metric: str, shots: int) -> tuple[float, float]:
    """The metric at 0 and at ``shots`` shots; a clear error when the table lacks them."""
    missing = [k for k in (0, shots) if k not in table]
    if missing:
        raise ValueError(f"the eval table has no rows for shots {missing}; rerun flamingo-eval "
                         f"with --shots including 0,{shots} (it has {sorted(table)})")
    return table[0][metric], table[shots][metric]


def vqa_gain(table: dict[int, dict[str, float]]) -> tuple[bool, str]:
    """VQA accuracy gain from 0 to ``SHOTS`` shots, at least ``VQA_MIN_GAIN`` points."""
    zero, k = _scores(table, "vqa_accuracy", SHOTS)
    return k - zero >= VQA_MIN_GAIN, (f"VQA acc {zero:.1f} (0-shot) -> {k:.1f} ({SHOTS}-shot), "
                                      f"gain {k - zero:+.1f} (need >= +{VQA_MIN_GAIN:.0f})")


def binding_accuracy(table: dict[int, dict[str, float]]) -> tuple[bool, str]:
    """2-way label-binding top-1 (rank) accuracy at ``SHOTS`` shots, chance is 50%."""
    zero, k = _scores(table, "top1", SHOTS)
    exact = table[SHOTS].get("exact_match", float("nan"))
    return k >= BINDING_MIN_TOP1, (f"label binding top-1 {zero:.1f} (0-shot) -> {k:.1f} "
                                   f"({SHOTS}-shot) (need >= {BINDING_MIN_TOP1:.0f}, chance 50); "
                                   f"exact match {exact:.1f}")


def caption_rise(table: dict[int, dict[str, float]]) -> tuple[bool, str]:
    """Captioning CIDEr-D strictly higher at ``SHOTS`` shots than at 0 shots."""
    zero, k = _scores(table, "cider", SHOTS)
    return k > zero, f"captioning CIDEr-D {zero:.1f} (0-shot) -> {k:.1f} ({SHOTS}-shot)"


TARGETS = (
    Target("vqa_in_context_gain", "synth_vqa", vqa_gain),
    Target("label_binding_4shot", "synth_label_binding", binding_accuracy),
    Target("captioning_rises", "synth_captioning", caption_rise),
)


def check(eval_dir: str) -> list[tuple[str, bool, str]]:
    """``(target name, passed, message)`` for every target, from the reports in ``eval_dir``."""
    results = []
    for target in TARGETS:
        path = os.path.join(eval_dir, f"{target.task}.json")
        if not os.path.isfile(path):
            results.append((target.name, False, f"missing {path}; run flamingo-eval --task "
                                                 f"{target.task} --out {eval_dir}"))
            continue
        with open(path) as f:
            passed, message = target.judge(shot_means(json.load(f)))
        results.append((target.name, passed, message))
    return results


def main(argv: list[str] | None = None) -> int:
    """Print PASS/FAIL per target; return 1 if any fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("eval_dir", help="directory with the flamingo-eval JSON reports")
    args = parser.parse_args(argv)
    results = check(args.eval_dir)
    for name, passed, message in results:
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {message}")
    return 0 if all(passed for _, passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
