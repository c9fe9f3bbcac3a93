"""The training loop of all stages: ``setup`` -> ``train`` (+ ``save_checkpoint``) -> ``export``.

Read top to bottom: :func:`run` is the whole recipe. Stage-specific work (model, data, loss,
export) comes from ``train.stages``; everything here is the same for every stage and for one
CPU process or many GPU nodes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from train import checkpoint
from train.config import TrainConfig, save_config
from train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from train.engine import build_engine, enable_activation_checkpointing
from train.metrics import MetricsLogger, count_parameters, step_flops
from train.stages import StageParts, build_stage, float_dtype, to_device

FINAL_DIR = "final"


class NonFiniteLossError(RuntimeError):
    """Raised when more than ``max_nonfinite_losses`` micro-batches had a NaN/inf loss."""


@dataclass
class Session:
    """The state of one run that the loop steps need; plain data, no behaviour."""

    cfg: TrainConfig
    dist: DistInfo
    parts: StageParts
    engine: Any
    logger: MetricsLogger
    n_trainable: int
    n_frozen: int
    step: int = 0
    nonfinite: int = 0
    warned_images_ignored: bool = False
    data_iter: Any = field(default=None, repr=False)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig) -> Session:
    """Process group, run dir, stage parts, DeepSpeed engine, and the resumed state if any."""
    dist = init_distributed(shm_comm=False)
    if dist.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        checkpoint.remove_partial_checkpoints(cfg.run_dir)
    barrier()
    seed_everything(cfg.seed)
    parts = build_stage(cfg, dist)
    if cfg.deepspeed.activation_checkpointing and not enable_activation_checkpointing(parts.model):
        raise ValueError("deepspeed.activation_checkpointing=true but the model has no "
                         "Hugging Face module that supports gradient checkpointing")
    n_trainable, n_frozen = count_parameters(parts.model)
    engine = build_engine(parts.model, cfg.deepspeed, cfg.optim, cfg.steps)
    # Dropout and sampling differ per rank; the weights were initialised identically above.
    seed_everything(cfg.seed + dist.rank)
    start_step, nonfinite = 0, 0
    latest = checkpoint.latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume else None
    if latest is not None:
        state = checkpoint.load_checkpoint(engine, latest, dist)
        parts.loader.load_state_dict(state["data"])
        start_step, nonfinite = state["step"], state["nonfinite"]
    logger = MetricsLogger(cfg.run_dir, cfg.steps, start_step, enabled=dist.is_main,
                           progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
    if latest is not None:
        logger.event("resume", step=start_step, checkpoint=latest)
    logger.event("setup", stage=cfg.stage, world_size=dist.world_size,
                 trainable_params=n_trainable, frozen_params=n_frozen,
                 zero_stage=cfg.deepspeed.zero_stage, precision=cfg.deepspeed.precision)
    engine.train()
    return Session(cfg=cfg, dist=dist, parts=parts, engine=engine, logger=logger,
                   n_trainable=n_trainable, n_frozen=n_frozen, step=start_step,
                   nonfinite=nonfinite, data_iter=iter(parts.loader))


def _is_finite_on_all_ranks(loss: torch.Tensor) -> bool:
    """True iff every rank's loss is finite (one collective, so all ranks decide alike)."""
    bad = 0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0
    return all_reduce_sum([bad])[0] == 0.0


def _fingerprint(batch: dict[str, torch.Tensor], previous: int) -> int:
    """Running CRC32 of the batch's token ids: identical iff the same samples were trained on."""
    return zlib.crc32(batch["input_ids"].cpu().numpy().tobytes(), previous)


