"""A resume runs the recorded config: changed settings that alter the run are refused, listed by
key, and the recorded ``config.yaml`` is rewritten only once a resume has been accepted."""

from __future__ import annotations

import os

import pytest

from tests.train_world import common_overrides, stage_overrides
from train.config import ConfigError, load_config, resume_conflicts
from train.metrics import read_metrics
from train.recipe import run


def _config(world, run_dir, steps, *extra):  # noqa: F811
    return load_config(None, common_overrides(run_dir, steps) + stage_overrides(world, "lm")
                       + ["checkpoint.every=2", *extra])


@pytest.mark.parametrize("change,keys", [
    (["optim.lr=1e-2"], ["optim.lr"]),
    (["optim.warmup_steps=5", "optim.min_lr_ratio=0.5"], ["optim.min_lr_ratio",
                                                            "optim.warmup_steps"]),
    (["deepspeed.micro_batch_size=2"], ["deepspeed.micro_batch_size"]),
])
def test_resume_with_a_changed_setting_is_refused_and_keeps_the_recorded_config(
    world, single_process, tmp_path, change, keys  # noqa: F811
):
    run_dir = str(tmp_path / "run")
    run(_config(world, run_dir, 2))
    recorded = open(os.path.join(run_dir, "config.yaml")).read()
    with pytest.raises(ConfigError) as error:
        run(_config(world, run_dir, 4, *change))
    message = str(error.value)
    for key in keys:
        assert key in message
    assert "run_dir" in message  # says how to start over instead
    assert open(os.path.join(run_dir, "config.yaml")).read() == recorded


def test_resume_may_change_steps_logging_and_checkpointing(world, single_process, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "run")
    run(_config(world, run_dir, 2))
    run(_config(world, run_dir, 4, "logging.every=2", "checkpoint.keep_last=1",
                "max_nonfinite_losses=3"))
    assert load_config(os.path.join(run_dir, "config.yaml")).steps == 4  # recorded once accepted
    resume = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert resume[0]["changed"]["steps"] == [2, 4]


def test_conflicts_ignore_the_sections_of_other_stages():
    lm = load_config(None, ["stage=lm"])
    assert resume_conflicts(lm, load_config(None, ["stage=lm", "flamingo.lm=elsewhere"])) == []
    assert resume_conflicts(lm, load_config(None, ["stage=lm", "lm.block_size=64"])) == [
        "lm.block_size"]
    assert resume_conflicts(lm, load_config(None, ["stage=flamingo"])) == ["stage"]
