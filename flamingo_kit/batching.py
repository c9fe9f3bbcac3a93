"""Rows of token ids and their images -> one padded batch: the processor's, the evaluator's and
the training data's.

``IGNORE_INDEX`` marks a label that carries no loss (padding, ``<image>``, text outside a chunk);
it is PyTorch cross-entropy's default ``ignore_index``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")


def collate(
    ids: Sequence[Sequence[int] | torch.Tensor],
    pixels: Sequence[torch.Tensor],
    pad_token_id: int,
    padding_side: str = "right",
    labels: Sequence[Sequence[int] | torch.Tensor] | None = None,
    min_image_slots: int = 0,
) -> dict[str, torch.Tensor]:
    """Pad rows of token ids to one width and put each row's images in its own slots.

    ``ids[b]`` holds row ``b``'s token ids and ``pixels[b]`` its images ``[N_b, C, H, W]`` in
    ``<image>`` order (any empty tensor when it has none). Returns ``input_ids`` (``pad_token_id``
    where padded) and ``attention_mask`` ``[B, T]``, padded on ``padding_side`` ("left" for
    generation, "right" for training and scoring); ``labels`` ``[B, T]`` padded with
    :data:`IGNORE_INDEX` when given; and ``pixel_values`` ``[B, N, 1, C, H, W]``, zero-padded to
    the largest image count but at least ``min_image_slots`` (absent when that is 0).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(pixels) != len(ids) or (labels is not None and len(labels) != len(ids)):
        raise ValueError(f"{len(ids)} rows of token ids but {len(pixels)} of images"
                         + ("" if labels is None else f" and {len(labels)} of labels"))
    batch_size, width = len(ids), max(len(row) for row in ids)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(ids):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[b, span] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[b, span] = 1
        if labels is not None:
            batch["labels"][b, span] = torch.as_tensor(labels[b], dtype=torch.long)
    n_slots = max(min_image_slots, *(len(p) for p in pixels))
    if n_slots:
        first = next((p for p in pixels if len(p)), None)
        if first is None:
            raise ValueError("a batch needs at least one image to know the pixel shape")
        pixel_values = first.new_zeros((batch_size, n_slots, 1, *first.shape[1:]))
        for b, images in enumerate(pixels):
            pixel_values[b, : len(images), 0] = images
        batch["pixel_values"] = pixel_values
    return batch
