"""Few-shot evaluation of Flamingo-style models (``flamingo-eval``).

A task (:mod:`eval_fewshot.tasks`) bundles a reader of the benchmark's real file format
(:mod:`~eval_fewshot.datasets`), a prompt template (:mod:`~eval_fewshot.prompts`), decoding
settings and metrics (:mod:`~eval_fewshot.metrics`). :class:`~eval_fewshot.runner.Evaluator`
runs it at several shot counts and trials with random, class-balanced or RICES demonstrations
(:mod:`~eval_fewshot.selection`), reusing the demonstrations' KV cache when they are shared;
:mod:`~eval_fewshot.report` prints the table and writes the JSON and PNG.
"""

from eval_fewshot.runner import EvalConfig, Evaluator
from eval_fewshot.tasks import get_task, task_names

__all__ = ["EvalConfig", "Evaluator", "get_task", "task_names"]
