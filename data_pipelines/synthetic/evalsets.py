"""Synthetic evaluation sets written in the real benchmarks' file formats.

- captioning: COCO Karpathy ``dataset.json`` (+ our ``objects`` field for hallucination metrics);
- VQA: VQAv2 ``{split}_questions.json`` / ``{split}_annotations.json`` (10 answers each);
- classification: ``classes.json`` + ``{split}.json`` (one shape per image, label = shape);
- label binding: ``episodes.json``; each episode names two colours with fresh nonsense words.

Splits are ``train`` (demonstrations) and ``test`` (queries). All images come from the world's
:class:`~data_pipelines.synthetic.scenes.UniqueImages`, so no image repeats anywhere.
:func:`write_eval_sets` writes all four; the world (:func:`~data_pipelines.synthetic.synthesize`)
and the evaluation toy (:mod:`eval_fewshot.toy`) both call it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping

from tqdm import tqdm

from data_pipelines.synthetic.documents import binding_episode
from data_pipelines.synthetic.language import fresh_names, questions, reference_captions
from data_pipelines.synthetic.scenes import SHAPES, UniqueImages

SPLITS = ("train", "test")
VQA_ANSWERS = 10
BINDING_SUPPORT_PER_CLASS = 8
BINDING_QUERIES_PER_CLASS = 4


def _split_sizes(n_per_split: int | Mapping[str, int]) -> dict[str, int]:
    """Images per split: one count for every split, or a count per split name."""
    if isinstance(n_per_split, int):
        return dict.fromkeys(SPLITS, n_per_split)
    if set(n_per_split) != set(SPLITS):
        raise ValueError(f"n_per_split must give a count for each of {SPLITS}, got {n_per_split}")
    return {split: n_per_split[split] for split in SPLITS}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _save(image, root: str, relative: str) -> str:
    path = os.path.join(root, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG", compress_level=1)
    return relative


def write_captioning(root: str, rng: random.Random, images: UniqueImages,
                     n_per_split: int | Mapping[str, int]):
    """Karpathy-format captioning set; returns the number of images written."""
    entries = []
    for split, n in _split_sizes(n_per_split).items():
        for _ in tqdm(range(n), desc=f"eval captioning {split}", leave=False, disable=None):
            objects, image = images.draw(rng)
            index = len(entries)
            filename = f"{index:06d}.png"
            _save(image, root, os.path.join("images", filename))
            entries.append({
                "filepath": "images", "filename": filename, "imgid": index, "cocoid": index,
                "split": split,
                "sentences": [{"raw": s, "tokens": s.rstrip(".").replace(",", "").replace(
                    ":", "").split()} for s in reference_captions(objects)],
                "objects": [o.as_dict() for o in objects],
            })
    _write_json(os.path.join(root, "dataset.json"), {"dataset": "synthetic", "images": entries})
    return len(entries)


def write_vqa(root: str, rng: random.Random, images: UniqueImages,
              n_per_split: int | Mapping[str, int], questions_per_image: int = 2):
    """VQAv2-format question and annotation files per split; returns the number of images."""
    image_id = 0
    for split, n in _split_sizes(n_per_split).items():
        qs, anns = [], []
        for _ in tqdm(range(n), desc=f"eval vqa {split}", leave=False, disable=None):
            objects, image = images.draw(rng)
            image_id += 1
            _save(image, root, os.path.join("images", f"{image_id:012d}.png"))
            candidates = questions(objects, rng)
            for j, qa in enumerate(rng.sample(candidates, min(questions_per_image,
                                                               len(candidates)))):
                question_id = image_id * 10 + j
                qs.append({"image_id": image_id, "question": qa.question,
                           "question_id": question_id})
                anns.append({
                    "question_id": question_id, "image_id": image_id,
                    "question_type": qa.question_type, "answer_type": qa.answer_type,
                    "multiple_choice_answer": qa.answer,
                    "answers": [{"answer": qa.answer, "answer_confidence": "yes",
                                 "answer_id": k + 1} for k in range(VQA_ANSWERS)],
                })
        _write_json(os.path.join(root, f"{split}_questions.json"), {"questions": qs})
        _write_json(os.path.join(root, f"{split}_annotations.json"), {"annotations": anns})
    return image_id


def write_classification(root: str, rng: random.Random, images: UniqueImages,
                         n_per_split: int | Mapping[str, int]):
    """One object per image, class = its shape; returns the number of images."""
    _write_json(os.path.join(root, "classes.json"), {"classes": list(SHAPES)})
    count = 0
    for split, n in _split_sizes(n_per_split).items():
        samples = []
        for i in tqdm(range(n), desc=f"eval classification {split}", leave=False, disable=None):
            label = i % len(SHAPES)  # balanced classes
            _, image = images.draw(rng, n_objects=1, shape=SHAPES[label])
            samples.append({"filename": _save(image, root, f"images/{split}-{i:06d}.png"),
                            "label": label})
            count += 1
        rng.shuffle(samples)
        _write_json(os.path.join(root, f"{split}.json"), {"samples": samples})
    return count


def _binding_items(root: str, rng: random.Random, images: UniqueImages, classes: list[str],
                   per_class: int, prefix: str) -> list[dict]:
    """Class-balanced single-object images in shuffled order, saved as ``{prefix}-NNN.png``."""
    order = [c for c in classes for _ in range(per_class)]
    rng.shuffle(order)
    out = []
    for i, cls in enumerate(order):
        _, image = images.draw(rng, n_objects=1, color=cls)
        out.append({"filename": _save(image, root, f"{prefix}-{i:03d}.png"), "class": cls})
    return out


def write_label_binding(root: str, rng: random.Random, images: UniqueImages, n_episodes: int):
    """Episodes naming two colours with words used by no other episode; returns image count."""
    episodes, used_words = [], set()
    for episode_id in tqdm(range(n_episodes), desc="eval label binding", leave=False,
                           disable=None):
        names, _ = binding_episode(rng, "color", 2, 1)
        while used_words & set(names.values()):
            names = dict(zip(names, fresh_names(rng, 2)))
        used_words |= set(names.values())
        prefix = f"images/ep{episode_id:04d}"
        episodes.append({
            "episode_id": episode_id,
            "names": names,
            "support": _binding_items(root, rng, images, list(names), BINDING_SUPPORT_PER_CLASS,
                                      f"{prefix}-support"),
            "queries": _binding_items(root, rng, images, list(names), BINDING_QUERIES_PER_CLASS,
                                      f"{prefix}-query"),
        })
    _write_json(os.path.join(root, "episodes.json"), {"episodes": episodes})
    return sum(len(e["support"]) + len(e["queries"]) for e in episodes)


def write_eval_sets(root: str, images: UniqueImages, seed: int | str,
                    n_per_split: int | Mapping[str, int], n_episodes: int) -> dict[str, int]:
    """Write all four sets under ``root/{captioning,vqa,classification,label_binding}``.

    Each set draws from its own RNG seeded by ``seed`` and the set's name, so one set's size does
    not change another's images. Returns the number of images written per set.
    """
    def rng(part: str) -> random.Random:
        return random.Random(f"{seed}/eval/{part}")

    return {
        "captioning": write_captioning(os.path.join(root, "captioning"), rng("cap"), images,
                                       n_per_split),
        "vqa": write_vqa(os.path.join(root, "vqa"), rng("vqa"), images, n_per_split),
        "classification": write_classification(os.path.join(root, "classification"),
                                               rng("cls"), images, n_per_split),
        "label_binding": write_label_binding(os.path.join(root, "label_binding"), rng("bind"),
                                             images, n_episodes),
    }
