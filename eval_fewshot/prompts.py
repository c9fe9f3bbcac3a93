"""k-shot prompts: demonstrations then the query, in the Flamingo/OpenFlamingo format.

A template is one demonstration, e.g. ``<image>Question: {question} Short answer:
{answer}<|endofchunk|>``; the query is the same text cut just before the answer slot
(``<image>Question: ... Short answer:``). Zero-shot follows Flamingo: two demonstrations with
their images stripped, so the model sees the format but no image-text pair.

Prompts that exceed the context budget lose their *oldest* demonstrations first; the query is
never cut.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from eval_fewshot.datasets import Example
from flamingo_kit.processing import EOC_TOKEN, IMAGE_TOKEN

CAPTION_TEMPLATE = f"{IMAGE_TOKEN}Output: {{caption}}{EOC_TOKEN}"
VQA_TEMPLATE = f"{IMAGE_TOKEN}Question: {{question}} Short answer: {{answer}}{EOC_TOKEN}"
LABEL_TEMPLATE = f"{IMAGE_TOKEN}Output: {{label}}{EOC_TOKEN}"
ZERO_SHOT_TEXT_DEMOS = 2


@dataclass(frozen=True)
class PromptTemplate:
    """A demonstration format; ``target_field`` is the placeholder the answer fills."""

    text: str
    target_field: str

    def __post_init__(self) -> None:
        names = [f for _, f, _, _ in string.Formatter().parse(self.text) if f is not None]
        if self.target_field not in names:
            raise ValueError(
                f"template {self.text!r} has no {{{self.target_field}}} placeholder for the answer"
            )
        if self.text.count(IMAGE_TOKEN) != 1:
            raise ValueError(f"template {self.text!r} must contain exactly one {IMAGE_TOKEN}")

    def demo(self, example: Example) -> str:
        """The demonstration text of ``example`` (with its answer)."""
        return self.text.format(**example.fields, **{self.target_field: example.target})

    def query(self, example: Example) -> str:
        """The query text of ``example``: the template up to the answer slot."""
        head = self.text.split("{" + self.target_field, 1)[0]
        return head.format(**example.fields).rstrip()


@dataclass(frozen=True)
class Prompt:
    """Demonstration context + query; images in the order of their ``<image>`` tokens."""

    context: str
    context_images: tuple[str, ...]
    query: str
    query_image: str
    demo_uids: tuple[str, ...]

    @property
    def text(self) -> str:
        """The whole prompt as one string."""
        return self.context + self.query

    @property
    def images(self) -> list[str]:
        """All image paths of the prompt, in order."""
        return [*self.context_images, self.query_image]


def build_context(
    template: PromptTemplate, demos: Sequence[Example], text_only: bool = False
) -> tuple[str, tuple[str, ...]]:
    """Demonstration text and images; ``text_only`` strips the images (zero-shot protocol)."""
    text = "".join(template.demo(d) for d in demos)
    if text_only:
        return text.replace(IMAGE_TOKEN, ""), ()
    return text, tuple(d.image for d in demos)


def build_prompt(
    template: PromptTemplate,
    demos: Sequence[Example],
    query: Example,
    zero_shot: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    reserve_tokens: int = 0,
) -> Prompt:
    """The prompt for ``query`` after ``demos`` (oldest first).

    With ``count_tokens`` and ``max_tokens``, the oldest demonstrations are dropped until the
    prompt plus ``reserve_tokens`` (room for the answer) fits; the query always stays.
    """
    query_text = template.query(query)
    demos = fit_demos(template, demos, [query_text], zero_shot, count_tokens, max_tokens,
                      reserve_tokens)
    context, images = build_context(template, demos, text_only=zero_shot)
    return Prompt(context, images, query_text, query.image, tuple(d.uid for d in demos))


def fit_demos(
    template: PromptTemplate,
    demos: Sequence[Example],
    query_texts: Sequence[str],
    zero_shot: bool = False,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    reserve_tokens: int = 0,
) -> list[Example]:
    """The newest demonstrations such that context + the longest query fits ``max_tokens``."""
    demos = list(demos)
    if count_tokens is None or max_tokens is None:
        return demos
    longest = max(query_texts, key=count_tokens)
    while demos:
        context, _ = build_context(template, demos, text_only=zero_shot)
        if count_tokens(context + longest) + reserve_tokens <= max_tokens:
            break
        demos.pop(0)
    return demos
