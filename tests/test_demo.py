"""`make demo`'s script at minimum size: every stage and CLI runs and hands over to the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_script_end_to_end_at_minimum_size(tmp_path):
    env = {
        **os.environ,
        "PY": sys.executable,
        "DATA": str(tmp_path / "synth"),
        "RUNS": str(tmp_path / "runs"),
        "SYNTH_ARGS": "--n-pairs 64 --n-docs 32 --n-anchored 8 --n-corpus 300 --n-eval 8 --n-episodes 2",
        "STEPS_LM": "2",
        "STEPS_VISION": "2",
        "STEPS_FLAMINGO": "2",
        "SHOTS": "0,1",
        "TRIALS": "1",
        "LIMIT": "4",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for task in ("synth_captioning", "synth_vqa", "synth_label_binding"):
        assert f"task: {task}" in done.stdout
        results = json.loads((tmp_path / "runs" / "eval" / f"{task}.json").read_text())
        assert results
        assert (tmp_path / "runs" / "eval" / f"{task}.png").stat().st_size > 0
    assert "FlamingoPipeline.from_pretrained" in done.stdout
