"""Demonstration selection: RICES nearest neighbours, seeded random, class balance."""

from collections import Counter

import pytest
import torch

from eval_fewshot.datasets import Example
from eval_fewshot.selection import BalancedSelector, EmbeddingCache, RandomSelector, RicesSelector


def pool_of(n: int, n_classes: int = 1, pool: str = "") -> list[Example]:
    return [Example(uid=f"p{i}", image=f"p{i}.png", target=f"t{i}", references=(f"t{i}",),
                    label=f"class{i % n_classes}", pool=pool) for i in range(n)]


def query(uid: str, image: str = "q.png", pool: str = "") -> Example:
    return Example(uid=uid, image=image, target="", references=("",), pool=pool)


def test_random_selection_is_reproducible_per_seed():
    pools = {"": pool_of(50)}
    a = RandomSelector(pools, seed=1).select(query("x"), 8)
    assert a == RandomSelector(pools, seed=1).select(query("x"), 8)
    assert a != RandomSelector(pools, seed=2).select(query("x"), 8)
    assert a != RandomSelector(pools, seed=1).select(query("y"), 8)  # per query
    assert len({e.uid for e in a}) == 8  # without replacement


def test_fixed_random_selection_shares_one_set_per_seed():
    pools = {"": pool_of(50)}
    sel = RandomSelector(pools, seed=3, fixed=True)
    assert sel.select(query("x"), 4) == sel.select(query("y"), 4)
    assert sel.select(query("x"), 4) != RandomSelector(pools, 4, fixed=True).select(query("x"), 4)


def test_selection_stays_in_the_query_pool_and_checks_size():
    pools = {"a": pool_of(5, pool="a"), "b": pool_of(5, pool="b")}
    chosen = RandomSelector(pools, seed=0).select(query("x", pool="b"), 5)
    assert {e.pool for e in chosen} == {"b"}
    with pytest.raises(ValueError, match="holds 5"):
        RandomSelector(pools, seed=0).select(query("x", pool="a"), 6)


def test_balanced_selection_has_equal_class_counts():
    pools = {"": pool_of(40, n_classes=4)}
    for seed in range(5):
        chosen = BalancedSelector(pools, seed=seed).select(query("x"), 8)
        assert Counter(e.label for e in chosen) == {f"class{c}": 2 for c in range(4)}
    six = BalancedSelector(pools, seed=0).select(query("x"), 6)
    assert sorted(Counter(e.label for e in six).values()) == [1, 1, 2, 2]


def constructed_embedder(vectors: dict[str, list[float]], calls: list):
    def embed(paths):
        calls.append(list(paths))
        return torch.tensor([vectors[p] for p in paths])
    return embed


def test_rices_returns_true_nearest_neighbours_most_similar_last(tmp_path):
    g = torch.Generator().manual_seed(0)
    pool_vectors = torch.randn(30, 16, generator=g)
    query_vectors = torch.randn(5, 16, generator=g)
    vectors = {f"p{i}.png": v.tolist() for i, v in enumerate(pool_vectors)}
    vectors.update({f"q{i}.png": v.tolist() for i, v in enumerate(query_vectors)})
    calls: list = []
    pools = {"": pool_of(30)}
    cache = EmbeddingCache(str(tmp_path), "test-embedder")
    sel = RicesSelector(pools, constructed_embedder(vectors, calls), cache)
    queries = [query(f"q{i}", f"q{i}.png") for i in range(5)]
    chosen = sel.select_many(queries, 4)
    # Brute force: cosine similarity of every query with every pool vector.
    cos = torch.nn.functional.cosine_similarity(query_vectors[:, None], pool_vectors[None], dim=-1)
    for i in range(5):
        expected = cos[i].argsort(descending=True)[:4].flip(0)
        assert [e.uid for e in chosen[i]] == [f"p{j}" for j in expected.tolist()]
        sims = [float(cos[i, int(e.uid[1:])]) for e in chosen[i]]
        assert sims == sorted(sims)  # most similar last
    # A second selector reads the on-disk cache instead of embedding again.
    calls2: list = []
    again = RicesSelector(pools, constructed_embedder(vectors, calls2),
                          EmbeddingCache(str(tmp_path), "test-embedder"))
    assert again.select_many(queries, 4) == chosen
    assert calls2 == []
    assert len(list(tmp_path.glob("rices-*.pt"))) == 1
