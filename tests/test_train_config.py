"""Config loading: YAML + overrides, typed, unknown keys rejected fast with a useful message."""

from __future__ import annotations

import glob
import os
import time

import pytest

from tests.train_world import REPO, run_cli
from train.config import ConfigError, TrainConfig, load_config, save_config
from train.engine import deepspeed_config, warmup_cosine


def test_yaml_and_overrides_merge_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: flamingo\noptim:\n  lr: 0.01\ndeepspeed:\n  zero_stage: 2\n")
    cfg = load_config(str(path), ["optim.lr=2e-4", "flamingo.max_images=3"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.stage == "flamingo" and cfg.deepspeed.zero_stage == 2
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.flamingo.max_images == 3


@pytest.mark.parametrize("override,needle", [
    ("optim.lrate=1", "optim.lrate"),
    ("deepspeed.zero_stage=four", "deepspeed.zero_stage"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("stage=vision", "stage"),
    ("flamingo.sources=[{nam: x}]", "nam"),
])
def test_bad_key_or_value_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_unparsable_override_value_names_the_override():
    override = r'optim.param_groups=[{match: "^vision\.", lr_scale: 0.1}]'
    with pytest.raises(ConfigError, match=r"optim\.param_groups=.*not valid YAML"):
        load_config(None, [override])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.lrate=1"])
    assert "lr" in str(info.value) and "warmup_steps" in str(info.value)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.stage in ("lm", "contrastive", "flamingo")


def test_cli_rejects_bad_key_in_under_5_seconds(tmp_path):
    start = time.perf_counter()
    result = run_cli(["--config", os.path.join(REPO, "configs", "lm.yaml"), "optim.lrr=1",
                      f"run_dir={tmp_path / 'run'}"], timeout=30)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert "optim.lrr" in result.stderr and "valid keys" in result.stderr
    assert elapsed < 5.0, f"took {elapsed:.1f}s"
    assert not os.path.exists(tmp_path / "run"), "no work may start before validation"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.5", "flamingo.model={xattn_heads: 2}"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_deepspeed_config_and_extra_merge():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16",
                             "deepspeed.grad_accum=4",
                             "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(cfg.deepspeed)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 4
    assert "optimizer" not in ds  # torch AdamW is passed in: nothing to compile


def test_warmup_then_cosine_to_min_ratio():
    lrs = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(25)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[20] == pytest.approx(0.1) and lrs[24] == pytest.approx(0.1)


def test_init_from_refuses_architecture_keys():
    """flamingo.init_from brings the saved architecture; model keys beside it would be ignored,
    so they are an error naming them (before anything is loaded)."""
    from train.stages.flamingo import build_model

    cfg = load_config(None, ["stage=flamingo", "flamingo.init_from=/nonexistent",
                             "flamingo.model={xattn_heads: 2}"])
    with pytest.raises(ValueError, match=r"flamingo.model must be empty, got keys \['xattn_heads'\]"):
        build_model(cfg.flamingo)
