"""The one causal-LM loss: hand computations, chunking, and the model's loss against its logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flamingo_kit import loss as loss_module
from flamingo_kit.batching import IGNORE_INDEX
from flamingo_kit.loss import LossTargets, causal_lm_loss
from tests.conftest import build_model, randomize_all


def full_logits_loss(logits, labels, weights=None):
    """The loss as computed before chunking: fp32 CE over all logits, weighted, / #supervised."""
    per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="none").view_as(labels[:, 1:])
    if weights is not None:
        per_token = per_token * (weights[:, None] if weights.dim() == 1 else weights[:, 1:])
    return per_token.sum() / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)


def test_loss_is_mean_ce_with_unit_weights_and_scales_rows():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3] = -100
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                            ignore_index=-100)
    assert causal_lm_loss(logits, labels).item() == pytest.approx(plain.item(), rel=1e-6)
    assert causal_lm_loss(logits, labels, weights=torch.ones(2)).item() == pytest.approx(
        plain.item(), rel=1e-6)
    per_row = [F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100,
                               reduction="sum") for b in range(2)]
    n_tokens = int((labels[:, 1:] != -100).sum())
    weighted = causal_lm_loss(logits, labels, weights=torch.tensor([1.0, 0.5]))
    assert weighted.item() == pytest.approx(((per_row[0] + 0.5 * per_row[1]) / n_tokens).item(),
                                            rel=1e-6)
    # A weight per label position (packed rows: per document) of the same values agrees.
    per_position = torch.tensor([[1.0] * 5, [0.5] * 5])
    assert causal_lm_loss(logits, labels, weights=per_position).item() == pytest.approx(
        weighted.item(), rel=1e-6)
    sums, counts = LossTargets.from_labels(labels).row_sums(logits)
    assert torch.allclose(sums, torch.stack(per_row)) and counts.tolist() == [3, 4]


def test_nothing_supervised_gives_zero_loss_with_a_gradient_path():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and not logits.grad.any()


@pytest.mark.parametrize("chunk_positions", [1, 3, 100])
def test_chunks_give_the_full_logits_loss_and_gradients(monkeypatch, chunk_positions):
    """Head applied to supervised positions, chunk by chunk (recomputed in backward when there
    are several): loss and gradients equal the full-logits loss, and the head never sees more
    than one chunk of positions or any unsupervised position."""
    vocab, dim = 13, 8
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", chunk_positions * vocab)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, dim, generator=gen)
    labels = torch.randint(0, vocab, (3, 6), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[2, 2] = IGNORE_INDEX
    weights = torch.rand(3, 6, generator=gen)
    head = torch.nn.Linear(dim, vocab)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))

    def run(chunked: bool):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        value = (causal_lm_loss(h, labels, head, weights, vocab) if chunked
                 else full_logits_loss(head(h), labels, weights))
        value.backward()
        return value.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()

    want = run(chunked=False)
    seen.clear()
    got = run(chunked=True)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert max(seen) <= chunk_positions
    recomputed = supervised > chunk_positions  # each chunk runs again in backward
    assert sum(seen) == supervised * (2 if recomputed else 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_loss_equals_the_loss_of_its_logits(monkeypatch, family):
    """FlamingoModel(labels=...) gives the loss and every gradient of its full logits."""
    monkeypatch.setattr(loss_module, "LOGITS_PER_CHUNK", 5 * 302)  # 5 positions per chunk
    model = randomize_all(build_model(family), seed=2).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 12), generator=gen)
    ids[:, [2, 7]] = 300  # <image>
    ids[:, 6] = 301  # <|endofchunk|>
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(ids == 300, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    weights = torch.tensor([1.0, 0.3])
    pixels = torch.randn(2, 2, 1, 3, 32, 32, generator=gen)

    def grads(use_labels: bool):
        model.zero_grad()
        if use_labels:
            value = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                          labels=labels, loss_weights=weights).loss
        else:
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            value = full_logits_loss(logits, labels.masked_fill(mask == 0, IGNORE_INDEX),
                                     weights)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                if p.requires_grad}

    want_loss, want = grads(use_labels=False)
    got_loss, got = grads(use_labels=True)
    assert torch.allclose(got_loss, want_loss, rtol=0, atol=1e-6)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=0, atol=1e-6), name
    assert model(input_ids=ids, pixel_values=pixels, labels=labels).logits is None
