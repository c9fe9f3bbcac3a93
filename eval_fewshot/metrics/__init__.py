"""Evaluation metrics, one module each; all take plain strings and return floats in [0, 1]
(CIDEr-D in its own unscaled units, where 1.0 is the usual "100")."""

from eval_fewshot.metrics.accuracy import exact_match, normalize_word, top1_accuracy
from eval_fewshot.metrics.bleu import corpus_bleu
from eval_fewshot.metrics.cider import cider_d
from eval_fewshot.metrics.hallucination import chair, find_mentions
from eval_fewshot.metrics.text import tokenize_caption, tokenize_captions
from eval_fewshot.metrics.vqa import mean_vqa_accuracy, normalize_answer, vqa_accuracy

__all__ = [
    "chair", "cider_d", "corpus_bleu", "exact_match", "find_mentions", "mean_vqa_accuracy",
    "normalize_answer", "normalize_word", "tokenize_caption", "tokenize_captions",
    "top1_accuracy", "vqa_accuracy",
]
