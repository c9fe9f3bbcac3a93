"""Properties of the shipped training recipes (``configs/*.yaml``) that their results rely on."""

from __future__ import annotations

import os

import pytest
import torch

from flamingo_kit import FlamingoConfig
from flamingo_kit.perceiver import PerceiverResampler
from tests.conftest import randomize_all
from train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("recipe", ["flamingo.yaml", "synthetic_gpu.yaml"])
def test_an_image_is_read_the_same_wherever_it_sits_in_the_prompt(recipe):
    """Each text token sees one image (``media_policy: immediate``), so nothing is gained by
    telling the resampler an image's place among the prompt's images; with media-position
    embeddings, the latents of the 9th image of an 8-shot prompt came from an embedding trained
    almost only on label-binding documents, and 8-shot VQA fell below 4-shot (README)."""
    cfg = load_config(os.path.join(REPO, "configs", recipe))
    model_config = FlamingoConfig.from_dict(dict(cfg.flamingo.model))
    assert model_config.media_policy == "immediate"
    resampler = PerceiverResampler(
        dim=32, out_dim=16, num_latents=4, depth=1, heads=2, dim_head=8,
        max_media=model_config.perceiver_max_media, max_frames=model_config.perceiver_max_frames)
    randomize_all(resampler)  # trained-like: position embeddings start at zero and hide this
    patches = torch.randn(1, 1, 5, 32, generator=torch.Generator().manual_seed(0)).repeat(9, 1, 1, 1)
    with torch.no_grad():
        latents = resampler(patches, torch.arange(9))
    torch.testing.assert_close(latents[8], latents[0], rtol=0, atol=0)
