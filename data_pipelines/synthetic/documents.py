"""Training documents of the synthetic world: interleaved (text + images) and text-only.

Document kinds are chosen so that the evaluation prompts are in distribution and in-context
learning pays off (bursty data, Chan et al. 2022):

- ``captions``: k-shot runs of ``<image>Output: {caption}<|endofchunk|>``;
- ``vqa``: k-shot runs of ``<image>Question: {q} Short answer: {a}<|endofchunk|>``;
- ``binding``: a document gives its own fresh nonsense names to classes (e.g. red things are
  ``blick``), shows several images of each as ``<image>Output: {name}<|endofchunk|>`` and asks
  again at the end; names change from document to document, so only the context can tell.
  ``anchored_binding_doc`` (a separate source) also says the class word in half the
  demonstrations (``<image>Output: red blick``), never in the query;
- ``story``: each image followed by a sentence about it, with distractor sentences around.

The text corpus (for LM pretraining) mirrors these with words instead of images: captions, a
described scene followed by questions about it, and text-only binding episodes, both as
sentences (``the red thing is called blick.``) and with the name right after the class word
(``a red blick.``), which a two-layer LM learns to copy by induction; plus ``copy`` lines (a
list of nonsense words said two or three times) that reward reading from the context at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from PIL import Image

from data_pipelines.synthetic.language import (
    FILLER,
    caption,
    fresh_names,
    location,
    nonsense_word,
    phrase,
    questions,
)
from data_pipelines.synthetic.scenes import COLORS, SHAPES, UniqueImages, sample_scene

# Shares of document kinds. Binding episodes get the largest share: label binding only emerges
# when many documents reward reading names from the context (bursty data).
DOC_KINDS = {"captions": 0.2, "vqa": 0.3, "binding": 0.4, "story": 0.1}
CORPUS_KINDS = {"captions": 0.1, "qa": 0.125, "binding": 0.225, "naming": 0.35, "copy": 0.15,
                "story": 0.05}
ANCHOR_SHARE = 0.5  # demonstrations of an anchored binding document that say the class word
BINDING_ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES}

Item = str | Image.Image


def binding_prompt(name: str) -> str:
    """Text of one label-binding chunk; the same format as the evaluator's label prompt."""
    return f"Output: {name}"


def caption_doc(rng: random.Random, images: UniqueImages) -> list[Item]:
    """``<image>Output: {caption}`` chunks, sometimes after a filler sentence."""
    items: list[Item] = [rng.choice(FILLER) + " "] if rng.random() < 0.3 else []
    for _ in range(rng.randint(2, 6)):
        objects, image = images.draw(rng)
        items += [image, f"Output: {caption(objects)}"]
    return items


def vqa_doc(rng: random.Random, images: UniqueImages) -> list[Item]:
    """``<image>Question: {q} Short answer: {a}`` chunks, one question per image."""
    items: list[Item] = []
    for _ in range(rng.randint(2, 6)):
        objects, image = images.draw(rng)
        qa = rng.choice(questions(objects, rng))
        items += [image, f"Question: {qa.question} Short answer: {qa.answer}"]
    return items


def binding_episode(rng: random.Random, attribute: str, n_classes: int, per_class: int):
    """Classes, their fresh names, and a shuffled class sequence ending with a repeated query."""
    classes = rng.sample(BINDING_ATTRIBUTES[attribute], n_classes)
    names = dict(zip(classes, fresh_names(rng, n_classes)))
    order = [c for c in classes for _ in range(per_class)]
    rng.shuffle(order)
    return names, order + [rng.choice(classes)]


