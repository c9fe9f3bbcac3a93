"""Corpus BLEU-1..4 as computed by the COCO caption toolkit (``Bleu(4)``, "closest" ref length).

Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the brevity
penalty uses, per sentence, the reference length closest to the candidate's (ties -> shorter).
The toolkit's smoothing constants (1e-15 / 1e-9) are reproduced so zero matches give ~0, not an
error. Inputs must already be tokenised (:func:`eval_fewshot.metrics.text.tokenize_caption`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from eval_fewshot.metrics.text import ngram_counts

_TINY = 1e-15
_SMALL = 1e-9


def corpus_bleu(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
) -> list[float]:
    """BLEU-1..BLEU-n (a list of n floats in [0, 1]) of tokenised candidates vs references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    correct, guess = [0] * n, [0] * n
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        words = cand.split()
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= ngram_counts(ref.split(), n)
        for gram, count in ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(max_ref[gram], count)
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        cand_len += len(words)
        ref_len += min((abs(len(r.split()) - len(words)), len(r.split())) for r in refs)[1]
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (cand_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores
