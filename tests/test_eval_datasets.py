"""Readers of the real formats: splits stay apart, fields land where the prompts expect them."""

import json

import pytest

from eval_fewshot.datasets import read_karpathy, read_label_binding, read_vqa
from eval_fewshot.tasks import get_task
from eval_fewshot.toy import write_toy_eval_sets


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_toy_eval_sets(str(tmp_path_factory.mktemp("world")), n_train=10, n_test=5)


def test_karpathy_reader_splits_and_references(world):
    data = get_task("synth_captioning").load(world)
    assert len(data.queries) == 5 and len(data.pools[""]) == 10
    q = data.queries[0]
    assert len(q.references) == 5 and q.target == q.references[0]
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
