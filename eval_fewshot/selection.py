"""Choosing demonstrations for a query: random, class-balanced, or RICES.

All selectors draw only from the query's demonstration pool (the train split, or a label-binding
episode's support set) and return demonstrations oldest-first, i.e. in prompt order.

- :class:`RandomSelector`: ``k`` examples uniformly without replacement. Seeded per query from
  ``(seed, pool, query uid)``, so the choice does not depend on batch or rank order; with
  ``fixed=True`` one set per pool and seed is shared by every query (prefix-cache friendly).
- :class:`BalancedSelector`: as many examples of each class as possible (classification,
  label binding), in shuffled order; also ``fixed`` or per query.
- :class:`RicesSelector` (Yang et al. 2022, used by Flamingo/OpenFlamingo): the ``k`` pool
  images most similar to the query image by cosine similarity of vision-tower embeddings, most
  similar *last* (nearest to the query). Embeddings are cached on disk.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from eval_fewshot.datasets import Example


class Selector:
    """Base class: ``select(query, k)`` -> ``k`` demonstrations in prompt order."""

    #: True when every query of a pool gets the same demonstrations for a given seed.
    fixed: bool = False

    def select(self, query: Example, k: int) -> list[Example]:  # pragma: no cover - interface
        """Demonstrations for ``query``."""
        raise NotImplementedError


def _check_k(pool: Sequence[Example], k: int, name: str) -> None:
    if k > len(pool):
        raise ValueError(f"asked for {k} demonstrations but pool {name!r} holds {len(pool)}")


class RandomSelector(Selector):
    """Uniform random demonstrations, reproducible per seed (see the module docstring)."""

    def __init__(self, pools: Mapping[str, Sequence[Example]], seed: int, fixed: bool = False):
        self.pools, self.seed, self.fixed = pools, seed, fixed

    def _rng(self, query: Example) -> random.Random:
        key = f"{self.seed}:{query.pool}" if self.fixed else f"{self.seed}:{query.pool}:{query.uid}"
        return random.Random(key)  # str seeds hash deterministically (sha512), unlike hash()

    def select(self, query: Example, k: int) -> list[Example]:
        """``k`` random demonstrations from the query's pool."""
        pool = self.pools[query.pool]
        _check_k(pool, k, query.pool)
        return self._rng(query).sample(list(pool), k)


class BalancedSelector(RandomSelector):
    """Class-balanced random demonstrations: counts per class differ by at most one."""

    def select(self, query: Example, k: int) -> list[Example]:
        """``k`` demonstrations cycling over the classes in random order."""
        pool = self.pools[query.pool]
        _check_k(pool, k, query.pool)
        rng = self._rng(query)
        by_class: dict[str, list[Example]] = defaultdict(list)
        for example in pool:
            by_class[str(example.label)].append(example)
        queues = [rng.sample(items, len(items)) for _, items in sorted(by_class.items())]
        rng.shuffle(queues)
        chosen: list[Example] = []
        while len(chosen) < k:
            for queue in queues:
                if queue and len(chosen) < k:
                    chosen.append(queue.pop())
        rng.shuffle(chosen)
        return chosen


class EmbeddingCache:
    """Image embeddings on disk, keyed by the embedder's name and the image paths.

    One ``.pt`` file per embedder holds ``{"paths": [...], "embeddings": Tensor[N, D]}``;
    images not in it yet are embedded in batches and the file is rewritten atomically.
    """

    def __init__(self, directory: str | None, embedder_name: str):
        self.path = None
        self._known: dict[str, torch.Tensor] | None = None
        if directory:
            digest = hashlib.sha1(embedder_name.encode()).hexdigest()[:16]
            self.path = os.path.join(directory, f"rices-{digest}.pt")

    def _load(self) -> dict[str, torch.Tensor]:
        if self._known is None:
            self._known = {}
            if self.path is not None and os.path.exists(self.path):
                data = torch.load(self.path, weights_only=True)
                self._known = dict(zip(data["paths"], data["embeddings"]))
        return self._known

    def get(
        self,
        paths: Sequence[str],
        embed: Callable[[Sequence[str]], torch.Tensor],
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Embeddings ``[len(paths), D]`` (float32), computing only the missing ones."""
        known = self._load()
        missing = sorted({p for p in paths if p not in known})
        for start in tqdm(range(0, len(missing), batch_size), desc="RICES embeddings",
                          disable=not missing):
            batch = missing[start : start + batch_size]
            known.update(zip(batch, embed(batch).float().cpu()))
        if missing and self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp{os.getpid()}"
            names = sorted(known)
            torch.save({"paths": names, "embeddings": torch.stack([known[p] for p in names])}, tmp)
            os.replace(tmp, self.path)
        return torch.stack([known[p] for p in paths])


class RicesSelector(Selector):
    """Most similar pool images by cosine similarity of embeddings, most similar last."""

    def __init__(
        self,
        pools: Mapping[str, Sequence[Example]],
        embed: Callable[[Sequence[str]], torch.Tensor],
        cache: EmbeddingCache | None = None,
        batch_size: int = 64,
    ):
        self.pools = pools
        self.embed = embed
        self.cache = cache or EmbeddingCache(None, "in-memory")
        self.batch_size = batch_size
        self._pool_embeddings: dict[str, torch.Tensor] = {}

    def _normalised(self, paths: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(self.cache.get(paths, self.embed, self.batch_size),
                                             dim=-1)

    def pool_embeddings(self, pool: str) -> torch.Tensor:
        """Unit-norm embeddings of a pool's images (computed once)."""
        if pool not in self._pool_embeddings:
            self._pool_embeddings[pool] = self._normalised([e.image for e in self.pools[pool]])
        return self._pool_embeddings[pool]

    def select(self, query: Example, k: int) -> list[Example]:
        """The ``k`` nearest pool examples to the query image, nearest last."""
        return self.select_many([query], k)[0]

    def select_many(self, queries: Sequence[Example], k: int) -> list[list[Example]]:
        """:meth:`select` for many queries with one embedding pass and one matrix product."""
        out: list[list[Example]] = [[] for _ in queries]
        by_pool: dict[str, list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            by_pool[q.pool].append(i)
        for pool, indices in by_pool.items():
            _check_k(self.pools[pool], k, pool)
            if k == 0:
                continue
            sims = self._normalised([queries[i].image for i in indices]) @ self.pool_embeddings(
                pool).T
            # topk sorts descending; flip so the most similar demonstration is nearest the query.
            nearest = sims.topk(k, dim=1).indices.flip(1)
            for row, i in enumerate(indices):
                out[i] = [self.pools[pool][j] for j in nearest[row].tolist()]
        return out
