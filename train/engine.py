"""DeepSpeed engine construction: JSON config, AdamW parameter groups and the LR schedule."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from train.config import DeepSpeedSettings, OptimSettings


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated recursively with ``extra`` (new dict; nested dicts merged, not replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The DeepSpeed JSON config for these settings.

    The optimizer and scheduler are passed as objects (torch AdamW, LambdaLR), so DeepSpeed
    compiles no fused op; clipping is DeepSpeed's, applied once per optimizer step after the
    gradients of all micro-batches are accumulated.
    """
    config = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": settings.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        # Our own logger reports progress; DeepSpeed's periodic prints would duplicate it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, dict(settings.extra))


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                     rules: Sequence[tuple[str, float]] = ()) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed matrices and undecayed vectors/scalars, per rate.

    Decay on biases, norm gains, gates and temperatures would pull them towards 0, which for
    gates (init 0) and norms (init 1) is not regularisation but a bias; only matrices decay.
    ``rules`` are ``(regex, lr_scale)``: a parameter whose name matches a rule's pattern
    (``re.search``; the first match wins) trains at ``lr * lr_scale``. The groups at the base
    rate come first, so the first group's rate is the run's nominal rate.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters; nothing to train")
    patterns = [(re.compile(pattern), scale) for pattern, scale in rules]
    for pattern, _ in patterns:
        if not any(pattern.search(n) for n, _ in named):
            raise ValueError(f"optim.param_groups: {pattern.pattern!r} matches no trainable "
                             f"parameter; names look like {named[0][0]!r}")

    def scale_of(name: str) -> float:
        return next((scale for pattern, scale in patterns if pattern.search(name)), 1.0)

    scales = sorted({scale_of(n) for n, _ in named}, key=lambda x: (x != 1.0, x))
    groups = []
    for scale in scales:
        for decayed in (True, False):
            params = [p for n, p in named if scale_of(n) == scale and (p.ndim >= 2) == decayed]
            if params:
                groups.append({"params": params, "lr": lr * scale,
                               "weight_decay": weight_decay if decayed else 0.0})
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor: linear warmup to 1 over ``warmup_steps``, then cosine down to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_scheduler(optimizer, optim: OptimSettings, total_steps: int):
    schedule = partial(warmup_cosine, warmup_steps=optim.warmup_steps, total_steps=total_steps,
                       min_ratio=optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_engine(
    model: torch.nn.Module, settings: DeepSpeedSettings, optim: OptimSettings, total_steps: int
):
    """Wrap ``model`` in a DeepSpeed engine with torch AdamW and the warmup+cosine schedule.

    The engine reads its checkpoint files with ``weights_only`` unpickling (``train.safe_load``).
    """
    import deepspeed

    from train.safe_load import use_weights_only_loading

    rules = [(rule.match, rule.lr_scale) for rule in optim.param_groups]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay, optim.lr, rules),
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
    )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=partial(_make_scheduler, optim=optim, total_steps=total_steps),
        config=deepspeed_config(settings),
    )
    use_weights_only_loading(engine)
    return engine


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing in ``model``, or in every model found inside it.

    A module with its own ``gradient_checkpointing_enable`` (a Hugging Face model, a
    ``FlamingoModel``) decides what to recompute; otherwise its children are searched. Returns
    how many models were switched. Hugging Face models get non-reentrant checkpointing, which
    works when a block's inputs need no gradient (frozen towers under trainable adapters).
    """
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if not model.supports_gradient_checkpointing:
            return 0
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return 1
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        return 1
    return sum(enable_activation_checkpointing(child) for child in model.children())
