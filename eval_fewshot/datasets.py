"""Readers for evaluation sets in their real on-disk formats, all producing :class:`TaskData`.

Every reader returns the test-split *queries* and the *demonstration pools* they may draw from
(the train split; for label binding, each episode's own support set). Readers never mix splits.

Formats (paths are options of the task, see :mod:`eval_fewshot.tasks`):

- Captioning, Karpathy JSON (COCO, Flickr30k): ``annotations`` = ``dataset_coco.json``-style
  file ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}], ...}]}``; the
  image is ``image_root/filepath/filename`` (``filepath`` is absent in Flickr30k).
  ``query_split`` (default ``test``) gives queries, ``demo_splits`` (``train``, ``restval``)
  the demonstrations; a demonstration's caption is its first sentence.
- VQA, VQAv2 JSON (VQAv2, OK-VQA, and VizWiz/TextVQA converted to it): per split a questions
  file ``{"questions": [{"image_id", "question", "question_id"}]}`` and an annotations file
  ``{"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer"}]}]}``;
  the image path is ``image_template.format(image_id=..., split=...)``, e.g.
  ``images/COCO_{split}2014_{image_id:012d}.jpg``. Demonstrations answer with
  ``multiple_choice_answer``.
- Classification: ``classes.json`` = ``{"classes": [name, ...]}`` and ``{split}.json`` =
  ``{"samples": [{"filename", "label": int}]}``, paths relative to the task directory.
- Label binding (synthetic): ``episodes.json``, see :func:`read_label_binding`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TRAIN_POOL = ""


@dataclass(frozen=True)
class Example:
    """One image with what a prompt needs and what the metric compares against.

    ``fields`` fill the prompt template (e.g. ``question``); ``target`` fills its answer slot
    when the example is a demonstration; ``references`` are the ground truth (captions, the ten
    human answers, the class name); ``pool`` names the demonstration pool a query draws from.
    """

    uid: str
    image: str
    target: str
    references: tuple[str, ...]
    fields: Mapping[str, str] = field(default_factory=dict)
    label: str | None = None
    pool: str = TRAIN_POOL
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskData:
    """Queries, demonstration pools, and candidate answers per pool (for rank classification)."""

    queries: list[Example]
    pools: dict[str, list[Example]]
    choices: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.queries:
            raise ValueError("the evaluation set has no queries (check the split names)")
        for q in self.queries:
            if not self.pools.get(q.pool):
                raise ValueError(f"query {q.uid} has no demonstrations (empty pool {q.pool!r})")


def load_json(path: str) -> Any:
    """Read a JSON file with an error that names the file and what was expected there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_images_exist(examples: Iterable[Example]) -> None:
    """Fail early, naming a few missing image files, rather than mid-evaluation."""
    missing = [e.image for e in examples if not os.path.isfile(e.image)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image files are missing, e.g. {missing[:3]}; check the image "
            "root / filename template options of the task"
        )


def read_karpathy(
    annotations: str,
    image_root: str,
    query_split: str = "test",
    demo_splits: Sequence[str] = ("train", "restval"),
) -> TaskData:
    """Captioning set from a Karpathy-split JSON (see the module docstring)."""
    images = load_json(annotations)["images"]
    queries, demos = [], []
    for item in images:
        captions = tuple(s["raw"].strip() for s in item["sentences"])
        example = Example(
            uid=str(item.get("cocoid", item.get("imgid", item["filename"]))),
            image=os.path.join(image_root, item.get("filepath", ""), item["filename"]),
            target=captions[0],
            references=captions,
            extra={"objects": item["objects"]} if "objects" in item else {},
        )
        if item["split"] == query_split:
            queries.append(example)
        elif item["split"] in demo_splits:
            demos.append(example)
    return TaskData(queries, {TRAIN_POOL: demos})


def _read_vqa_split(questions: str, annotations: str, image_template: str, split: str):
    answers = {a["question_id"]: a for a in load_json(annotations)["annotations"]}
    out = []
    for q in load_json(questions)["questions"]:
        ann = answers.get(q["question_id"])
        if ann is None:
            raise ValueError(f"{annotations}: no annotation for question_id {q['question_id']}")
        out.append(Example(
            uid=str(q["question_id"]),
            image=image_template.format(image_id=q["image_id"], split=split),
            target=ann["multiple_choice_answer"],
            references=tuple(a["answer"] for a in ann["answers"]),
            fields={"question": q["question"]},
            extra={"image_id": q["image_id"], "question_type": ann.get("question_type"),
                   "answer_type": ann.get("answer_type")},
        ))
    return out


def read_vqa(
    train_questions: str,
    train_annotations: str,
    test_questions: str,
    test_annotations: str,
    train_image_template: str,
    test_image_template: str | None = None,
    train_split_name: str = "train",
    test_split_name: str = "test",
) -> TaskData:
    """VQA set from VQAv2-format question/annotation files (see the module docstring)."""
    demos = _read_vqa_split(train_questions, train_annotations, train_image_template,
                            train_split_name)
    queries = _read_vqa_split(test_questions, test_annotations,
                              test_image_template or train_image_template, test_split_name)
    return TaskData(queries, {TRAIN_POOL: demos})


def read_classification(
    root: str, classes_file: str = "classes.json", train_split: str = "train",
    test_split: str = "test",
) -> TaskData:
    """Labelled images + class names; rank classification chooses among all class names."""
    classes = load_json(os.path.join(root, classes_file))["classes"]

    def split(name: str) -> list[Example]:
        samples = load_json(os.path.join(root, f"{name}.json"))["samples"]
        return [
            Example(uid=f"{name}/{i}", image=os.path.join(root, s["filename"]),
                    target=classes[s["label"]], references=(classes[s["label"]],),
                    label=classes[s["label"]])
            for i, s in enumerate(samples)
        ]

    return TaskData(split(test_split), {TRAIN_POOL: split(train_split)},
                    {TRAIN_POOL: list(classes)})


def read_label_binding(root: str, episodes_file: str = "episodes.json") -> TaskData:
    """In-context label binding: each episode maps its classes to fresh words.

    ``episodes.json`` = ``{"episodes": [{"episode_id", "names": {class: word}, "support":
    [{"filename", "class"}], "queries": [...]}]}``. A query's demonstrations come from its own
    episode's support set, labelled with that episode's words; the answer is
    ``names[class]`` and the rank-classification candidates are the episode's words.
    """
    pools, choices, queries = {}, {}, []
    for ep in load_json(os.path.join(root, episodes_file))["episodes"]:
        pool, names = f"episode-{ep['episode_id']}", ep["names"]

        def example(item: Mapping[str, str], uid: str, pool=pool, names=names) -> Example:
            word = names[item["class"]]
            return Example(uid=uid, image=os.path.join(root, item["filename"]), target=word,
                           references=(word,), label=word, pool=pool,
                           extra={"class": item["class"]})

        pools[pool] = [example(s, f"{pool}/support/{i}") for i, s in enumerate(ep["support"])]
        choices[pool] = sorted(names.values())
        queries += [example(q, f"{pool}/query/{i}") for i, q in enumerate(ep["queries"])]
    return TaskData(queries, pools, choices)
