"""Reading checkpoint files without executing anything stored in them.

DeepSpeed writes its engine state (module, optimizer, ZeRO partitions, LR scheduler) with
``torch.save`` and reads it back through its checkpoint engine, whose stock ``load`` unpickles
with ``weights_only=False``: a file in a run directory could run any code on resume.
:class:`WeightsOnlyCheckpointEngine` replaces that one method with ``torch.load(...,
weights_only=True)``, which rebuilds only tensors, containers and primitive values, plus the
few plain-data DeepSpeed classes its state dicts hold (:data:`DEEPSPEED_STATE_CLASSES`, found
by loading ZeRO 0-3 fp32/bf16 checkpoints of deepspeed 0.19.8). Those are rebuilt by setting
attributes or calling an enum; none of them runs code of the file's choosing. The classes are
allowed only inside each load (``torch.serialization.safe_globals``), not process-wide.

A file that needs anything else is refused with :class:`UnsafeFileError`, naming the file.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# LossScaler: ZeRO 1-3 optimizer state (``loss_scaler``); DynamicLossScaler is its fp16 twin;
# ZeroStageEnum: ZeRO 3 optimizer state (``zero_stage``); fragment_address: ZeRO 1-2 state
# (``param_slice_mappings``). Each is a plain attribute holder or an int enum.
DEEPSPEED_STATE_CLASSES = (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


class UnsafeFileError(RuntimeError):
    """A checkpoint file that cannot be read without running code (or is not a torch file)."""


def load_weights_only(path: str, map_location: Any = None) -> Any:
    """``torch.load(path)`` restricted to tensors, plain data and DeepSpeed's state classes."""
    try:
        with torch.serialization.safe_globals(list(DEEPSPEED_STATE_CLASSES)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        text = str(error)
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail = (f"it asks for the Python object {wanted.group(1)}" if wanted
                  else unpickler.group(1).strip() if unpickler
                  else text.strip().splitlines()[0] if text.strip() else type(error).__name__)
        raise UnsafeFileError(
            f"{path}: refused to load: it is not a plain tensor/state file ({detail}). Nothing in "
            "it was executed. The file is corrupt, was written by other software, or was "
            "tampered with; resume from another checkpoint or start a new run_dir"
        ) from None


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine with a ``weights_only`` :meth:`load`; saving is as is."""

    def load(self, path: str, map_location=None):
        """Read one engine file (model states, optimizer states, a ZeRO partition)."""
        return load_weights_only(path, map_location=map_location)


def use_weights_only_loading(engine) -> None:
    """Make every engine-file read of ``engine`` go through :class:`WeightsOnlyCheckpointEngine`.

    Only DeepSpeed's default torch engine is replaced: the other writers (fast, decoupled,
    DataStates) load with pickle too and are refused here rather than left unsafe.
    """
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"DeepSpeed chose the checkpoint engine {type(current).__name__} (from "
            "deepspeed.extra); only its default torch engine can be made to load safely, so "
            "remove the checkpoint writer / datastates settings from deepspeed.extra"
        )
    safe = WeightsOnlyCheckpointEngine()
    safe.zipfile_serialization = current.zipfile_serialization
    engine.checkpoint_engine = safe
