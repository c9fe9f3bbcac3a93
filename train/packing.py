"""Fixed-length token blocks for causal-LM pretraining, streamed with an exact resume position.

Documents are tokenized in one batched call, joined with EOS and cut into blocks of
``block_size`` tokens (the tail that does not fill a block is dropped), so no compute is spent
on padding. Each epoch visits every block once in a seeded random order; the state is just
``(epoch, position)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def pack_documents(
    token_lists: Sequence[Sequence[int]], eos_id: int, block_size: int
) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, into a ``[N, block_size]`` tensor."""
    if not token_lists:
        raise ValueError("no documents to pack")
    eos = np.array([eos_id], dtype=np.int64)
    flat = np.concatenate([part for t in token_lists for part in (np.asarray(t, np.int64), eos)])
    n_blocks = flat.size // block_size
    if n_blocks == 0:
        raise ValueError(
            f"the corpus has {flat.size} tokens, fewer than one block of {block_size}; "
            "lower lm.block_size or give a larger corpus"
        )
    return torch.from_numpy(flat[: n_blocks * block_size].reshape(n_blocks, block_size))


class PackedBlockLoader:
    """Infinite stream of ``{"input_ids", "attention_mask", "labels"}`` batches of packed blocks.

    Rank ``r`` of ``world_size`` takes every ``world_size``-th batch-sized slice of the shared
    epoch order, so ranks never see the same block in one epoch. ``state_dict`` is the position
    of the next batch, so a resumed run continues with exactly the next samples.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if blocks.size(0) < batch_size * world_size:
            raise ValueError(
                f"{blocks.size(0)} blocks cannot fill one batch of {batch_size} on each of "
                f"{world_size} ranks; use a larger corpus or a smaller batch/block size"
            )
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0  # index of the next global batch within the epoch

    def _order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.blocks.size(0), generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        global_batch = self.batch_size * self.world_size
        batches_per_epoch = self.blocks.size(0) // global_batch
        while True:
            order = self._order(self.epoch)
            while self.position < batches_per_epoch:
                start = self.position * global_batch + self.rank * self.batch_size
                ids = self.blocks[order[start : start + self.batch_size]]
                self.position += 1
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "labels": ids.clone()}
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Position of the next batch."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def skipped(self) -> dict[str, int]:
        """Packed text has nothing to drop."""
        return {}
