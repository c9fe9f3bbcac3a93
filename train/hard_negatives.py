"""Hard-negative captions for contrastive training: the caption with one word swapped.

A contrastive batch of random captions is usually told apart by its easiest attribute (in the
synthetic world: colour, size and position), so the vision tower never has to encode the others
(shape). Adding, for every caption, a copy with one word replaced by another word of the same
group (``circle`` -> ``square``) as an extra negative forces the image embedding to encode what
that group names (NegCLIP, Yuksekgonul et al. 2023).

Swaps work on token ids, so every word of a group must be one token of the tokenizer. The
choice of the swapped word and its replacement is a function of the caption's tokens alone: no
random state, so resumed training sees the same negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def word_group_token_ids(tokenizer, groups: Sequence[Sequence[str]]) -> list[list[int]]:
    """Token ids of each group's words (as they appear after a space), validated.

    Raises ``ValueError`` naming the word when it is not a single token, when a group has fewer
    than two words, or when a word is in two groups.
    """
    out, seen = [], {}
    for g, words in enumerate(groups):
        if len(words) < 2:
            raise ValueError(f"contrastive.hard_negative_words[{g}] needs at least two words to "
                             f"swap between, got {list(words)}")
        ids = []
        for word in words:
            pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise ValueError(
                    f"contrastive.hard_negative_words[{g}]: {word!r} is {len(pieces)} tokens "
                    f"{tokenizer.convert_ids_to_tokens(pieces)} for this tokenizer; swaps need "
                    "single-token words")
            if pieces[0] in seen:
                raise ValueError(f"contrastive.hard_negative_words: {word!r} is in groups "
                                 f"{seen[pieces[0]]} and {g}")
            seen[pieces[0]] = g
            ids.append(pieces[0])
        out.append(ids)
    return out


def swap_one_word(input_ids: torch.Tensor, groups: Sequence[Sequence[int]]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, one token of a group replaced by another token of the same group.

    Returns ``(negatives, has_negative)``: ``[B, T]`` ids and a ``[B]`` bool mask; rows with no
    group token are returned unchanged with ``has_negative`` False. Which occurrence is swapped
    and for which word is decided by a hash of the row's tokens (deterministic, stateless).
    """
    negatives = input_ids.clone()
    has_negative = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    group_of = {tok: (g, i) for g, ids in enumerate(groups) for i, tok in enumerate(ids)}
    weights = torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)
    for row in range(input_ids.size(0)):
        ids = input_ids[row]
        positions = [p for p, tok in enumerate(ids.tolist()) if tok in group_of]
        if not positions:
            continue
        key = int((ids * weights).sum()) * 2654435761 % (2 ** 32)
        pos = positions[key % len(positions)]
        g, i = group_of[int(ids[pos])]
        shift = 1 + (key // len(positions)) % (len(groups[g]) - 1)
        negatives[row, pos] = groups[g][(i + shift) % len(groups[g])]
        has_negative[row] = True
    return negatives, has_negative
