"""Two CPU processes through the real ``deepspeed`` launcher: ZeRO-3 Flamingo training."""

from __future__ import annotations

import math
import os
import sys

from flamingo_kit import FlamingoModel
from tests.train_world import common_overrides, run_cli, stage_overrides
from train.checkpoint import latest_checkpoint, read_rank_state
from train.distributed import free_port
from train.metrics import read_metrics


def test_deepspeed_launcher_two_processes_zero3(world, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    launcher = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "train"]
    args = common_overrides(run_dir, 3) + stage_overrides(world, "flamingo") + [
        "deepspeed.zero_stage=3", "deepspeed.micro_batch_size=2", "checkpoint.every=2"]
    result = run_cli(args, timeout=400, launcher=launcher)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    records = read_metrics(run_dir)
    assert [r["world_size"] for r in records if r.get("event") == "setup"] == [2]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # Both ranks saved their state and rank 1's data position moved independently.
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.endswith("step-3")
    states = [read_rank_state(checkpoint, r)[0] for r in (0, 1)]
    assert states[0]["data"]["rank"] == 0 and states[1]["data"]["rank"] == 1
    assert states[0]["data"]["workers"] != states[1]["data"]["workers"]
    # The export gathered the ZeRO-3 shards into a complete, loadable model.
    FlamingoModel.from_pretrained(os.path.join(run_dir, "final"))
