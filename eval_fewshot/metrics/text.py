"""Caption tokenisation shared by the n-gram metrics (CIDEr-D, BLEU), as the COCO toolkit does it.

pycocoevalcap tokenises every caption with the Java Stanford PTBTokenizer (``-lowerCase``) and
then drops the tokens in its punctuation list. :func:`tokenize_captions` does the same with our
pure-Python tokenizer (:mod:`eval_fewshot.metrics.ptb_tokenizer`, the default: same tokens on
captions) or runs the Java tokenizer itself (``tokenizer="java"``, needs ``java`` and
pycocoevalcap; :mod:`eval_fewshot.metrics.java_ptb`). Note what the toolkit keeps: its list
names ``-LRB-``/``-RRB-`` in upper case while the tokens are lower-cased, so brackets stay as
``-lrb-``/``-rrb-`` (and ``-lsb-``...), as do ``!!``, ``$``, ``%`` and the like.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

from eval_fewshot.metrics.java_ptb import java_available, java_ptb_tokenize
from eval_fewshot.metrics.ptb_tokenizer import ptb_tokenize_lines

# pycocoevalcap's list (tokenizer/ptbtokenizer.py), verbatim: tokens removed after tokenising.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)
CAPTION_TOKENIZERS = ("python", "java")
CAPTION_TOKENIZER_NOTES = {
    "python": "captions tokenised by our Python tokenizer (pycocoevalcap's PTB tokens)",
    "java": "captions tokenised by pycocoevalcap's Java PTB tokenizer",
}


def _drop_punctuation(tokens: Sequence[str]) -> str:
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def tokenize_caption(text: str) -> str:
    """PTB tokens of one caption, lower-cased, without punctuation tokens, joined by single
    spaces: the form pycocoevalcap scores (and the n-gram scorers here expect)."""
    return _drop_punctuation(ptb_tokenize_lines([text])[0])


def check_caption_tokenizer(name: str) -> str:
    """``name`` if it is a tokenizer that can run here, else a ``ValueError`` saying why not."""
    if name not in CAPTION_TOKENIZERS:
        raise ValueError(f"unknown caption tokenizer {name!r}; use one of "
                         f"{', '.join(CAPTION_TOKENIZERS)}")
    if name == "java" and not java_available():
        raise ValueError("the java caption tokenizer needs `java` on PATH and pycocoevalcap "
                         "installed (pip install pycocoevalcap)")
    return name


@functools.lru_cache(maxsize=8)  # the same references recur for every shot count and trial
def _tokenize_batch(captions: tuple[str, ...], tokenizer: str) -> tuple[str, ...]:
    tokenize = java_ptb_tokenize if tokenizer == "java" else ptb_tokenize_lines
    return tuple(_drop_punctuation(tokens) for tokens in tokenize(captions))


def tokenize_captions(captions: Sequence[str], tokenizer: str = "python") -> list[str]:
    """Captions tokenised together, one per line, as pycocoevalcap's ``PTBTokenizer.tokenize``
    does (a caption ending in a single letter and a period depends on the next one), without
    punctuation tokens; by our Python tokenizer (``"python"``) or the Java tool (``"java"``)."""
    check_caption_tokenizer(tokenizer)
    return list(_tokenize_batch(tuple(captions), tokenizer))


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of a tokenised sentence."""
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )
