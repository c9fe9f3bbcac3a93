"""FlamingoPipeline: strings in, strings out, from a saved directory."""

from __future__ import annotations

import pytest
import torch

from flamingo_kit import FlamingoPipeline
from tests.conftest import build_model, open_gates, random_image


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
