"""Training losses: weighted causal-LM cross-entropy, CLIP softmax loss, SigLIP sigmoid loss.

Pure functions of tensors, so each is checked against a hand computation in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flamingo_kit.batching import IGNORE_INDEX

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_LOG_SCALE = math.log(100.0)
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


def weighted_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy with a weight per sequence.

    ``loss = sum_{b,t} w_b * CE(logits[b, t], labels[b, t+1]) / #{(b, t): labels[b, t+1] != -100}``

    Normalising by the token count (not by the weights) means a batch whose rows all have
    weight 1 gives exactly the usual mean CE, and a source with weight 0.5 contributes half the
    gradient per token it supervises. Logits are upcast to fp32 because bf16 log-softmax over a
    large vocabulary loses the small probabilities that matter for the loss.
    """
    per_token = next_token_losses(logits, labels)
    if row_weights is not None:
        per_token = per_token * row_weights.to(per_token.dtype)[:, None]
    n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / n_tokens


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` fp32 cross-entropy of predicting ``labels[:, t+1]``; 0 where it is -100."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(shift_labels)


def token_loss_sums(logits: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token cross-entropy and the number of supervised tokens."""
    return next_token_losses(logits, labels).sum(1), (labels[:, 1:] != IGNORE_INDEX).sum(1)


def clip_loss_from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row image->text and text->image losses of a square logit matrix.

    ``logits[i, j] = s * <x_i, y_j>`` for image ``i`` and text ``j`` with matching pairs on the
    diagonal; ``loss_i2t[i] = -log softmax_j(logits[i, :])[i]`` and
    ``loss_t2i[j] = -log softmax_i(logits[:, j])[j]``.
    """
    target = torch.arange(logits.size(0), device=logits.device)
    i2t = F.cross_entropy(logits, target, reduction="none")
    t2i = F.cross_entropy(logits.t(), target, reduction="none")
    return i2t, t2i


def clip_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the cosine-similarity matrix.

    ``s = exp(min(log_scale, log 100))``, ``logits = s * norm(X) @ norm(Y)^T`` and
    ``loss = (mean_i loss_i2t + mean_j loss_t2i) / 2`` (Radford et al. 2021). ``log_scale`` is
    learned from ``log(1/0.07)``; the clamp at 100 keeps it from making the softmax one-hot.
    """
    scale = log_scale.clamp(max=CLIP_MAX_LOG_SCALE).exp()
    logits = scale * F.normalize(image_embeds.float(), dim=-1) @ F.normalize(
        text_embeds.float(), dim=-1
    ).t()
    i2t, t2i = clip_loss_from_logits(logits)
    return (i2t.mean() + t2i.mean()) / 2


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    log_scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

    ``z_ij = exp(log_scale) * <norm(x_i), norm(y_j)> + bias``, label ``l_ij = 1`` if ``i == j``
    else ``-1``, ``loss = -(1/N) sum_{i,j} log sigmoid(l_ij * z_ij)``. Each pair is an
    independent binary problem, so no softmax over the batch is needed; the learned bias (init
    -10) offsets the N-1 negatives per positive at the start of training.
    """
    logits = log_scale.exp() * F.normalize(image_embeds.float(), dim=-1) @ F.normalize(
        text_embeds.float(), dim=-1
    ).t() + bias
    n = logits.size(0)
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / n
