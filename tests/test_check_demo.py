"""scripts/check_demo.py judges the demo's k-shot tables: PASS/FAIL lines and the exit code."""

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


def write_report(directory: Path, task: str, by_shots: dict[int, dict[str, float]]) -> None:
    """A flamingo-eval report with the same structure (one trial per row is enough here)."""
    results = [{"shots": k, "mean": scores, "std": {m: 0.0 for m in scores},
                "trials": [{"seed": 0, "scores": scores, "predictions": []}]}
               for k, scores in by_shots.items()]
    (directory / f"{task}.json").write_text(json.dumps({"task": task, "results": results}))


def write_all(directory: Path, vqa=(40.0, 65.0), binding=(50.0, 75.0), cider=(10.0, 30.0)):
    write_report(directory, "synth_vqa", {0: {"vqa_accuracy": vqa[0]}, 2: {"vqa_accuracy": 50.0},
                                          4: {"vqa_accuracy": vqa[1]}})
    write_report(directory, "synth_label_binding",
                 {0: {"exact_match": 0.0, "top1": binding[0]},
                  4: {"exact_match": 60.0, "top1": binding[1]}})
    write_report(directory, "synth_captioning", {0: {"cider": cider[0], "bleu4": 1.0},
                                                 4: {"cider": cider[1], "bleu4": 2.0}})


def test_all_targets_pass(tmp_path, capsys):
    write_all(tmp_path)
    assert check_demo.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 3 and "FAIL" not in out
    assert "40.0 (0-shot) -> 65.0 (4-shot), gain +25.0" in out


@pytest.mark.parametrize("failing, kwargs", [
    ("vqa_in_context_gain", {"vqa": (40.0, 59.9)}),
    ("label_binding_4shot", {"binding": (50.0, 69.0)}),
    ("captioning_rises", {"cider": (30.0, 30.0)}),
])
def test_each_target_can_fail(tmp_path, capsys, failing, kwargs):
    write_all(tmp_path, **kwargs)
    assert check_demo.main([str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if failing in line] == ["FAIL"]
    assert sum(line.startswith("PASS") for line in lines) == 2


def test_missing_report_fails_with_the_command_to_run(tmp_path, capsys):
    write_all(tmp_path)
    (tmp_path / "synth_captioning.json").unlink()
    assert check_demo.main([str(tmp_path)]) == 1
    assert "flamingo-eval --task synth_captioning" in capsys.readouterr().out


def test_table_without_the_needed_shots_says_which(tmp_path):
    write_all(tmp_path)
    write_report(tmp_path, "synth_vqa", {0: {"vqa_accuracy": 40.0}, 8: {"vqa_accuracy": 90.0}})
    with pytest.raises(ValueError, match=r"shots \[4\]"):
        check_demo.check(str(tmp_path))
