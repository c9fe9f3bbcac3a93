"""Checkpoints are atomic, pruned to the last K, and an interrupted save is ignored on resume."""

from __future__ import annotations

import os

from tests.train_world import common_overrides, stage_overrides
from train.checkpoint import latest_checkpoint, list_checkpoints
from train.config import load_config
from train.metrics import read_metrics
from train.recipe import run


def test_keep_last_and_partial_save_is_ignored(world, single_process, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    base = common_overrides(run_dir, 4) + stage_overrides(world, "lm")
    run(load_config(None, base + ["checkpoint.every=1", "checkpoint.keep_last=2"]))
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 4]

    # A save that died before its rename leaves tmp-step-N: never picked, removed at setup.
    partial = os.path.join(run_dir, "ckpt", "tmp-step-5")
    os.makedirs(os.path.join(partial, "engine"))
    assert latest_checkpoint(run_dir).endswith("step-4")
    run(load_config(None, base + ["steps=5", "checkpoint.every=1", "checkpoint.keep_last=2"]))
    assert not os.path.exists(partial)
    resumes = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [4]
    assert [step for step, _ in list_checkpoints(run_dir)] == [4, 5]
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5]
