"""Check the learning targets of ``make demo`` on the reports written by ``flamingo-eval``.

    python scripts/check_demo.py runs/eval

Reads ``synth_vqa.json``, ``synth_label_binding.json``, ``synth_captioning.json`` and
``image_reliance.json`` (``python -m train.diagnose RUN --json``) from the directory and checks
that the model looks at its images and learned in context:

- image reliance of the final model (held-out loss with permuted minus true images) is at
  least 0.05 nats per token;
- VQA accuracy at 4 shots is at least 20 points above 0 shots;
- VQA colour questions reach 60% at 4 shots (every question type is reported);
- at least 80% of the 0-shot VQA answers are well formed: one to three words of the world's
  vocabulary, no prompt words and no word fragments;
- 2-way label binding (fresh nonsense names, chance 50%) reaches 70% top-1 at 4 shots, up
  from 0 shots;
- captioning CIDEr-D is higher at 4 shots than at 0 shots;
- at least 80% of the 4-shot captions differ from each other (an image-blind model writes one
  caption for every image);
- CHAIRi (objects named that the image does not hold) is at most 30% at 4 shots.

Prints one PASS/FAIL line per target with the numbers; exits 1 if any target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from data_pipelines.synthetic.language import vocabulary
from eval_fewshot.metrics.vqa import vqa_accuracy

SHOTS = 4
MIN_IMAGE_RELIANCE = 0.05
VQA_MIN_GAIN = 20.0
VQA_COLOR_MIN = 60.0
COLOR_QUESTION = "what color is the"
WELL_FORMED_MIN = 80.0
BINDING_MIN_TOP1 = 70.0
DISTINCT_MIN = 80.0
CHAIR_I_MAX = 30.0
PROMPT_WORDS = {"question", "short", "answer", "output"}
ANSWER_WORDS = vocabulary() - PROMPT_WORDS
RELIANCE_FILE = "image_reliance.json"


@dataclass(frozen=True)
class Target:
    """One learning target: the report file it reads and how it judges the report."""

    name: str
    task: str
    judge: Callable[[dict], tuple[bool, str]]


def shot_means(report: dict) -> dict[int, dict[str, float]]:
    """``{shots: {metric: mean over trials}}`` from one ``flamingo-eval`` JSON report."""
    return {int(row["shots"]): row["mean"] for row in report["results"]}


def _rows(report: dict, *shots: int) -> dict[int, dict]:
    """The report's rows for ``shots``; a clear error when the table lacks them."""
    rows = {int(row["shots"]): row for row in report["results"]}
    missing = [k for k in shots if k not in rows]
    if missing:
        raise ValueError(f"the eval table has no rows for shots {missing}; rerun flamingo-eval "
                         f"with --shots including {','.join(map(str, shots))} (it has "
                         f"{sorted(rows)})")
    return rows


def _scores(report: dict, metric: str, shots: int) -> tuple[float, float]:
    """The mean metric at 0 and at ``shots`` shots."""
    rows = _rows(report, 0, shots)
    return rows[0]["mean"][metric], rows[shots]["mean"][metric]


