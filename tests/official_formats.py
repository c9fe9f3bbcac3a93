"""Tiny datasets in the official release formats of the real benchmarks, for the reader tests.

Each writer puts a few examples under ``root`` with the file names and layout of the official
download (so ``flamingo-eval --data root`` must read them without renaming anything), and
returns what the tests check against. Images are tiny JPGs of one coloured shape.

Formats (field names as in the official releases):

- VQAv2: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` + ``v2_mscoco_{...}_annotations
  .json`` (answers with ``multiple_choice_answer``), images ``{split}2014/COCO_{split}2014_
  {image_id:012d}.jpg``.
- OK-VQA: ``OpenEnded_mscoco_{train,val}2014_questions.json`` + ``mscoco_{...}_annotations.json``;
  annotations carry ``answers: [{answer, raw_answer, answer_confidence, answer_id}]`` and
  ``confidence``, but no ``multiple_choice_answer``.
- VizWiz: ``train.json``/``val.json``, each a list of ``{image, question, answers: [{answer,
  answer_confidence}], answerable, answer_type}``; images ``train/``, ``val/``.
- TextVQA: ``TextVQA_0.5.1_{train,val}.json`` = ``{"data": [{question, question_id, image_id,
  answers: [10 strings], ...}]}``; all images in ``train_images/{image_id}.jpg``.
- COCO Karpathy: ``dataset_coco.json`` with ``filepath``/``filename``/``split``/``sentences``;
  images ``{filepath}/{filename}``.
"""

from __future__ import annotations

import json
import os

from data_pipelines.synthetic.scenes import SHAPES, SceneObject, render

COLORS = ("blue", "green", "red")


def _jpg(path: str, i: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shape = SceneObject(SHAPES[i % 3], COLORS[i % len(COLORS)], "large", 0.5, 0.5)
    render([shape], 32).save(path, format="JPEG")


def _json(data, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _ten(i: int) -> list[str]:
    """Ten human answers whose most common one is not the first one given."""
    color = sorted(COLORS)[i % len(COLORS)]
    return ["a " + color] + [color] * 6 + ["dark " + color] * 3


def _coco_vqa(root: str, n_train: int, n_val: int, okvqa: bool) -> dict:
    prefix = "" if okvqa else "v2_"
    expected = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 100)):
        questions, annotations = [], []
        for i in range(n):
            image_id = 9000 + offset + i
            qid = image_id * 10 + 1
            _jpg(os.path.join(root, f"{split}2014", f"COCO_{split}2014_{image_id:012d}.jpg"), i)
            questions.append({"image_id": image_id, "question": f"What colour is shape {i}?",
                              "question_id": qid})
            answers = _ten(i)
            ann = {"image_id": image_id, "question_id": qid, "question_type": "what color",
                   "answer_type": "other"}
            if okvqa:
                ann |= {"question_type": "eight", "confidence": 3, "answers": [
                    {"answer_id": k + 1, "raw_answer": a + "s" if k == 9 else a,
                     "answer_confidence": "yes", "answer": a} for k, a in enumerate(answers)]}
            else:
                ann |= {"multiple_choice_answer": answers[1], "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                    for k, a in enumerate(answers)]}
            annotations.append(ann)
            expected[str(qid)] = answers
        info = {"description": "fixture"}
        _json({"info": info, "task_type": "Open-Ended", "data_type": "mscoco",
               "license": {}, "data_subtype": f"{split}2014", "questions": questions},
              os.path.join(root, f"{prefix}OpenEnded_mscoco_{split}2014_questions.json"))
        _json({"info": info, "license": {}, "data_subtype": f"{split}2014",
               "annotations": annotations},
              os.path.join(root, f"{prefix}mscoco_{split}2014_annotations.json"))
    return expected


def write_vqav2(root: str, n_train: int = 4, n_val: int = 3) -> dict:
    """Official VQAv2 layout; returns ``{question_id: ten answers}``."""
    return _coco_vqa(root, n_train, n_val, okvqa=False)


def write_okvqa(root: str, n_train: int = 4, n_val: int = 3) -> dict:
    """Official OK-VQA layout (no ``multiple_choice_answer``); returns ``{question_id: answers}``."""
    return _coco_vqa(root, n_train, n_val, okvqa=True)


def write_vizwiz(root: str, n_train: int = 4, n_val: int = 3) -> dict:
    """Official VizWiz layout; returns ``{image file name: ten answers}``."""
    expected = {}
    for split, n in (("train", n_train), ("val", n_val)):
        records = []
        for i in range(n):
            image = f"VizWiz_{split}_{i:08d}.jpg"
            _jpg(os.path.join(root, split, image), i)
            answers = _ten(i)
            records.append({"image": image, "question": f"What is this {i}?",
                            "answers": [{"answer": a, "answer_confidence": "yes" if k else "maybe"}
                                        for k, a in enumerate(answers)],
                            "answer_type": "other", "answerable": 1})
            expected[image] = answers
        _json(records, os.path.join(root, f"{split}.json"))
    return expected


def write_textvqa(root: str, n_train: int = 4, n_val: int = 3) -> dict:
    """Official TextVQA 0.5.1 layout; returns ``{question_id: ten answers}``."""
    expected = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 50)):
        data = []
        for i in range(n):
            image_id = f"{offset + i:016x}"
            _jpg(os.path.join(root, "train_images", f"{image_id}.jpg"), i)
            answers = _ten(i)
            qid = 30000 + offset + i
            data.append({"question": f"what does sign {i} say?", "image_id": image_id,
                         "image_classes": ["Sign"], "flickr_original_url": "",
                         "flickr_300k_url": "", "image_width": 32, "image_height": 32,
                         "answers": answers, "question_tokens": ["what"],
                         "question_id": qid, "set_name": split})
            expected[str(qid)] = answers
        _json({"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1",
               "data": data}, os.path.join(root, f"TextVQA_0.5.1_{split}.json"))
    return expected


