"""Training batches from a weighted mixture of webdataset sources, deterministic and resumable.

Each (rank, worker) stream owns one :class:`MixtureStream`: a seeded RNG picks the source of the
next sample by weight, that source's :class:`~data_pipelines.streams.SourceStream` hands over raw
samples until one decodes, and every ``batch_size`` good samples become one batch. Its whole
position is small plain data (RNG state, per-source epoch and offset, skip counts), attached to
every batch it yields.

With ``pack=True`` a batch is ``batch_size`` rows of ``max_length`` tokens, each holding as
many whole documents as fit (``data_pipelines.packing``): documents are placed first-fit in the
order they come, the batch closes at the first one that fits in no row, and that document opens
the next batch. The state yielded with a packed batch is the position just before that
document was drawn, so a resumed stream draws it again, and nothing is lost or repeated.

Documents longer than ``max_length`` are cut (``SequenceBuilder``) and counted per source
(:meth:`Loader.truncated`), packed or not.

Resume guarantee: :meth:`Loader.state_dict` describes exactly the batches the caller has
received. After :meth:`Loader.load_state_dict` on a loader built with the same sources, seed,
batch size, rank, world size and number of workers, iteration yields exactly the batches an
uninterrupted run would have yielded next, with any ``num_workers``. Batches of a torch
``DataLoader`` come from its workers in turn, so the loader records which worker produced the
last batch and, on resume, renumbers workers so the one due next starts first.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset
from webdataset.utils import pytorch_worker_info

from data_pipelines.documents import DECODERS, SkipSample
from data_pipelines.packing import RowPacker
from data_pipelines.sequence import SequenceBuilder, collate
from data_pipelines.shard_access import expand_shards, warn_missing
from data_pipelines.streams import SourceStream

STATE_VERSION = 1


@dataclass
class SourceConfig:
    """One training source.

    ``kind`` is ``"interleaved"`` or ``"pairs"``; ``shards`` a local path, brace pattern, glob,
    directory of ``.tar`` files, or a list of these; ``weight`` its share of samples in the
    mixture (relative); ``loss_weight`` is passed through for the trainer (batches carry
    ``source_index``). ``pipe:`` shards (shell commands) are accepted only with
    ``allow_pipe=True`` and URLs (http, s3, gs, ...) only with ``allow_remote=True``; see
    ``data_pipelines.shard_access``. Missing local shards in a list are warned about once.
    ``weight_schedule`` lists ``(batch, weight)`` changes: from the stream's ``batch``-th batch
    on (0-based, counted per rank over all its workers) the source has that weight; before the
    first change it has ``weight``. A weight of 0 leaves the source out while it holds.
    """

    name: str
    kind: str
    shards: str | list[str]
    weight: float = 1.0
    loss_weight: float = 1.0
    allow_pipe: bool = False
    allow_remote: bool = False
    weight_schedule: list[tuple[int, float]] = field(default_factory=list)
    shard_paths: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.kind not in DECODERS:
            raise ValueError(
                f"source {self.name!r}: kind must be one of {sorted(DECODERS)}, got {self.kind!r}"
            )
        self.weight_schedule = [(int(b), float(w)) for b, w in self.weight_schedule]
        weights = [self.weight] + [w for _, w in self.weight_schedule]
        if not min(weights) >= 0 or not max(weights) > 0:
            raise ValueError(f"source {self.name!r}: weights must be >= 0 and one of them > 0, "
                             f"got {weights}")
        starts = [b for b, _ in self.weight_schedule]
        if starts != sorted(set(starts)) or (starts and starts[0] < 1):
            raise ValueError(f"source {self.name!r}: weight_schedule batches must be >= 1 and "
                             f"strictly increasing, got {starts}")
        self.shard_paths = expand_shards(self.shards, self.name, self.allow_pipe,
                                         self.allow_remote)
        if not self.shard_paths:
            raise ValueError(
                f"source {self.name!r}: no shards found for {self.shards!r}; pass a brace pattern "
                "like 'dir/docs-{000000..000003}.tar', a glob, a list of paths, or a directory "
                "of .tar"
            )
        warn_missing(self.shard_paths, self.name)

    def weight_at(self, batch: int) -> float:
        """The sampling weight for the stream's ``batch``-th batch (0-based)."""
        return ([self.weight] + [w for start, w in self.weight_schedule if start <= batch])[-1]


