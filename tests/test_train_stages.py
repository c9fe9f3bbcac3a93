"""Each stage trains for real on CPU (its loss goes down) and exports a loadable artefact."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from flamingo_kit import FlamingoModel, FlamingoProcessor
from tests.train_world import REPO, common_overrides, stage_overrides
from train.config import load_config
from train.metrics import read_metrics
from train.recipe import NonFiniteLossError, run, setup, train


def _losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def _assert_decreases(losses: list[float], window: int, margin: float) -> None:
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert all(math.isfinite(x) for x in losses)
    assert last < first - margin, f"loss did not go down: first {first:.3f}, last {last:.3f}"


def test_lm_stage_learns_and_exports_hf_dir(world, single_process, tmp_path):  # noqa: F811
    run_dir = str(tmp_path / "lm")
    final = run(load_config(None, common_overrides(run_dir, 30) + stage_overrides(world, "lm")))
    _assert_decreases(_losses(run_dir), window=5, margin=0.5)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert "<image>" not in tokenizer.get_vocab()  # added beside the vocabulary in stage 3
    ids = tokenizer("there is a red square.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("loss, kind, negatives", [
    ("clip", "clip", "[]"), ("siglip", "siglip", "[[a, is]]"),
    ("clip", "bit", "[[a, is]]")])  # the tiny tokenizer has few whole words
def test_contrastive_stage_learns_and_exports_vision_tower(
    world, single_process, tmp_path, loss, kind, negatives  # noqa: F811
):
    run_dir = str(tmp_path / loss)
    overrides = common_overrides(run_dir, 30) + stage_overrides(world, "contrastive")
    final = run(load_config(None, overrides + [f"contrastive.loss={loss}",
                                               f"contrastive.vision.kind={kind}",
                                               f"contrastive.hard_negative_words={negatives}",
                                               "deepspeed.micro_batch_size=8"]))
    _assert_decreases(_losses(run_dir), window=5, margin=0.1)
    vision = AutoModel.from_pretrained(final)
    assert vision.config.model_type == kind + ("_vision_model" if kind != "bit" else "")
    processor = AutoImageProcessor.from_pretrained(final, backend="pil")
    assert processor.crop_size["height"] == 32
    pixels = processor(images=[Image.new("RGB", (40, 40))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32) and torch.isfinite(vision(pixel_values=pixels)[0]).all()


@pytest.mark.parametrize("packing", [True, False])
def test_flamingo_stage_learns_and_exports_loadable_model(
    world, single_process, tmp_path, packing  # noqa: F811
):
    run_dir = str(tmp_path / "flamingo")
    overrides = common_overrides(run_dir, 40) + stage_overrides(world, "flamingo")
    final = run(load_config(None, overrides + ["optim.lr=1e-2", f"flamingo.packing={packing}"]))
    _assert_decreases(_losses(run_dir), window=10, margin=0.2)
    setup_event = next(r for r in read_metrics(run_dir) if r.get("event") == "setup")
    assert setup_event["packing"] == ("on" if packing else "off (flamingo.packing=false)")
    moved = shutil.move(final, tmp_path / "copied_elsewhere")  # self-contained: parts inside
    with open(os.path.join(moved, "config.json")) as f:
        assert json.load(f)["lm_source"]["path"] == "lm"
    model = FlamingoModel.from_pretrained(moved)
    processor = FlamingoProcessor.from_pretrained(moved)
    assert processor.image_token_id == model.image_token_id


def test_gpu_recipe_runs_a_few_steps_on_cpu(world, single_process, tmp_path):  # noqa: F811
    """configs/synthetic_gpu.yaml as shipped (bf16, ZeRO-2, activation checkpointing), shrunk."""
    run_dir = str(tmp_path / "gpu")
    overrides = (stage_overrides(world, "flamingo") + common_overrides(run_dir, 2)
                 + ["flamingo.num_workers=0", "deepspeed.micro_batch_size=2", "logging.every=1"])
    cfg = load_config(os.path.join(REPO, "configs", "synthetic_gpu.yaml"), overrides)
    assert cfg.deepspeed.precision == "bf16" and cfg.deepspeed.activation_checkpointing
    run(cfg)
    losses = _losses(run_dir)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nonfinite_loss_is_skipped_then_aborts(world, single_process, tmp_path, zero_stage):  # noqa: F811
    run_dir = str(tmp_path / "nan")
    cfg = load_config(None, common_overrides(run_dir, 4) + stage_overrides(world, "lm") + [
        f"deepspeed.zero_stage={zero_stage}", "max_nonfinite_losses=2"])
    s = setup(cfg)
    real_loss, calls = s.parts.loss, []

    def poisoned(model, batch):  # micro-batches 2 and 3 blow up
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    s.parts.loss = poisoned
    try:
        train(s)
        assert all(torch.isfinite(p).all() for p in s.engine.module.parameters())
        events = [r for r in read_metrics(run_dir) if r.get("event") == "nonfinite_loss"]
        assert [e["count"] for e in events] == [1, 2]
        assert len(_losses(run_dir)) == 4 and s.step == 4  # the update used finite batches only

        s.parts.loss = lambda model, batch: real_loss(model, batch) * float("inf")
        s.cfg.steps = 6
        with pytest.raises(NonFiniteLossError, match="max_nonfinite_losses=2"):
            train(s)
    finally:
        s.logger.close()
