"""Training configuration: typed dataclasses merged from a YAML file and ``key=value`` overrides.

One schema covers the three stages; ``stage`` picks which section (``lm``, ``contrastive`` or
``flamingo``) is used. Every key is checked against the schema before any work starts, so a typo
or a wrong type fails in well under a second with the key's name and the keys that are valid
there. This module imports only omegaconf on purpose: heavy imports (torch, deepspeed) come after
the config is known to be good.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

STAGES = ("lm", "contrastive", "flamingo")
PRECISIONS = ("fp32", "bf16")
CONTRASTIVE_LOSSES = ("clip", "siglip")


@dataclass
class DeepSpeedSettings:
    """Engine settings that are turned into the DeepSpeed JSON config (see ``train.engine``)."""

    zero_stage: int = 0
    precision: str = "fp32"
    micro_batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    # Merged last into the generated DeepSpeed config, for knobs this schema does not name.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSettings:
    """torch AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1


@dataclass
class CheckpointSettings:
    """Atomic checkpoints under ``RUN/ckpt/step-N``; the newest complete one is resumed."""

    every: int = 100
    keep_last: int = 2
    resume: bool = True
    # Fault injection for resume tests: the process SIGKILLs itself right after saving this step.
    kill_after_step: int | None = None


@dataclass
class LoggingSettings:
    """Rank-0 logging: tqdm bar, ``RUN/metrics.jsonl`` and TensorBoard when it is installed."""

    every: int = 1
    progress: bool = True
    tensorboard: bool = True
    # Peak FLOP/s of one device for the MFU estimate. 1e12 is a nominal figure for a CPU
    # socket; set e.g. 989e12 for an H100 in bf16.
    peak_flops: float = 1e12


@dataclass
class LMShape:
    """Knobs of ``flamingo_kit.tiny.lm_config`` (any family it knows)."""

    family: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    max_positions: int = 512


@dataclass
class LMStage:
    """Stage 1: causal-LM pretraining on ``corpus`` (one document per line) packed into blocks."""

    corpus: str = "data/synth/corpus.txt"
    block_size: int = 128
    tokenizer_vocab_size: int = 512
    # Batches at the start made only of repeated random-token rows, then the share of such rows
    # in every later batch (train.packing.CopyWarmupLoader): they form induction heads fast.
    copy_warmup_steps: int = 0
    copy_fraction: float = 0.0
    model: LMShape = field(default_factory=LMShape)


@dataclass
class VisionShape:
    """Knobs of ``flamingo_kit.tiny.vision_config`` (``kind`` is clip or siglip)."""

    kind: str = "clip"
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class TextTowerShape:
    """A small CLIP text transformer used only as the contrastive partner of the vision tower."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class ContrastiveStage:
    """Stage 2: CLIP/SigLIP training of a vision tower against a text tower on pair shards."""

    shards: str = "data/synth/pairs"
    tokenizer: str = "runs/lm/final"
    loss: str = "clip"
    embed_dim: int = 64
    max_length: int = 32
    num_workers: int = 0
    vision: VisionShape = field(default_factory=VisionShape)
    text: TextTowerShape = field(default_factory=TextTowerShape)


@dataclass
class SourceSettings:
    """One training source; mirrors ``data_pipelines.loading.SourceConfig``."""

    name: str = "docs"
    kind: str = "interleaved"
    shards: Any = "data/synth/interleaved"  # brace pattern, list of paths or a directory
    weight: float = 1.0
    loss_weight: float = 1.0


@dataclass
class FlamingoStage:
    """Stage 3: Flamingo training of new modules between a frozen LM and a frozen vision tower."""

    lm: str = "runs/lm/final"
    vision: str = "runs/contrastive/final"
    # Keyword arguments of ``flamingo_kit.FlamingoConfig``; checked against it at setup.
    model: dict[str, Any] = field(default_factory=dict)
    # A saved flamingo-kit model directory (save_pretrained, flamingo-convert) to continue
    # training from: it replaces lm, vision and model (which must then be empty).
    init_from: str | None = None
    max_length: int = 128
    max_images: int = 4
    num_workers: int = 0
    sources: list[SourceSettings] = field(default_factory=lambda: [SourceSettings()])


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved as ``RUN/config.yaml``."""

    stage: str = "lm"
    run_dir: str = "runs/lm"
    seed: int = 0
    steps: int = 100
    max_nonfinite_losses: int = 10
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    lm: LMStage = field(default_factory=LMStage)
    contrastive: ContrastiveStage = field(default_factory=ContrastiveStage)
    flamingo: FlamingoStage = field(default_factory=FlamingoStage)


class ConfigError(ValueError):
    """A config that does not fit the schema; the message names the key and what is valid."""


def _valid_keys(schema: DictConfig, full_key: str, object_type: Any = None) -> list[str]:
    """Keys the schema accepts where ``full_key`` was given (``a.b.c`` -> keys of ``a.b``)."""
    if dataclasses.is_dataclass(object_type):
        # Known exactly for dataclass nodes, including list items whose full_key is partial.
        return sorted(f.name for f in dataclasses.fields(object_type))
    node: Any = schema
    for part in str(full_key).split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(error: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(error, "full_key", None) or "?"
    if isinstance(error, ConfigKeyError):
        valid = ", ".join(_valid_keys(schema, key, getattr(error, "object_type", None)))
        return ConfigError(f"{origin}: unknown config key '{key}'; valid keys there: {valid}")
    if isinstance(error, ValidationError):
        reason = str(error).splitlines()[0]
        return ConfigError(f"{origin}: bad value for config key '{key}': {reason}")
    return ConfigError(f"{origin}: invalid config at '{key}': {str(error).splitlines()[0]}")


def _check_choices(cfg: TrainConfig) -> None:
    choices = [
        ("stage", cfg.stage, STAGES),
        ("deepspeed.precision", cfg.deepspeed.precision, PRECISIONS),
        ("deepspeed.zero_stage", cfg.deepspeed.zero_stage, (0, 1, 2, 3)),
        ("contrastive.loss", cfg.contrastive.loss, CONTRASTIVE_LOSSES),
        ("contrastive.vision.kind", cfg.contrastive.vision.kind, ("clip", "siglip")),
    ]
    for key, value, valid in choices:
        if value not in valid:
            raise ConfigError(f"config key '{key}' is {value!r}; valid values: {list(valid)}")
    positive = [("steps", cfg.steps),
                ("deepspeed.micro_batch_size", cfg.deepspeed.micro_batch_size),
                ("deepspeed.grad_accum", cfg.deepspeed.grad_accum),
                ("checkpoint.every", cfg.checkpoint.every),
                ("checkpoint.keep_last", cfg.checkpoint.keep_last)]
    for key, value in positive:
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a YAML file and ``key=value`` overrides (later wins).

    Raises :class:`ConfigError` naming the offending key and the valid keys or values.
    """
    schema = OmegaConf.structured(TrainConfig)
    merged = schema
    layers = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        layers.append((path, OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(("command-line override", OmegaConf.from_dotlist(list(overrides))))
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as error:
            raise _explain(error, schema, origin) from None
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _explain(error, schema, "config") from None
    _check_choices(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (what the run actually used)."""
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
