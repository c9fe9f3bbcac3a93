"""Loader: rank/worker splitting, mixing, skipping bad samples with counts, exact resume."""

import json
import os
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.shards import interleaved_sample, json_bytes, png_bytes, write_shards
from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.from_scratch import image_processor

TEXTS = ["sample 0123 is a red circle.", "pair 4567 shows a blue square.", "the end 89."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def proc():
    return image_processor(16)


def image(i):
    return Image.new("RGB", (16, 16), ((i * 37) % 256, (i * 91) % 256, 128))


def doc_sample(i):
    n_images = 1 + i % 3
    items = [f"intro {i}. "]
    for j in range(n_images):
        items += [image(i + j), f"sample {i:04d} image {j}."]
    return interleaved_sample(f"doc{i:04d}", items)


def pair_sample(i):
    return {"__key__": f"pair{i:04d}", "png": png_bytes(image(i)), "txt": f"pair {i:04d}".encode()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    docs = write_shards((doc_sample(i) for i in range(30)), str(root / "docs"), "docs", 5)
    pairs = write_shards((pair_sample(i) for i in range(12)), str(root / "pairs"), "pairs", 4)
    return {"root": root, "docs": docs, "pairs": pairs}


def sample_ids(batch, tok):
    """The numbers written in each row's text (docs: 'sample NNNN', pairs: 'pair NNNN')."""
    out = []
    for row in batch["input_ids"]:
        text = tok.decode(row, skip_special_tokens=True)
        found = set(re.findall(r"(sample|pair) (\d{4})", text))
        assert len(found) == 1, text
        kind, num = found.pop()
        out.append(f"{kind}{num}")
    return out


def loader_for(world, tok, proc, sources=("docs",), **kw):
    configs = {
        "docs": SourceConfig("docs", "interleaved", world["docs"], weight=1.0),
        "pairs": SourceConfig("pairs", "pairs", str(world["root"] / "pairs"), weight=0.5,
                              loss_weight=0.5),
    }
    args = dict(batch_size=3, max_length=64, max_images=4, seed=0, shuffle_buffer=8)
    args.update(kw)
    return build_loader([configs[s] for s in sources], tok, proc, **args)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_batch_contract(world, tok, proc):
    batch = take(loader_for(world, tok, proc, sources=("docs", "pairs")), 1)[0]
    b, t = batch["input_ids"].shape
    assert b == 3 and batch["labels"].shape == (b, t) and batch["attention_mask"].shape == (b, t)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape[:3] == (b, batch["pixel_values"].shape[1], 1)
    assert batch["pixel_values"].shape[3:] == (3, 16, 16)
    image_id = tok.convert_tokens_to_ids("<image>")
    for row in range(b):
        n_img = int((batch["input_ids"][row] == image_id).sum())
        # exactly the first n_img image slots are filled; the rest are zero padding
        filled = batch["pixel_values"][row].flatten(1).abs().sum(1) > 0
        assert filled.tolist() == [True] * n_img + [False] * (len(filled) - n_img)
    assert batch["source_index"].dtype == torch.long and batch["source_index"].shape == (b,)


def test_images_follow_token_order(world, tok, proc):
    """Row b's n-th image tensor is the image of the n-th <image> of its document."""
    batch = take(loader_for(world, tok, proc, batch_size=6), 1)[0]
    for row, sid in enumerate(sample_ids(batch, tok)):
        i = int(sid[-4:])
        n_img = int((batch["input_ids"][row] == tok.convert_tokens_to_ids("<image>")).sum())
        expected = proc(images=[image(i + j) for j in range(n_img)],
                        return_tensors="pt")["pixel_values"]
        assert torch.allclose(batch["pixel_values"][row, :n_img, 0], expected)


@pytest.mark.parametrize("n_docs_shards", [6, 3])  # 3 shards < 4 streams: split by sample
def test_two_ranks_two_workers_one_epoch_each_sample_once(world, tok, proc, monkeypatch,
                                                          n_docs_shards):
    shards = world["docs"][:n_docs_shards]
    expected = {f"sample{i:04d}" for i in range(5 * n_docs_shards)}
    seen = []
    for rank in range(2):
        for worker in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            loader = build_loader([SourceConfig("docs", "interleaved", shards)], tok, proc,
                                  batch_size=4, max_length=64, seed=3, rank=None,
                                  world_size=None, resampled=False)
            got = [s for batch in loader for s in sample_ids(batch, tok)]
            assert got, f"rank {rank} worker {worker} got nothing"
            seen += got
    assert sorted(seen) == sorted(expected)


def test_real_dataloader_workers_one_epoch(world, tok, proc):
    seen = []
    for rank in range(2):
        loader = loader_for(world, tok, proc, sources=("docs", "pairs"), rank=rank, world_size=2,
                            num_workers=2, resampled=False)
        seen += [s for batch in loader for s in sample_ids(batch, tok)]
    expected = [f"sample{i:04d}" for i in range(30)] + [f"pair{i:04d}" for i in range(12)]
    assert Counter(seen) == Counter(expected)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("consumed", [1, 4])
def test_resume_continues_exactly(world, tok, proc, num_workers, consumed, pack):
    kw = dict(sources=("docs", "pairs"), num_workers=num_workers, batch_size=2, pack=pack)
    reference = take(loader_for(world, tok, proc, **kw), consumed + 5)

    first = loader_for(world, tok, proc, **kw)
    head = take(first, consumed)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = loader_for(world, tok, proc, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, 5)
    keys = ["input_ids", "labels", "attention_mask", "pixel_values", "source_index"]
    for got, want in zip(head + tail, reference, strict=True):
        assert sorted(got) == sorted(keys + ["position_ids"] * pack)
        for key in keys + ["position_ids"] * pack:
            assert torch.equal(got[key], want[key]), key
    if pack:  # packed rows really hold several documents here
        assert max(int((b["position_ids"] == 0).sum()) for b in reference) > 2 * 2


def packed_documents(batch, image_id):
    """The documents of a packed batch: (source index, token ids, pixels) in row order."""
    out = []
    for row in range(len(batch["input_ids"])):
        real = int(batch["attention_mask"][row].sum())
        starts = (batch["position_ids"][row, :real] == 0).nonzero().squeeze(1).tolist()
        image = 0
        for start, end in zip(starts, starts[1:] + [real]):
            ids = batch["input_ids"][row, start:end]
            n = int((ids == image_id).sum())
            assert (batch["source_index"][row, start:end] == batch["source_index"][row, start]).all()
            assert (batch["labels"][row, start] == -100)  # nothing predicted across a boundary
            out.append((int(batch["source_index"][row, start]), ids.tolist(),
                        batch["pixel_values"][row, image:image + n, 0]))
            image += n
        assert not batch["pixel_values"][row, image:].any()  # only padding after its images
    return out


def test_packing_keeps_every_document_whole_once(world, tok, proc):
    """One epoch packed: the same documents as unpacked, each once, whole, with its images."""
    kw = dict(sources=("docs", "pairs"), resampled=False, max_length=64, batch_size=3)
    unpacked = []
    for batch in loader_for(world, tok, proc, **kw):
        for row in range(len(batch["input_ids"])):
            real = int(batch["attention_mask"][row].sum())
            n = int((batch["input_ids"][row] == tok.convert_tokens_to_ids("<image>")).sum())
            unpacked.append((int(batch["source_index"][row]),
                             batch["input_ids"][row, :real].tolist(),
                             batch["pixel_values"][row, :n, 0]))
    packed_batches = list(loader_for(world, tok, proc, pack=True, **kw))
    image_id = tok.convert_tokens_to_ids("<image>")
    packed = [doc for batch in packed_batches for doc in packed_documents(batch, image_id)]
    assert len(packed) == len(unpacked) == 42
    assert len(packed_batches) < len(unpacked) / 3  # several documents per row
    for batch in packed_batches:
        assert batch["input_ids"].shape[0] <= 3 and batch["input_ids"].shape[1] <= 64
    key = lambda doc: (doc[0], doc[1])  # noqa: E731
    for got, want in zip(sorted(packed, key=key), sorted(unpacked, key=key), strict=True):
        assert got[:2] == want[:2] and torch.equal(got[2], want[2])


@pytest.mark.parametrize("pack", [False, True])
def test_cut_documents_are_counted_and_survive_resume(world, tok, proc, pack):
    kw = dict(sources=("docs",), max_length=12, batch_size=2, pack=pack)
    reference = loader_for(world, tok, proc, **kw)
    take(reference, 6)
    first = loader_for(world, tok, proc, **kw)
    take(first, 3)
    resumed = loader_for(world, tok, proc, **kw)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 3)
    assert resumed.truncated() == reference.truncated()
    assert reference.truncated()["docs"] > 0
    assert loader_for(world, tok, proc).truncated() == {}


def test_packing_is_part_of_the_resume_check(world, tok, proc):
    state = loader_for(world, tok, proc).state_dict()
    with pytest.raises(ValueError, match="pack"):
        loader_for(world, tok, proc, pack=True).load_state_dict(state)


def test_iterating_again_continues(world, tok, proc):
    reference = take(loader_for(world, tok, proc), 4)
    loader = loader_for(world, tok, proc)
    got = take(loader, 2) + take(loader, 2)
    assert [sample_ids(b, tok) for b in got] == [sample_ids(b, tok) for b in reference]


def test_resume_rejects_other_settings(world, tok, proc):
    state = loader_for(world, tok, proc).state_dict()
    other = loader_for(world, tok, proc, seed=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_single_source_and_mixture_weights(world, tok, proc):
    only_pairs = take(loader_for(world, tok, proc, sources=("pairs",)), 3)
    assert all(s.startswith("pair") for b in only_pairs for s in sample_ids(b, tok))
    assert all((b["source_index"] == 0).all() for b in only_pairs)
    mixed = take(loader_for(world, tok, proc, sources=("docs", "pairs"), batch_size=8), 30)
    index = torch.cat([b["source_index"] for b in mixed])
    kinds = [s[:4] for b in mixed for s in sample_ids(b, tok)]
    assert [("samp", "pair")[i] for i in index.tolist()] == kinds
    share_docs = (index == 0).float().mean().item()
    assert 0.55 < share_docs < 0.78  # weights 1.0 : 0.5 -> 2/3


def scheduled_loader(world, tok, proc, switch=3, **kw):
    """Pairs alone for ``switch`` batches, then docs alone (a curriculum)."""
    sources = [SourceConfig("docs", "interleaved", world["docs"], weight=0.0,
                            weight_schedule=[(switch, 1.0)]),
               SourceConfig("pairs", "pairs", str(world["root"] / "pairs"),
                            weight_schedule=[(switch, 0.0)])]
    args = dict(batch_size=2, max_length=64, max_images=4, seed=0, shuffle_buffer=8)
    return build_loader(sources, tok, proc, **{**args, **kw})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_weight_schedule_switches_at_the_same_batch_with_any_workers(world, tok, proc,
                                                                    num_workers):
    batches = take(scheduled_loader(world, tok, proc, num_workers=num_workers), 7)
    kinds = [{("docs", "pairs")[i] for i in b["source_index"].tolist()} for b in batches]
    assert kinds == [{"pairs"}] * 3 + [{"docs"}] * 4


def test_weight_schedule_counts_packed_batches(world, tok, proc):
    """Packed: the switch happens at the same batch; the document that overflowed the last
    batch before it was drawn before the switch and opens the first batch after it."""
    batches = take(scheduled_loader(world, tok, proc, pack=True), 7)
    kinds = [{("docs", "pairs")[i] for i in b["source_index"][b["attention_mask"] > 0].tolist()}
             for b in batches]
    assert kinds == [{"pairs"}] * 3 + [{"pairs", "docs"}] + [{"docs"}] * 3


@pytest.mark.parametrize("num_workers, pack", [(0, False), (2, False), (0, True), (2, True)])
@pytest.mark.parametrize("consumed", [2, 3, 5])  # before, at and after the switch
def test_resume_across_a_weight_schedule_continues_exactly(world, tok, proc, num_workers, pack,
                                                           consumed):
    kw = dict(num_workers=num_workers, pack=pack)
    reference = take(scheduled_loader(world, tok, proc, **kw), consumed + 4)
    first = scheduled_loader(world, tok, proc, **kw)
    head = take(first, consumed)
    resumed = scheduled_loader(world, tok, proc, **kw)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for got, want in zip(head + take(resumed, 4), reference):
        for key in ("input_ids", "pixel_values", "source_index"):
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("weight, schedule, message", [
    (0.0, [], "one of them > 0"),
    (-1.0, [(2, 1.0)], ">= 0"),
    (1.0, [(3, 1.0), (2, 0.5)], "strictly increasing"),
    (1.0, [(0, 0.5)], ">= 1"),
])
def test_bad_weight_schedules_are_refused(world, weight, schedule, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SourceConfig("docs", "interleaved", world["docs"], weight=weight,
                     weight_schedule=schedule)


def test_same_seed_same_stream_other_seed_differs(world, tok, proc):
    a = [sample_ids(b, tok) for b in take(loader_for(world, tok, proc, seed=5), 4)]
    b = [sample_ids(b, tok) for b in take(loader_for(world, tok, proc, seed=5), 4)]
    c = [sample_ids(b, tok) for b in take(loader_for(world, tok, proc, seed=6), 4)]
    assert a == b and a != c


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Good documents 0..11 plus one broken sample of each kind, spread over shards."""
    root = tmp_path_factory.mktemp("broken")
    good = [doc_sample(i) for i in range(12)]
    corrupt_image = doc_sample(100)
    corrupt_image["img0.png"] = b"\x89PNG\r\n\x1a\nnot really a png"
    bad_json = doc_sample(101)
    bad_json["json"] = b'{"texts": ["a", '
    missing_member = doc_sample(102)
    missing_member["json"] = json_bytes({"texts": [None, "x"], "images": ["img9.png", None]})
    inconsistent = doc_sample(103)
    inconsistent["json"] = json_bytes({"texts": ["a", "b"], "images": ["img0.png"]})
    truncated_png = doc_sample(104)
    truncated_png["img0.png"] = truncated_png["img0.png"][:40]
    samples = good[:4] + [corrupt_image, bad_json] + good[4:8] + [missing_member, inconsistent,
                                                                   truncated_png] + good[8:]
    paths = write_shards(samples, str(root), "docs", 5)
    # a fourth shard cut in the middle of its second member: the tar itself is truncated
    tail = write_shards([doc_sample(200), doc_sample(201)], str(root / "t"), "tail", 5)[0]
    data = open(tail, "rb").read()
    cut = os.path.join(root, "docs-000099.tar")
    with open(cut, "wb") as f:
        f.write(data[:1700])
    return paths + [cut]


def test_bad_samples_are_skipped_and_counted(broken, tok, proc):
    loader = build_loader([SourceConfig("docs", "interleaved", broken)], tok, proc, batch_size=2,
                          max_length=64, seed=0, resampled=False)
    seen = [s for batch in loader for s in sample_ids(batch, tok)]
    good = {f"sample{i:04d}" for i in range(12)}
    assert good <= set(seen) and len(seen) == len(set(seen))
    assert set(seen) - good <= {"sample0200"}  # the truncated shard's first doc may survive
    skipped = loader.skipped()
    assert skipped["corrupt_image"] == 2  # garbage bytes and a cut-off PNG
    assert skipped["bad_json"] == 2  # unparsable and texts/images length mismatch
    assert skipped["missing_image"] == 1
    assert skipped["truncated_tar"] == 1


def test_skip_counts_survive_resume(broken, tok, proc):
    def build():
        return build_loader([SourceConfig("docs", "interleaved", broken)], tok, proc,
                            batch_size=2, max_length=64, seed=0, shuffle_buffer=4)

    reference = build()
    take(reference, 12)
    first = build()
    take(first, 5)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    take(resumed, 7)
    assert resumed.skipped() == reference.skipped() and sum(reference.skipped().values()) > 0


def test_source_errors_name_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="brace pattern"):
        SourceConfig("docs", "interleaved", str(tmp_path))
    with pytest.raises(ValueError, match="kind must be one of"):
        SourceConfig("docs", "video", str(tmp_path))
