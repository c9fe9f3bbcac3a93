"""What a run reports: gradient norm under every ZeRO stage, skips by reason, one record per
step across a resume, and plain progress lines when the output is not a terminal."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.train_world import common_overrides, stage_overrides
from train.config import load_config
from train.metrics import MetricsLogger, read_metrics
from train.recipe import run


def _steps(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_grad_norm_under_zero_0_matches_deepspeeds_under_zero_1(world, single_process,  # noqa: F811
                                                                tmp_path):
    """ZeRO 0 (fp32) has no DeepSpeed norm; ours is the same pre-clipping norm ZeRO 1 reports."""
    norms = {}
    for stage in (0, 1):
        run_dir = str(tmp_path / f"zero{stage}")
        run(load_config(None, common_overrides(run_dir, 2) + stage_overrides(world, "lm") + [
            f"deepspeed.zero_stage={stage}", "deepspeed.grad_accum=2", "deepspeed.grad_clip=0.5"]))
        norms[stage] = [r["grad_norm"] for r in _steps(run_dir)]
    assert all(n is not None for n in norms[0]), norms
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)
    assert min(norms[0]) > 0.5  # measured before clipping to grad_clip


def test_skips_by_reason_and_missing_shard_are_reported(world, single_process, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    shards = sorted(os.path.join(world["docs"], f) for f in os.listdir(world["docs"]))
    missing = os.path.join(str(tmp_path), "docs-000099.tar")
    sources = (f"[{{name: docs, kind: interleaved, shards: [{', '.join(shards)}, {missing}]}}]")
    overrides = common_overrides(run_dir, 3) + stage_overrides(world, "flamingo") + [
        f"flamingo.sources={sources}", "deepspeed.micro_batch_size=8"]
    with pytest.warns(UserWarning, match="docs-000099.tar") as warned:
        run(load_config(None, overrides))
    assert len([w for w in warned if "docs-000099.tar" in str(w.message)]) == 1
    steps = _steps(run_dir)
    assert all(r["skipped_by_reason"].get("missing_shard", 0) >= 1 for r in steps[-1:])
    assert steps[-1]["skipped"] == sum(steps[-1]["skipped_by_reason"].values())
    summary = [r for r in read_metrics(run_dir) if r.get("event") == "summary"]
    assert len(summary) == 1 and summary[0]["step"] == 3
    assert summary[0]["skipped_by_reason"] == steps[-1]["skipped_by_reason"]


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp32")])
def test_steps_redone_after_a_resume_are_recorded_once_and_match(world, single_process,  # noqa: F811
                                                                  tmp_path, zero_stage, precision):
    """Resuming from the step-2 checkpoint redoes step 3 exactly (ZeRO 1 is checked through the
    command line in test_train_resume) and metrics.jsonl keeps one record of it."""
    run_dir = str(tmp_path / "run")
    overrides = common_overrides(run_dir, 3) + stage_overrides(world, "lm") + [
        "checkpoint.every=2", f"deepspeed.zero_stage={zero_stage}", "deepspeed.grad_accum=2",
        f"deepspeed.precision={precision}"]
    run(load_config(None, overrides))
    # As if the run had died after logging step 3 but before its checkpoint was saved.
    shutil.rmtree(os.path.join(run_dir, "ckpt", "step-3"))
    first = {r["step"]: r for r in _steps(run_dir)}
    run(load_config(None, overrides))
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[2]["batch_crc"] == first[3]["batch_crc"]  # the redone step, logged once
    assert steps[2]["loss"] == pytest.approx(first[3]["loss"], abs=1e-5)
    assert steps[2]["grad_norm"] == pytest.approx(first[3]["grad_norm"], rel=1e-4)
    resume = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert resume[0]["step"] == 2 and resume[0]["dropped_records"] >= 1


def test_progress_without_a_terminal_prints_periodic_plain_lines(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), total_steps=100, start_step=0, enabled=True,
                           progress=True, tensorboard=False)
    for step in range(1, 101):
        logger.log_step(step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "skipped": 0})
    logger.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    lines = [line for line in out.splitlines() if line.startswith("train step")]
    assert len(lines) == 20 and lines[-1].startswith("train step 100/100")