def binding_doc(rng: random.Random, images: UniqueImages, anchor_share: float = 0.0) -> list[Item]:
    """Images of 2-3 classes named with this document's own nonsense words, then a query.

    With ``anchor_share`` > 0, that share of the demonstrations also say the class word before
    the name (``Output: red blick``); the query never does (see :func:`anchored_binding_doc`).
    """
    attribute = "color" if rng.random() < 0.7 else "shape"
    names, order = binding_episode(rng, attribute, rng.choice((2, 2, 3)), rng.randint(2, 4))
    items: list[Item] = []
    for i, cls in enumerate(order):
        _, image = images.draw(rng, n_objects=1, **{attribute: cls})
        anchored = anchor_share > 0 and i < len(order) - 1 and rng.random() < anchor_share
        items += [image, binding_prompt(f"{cls} {names[cls]}" if anchored else names[cls])]
    return items


def anchored_binding_doc(rng: random.Random, images: UniqueImages) -> list[Item]:
    """A binding document in which half the demonstrations say the class word.

    The frozen LM copies a name that follows a word it can match (``a red blick. ... a red``),
    but not one that follows ``Output:`` after an image: the images would have to make the two
    ``Output:`` tokens match. Demonstrations that say ``red`` give cross-attention a fixed target
    to learn that from: make the query's ``Output:`` match the class word. Without these
    documents label binding stayed at chance in every recipe measured.
    """
    return binding_doc(rng, images, ANCHOR_SHARE)


def story_doc(rng: random.Random, images: UniqueImages) -> list[Item]:
    """Each image followed by a sentence about it; distractor sentences in between."""
    items: list[Item] = [rng.choice(FILLER) + " "]
    for _ in range(rng.randint(1, 4)):
        objects, image = images.draw(rng)
        obj = rng.choice(objects)
        text = f"here is {phrase(obj)} {location(obj)}."
        if rng.random() < 0.5:
            text += " " + rng.choice(FILLER)
        items += [image, text]
        if rng.random() < 0.3:
            items.append(" " + rng.choice(FILLER))
    return items


DOC_BUILDERS: dict[str, Callable[[random.Random, UniqueImages], list[Item]]] = {
    "captions": caption_doc,
    "vqa": vqa_doc,
    "binding": binding_doc,
    "story": story_doc,
}


def interleaved_document(rng: random.Random, images: UniqueImages) -> tuple[str, list[Item]]:
    """One training document of a random kind: ``(kind, items)``."""
    kind = rng.choices(list(DOC_KINDS), weights=list(DOC_KINDS.values()))[0]
    return kind, DOC_BUILDERS[kind](rng, images)


# -- text-only corpus ------------------------------------------------------------------------


def corpus_line(rng: random.Random) -> str:
    """One text-only document in the language of the captions and prompts."""
    kind = rng.choices(list(CORPUS_KINDS), weights=list(CORPUS_KINDS.values()))[0]
    if kind == "captions":
        return " ".join(f"Output: {caption(sample_scene(rng))}"
                        for _ in range(rng.randint(2, 5)))
    if kind == "qa":
        # the scene is said in words first, so the answer is in the context, as with an image;
        # the answer ends the line, as it ends the chunk in image documents
        objects = sample_scene(rng)
        qa = rng.choice(questions(objects, rng))
        return f"{caption(objects)} Question: {qa.question} Short answer: {qa.answer}"
    if kind in ("binding", "naming"):
        attribute = rng.choice(tuple(BINDING_ATTRIBUTES))
        names, order = binding_episode(rng, attribute, rng.choice((2, 3)), rng.randint(2, 4))
        if kind == "naming":
            return " ".join(f"a {cls} {names[cls]}." for cls in order)
        noun = "thing" if attribute == "color" else "shape"
        return " ".join(f"the {cls} {noun} is called {names[cls]}." for cls in order)
    if kind == "copy":
        words = " ".join(nonsense_word(rng) for _ in range(rng.randint(3, 8))) + "."
        return " ".join([words] * rng.randint(2, 3))
    objects = sample_scene(rng)
    return " ".join([rng.choice(FILLER), f"here is {caption(objects)}", rng.choice(FILLER)])
