"""Readers for evaluation sets in their real on-disk formats, all producing :class:`TaskData`.

Every reader returns the test-split *queries* and the *demonstration pools* they may draw from
(the train split; for label binding, each episode's own support set). Readers never mix splits.
A file that is not valid JSON or lacks a field its format needs raises :class:`DataFormatError`
naming the file and the field.

Formats (paths are options of the task, see :mod:`eval_fewshot.tasks`):

- Captioning, Karpathy JSON (COCO, Flickr30k): ``annotations`` = ``dataset_coco.json``-style
  file ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw"}], ...}]}``; the
  image is ``image_root/filepath/filename`` (``filepath`` is absent in Flickr30k).
  ``query_split`` (default ``test``) gives queries, ``demo_splits`` (``train``, ``restval``)
  the demonstrations; a demonstration's caption is its first sentence.
- VQA, VQAv2 JSON (VQAv2, OK-VQA, the synthetic set, and OpenFlamingo's conversions of VizWiz
  and TextVQA): per split a questions file ``{"questions": [{"image_id", "question",
  "question_id"}]}`` and an annotations file ``{"annotations": [{"question_id", "answers":
  [{"answer"}], "multiple_choice_answer"?}]}`` (OK-VQA has no ``multiple_choice_answer``); the
  image path is ``image_template.format(image_id=..., split=...)``, e.g.
  ``images/COCO_{split}2014_{image_id:012d}.jpg``.
- VizWiz (official release): ``train.json``/``val.json``, each a list of ``{"image",
  "question", "answers": [{"answer", "answer_confidence"}], "answerable", "answer_type"}``;
  the image path is ``image_template.format(image_id=<the "image" file name>)``.
- TextVQA (official release): ``TextVQA_0.5.1_{train,val}.json`` = ``{"data": [{"question",
  "question_id", "image_id", "answers": [ten strings], ...}]}``; images from ``image_template``.
- Classification: ``classes.json`` = ``{"classes": [name, ...]}`` and ``{split}.json`` =
  ``{"samples": [{"filename", "label": int}]}``, paths relative to the task directory.
- Label binding (synthetic): ``episodes.json``, see :func:`read_label_binding`.

A VQA demonstration answers with one of its human answers (option ``demo_answer``):
``most_common`` (default: ``multiple_choice_answer`` where the file has it, which VQAv2 defines
as the most frequent answer, else the most frequent of the answers, ties to the first given) or
``first`` (the first annotator's answer, as OpenFlamingo's evaluation does). All answers are
the references the metric scores against.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

TRAIN_POOL = ""
DEMO_ANSWERS = ("most_common", "first")

# What each file must look like, quoted in errors.
VQA_QUESTIONS = '{"questions": [{"image_id", "question", "question_id"}, ...]}'
VQA_ANNOTATIONS = '{"annotations": [{"question_id", "answers": [{"answer"}, ...]}, ...]}'
VIZWIZ_FORMAT = '[{"image", "question", "answers": [{"answer"}, ...]}, ...]'
TEXTVQA_FORMAT = '{"data": [{"question_id", "image_id", "question", "answers": [str]}, ...]}'
KARPATHY_FORMAT = '{"images": [{"filename", "split", "sentences": [{"raw"}, ...]}, ...]}'


class DataFormatError(ValueError):
    """An evaluation file that is not JSON or not in the format its reader expects.

    The message is one line naming the file, what is wrong and the expected layout.
    """


class TemplateError(ValueError):
    """An image-path template option with a placeholder the records cannot fill."""


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
    """Read a JSON file; a missing file or invalid JSON raises an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"evaluation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{path}: not valid JSON ({error})") from None


@contextmanager
def parsing(path: str, expected: str) -> Iterator[None]:
    """Report a missing field or a wrong type met while reading ``path``'s records as a
    :class:`DataFormatError` that names the file and the ``expected`` layout."""
    try:
        yield
    except (DataFormatError, TemplateError):
        raise
    except KeyError as error:
        raise DataFormatError(f"{path}: a record has no field {error}; expected {expected}") from None
    except (TypeError, AttributeError, IndexError, ValueError) as error:
        raise DataFormatError(f"{path}: unexpected structure ({error}); expected {expected}") \
            from None


def records(path: str, key: str | None, expected: str) -> list:
    """The list of records in ``path`` (under top-level ``key``, or the file itself if None)."""
    data = load_json(path)
    with parsing(path, expected):
        items = data if key is None else data[key]
    if not isinstance(items, list):
        where = f"field {key!r}" if key else "the file"
        raise DataFormatError(f"{path}: {where} is not a list; expected {expected}")
    return items


