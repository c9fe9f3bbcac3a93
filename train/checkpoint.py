"""Atomic, resumable checkpoints: ``RUN/ckpt/step-N`` holds everything needed to continue.

Layout of one checkpoint::

    step-N/engine/...               DeepSpeed model, optimizer (ZeRO shards) and LR-scheduler state
    step-N/rank-00000.json          per rank: step, counters, data-loader position, python/numpy RNG
    step-N/rank-00000.safetensors   per rank: torch (and CUDA) RNG states

Everything is written into ``tmp-step-N``, flushed to disk, then renamed to ``step-N`` by rank 0.
A rename within a directory is atomic, so a crash mid-save leaves only a ``tmp-*`` directory
that resume ignores (and the next run deletes); the previous ``step-*`` stays usable.

Loading executes nothing stored in the checkpoint: our own state is JSON and safetensors, and
DeepSpeed's engine files are read with ``weights_only`` unpickling (``train.safe_load``). A file
that cannot be read that way raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from train.atomic import fsync_tree, replace_directory
from train.distributed import DistInfo, barrier

CKPT_DIR = "ckpt"
ENGINE_TAG = "engine"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """All RNG states that influence training on this rank: (JSON-able part, tensor part)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return plain, tensors


def set_rng_state(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")),
                                       key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _rank_files(path: str, rank: int) -> tuple[str, str]:
    stem = os.path.join(path, f"rank-{rank:05d}")
    return stem + ".json", stem + ".safetensors"


def write_rank_state(path: str, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's plain state and RNG states into checkpoint directory ``path``."""
    plain_rng, tensors = rng_state()
    json_file, tensor_file = _rank_files(path, rank)
    with open(json_file, "w") as f:
        json.dump({"format": STATE_FORMAT, **state, "rng": plain_rng}, f)
    save_file(tensors, tensor_file)


def read_rank_state(path: str, rank: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One rank's ``(plain state, RNG tensors)`` from checkpoint ``path``; never runs code."""
    json_file, tensor_file = _rank_files(path, rank)
    if not os.path.exists(json_file):
        old = os.path.join(path, f"rank-{rank:05d}.pt")
        if os.path.exists(old):
            raise CheckpointError(
                f"{old} is a pickle file from an older flamingo-kit; it is not loaded because "
                "unpickling can run code. Start a new run_dir (or set checkpoint.resume=false)"
            )
        raise CheckpointError(
            f"{path} has no state for rank {rank} ({os.path.basename(json_file)}): it was written "
            "by a job with a different number of processes; resume with the same world size or "
            "start a new run_dir"
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a rank state of format {STATE_FORMAT}")
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{json_file}: not a readable rank state ({error}); resume from "
                              "another checkpoint or start a new run_dir") from None
    try:
        tensors = load_file(tensor_file)
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{tensor_file}: not a readable safetensors file ({error}); resume "
                              "from another checkpoint or start a new run_dir") from None
    return state, tensors


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
    """Delete ``tmp-step-*`` (and hidden ``.step-*``) leftovers of a save that was interrupted."""
    root = os.path.join(run_dir, CKPT_DIR)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(("tmp-", ".")):
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
    write_rank_state(tmp, dist.rank, {**rank_state, "world_size": dist.world_size})
    barrier()
    if dist.is_main:
        fsync_tree(tmp)
        replace_directory(tmp, final)  # replaces step-N when re-saving a step after a resume
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path: str, dist: DistInfo) -> dict[str, Any]:
    """Restore engine state and RNG from ``path``; return this rank's saved ``rank_state``.

    Raises :class:`CheckpointError` naming the file when a file is missing, unreadable or
    would need code to load.
    """
    from train.safe_load import UnsafeFileError

    state, rng_tensors = read_rank_state(path, dist.rank)
    if state["world_size"] != dist.world_size:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes, this job has "
            f"{dist.world_size}; resume with the same world size or start a new run_dir"
        )
    if engine.load_universal_checkpoint():
        raise CheckpointError("DeepSpeed universal checkpoints load with pickle; remove "
                              "checkpoint.load_universal from deepspeed.extra")
    # Frozen weights are not in the checkpoint (see save_checkpoint), so only a model without
    # frozen parameters can be checked strictly; optimizer and scheduler load in full.
    has_frozen = any(not p.requires_grad for p in engine.module.parameters())
    try:
        load_path, _ = engine.load_checkpoint(path, tag=ENGINE_TAG,
                                              load_module_strict=not has_frozen)
    except UnsafeFileError as error:
        raise CheckpointError(str(error)) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no engine state under {path}/{ENGINE_TAG}")
    set_rng_state(state.pop("rng"), rng_tensors)
    return state