def train_step(s: Session) -> dict[str, Any]:
    """One optimizer step: ``grad_accum`` finite micro-batches, then DeepSpeed's update.

    A micro-batch whose loss is NaN/inf on any rank is dropped on all ranks before backward
    (so no gradient of it reaches the update), logged, and replaced by the next one; the run
    stops once more than ``max_nonfinite_losses`` were dropped.
    """
    cfg, engine = s.cfg, s.engine
    dtype = float_dtype(cfg.deepspeed.precision)
    loss_sum, tokens, crc, done = 0.0, 0, 0, 0
    lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside step()
    start = time.perf_counter()
    while done < cfg.deepspeed.grad_accum:
        batch = to_device(next(s.data_iter), engine.device, dtype)
        loss = s.parts.loss(engine, batch)
        if not _is_finite_on_all_ranks(loss):
            s.nonfinite += 1
            s.logger.event("nonfinite_loss", step=s.step + 1, count=s.nonfinite,
                           limit=cfg.max_nonfinite_losses)
            if s.nonfinite > cfg.max_nonfinite_losses:
                raise NonFiniteLossError(
                    f"{s.nonfinite} micro-batches had a NaN/inf loss (limit "
                    f"max_nonfinite_losses={cfg.max_nonfinite_losses}); the run is diverging: "
                    "lower optim.lr, raise optim.warmup_steps or check the data"
                )
            continue
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
        tokens += s.parts.count_tokens(batch)
        crc = _fingerprint(batch, crc)
        done += 1
    s.step += 1
    loss_total, tokens_total = all_reduce_sum([loss_sum, float(tokens)])
    seconds = time.perf_counter() - start
    skipped_samples = sum(getattr(s.parts.loader, "skipped", dict)().values())
    flops = step_flops(s.n_trainable, s.n_frozen, tokens_total)
    return {
        "loss": loss_total / (cfg.deepspeed.grad_accum * s.dist.world_size),
        "lr": lr,
        "grad_norm": _grad_norm(engine),
        "tokens": int(tokens_total),
        "tokens_per_s": tokens_total / seconds,
        "mfu": flops / (seconds * cfg.logging.peak_flops * s.dist.world_size),
        "step_time_s": seconds,
        "skipped": skipped_samples + s.nonfinite,
        "batch_crc": crc,
    }


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)


def save_checkpoint(s: Session) -> str:
    """Checkpoint the current step (all ranks), then honour the fault-injection knob."""
    state = {"step": s.step, "nonfinite": s.nonfinite, "data": s.parts.loader.state_dict()}
    path = checkpoint.save_checkpoint(s.engine, s.cfg.run_dir, s.step, state, s.dist,
                                      s.cfg.checkpoint.keep_last)
    s.logger.event("checkpoint", step=s.step, path=path)
    if s.cfg.checkpoint.kill_after_step == s.step:
        s.logger.close()
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def diagnose(s: Session) -> dict[str, float]:
    """The stage's held-out diagnostics when due (step 1, every N steps, the last step).

    Logs one warning per run when image reliance is still below
    ``logging.image_reliance_warn_below`` at or after ``logging.image_reliance_warn_after``.
    """
    log, step = s.cfg.logging, s.step
    every = log.image_reliance_every
    if s.parts.diagnose is None or not every:
        return {}
    if not (step == 1 or step % every == 0 or step == s.cfg.steps):
        return {}
    values = s.parts.diagnose(s.engine)
    reliance = values.get("image_reliance")
    if (reliance is not None and step >= log.image_reliance_warn_after
            and reliance < log.image_reliance_warn_below and not s.warned_images_ignored):
        s.warned_images_ignored = True
        s.logger.event(
            "warning_images_ignored", step=step, image_reliance=round(reliance, 5),
            message=(f"WARNING: image reliance is {reliance:.4f} nats/token after {step} steps "
                     f"(below {log.image_reliance_warn_below}): the model's predictions barely "
                     "depend on its images, so the falling loss comes from text alone. Put "
                     "image-text pairs first (flamingo.sources[].weight_schedule), raise the "
                     "rate of the gates (optim.param_groups) or lower optim.lr."))
    return values


def train(s: Session) -> None:
    """Run optimizer steps until ``cfg.steps``, logging and checkpointing on schedule."""
    cfg = s.cfg
    while s.step < cfg.steps:
        metrics = train_step(s)
        measured = diagnose(s)
        metrics.update(measured)
        if s.step % cfg.logging.every == 0 or s.step == cfg.steps or measured:
            s.logger.log_step(s.step, metrics)
        if s.step % cfg.checkpoint.every == 0 or s.step == cfg.steps:
            save_checkpoint(s)


def export(s: Session) -> str:
    """Write ``RUN/final`` (full weights gathered from ZeRO-3 shards) atomically on rank 0."""
    import deepspeed

    final = os.path.join(s.cfg.run_dir, FINAL_DIR)
    tmp = final + ".tmp"
    module = s.engine.module
    params = list(module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if s.cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if s.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            s.parts.export(module, tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
    barrier()
    s.logger.event("export", path=final)
    return final


def run(cfg: TrainConfig) -> str:
    """The whole recipe; returns the ``RUN/final`` directory.

    The process group stays up afterwards (DeepSpeed caches its groups per process), so several
    runs can share one process; the command line tears it down at exit.
    """
    s = setup(cfg)
    try:
        train(s)
        return export(s)
    finally:
        s.logger.close()