class MixtureStream:
    """Batches for one (rank, worker) stream; see the module docstring."""

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        builder: SequenceBuilder,
        image_processor,
        batch_size: int,
        seed: int,
        stream: tuple[int, int, int, int],
        shuffle_buffer: int,
        resampled: bool,
        pack: bool = False,
    ):
        self.sources = list(sources)
        self.builder = builder
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.pack = pack
        self.pad_token_id = builder.tokenizer.pad_token_id
        self.truncated = [0] * len(self.sources)  # documents cut to max_length, per source
        rank, _, worker, num_workers = stream
        self.worker, self.num_workers = worker, num_workers
        self.batches_done = 0  # batches this stream has yielded; the schedules read it
        # Packed: the saved position is just before the document that opens the next batch,
        # which was drawn while the previous batch filled; a resumed stream draws it at that
        # batch index, then moves on (see _packed_batches).
        self.opening_pending = False
        self.streams = [
            SourceStream(s.name, s.shard_paths, seed, stream, shuffle_buffer, resampled,
                         s.allow_pipe, s.allow_remote)
            for s in self.sources
        ]
        self.rng = random.Random(f"mixture/{seed}/{rank}/{worker}")

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss],
            "sources": [s.state_dict() for s in self.streams],
            "batches": self.batches_done,
            "opening_pending": self.opening_pending,
            "truncated": list(self.truncated),
        }

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.batches_done = int(state.get("batches", 0))
        self.opening_pending = bool(state.get("opening_pending", False))
        self.truncated = list(state.get("truncated", [0] * len(self.sources)))
        if len(state["sources"]) != len(self.streams):
            raise ValueError(
                f"saved state has {len(state['sources'])} sources, loader has {len(self.streams)}"
            )
        for stream, saved in zip(self.streams, state["sources"]):
            stream.load_state_dict(saved)

    def _prepare(self, index: int, raw: dict):
        """Raw sample -> (tokenized document, pixels [N, C, H, W]); raises SkipSample."""
        items = DECODERS[self.sources[index].kind](raw)
        doc = self.builder(items)
        if doc.n_supervised == 0:
            raise SkipSample("no_supervised_tokens", raw.get("__key__", "?"))
        self.truncated[index] += doc.truncated
        try:
            pixels = self.image_processor(images=doc.images, return_tensors="pt")["pixel_values"]
        except Exception as exn:  # a transform failing on one odd image must not stop training
            raise SkipSample("image_transform", f"{raw.get('__key__', '?')}: {exn}") from exn
        return doc, pixels

    def _next_sample(self):
        """The next good sample as (source index, doc, pixels), or None when all are done."""
        while True:
            active = [i for i, s in enumerate(self.streams) if not s.exhausted]
            if not active:
                return None
            # Workers take batches in turn, so this stream's next batch is the rank's
            # (done * workers + worker)-th: every stream switches weights at the same batch.
            batch = self.batches_done * self.num_workers + self.worker
            weights = [self.sources[i].weight_at(batch) for i in active]
            if not any(weights):
                raise RuntimeError(f"every unfinished source has weight 0 at batch {batch}: "
                                   f"{[self.sources[i].name for i in active]}")
            index = self.rng.choices(active, weights=weights)[0]
            stream = self.streams[index]
            start_epoch = stream.epoch
            while (raw := stream.next()) is not None:
                try:
                    return (index, *self._prepare(index, raw))
                except SkipSample as skip:
                    stream.counts[skip.reason] += 1
                if stream.epoch >= start_epoch + 2:
                    raise RuntimeError(
                        f"source {stream.name!r}: no usable sample in a whole epoch; "
                        f"skipped: {dict(stream.counts)}"
                    )

    def batches(self) -> Iterator[tuple[dict, dict]]:
        """Yield ``(batch, state after this batch)``; the last batch of a finite run may be short."""
        if self.pack:
            yield from self._packed_batches()
            return
        while True:
            samples = [s for s in (self._next_sample() for _ in range(self.batch_size)) if s]
            if not samples:
                return
            indices, docs, pixels = zip(*samples)
            batch = collate(docs, pixels, self.pad_token_id)
            batch["source_index"] = torch.tensor(indices, dtype=torch.long)
            self.batches_done += 1
            yield batch, self.state_dict()
            if len(samples) < self.batch_size:
                return

    def _packed_batches(self) -> Iterator[tuple[dict, dict]]:
        """Packed batches (module docstring); each state is the position before the document
        that opens the next batch, or after the last document when there is none."""
        waiting = None  # (sample, state before it was drawn): the document opening the batch
        while True:
            packer = RowPacker(self.batch_size, self.builder.max_length)
            while True:
                if waiting is None:
                    before, sample = self.state_dict(), self._next_sample()
                    if self.opening_pending:  # resumed: that was the opening document
                        self.opening_pending = False
                        self.batches_done += 1
                    if sample is None:  # a finite stream is done
                        break
                else:
                    (sample, before), waiting = waiting, None
                if not packer.add(sample):
                    waiting = (sample, {**before, "opening_pending": True})
                    break
            if packer.empty:
                return
            batch = packer.batch(self.pad_token_id)
            batch_done = waiting[1] if waiting is not None else self.state_dict()
            self.batches_done += 1
            yield batch, batch_done
            if waiting is None:
                return


