"""FlamingoPipeline: strings in, strings out, from a saved directory."""

from __future__ import annotations

import pytest
import torch

from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoPipeline, FlamingoProcessor
from flamingo_kit.from_scratch import TINY_FLAMINGO, build_lm, build_vision, open_gates
from tests.conftest import build_model, random_image


@pytest.fixture
def saved_dir(processor, tmp_path):
    model = build_model("llama", processor=processor)
    open_gates(model, 0.5)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def test_single_prompt_returns_a_string_and_batches_return_lists(saved_dir):
    pipe = FlamingoPipeline.from_pretrained(saved_dir)
    prompt = [random_image(1), "An image of two cats.<|endofchunk|>", random_image(2), "An image of"]
    text = pipe(prompt, max_new_tokens=5)
    assert isinstance(text, str)
    texts = pipe([prompt, ["A text-only prompt"], prompt], max_new_tokens=5, batch_size=2)
    assert isinstance(texts, list) and len(texts) == 3
    assert texts[0] == texts[2] == text  # batching and padding do not change the answer


def test_dtype_is_selectable(saved_dir):
    pipe = FlamingoPipeline.from_pretrained(saved_dir, device="cpu", dtype=torch.bfloat16)
    assert next(pipe.model.parameters()).dtype == torch.bfloat16
    assert isinstance(pipe([random_image(3), "An image of"], max_new_tokens=3), str)


def shots(n: int, query: str = "Output:"):
    """An n-shot captioning prompt: n demonstrations, then the query image and text."""
    items = []
    for i in range(n):
        items += [random_image(i), f"Output: a red circle number {i}.<|endofchunk|>"]
    return items + [random_image(99), query]


def test_prompt_longer_than_the_training_length_is_not_cut(saved_dir, tokenizer, image_processor):
    """The processor saved at training (max_length=16) does not cut prompts at inference."""
    FlamingoProcessor(tokenizer, image_processor, max_length=16).save_pretrained(saved_dir)
    pipe = FlamingoPipeline.from_pretrained(saved_dir)
    prompt = shots(3)
    full = pipe.processor([prompt], padding_side="left")
    assert full["input_ids"].shape[1] > 16
    expected = pipe.model.generate(**full, max_new_tokens=4)
    assert pipe(prompt, max_new_tokens=4) == pipe.processor.batch_decode(expected)[0]


def test_prompt_longer_than_the_context_drops_demonstrations_not_the_query(processor):
    """With a 64-position LM, an 8-shot prompt keeps its query and its newest demonstrations."""
    torch.manual_seed(0)
    model = FlamingoModel.from_parts(build_lm("gpt2", vocab_size=300, max_positions=64),
                                     build_vision("clip"), FlamingoConfig(**TINY_FLAMINGO),
                                     processor=processor)
    open_gates(model, 0.5)
    pipe = FlamingoPipeline(model, processor)
    prompt = shots(8)
    assert processor([prompt])["input_ids"].shape[1] > 64
    with pytest.warns(UserWarning, match=r"prompt 0: \d+ tokens exceed max_length=59; dropped its "
                                         r"first (\d) of 8 demonstrations") as record:
        text = pipe(prompt, max_new_tokens=5)
    dropped = int(str(record[0].message).split("first ")[1].split(" ")[0])
    assert text == pipe(shots(8)[2 * dropped:], max_new_tokens=5)
    with pytest.raises(ValueError, match="prompt 0: .*without its 0 demonstrations"):
        pipe(shots(0, query="Output: " + "a red circle " * 30))
    with pytest.raises(ValueError, match="max_new_tokens=64 leaves no room"):
        pipe(shots(0), max_new_tokens=64)


def test_generation_options_pass_through(saved_dir):
    from transformers import GenerationConfig

    pipe = FlamingoPipeline.from_pretrained(saved_dir)
    prompt = [random_image(1), "An image of two cats.<|endofchunk|>", random_image(2), "An image of"]
    batch = pipe.processor([prompt], padding_side="left")
    options = dict(max_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2,
                   suppress_tokens=[0, *range(3, 259)])  # no byte tokens: readable text
    expected = pipe.processor.batch_decode(pipe.model.generate(**batch, **options),
                                           skip_special_tokens=True)[0]
    assert pipe(prompt, **options) == expected
    assert pipe(prompt, generation_config=GenerationConfig(**options)) == expected
    # stop_strings get the processor's tokenizer without being asked.
    stop = expected.strip()[:2]
    assert len(expected.strip()) > 4, expected
    assert pipe(prompt, stop_strings=[stop], **options).endswith(stop)
    samples = pipe([prompt, prompt], do_sample=True, num_return_sequences=3, seed=0,
                   max_new_tokens=4)
    assert [len(s) for s in samples] == [3, 3] and all(isinstance(t, str) for t in samples[0])
    with pytest.raises(ValueError, match="call model.generate for return_dict_in_generate"):
        pipe(prompt, return_dict_in_generate=True, output_scores=True)
    with pytest.raises(ValueError, match="max_new_tokens=4096 leaves no room"):
        pipe(prompt, generation_config=GenerationConfig(max_new_tokens=4096))
