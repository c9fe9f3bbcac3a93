"""Synthetic world: determinism, ground truth, disjoint splits, real-format eval files."""

import hashlib
import io
import json
import os
import random
import re

import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.synthetic import WorldConfig, synthesize
from data_pipelines.synthetic.documents import DOC_BUILDERS, anchored_binding_doc, corpus_line
from data_pipelines.synthetic.language import (
    REAL_WORDS,
    caption,
    fresh_names,
    questions,
)
from data_pipelines.synthetic.scenes import COLORS, SHAPES, UniqueImages, render, sample_scene
from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.from_scratch import image_processor

SMALL = dict(n_pairs=40, n_docs=30, n_anchored=12, n_corpus=60, n_eval=12, n_episodes=3, image_size=32,
             shard_size=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = synthesize(str(out), WorldConfig(seed=7, **SMALL))
    return out, summary


def tar_digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    out, summary = world
    again = tmp_path / "again"
    synthesize(str(again), WorldConfig(seed=7, **SMALL))
    for rel in summary["pair_shards"] + summary["doc_shards"] + ["corpus.txt",
                                                                 "eval/vqa/test_questions.json"]:
        assert tar_digest(out / rel) == tar_digest(again / rel), rel
    other = tmp_path / "other"
    synthesize(str(other), WorldConfig(seed=8, **SMALL))
    assert tar_digest(out / summary["pair_shards"][0]) != tar_digest(
        other / summary["pair_shards"][0])


def test_layout_and_counts(world):
    out, summary = world
    assert len(summary["pair_shards"]) == 4 and len(summary["doc_shards"]) == 3
    assert summary["anchored_shards"] == ["binding_anchored/docs-000000.tar",
                                          "binding_anchored/docs-000001.tar"]
    assert sum(summary["doc_kinds"].values()) == 30
    lines = open(out / "corpus.txt").read().splitlines()
    assert len(lines) == 60 and all(lines)


def test_rendered_colors_match_ground_truth():
    rng = random.Random(0)
    for _ in range(20):
        objects = sample_scene(rng)
        image = render(objects, 64)
        for obj in objects:
            pixel = image.getpixel((int(obj.x * 64), int(obj.y * 64)))
            assert pixel == COLORS[obj.color], (obj, pixel)
        cells = {(o.column, o.y > 0.5) for o in objects}
        assert len(cells) == len(objects)  # one object per grid cell: positions are unambiguous


def test_questions_have_exact_answers():
    rng = random.Random(1)
    for _ in range(50):
        objects = sample_scene(rng)
        for qa in questions(objects, rng):
            if qa.question.startswith("what color is the "):
                shape = qa.question.removeprefix("what color is the ").rstrip("?")
                assert [o.color for o in objects if o.shape == shape] == [qa.answer]
            elif qa.question.startswith("is there a "):
                color, shape = qa.question.removeprefix("is there a ").rstrip("?").split()
                present = any(o.color == color and o.shape == shape for o in objects)
                assert qa.answer == ("yes" if present else "no")
            elif qa.question.startswith("how many"):
                assert qa.answer == ["zero", "one", "two", "three", "four"][len(objects)]


def test_nonsense_names_are_fresh_words():
    names = fresh_names(random.Random(0), 200)
    assert len(set(names)) == 200 and not set(names) & REAL_WORDS


def eval_image_paths(out):
    ev = out / "eval"
    cap = json.load(open(ev / "captioning/dataset.json"))["images"]
    paths = {}
    for split in ("train", "test"):
        paths[f"cap-{split}"] = [ev / "captioning" / e["filepath"] / e["filename"] for e in cap
                                 if e["split"] == split]
        qs = json.load(open(ev / f"vqa/{split}_questions.json"))["questions"]
        paths[f"vqa-{split}"] = sorted({ev / "vqa/images" / f"{q['image_id']:012d}.png"
                                        for q in qs})
        samples = json.load(open(ev / f"classification/{split}.json"))["samples"]
        paths[f"cls-{split}"] = [ev / "classification" / s["filename"] for s in samples]
    episodes = json.load(open(ev / "label_binding/episodes.json"))["episodes"]
    for part in ("support", "queries"):
        paths[f"bind-{part}"] = [ev / "label_binding" / i["filename"] for e in episodes
                                 for i in e[part]]
    return paths


def pixels(path_or_image):
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def test_no_image_shared_between_splits_or_with_training(world):
    out, summary = world
    train = set()
    for rel in summary["pair_shards"] + summary["doc_shards"]:
        for sample in wds.DataPipeline(wds.SimpleShardList([str(out / rel)]),
                                       wds.tarfile_to_samples()):
            for key, value in sample.items():
                if key.endswith("png"):
                    train.add(pixels(Image.open(io.BytesIO(value))))
    groups = {name: [pixels(p) for p in paths] for name, paths in eval_image_paths(out).items()}
    seen = set(train)
    total = len(train)
    for name, digests in groups.items():
        assert digests, name
        seen |= set(digests)
        total += len(digests)
    assert len(seen) == total  # every image, training or eval, appears exactly once


def test_eval_schema_plain_json(world):
    out, _ = world
    ev = out / "eval"
    cap = json.load(open(ev / "captioning/dataset.json"))
    assert cap["dataset"] == "synthetic"
    assert {e["split"] for e in cap["images"]} == {"train", "test"}
    for e in cap["images"]:
        assert set(e) >= {"filepath", "filename", "imgid", "cocoid", "split", "sentences",
                          "objects"}
        assert e["sentences"][0]["raw"] == caption_from_objects(e["objects"])
        assert all(isinstance(t, str) for s in e["sentences"] for t in s["tokens"])
        assert os.path.isfile(ev / "captioning" / e["filepath"] / e["filename"])
    for split in ("train", "test"):
        qs = json.load(open(ev / f"vqa/{split}_questions.json"))["questions"]
        anns = {a["question_id"]: a for a in
                json.load(open(ev / f"vqa/{split}_annotations.json"))["annotations"]}
        assert qs and set(anns) == {q["question_id"] for q in qs}
        for q in qs:
            a = anns[q["question_id"]]
            assert a["image_id"] == q["image_id"] and len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert a["answer_type"] in ("yes/no", "number", "other")
            assert os.path.isfile(ev / "vqa/images" / f"{q['image_id']:012d}.png")
    classes = json.load(open(ev / "classification/classes.json"))["classes"]
    assert classes == list(SHAPES)
    for split in ("train", "test"):
        for s in json.load(open(ev / f"classification/{split}.json"))["samples"]:
            assert 0 <= s["label"] < len(classes)
            assert os.path.isfile(ev / "classification" / s["filename"])
    episodes = json.load(open(ev / "label_binding/episodes.json"))["episodes"]
    words = [w for e in episodes for w in e["names"].values()]
    assert len(words) == len(set(words)) == 2 * len(episodes)  # fresh words per episode
    for e in episodes:
        assert len(e["names"]) == 2 and len(e["support"]) >= 16 and e["queries"]
        counts = [sum(i["class"] == c for i in e["support"]) for c in e["names"]]
        assert counts[0] == counts[1]  # class-balanced
        for item in e["support"] + e["queries"]:
            assert item["class"] in e["names"]
            image = Image.open(ev / "label_binding" / item["filename"]).convert("RGB")
            assert COLORS[item["class"]] in {c for _, c in image.getcolors(4096)}


def caption_from_objects(objects):
    from data_pipelines.synthetic.scenes import SceneObject

    return caption([SceneObject(**o) for o in objects])


def test_eval_files_load_with_evaluator_readers(world):
    datasets = pytest.importorskip("eval_fewshot.datasets")
    ev = str(world[0] / "eval")
    cap = datasets.read_karpathy(f"{ev}/captioning/dataset.json", f"{ev}/captioning")
    assert len(cap.queries) == 12 and len(cap.pools[datasets.TRAIN_POOL]) == 12
    vqa = datasets.read_vqa(f"{ev}/vqa/train_questions.json", f"{ev}/vqa/train_annotations.json",
                            f"{ev}/vqa/test_questions.json", f"{ev}/vqa/test_annotations.json",
                            f"{ev}/vqa/images/{{image_id:012d}}.png")
    cls = datasets.read_classification(f"{ev}/classification")
    binding = datasets.read_label_binding(f"{ev}/label_binding")
    for task in (cap, vqa, cls, binding):
        datasets.check_images_exist(task.queries)
        datasets.check_images_exist([e for pool in task.pools.values() for e in pool])
    assert all(len(e.references) == 10 for e in vqa.queries)


@pytest.mark.parametrize("kind", sorted(DOC_BUILDERS))
def test_document_kinds_use_the_eval_chunk_formats(kind):
    rng = random.Random(3)
    items = DOC_BUILDERS[kind](rng, UniqueImages(32))
    texts_after_images = [items[i + 1] for i, x in enumerate(items[:-1])
                          if isinstance(x, Image.Image) and isinstance(items[i + 1], str)]
    assert texts_after_images
    prefix = {"captions": "Output: ", "vqa": "Question: ", "binding": "Output: ",
              "story": "here is "}[kind]
    assert all(t.startswith(prefix) for t in texts_after_images)
    if kind == "vqa":
        assert all(" Short answer: " in t for t in texts_after_images)


def test_binding_documents_reuse_their_own_names():
    rng = random.Random(4)
    for _ in range(10):
        items = DOC_BUILDERS["binding"](rng, UniqueImages(32))
        names = [t.removeprefix("Output: ") for t in items if isinstance(t, str)]
        assert len(set(names)) in (2, 3) and len(names) >= 5
        assert names[-1] in names[:-1]  # the final query asks a name the document taught


def test_anchored_binding_documents_say_the_class_word_in_demonstrations_only():
    """``Output: {class} {name}`` in about half the demonstrations, ``Output: {name}`` otherwise
    and always in the query; one name per class within a document."""
    rng = random.Random(5)
    anchored = plain = 0
    for _ in range(20):
        items = anchored_binding_doc(rng, UniqueImages(32))
        chunks = [t.removeprefix("Output: ").split() for t in items if isinstance(t, str)]
        assert len(chunks[-1]) == 1
        names = [words[-1] for words in chunks]
        assert names[-1] in names[:-1]
        named = {}
        for words in chunks[:-1]:
            if len(words) == 2:
                assert words[0] in (*COLORS, *SHAPES)
                assert named.setdefault(words[0], words[1]) == words[1]
        assert len(set(named.values())) == len(named)
        anchored += sum(len(w) == 2 for w in chunks[:-1])
        plain += sum(len(w) == 1 for w in chunks[:-1])
    assert 0.3 < anchored / (anchored + plain) < 0.7


def test_world_trains_through_the_loader(world):
    out, summary = world
    tok = train_tokenizer(open(out / "corpus.txt").read().splitlines(), vocab_size=300)
    loader = build_loader(
        [SourceConfig("docs", "interleaved", str(out / "interleaved")),
         SourceConfig("pairs", "pairs", str(out / "pairs"), weight=0.5)],
        tok, image_processor(32), batch_size=4, max_length=96, seed=0)
    for _, batch in zip(range(3), loader):
        assert batch["pixel_values"].shape[-2:] == (32, 32)
        assert (batch["labels"] != -100).any(dim=1).all()
    assert loader.skipped() == {}


def test_corpus_naming_and_copy_lines_need_the_context():
    """Names hold within a line only (fresh per line); copy lines repeat one word list."""
    rng = random.Random(3)
    lines = [corpus_line(rng) for _ in range(400)]
    naming = [line for line in lines if re.fullmatch(r"(a \w+ \w+\. ?)+", line)]
    copies = [line for line in lines if not line.startswith("a ") and line.count(".") > 1
              and len({part.strip() for part in line.split(".") if part.strip()}) == 1]
    assert len(naming) > 80 and len(copies) > 30
    names_per_class: dict[str, set[str]] = {}
    for line in naming:
        pairs = set(re.findall(r"a (\w+) (\w+)\.", line))
        assert len({c for c, _ in pairs}) == len(pairs)  # one name per class within a line
        for cls, name in pairs:
            assert name not in REAL_WORDS
            names_per_class.setdefault(cls, set()).add(name)
    assert all(len(names) > 5 for names in names_per_class.values())  # names change per line
