"""Contrastive training losses: CLIP softmax loss, SigLIP sigmoid loss.

Pure functions of tensors, so each is checked against a hand computation in the tests. The
causal-LM loss of every stage is :func:`flamingo_kit.loss.causal_lm_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLIP_INIT_LOG_SCALE = math.log(1 / 0.07)
CLIP_MAX_LOG_SCALE = math.log(100.0)
SIGLIP_INIT_LOG_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


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
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    log_scale: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the cosine-similarity matrix.

    ``s = exp(min(log_scale, log 100))``, ``logits = s * norm(X) @ norm(Y)^T`` and
    ``loss = (mean_i loss_i2t + mean_j loss_t2i) / 2`` (Radford et al. 2021). ``log_scale`` is
    learned from ``log(1/0.07)``; the clamp at 100 keeps it from making the softmax one-hot.

    ``negative_embeds`` (``[N, D]``, optional) are extra texts that match no image (hard
    negatives, :mod:`train.hard_negatives`): they join the image->text softmax as further
    columns, those with ``negative_mask`` False left out; the text->image term is unchanged.
    """
    scale = log_scale.clamp(max=CLIP_MAX_LOG_SCALE).exp()
    images = F.normalize(image_embeds.float(), dim=-1)
    logits = scale * images @ F.normalize(text_embeds.float(), dim=-1).t()
    i2t, t2i = clip_loss_from_logits(logits)
    if negative_embeds is not None:
        extra = scale * images @ F.normalize(negative_embeds.float(), dim=-1).t()
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask[None, :], float("-inf"))
        target = torch.arange(logits.size(0), device=logits.device)
        i2t = F.cross_entropy(torch.cat([logits, extra], dim=1), target, reduction="none")
    return (i2t.mean() + t2i.mean()) / 2


def siglip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    log_scale: torch.Tensor,
    bias: torch.Tensor,
    negative_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023).

    ``z_ij = exp(log_scale) * <norm(x_i), norm(y_j)> + bias``, label ``l_ij = 1`` if ``i == j``
    else ``-1``, ``loss = -(1/N) sum_{i,j} log sigmoid(l_ij * z_ij)``. Each pair is an
    independent binary problem, so no softmax over the batch is needed; the learned bias (init
    -10) offsets the N-1 negatives per positive at the start of training.

    ``negative_embeds``/``negative_mask`` (optional, as in :func:`clip_loss`) add pairs of every
    image with each kept extra text, labelled ``-1``.
    """
    scale = log_scale.exp()
    images = F.normalize(image_embeds.float(), dim=-1)
    logits = scale * images @ F.normalize(text_embeds.float(), dim=-1).t() + bias
    n = logits.size(0)
    signs = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    loss = -F.logsigmoid(signs * logits).sum()
    if negative_embeds is not None:
        extra = -F.logsigmoid(-(scale * images @ F.normalize(negative_embeds.float(), dim=-1).t()
                                + bias))
        if negative_mask is not None:
            extra = extra * negative_mask[None, :].to(extra.dtype)
        loss = loss + extra.sum()
    return loss / n
