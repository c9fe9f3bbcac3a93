"""The evaluation loop: for each shot count and trial, choose demos, prompt, decode, score.

Queries are split over distributed ranks by stride (``queries[rank::world]``, no padding, so no
query is counted twice); predictions are gathered on every rank and scored once on the full set.
With a fixed demonstration set per trial (``fixed_demos``), the shared demonstrations of each
pool run once through :meth:`FlamingoModel.prefill` and every query continues from that cache.

A prompt that would exceed the context budget loses its oldest demonstrations, so a query may
see fewer shots than asked: every record says how many it used (``shots_used``), each shot
count reports their mean/min/max, and ``strict_shots`` turns a shortfall into an error.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from eval_fewshot.datasets import Example, TaskData
from eval_fewshot.inference import FewShotModel, TokenBoundaryError, cut_answer
from eval_fewshot.prompts import ZERO_SHOT_TEXT_DEMOS, build_prompt, fit_demos
from eval_fewshot.selection import (
    BalancedSelector,
    EmbeddingCache,
    RandomSelector,
    RicesSelector,
    Selector,
)
from eval_fewshot.tasks import Task
from flamingo_kit.distributed import DistInfo

# Room kept for the answer when ranking: class names are short.
RANK_RESERVE_TOKENS = 16


@dataclass
class EvalConfig:
    """How to run a task: shots, trials, demonstration selection and batching."""

    shots: Sequence[int] = (0, 4, 8, 16, 32)
    trials: int = 3
    seed: int = 0
    selection: str | None = None  # random | balanced | rices; None = the task's default
    fixed_demos: bool = False  # one demo set per trial and pool (enables prefix reuse)
    prefix_reuse: bool = True
    batch_size: int = 8
    limit: int | None = None
    rices_cache_dir: str | None = None
    strict_shots: bool = False  # fail when a prompt cannot hold all the shots asked for

    def __post_init__(self) -> None:
        if not self.shots or any(k < 0 for k in self.shots):
            raise ValueError(f"shots must be a non-empty list of counts >= 0, got {self.shots}")
        for name in ("trials", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


class ShotsError(ValueError):
    """Some prompts held fewer demonstrations than asked (raised with ``strict_shots``)."""


@dataclass
class ShotResult:
    """Scores of every trial at one shot count, with their mean and std."""

    shots: int
    trials: list[dict[str, Any]] = field(default_factory=list)

    def summary(self, metric: str) -> tuple[float, float]:
        """Mean and sample std (0 for one trial) of ``metric`` over trials."""
        values = [t["scores"][metric] for t in self.trials]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def _used(self) -> list[int]:
        return [p["shots_used"] for t in self.trials for p in t["predictions"]]

    def shots_used(self) -> dict[str, float]:
        """Mean, min and max demonstrations the prompts actually held, over all trials."""
        used = self._used()
        return {"mean": statistics.fmean(used), "min": min(used), "max": max(used)}

    def shortfall(self, max_context: int | None) -> str | None:
        """A one-line account of prompts that held fewer shots than asked, or None."""
        used = self._used()
        short = sum(u < self.shots for u in used)
        if not short:
            return None
        stats = self.shots_used()
        return (f"{self.shots}-shot: {short} of {len(used)} prompts held fewer demonstrations "
                f"(mean {stats['mean']:.1f}, min {stats['min']}) to fit the {max_context}-token "
                "context; use fewer shots or a larger context (--max-context)")


def limit_queries(queries: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``limit`` queries (all when ``limit`` is None), in file order."""
    if limit is None or limit >= len(queries):
        return queries
    keep = set(torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))
               [:limit].tolist())
    return [q for i, q in enumerate(queries) if i in keep]


