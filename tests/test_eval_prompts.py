"""Prompt building: exact strings for 0/1/4 shots, zero-shot protocol, context overflow."""

import pytest

from eval_fewshot.datasets import Example
from eval_fewshot.prompts import (
    CAPTION_TEMPLATE,
    VQA_TEMPLATE,
    PromptTemplate,
    build_prompt,
)

CAPTION = PromptTemplate(CAPTION_TEMPLATE, "caption")
VQA = PromptTemplate(VQA_TEMPLATE, "answer")


def cap(i: int) -> Example:
    return Example(uid=f"c{i}", image=f"img{i}.png", target=f"caption {i}.",
                   references=(f"caption {i}.",))


def vqa(i: int) -> Example:
    return Example(uid=f"q{i}", image=f"img{i}.png", target=f"a{i}", references=(f"a{i}",) * 10,
                   fields={"question": f"what is {i}?"})


def test_caption_prompts_exact():
    query = cap(9)
    assert build_prompt(CAPTION, [cap(1)], query).text == (
        "<image>Output: caption 1.<|endofchunk|><image>Output:"
    )
    four = build_prompt(CAPTION, [cap(i) for i in range(1, 5)], query)
    assert four.text == "".join(f"<image>Output: caption {i}.<|endofchunk|>" for i in range(1, 5)) \
        + "<image>Output:"
    assert four.images == ["img1.png", "img2.png", "img3.png", "img4.png", "img9.png"]
    assert four.demo_uids == ("c1", "c2", "c3", "c4")


def test_vqa_prompts_exact():
    query = vqa(9)
    one = build_prompt(VQA, [vqa(1)], query)
    assert one.text == (
        "<image>Question: what is 1? Short answer: a1<|endofchunk|>"
        "<image>Question: what is 9? Short answer:"
    )
    four = build_prompt(VQA, [vqa(i) for i in range(1, 5)], query)
    assert four.context == "".join(
        f"<image>Question: what is {i}? Short answer: a{i}<|endofchunk|>" for i in range(1, 5)
    )
    assert four.query == "<image>Question: what is 9? Short answer:"
    assert len(four.images) == 5


@pytest.mark.parametrize("template, make, expected", [
    (CAPTION, cap, "Output: caption 1.<|endofchunk|>Output: caption 2.<|endofchunk|>"
                   "<image>Output:"),
    (VQA, vqa, "Question: what is 1? Short answer: a1<|endofchunk|>"
               "Question: what is 2? Short answer: a2<|endofchunk|>"
               "<image>Question: what is 9? Short answer:"),
])
def test_zero_shot_uses_two_text_only_demos(template, make, expected):
    prompt = build_prompt(template, [make(1), make(2)], make(9), zero_shot=True)
    assert prompt.text == expected
    assert prompt.images == ["img9.png"]  # only the query keeps its image


def test_overflow_drops_oldest_demos_and_keeps_query():
    demos = [vqa(i) for i in range(1, 5)]
    full = build_prompt(VQA, demos, vqa(9))
    count = len  # characters stand in for tokens: the rule does not depend on the tokenizer
    budget = len(full.text) - 1
    cut = build_prompt(VQA, demos, vqa(9), count_tokens=count, max_tokens=budget)
    assert cut.demo_uids == ("q2", "q3", "q4")
    assert cut.query == full.query and cut.images[-1] == "img9.png"
    assert len(cut.images) == 4
    only_query = build_prompt(VQA, demos, vqa(9), count_tokens=count, max_tokens=5)
    assert only_query.demo_uids == () and only_query.text == full.query
    reserved = build_prompt(VQA, demos, vqa(9), count_tokens=count, max_tokens=len(full.text),
                            reserve_tokens=1)
    assert reserved.demo_uids == ("q2", "q3", "q4")


def test_template_override_and_validation():
    custom = PromptTemplate("<image>Q: {question} A: {answer}<|endofchunk|>", "answer")
    assert build_prompt(custom, [vqa(1)], vqa(2)).text == (
        "<image>Q: what is 1? A: a1<|endofchunk|><image>Q: what is 2? A:"
    )
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate("<image>Output: {text}", "caption")
    with pytest.raises(ValueError, match="exactly one"):
        PromptTemplate("Output: {caption}", "caption")
