"""The causal-LM loss of flamingo-kit: next-token cross-entropy on supervised positions only.

One loss for the model (``FlamingoModel.forward(labels=...)``), the trainer's stages and the
diagnostics. :meth:`LossTargets.from_labels` picks, once per batch, the positions whose next
token carries a label; the LM head then runs on those positions only (an unsupervised position
costs no head work at all), in chunks of at most :data:`LOGITS_PER_CHUNK` logits, so the
``[tokens, vocab]`` logits are never materialised in fp32 for the whole batch. With several
chunks each chunk is recomputed in backward (``torch.utils.checkpoint``), so at most one chunk's
logits exist at any time, in forward or backward; with one chunk nothing is recomputed.

    loss = sum_{(b, t) supervised} w[b, t+1] * CE(head(h[b, t]), labels[b, t+1]) / #supervised

Normalising by the number of supervised tokens (not by the weights) means a batch whose weights
are all 1 gives exactly the usual mean cross-entropy, and a source with weight 0.5 contributes
half the gradient per token it supervises. Logits are upcast to fp32 chunk by chunk, because
bf16 log-softmax over a large vocabulary loses the small probabilities that matter for the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flamingo_kit.batching import IGNORE_INDEX

# Logits alive at once in the loss (2**25 fp32 values: 128 MiB), e.g. 1,024 positions of a
# 32k vocabulary. A batch with fewer supervised positions runs as one chunk, without recompute.
LOGITS_PER_CHUNK = 2**25

Head = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LossTargets:
    """The supervised next-token predictions of a batch ``[B, T]``, flattened in row order.

    ``positions[i]`` is the flat index ``b * T + t`` of the token whose output predicts
    ``targets[i] = labels[b, t + 1]``; ``weights[i]`` its weight (``None``: all 1);
    ``rows[i] = b``. Selecting them needs the number of supervised tokens on the host (one
    sync), so build this at the start of a forward pass, before heavy work is queued.
    """

    positions: torch.Tensor
    rows: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None
    batch_size: int

    @classmethod
    def from_labels(cls, labels: torch.Tensor,
                    weights: torch.Tensor | None = None) -> LossTargets:
        """Targets of ``labels`` ``[B, T]`` (``IGNORE_INDEX``: no loss).

        ``weights`` is ``[B]`` (one per row) or ``[B, T]`` (one per label position, e.g. per
        document of a packed row).
        """
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, tokens], got shape {tuple(labels.shape)}")
        b, t = labels.shape
        following = labels[:, 1:]
        picked = torch.nonzero((following != IGNORE_INDEX).reshape(-1)).squeeze(1)
        rows = picked // max(t - 1, 1)
        positions = rows * t + picked % max(t - 1, 1)
        targets = following.reshape(-1)[picked]
        chosen = None
        if weights is not None:
            if weights.shape == (b,):
                chosen = weights[rows]
            elif weights.shape == (b, t):
                chosen = weights[:, 1:].reshape(-1)[picked]
            else:
                raise ValueError(f"loss weights must be [batch] or [batch, tokens] = {(b, t)}, "
                                 f"got shape {tuple(weights.shape)}")
            chosen = chosen.float()
        return cls(positions, rows, targets, chosen, b)

    @property
    def count(self) -> int:
        """Number of supervised predictions (known on the host, no sync)."""
        return self.targets.numel()

    def per_token(self, states: torch.Tensor, head: Head | None = None,
                  vocab_size: int | None = None) -> torch.Tensor:
        """``[count]`` weighted fp32 cross-entropy of each supervised prediction.

        ``states`` ``[B, T, D]`` are the LM's last hidden states and ``head`` maps ``[n, D]`` to
        logits ``[n, vocab_size]``; or ``states`` are logits ``[B, T, V]`` and ``head`` is
        ``None``. ``vocab_size`` sizes the chunks (required with a head).
        """
        if head is not None and vocab_size is None:
            raise ValueError("pass vocab_size (the head's number of logits) with a head")
        picked = states.reshape(-1, states.shape[-1]).index_select(0, self.positions)
        vocab = vocab_size or states.shape[-1]
        size = max(1, LOGITS_PER_CHUNK // vocab)
        recompute = torch.is_grad_enabled() and self.count > size
        out = []
        for start in range(0, self.count, size):
            part = slice(start, start + size)
            weights = None if self.weights is None else self.weights[part]
            args = (picked[part], self.targets[part], weights, head)
            out.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute
                       else _chunk_loss(*args))
        # Nothing supervised: an empty result that still belongs to the graph (backward works).
        return torch.cat(out) if out else picked.float().sum(-1)

    def loss(self, states: torch.Tensor, head: Head | None = None,
             vocab_size: int | None = None) -> torch.Tensor:
        """The weighted mean of the module docstring (0 when nothing is supervised)."""
        return self.per_token(states, head, vocab_size).sum() / max(self.count, 1)

    def row_sums(self, states: torch.Tensor, head: Head | None = None,
                 vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed weighted cross-entropy ``[B]`` and supervised-token count ``[B]``."""
        per_token = self.per_token(states, head, vocab_size)
        sums = per_token.new_zeros(self.batch_size).index_add(0, self.rows, per_token)
        counts = torch.bincount(self.rows, minlength=self.batch_size)
        return sums, counts


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None,
                head: Head | None) -> torch.Tensor:
    """Weighted fp32 cross-entropy of one chunk of supervised positions."""
    logits = hidden if head is None else head(hidden)
    loss = F.cross_entropy(logits.float(), targets, reduction="none")
    return loss if weights is None else loss * weights


def causal_lm_loss(states: torch.Tensor, labels: torch.Tensor, head: Head | None = None,
                   weights: torch.Tensor | None = None,
                   vocab_size: int | None = None) -> torch.Tensor:
    """Weighted mean next-token cross-entropy (module docstring) of ``labels`` ``[B, T]``.

    ``states``: logits ``[B, T, V]`` with ``head=None``, or last hidden states ``[B, T, D]``
    with the ``head`` that turns them into logits (then only supervised positions reach it).
    """
    return LossTargets.from_labels(labels, weights).loss(states, head, vocab_size)
