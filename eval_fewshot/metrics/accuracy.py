"""Exact-match and top-1 accuracy."""

from __future__ import annotations

from collections.abc import Sequence


def normalize_word(text: str) -> str:
    """Lower-case and strip whitespace and trailing punctuation (``"Blick."`` -> ``"blick"``)."""
    return text.strip().strip(".,;:!?\"'").strip().lower()


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target after :func:`normalize_word`."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(normalize_word(p) == normalize_word(t) for p, t in zip(predictions, targets))
    return hits / len(predictions)


def top1_accuracy(predicted: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of ranked predictions (a class name each) equal to the true class name."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions but {len(labels)} labels")
    if not predicted:
        raise ValueError("no predictions to score")
    return sum(p == t for p, t in zip(predicted, labels)) / len(predicted)
