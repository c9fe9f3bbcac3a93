"""One source's raw samples for one (rank, worker) stream, in a fixed order you can fast-forward.

Epoch ``e`` of a source is a deterministic function of ``(seed, source, e)``: the shard list is
shuffled, split by rank then by worker (or, when there are fewer shards than streams, every
stream reads all shards and keeps every ``n``-th sample), read with webdataset's tar reader and
shuffled in a seeded buffer. So a stream's position is just ``(epoch, samples taken)``, and
resuming replays the tar reads of the current epoch without decoding anything.

Errors while reading (truncated tar, missing shard, duplicate member) are counted by reason and
reading continues with the next shard. Shards are opened by ``data_pipelines.shard_access``:
local files unless the source allows ``pipe:`` or remote shards.
"""

from __future__ import annotations

import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import islice

import webdataset as wds

from data_pipelines.shard_access import shard_samples


def split_by_rank(items: Sequence, rank: int, world_size: int) -> list:
    """The items of one rank: every ``world_size``-th item starting at ``rank``."""
    return list(items)[rank::world_size]


def split_by_worker(items: Sequence, worker: int, num_workers: int) -> list:
    """The items of one dataloader worker within a rank (same rule as :func:`split_by_rank`)."""
    return list(items)[worker::num_workers]


def read_error_reason(exn: BaseException) -> str:
    """Counter key for an exception raised while reading a tar shard."""
    if isinstance(exn, FileNotFoundError):
        return "missing_shard"
    if isinstance(exn, (tarfile.ReadError, EOFError)) or "truncated" in str(exn).lower():
        return "truncated_tar"
    if "duplicate file name" in str(exn):
        return "duplicate_member"
    return "tar_error"


class SourceStream:
    """Raw (undecoded) samples of one source for one stream, endless when ``resampled``.

    ``stream`` is ``(rank, world_size, worker, num_workers)``. ``counts`` holds skip counts of
    this source by reason; decoding failures found later are added to it by the caller so a
    source's counts travel with its position in :meth:`state_dict`. ``allow_pipe`` /
    ``allow_remote`` let ``pipe:`` / URL shards be opened (see ``shard_access``).
    """

    def __init__(
        self,
        name: str,
        shards: Sequence[str],
        seed: int,
        stream: tuple[int, int, int, int],
        shuffle_buffer: int = 256,
        resampled: bool = True,
        allow_pipe: bool = False,
        allow_remote: bool = False,
    ):
        if not shards:
            raise ValueError(f"source {name!r} has no shards")
        self.name = name
        self.shards = list(shards)
        self.seed = seed
        self.rank, self.world_size, self.worker, self.num_workers = stream
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.allow_pipe, self.allow_remote = allow_pipe, allow_remote
        self.epoch = 0
        self.position = 0  # samples taken from the current epoch
        self.exhausted = False
        self.counts: Counter = Counter()
        self._iterator: Iterator[dict] | None = None

    def _count_error(self, exn: BaseException) -> bool:
        self.counts[read_error_reason(exn)] += 1
        return True  # keep reading: a bad shard must never stop training

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        shards = list(self.shards)
        random.Random(f"shards/{self.seed}/{self.name}/{epoch}").shuffle(shards)
        n_streams = self.world_size * self.num_workers
        if len(shards) >= n_streams:
            mine = split_by_worker(
                split_by_rank(shards, self.rank, self.world_size), self.worker, self.num_workers
            )
            sample_split = None
        else:  # too few shards to split: every stream reads them all and keeps its samples
            mine, sample_split = shards, self.rank * self.num_workers + self.worker
        samples = shard_samples(mine, self._count_error, self.name, self.allow_pipe,
                                self.allow_remote)
        if sample_split is not None:
            samples = islice(samples, sample_split, None, n_streams)
        rng = random.Random(
            f"samples/{self.seed}/{self.name}/{epoch}/{self.rank}/{self.worker}"
        )
        initial = min(self.shuffle_buffer, max(1, self.shuffle_buffer // 2))
        return iter(wds.shuffle(self.shuffle_buffer, initial, rng=rng)(samples))

    def _open(self) -> Iterator[dict]:
        saved = Counter(self.counts)
        iterator = self._epoch_samples(self.epoch)
        for _ in range(self.position):  # fast-forward: tar reads only, nothing decoded
            if next(iterator, None) is None:
                raise ValueError(
                    f"source {self.name!r}: saved position {self.position} of epoch {self.epoch} "
                    "is past the end of its shards; were the shards changed since the state "
                    "was saved?"
                )
        # Reading ahead to the saved position re-met errors that the saved counts hold already.
        self.counts = saved
        return iterator

    def next(self) -> dict | None:
        """The next raw sample, or ``None`` when a finite (not resampled) stream is done."""
        empty_epochs = 0
        while not self.exhausted:
            if self._iterator is None:
                self._iterator = self._open()
            sample = next(self._iterator, None)
            if sample is not None:
                self.position += 1
                return sample
            if self.position == 0:
                empty_epochs += 1
            if not self.resampled:
                self.exhausted = True
            elif empty_epochs >= 2:
                raise RuntimeError(
                    f"source {self.name!r} yields no samples for rank {self.rank} worker "
                    f"{self.worker} (shards: {self.shards[:3]}...); skipped so far: "
                    f"{dict(self.counts)}"
                )
            else:
                self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        return None

    def state_dict(self) -> dict:
        """Position and skip counts; plain ints and strings."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "exhausted": self.exhausted,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (the next sample is the one not yet taken)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.exhausted = bool(state.get("exhausted", False))
        self.counts = Counter(state.get("counts", {}))
        self._iterator = None
