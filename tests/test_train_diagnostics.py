"""Image-reliance diagnostics: the numbers, their logging in the trainer, and train.diagnose."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from data_pipelines.loading import SourceConfig
from flamingo_kit.from_scratch import open_gates
from tests.conftest import build_model
from tests.train_world import common_overrides, stage_overrides
from train import diagnose as diagnose_cli
from train import diagnostics
from train.config import ConfigError, load_config
from train.engine import parameter_groups
from train.metrics import read_metrics
from train.recipe import run


def test_permuted_images_come_from_another_row():
    """Every used slot gets an image of the next row with images; padding slots stay as they are."""
    pixels = torch.arange(4 * 3, dtype=torch.float32).view(4, 3, 1, 1, 1, 1) + 1
    counts = torch.tensor([2, 0, 1, 3])
    out = permute_flat(pixels, counts)
    assert out[0] == [7.0, 7.0, 3.0]  # row 2's only image, twice; slot 2 unused
    assert out[1] == [4.0, 5.0, 6.0]  # no images: unchanged
    assert out[2] == [10.0, 8.0, 9.0]  # row 3's first image
    assert out[3] == [1.0, 2.0, 1.0]  # row 0's two images, cycled


def permute_flat(pixels, counts):
    return diagnostics.permute_images(pixels, counts).flatten(1).tolist()


def test_permuting_needs_two_rows_with_images():
    with pytest.raises(ValueError, match="at least 2 rows"):
        diagnostics.permute_images(torch.zeros(2, 1, 1, 3, 4, 4), torch.tensor([1, 0]))


def test_spread_is_zero_for_identical_items_and_about_one_for_independent_ones():
    torch.manual_seed(0)
    assert diagnostics.spread(torch.ones(5, 3, 4) * torch.randn(1, 3, 4)) == pytest.approx(0)
    assert diagnostics.spread(torch.randn(400, 8, 4)) == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def heldout(world, tokenizer, image_processor):
    """Held-out batches of the trainer tests' world, tokenised for the conftest model."""
    sources = [SourceConfig("pairs", "pairs", world["heldout_pairs"]),
               SourceConfig("docs", "interleaved", world["heldout_docs"])]
    return diagnostics.load_heldout(sources, tokenizer, image_processor, 12, batch_size=4,
                                    max_length=48, max_images=2)


