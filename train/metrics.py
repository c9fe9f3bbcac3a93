"""Rank-0 training telemetry: progress, JSONL metrics, optional TensorBoard, throughput and MFU.

Progress is a tqdm bar on a terminal; when the output goes to a file or pipe (a job log), a bar
would write a carriage-return line per refresh, so one plain line is printed every
:data:`PROGRESS_LINES` th of the run instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from train.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
PROGRESS_LINES = 20  # plain progress lines per run when stderr is not a terminal


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, frozen)`` element counts (ZeRO-3 partitioned tensors report ``ds_numel``)."""
    trainable = frozen = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return trainable, frozen


def step_flops(n_trainable: int, n_frozen: int, tokens: float) -> float:
    """Estimated FLOPs of one optimizer step: ``6 * N_trainable * tokens + 2 * N_frozen * tokens``.

    Trainable weights cost a forward (2) and a backward for activations and weights (4) per
    token; frozen weights cost the forward only (their activation gradients, needed when a
    trainable module sits below them, are ignored, so this is a lower bound there). Attention
    score FLOPs are left out, as in the usual ``6N`` estimate.
    """
    return (6.0 * n_trainable + 2.0 * n_frozen) * tokens


class MetricsLogger:
    """Writes one JSON line per logged step and per event; shows progress on rank 0.

    Non-main ranks get a logger whose methods do nothing, so the loop has no rank branches.
    """

    def __init__(self, run_dir: str, total_steps: int, start_step: int, enabled: bool,
                 progress: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._bar = self._tb = self._file = None
        self._image_reliance = None  # the latest measured value, shown in the progress bar
        self._total = total_steps
        self._line_every = self._last_line = 0  # plain progress lines: interval, last step
        if not enabled:
            return
        # Append: a resumed run continues the same file.
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a")
        if progress and sys.stderr.isatty():  # tqdm draws on stderr
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train",
                             dynamic_ncols=True)
        elif progress:
            self._line_every = max(1, round(total_steps / PROGRESS_LINES))
            self._last_line = start_step
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of optimizer step ``step`` (1-based)."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), **metrics})
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)
        self._image_reliance = metrics.get("image_reliance", self._image_reliance)
        if self._bar is not None:
            self._bar.n = step
            extra = ({} if self._image_reliance is None
                     else {"img_rel": f"{self._image_reliance:.3f}"})
            self._bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics['tokens_per_s']:.0f}", skipped=metrics["skipped"], **extra,
                refresh=False,
            )
            self._bar.refresh()
        elif self._line_every and (step - self._last_line >= self._line_every
                                   or step == self._total):
            self._last_line = step
            reliance = ("" if self._image_reliance is None
                        else f" image reliance {self._image_reliance:.3f}")
            print(f"train step {step}/{self._total} loss {metrics['loss']:.4f} "
                  f"lr {metrics['lr']:.2e} tok/s {metrics['tokens_per_s']:.0f} "
                  f"skipped {metrics['skipped']}{reliance}", flush=True)

    def event(self, kind: str, **fields: Any) -> None:
        """Record something that is not a step (NaN loss, checkpoint, resume, export)."""
        if not self.enabled:
            return
        self._write({"event": kind, "time": time.time(), **fields})
        message = f"{kind}: " + ", ".join(f"{k}={v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Flush and close the outputs."""
        for handle in (self._bar, self._tb, self._file):
            if handle is not None:
                handle.close()
        self._bar = self._tb = self._file = None


def _read_records(path: str) -> tuple[list[dict[str, Any]], bool]:
    """Records of a JSONL file, and whether its last line was torn (a write cut by a kill)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Every record ends with a newline; text after the last one is an unfinished write.
    torn = bool(lines[-1].strip())
    return [json.loads(line) for line in lines[:-1] if line.strip()], torn


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All complete records of ``RUN/metrics.jsonl`` (steps and events), in order."""
    return _read_records(os.path.join(run_dir, METRICS_FILE))[0]


def drop_records_after(run_dir: str, step: int) -> int:
    """Remove the records of steps after ``step`` from ``RUN/metrics.jsonl``; return how many.

    A run that resumes from the checkpoint of ``step`` trains the later steps again, so their
    earlier records (steps and events) would appear twice; dropping them keeps one record per
    step, and the steps that are redone are logged again as they happen. A torn last line is
    dropped too. The file is rewritten atomically, and only when something changes.
    """
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return 0
    records, torn = _read_records(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    dropped = len(records) - len(kept) + int(torn)
    if dropped:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return dropped
