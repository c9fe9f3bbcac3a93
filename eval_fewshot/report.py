"""Presenting results: a shots x metrics table (mean ± std), the JSON file and a PNG plot."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned columns separated by `` | `` under a ``---|---`` rule.

    Reads as plain text in a terminal and is a Markdown table (it pastes into a README as is).
    Floats are shown with 3 significant digits, other values as ``str`` gives them.
    """
    def cell(value: object) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.rjust(w) for v, w in zip(values, widths))

    return "\n".join([line(headers), "-|-".join("-" * w for w in widths), *map(line, cells)])


def format_table(results: dict[str, Any]) -> str:
    """The results as a table (:func:`markdown_table`): a row per shot count, ``mean ± std`` per
    metric.

    ``shots`` is the count asked for and ``used`` the mean number of demonstrations the prompts
    held (fewer when they had to fit the context). Headers carry the metric direction (↑ higher
    is better, ↓ lower is better); footer lines say how many trials and queries each number
    averages and which variant of a metric ran.
    """
    metrics = results["metrics"]
    headers = ["shots", "used"] + [f"{m['label']} {'↑' if m['higher_is_better'] else '↓'}"
                                   for m in metrics]
    rows = []
    for r in results["results"]:
        cells = [str(r["shots"]), f"{r['shots_used']['mean']:.1f}"]
        cells += [f"{r['mean'][m['name']]:.2f} ± {r['std'][m['name']]:.2f}" for m in metrics]
        rows.append(cells)
    first = results["results"][0]
    n_queries = len(first["trials"][0]["predictions"])
    out = [f"task: {results['task']}  (model: {results.get('model', '?')})",
           markdown_table(headers, rows)]
    out.append(f"mean ± std over {len(first['trials'])} trial(s) of {n_queries} queries; "
               f"selection: {results['config']['selection']}")
    out += [f"{m['label']}: {m['variant']} ({m['note']})" for m in metrics if m.get("variant")]
    return "\n".join(out)


def write_json(results: dict[str, Any], path: str) -> None:
    """Write the results (with every prediction) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def plot_scores(results: dict[str, Any], path: str) -> None:
    """PNG of every "higher is better" metric vs shots, with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    shots = [r["shots"] for r in results["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for m in results["metrics"]:
        if not m["higher_is_better"]:
            continue
        means = [r["mean"][m["name"]] for r in results["results"]]
        stds = [r["std"][m["name"]] for r in results["results"]]
        ax.errorbar(shots, means, yerr=stds, marker="o", capsize=3, label=m["label"])
    ax.set_xlabel("shots")
    ax.set_ylabel("score (higher is better)")
    ax.set_xticks(shots)
    ax.set_title(f"{results['task']}: score vs shots")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
