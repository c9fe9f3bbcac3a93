"""The three training stages, each a small module whose ``build`` returns :class:`StageParts`.

A stage differs from another only in its model, its data and its batch -> loss function; the
loop in ``train.recipe`` is shared. Stage modules are imported on demand so that, e.g., the LM
stage does not need the vision stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from train.config import STAGES, TrainConfig
from train.distributed import DistInfo

Batch = dict[str, torch.Tensor]


@dataclass
class StageParts:
    """What the loop needs from a stage.

    ``loader`` yields batches forever and has ``state_dict``/``load_state_dict`` (and optionally
    ``skipped()`` and ``truncated()``); ``loss(model, batch)`` runs the (DeepSpeed-wrapped) model
    and returns a scalar; ``export(module, directory)`` writes the final artefact on rank 0 with
    all weights gathered; ``count_tokens(batch)`` feeds throughput and MFU; ``setup_info`` goes
    into the run's ``setup`` event (e.g. whether batches are packed). ``diagnose(engine)``, when a
    stage has one, returns named floats measured on held-out data (every rank calls it).
    """

    model: torch.nn.Module
    loader: Any
    loss: Callable[[Callable, Batch], torch.Tensor]
    export: Callable[[torch.nn.Module, str], None]
    count_tokens: Callable[[Batch], int]
    setup_info: dict[str, Any] = field(default_factory=dict)
    diagnose: Callable[[Any], dict[str, float]] | None = None


def float_dtype(precision: str) -> torch.dtype:
    """The dtype of floating batch tensors under ``deepspeed.precision``."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """Move a batch to ``device``; floating tensors take ``dtype``."""
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None)
            for k, v in batch.items()}


def count_attended_tokens(batch: Batch) -> int:
    """Non-padding tokens of a batch (its attention mask)."""
    return int(batch["attention_mask"].sum())


def build_stage(cfg: TrainConfig, dist: DistInfo) -> StageParts:
    """Build the parts of the stage named by ``cfg.stage``."""
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; known: {', '.join(STAGES)}")
    module = importlib.import_module(f"train.stages.{cfg.stage}")
    return module.build(cfg, dist)