class Evaluator:
    """Runs one task on one model for all shot counts and trials (see the module docstring)."""

    def __init__(self, task: Task, data: TaskData, model: FewShotModel, config: EvalConfig,
                 dist: DistInfo | None = None):
        self.task, self.data, self.model, self.config = task, data, model, config
        self.dist = dist or DistInfo.current()
        self.queries = limit_queries(data.queries, config.limit, config.seed)
        self.selection = config.selection or task.selection
        if self.selection == "rices" and config.fixed_demos:
            raise ValueError("RICES chooses demonstrations per query; drop --fixed-demos")
        self._rices: RicesSelector | None = None

    # -- demonstrations ---------------------------------------------------------------------

    def selector(self, seed: int) -> Selector:
        """The demonstration selector of a trial."""
        if self.selection == "random":
            return RandomSelector(self.data.pools, seed, self.config.fixed_demos)
        if self.selection == "balanced":
            return BalancedSelector(self.data.pools, seed, self.config.fixed_demos)
        if self.selection == "rices":
            if self._rices is None:  # deterministic: built (and embedded) once for all trials
                cache = EmbeddingCache(self.config.rices_cache_dir, self.model.embedder_name())
                self._rices = RicesSelector(self.data.pools, self.model.embed_images, cache,
                                            self.config.batch_size)
            return self._rices
        raise ValueError(f"unknown selection {self.selection!r}; use random, balanced or rices")

    def n_trials(self) -> int:
        """RICES is deterministic, so one trial says all."""
        return 1 if self.selection == "rices" else self.config.trials

    # -- running ----------------------------------------------------------------------------

    def run(self) -> list[ShotResult]:
        """Evaluate every shot count and trial; scores are computed on the gathered set."""
        mine = self.queries[self.dist.rank :: self.dist.world_size]
        total = len(self.config.shots) * self.n_trials() * len(mine)
        results = []
        with tqdm(total=total, desc=f"{self.task.name}", disable=self.dist.rank != 0) as bar:
            for shots in self.config.shots:
                result = ShotResult(shots)
                for trial in range(self.n_trials()):
                    seed = self.config.seed + trial
                    records = self.run_trial(mine, shots, seed, bar)
                    records = sorted(self.dist.gather(records), key=lambda r: r["index"])
                    if len({r["uid"] for r in records}) != len(self.queries):
                        raise RuntimeError("gathered predictions do not cover each query once")
                    scores = {m.name: m.compute(records) for m in self.task.metrics}
                    result.trials.append({"seed": seed, "scores": scores, "predictions": records})
                shortfall = result.shortfall(self.model.max_context)
                if shortfall and self.config.strict_shots:
                    raise ShotsError(shortfall)
                results.append(result)
        return results

    def run_trial(self, queries: list[Example], shots: int, seed: int, bar=None) -> list[dict]:
        """Prediction records of ``queries`` at ``shots`` demonstrations with ``seed``."""
        selector = self.selector(seed)
        n_demos = shots or ZERO_SHOT_TEXT_DEMOS
        index = {q.uid: i for i, q in enumerate(self.queries)}
        records: dict[str, dict] = {}
        if selector.fixed:
            groups: dict[str, list[Example]] = defaultdict(list)
            for q in queries:
                groups[q.pool].append(q)
            for group in groups.values():
                demos = selector.select(group[0], n_demos)
                self._run_shared(group, demos, shots == 0, records, bar)
        else:
            if isinstance(selector, RicesSelector):
                chosen = selector.select_many(queries, n_demos)
            else:
                chosen = [selector.select(q, n_demos) for q in queries]
            self._run_individual(queries, chosen, shots == 0, records, bar)
        return [{"index": index[q.uid], **records[q.uid]} for q in queries]

    def _reserve(self) -> int:
        return self.task.max_new_tokens if "generate" in self.task.modes else RANK_RESERVE_TOKENS

    def _prompt(self, demos: Sequence[Example], query: Example, zero_shot: bool):
        return build_prompt(self.task.template, demos, query, zero_shot, self.model.count_tokens,
                            self.model.max_context, self._reserve())

    def _record(self, query: Example, prompt, prediction: str | None) -> dict:
        # The demo uids and query text rebuild the prompt; whole prompts would bloat the file.
        # Zero-shot demonstrations are text only, so they are no shots.
        record = {"uid": query.uid, "query": prompt.query, "demo_uids": list(prompt.demo_uids),
                  "shots_used": len(prompt.context_images),
                  "n_images": len(prompt.images),
                  "references": list(query.references), "label": query.label,
                  "extra": dict(query.extra)}
        if prediction is not None:
            record["raw_prediction"] = prediction
            record["prediction"] = cut_answer(prediction, self.task.stop_strings)
        if "rank" in self.task.modes:
            choices = self.data.choices[query.pool]
            scores = self.model.rank(prompt, choices)
            record["ranked"] = choices[max(range(len(choices)), key=scores.__getitem__)]
            record["choice_scores"] = dict(zip(choices, scores))
            record.setdefault("prediction", record["ranked"])
        return record

    def _generate(self, prompts) -> list[str]:
        return self.model.generate(prompts, self.task.max_new_tokens, self.task.num_beams)

    def _run_individual(self, queries, chosen, zero_shot, records, bar) -> None:
        generate = "generate" in self.task.modes
        for start in range(0, len(queries), self.config.batch_size):
            batch = queries[start : start + self.config.batch_size]
            prompts = [self._prompt(d, q, zero_shot)
                       for q, d in zip(batch, chosen[start : start + len(batch)])]
            outputs = self._generate(prompts) if generate else [None] * len(batch)
            for q, p, out in zip(batch, prompts, outputs):
                records[q.uid] = self._record(q, p, out)
            if bar is not None:
                bar.update(len(batch))

    def _run_shared(self, queries, demos, zero_shot, records, bar) -> None:
        """Queries that share one demonstration set: prefill it once when generating."""
        template = self.task.template
        demos = fit_demos(template, demos, [template.query(q) for q in queries], zero_shot,
                          self.model.count_tokens, self.model.max_context, self._reserve())
        prompts = [build_prompt(template, demos, q, zero_shot) for q in queries]
        if "generate" not in self.task.modes or not self.config.prefix_reuse:
            self._run_individual(queries, [demos] * len(queries), zero_shot, records, bar)
            return
        try:
            state, query_ids = self.model.prefill(prompts[0].context, prompts[0].context_images,
                                                  [p.query for p in prompts])
        except TokenBoundaryError:  # the tokenizer merges across the boundary: prompt whole
            self._run_individual(queries, [demos] * len(queries), zero_shot, records, bar)
            return
        step = self.config.batch_size
        for start in range(0, len(queries), step):
            part = slice(start, start + step)
            outputs = self.model.generate_after_prefix(
                state, query_ids[part], [p.query_image for p in prompts[part]],
                self.task.max_new_tokens, self.task.num_beams)
            for q, p, out in zip(queries[part], prompts[part], outputs):
                records[q.uid] = self._record(q, p, out)
            if bar is not None:
                bar.update(len(outputs))


def results_to_json(task: Task, config: EvalConfig, results: list[ShotResult],
                    **info: Any) -> dict[str, Any]:
    """The results file: settings, metric definitions, per-shot summaries and predictions."""
    return {
        "task": task.name,
        **info,
        "config": asdict(config) | {"selection": config.selection or task.selection},
        "metrics": [{"name": m.name, "label": m.label, "higher_is_better": m.higher_is_better,
                     "variant": m.variant, "note": m.note}
                    for m in task.metrics],
        "results": [
            {"shots": r.shots,
             "shots_used": r.shots_used(),
             "mean": {m.name: r.summary(m.name)[0] for m in task.metrics},
             "std": {m.name: r.summary(m.name)[1] for m in task.metrics},
             "trials": r.trials}
            for r in results
        ],
    }
