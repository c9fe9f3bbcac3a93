"""Processor: interleaved prompts, batching, padding, truncation, and its error messages."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flamingo_kit import FlamingoProcessor
from tests.conftest import random_image


def test_interleaved_prompt_layout(processor):
    img = random_image(0)
    batch = processor([["A cat.", img, "It sits on a mat.<|endofchunk|>"]])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 1
    assert ids.count(processor.eoc_token_id) == 1
    assert ids.index(processor.image_token_id) < ids.index(processor.eoc_token_id)
    assert batch["pixel_values"].shape == (1, 1, 1, 3, 32, 32)
    assert processor.decode(ids) == "A cat.It sits on a mat."


def test_placeholder_form_equals_list_form(processor):
    a, b = random_image(1), random_image(2)
    as_list = processor([[a, "one", b, "two"], ["three"]])
    as_text = processor(["<image>one<image>two", "three"], images=[[a, b], []])
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(as_list[key], as_text[key])
    assert as_list["pixel_values"].shape[:2] == (2, 2)
    assert torch.equal(as_list["pixel_values"][1], torch.zeros_like(as_list["pixel_values"][1]))


def test_left_padding_for_generation(processor):
    batch = processor(["a", "a much longer prompt here"], padding_side="left")
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]


def test_truncation_keeps_images_and_tokens_paired(processor):
    imgs = [random_image(i) for i in range(3)]
    full = processor([[imgs[0], "first", imgs[1], "second part", imgs[2], "third"]])
    ids = full["input_ids"][0].tolist()
    cut = ids.index(processor.image_token_id, ids.index(processor.image_token_id) + 1) + 1
    for length in (cut - 1, cut, len(ids) - 1):
        batch = processor([[imgs[0], "first", imgs[1], "second part", imgs[2], "third"]],
                          max_length=length)
        n_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
        assert batch["input_ids"].shape[1] == length
        assert batch["pixel_values"].shape[1] == n_tokens
        assert torch.equal(batch["pixel_values"][0], full["pixel_values"][0, :n_tokens])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: p(["<image>x"], images=[[]]), "prompt 0: 1 <image> placeholders but 0"),
        (lambda p: p([["ok"], ["text", 3.5]]), "prompt 1: item 1 is a float"),
        (lambda p: p([["fine"], [""]]), "prompt 1: empty prompt"),
        (lambda p: p([["literal <image> in text"]]), "prompt 0: 1 <image> tokens but 0 images"),
        (lambda p: p([]), "empty batch"),
    ],
)
def test_errors_name_the_prompt_and_problem(processor, call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call(processor)


def test_too_many_images(tokenizer, image_processor):
    processor = FlamingoProcessor(tokenizer, image_processor, max_images=2)
    imgs = [random_image(i) for i in range(3)]
    with pytest.raises(ValueError, match="prompt 0: 3 images, more than max_images=2"):
        processor([[imgs[0], "a", imgs[1], "b", imgs[2], "c"]])


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    prompt = [["x", random_image(3), "a red circle<|endofchunk|>"]]
    a, b = processor(prompt), loaded(prompt)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.allclose(a["pixel_values"], b["pixel_values"])


items = st.one_of(
    st.text(alphabet="ab <>|/imageondfchu.", max_size=12),
    st.integers(0, 5).map(random_image),
    st.sampled_from([None, 7, b"bytes", ["nested"]]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(items, max_size=6), min_size=1, max_size=3),
       max_length=st.one_of(st.none(), st.integers(1, 30)))
def test_fuzz_only_documented_errors(processor, prompts, max_length):
    try:
        batch = processor(prompts, max_length=max_length)
    except ValueError as err:
        assert "prompt" in str(err) or "batch" in str(err)
        return
    ids = batch["input_ids"]
    counts = (ids == processor.image_token_id).sum(1)
    n = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
    assert int(counts.max()) == n
    if max_length is not None:
        assert ids.shape[1] <= max_length