def write_vqa_format(root: str, expected: dict, image_ids: dict, splits=("train", "val")) -> None:
    """OpenFlamingo's VQAv2-format conversion (``{split}_{questions,annotations}_vqa_format
    .json``) of a dataset written above: ``expected`` maps a uid to its ten answers and
    ``image_ids`` maps it to ``(split, image_id)``."""
    for split in splits:
        questions, annotations = [], []
        for n, (uid, answers) in enumerate(expected.items()):
            sp, image_id = image_ids[uid]
            if sp != split:
                continue
            questions.append({"image_id": image_id, "question": f"question {uid}?",
                              "question_id": n})
            annotations.append({"question_id": n, "image_id": image_id,
                                "question_type": "other", "multiple_choice_answer": answers[1],
                                "answers": [{"answer": a, "answer_confidence": "yes"}
                                            for a in answers]})
        _json({"questions": questions},
              os.path.join(root, f"{split}_questions_vqa_format.json"))
        _json({"annotations": annotations},
              os.path.join(root, f"{split}_annotations_vqa_format.json"))


def write_coco_karpathy(root: str, n_per_split: int = 3) -> dict:
    """Official Karpathy ``dataset_coco.json`` + COCO image folders; returns ``{cocoid: raws}``."""
    images, expected = [], {}
    for s, (split, folder) in enumerate((("train", "train2014"), ("restval", "val2014"),
                                         ("val", "val2014"), ("test", "val2014"))):
        for i in range(n_per_split):
            cocoid = 500000 + 100 * s + i
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            _jpg(os.path.join(root, folder, filename), i + s)
            raws = [f"A {sorted(COLORS)[i % 3]} {SHAPES[i % 3]} on a white background.",
                    f"a {SHAPES[i % 3]} (colored {sorted(COLORS)[i % 3]}) at 12:30 p.m.",
                    f"There's a {SHAPES[i % 3]} in the picture!!"]
            images.append({"filepath": folder, "sentids": [3 * len(images) + k for k in range(3)],
                           "filename": filename, "imgid": len(images), "split": split,
                           "sentences": [{"tokens": r.lower().split(), "raw": r,
                                          "imgid": len(images), "sentid": k}
                                         for k, r in enumerate(raws)],
                           "cocoid": cocoid})
            expected[str(cocoid)] = raws
    _json({"images": images, "dataset": "coco"}, os.path.join(root, "dataset_coco.json"))
    return expected
