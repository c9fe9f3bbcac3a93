"""scripts/check_demo.py judges the demo's reports: PASS/FAIL lines and the exit code."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_demo", ROOT / "scripts" / "check_demo.py")
check_demo = importlib.util.module_from_spec(spec)
sys.modules["check_demo"] = check_demo  # dataclasses look their module up there
spec.loader.exec_module(check_demo)

COLORS = ["red", "green", "blue", "yellow", "purple", "white"]
N_TARGETS = len(check_demo.TARGETS)


def write_report(directory: Path, task: str, by_shots: dict[int, dict[str, float]],
                 predictions: dict[int, list[dict]] | None = None) -> None:
    """A flamingo-eval report with the same structure (one trial per row is enough here)."""
    predictions = predictions or {}
    results = [{"shots": k, "mean": scores, "std": {m: 0.0 for m in scores},
                "trials": [{"seed": 0, "scores": scores, "predictions": predictions.get(k, [])}]}
               for k, scores in by_shots.items()]
    (directory / f"{task}.json").write_text(json.dumps({"task": task, "results": results}))


def vqa_records(answer_of) -> list[dict]:
    """Colour and count questions about 12 images; ``answer_of(truth, i)`` is the prediction."""
    records = []
    for i in range(12):
        truth, qtype = ((COLORS[i % 6], "what color is the") if i % 2 == 0
                        else (["one", "two", "three"][i % 3], "how many"))
        records.append({"prediction": answer_of(truth, i), "references": [truth] * 10,
                        "extra": {"question_type": qtype}})
    return records


def caption_records(blind: bool) -> list[dict]:
    return [{"prediction": "a large white diamond." if blind else f"a small {c} circle {i}."}
            for i, c in enumerate(COLORS * 2)]


def write_all(directory: Path, vqa=(40.0, 65.0), binding=(50.0, 75.0), cider=(10.0, 30.0),
              chair=(50.0, 20.0), reliance=0.4, blind=False):
    """Reports that pass every target, unless an argument says otherwise.

    ``blind=True`` writes what an image-blind model produces: one caption for every image and
    one answer per question type, whatever the image.
    """
    zero = vqa_records(lambda truth, i: "yes" if i % 2 == 0 else "two")
    four = vqa_records(lambda truth, i: ("blue" if truth in COLORS else "two") if blind
                       else truth)
    write_report(directory, "synth_vqa", {0: {"vqa_accuracy": vqa[0]}, 2: {"vqa_accuracy": 50.0},
                                          4: {"vqa_accuracy": vqa[1]}}, {0: zero, 4: four})
    write_report(directory, "synth_label_binding",
                 {0: {"exact_match": 0.0, "top1": binding[0]},
                  4: {"exact_match": 60.0, "top1": binding[1]}})
    write_report(directory, "synth_captioning",
                 {0: {"cider": cider[0], "bleu4": 1.0, "chair_i": chair[0]},
                  4: {"cider": cider[1], "bleu4": 2.0, "chair_i": chair[1]}},
                 {4: caption_records(blind)})
    (directory / "image_reliance.json").write_text(json.dumps({
        "image_reliance": reliance, "image_reliance_pairs": reliance,
        "heldout_loss": 1.0, "heldout_loss_permuted": 1.0 + reliance}))


def test_all_targets_pass(tmp_path, capsys):
    write_all(tmp_path)
    assert check_demo.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == N_TARGETS and "FAIL" not in out
    assert "40.0 (0-shot) -> 65.0 (4-shot), gain +25.0" in out
    assert "VQA colour questions 100.0%" in out and "how many: 33 -> 100" in out


@pytest.mark.parametrize("failing, kwargs", [
    ("vqa_in_context_gain", {"vqa": (40.0, 59.9)}),
    ("label_binding_4shot", {"binding": (50.0, 69.0)}),
    ("label_binding_4shot", {"binding": (80.0, 75.0)}),  # no rise from 0 shots
    ("captioning_rises", {"cider": (30.0, 30.0)}),
    ("chair_i_4shot", {"chair": (50.0, 30.1)}),
    ("image_reliance", {"reliance": 0.01}),
])
def test_each_target_can_fail(tmp_path, capsys, failing, kwargs):
    write_all(tmp_path, **kwargs)
    assert check_demo.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if f" {failing}:" in line] == ["FAIL"]
    assert sum(line.startswith("PASS") for line in lines) == N_TARGETS - 1


def test_an_image_blind_model_fails(tmp_path, capsys):
    """One caption for all images, one answer per question type, no reliance: all caught."""
    write_all(tmp_path, blind=True, reliance=0.0)
    assert check_demo.main([str(tmp_path)]) == 1
    failed = {line.split()[1].rstrip(":") for line in capsys.readouterr().out.splitlines()
              if line.startswith("FAIL")}
    assert failed == {"image_reliance", "vqa_colour_4shot", "captions_distinct_4shot"}


def test_malformed_zero_shot_answers_fail(tmp_path, capsys):
    write_all(tmp_path)
    fragments = vqa_records(lambda truth, i: ["m", "uestion: what", "red", "blue"][i % 4])
    report = json.loads((tmp_path / "synth_vqa.json").read_text())
    report["results"][0]["trials"][0]["predictions"] = fragments
    (tmp_path / "synth_vqa.json").write_text(json.dumps(report))
    assert check_demo.main([str(tmp_path)]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if "well_formed" in x)
    assert line.startswith("FAIL") and "50.0%" in line and "'m'" in line


def test_well_formed_answers():
    assert check_demo.well_formed("red") and check_demo.well_formed("on the left")
    for bad in ("", "m", "uestion: what", "answer", "red red red red", "blick"):
        assert not check_demo.well_formed(bad), bad


def test_missing_report_fails_with_the_command_to_run(tmp_path, capsys):
    write_all(tmp_path)
    (tmp_path / "synth_captioning.json").unlink()
    (tmp_path / "image_reliance.json").unlink()
    assert check_demo.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "flamingo-eval --task synth_captioning" in out
    assert "python -m train.diagnose RUN --json" in out


def test_table_without_the_needed_shots_says_which(tmp_path):
    write_all(tmp_path)
    write_report(tmp_path, "synth_vqa", {0: {"vqa_accuracy": 40.0}, 8: {"vqa_accuracy": 90.0}})
    with pytest.raises(ValueError, match=r"shots \[4\]"):
        check_demo.check(str(tmp_path))
