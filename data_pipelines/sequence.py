"""Turn one interleaved document into token ids, labels and its ordered list of images.

A document is a list of items, each a ``str`` or an image (any object; usually ``PIL.Image``).
Its token layout is::

    [BOS?] text before the first image <image>text one<|endofchunk|><image>text two<|endofchunk|><EOS>

Each image opens a chunk; the chunk's text follows it and ``<|endofchunk|>`` closes it. Images
with no text between them share one chunk (``<image><image>text<|endofchunk|>``), so a chunk is
never empty. Labels supervise only chunk text and its ``<|endofchunk|>``: padding, ``<image>``,
text before the first image and text between an ``<|endofchunk|>`` and the next ``<image>`` get
-100. The whole document is tokenised in one call, exactly as the evaluator tokenises prompts,
so training and evaluation see the same ids for the same text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flamingo_kit import batching
from flamingo_kit.batching import IGNORE_INDEX
from flamingo_kit.processing import EOC_TOKEN, IMAGE_TOKEN, add_flamingo_tokens


@dataclass
class TokenizedDocument:
    """Token ids and labels of one document, and its images in ``<image>`` token order."""

    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE_INDEX where not supervised
    images: list[Any]
    truncated: bool = False  # the document was longer than max_length and was cut

    @property
    def n_supervised(self) -> int:
        """How many tokens carry a loss."""
        return int((self.labels != IGNORE_INDEX).sum())


def document_text(items: Sequence[Any], max_images: int | None = None) -> tuple[str, list[Any]]:
    """Lay out a document as a string with media tokens; return it with its images in order.

    Images beyond ``max_images`` are dropped together with all text after them, so what remains
    is a prefix of the document: the model never sees text about an image it was not given.
    """
    parts: list[str] = []
    images: list[Any] = []
    open_chunk = False  # an <image> was placed and its chunk is not closed yet
    chunk_has_text = False
    for item in items:
        if isinstance(item, str):
            if not item:
                continue
            parts.append(item)
            chunk_has_text = open_chunk
            continue
        if max_images is not None and len(images) >= max_images:
            break
        if open_chunk and chunk_has_text:
            parts.append(EOC_TOKEN)
        parts.append(IMAGE_TOKEN)
        images.append(item)
        open_chunk, chunk_has_text = True, False
    if open_chunk:
        parts.append(EOC_TOKEN)
    return "".join(parts), images


def supervision_mask(
    input_ids: torch.Tensor, image_token_id: int, eoc_token_id: int
) -> torch.Tensor:
    """Boolean mask of the tokens that carry a loss (works on ``[T]`` or ``[B, T]``).

    A token is supervised when the latest ``<image>`` at or before it comes after the latest
    ``<|endofchunk|>`` strictly before it, and it is not itself an ``<image>``. So the
    ``<|endofchunk|>`` that closes a chunk is supervised (the model must learn to end a chunk)
    and everything up to the next ``<image>`` is not. Computed with running maxima, no loops.
    """
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(positions, -1)
    last_image = torch.where(input_ids == image_token_id, positions, none).cummax(-1).values
    last_eoc_inclusive = torch.where(input_ids == eoc_token_id, positions, none).cummax(-1).values
    # Shift right by one so a position sees only <|endofchunk|> tokens strictly before it.
    last_eoc = torch.cat([none[..., :1], last_eoc_inclusive[..., :-1]], dim=-1)
    return (last_image > last_eoc) & (input_ids != image_token_id)


class SequenceBuilder:
    """Tokenise documents into :class:`TokenizedDocument` with the layout of this module.

    ``max_length`` cuts the token sequence (the document says so: ``truncated``); every
    ``<image>`` left without text at the cut is dropped (adjacent images share one chunk), and
    the image list always matches the ``<image>`` tokens that remain, in order.
    """

    def __init__(self, tokenizer, max_length: int, max_images: int | None = None):
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (an <image> and a text token), got {max_length}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be >= 1 or None, got {max_images}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_images = max_images
        self.image_token_id, self.eoc_token_id = add_flamingo_tokens(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, items: Sequence[Any]) -> TokenizedDocument:
        """Tokenise one document (a list of ``str`` and image items)."""
        text, images = document_text(items, self.max_images)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids = ids + [self.eos_token_id]
        truncated = len(ids) > self.max_length
        ids = ids[: self.max_length]
        while ids and ids[-1] == self.image_token_id:
            ids = ids[:-1]  # images whose text was cut away (one chunk may hold several)
        ids = torch.tensor(ids, dtype=torch.long)
        n_images = int((ids == self.image_token_id).sum())
        labels = torch.where(
            supervision_mask(ids, self.image_token_id, self.eoc_token_id), ids, IGNORE_INDEX
        )
        return TokenizedDocument(ids, labels, list(images[:n_images]), truncated)


def collate(
    documents: Sequence[TokenizedDocument],
    pixels: Sequence[torch.Tensor],
    pad_token_id: int,
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of documents; ``pixels[b]`` is ``[N_b, C, H, W]`` for document ``b``.

    Returns ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` and ``pixel_values``
    ``[B, N, 1, C, H, W]`` zero-padded to the largest image count (at least one slot), as
    :func:`flamingo_kit.batching.collate` lays out every batch.
    """
    if len(documents) != len(pixels):
        raise ValueError(f"{len(documents)} documents but {len(pixels)} pixel tensors")
    return batching.collate([d.input_ids for d in documents], pixels, pad_token_id,
                            labels=[d.labels for d in documents], min_image_slots=1)