def test_closed_gates_mean_zero_reliance_and_open_ones_do_not(processor, heldout):
    """With every gate at 0 the images cannot change a logit; trained-like gates make them."""
    model = build_model(processor=processor)
    closed = diagnostics.diagnose(model, model, heldout)
    assert heldout.n_samples == 12
    assert closed["image_reliance"] == 0.0 and closed["blank_reliance"] == 0.0
    assert all(closed[k] == 0.0 for k in closed if k.startswith("gate_"))
    assert closed["heldout_loss"] == closed["heldout_loss_permuted"] > 0
    open_gates(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.perceiver.parameters():
            p.add_(0.2 * torch.randn_like(p))
    opened = diagnostics.diagnose(model, model, heldout)
    assert opened["image_reliance"] != 0.0
    assert opened["gate_attn_0"] == pytest.approx(torch.tanh(torch.tensor(1.0)).item())
    assert {"image_reliance_pairs", "image_reliance_docs"} <= set(opened)
    assert 0 < opened["perceiver_spread"] and 0 < opened["vision_spread"]
    assert model.training  # restored after the measurement


class FakeWriter:
    """Stands in for TensorBoard's SummaryWriter and records every scalar."""

    scalars: dict[str, list[tuple[int, float]]] = {}

    def __init__(self, log_dir):
        FakeWriter.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def close(self):
        pass


def test_trainer_logs_diagnostics_to_jsonl_and_tensorboard_and_cli_agrees(
        world, single_process, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    run_dir = str(tmp_path / "run")
    overrides = common_overrides(run_dir, 5) + stage_overrides(world, "flamingo") + [
        "logging.image_reliance_every=2", "logging.every=5", "logging.tensorboard=true"]
    run(load_config(None, overrides))
    logged = [r for r in read_metrics(run_dir) if "image_reliance" in r]
    assert [r["step"] for r in logged] == [1, 2, 4, 5]  # step 1, every 2, the last
    for key in ("heldout_loss", "blank_reliance", "image_reliance_pairs", "gate_attn_1",
                "gate_ff_0", "perceiver_spread", "vision_spread"):
        assert key in logged[-1], key
    assert [s for s, _ in FakeWriter.scalars["train/image_reliance"]] == [1, 2, 4, 5]
    assert FakeWriter.scalars["train/image_reliance"][-1][1] == logged[-1]["image_reliance"]
    assert "train/perceiver_spread" in FakeWriter.scalars

    capsys.readouterr()
    assert diagnose_cli.main([run_dir, "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    for key in ("image_reliance", "heldout_loss", "gate_attn_0", "perceiver_spread"):
        assert reported[key] == pytest.approx(logged[-1][key], abs=1e-5), key
    assert diagnose_cli.main([run_dir, "--history"]) == 0
    history = capsys.readouterr().out.splitlines()
    assert "reliance" in history[0] and [int(x.split()[0]) for x in history[1:]] == [1, 2, 4, 5]
    assert diagnose_cli.main([run_dir + "/final", "--data",
                              f"pairs:{world['heldout_pairs']}"]) == 0
    assert "image_reliance_pairs" in capsys.readouterr().out


def test_a_run_that_ignores_its_images_is_warned_once(world, single_process, tmp_path):
    run_dir = str(tmp_path / "run")
    overrides = common_overrides(run_dir, 4) + stage_overrides(world, "flamingo") + [
        "logging.image_reliance_every=1", "logging.image_reliance_warn_after=2",
        "logging.image_reliance_warn_below=100"]
    run(load_config(None, overrides))
    warnings = [r for r in read_metrics(run_dir) if r.get("event") == "warning_images_ignored"]
    assert len(warnings) == 1 and warnings[0]["step"] == 2
    assert "barely depend on its images" in warnings[0]["message"]


def test_heldout_shards_must_not_be_training_shards(world, single_process, tmp_path):
    overrides = common_overrides(str(tmp_path / "run"), 1) + stage_overrides(world, "flamingo")
    overrides.append(f"flamingo.heldout_sources=[{{name: p, kind: pairs, shards: "
                     f"{world['pairs']}}}]")
    with pytest.raises(ValueError, match="share shards"):
        run(load_config(None, overrides))


@pytest.mark.parametrize("overrides, key", [
    (["stage=flamingo", "flamingo.heldout_sources=[]"], "flamingo.heldout_sources"),
    (["logging.image_reliance_every=-1"], "logging.image_reliance_every"),
    (["logging.image_reliance_samples=1"], "logging.image_reliance_samples"),
    (["optim.param_groups=[{match: '(', lr_scale: 2}]"], r"optim.param_groups\[0\].match"),
    (["optim.param_groups=[{match: gate, lr_scale: 0}]"], r"optim.param_groups\[0\].lr_scale"),
    (["flamingo.sources=[{name: a, weight: 0}]"], "weight 0 at step 0"),
    (["flamingo.sources=[{name: a, weight_schedule: [{step: 0, weight: 1}]}]"],
     r"flamingo.sources\[0\].weight_schedule"),
])
def test_bad_diagnostics_and_recipe_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_diagnostics_can_be_turned_off_without_heldout_data():
    cfg = load_config(None, ["stage=flamingo", "flamingo.heldout_sources=[]",
                             "logging.image_reliance_every=0"])
    assert cfg.logging.image_reliance_every == 0


def test_param_group_rules_scale_the_rate_of_matching_parameters():
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2), "attn_gate": torch.nn.Linear(1, 1)})
    groups = parameter_groups(model, 0.1, 1e-3, [("gate", 10.0)])
    rates = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert rates == {(1e-3, 0.1): 1, (1e-3, 0.0): 1, (1e-2, 0.1): 1, (1e-2, 0.0): 1}
    assert groups[0]["lr"] == 1e-3  # the run's nominal rate is reported from group 0
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        parameter_groups(model, 0.1, 1e-3, [("perceiver", 2.0)])


def test_diagnose_cli_names_bad_input(tmp_path, capsys):
    assert diagnose_cli.main([str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="KIND:SHARDS"):
        diagnose_cli.parse_data(str(tmp_path))

