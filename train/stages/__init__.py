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
    into the run's ``setup`` event (e.g. whether batches are packed).
    """

    model: torch.nn.Module
    loader: Any
    loss: Callable[[Callable, Batch], torch.Tensor]
    export: Callable[[torch.nn.Module, str], None]
    count_tokens: Callable[[Batch], int]
    setup_info: dict[str, Any] = field(default_factory=dict)


def count_attended_tokens(batch: Batch) -> int:
    """Non-padding tokens of a batch (its attention mask)."""
    return int(batch["attention_mask"].sum())


def build_stage(cfg: TrainConfig, dist: DistInfo) -> StageParts:
    """Build the parts of the stage named by ``cfg.stage``."""
    if cfg.stage not in STAGES:
        raise ValueError(f"unknown stage {cfg.stage!r}; known: {', '.join(STAGES)}")
    module = importlib.import_module(f"train.stages.{cfg.stage}")
    return module.build(cfg, dist)
