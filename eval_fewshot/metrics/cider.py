"""CIDEr-D (Vedantam et al. 2015), numerically identical to the COCO caption toolkit's ``Cider``.

For each image, the candidate and each reference become tf-idf vectors of their 1..4-grams, with
document frequencies counted over the references of the whole evaluated set (so the score of one
image depends on the others). CIDEr-D clips candidate n-gram weights at the reference's,
multiplies each cosine by a Gaussian length penalty ``exp(-(len_c - len_r)^2 / (2 sigma^2))``,
averages over n and over references and multiplies by 10:

    CIDEr-D(c, R) = 10 / |R| * sum_r mean_n [ sum_g min(c_g, r_g) r_g / (|c_n| |r_n|) ] * penalty

Inputs must already be tokenised (:func:`eval_fewshot.metrics.text.tokenize_caption`). Like the
reference, "length" in the penalty is the number of bigrams, not of words; kept for exactness.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from eval_fewshot.metrics.text import ngram_counts

NGRAM_ORDER = 4
SIGMA = 6.0


class _TfIdf:
    """tf-idf vectors per n-gram order, their norms and the (bigram) length of one sentence."""

    def __init__(self, counts: Counter, doc_freq: Counter, log_n_images: float, n: int):
        self.vec: list[dict[tuple, float]] = [{} for _ in range(n)]
        sq_norm = [0.0] * n
        self.length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_n_images - math.log(max(1.0, doc_freq[gram])))
            self.vec[order][gram] = weight
            sq_norm[order] += weight * weight
            if order == 1:
                self.length += tf
        self.norm = [math.sqrt(s) for s in sq_norm]


def _similarity(cand: _TfIdf, ref: _TfIdf, n: int, sigma: float) -> list[float]:
    penalty = math.exp(-float(cand.length - ref.length) ** 2 / (2 * sigma**2))
    sims = []
    for order in range(n):
        ref_vec = ref.vec[order]
        val = sum(min(w, ref_vec.get(g, 0.0)) * ref_vec.get(g, 0.0)
                  for g, w in cand.vec[order].items())
        if cand.norm[order] != 0 and ref.norm[order] != 0:
            val /= cand.norm[order] * ref.norm[order]
        sims.append(val * penalty)
    return sims


def cider_d(
    candidates: Mapping[object, str] | Sequence[str],
    references: Mapping[object, Sequence[str]] | Sequence[Sequence[str]],
    n: int = NGRAM_ORDER,
    sigma: float = SIGMA,
) -> tuple[float, list[float]]:
    """Corpus CIDEr-D and per-image scores (unscaled: COCO papers report ``100 x`` this).

    ``candidates`` and ``references`` are parallel sequences, or mappings with the same keys
    (image id -> one tokenised candidate / a list of tokenised references).
    """
    if isinstance(candidates, Mapping):
        if not isinstance(references, Mapping) or set(candidates) != set(references):
            raise ValueError("candidates and references must have the same image ids")
        keys = list(candidates)
        candidates = [candidates[k] for k in keys]
        references = [references[k] for k in keys]
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("no captions to score")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    ref_counts = [[ngram_counts(r.split(), n) for r in refs] for refs in references]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_n_images = math.log(float(len(candidates)))
    scores = []
    for cand, counts in zip(candidates, ref_counts):
        cand_vec = _TfIdf(ngram_counts(cand.split(), n), doc_freq, log_n_images, n)
        total = [0.0] * n
        for ref in counts:
            sims = _similarity(cand_vec, _TfIdf(ref, doc_freq, log_n_images, n), n, sigma)
            total = [t + s for t, s in zip(total, sims)]
        scores.append(sum(total) / n / len(counts) * 10.0)
    return sum(scores) / len(scores), scores