class MixtureDataset(IterableDataset):
    """The iterable a torch ``DataLoader`` (``batch_size=None``) runs in each worker.

    Yields ``(batch, logical worker, state)``. Physical worker ``p`` plays logical worker
    ``(p + worker_offset) % num_workers``, which lets a resumed loader start with the worker that
    was due next. ``worker_states`` maps logical worker -> saved :class:`MixtureStream` state.
    """

    def __init__(self, sources, builder, image_processor, batch_size, seed, rank, world_size,
                 shuffle_buffer, resampled, pack=False):
        super().__init__()
        self.sources, self.builder, self.image_processor = sources, builder, image_processor
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.resampled, self.pack = shuffle_buffer, resampled, pack
        self.worker_offset = 0
        self.worker_states: dict[int, dict] = {}

    def stream_position(self) -> tuple[int, int, int, int]:
        """(rank, world size, logical worker, workers) of the calling process."""
        env_rank, env_world, worker, num_workers = pytorch_worker_info()
        rank = env_rank if self.rank is None else self.rank
        world_size = env_world if self.world_size is None else self.world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        return rank, world_size, (worker + self.worker_offset) % num_workers, num_workers

    def __iter__(self):
        stream = self.stream_position()
        mixture = MixtureStream(self.sources, self.builder, self.image_processor,
                                self.batch_size, self.seed, stream, self.shuffle_buffer,
                                self.resampled, self.pack)
        if stream[2] in self.worker_states:
            mixture.load_state_dict(self.worker_states[stream[2]])
        for batch, state in mixture.batches():
            yield batch, stream[2], state


class Loader:
    """Iterable over training batches with ``state_dict``/``load_state_dict`` and ``skipped``.

    Iterating again after a ``break`` continues where the last batch left off.
    """

    def __init__(self, dataset: MixtureDataset, num_workers: int, seed: int):
        self.dataset = dataset
        self.num_workers = num_workers
        self.seed = seed
        self._next_worker = 0
        self._states: dict[int, dict] = {}

    def __iter__(self) -> Iterator[dict]:
        self.dataset.worker_offset = self._next_worker
        self.dataset.worker_states = copy.deepcopy(self._states)
        if self.num_workers == 0:
            source = iter(self.dataset)
        else:
            source = iter(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                     persistent_workers=False))
        for batch, worker, state in source:
            self._states[int(worker)] = state
            total = max(self.num_workers, 1)
            self._next_worker = (int(worker) + 1) % total
            yield batch

    def skipped(self) -> dict[str, int]:
        """Samples dropped so far by reason (corrupt_image, bad_json, truncated_tar, ...)."""
        total: Counter = Counter()
        for state in self._states.values():
            for source in state["sources"]:
                total.update(source["counts"])
        return dict(total)

    def truncated(self) -> dict[str, int]:
        """Documents cut to ``max_length`` so far, by source name (only those with any)."""
        total: Counter = Counter()
        for state in self._states.values():
            for source, n in zip(self.dataset.sources, state.get("truncated", [])):
                total[source.name] += n
        return {name: n for name, n in total.items() if n}

    def state_dict(self) -> dict:
        """Position after the last batch handed out; plain Python data (torch.save/json safe)."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "rank": self.dataset.rank,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.dataset.batch_size,
            "pack": self.dataset.pack,
            "sources": [s.name for s in self.dataset.sources],
            "next_worker": self._next_worker,
            "workers": {str(k): v for k, v in self._states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the batches described by ``state``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')!r}")
        current = self.state_dict()
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size", "pack", "sources"):
            if state.get(key, False if key == "pack" else None) != current[key]:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={current[key]!r}; build the loader with the same {key} to resume"
                )
        self._next_worker = int(state["next_worker"])
        self._states = {int(k): copy.deepcopy(v) for k, v in state["workers"].items()}


def build_loader(
    sources: Sequence[SourceConfig],
    tokenizer,
    image_processor,
    batch_size: int = 4,
    max_length: int = 256,
    max_images: int | None = 8,
    seed: int = 0,
    rank: int | None = 0,
    world_size: int | None = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 256,
    resampled: bool = True,
    pack: bool = False,
) -> Loader:
    """A :class:`Loader` over ``sources`` mixed by weight (any non-empty subset works).

    ``rank``/``world_size`` ``None`` read ``RANK``/``WORLD_SIZE`` (or torch.distributed).
    ``resampled=False`` makes one pass over every source (an epoch) and stops. ``pack=True``
    packs documents into ``batch_size`` rows of ``max_length`` tokens (module docstring).
    """
    if not sources:
        raise ValueError("pass at least one SourceConfig")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must be unique, got {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    builder = SequenceBuilder(tokenizer, max_length=max_length, max_images=max_images)
    dataset = MixtureDataset(list(sources), builder, image_processor, batch_size, seed, rank,
                             world_size, shuffle_buffer, resampled, pack)
    return Loader(dataset, num_workers=num_workers, seed=seed)
