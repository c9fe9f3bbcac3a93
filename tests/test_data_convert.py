"""MMC4 / OBELICS conversion: images land at their matched sentences, bad images are counted."""

import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipelines.cli import main
from data_pipelines.convert import ImageName, convert, mmc4_items
from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.from_scratch import image_processor

SENTENCES = ["first sentence here.", "second sentence here.", "third sentence here."]


def mmc4_row(image_info):
    return {"text_list": SENTENCES, "image_info": image_info}


def test_images_go_to_their_matched_sentences_not_list_order():
    row = mmc4_row([
        {"image_name": "img0.png", "matched_text_index": 2, "matched_sim": 0.3},
        {"image_name": "img1.png", "matched_text_index": 0, "matched_sim": 0.3},
    ])
    items = mmc4_items(row)
    assert items == ["img1.png", SENTENCES[0], SENTENCES[1], "img0.png", SENTENCES[2]]
    assert [isinstance(i, ImageName) for i in items] == [True, False, False, True, False]


def test_threshold_drops_weak_matches():
    row = mmc4_row([
        {"image_name": "a.png", "matched_text_index": 1, "matched_sim": 0.1},
        {"image_name": "b.png", "matched_text_index": 1, "matched_sim": 0.4},
        {"image_name": "c.png", "matched_text_index": 1, "matched_sim": 0.5},
    ])
    assert mmc4_items(row, sim_threshold=0.35) == [SENTENCES[0], "b.png", "c.png",
                                                    SENTENCES[1], SENTENCES[2]]


@pytest.fixture()
def corpus(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    colors = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}
    for name, color in colors.items():
        Image.new("RGB", (16, 16), color).save(images / name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    rows = [
        mmc4_row([{"image_name": "red.png", "matched_text_index": 2, "matched_sim": 0.3},
                  {"image_name": "green.png", "matched_text_index": 0, "matched_sim": 0.3}]),
        mmc4_row([{"image_name": "broken.png", "matched_text_index": 0, "matched_sim": 0.3},
                  {"image_name": "nowhere.png", "matched_text_index": 1, "matched_sim": 0.3},
                  {"image_name": "blue.png", "matched_text_index": 1, "matched_sim": 0.3},
                  {"image_name": "red.png", "matched_text_index": 2, "matched_sim": 0.3}]),
        mmc4_row([]),  # no images: not written
    ]
    path = tmp_path / "mmc4.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json at all\n")
    return tmp_path, colors


def pixel_colors(batch, row, n):
    """Mean colour of each image slot after CLIP normalisation, as the argmax channel."""
    return [int(batch["pixel_values"][row, i, 0].mean((1, 2)).argmax()) for i in range(n)]


def test_converted_mmc4_trains_with_images_in_sentence_order(corpus):
    root, _ = corpus
    counts = convert("mmc4", [str(root / "mmc4.jsonl")], str(root / "images"),
                     str(root / "shards"), shard_size=10, max_images=2)
    assert counts["documents"] == 2 and counts["no_images"] == 1 and counts["bad_row"] == 1
    assert counts["corrupt_image"] == 1 and counts["missing_image"] == 1
    assert counts["images"] == 4  # doc 2 keeps blue and red (max_images=2 after the bad ones)
    tok = train_tokenizer(SENTENCES * 10, vocab_size=300)
    loader = build_loader([SourceConfig("mmc4", "interleaved", str(root / "shards"))], tok,
                          image_processor(16), batch_size=2, max_length=128, resampled=False,
                          shuffle_buffer=1)
    batch = next(iter(loader))
    text = [tok.decode(r, skip_special_tokens=False).replace("</s>", "")
            for r in batch["input_ids"]]
    first = next(i for i, t in enumerate(text) if t.startswith("<image>first"))
    # image 1 (green) sits before sentence 0, image 0 (red) before sentence 2
    assert text[first].startswith("<image>first sentence here. second sentence here."
                                  "<|endofchunk|><image>third sentence here.<|endofchunk|>")
    assert pixel_colors(batch, first, 2) == [1, 0]  # green, then red
    other = 1 - first
    assert pixel_colors(batch, other, 2) == [2, 0]  # blue (sentence 1), then red (sentence 2)
    assert torch.equal(batch["pixel_values"][first, 1], batch["pixel_values"][other, 1])


def test_obelics_rows_convert_in_order(tmp_path):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.png")
    rows = [{"texts": ["intro", None, "about a", None], "images": [None, "a.png", None,
                                                                    "http://x/y.jpg"]},
            {"texts": ["only text"], "images": [None]},
            {"texts": ["bad"], "images": []}]
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code = main(["convert", "--format", "obelics", "--input", str(tmp_path / "o.jsonl"),
                 "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 0

    samples = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "out/docs-000000.tar")]),
                                    wds.tarfile_to_samples()))
    assert len(samples) == 1
    meta = json.loads(samples[0]["json"])
    assert meta == {"texts": ["intro", None, "about a"], "images": [None, "img0.png", None]}
