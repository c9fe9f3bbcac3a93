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


def test_resume_may_change_the_image_reliance_logging_but_not_what_trains():
    """Diagnostics settings are logging; source weight schedules and per-group rates change
    the run itself, and so does the resampler's shape."""
    flamingo = load_config(None, ["stage=flamingo"])

    def conflicts(*overrides):
        return resume_conflicts(flamingo, load_config(None, ["stage=flamingo", *overrides]))

    assert conflicts("logging.image_reliance_every=10", "logging.image_reliance_samples=8",
                     "logging.image_reliance_warn_after=5",
                     "logging.image_reliance_warn_below=0.1") == []
    assert conflicts("flamingo.sources=[{name: docs, kind: interleaved, shards: d, weight: 1.0, "
                     "weight_schedule: [{step: 100, weight: 2.0}]}]") == ["flamingo.sources"]
    assert conflicts("optim.param_groups=[{match: _gate$, lr_scale: 10}]") == [
        "optim.param_groups"]
    assert "flamingo.model.perceiver_patch_ff_mult" in conflicts(
        "flamingo.model={perceiver_patch_ff_mult: 2}")
