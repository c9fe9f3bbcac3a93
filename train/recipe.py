"""The training loop of all stages: ``setup`` -> ``train`` (+ ``save_checkpoint``) -> ``export``.

Read top to bottom: :func:`run` is the whole recipe. Stage-specific work (model, data, loss,
export) comes from ``train.stages``; everything here is the same for every stage and for one
CPU process or many GPU nodes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from flamingo_kit.from_scratch import seed_everything
from train import checkpoint
from train.atomic import atomic_directory
from train.config import CONFIG_FILE, TrainConfig, check_resume, save_config
from train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    sum_counts,
)
from train.engine import build_engine, enable_activation_checkpointing
from train.metrics import MetricsLogger, count_parameters, drop_records_after, step_flops
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


def setup(cfg: TrainConfig) -> Session:
    """Process group, run dir, stage parts, DeepSpeed engine, and the resumed state if any.

    A resume is checked against the run's recorded config before anything is built or written
    (``train.config.check_resume``); ``config.yaml`` is rewritten only once it is accepted.
    """
    dist = init_distributed(shm_comm=False)
    config_path = os.path.join(cfg.run_dir, CONFIG_FILE)
    latest = checkpoint.latest_checkpoint(cfg.run_dir) if cfg.checkpoint.resume else None
    changed = check_resume(cfg, config_path) if latest is not None else {}
    if dist.is_main:
        os.makedirs(cfg.run_dir, exist_ok=True)
        if latest is None:
            save_config(cfg, config_path)
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
    if latest is not None:
        state = checkpoint.load_checkpoint(engine, latest, dist)
        parts.loader.load_state_dict(state["data"])
        start_step, nonfinite = state["step"], state["nonfinite"]
    dropped = 0
    if dist.is_main:
        if latest is not None:
            save_config(cfg, config_path)  # the resume is accepted: record the allowed changes
        dropped = drop_records_after(cfg.run_dir, start_step)
    barrier()
    logger = MetricsLogger(cfg.run_dir, cfg.steps, start_step, enabled=dist.is_main,
                           progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
    if latest is not None:
        logger.event("resume", step=start_step, checkpoint=latest, dropped_records=dropped,
                     changed={key: list(values) for key, values in changed.items()})
    logger.event("setup", stage=cfg.stage, world_size=dist.world_size,
                 trainable_params=n_trainable, frozen_params=n_frozen,
                 zero_stage=cfg.deepspeed.zero_stage, precision=cfg.deepspeed.precision,
                 **parts.setup_info)
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
    stops once more than ``max_nonfinite_losses`` were dropped. ``grad_norm`` is the norm of
    the accumulated gradient before clipping (see :func:`_grad_norm`).
    """
    cfg, engine = s.cfg, s.engine
    dtype = float_dtype(cfg.deepspeed.precision)
    loss_sum, tokens, crc, done = 0.0, 0, 0, 0
    own_norm = None
    lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside step()
    start = time.perf_counter()
    while done < cfg.deepspeed.grad_accum:
        host_batch = next(s.data_iter)
        batch = to_device(host_batch, engine.device, dtype)
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
        if engine.is_gradient_accumulation_boundary() and _needs_own_grad_norm(engine):
            own_norm = gradient_norm(engine.module)  # step() clips, then zeroes the gradients
        engine.step()
        loss_sum += float(loss.detach())  # no wait: the finiteness check above synced already
        # Counted on the host copy: reading device tensors here would wait for the backward.
        tokens += s.parts.count_tokens(host_batch)
        crc = _fingerprint(host_batch, crc)
        done += 1
    s.step += 1
    loss_total, tokens_total = all_reduce_sum([loss_sum, float(tokens)])
    seconds = time.perf_counter() - start
    skipped, truncated = data_counts(s)
    flops = step_flops(s.n_trainable, s.n_frozen, tokens_total)
    return {
        "loss": loss_total / (cfg.deepspeed.grad_accum * s.dist.world_size),
        "lr": lr,
        "grad_norm": _grad_norm(engine, own_norm),
        "tokens": int(tokens_total),
        "tokens_per_s": tokens_total / seconds,
        "mfu": flops / (seconds * cfg.logging.peak_flops * s.dist.world_size),
        "step_time_s": seconds,
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
        "truncated": sum(truncated.values()),
        "batch_crc": crc,
    }


def _needs_own_grad_norm(engine) -> bool:
    """DeepSpeed keeps no norm under ZeRO 0 in fp32 (it clips with ``clip_fp32_gradients`` and
    drops the value); there the full gradients sit on the parameters, reduced over ranks."""
    return (engine.zero_optimization_stage() == 0
            and not (engine.bfloat16_enabled() or engine.fp16_enabled()))


def gradient_norm(module: torch.nn.Module) -> float:
    """L2 norm over the gradients of all trainable parameters (as one vector)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters()
             if p.requires_grad and p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _grad_norm(engine, own_norm: float | None) -> float | None:
    """The optimizer step's gradient norm before clipping: DeepSpeed's where it computes one
    (ZeRO 1-3, bf16), ours otherwise."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return own_norm
    return float(norm)


def data_counts(s: Session) -> tuple[dict[str, int], dict[str, int]]:
    """Summed over ranks (one collective): samples dropped so far by reason, plus
    ``nonfinite_loss`` micro-batches; documents cut to the maximum length, by source."""
    loader = s.parts.loader
    local = {f"skipped/{k}": v for k, v in getattr(loader, "skipped", dict)().items()}
    local.update({f"truncated/{k}": v for k, v in getattr(loader, "truncated", dict)().items()})
    total = sum_counts(local)
    skipped = {k.split("/", 1)[1]: v for k, v in total.items() if k.startswith("skipped/")}
    truncated = {k.split("/", 1)[1]: v for k, v in total.items() if k.startswith("truncated/")}
    if s.nonfinite:
        skipped["nonfinite_loss"] = s.nonfinite
    return dict(sorted(skipped.items())), dict(sorted(truncated.items()))


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
    metrics = None
    while s.step < cfg.steps:
        metrics = train_step(s)
        measured = diagnose(s)
        metrics.update(measured)
        if s.step % cfg.logging.every == 0 or s.step == cfg.steps or measured:
            s.logger.log_step(s.step, metrics)
        if s.step % cfg.checkpoint.every == 0 or s.step == cfg.steps:
            save_checkpoint(s)
    skipped, truncated = data_counts(s)
    s.logger.event("summary", step=s.step, last_loss=metrics["loss"] if metrics else None,
                   skipped=sum(skipped.values()), skipped_by_reason=skipped,
                   truncated_by_source=truncated)


def export(s: Session) -> str:
    """Write ``RUN/final`` (full weights gathered from ZeRO-3 shards) atomically on rank 0."""
    import deepspeed

    final = os.path.join(s.cfg.run_dir, FINAL_DIR)
    module = s.engine.module
    params = list(module.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
              if s.cfg.deepspeed.zero_stage == 3 else contextlib.nullcontext())
    with gather:
        if s.dist.is_main:
            with atomic_directory(final) as tmp:
                s.parts.export(module, tmp)
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
