"""Sequence building: token layout, label masking and image order of single documents."""

import pytest
import torch

from data_pipelines.sequence import (
    IGNORE_INDEX,
    SequenceBuilder,
    collate,
    document_text,
    supervision_mask,
)


class Img:
    """A stand-in image that only needs an identity."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


def reference_labels(ids, image_id, eoc_id):
    """Straightforward per-token oracle for the masking rule."""
    labels, in_chunk = [], False
    for t in ids:
        if t == image_id:
            in_chunk = True
            labels.append(IGNORE_INDEX)
        elif t == eoc_id:
            labels.append(t if in_chunk else IGNORE_INDEX)
            in_chunk = False
        else:
            labels.append(t if in_chunk else IGNORE_INDEX)
    return labels


def expected_ids(tokenizer, layout):
    return tokenizer(layout, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]


def test_zero_images_all_masked(tokenizer):
    doc = SequenceBuilder(tokenizer, max_length=64)(["the blick is here."])
    assert doc.input_ids.tolist() == expected_ids(tokenizer, "the blick is here.")
    assert doc.labels.tolist() == [IGNORE_INDEX] * len(doc.input_ids)
    assert doc.images == [] and doc.n_supervised == 0


def test_one_image(tokenizer):
    img = Img("a")
    doc = SequenceBuilder(tokenizer, max_length=64)(["intro text. ", img, "a red circle."])
    ids = expected_ids(tokenizer, "intro text. <image>a red circle.<|endofchunk|>")
    assert doc.input_ids.tolist() == ids
    image_id, eoc_id = tokenizer.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    start, end = ids.index(image_id), ids.index(eoc_id)
    # supervised: exactly the chunk text and its <|endofchunk|>; not intro, <image> or EOS
    expected = [IGNORE_INDEX] * (start + 1) + ids[start + 1 : end + 1] + [IGNORE_INDEX]
    assert doc.labels.tolist() == expected
    assert doc.images == [img]


def test_three_images_order_and_masks(tokenizer):
    a, b, c = Img("a"), Img("b"), Img("c")
    items = ["intro text. ", a, "a red circle.", " the blick is here. ", b,
             "Output: a small green triangle.", c, "Short answer: blue"]
    # the distractor after a chunk's text belongs to the first chunk (no <image> between)
    doc = SequenceBuilder(tokenizer, max_length=256)(items)
    layout = ("intro text. <image>a red circle. the blick is here. <|endofchunk|><image>"
              "Output: a small green triangle.<|endofchunk|><image>Short answer: blue<|endofchunk|>")
    ids = expected_ids(tokenizer, layout)
    assert doc.input_ids.tolist() == ids
    image_id, eoc_id = tokenizer.convert_tokens_to_ids(["<image>", "<|endofchunk|>"])
    assert doc.labels.tolist() == reference_labels(ids, image_id, eoc_id)
    assert doc.images == [a, b, c]
    assert doc.input_ids.tolist().count(image_id) == 3


def test_text_between_chunks_is_masked():
    ids = torch.tensor([5, 9, 6, 7, 8, 9, 6, 7, 8, 3])  # 9=<image>, 8=<eoc>
    mask = supervision_mask(ids, image_token_id=9, eoc_token_id=8)
    assert mask.tolist() == [False, False, True, True, True, False, True, True, True, False]
    ids = torch.tensor([9, 6, 8, 4, 4, 9, 6, 8, 2])  # text 4 4 sits between chunks
    mask = supervision_mask(ids, image_token_id=9, eoc_token_id=8)
    assert mask.tolist() == [False, True, True, False, False, False, True, True, False]


def test_batched_mask_matches_rows():
    rows = torch.randint(0, 12, (6, 40), generator=torch.Generator().manual_seed(0))
    batched = supervision_mask(rows, 9, 8)
    for r in range(len(rows)):
        assert torch.equal(batched[r], supervision_mask(rows[r], 9, 8))
        oracle = reference_labels(rows[r].tolist(), 9, 8)
        assert [lab != IGNORE_INDEX for lab in oracle] == batched[r].tolist()


def test_adjacent_images_share_a_chunk():
    a, b = Img("a"), Img("b")
    text, images = document_text([a, b, "two shapes"])
    assert text == "<image><image>two shapes<|endofchunk|>"
    assert images == [a, b]


def test_max_images_drops_later_images_and_their_text(tokenizer):
    imgs = [Img(str(i)) for i in range(4)]
    items = [x for i, img in enumerate(imgs) for x in (img, f"shape {i}.")]
    text, images = document_text(items, max_images=2)
    assert text == "<image>shape 0.<|endofchunk|><image>shape 1.<|endofchunk|>"
    assert images == imgs[:2]
    doc = SequenceBuilder(tokenizer, max_length=256, max_images=2)(items)
    assert doc.images == imgs[:2]


@pytest.mark.parametrize("max_length", range(2, 40))
def test_truncation_keeps_images_and_tokens_paired(tokenizer, max_length):
    imgs = [Img(str(i)) for i in range(3)]
    items = ["intro text. ", imgs[0], "a red circle.", imgs[1], "Output: a small green triangle.",
             imgs[2], "blue"]
    doc = SequenceBuilder(tokenizer, max_length=max_length)(items)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    n_tokens = doc.input_ids.tolist().count(image_id)
    assert len(doc.input_ids) <= max_length
    assert doc.images == imgs[:n_tokens]
    assert len(doc.input_ids) == 0 or doc.input_ids[-1] != image_id
    full = SequenceBuilder(tokenizer, max_length=512)(items)
    assert doc.input_ids.tolist() == full.input_ids[: len(doc.input_ids)].tolist()


@pytest.mark.parametrize("max_length", range(2, 30))
def test_truncation_drops_every_image_left_without_text(tokenizer, max_length):
    """Adjacent images share a chunk: a cut after any of them drops them all."""
    imgs = [Img(str(i)) for i in range(5)]
    items = ["intro. ", imgs[0], imgs[1], "two shapes.", imgs[2], imgs[3], imgs[4], "blue"]
    doc = SequenceBuilder(tokenizer, max_length=max_length)(items)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = doc.input_ids.tolist()
    assert doc.images == imgs[: ids.count(image_id)]
    # Every <image> is followed, within the sequence, by a token that is not an image.
    for i, t in enumerate(ids):
        if t == image_id:
            assert any(u != image_id for u in ids[i + 1:]), (max_length, ids)
    full = SequenceBuilder(tokenizer, max_length=512)(items)
    assert ids == full.input_ids[: len(ids)].tolist()


def test_collate_pads_and_aligns_pixels(tokenizer):
    builder = SequenceBuilder(tokenizer, max_length=64)
    docs = [builder([Img("a"), "a red circle."]),
            builder([Img("b"), "blue", Img("c"), "Output: a small green triangle."])]
    pixels = [torch.full((1, 3, 4, 4), 1.0), torch.stack([torch.full((3, 4, 4), 2.0),
                                                          torch.full((3, 4, 4), 3.0)])]
    batch = collate(docs, pixels, pad_token_id=tokenizer.pad_token_id)
    n0 = len(docs[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (batch["input_ids"].shape[1] - n0)
    assert (batch["input_ids"][0, n0:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 2, 1, 3, 4, 4)
    assert batch["pixel_values"][0, 0].unique().tolist() == [1.0]
    assert batch["pixel_values"][0, 1].abs().sum() == 0  # zero padding
    assert batch["pixel_values"][1, :, 0, 0, 0, 0].tolist() == [2.0, 3.0]


def test_builder_rejects_bad_limits(tokenizer):
    with pytest.raises(ValueError, match="max_length"):
        SequenceBuilder(tokenizer, max_length=1)
    with pytest.raises(ValueError, match="max_images"):
        SequenceBuilder(tokenizer, max_length=8, max_images=0)
