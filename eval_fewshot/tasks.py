"""The task registry: each task = reader + prompt template + decoding + post-processing + metrics.

``get_task(name)`` returns a :class:`Task`; ``task.load(data_dir, options)`` reads its data.
Reader options are strings in which ``{data}`` stands for ``--data``; override any of them with
a YAML/JSON task config (``--task-config``) or ``--option key=value``. Defaults:

================== ========================================================================
task               reader options (defaults)
================== ========================================================================
coco               annotations ``{data}/dataset_coco.json``, image_root ``{data}``
flickr30k          annotations ``{data}/dataset_flickr30k.json``,
                   image_root ``{data}/flickr30k-images``
vqav2, okvqa       train/test questions + annotations (official file names, val2014 as
                   test), train/test image templates ``{data}/train2014/COCO_train2014_
                   {image_id:012d}.jpg`` and the val2014 equivalent
vizwiz, textvqa    ``{data}/{train,val}_{questions,annotations}_vqa_format.json`` (the
                   VQAv2-format conversion OpenFlamingo distributes), image templates
                   ``{data}/train/{image_id}`` / ``{data}/val/{image_id}`` (TextVQA:
                   ``{data}/train_images/{image_id}.jpg``)
classification     root ``{data}`` holding ``classes.json``, ``train.json``, ``test.json``
synth_captioning   the synthetic world ``{data}/eval/captioning`` (adds CHAIR metrics)
synth_vqa          ``{data}/eval/vqa``
synth_classification ``{data}/eval/classification``
synth_label_binding  ``{data}/eval/label_binding``: exact match of the generated word and
                   rank accuracy among the episode's words, both reported
================== ========================================================================

Scores are percentages (CIDEr-D x 100 as in the COCO papers); each metric says whether higher
or lower is better.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from eval_fewshot import datasets
from eval_fewshot.datasets import TaskData
from eval_fewshot.metrics import (
    chair,
    cider_d,
    corpus_bleu,
    exact_match,
    mean_vqa_accuracy,
    tokenize_caption,
    top1_accuracy,
)
from eval_fewshot.prompts import CAPTION_TEMPLATE, LABEL_TEMPLATE, VQA_TEMPLATE, PromptTemplate

Records = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Metric:
    """A named score over prediction records, as a percentage."""

    name: str
    label: str
    higher_is_better: bool
    compute: Callable[[Records], float]

    @property
    def header(self) -> str:
        """Table header: label plus direction (↑ higher is better, ↓ lower is better)."""
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"


@dataclass(frozen=True)
class Task:
    """Everything needed to evaluate one benchmark; the first metric is the headline one.

    ``modes`` holds ``"generate"`` (free-form answer, cut by ``stop_strings``) and/or
    ``"rank"`` (choose among the pool's candidate answers by log-likelihood).
    """

    name: str
    reader: Callable[..., TaskData]
    options: Mapping[str, Any]
    template: PromptTemplate
    metrics: tuple[Metric, ...]
    modes: tuple[str, ...] = ("generate",)
    max_new_tokens: int = 20
    num_beams: int = 3
    stop_strings: tuple[str, ...] = ()
    selection: str = "random"
    description: str = ""

    def load(self, data_dir: str | None, overrides: Mapping[str, Any] | None = None) -> TaskData:
        """Read the task's data; ``{data}`` in option strings becomes ``data_dir``."""
        options = {**self.options, **(overrides or {})}
        known = set(inspect.signature(self.reader).parameters)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"task {self.name}: unknown options {unknown}; valid: {sorted(known)}")
        needs_data = any(isinstance(v, str) and "{data}" in v for v in options.values())
        if needs_data and not data_dir:
            raise ValueError(f"task {self.name}: pass --data DIR (the dataset directory)")
        resolved = {k: v.replace("{data}", data_dir) if isinstance(v, str) else v
                    for k, v in options.items()}
        data = self.reader(**resolved)
        datasets.check_images_exist([*data.queries, *(e for p in data.pools.values() for e in p)])
        return data

    @property
    def primary(self) -> Metric:
        """The headline metric (plotted, first column)."""
        return self.metrics[0]


# -- metrics over prediction records ----------------------------------------------------------


def _cider(records: Records) -> float:
    cands = [tokenize_caption(r["prediction"]) for r in records]
    refs = [[tokenize_caption(x) for x in r["references"]] for r in records]
    return 100 * cider_d(cands, refs)[0]


def _bleu4(records: Records) -> float:
    cands = [tokenize_caption(r["prediction"]) for r in records]
    refs = [[tokenize_caption(x) for x in r["references"]] for r in records]
    return 100 * corpus_bleu(cands, refs)[3]


def _chair(key: str) -> Callable[[Records], float]:
    def compute(records: Records) -> float:
        objects = [r["extra"].get("objects", []) for r in records]
        return 100 * chair([r["prediction"] for r in records], objects)[key]
    return compute


def _vqa_accuracy(records: Records) -> float:
    return 100 * mean_vqa_accuracy([r["prediction"] for r in records],
                                   [r["references"] for r in records])


def _exact(records: Records) -> float:
    return 100 * exact_match([r["prediction"] for r in records],
                             [r["references"][0] for r in records])


def _ranked(records: Records) -> float:
    return 100 * top1_accuracy([r["ranked"] for r in records], [r["label"] for r in records])


CIDER = Metric("cider", "CIDEr-D", True, _cider)
BLEU4 = Metric("bleu4", "BLEU-4", True, _bleu4)
CHAIR_I = Metric("chair_i", "CHAIRi (halluc. objects %)", False, _chair("chair_i"))
CHAIR_S = Metric("chair_s", "CHAIRs (halluc. captions %)", False, _chair("chair_s"))
VQA_ACC = Metric("vqa_accuracy", "VQA acc %", True, _vqa_accuracy)
EXACT = Metric("exact_match", "exact match %", True, _exact)
TOP1 = Metric("top1", "top-1 acc % (rank)", True, _ranked)

CAPTION = PromptTemplate(CAPTION_TEMPLATE, "caption")
VQA = PromptTemplate(VQA_TEMPLATE, "answer")
LABEL = PromptTemplate(LABEL_TEMPLATE, "label")
CAPTION_STOPS = ("Output",)
VQA_STOPS = ("Question", "Answer", "Short")


REGISTRY: dict[str, Task] = {}


def _captioning_task(name: str, annotations: str, image_root: str, extra=(), **kw) -> Task:
    return Task(name, datasets.read_karpathy,
                {"annotations": annotations, "image_root": image_root},
                CAPTION, (CIDER, BLEU4, *extra), max_new_tokens=20, stop_strings=CAPTION_STOPS,
                **kw)


def _vqa_task(name: str, train_q: str, train_a: str, test_q: str, test_a: str, train_img: str,
         test_img: str, **kw) -> Task:
    options = {"train_questions": train_q, "train_annotations": train_a,
               "test_questions": test_q, "test_annotations": test_a,
               "train_image_template": train_img, "test_image_template": test_img}
    return Task(name, datasets.read_vqa, options, VQA, (VQA_ACC,), max_new_tokens=5,
                stop_strings=VQA_STOPS, **kw)


def _classification_task(name: str, root: str, **kw) -> Task:
    return Task(name, datasets.read_classification, {"root": root}, LABEL, (TOP1,),
                modes=("rank",), selection="balanced", **kw)


COCO_IMG = "{data}/%s2014/COCO_%s2014_{image_id:012d}.jpg"
for task in [
    _captioning_task("coco", "{data}/dataset_coco.json", "{data}",
                description="COCO captions, Karpathy test split"),
    _captioning_task("flickr30k", "{data}/dataset_flickr30k.json", "{data}/flickr30k-images",
                description="Flickr30k captions, Karpathy test split"),
    _vqa_task("vqav2", "{data}/v2_OpenEnded_mscoco_train2014_questions.json",
         "{data}/v2_mscoco_train2014_annotations.json",
         "{data}/v2_OpenEnded_mscoco_val2014_questions.json",
         "{data}/v2_mscoco_val2014_annotations.json", COCO_IMG % ("train", "train"),
         COCO_IMG % ("val", "val"), description="VQAv2, val2014 questions"),
    _vqa_task("okvqa", "{data}/OpenEnded_mscoco_train2014_questions.json",
         "{data}/mscoco_train2014_annotations.json",
         "{data}/OpenEnded_mscoco_val2014_questions.json",
         "{data}/mscoco_val2014_annotations.json", COCO_IMG % ("train", "train"),
         COCO_IMG % ("val", "val"), description="OK-VQA, val2014 questions"),
    _vqa_task("vizwiz", "{data}/train_questions_vqa_format.json",
         "{data}/train_annotations_vqa_format.json", "{data}/val_questions_vqa_format.json",
         "{data}/val_annotations_vqa_format.json", "{data}/train/{image_id}",
         "{data}/val/{image_id}", description="VizWiz (VQAv2-format files), val"),
    _vqa_task("textvqa", "{data}/train_questions_vqa_format.json",
         "{data}/train_annotations_vqa_format.json", "{data}/val_questions_vqa_format.json",
         "{data}/val_annotations_vqa_format.json", "{data}/train_images/{image_id}.jpg",
         "{data}/train_images/{image_id}.jpg", description="TextVQA (VQAv2-format), val"),
    _classification_task("classification", "{data}", description="labelled images, class names"),
    _captioning_task("synth_captioning", "{data}/eval/captioning/dataset.json",
                "{data}/eval/captioning", extra=(CHAIR_I, CHAIR_S),
                description="synthetic shapes captioning with hallucination rates"),
    _vqa_task("synth_vqa", "{data}/eval/vqa/train_questions.json",
         "{data}/eval/vqa/train_annotations.json", "{data}/eval/vqa/test_questions.json",
         "{data}/eval/vqa/test_annotations.json", "{data}/eval/vqa/images/{image_id:012d}.png",
         "{data}/eval/vqa/images/{image_id:012d}.png", description="synthetic shapes VQA"),
    _classification_task("synth_classification", "{data}/eval/classification",
                    description="synthetic shapes classification"),
    Task("synth_label_binding", datasets.read_label_binding, {"root": "{data}/eval/label_binding"},
         LABEL, (EXACT, TOP1), modes=("generate", "rank"), max_new_tokens=4, num_beams=1,
         stop_strings=CAPTION_STOPS, selection="balanced",
         description="in-context label binding: fresh words per episode"),
]:
    REGISTRY[task.name] = task


def task_names() -> list[str]:
    """Names of all registered tasks."""
    return sorted(REGISTRY)


def get_task(name: str, template: str | None = None, **settings: Any) -> Task:
    """A registered task, optionally with another template or decoding settings.

    ``template`` must keep the task's answer placeholder (e.g. ``{answer}`` for VQA);
    ``settings`` may set ``max_new_tokens``, ``num_beams``, ``stop_strings``, ``selection``.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    task = REGISTRY[name]
    if template is not None:
        task = replace(task, template=PromptTemplate(template, task.template.target_field))
    settings = {k: v for k, v in settings.items() if v is not None}
    allowed = {"max_new_tokens", "num_beams", "stop_strings", "selection"}
    if set(settings) - allowed:
        raise ValueError(f"unknown task settings {sorted(set(settings) - allowed)}; "
                         f"valid: {sorted(allowed)}")
    return replace(task, **settings)
