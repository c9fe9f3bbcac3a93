"""Readers of the real formats: splits stay apart, fields land where the prompts expect them."""

import json
import os

import pytest
from omegaconf import OmegaConf

from eval_fewshot.datasets import DataFormatError, read_karpathy, read_label_binding, read_vqa
from eval_fewshot.tasks import get_task
from eval_fewshot.toy import write_toy_eval_sets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_toy_eval_sets(str(tmp_path_factory.mktemp("world")), n_train=10, n_test=5)


def test_karpathy_reader_splits_and_references(world):
    data = get_task("synth_captioning").load(world)
    assert len(data.queries) == 5 and len(data.pools[""]) == 10
    q = data.queries[0]
    assert len(q.references) == 3 and q.target == q.references[0]  # the world writes 3 per image
    assert q.extra["objects"][0]["shape"] in q.references[0]
    assert not {e.image for e in data.queries} & {e.image for e in data.pools[""]}


def test_karpathy_without_filepath_like_flickr(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    images = [{"filename": "a.jpg", "imgid": i, "split": s, "sentences": [{"raw": " x y "}]}
              for i, s in enumerate(["train", "test", "val"])]
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    data = read_karpathy(str(tmp_path / "d.json"), str(tmp_path))
    assert [q.uid for q in data.queries] == ["1"] and data.queries[0].image == str(tmp_path / "a.jpg")
    assert [e.uid for e in data.pools[""]] == ["0"]  # val is neither queries nor demos
    assert data.pools[""][0].target == "x y"


def test_vqa_reader_pairs_questions_with_ten_answers(world):
    vqa = f"{world}/eval/vqa"
    data = read_vqa(f"{vqa}/train_questions.json", f"{vqa}/train_annotations.json",
                    f"{vqa}/test_questions.json", f"{vqa}/test_annotations.json",
                    vqa + "/images/{image_id:012d}.png")
    assert len(data.queries) == 10 and len(data.pools[""]) == 20
    q = data.queries[0]
    assert q.fields["question"].endswith("?") and len(q.references) == 10
    assert q.image.endswith(f"{q.extra['image_id']:012d}.png")


def test_label_binding_pools_are_per_episode(world):
    data = read_label_binding(f"{world}/eval/label_binding")
    assert set(data.pools) == {"episode-0", "episode-1"}
    for q in data.queries:
        assert q.target in data.choices[q.pool]
        assert all(d.target in data.choices[q.pool] for d in data.pools[q.pool])
    assert not set(data.choices["episode-0"]) & set(data.choices["episode-1"])


def test_missing_images_fail_early(world, tmp_path):
    vqa = f"{world}/eval/vqa"
    with pytest.raises(FileNotFoundError, match="image files are missing"):
        get_task("synth_vqa").load(world, {"test_image_template": vqa + "/nope/{image_id}.png"})


# -- official release formats -----------------------------------------------------------------

from tests.official_formats import (  # noqa: E402
    write_okvqa,
    write_textvqa,
    write_vizwiz,
    write_vqa_format,
    write_vqav2,
)


def _check_vqa(data, expected, n_val=3):
    assert len(data.queries) == n_val and len(data.pools[""]) == len(expected) - n_val
    for e in [*data.queries, *data.pools[""]]:
        answers = expected[e.uid]
        assert list(e.references) == answers and e.target == answers[1]  # most common answer
        assert os.path.isfile(e.image) and e.fields["question"]
    assert not {e.image for e in data.queries} & {e.image for e in data.pools[""]}


def test_okvqa_official_files_read_without_multiple_choice_answer(tmp_path):
    expected = write_okvqa(str(tmp_path))
    data = get_task("okvqa").load(str(tmp_path))
    _check_vqa(data, expected)
    assert data.queries[0].image.endswith(".jpg") and "val2014" in data.queries[0].image


def test_vqav2_official_files(tmp_path):
    expected = write_vqav2(str(tmp_path))
    _check_vqa(get_task("vqav2").load(str(tmp_path)), expected)


def test_vizwiz_official_files(tmp_path):
    expected = write_vizwiz(str(tmp_path))
    data = get_task("vizwiz").load(str(tmp_path))
    _check_vqa(data, expected)
    assert data.queries[0].image == str(tmp_path / "val" / data.queries[0].uid)
    assert data.queries[0].extra["answerable"] == 1


def test_textvqa_official_files(tmp_path):
    expected = write_textvqa(str(tmp_path))
    data = get_task("textvqa").load(str(tmp_path))
    _check_vqa(data, expected)
    assert os.path.dirname(data.queries[0].image) == str(tmp_path / "train_images")


@pytest.mark.parametrize("task, writer", [("vizwiz", write_vizwiz), ("textvqa", write_textvqa)])
def test_openflamingo_vqa_format_still_reads(tmp_path, task, writer):
    """The VQAv2-format conversion OpenFlamingo distributes, through the shipped task config."""
    official = writer(str(tmp_path))
    data = get_task(task).load(str(tmp_path))
    ids = {e.uid: ("val" if e in data.queries else "train",
                   os.path.splitext(os.path.basename(e.image))[0] if task == "textvqa"
                   else os.path.basename(e.image))
           for e in [*data.queries, *data.pools[""]]}
    write_vqa_format(str(tmp_path), official, ids)
    config = OmegaConf.load(os.path.join(REPO, "configs", "eval", f"{task}_vqa_format.yaml"))
    converted = get_task(task).load(str(tmp_path), OmegaConf.to_container(config))
    assert len(converted.queries) == 3 and len(converted.pools[""]) == 4
    assert sorted(q.references for q in converted.queries) == sorted(
        q.references for q in data.queries)
    assert {q.image for q in converted.queries} == {q.image for q in data.queries}


def test_demo_answer_first_like_openflamingo(tmp_path):
    expected = write_okvqa(str(tmp_path))
    data = get_task("okvqa").load(str(tmp_path), {"demo_answer": "first"})
    assert all(e.target == expected[e.uid][0] for e in data.pools[""])
    with pytest.raises(ValueError, match="demo_answer"):
        get_task("okvqa").load(str(tmp_path), {"demo_answer": "random"})


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ('{"questions": [{"image_id": 1, "question": "q?"}]}', "question_id"),
    ('{"questions": {"image_id": 1}}', "questions"),
    ('[1, 2]', "questions"),
])
def test_malformed_questions_file_names_the_file(tmp_path, content, match):
    write_vqav2(str(tmp_path))
    bad = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    bad.write_text(content)
    with pytest.raises(DataFormatError, match=match) as info:
        get_task("vqav2").load(str(tmp_path))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("task, writer, name, content", [
    ("okvqa", write_okvqa, "mscoco_train2014_annotations.json",
     '{"annotations": [{"question_id": 1}]}'),
    ("okvqa", write_okvqa, "mscoco_val2014_annotations.json", '{"annotations": [3]}'),
    ("vizwiz", write_vizwiz, "val.json", '[{"image": "x.jpg", "question": "q", "answers": ["a"]}]'),
    ("vizwiz", write_vizwiz, "train.json", '{"data": []}'),
    ("textvqa", write_textvqa, "TextVQA_0.5.1_val.json", '{"data": [{"question": "q"}]}'),
    ("coco", None, "dataset_coco.json", '{"images": [{"filename": "a.jpg"}]}'),
])
def test_malformed_annotation_files_name_the_file(tmp_path, task, writer, name, content):
    if writer is not None:
        writer(str(tmp_path))
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError) as info:
        get_task(task).load(str(tmp_path))
    assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
