"""Kill-and-resume: a run SIGKILLed after its step-k checkpoint continues the same loss curve."""

from __future__ import annotations

import os
import signal

from tests.train_world import common_overrides, run_cli, stage_overrides
from train.checkpoint import latest_checkpoint
from train.metrics import read_metrics

K = 3


def _steps(run_dir: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(world, tmp_path):  # noqa: F811
    def args(run_dir, *extra):
        return (common_overrides(run_dir, 2 * K) + stage_overrides(world, "flamingo")
                + [f"checkpoint.every={K}", "deepspeed.zero_stage=1", "deepspeed.grad_accum=2",
                   *extra])

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    done = run_cli(args(straight))
    assert done.returncode == 0, done.stderr[-3000:]

    killed = run_cli(args(resumed, f"checkpoint.kill_after_step={K}"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(resumed).endswith(f"step-{K}")
    assert not os.path.exists(os.path.join(resumed, "final"))

    again = run_cli(args(resumed))
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(r.get("event") == "resume" and r["step"] == K for r in read_metrics(resumed))

    reference, continued = _steps(straight), _steps(resumed)
    assert sorted(continued) == list(range(1, 2 * K + 1))
    for step in range(K + 1, 2 * K + 1):
        assert continued[step]["batch_crc"] == reference[step]["batch_crc"], f"step {step} data"
        assert abs(continued[step]["loss"] - reference[step]["loss"]) <= 1e-6, f"step {step}"
    # The curve really moves, so equal losses are not equal by accident.
    assert len({round(reference[s]["loss"], 6) for s in reference}) == 2 * K
    assert os.path.isfile(os.path.join(resumed, "final", "model.safetensors"))
