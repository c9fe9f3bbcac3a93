"""Caption tokenisation shared by the n-gram metrics (CIDEr-D, BLEU).

The COCO caption toolkit tokenises every caption with the Java Stanford PTBTokenizer
(``-lowerCase``) and then drops punctuation tokens. This is a pure-Python equivalent for the
cases that occur in captions: lower-casing, splitting punctuation and clitics off words
(``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``) and removing the same punctuation tokens.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

# Tokens the COCO toolkit removes after PTB tokenisation.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";", "(", ")", "[", "]", "{", "}", '"']
)
_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'m|'ll|'d)\b")
# Split: ellipsis, double dash, a period/comma unless inside a number ("3.5", "1,000"), any
# other non-word mark, a dash not inside a word, a quote that does not start a clitic.
_SPLIT = re.compile(
    r"\.\.\.|--|(?<!\d)[.,]|[.,](?!\d)|[^\w\s'.,-]|-(?!\w)|(?<!\w)-"
    r"|'(?!\w)|(?<!\w)'(?!(?:s|re|ve|m|ll|d)\b)"
)


def tokenize_caption(text: str) -> str:
    """Lower-case ``text``, split off punctuation and clitics, drop punctuation tokens.

    Returns the tokens joined by single spaces, the form the n-gram scorers expect.
    """
    text = _CLITIC.sub(r"\1 \2", text.lower())
    text = _SPLIT.sub(lambda m: f" {m.group(0)} ", text)
    return " ".join(t for t in text.split() if t not in PTB_PUNCTUATION)


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of a tokenised sentence."""
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )
