"""The task registry: each task = reader + prompt template + decoding + post-processing + metrics.

``get_task(name)`` returns a :class:`Task`; ``task.load(data_dir, options)`` reads its data.
Reader options are strings in which ``{data}`` stands for ``--data``; override any of them with
a YAML/JSON task config (``--task-config``) or ``--option key=value``. Defaults, the file names
of the official downloads (so ``--data`` is the directory they were unpacked into):

================== ========================================================================
task               reader options (defaults)
================== ========================================================================
coco               annotations ``{data}/dataset_coco.json`` (Karpathy split), image_root
                   ``{data}`` (images at ``{data}/{filepath}/{filename}``, e.g.
                   ``val2014/COCO_val2014_...jpg``)
flickr30k          annotations ``{data}/dataset_flickr30k.json``,
                   image_root ``{data}/flickr30k-images``
vqav2              ``{data}/v2_OpenEnded_mscoco_{train,val}2014_questions.json`` +
                   ``{data}/v2_mscoco_{train,val}2014_annotations.json`` (val2014 as test),
                   images ``{data}/{train,val}2014/COCO_{train,val}2014_{image_id:012d}.jpg``
okvqa              ``{data}/OpenEnded_mscoco_{train,val}2014_questions.json`` +
                   ``{data}/mscoco_{train,val}2014_annotations.json``, COCO images as vqav2
vizwiz             ``{data}/train.json``, ``{data}/val.json`` (official annotations),
                   images ``{data}/train/{image_id}``, ``{data}/val/{image_id}``
textvqa            ``{data}/TextVQA_0.5.1_{train,val}.json``, images
                   ``{data}/train_images/{image_id}.jpg`` (train and val images)
classification     root ``{data}`` holding ``classes.json``, ``train.json``, ``test.json``
synth_captioning   the synthetic world ``{data}/eval/captioning`` (adds CHAIR metrics)
synth_vqa          ``{data}/eval/vqa``
synth_classification ``{data}/eval/classification``
synth_label_binding  ``{data}/eval/label_binding``: exact match of the generated word and
                   rank accuracy among the episode's words, both reported
================== ========================================================================

VizWiz and TextVQA also read the VQAv2-format conversion OpenFlamingo distributes
(``{split}_{questions,annotations}_vqa_format.json``) when ``train_questions``/``test_questions``
are given: ``--task-config configs/eval/{vizwiz,textvqa}_vqa_format.yaml``. Every VQA task takes
``demo_answer``: ``most_common`` (default) or ``first`` (see :mod:`eval_fewshot.datasets`).

Scores are percentages (CIDEr-D x 100 as in the COCO papers); each metric says whether higher
or lower is better, and which variant ran (:attr:`Metric.variant`): VQA accuracy is the
official script's (``vqa_mode="official"``, or ``"normalize_all"``), CIDEr-D/BLEU-4 tokenise
captions as pycocoevalcap does (``caption_tokenizer="python"``, our tokenizer giving its PTB
tokens, or ``"java"``, its Java PTB tokenizer itself).
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
    top1_accuracy,
)
from eval_fewshot.metrics.text import (
    CAPTION_TOKENIZER_NOTES,
    check_caption_tokenizer,
    tokenize_captions,
)
from eval_fewshot.metrics.vqa import VQA_MODE_NOTES, check_vqa_mode
from eval_fewshot.prompts import CAPTION_TEMPLATE, LABEL_TEMPLATE, VQA_TEMPLATE, PromptTemplate

Records = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Metric:
    """A named score over prediction records, as a percentage."""

    name: str
    label: str
    higher_is_better: bool
    compute: Callable[[Records], float]
    variant: str = ""  # which setting of the metric ran (saved in the JSON)
    note: str = ""  # what the variant means (printed under the table)

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


def _tokenized(records: Records, tokenizer: str) -> tuple[list[str], list[list[str]]]:
    """Predictions and references PTB-tokenised, each list in one batch as pycocoevalcap does."""
    cands = tokenize_captions([r["prediction"] for r in records], tokenizer)
    flat = iter(tokenize_captions([x for r in records for x in r["references"]], tokenizer))
    return cands, [[next(flat) for _ in r["references"]] for r in records]


def caption_metric(name: str, tokenizer: str = "python") -> Metric:
    """CIDEr-D (``name="cider"``) or BLEU-4 (``"bleu4"``) with captions tokenised by our Python
    tokenizer or the Java PTB tokenizer (see :mod:`eval_fewshot.metrics.text`)."""
    check_caption_tokenizer(tokenizer)
    note = CAPTION_TOKENIZER_NOTES[tokenizer]

    def cider(records: Records) -> float:
        return 100 * cider_d(*_tokenized(records, tokenizer))[0]

    def bleu4(records: Records) -> float:
        return 100 * corpus_bleu(*_tokenized(records, tokenizer))[3]

    if name == "cider":
        return Metric("cider", "CIDEr-D", True, cider, f"ptb-{tokenizer}", note)
    if name == "bleu4":
        return Metric("bleu4", "BLEU-4", True, bleu4, f"ptb-{tokenizer}", note)
    raise ValueError(f"no caption metric {name!r}; use cider or bleu4")


def _chair(key: str) -> Callable[[Records], float]:
    def compute(records: Records) -> float:
        objects = [r["extra"].get("objects", []) for r in records]
        return 100 * chair([r["prediction"] for r in records], objects)[key]
    return compute


def vqa_metric(mode: str = "official") -> Metric:
    """VQA accuracy (%) with the answer processing ``mode`` (see :mod:`eval_fewshot.metrics.vqa`)."""
    check_vqa_mode(mode)

    def compute(records: Records) -> float:
        return 100 * mean_vqa_accuracy([r["prediction"] for r in records],
                                       [r["references"] for r in records], mode)

    return Metric("vqa_accuracy", "VQA acc %", True, compute, variant=mode,
                  note=VQA_MODE_NOTES[mode])


def _exact(records: Records) -> float:
    return 100 * exact_match([r["prediction"] for r in records],
                             [r["references"][0] for r in records])


def _ranked(records: Records) -> float:
    return 100 * top1_accuracy([r["ranked"] for r in records], [r["label"] for r in records])


CIDER = caption_metric("cider")
BLEU4 = caption_metric("bleu4")
CHAIR_I = Metric("chair_i", "CHAIRi (halluc. objects %)", False, _chair("chair_i"))
CHAIR_S = Metric("chair_s", "CHAIRs (halluc. captions %)", False, _chair("chair_s"))
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


def _vqa_options(train_q: str | None, train_a: str, test_q: str | None, test_a: str,
                 train_img: str, test_img: str) -> dict[str, Any]:
    options = {"train_annotations": train_a, "test_annotations": test_a,
               "train_image_template": train_img, "test_image_template": test_img}
    if train_q is not None:
        options |= {"train_questions": train_q, "test_questions": test_q}
    return options


def _vqa_task(name: str, options: Mapping[str, Any], reader=datasets.read_vqa, **kw) -> Task:
    return Task(name, reader, options, VQA, (vqa_metric(),), max_new_tokens=5,
                stop_strings=VQA_STOPS, **kw)


def _classification_task(name: str, root: str, **kw) -> Task:
    return Task(name, datasets.read_classification, {"root": root}, LABEL, (TOP1,),
                modes=("rank",), selection="balanced", **kw)


def _coco_vqa_options(questions: str, annotations: str) -> dict[str, Any]:
    """train2014 demonstrations, val2014 queries; ``%s`` in the file names is the split."""
    image = "{data}/%s2014/COCO_%s2014_{image_id:012d}.jpg"
    return _vqa_options(questions % "train", annotations % "train", questions % "val",
                        annotations % "val", image % ("train", "train"), image % ("val", "val"))


SYNTH_VQA = "{data}/eval/vqa/"
for task in [
    _captioning_task("coco", "{data}/dataset_coco.json", "{data}",
                     description="COCO captions, Karpathy test split"),
    _captioning_task("flickr30k", "{data}/dataset_flickr30k.json", "{data}/flickr30k-images",
                     description="Flickr30k captions, Karpathy test split"),
    _vqa_task("vqav2", _coco_vqa_options("{data}/v2_OpenEnded_mscoco_%s2014_questions.json",
                                         "{data}/v2_mscoco_%s2014_annotations.json"),
              description="VQAv2, val2014 questions"),
    _vqa_task("okvqa", _coco_vqa_options("{data}/OpenEnded_mscoco_%s2014_questions.json",
                                         "{data}/mscoco_%s2014_annotations.json"),
              description="OK-VQA, val2014 questions"),
    _vqa_task("vizwiz",
              _vqa_options(None, "{data}/train.json", None, "{data}/val.json",
                           "{data}/train/{image_id}", "{data}/val/{image_id}"),
              datasets.read_vizwiz, description="VizWiz, val"),
    _vqa_task("textvqa",
              _vqa_options(None, "{data}/TextVQA_0.5.1_train.json", None,
                           "{data}/TextVQA_0.5.1_val.json", "{data}/train_images/{image_id}.jpg",
                           "{data}/train_images/{image_id}.jpg"),
              datasets.read_textvqa, description="TextVQA 0.5.1, val"),
    _classification_task("classification", "{data}", description="labelled images, class names"),
    _captioning_task("synth_captioning", "{data}/eval/captioning/dataset.json",
                     "{data}/eval/captioning", extra=(CHAIR_I, CHAIR_S),
                     description="synthetic shapes captioning with hallucination rates"),
    _vqa_task("synth_vqa",
              _vqa_options(SYNTH_VQA + "train_questions.json",
                           SYNTH_VQA + "train_annotations.json",
                           SYNTH_VQA + "test_questions.json", SYNTH_VQA + "test_annotations.json",
                           SYNTH_VQA + "images/{image_id:012d}.png",
                           SYNTH_VQA + "images/{image_id:012d}.png"),
              description="synthetic shapes VQA"),
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


# Metric settings of get_task: setting -> (names of the metrics it configures, builder).
METRIC_SETTINGS: dict[str, tuple[tuple[str, ...], Callable[[str, str], Metric]]] = {
    "vqa_mode": (("vqa_accuracy",), lambda name, value: vqa_metric(value)),
    "caption_tokenizer": (("cider", "bleu4"), caption_metric),
}


def get_task(name: str, template: str | None = None, **settings: Any) -> Task:
    """A registered task, optionally with another template, decoding or metric settings.

    ``template`` must keep the task's answer placeholder (e.g. ``{answer}`` for VQA);
    ``settings`` may set ``max_new_tokens``, ``num_beams``, ``stop_strings``, ``selection``,
    ``vqa_mode`` (``official`` or ``normalize_all``; VQA tasks) and ``caption_tokenizer``
    (``python`` or ``java``; captioning tasks).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(task_names())}")
    task = REGISTRY[name]
    if template is not None:
        task = replace(task, template=PromptTemplate(template, task.template.target_field))
    settings = {k: v for k, v in settings.items() if v is not None}
    allowed = {"max_new_tokens", "num_beams", "stop_strings", "selection", *METRIC_SETTINGS}
    if set(settings) - allowed:
        raise ValueError(f"unknown task settings {sorted(set(settings) - allowed)}; "
                         f"valid: {sorted(allowed)}")
    for setting in set(settings) & set(METRIC_SETTINGS):
        value = settings.pop(setting)
        names, build = METRIC_SETTINGS[setting]
        if not any(m.name in names for m in task.metrics):
            raise ValueError(f"{setting} applies to tasks reporting {', '.join(names)}; {name} "
                             f"reports {', '.join(m.name for m in task.metrics)}")
        task = replace(task, metrics=tuple(build(m.name, value) if m.name in names else m
                                           for m in task.metrics))
    return replace(task, **settings)
