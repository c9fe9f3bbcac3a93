"""The two tokens Flamingo adds to a frozen LM: ``<image>`` and ``<|endofchunk|>``.

Like IDEFICS' ``IdeficsDecoupledEmbedding`` and ``IdeficsDecoupledLinear``, the LM's own embedding
table and head stay untouched (and frozen); :class:`MediaTokens` owns what is new: two trainable
embedding rows, two trainable head rows and their biases. ``FlamingoModel.forward`` calls it
twice, in the open: ``media_tokens.embedding(input_ids, lm_table)`` embeds the input, and
``media_tokens.head(hidden, lm_head)`` turns the LM's last hidden states into logits over the
LM vocabulary plus the two media tokens.

Reading order: :class:`LogitScaling` and :func:`logit_scaling` (what an LM's causal-LM class does
around its head), :func:`media_token_ids` (which ids the tokens get), :class:`MediaTokenEmbedding`,
:class:`MediaTokenHead`, :class:`MediaTokens` (both, built from an LM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Config fields with which causal-LM classes rescale around their head. Those of the families in
# ``_RESCALING`` are reproduced; for any other LM a value other than 1 is refused, since the
# logits would differ from the LM's own.
RESCALING_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "logits_soft_cap",
                    "logits_mup_width_multiplier", "output_multiplier")


@dataclass(frozen=True)
class LogitScaling:
    """What an LM's causal-LM class does around its head beyond ``head(hidden)``, in its order.

    ``hidden_divisor`` divides the hidden states before the head (MiniCPM3); ``multiplier`` or
    ``divisor`` then scales the logits (Cohere's ``logit_scale``, Granite's ``logits_scaling``,
    ...), and ``softcap`` caps them: ``tanh(logits / cap) * cap`` (Gemma 2 and later). ``None``:
    that step is not taken. Each step is the LM's own operation, so the logits are bit for bit
    the LM's; the media tokens' logits go through the same steps.
    """

    hidden_divisor: float | None = None
    multiplier: float | None = None
    divisor: float | None = None
    softcap: float | None = None

    def scale_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's input, as the LM's class prepares it."""
        return hidden if self.hidden_divisor is None else hidden / self.hidden_divisor

    def rescale(self, logits: torch.Tensor) -> torch.Tensor:
        """The head's output, rescaled and capped as the LM's class does it."""
        if self.multiplier is not None:
            logits = logits * self.multiplier
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


def _falcon_h1(config) -> LogitScaling:
    if config.embedding_multiplier not in (None, 1, 1.0):
        raise ValueError(
            f"FalconH1ForCausalLM scales token embeddings (embedding_multiplier="
            f"{config.embedding_multiplier}) only when given token ids, and flamingo-kit passes "
            "embeddings: its logits would differ from the LM's own")
    return LogitScaling(multiplier=config.lm_head_multiplier)


# Causal-LM classes (by ``model_type``) that rescale around their head, as their ``forward`` in
# transformers 5.x does it; each is checked against the LM itself in tests/test_model.py.
_RESCALING: dict[str, Callable[[Any], LogitScaling]] = {
    "cohere": lambda config: LogitScaling(multiplier=config.logit_scale),
    "cohere2": lambda config: LogitScaling(multiplier=config.logit_scale),
    "granite": lambda config: LogitScaling(divisor=config.logits_scaling),
    "granitemoe": lambda config: LogitScaling(divisor=config.logits_scaling),
    "granitemoeshared": lambda config: LogitScaling(divisor=config.logits_scaling),
    "hyperclovax": lambda config: LogitScaling(multiplier=config.logits_scaling),
    "minicpm3": lambda config: LogitScaling(hidden_divisor=config.logits_scaling),
    "falcon_h1": _falcon_h1,
}


def logit_scaling(lm: nn.Module) -> LogitScaling:
    """How ``lm``'s causal-LM class rescales around its head; raises for one not reproduced."""
    config = lm.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    if config.model_type in _RESCALING:
        return replace(_RESCALING[config.model_type](config), softcap=softcap)
    scaled = [name for name in RESCALING_FIELDS if getattr(config, name, None) not in (None, 1, 1.0)]
    if scaled:
        raise ValueError(
            f"{type(lm).__name__} rescales its logits ({scaled[0]}={getattr(config, scaled[0])}), "
            "which flamingo-kit does not reproduce for this model type: its logits would "
            "differ from the LM's own")
    return LogitScaling(softcap=softcap)


def media_token_ids(lm: nn.Module, image_token_id: int | None,
                    eoc_token_id: int | None) -> tuple[int, int]:
    """Ids of ``<image>`` and ``<|endofchunk|>``; ``None`` appends them after the LM vocabulary."""
    vocab = lm.get_input_embeddings().num_embeddings
    if image_token_id is None:
        image_token_id = vocab
    if eoc_token_id is None:
        eoc_token_id = image_token_id + 1
    if image_token_id == eoc_token_id:
        raise ValueError("image_token_id and eoc_token_id must differ")
    return image_token_id, eoc_token_id


