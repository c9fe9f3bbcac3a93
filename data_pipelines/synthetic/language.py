"""The synthetic world's small, regular language: captions, questions, nonsense names, filler.

A few dozen real words plus nonsense words built from a handful of syllables, so a tiny LM
learns the grammar in minutes and the only hard part left is looking at the image (or, for
nonsense names, at the context).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from data_pipelines.synthetic.scenes import COLORS, COLUMNS, SHAPES, SIZES, SceneObject

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
ONSETS = ("b", "d", "g", "k", "m", "n", "p", "t", "v", "z", "bl", "dr", "fl", "gr", "kr", "sn")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "x", "p", "k", "n", "b", "rp", "ck")
FILLER = (
    "the sun is warm today.",
    "we like to look at shapes.",
    "this page has many pictures.",
    "here are some more pictures.",
    "look at the next one.",
    "that was a nice picture.",
    "some shapes are big and some are small.",
    "we will see more of them.",
)


def phrase(obj: SceneObject, with_size: bool = True) -> str:
    """``a large red circle`` (or without the size word)."""
    words = [obj.size] if with_size else []
    return " ".join(["a", *words, obj.color, obj.shape])


def location(obj: SceneObject) -> str:
    """``on the left``, ``in the middle`` or ``on the right``."""
    return "in the middle" if obj.column == "middle" else f"on the {obj.column}"


def join_words(parts: list[str]) -> str:
    """``x``, ``x and y``, ``x, y and z``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(objects: list[SceneObject]) -> str:
    """The canonical caption, objects left to right: ``a large red circle and a small ...``."""
    return join_words([phrase(o) for o in objects]) + "."


def reference_captions(objects: list[SceneObject]) -> list[str]:
    """Several correct captions (canonical first) as references for CIDEr."""
    count = NUMBER_WORDS[len(objects)]
    noun = "shape" if len(objects) == 1 else "shapes"
    return [
        caption(objects),
        join_words([f"{phrase(o)} {location(o)}" for o in objects]) + ".",
        f"{count} {noun}: " + join_words([phrase(o, with_size=False) for o in objects]) + ".",
    ]


def nonsense_word(rng: random.Random, syllables: int | None = None) -> str:
    """A pronounceable made-up word (``blick``, ``dax``, ``zorp`` ...), never a real word."""
    n = syllables or rng.choice((1, 2))
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n - 1))
        word += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        if word not in REAL_WORDS:
            return word


def fresh_names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct nonsense words."""
    names: list[str] = []
    while len(names) < n:
        word = nonsense_word(rng)
        if word not in names:
            names.append(word)
    return names


@dataclass(frozen=True)
class QA:
    """One question about a scene with its exact answer and VQAv2-style types."""

    question: str
    answer: str
    question_type: str
    answer_type: str


def _unique(objects: list[SceneObject], attr: str) -> list[SceneObject]:
    values = [getattr(o, attr) for o in objects]
    return [o for o in objects if values.count(getattr(o, attr)) == 1]


def questions(objects: list[SceneObject], rng: random.Random) -> list[QA]:
    """Every question kind that has a unique answer for this scene (one of each kind)."""
    out = [QA("how many shapes are there?", NUMBER_WORDS[len(objects)], "how many", "number")]
    by_shape, by_color = _unique(objects, "shape"), _unique(objects, "color")
    if by_shape:
        o = rng.choice(by_shape)
        out.append(QA(f"what color is the {o.shape}?", o.color, "what color is the", "other"))
        out.append(QA(f"where is the {o.shape}?", o.column, "where is the", "other"))
    if by_color:
        o = rng.choice(by_color)
        out.append(QA(f"what shape is the {o.color} one?", o.shape, "what shape is the",
                      "other"))
        out.append(QA(f"what size is the {o.color} {o.shape}?", o.size, "what size is the",
                      "other"))
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
    else:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    answer = "yes" if (color, shape) in present else "no"
    out.append(QA(f"is there a {color} {shape}?", answer, "is there a", "yes/no"))
    return out


def vocabulary() -> set[str]:
    """Every real word the world uses (nonsense words are drawn outside this set)."""
    words = set(SHAPES) | set(COLORS) | set(SIZES) | set(COLUMNS) | set(NUMBER_WORDS)
    for sentence in FILLER:
        words |= set(sentence.replace(".", "").split())
    words |= {"a", "and", "on", "the", "is", "what", "color", "shape", "size", "where", "how",
              "many", "shapes", "are", "there", "one", "this", "called", "question", "short",
              "answer", "output", "yes", "no", "it", "in", "here", "thing"}
    return words


REAL_WORDS = vocabulary()
