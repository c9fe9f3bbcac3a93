"""Several documents per training row (sequence packing), laid out as the model reads them.

A packed row holds whole documents one after the other. Each document's ``position_ids``
restart at 0, which is how ``FlamingoModel`` (and transformers) tell documents apart: no token
attends to another document's text or images, and each document's images count from 0, so a
packed row computes exactly what its documents compute alone (``tests/test_packing.py``). The
row is right-padded; the padding restarts its positions too (a document of its own with no
labels), so real tokens never see it. Labels are the documents' own: a document's first token
is never supervised (it is text before the first image or an ``<image>``), so nothing is
predicted across a boundary.

:class:`RowPacker` fills ``rows`` rows of ``capacity`` tokens first-fit, in arrival order, and
reports the first document that fits nowhere; the loader closes the batch there and starts the
next batch with that document, so every document is trained on, whole, exactly once, and the
documents of a batch are a contiguous run of the stream (which keeps resume exact).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data_pipelines.sequence import TokenizedDocument, collate

PackedItem = tuple[int, TokenizedDocument, torch.Tensor]  # (source index, document, pixels)


class RowPacker:
    """First-fit packing of documents into ``rows`` rows of at most ``capacity`` tokens."""

    def __init__(self, rows: int, capacity: int):
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows} and {capacity}")
        self.capacity = capacity
        self.rows: list[list[PackedItem]] = [[] for _ in range(rows)]
        self.lengths = [0] * rows

    @property
    def empty(self) -> bool:
        """No document placed yet."""
        return not any(self.lengths)

    def add(self, item: PackedItem) -> bool:
        """Place ``item`` in the first row with room; ``False`` if it fits in none."""
        length = len(item[1].input_ids)
        if length > self.capacity:
            raise ValueError(f"a document of {length} tokens cannot fit a row of "
                             f"{self.capacity}; cut documents to the row length first")
        for row, used in enumerate(self.lengths):
            if used + length <= self.capacity:
                self.rows[row].append(item)
                self.lengths[row] += length
                return True
        return False

    def batch(self, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The filled rows as one batch (:func:`collate_packed`); empty rows are left out."""
        return collate_packed([row for row in self.rows if row], pad_token_id)


def collate_packed(rows: Sequence[Sequence[PackedItem]],
                   pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows of ``(source index, document, pixels [N, C, H, W])`` -> a packed batch.

    Returns what :func:`~data_pipelines.sequence.collate` returns for one document per row made
    of the row's documents joined (``input_ids``, ``attention_mask`` (1 on real tokens),
    ``labels``, ``pixel_values`` with each row's images in order), plus ``position_ids``
    ``[B, T]`` restarting at 0 at every document and at the padding, and ``source_index``
    ``[B, T]``: the source of each token's document (0 on padding).
    """
    joined, pixels, sources, positions = [], [], [], []
    for row in rows:
        docs = [d for _, d, _ in row]
        joined.append(TokenizedDocument(torch.cat([d.input_ids for d in docs]),
                                        torch.cat([d.labels for d in docs]), []))
        pixels.append(torch.cat([p for _, _, p in row]))
        sources.append(torch.cat([torch.full((len(d.input_ids),), s, dtype=torch.long)
                                  for s, d, _ in row]))
        positions.append(torch.cat([torch.arange(len(d.input_ids)) for d in docs]))
    batch = collate(joined, pixels, pad_token_id)
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.arange(width).repeat(len(rows), 1)
    batch["source_index"] = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (pos, src) in enumerate(zip(positions, sources)):
        batch["position_ids"][b, : len(pos)] = pos
        batch["position_ids"][b, len(pos):] = torch.arange(width - len(pos))
        batch["source_index"][b, : len(src)] = src
    return batch