def image_path(template: str, **fields: Any) -> str:
    """``template`` filled with a record's fields; an unknown placeholder is a clear error."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise TemplateError(f"image template {template!r} cannot be filled ({error!r}); it may use "
                         f"{', '.join('{' + k + '}' for k in fields)}") from None


def check_demo_answer(policy: str) -> str:
    """``policy`` if it is one of :data:`DEMO_ANSWERS`, else a ``ValueError`` naming them."""
    if policy not in DEMO_ANSWERS:
        raise ValueError(f"demo_answer must be one of {', '.join(DEMO_ANSWERS)}, got {policy!r}")
    return policy


def demo_answer(answers: Sequence[str], policy: str, preferred: str | None = None) -> str:
    """The answer a demonstration shows (see the module docstring for ``policy``)."""
    if policy == "first":
        return answers[0]
    if preferred is not None:
        return preferred
    counts = Counter(answers)
    return max(counts, key=counts.__getitem__)  # the first of equally frequent answers


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
    queries, demos = [], []
    with parsing(annotations, KARPATHY_FORMAT):
        for item in records(annotations, "images", KARPATHY_FORMAT):
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


def _vqa_example(uid: Any, image: str, question: Any, answers: Sequence[Any], policy: str,
                 preferred: Any = None, extra: Mapping[str, Any] | None = None) -> Example:
    """One VQA example; raises ``ValueError`` (reported with the file name) on bad values."""
    if not isinstance(question, str):
        raise ValueError(f"question {uid}: the question is not a string")
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"question {uid}: answers must be a non-empty list of strings")
    return Example(uid=str(uid), image=image, target=demo_answer(answers, policy, preferred),
                   references=tuple(answers), fields={"question": question},
                   extra=dict(extra or {}))


def _read_vqa_split(questions: str, annotations: str, image_template: str, split: str,
                    policy: str) -> list[Example]:
    """A split in VQAv2 format: a questions file and an annotations file."""
    with parsing(annotations, VQA_ANNOTATIONS):
        answers = {a["question_id"]: a for a in records(annotations, "annotations",
                                                        VQA_ANNOTATIONS)}
    out = []
    for q in records(questions, "questions", VQA_QUESTIONS):
        with parsing(questions, VQA_QUESTIONS):
            qid, image_id, question = q["question_id"], q["image_id"], q["question"]
        ann = answers.get(qid)
        if ann is None:
            raise DataFormatError(f"{annotations}: no annotation for question_id {qid} "
                                  f"(from {questions})")
        image = image_path(image_template, image_id=image_id, split=split)
        with parsing(annotations, VQA_ANNOTATIONS):
            out.append(_vqa_example(
                qid, image, question, [a["answer"] for a in ann["answers"]], policy,
                ann.get("multiple_choice_answer"),
                {"image_id": image_id, "question_type": ann.get("question_type"),
                 "answer_type": ann.get("answer_type")}))
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
    demo_answer: str = "most_common",
) -> TaskData:
    """VQA set from VQAv2-format question/annotation files (see the module docstring)."""
    check_demo_answer(demo_answer)
    demos = _read_vqa_split(train_questions, train_annotations, train_image_template,
                            train_split_name, demo_answer)
    queries = _read_vqa_split(test_questions, test_annotations,
                              test_image_template or train_image_template, test_split_name,
                              demo_answer)
    return TaskData(queries, {TRAIN_POOL: demos})


def _read_vizwiz_split(path: str, image_template: str, policy: str) -> list[Example]:
    out = []
    for item in records(path, None, VIZWIZ_FORMAT):
        with parsing(path, VIZWIZ_FORMAT):
            name = item["image"]
            out.append(_vqa_example(
                name, image_path(image_template, image_id=name), item["question"],
                [a["answer"] for a in item["answers"]], policy,
                extra={"answerable": item.get("answerable"),
                       "answer_type": item.get("answer_type")}))
    return out


def _read_textvqa_split(path: str, image_template: str, policy: str) -> list[Example]:
    out = []
    for item in records(path, "data", TEXTVQA_FORMAT):
        with parsing(path, TEXTVQA_FORMAT):
            image_id = item["image_id"]
            out.append(_vqa_example(
                item["question_id"], image_path(image_template, image_id=image_id),
                item["question"], item["answers"], policy, extra={"image_id": image_id}))
    return out


def _official_or_vqa_format(split_reader, doc: str):
    """A reader of a benchmark released as one annotation file per split, which reads the
    VQAv2-format conversion instead when question files are given (OpenFlamingo's
    ``*_vqa_format.json``)."""

    def read(
        train_annotations: str,
        test_annotations: str,
        train_image_template: str,
        test_image_template: str,
        train_questions: str | None = None,
        test_questions: str | None = None,
        demo_answer: str = "most_common",
    ) -> TaskData:
        check_demo_answer(demo_answer)
        if (train_questions is None) != (test_questions is None):
            raise ValueError("give both train_questions and test_questions (VQAv2-format files) "
                             "or neither (official annotation files)")
        if train_questions is not None:
            return read_vqa(train_questions, train_annotations, test_questions,
                            test_annotations, train_image_template, test_image_template,
                            demo_answer=demo_answer)
        demos = split_reader(train_annotations, train_image_template, demo_answer)
        queries = split_reader(test_annotations, test_image_template, demo_answer)
        return TaskData(queries, {TRAIN_POOL: demos})

    read.__doc__ = doc
    return read


read_vizwiz = _official_or_vqa_format(
    _read_vizwiz_split, """VizWiz from the official ``train.json``/``val.json`` (a question's
    uid is its image file name), or from VQAv2-format files when ``*_questions`` are given.""")
read_textvqa = _official_or_vqa_format(
    _read_textvqa_split, """TextVQA from the official ``TextVQA_0.5.1_{train,val}.json``, or
    from VQAv2-format files when ``*_questions`` are given.""")


def read_classification(
    root: str, classes_file: str = "classes.json", train_split: str = "train",
    test_split: str = "test",
) -> TaskData:
    """Labelled images + class names; rank classification chooses among all class names."""
    classes = records(os.path.join(root, classes_file), "classes", '{"classes": [name, ...]}')

    def split(name: str) -> list[Example]:
        path = os.path.join(root, f"{name}.json")
        expected = '{"samples": [{"filename", "label": int}, ...]}'
        with parsing(path, expected):
            return [
                Example(uid=f"{name}/{i}", image=os.path.join(root, s["filename"]),
                        target=classes[s["label"]], references=(classes[s["label"]],),
                        label=classes[s["label"]])
                for i, s in enumerate(records(path, "samples", expected))
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
    path = os.path.join(root, episodes_file)
    expected = '{"episodes": [{"episode_id", "names", "support", "queries"}, ...]}'
    pools, choices, queries = {}, {}, []
    with parsing(path, expected):
        for ep in records(path, "episodes", expected):
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
