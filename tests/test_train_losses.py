"""The contrastive losses against hand computations (the LM loss: tests/test_loss.py)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from train.losses import (
    CLIP_INIT_LOG_SCALE,
    clip_loss,
    clip_loss_from_logits,
    siglip_loss,
)

SIMILARITY = torch.tensor([[5.0, 1.2, 0.3], [0.8, 4.5, 0.5], [0.1, 0.7, 4.8]])


def test_clip_rows_match_hand_computation():
    i2t, t2i = clip_loss_from_logits(SIMILARITY)
    # Row 1: -log(e^5 / (e^5 + e^1.2 + e^0.3)) = log(1 + e^-3.8 + e^-4.7).
    assert i2t[0].item() == pytest.approx(math.log(1 + math.exp(-3.8) + math.exp(-4.7)), abs=1e-6)
    assert i2t[0].item() == pytest.approx(0.031, abs=5e-4)
    # Column 1 for text->image: log(1 + e^(0.8-5) + e^(0.1-5)).
    assert t2i[0].item() == pytest.approx(math.log(1 + math.exp(-4.2) + math.exp(-4.9)), abs=1e-6)


def test_clip_loss_scales_cosines_and_clamps_temperature():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 8), torch.randn(4, 8)
    cos = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    target = torch.arange(4)

    def expected(scale):
        logits = scale * cos
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

    init = torch.tensor([CLIP_INIT_LOG_SCALE])
    assert clip_loss(images, texts, init).item() == pytest.approx(expected(1 / 0.07).item(),
                                                                  rel=1e-5)
    # Above log(100) the scale is clamped to 100.
    assert clip_loss(images, texts, torch.tensor([10.0])).item() == pytest.approx(
        expected(100.0).item(), rel=1e-5)


def test_siglip_matches_formula_on_small_case():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    log_scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    cos = [[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]
    total = 0.0
    for i in range(2):
        for j in range(2):
            z = 10.0 * cos[i][j] - 10.0
            label = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-label * z)))
    assert siglip_loss(images, texts, log_scale, bias).item() == pytest.approx(total / 2, rel=1e-6)


def test_siglip_gradients_reach_temperature_and_bias():
    torch.manual_seed(0)
    log_scale = torch.tensor([math.log(10.0)], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    siglip_loss(torch.randn(3, 4), torch.randn(3, 4), log_scale, bias).backward()
    assert log_scale.grad.abs().item() > 0 and bias.grad.abs().item() > 0


def test_clip_hard_negatives_join_the_image_to_text_softmax():
    """Each extra text is one more wrong column for every image; masked ones count for nothing."""
    torch.manual_seed(0)
    images, texts, negatives = torch.randn(3, 8), torch.randn(3, 8), torch.randn(2, 8)
    log_scale = torch.tensor([math.log(10.0)])
    norm = partial(F.normalize, dim=-1)
    logits = 10.0 * norm(images) @ norm(torch.cat([texts, negatives])).t()
    target = torch.arange(3)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :3].t(), target)) / 2
    got = clip_loss(images, texts, log_scale, negatives, torch.tensor([True, True]))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    masked = clip_loss(images, texts, log_scale, negatives, torch.tensor([False, False]))
    assert masked.item() == pytest.approx(clip_loss(images, texts, log_scale).item(), rel=1e-6)
    assert got.item() > masked.item()


def test_siglip_hard_negatives_are_extra_negative_pairs():
    torch.manual_seed(0)
    images, texts, negatives = torch.randn(2, 4), torch.randn(2, 4), torch.randn(1, 4)
    log_scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-2.0])
    extra = 10.0 * F.normalize(images, dim=-1) @ F.normalize(negatives, dim=-1).t() - 2.0
    base = siglip_loss(images, texts, log_scale, bias)
    got = siglip_loss(images, texts, log_scale, bias, negatives, torch.tensor([True]))
    assert got.item() == pytest.approx(base.item() - F.logsigmoid(-extra).sum().item() / 2,
                                       rel=1e-6)
    masked = siglip_loss(images, texts, log_scale, bias, negatives, torch.tensor([False]))
    assert masked.item() == pytest.approx(base.item(), rel=1e-6)
