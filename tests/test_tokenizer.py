"""The trained tokenizer: chunk text after a media token reads as it does at the start of a line.

A Flamingo prompt puts ``Output: ...`` right after ``<image>`` and ``<|endofchunk|>``; the text
corpus the LM is pretrained on has the same words at the start of a line or after a space. If
the tokenizer split them differently after a special token (``O ut put :`` instead of
``▁Output :``), every chunk of every prompt would start with pieces the LM never saw.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.processing import EOC_TOKEN, IMAGE_TOKEN, MEDIA_TOKENS

CORPUS = [
    "Output: a red circle and a blue square.",
    "Question: what colour is the circle? Short answer: red",
    "here is a green triangle on the left.",
] * 30
CHUNKS = ["Output: a red circle.", "Question: what colour is the square? Short answer: blue",
          "here is a circle."]


def pieces(tokenizer, text: str) -> list[str]:
    """Tokens of ``text`` without the media specials."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [p for p in tokenizer.convert_ids_to_tokens(ids) if p not in MEDIA_TOKENS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(directory)
    return tokenizer, directory


@pytest.mark.parametrize("reload", [False, True], ids=["in-memory", "saved-and-loaded"])
def test_chunk_text_after_media_tokens_is_tokenized_as_at_line_start(trained, reload):
    tokenizer, directory = trained
    if reload:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    for chunk in CHUNKS:
        at_line_start = pieces(tokenizer, chunk)
        assert at_line_start[0].startswith("▁"), at_line_start
        assert pieces(tokenizer, IMAGE_TOKEN + chunk) == at_line_start
        assert pieces(tokenizer, f"{IMAGE_TOKEN}Output: x{EOC_TOKEN}{IMAGE_TOKEN}{chunk}")[-len(
            at_line_start):] == at_line_start


def test_decoding_a_prompt_gives_its_text_back(trained):
    tokenizer, directory = trained
    loaded = AutoTokenizer.from_pretrained(directory)
    text = f"{IMAGE_TOKEN}Output: a red circle.{EOC_TOKEN}{IMAGE_TOKEN}Output: a blue square."
    for tok in (tokenizer, loaded):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=False) == text
        # a generated answer decodes without a leading space
        answer = tok(" a red circle.", add_special_tokens=False)["input_ids"]
        assert tok.decode(answer) == "a red circle."


def test_media_token_ids_follow_the_trained_vocabulary(trained):
    tokenizer, directory = trained
    loaded = AutoTokenizer.from_pretrained(directory)
    for tok in (tokenizer, loaded):
        assert tok.convert_tokens_to_ids([IMAGE_TOKEN, EOC_TOKEN]) == [300, 301]
        assert tok.pad_token == tok.eos_token == "</s>"
