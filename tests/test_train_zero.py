"""ZeRO stages 0-3 train the Flamingo stage in one process; frozen weights stay bit-identical."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from flamingo_kit import FlamingoModel
from flamingo_kit import loss as loss_module
from tests.train_world import common_overrides, stage_overrides
from train.config import load_config
from train.metrics import read_metrics
from train.recipe import export, setup, train


def _snapshot(module: torch.nn.Module, zero_stage: int) -> dict[str, dict[str, torch.Tensor]]:
    """Full copies of frozen and trainable parameters (gathered from ZeRO-3 shards)."""
    import deepspeed

    params = list(module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if zero_stage == 3 else contextlib.nullcontext())
    out = {"frozen": {}, "trainable": {}}
    with gather:
        for name, p in module.named_parameters():
            out["trainable" if p.requires_grad else "frozen"][name] = p.detach().clone()
    return out


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"),
                                                  (3, "fp32"), (2, "bf16")])
def test_zero_stage_trains_flamingo_and_keeps_frozen_weights(
    world, single_process, tmp_path, zero_stage, precision, monkeypatch  # noqa: F811
):
    # The loss in chunks of 8 positions, recomputed in backward: the LM head is called again
    # during backward, where ZeRO-3 must gather its (frozen, partitioned) weight once more.
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 8 * 302)
    run_dir = str(tmp_path / "run")
    cfg = load_config(None, common_overrides(run_dir, 3) + stage_overrides(world, "flamingo") + [
        f"deepspeed.zero_stage={zero_stage}", f"deepspeed.precision={precision}",
        "deepspeed.grad_accum=2", "deepspeed.micro_batch_size=2"])
    s = setup(cfg)
    try:
        before = _snapshot(s.engine.module, zero_stage)
        train(s)
        after = _snapshot(s.engine.module, zero_stage)
        final = export(s)
    finally:
        s.logger.close()

    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # The image-reliance diagnostics run under every stage (ZeRO-3: gathered gates).
    measured = [r for r in read_metrics(run_dir) if "image_reliance" in r]
    assert [r["step"] for r in measured] == [1, 3]
    assert all(math.isfinite(r[k]) for r in measured for k in r
               if k.startswith(("image_reliance", "gate_", "perceiver_spread")))
    assert any(r["gate_attn_0"] != 0.0 for r in measured)
    assert before["frozen"], "the LM and vision tower should be frozen"
    for name, value in before["frozen"].items():
        assert torch.equal(value, after["frozen"][name]), f"frozen {name} changed"
    changed = [n for n, v in before["trainable"].items()
               if not torch.equal(v, after["trainable"][n])]
    assert changed, "no trainable parameter was updated"
    exported = dict(FlamingoModel.from_pretrained(final).named_parameters())
    for name, value in after["trainable"].items():
        assert torch.equal(exported[name].to(value.dtype), value), f"export lost {name}"
    assert os.path.isdir(os.path.join(run_dir, "ckpt", "step-3"))