class MediaTokenEmbedding(nn.Module):
    """Token embeddings: the LM's frozen table, except the media tokens, which get their own rows.

    ``weight`` ``[2, D]``: row 0 embeds ``<image>``, row 1 ``<|endofchunk|>``. Both start at the
    mean of the LM's rows: plausible, not dominant.
    """

    @torch.no_grad()
    def __init__(self, table: nn.Embedding, image_token_id: int, eoc_token_id: int):
        super().__init__()
        self.image_token_id, self.eoc_token_id = image_token_id, eoc_token_id
        n, total = table.num_embeddings, None
        for start in range(0, n, 8192):  # chunked: vocabularies can be large
            ids = torch.arange(start, min(n, start + 8192), device=table.weight.device)
            part = table(ids).float().sum(0)
            total = part if total is None else total + part
        self.weight = nn.Parameter((total / n).repeat(2, 1))

    def check_ids(self, input_ids: torch.Tensor, table: nn.Embedding) -> None:
        """Raise, naming the first one, if an id is in neither vocabulary (one host sync)."""
        is_new = (input_ids == self.image_token_id) | (input_ids == self.eoc_token_id)
        bad = ~is_new & ((input_ids < 0) | (input_ids >= table.num_embeddings))
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"input_ids{list(where)} = {int(input_ids[where])} is not a token id: the LM "
                f"vocabulary is 0..{table.num_embeddings - 1}, the media tokens "
                f"{self.image_token_id} and {self.eoc_token_id}")

    def check_vocabulary(self, n_ids: int, table: nn.Embedding) -> None:
        """Raise unless every id ``0..n_ids - 1`` (a tokenizer's) can be embedded.

        Checked once where a tokenizer meets the model (the trainer's setup), so that training
        steps need not check their ids (:meth:`check_ids`, a host sync).
        """
        media = {self.image_token_id, self.eoc_token_id}
        outside = [i for i in range(table.num_embeddings, n_ids) if i not in media]
        if outside:
            raise ValueError(
                f"the tokenizer has {n_ids} ids but the LM's embedding table holds "
                f"{table.num_embeddings} and the media tokens are {sorted(media)}: ids "
                f"{outside[:5]}{' ...' if len(outside) > 5 else ''} cannot be embedded; use the "
                "LM's own tokenizer")

    def forward(self, input_ids: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        """``input_ids`` ``[B, T]`` -> ``[B, T, D]``; ids must be valid (see :meth:`check_ids`)."""
        is_image = input_ids == self.image_token_id
        is_new = is_image | (input_ids == self.eoc_token_id)
        base = table(input_ids.masked_fill(is_new, 0))
        new = self.weight[(~is_image).long()].to(base.dtype)
        return torch.where(is_new[..., None], new, base)


class MediaTokenHead(nn.Module):
    """Logits: the LM's frozen head for its vocabulary, two own rows for the media tokens.

    ``weight`` ``[2, D]`` and ``bias`` ``[2]`` score ``<image>`` and ``<|endofchunk|>``; they start
    at the mean of the LM head's rows (and bias). The logits span ``vocab_size`` entries: an LM
    head with fewer rows than the media ids need is padded with the dtype's minimum. ``scaling``
    repeats what the LM's causal-LM class does around its head (:class:`LogitScaling`), with the
    media logits in place, as that class would do it to a head holding their rows.
    """

    @torch.no_grad()
    def __init__(self, head: nn.Module, token_ids: tuple[int, int], vocab_size: int,
                 scaling: LogitScaling | None = None):
        super().__init__()
        self.vocab_size, self.scaling = vocab_size, scaling or LogitScaling()
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.weight = nn.Parameter(head.weight.float().mean(0).repeat(2, 1))
        bias = getattr(head, "bias", None)
        init_bias = bias.float().mean() if bias is not None else torch.tensor(0.0)
        self.bias = nn.Parameter(init_bias.repeat(2))

    def forward(self, hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
        """The LM's last hidden states ``[B, T, D]`` -> logits ``[B, T, vocab_size]``."""
        hidden = self.scaling.scale_hidden(hidden)
        logits = head(hidden)
        extra = F.linear(hidden, self.weight.to(hidden.dtype),
                         self.bias.to(hidden.dtype)).to(logits.dtype)
        if logits.shape[-1] < self.vocab_size:
            pad = logits.new_full((*logits.shape[:-1], self.vocab_size - logits.shape[-1]),
                                  torch.finfo(logits.dtype).min)
            logits = torch.cat([logits, pad], dim=-1)
        return self.scaling.rescale(logits.index_copy(-1, self.token_ids, extra))


class MediaTokens(nn.Module):
    """The media tokens' trainable rows beside a frozen LM: ``embedding`` and ``head``."""

    def __init__(self, lm: nn.Module, image_token_id: int, eoc_token_id: int):
        super().__init__()
        table, head = lm.get_input_embeddings(), lm.get_output_embeddings()
        vocab_size = max(table.num_embeddings, head.weight.shape[0],
                         image_token_id + 1, eoc_token_id + 1)
        self.embedding = MediaTokenEmbedding(table, image_token_id, eoc_token_id)
        self.head = MediaTokenHead(head, (image_token_id, eoc_token_id), vocab_size,
                                   logit_scaling(lm))
