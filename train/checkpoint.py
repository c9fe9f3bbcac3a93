"""Atomic, resumable checkpoints: ``RUN/ckpt/step-N`` holds everything needed to continue.

Layout of one checkpoint::

    step-N/engine/...        DeepSpeed model, optimizer (ZeRO shards) and LR-scheduler state
    step-N/rank-00000.pt     per rank: step, data-loader position, python/numpy/torch RNG states

Everything is written into ``tmp-step-N``, flushed to disk, then renamed to ``step-N`` by rank 0.
A rename within a directory is atomic, so a crash mid-save leaves only a ``tmp-*`` directory
that resume ignores (and the next run deletes); the previous ``step-*`` stays usable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from train.distributed import DistInfo, barrier

CKPT_DIR = "ckpt"
ENGINE_TAG = "engine"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """All random-number-generator states that influence training on this rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: str) -> None:
    """Flush every file under ``root`` and the directories themselves to stable storage."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run as ``(step, path)``, oldest first."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint directory of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(run_dir: str) -> None:
    """Delete ``tmp-step-*`` leftovers of a save that was interrupted."""
    root = os.path.join(run_dir, CKPT_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith("tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def save_checkpoint(
    engine, run_dir: str, step: int, rank_state: dict[str, Any], dist: DistInfo, keep_last: int
) -> str:
    """Write checkpoint ``step`` atomically on all ranks; keep the newest ``keep_last``.

    Must be called by every rank (DeepSpeed saves each rank's optimizer shard).
    ``rank_state`` is this rank's data position and counters; RNG states are added here.
    """
    root = os.path.join(run_dir, CKPT_DIR)
    tmp = os.path.join(root, f"tmp-step-{step}")
    final = os.path.join(root, f"step-{step}")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    # Frozen weights come back from their source at setup; saving them each time wastes disk.
    engine.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save({**rank_state, "rng": rng_state(), "world_size": dist.world_size},
               os.path.join(tmp, f"rank-{dist.rank:05d}.pt"))
    barrier()
    if dist.is_main:
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step after a resume from it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path: str, dist: DistInfo) -> dict[str, Any]:
    """Restore engine state and RNG from ``path``; return this rank's saved ``rank_state``."""
    rank_file = os.path.join(path, f"rank-{dist.rank:05d}.pt")
    if not os.path.exists(rank_file):
        raise RuntimeError(
            f"{path} has no state for rank {dist.rank}: it was written by a job with a different "
            f"number of processes; resume with the same world size or start a new run_dir"
        )
    state = torch.load(rank_file, weights_only=False)
    if state["world_size"] != dist.world_size:
        raise RuntimeError(
            f"{path} was written by {state['world_size']} processes, this job has "
            f"{dist.world_size}; resume with the same world size or start a new run_dir"
        )
    # Frozen weights are not in the checkpoint (see save_checkpoint), so only a model without
    # frozen parameters can be checked strictly; optimizer and scheduler load in full.
    has_frozen = any(not p.requires_grad for p in engine.module.parameters())
    load_path, _ = engine.load_checkpoint(path, tag=ENGINE_TAG, load_module_strict=not has_frozen)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no engine state under {path}/{ENGINE_TAG}")
    set_rng_state(state.pop("rng"))
    return state
