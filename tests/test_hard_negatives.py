"""Hard-negative captions: one word swapped within its group, deterministically; bad groups named."""

from __future__ import annotations

import pytest
import torch

from train.hard_negatives import swap_one_word, word_group_token_ids

GROUPS = [[10, 11, 12], [20, 21]]


def test_swap_changes_exactly_one_group_token_to_another_of_its_group():
    ids = torch.tensor([[1, 10, 5, 20, 0], [1, 5, 6, 7, 0], [1, 21, 21, 12, 0]])
    negatives, has_negative = swap_one_word(ids, GROUPS)
    assert has_negative.tolist() == [True, False, True]
    assert torch.equal(negatives[1], ids[1])
    for row in (0, 2):
        changed = (negatives[row] != ids[row]).nonzero().flatten().tolist()
        assert len(changed) == 1
        old, new = int(ids[row, changed[0]]), int(negatives[row, changed[0]])
        assert any(old in group and new in group for group in GROUPS)
    again, _ = swap_one_word(ids, GROUPS)
    assert torch.equal(again, negatives)  # a function of the tokens: resumed runs see the same


def test_swaps_cover_every_word_of_a_group():
    """Over many captions each word of a group is swapped in and out (no fixed substitute)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(30, 40, (200, 6), generator=gen)
    ids[:, 2] = torch.tensor(GROUPS[0])[torch.randint(0, 3, (200,), generator=gen)]
    negatives, _ = swap_one_word(ids, GROUPS)
    pairs = {(int(a), int(b)) for a, b in zip(ids[:, 2], negatives[:, 2])}
    assert pairs == {(a, b) for a in GROUPS[0] for b in GROUPS[0] if a != b}


def test_word_groups_are_validated_naming_the_word(tokenizer):
    """(The tests' 300-piece tokenizer has few whole words: ``a``, ``is``, ``s``, ``t``.)"""
    ids = word_group_token_ids(tokenizer, [["a", "is"], ["s", "t"]])
    assert ids == [tokenizer.convert_tokens_to_ids(["▁a", "▁is"]),
                   tokenizer.convert_tokens_to_ids(["▁s", "▁t"])]
    with pytest.raises(ValueError, match="at least two words"):
        word_group_token_ids(tokenizer, [["a"]])
    with pytest.raises(ValueError, match="'a' is in groups 0 and 1"):
        word_group_token_ids(tokenizer, [["a", "is"], ["a", "s"]])
    with pytest.raises(ValueError, match=r"\[0\]: 'circle' is 5 tokens"):
        word_group_token_ids(tokenizer, [["a", "circle"]])
