"""VQA accuracy as computed by the official VQA evaluation script.

An answer scores ``min(#humans who gave it / 3, 1)``, averaged over the ten leave-one-out subsets
of nine annotators, exactly as the official ``vqaEval.py`` (GT-Vision-Lab/VQA) does. Answers are
compared after the official processing: punctuation removed or replaced by a space (commas
between digits and periods outside decimals removed), lower-casing, number words mapped to
digits, articles dropped and apostrophe-less contractions restored (``dont`` -> ``don't``).

Two modes (:data:`VQA_MODES`):

- ``"official"`` (default): like the script, which processes the prediction and the human
  answers *only when the ten human answers are not all identical*; so ``"Yes."``, ``"2."`` and
  ``"the dog"`` score 0 against ten identical ``"yes"``/``"2"``/``"dog"``. Published VQAv2,
  OK-VQA, VizWiz and TextVQA numbers computed with the official tools include this.
- ``"normalize_all"``: process every answer. This is what the challenge's published rules
  describe and what OpenFlamingo's ``vqa_metric.py`` does; it is never lower than ``official``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Tables of the official evaluation (vqaEval.py), kept verbatim so scores match it.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]
# The official pattern has a typo: "(?!<=\d)" is a negative lookahead, not a lookbehind, so a
# period before a non-digit is removed even after a digit ("2." -> "2"). Kept for exactness.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official call passes re.UNICODE (== 32) as the `count` argument of sub(); same here.
_PERIOD_STRIP_COUNT = int(re.UNICODE)
N_HUMANS_FOR_FULL_CREDIT = 3
VQA_MODES = ("official", "normalize_all")
VQA_MODE_NOTES = {
    "official": "answers processed only when the ten humans disagree, as the official "
                "vqaEval.py does",
    "normalize_all": "every answer processed (published rules, OpenFlamingo's metric)",
}


def _strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Official punctuation rule: drop a mark next to a space (or in "1,000"), else space it."""
    out = text
    glue = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or glue:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def process_digits_articles(text: str) -> str:
    """Official word rule: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise one answer with the official VQA rules (see the module docstring)."""
    return process_digits_articles(process_punctuation(_strip_whitespace(text)))


def check_vqa_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`VQA_MODES`, else a ``ValueError`` naming the choices."""
    if mode not in VQA_MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; use one of {', '.join(VQA_MODES)}")
    return mode


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = "official") -> float:
    """Accuracy of one predicted answer against the human ``answers`` (normally ten).

    Each annotator is left out in turn; the prediction scores ``min(matches among the others / 3,
    1)`` and the mean over the left-out annotators is returned (a value in [0, 1]). ``mode``
    says when answers are processed (see the module docstring).
    """
    check_vqa_mode(mode)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    refs = [_strip_whitespace(a) for a in answers]
    pred = _strip_whitespace(prediction)
    if mode == "normalize_all" or len(set(refs)) > 1:
        refs = [process_digits_articles(process_punctuation(a)) for a in refs]
        pred = process_digits_articles(process_punctuation(pred))
    matches = sum(ref == pred for ref in refs)
    scores = [
        min(1.0, (matches - (ref == pred)) / N_HUMANS_FOR_FULL_CREDIT) for ref in refs
    ]
    return sum(scores) / len(scores)


def mean_vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], mode: str = "official"
) -> float:
    """Mean :func:`vqa_accuracy` over questions (in [0, 1])."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = [vqa_accuracy(p, a, mode) for p, a in zip(predictions, answers)]
    return sum(scores) / len(scores)
