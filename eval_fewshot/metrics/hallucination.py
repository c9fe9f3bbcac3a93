"""Object hallucination in captions (CHAIR, Rohrbach et al. 2018) for the synthetic world.

A caption *mentions* an object when it names a known shape (singular or plural), optionally with
a colour right before it ("a red circle", "two blue squares"). A mention is *hallucinated* when
the image has no object of that shape (and colour, when one is named). Reported rates:

- ``chair_i``: hallucinated mentions / all mentions (over the whole set);
- ``chair_s``: captions with at least one hallucinated mention / captions.

Lower is better for both. The vocabulary comes from the ground-truth object lists, so it follows
whatever shapes and colours the synthetic world draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from eval_fewshot.metrics.text import tokenize_caption


@dataclass(frozen=True)
class Mention:
    """One object named in a caption: a shape, with its colour if the caption gives one."""

    shape: str
    color: str | None


def _plural_forms(word: str) -> tuple[str, ...]:
    return (word, word + "s", word + "es")


def find_mentions(caption: str, shapes: Iterable[str], colors: Iterable[str]) -> list[Mention]:
    """Objects named in ``caption`` (see the module docstring for the rule)."""
    shape_of = {form: s for s in shapes for form in _plural_forms(s.lower())}
    color_set = {c.lower() for c in colors}
    words = tokenize_caption(caption).split()
    mentions = []
    for i, word in enumerate(words):
        if word in shape_of:
            # The colour may be separated from the shape by a size word ("red small circle").
            before = words[max(0, i - 2) : i]
            color = next((w for w in reversed(before) if w in color_set), None)
            mentions.append(Mention(shape_of[word], color))
    return mentions


def chair(
    captions: Sequence[str],
    objects: Sequence[Sequence[Mapping[str, object]]],
    shapes: Iterable[str] = (),
    colors: Iterable[str] = (),
) -> dict[str, float]:
    """CHAIR_i and CHAIR_s of ``captions`` given each image's ground-truth ``objects``.

    ``objects[i]`` is the list of dicts with at least ``shape`` and ``color`` keys for image i.
    The shape/colour vocabulary is every value seen in ``objects`` plus ``shapes``/``colors``
    (pass the world's full lists so a shape that no image contains still counts when named).
    Returns rates in [0, 1]; with no mention at all ``chair_i`` is 0.
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} object lists")
    if not captions:
        raise ValueError("no captions to score")
    shapes = {str(o["shape"]).lower() for objs in objects for o in objs} | set(shapes)
    colors = {str(o["color"]).lower() for objs in objects for o in objs} | set(colors)
    n_mentions = n_hallucinated = n_bad_captions = 0
    for caption, objs in zip(captions, objects):
        present = {(str(o["shape"]).lower(), str(o["color"]).lower()) for o in objs}
        present_shapes = {s for s, _ in present}
        mentions = find_mentions(caption, shapes, colors)
        bad = [
            m for m in mentions
            if m.shape not in present_shapes or (m.color and (m.shape, m.color) not in present)
        ]
        n_mentions += len(mentions)
        n_hallucinated += len(bad)
        n_bad_captions += bool(bad)
    return {
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad_captions / len(captions),
    }
