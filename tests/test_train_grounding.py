"""The Flamingo stage learns to see: trained by the real recipe, the model comes to use its images.

Captions of the tiny world name the colour and shape of the one object in the image, so only the
image can tell them. A text-pretrained LM with freshly initialised cross-attention predicts
them no better with the true image than with another one (image reliance 0); a short Flamingo
stage on these pairs must raise held-out image reliance well above what a model that cannot
see reaches with the same training (cross-attention replaced by the identity).
"""

from __future__ import annotations

import pytest
import torch

from flamingo_kit.cross_attention import GatedCrossAttentionBlock
from tests.train_world import common_overrides, stage_overrides
from train.config import load_config
from train.metrics import read_metrics
from train.recipe import run

FLAMINGO_STEPS = 120
# Nats per supervised token; with 4 colours and 2 shapes a model that reads the image gains up
# to about ln 4 + ln 2 over 6 supervised tokens (~0.35); one that cannot see gains nothing.
MIN_RELIANCE = 0.1


@pytest.fixture(scope="module")
def text_lm(world, tmp_path_factory):
    """The stage-1 LM of the tiny world: it knows the caption language, not the images."""
    from train.distributed import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as patch:  # module scope: no monkeypatch fixture
        for key, value in env.items():
            patch.setenv(key, value)
        run_dir = str(tmp_path_factory.mktemp("lm") / "run")
        return run(load_config(None, common_overrides(run_dir, 40) + stage_overrides(world, "lm")
                               + ["optim.lr=1e-2"]))


def train_on_pairs(world, text_lm, run_dir: str) -> list[dict]:
    """The Flamingo stage on the caption pairs alone; returns its diagnostics records."""
    overrides = common_overrides(run_dir, FLAMINGO_STEPS) + stage_overrides(world, "flamingo") + [
        f"flamingo.lm={text_lm}", "optim.lr=1e-2",
        f"flamingo.sources=[{{name: pairs, kind: pairs, shards: {world['pairs']}}}]",
        f"logging.image_reliance_every={FLAMINGO_STEPS}"]
    run(load_config(None, overrides))
    return [r for r in read_metrics(run_dir) if "image_reliance" in r]


def test_flamingo_stage_learns_to_use_its_images(world, text_lm, single_process, tmp_path):
    first, last = train_on_pairs(world, text_lm, str(tmp_path / "run"))
    assert first["step"] == 1 and last["step"] == FLAMINGO_STEPS
    assert abs(first["image_reliance"]) < 0.01  # closed gates: the images cannot matter yet
    assert last["image_reliance"] > MIN_RELIANCE, last
    assert last["image_reliance_pairs"] > MIN_RELIANCE and last["image_reliance_docs"] > 0


def test_a_model_that_cannot_see_stays_below_the_threshold(
        world, text_lm, single_process, tmp_path, monkeypatch):
    """The threshold is not reachable without cross-attention (it is not met by chance)."""
    def identity(self, hidden, media_kv, layout):
        return hidden + 0 * (self.attn_gate + self.ff_gate).to(hidden.dtype)

    monkeypatch.setattr(GatedCrossAttentionBlock, "forward", identity)
    last = train_on_pairs(world, text_lm, str(tmp_path / "run"))[-1]
    assert last["image_reliance"] == pytest.approx(0.0, abs=1e-6)
    assert last["image_reliance"] < MIN_RELIANCE
    assert torch.isfinite(torch.tensor(last["heldout_loss"]))
