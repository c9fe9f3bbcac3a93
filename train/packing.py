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


class CopyWarmupLoader:
    """Mixes repeated random-token rows into the batches of a packed-block loader.

    A row ``x x x ...`` (one random segment, repeated) can only be predicted after its first
    copy by looking back, which is what forms induction (copy-from-context) heads. A small LM
    forms them within a few hundred steps of such rows, while on natural or synthetic text
    alone it stays on a plateau for far longer than a CPU budget; once formed, they are
    reused for in-context tasks such as binding fresh names. For the first ``warmup_steps``
    batches every row is a copy row, afterwards a ``fraction`` of each batch is.
    Copy rows are a pure function of ``(seed, step)``, so resume stays exact.
    """

    def __init__(self, inner: PackedBlockLoader, token_ids: Sequence[int], warmup_steps: int,
                 fraction: float = 0.0, segment: int = 32, seed: int = 0):
        if warmup_steps < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= fraction <= 1, got "
                             f"{warmup_steps} and {fraction}")
        if segment < 1 or len(token_ids) < 2:
            raise ValueError("copy rows need segment >= 1 and at least 2 token ids to draw from")
        self.inner = inner
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.warmup_steps, self.fraction, self.segment = warmup_steps, fraction, segment
        self.seed = seed
        self.step = 0

    def _copy_rows(self, n: int, block_size: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        picks = torch.randint(len(self.token_ids), (n, self.segment), generator=generator)
        repeats = -(-block_size // self.segment)
        return self.token_ids[picks].repeat(1, repeats)[:, :block_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.inner:
            ids = batch["input_ids"]
            n = len(ids) if self.step < self.warmup_steps else round(self.fraction * len(ids))
            if n:
                ids = ids.clone()
                ids[:n] = self._copy_rows(n, ids.size(1))
                batch = {**batch, "input_ids": ids, "labels": ids.clone()}
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's position and the number of batches served."""
        return {**self.inner.state_dict(), "copy_step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        state = dict(state)
        self.step = int(state.pop("copy_step"))
        self.inner.load_state_dict(state)

    def skipped(self) -> dict[str, int]:
        """What the wrapped loader dropped (copy rows drop nothing)."""
        return self.inner.skipped()