def _predictions(report: dict, shots: int) -> list[list[dict]]:
    """Prediction records of every trial at ``shots`` shots."""
    return [trial["predictions"] for trial in _rows(report, shots)[shots]["trials"]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def vqa_gain(report: dict) -> tuple[bool, str]:
    """VQA accuracy gain from 0 to ``SHOTS`` shots, at least ``VQA_MIN_GAIN`` points."""
    zero, k = _scores(report, "vqa_accuracy", SHOTS)
    return k - zero >= VQA_MIN_GAIN, (f"VQA acc {zero:.1f} (0-shot) -> {k:.1f} ({SHOTS}-shot), "
                                      f"gain {k - zero:+.1f} (need >= +{VQA_MIN_GAIN:.0f})")


def vqa_by_type(report: dict, shots: int) -> dict[str, float]:
    """VQA accuracy (%) per question type at ``shots`` shots, averaged over trials."""
    per_type: dict[str, list[float]] = defaultdict(list)
    for records in _predictions(report, shots):
        scores: dict[str, list[float]] = defaultdict(list)
        for r in records:
            qtype = r.get("extra", {}).get("question_type") or "?"
            scores[qtype].append(100 * vqa_accuracy(r["prediction"], r["references"]))
        for qtype, values in scores.items():
            per_type[qtype].append(_mean(values))
    return {qtype: _mean(values) for qtype, values in sorted(per_type.items())}


def vqa_color(report: dict) -> tuple[bool, str]:
    """Colour questions at ``SHOTS`` shots reach ``VQA_COLOR_MIN``%; every type is listed."""
    zero, k = vqa_by_type(report, 0), vqa_by_type(report, SHOTS)
    color = k.get(COLOR_QUESTION, float("nan"))
    types = "; ".join(f"{t}: {zero.get(t, float('nan')):.0f} -> {k[t]:.0f}" for t in k)
    return color >= VQA_COLOR_MIN, (f"VQA colour questions {color:.1f}% at {SHOTS} shots (need "
                                    f">= {VQA_COLOR_MIN:.0f}); by type 0 -> {SHOTS} shots: "
                                    f"{types}")


def well_formed(answer: str) -> bool:
    """One to three words, each a word of the synthetic world and none a prompt word."""
    words = answer.strip().rstrip(".").split()
    return 1 <= len(words) <= 3 and all(w in ANSWER_WORDS for w in words)


def vqa_zero_shot_form(report: dict) -> tuple[bool, str]:
    """At least ``WELL_FORMED_MIN``% of the 0-shot answers are :func:`well_formed`."""
    trials = _predictions(report, 0)
    rate = _mean([100 * _mean([well_formed(r["prediction"]) for r in t]) for t in trials])
    bad = sorted({r["prediction"] for t in trials for r in t if not well_formed(r["prediction"])})
    return rate >= WELL_FORMED_MIN, (f"0-shot VQA answers well formed {rate:.1f}% (need >= "
                                     f"{WELL_FORMED_MIN:.0f}); malformed e.g. {bad[:4]}")


def binding_accuracy(report: dict) -> tuple[bool, str]:
    """2-way label-binding top-1 (rank) at ``SHOTS`` shots, above chance and above 0 shots."""
    zero, k = _scores(report, "top1", SHOTS)
    exact = _rows(report, SHOTS)[SHOTS]["mean"].get("exact_match", float("nan"))
    return k >= BINDING_MIN_TOP1 and k > zero, (
        f"label binding top-1 {zero:.1f} (0-shot) -> {k:.1f} ({SHOTS}-shot) (need >= "
        f"{BINDING_MIN_TOP1:.0f} and a rise, chance 50); exact match {exact:.1f}")


def caption_rise(report: dict) -> tuple[bool, str]:
    """Captioning CIDEr-D strictly higher at ``SHOTS`` shots than at 0 shots."""
    zero, k = _scores(report, "cider", SHOTS)
    return k > zero, f"captioning CIDEr-D {zero:.1f} (0-shot) -> {k:.1f} ({SHOTS}-shot)"


def captions_distinct(report: dict) -> tuple[bool, str]:
    """Distinct captions / queries at ``SHOTS`` shots (mean over trials), at least 80%."""
    trials = _predictions(report, SHOTS)
    rate = _mean([100 * len({r["prediction"] for r in t}) / len(t) for t in trials if t])
    return rate >= DISTINCT_MIN, (f"{SHOTS}-shot captions distinct across query images "
                                  f"{rate:.1f}% (need >= {DISTINCT_MIN:.0f})")


def chair_i(report: dict) -> tuple[bool, str]:
    """CHAIRi at ``SHOTS`` shots at most ``CHAIR_I_MAX``%."""
    zero, k = _scores(report, "chair_i", SHOTS)
    return k <= CHAIR_I_MAX, (f"CHAIRi {zero:.1f}% (0-shot) -> {k:.1f}% ({SHOTS}-shot) (need "
                              f"<= {CHAIR_I_MAX:.0f})")


def image_reliance(report: dict) -> tuple[bool, str]:
    """Held-out image reliance of the final model, at least ``MIN_IMAGE_RELIANCE``."""
    value = report["image_reliance"]
    parts = ", ".join(f"{k.removeprefix('image_reliance_')} {v:.3f}" for k, v in report.items()
                      if k.startswith("image_reliance_"))
    return value >= MIN_IMAGE_RELIANCE, (
        f"image reliance {value:.3f} nats/token (need >= {MIN_IMAGE_RELIANCE}; by source: "
        f"{parts}); held-out loss {report['heldout_loss']:.3f} with true images, "
        f"{report['heldout_loss_permuted']:.3f} with permuted images")


TARGETS = (
    Target("image_reliance", "image_reliance", image_reliance),
    Target("vqa_in_context_gain", "synth_vqa", vqa_gain),
    Target("vqa_colour_4shot", "synth_vqa", vqa_color),
    Target("vqa_0shot_well_formed", "synth_vqa", vqa_zero_shot_form),
    Target("label_binding_4shot", "synth_label_binding", binding_accuracy),
    Target("captioning_rises", "synth_captioning", caption_rise),
    Target("captions_distinct_4shot", "synth_captioning", captions_distinct),
    Target("chair_i_4shot", "synth_captioning", chair_i),
)


def _command(task: str, eval_dir: str) -> str:
    if task == "image_reliance":
        return f"python -m train.diagnose RUN --json > {os.path.join(eval_dir, RELIANCE_FILE)}"
    return f"flamingo-eval --task {task} --out {eval_dir}"


def check(eval_dir: str) -> list[tuple[str, bool, str]]:
    """``(target name, passed, message)`` for every target, from the reports in ``eval_dir``."""
    results = []
    for target in TARGETS:
        path = os.path.join(eval_dir, f"{target.task}.json")
        if not os.path.isfile(path):
            results.append((target.name, False,
                            f"missing {path}; run {_command(target.task, eval_dir)}"))
            continue
        with open(path) as f:
            passed, message = target.judge(json.load(f))
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
