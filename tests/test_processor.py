"""Processor: interleaved prompts, batching, padding, truncation, and its error messages."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from flamingo_kit import FlamingoProcessor
from tests.conftest import build_model, random_image


def test_interleaved_prompt_layout(processor):
    img = random_image(0)
    batch = processor([["A cat.", img, "It sits on a mat.<|endofchunk|>"]])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == 1
    assert ids.count(processor.eoc_token_id) == 1
    assert ids.index(processor.image_token_id) < ids.index(processor.eoc_token_id)
    assert batch["pixel_values"].shape == (1, 1, 1, 3, 32, 32)
    # text after a special token is tokenized as at the start of a line ("▁It")
    assert processor.decode(ids) == "A cat. It sits on a mat."


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
                          max_length=length, truncation="right")
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
        (lambda p: p([["ok"], [Image.new("RGB", (0, 0)), "x"]]),
         "prompt 1: item 0 is an empty image (0x0 pixels)"),
        (lambda p: p(["<image>x"], images=[[Image.new("RGB", (0, 10))]]),
         "prompt 0: item 1 is an empty image (0x10 pixels)"),
        (lambda p: p([["ok"], ["a \ud800 b"]]),
         "prompt 1: item 0 is not valid Unicode text (surrogates not allowed '\\ud800' at position 2)"),
        (lambda p: p("<image>x", images=["not an image"]),
         "prompt 0: image 0 is a str; expected PIL.Image.Image"),
        (lambda p: p(["<image>x", "y"], images=[[random_image(0)]]),
         "images= must hold one list of images per prompt"),
        (lambda p: p([[random_image(0), "x"]], truncation="left"), "truncation must be one of"),
    ],
)
def test_errors_name_the_prompt_and_problem(processor, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
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
    st.text(alphabet=st.characters(categories=["Cs", "L", "P", "Zs"]), max_size=4),  # surrogates too
    st.integers(0, 5).map(random_image),
    st.sampled_from([(0, 0), (0, 10), (7, 0), (1, 1)]).map(lambda s: Image.new("RGB", s)),
    st.sampled_from([None, 7, b"bytes", ["nested"], "<|endofchunk|>"]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.lists(items, max_size=6), min_size=1, max_size=3),
       max_length=st.one_of(st.none(), st.integers(1, 30)),
       truncation=st.sampled_from(["demonstrations", "right"]))
def test_fuzz_only_documented_errors(processor, prompts, max_length, truncation):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropped demonstrations warn
            batch = processor(prompts, max_length=max_length, truncation=truncation)
    except ValueError as err:
        assert "prompt" in str(err) or "batch" in str(err)
        return
    ids = batch["input_ids"]
    counts = (ids == processor.image_token_id).sum(1)
    n = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
    assert int(counts.max()) == n
    if max_length is not None:
        assert ids.shape[1] <= max_length


def test_documented_placeholder_forms(processor):
    """One prompt string takes images=img, [img, ...] or [[img, ...]]; a batch [[...], ...]."""
    a, b = random_image(1), random_image(2)
    reference = processor([["a", a, "cat", b, "dog"]])
    for images in ([a, b], [[a, b]]):
        batch = processor("a<image>cat<image>dog", images=images)
        assert all(torch.equal(batch[k], reference[k]) for k in reference), images
    single = processor("<image>a cat", images=a)
    assert torch.equal(single["input_ids"], processor("<image>a cat", images=[[a]])["input_ids"])
    batch = processor(["<image>a cat", "<image>one<image>two"], images=[[a], [a, b]])
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert processor("no images", images=[])["input_ids"].shape[0] == 1


def demo_prompt(n_demos: int, query: str = "Question: what colour? Short answer:"):
    items = []
    for i in range(n_demos):
        items += [random_image(i), f"Question: what colour is it? Short answer: red{i}<|endofchunk|>"]
    return items + [random_image(99), query]


def test_too_long_prompts_lose_whole_demonstrations_never_the_query(processor):
    """Inference truncation: the earliest demonstrations go (with their images), with a warning."""
    full = processor([demo_prompt(4)])
    n = full["input_ids"].shape[1]
    for keep in (3, 1, 0):
        expected = processor([demo_prompt(4)[2 * (4 - keep):]])
        limit = expected["input_ids"].shape[1]
        assert limit < n
        with pytest.warns(UserWarning, match=f"prompt 0: {n} tokens exceed max_length={limit}; "
                          f"dropped its first {4 - keep} of 4 demonstrations"):
            cut = processor([demo_prompt(4)], max_length=limit)
        assert torch.equal(cut["input_ids"], expected["input_ids"])  # BOS kept, query kept
        assert torch.equal(cut["pixel_values"], expected["pixel_values"])


def test_a_query_that_cannot_fit_raises(processor):
    with pytest.raises(ValueError, match="prompt 1: .* exceed max_length=8, and without its 2 "
                                         "demonstrations it is still"):
        processor([["short"], demo_prompt(2)], max_length=8)


def test_no_silent_cut_without_an_explicit_choice(tokenizer, image_processor):
    """A processor built with max_length drops demonstrations or raises; it never cuts the end."""
    processor = FlamingoProcessor(tokenizer, image_processor, max_length=10)
    with pytest.raises(ValueError, match="prompt 0"):
        processor([[random_image(0), "a long prompt without any demonstration in it at all"]])


def test_loaded_processor_limits_prompts_to_the_model_context(processor, tokenizer,
                                                              image_processor, tmp_path):
    """from_pretrained ignores the training max_length and uses the LM's context instead."""
    trained = FlamingoProcessor(tokenizer, image_processor, max_length=16)
    build_model("llama", processor=trained).save_pretrained(tmp_path)
    trained.save_pretrained(tmp_path)
    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert loaded.max_length == 512 and loaded.truncation == "demonstrations"
    long = processor([demo_prompt(3)])
    assert long["input_ids"].shape[1] > 16
    assert torch.equal(loaded([demo_prompt(3)])["input_ids"], long["input_ids"])
    assert FlamingoProcessor.from_pretrained(tmp_path, max_length=16).max_length == 16


@pytest.mark.parametrize("side", ["left", "right"])
def test_evaluator_batches_prompts_as_the_processor_does(processor, tmp_path, side):
    """The evaluator (images read from files) and the processor lay out the same prompts in the
    same batch: ids, mask, padding side and image slots."""
    from eval_fewshot.inference import FewShotModel

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(i).save(paths[-1])
    texts = ["<image>one<image>two words", "three", "<image>four"]
    images = [paths[:2], [], paths[2:]]
    expected = processor(texts, images=[[Image.open(p) for p in row] for row in images],
                         padding_side=side)
    got = FewShotModel(build_model(processor=processor), processor)._batch(texts, images, side=side)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
