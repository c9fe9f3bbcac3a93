"""Training configuration: typed dataclasses merged from a YAML file and ``key=value`` overrides.

One schema covers the three stages; ``stage`` picks which section (``lm``, ``contrastive`` or
``flamingo``) is used. Every key is checked against the schema before any work starts, so a typo
or a wrong type fails in well under a second with the key's name and the keys that are valid
there. This module imports only omegaconf on purpose: heavy imports (torch, deepspeed) come after
the config is known to be good.

Resume rule: re-running a command whose ``run_dir`` holds a checkpoint continues that run, so
the config must be the one the run recorded in ``RUN/config.yaml``. Only the keys in
:data:`RESUMABLE_KEYS` may differ (how long to train, logging, checkpoint cadence, the
non-finite-loss limit); any other difference (learning rate or schedule, batch size, model,
data, seed, ...) refuses the resume with the list of differing keys, before anything is
loaded or written. ``config.yaml`` is rewritten only once a resume is accepted. A changed
``steps`` re-spreads the cosine decay over the new total from the resumed step on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from train.atomic import atomic_write_text

STAGES = ("lm", "contrastive", "flamingo")
PRECISIONS = ("fp32", "bf16")
CONTRASTIVE_LOSSES = ("clip", "siglip")
VISION_TOWER_KINDS = ("clip", "siglip", "bit")  # flamingo_kit.from_scratch.VISION_KINDS
CONFIG_FILE = "config.yaml"
# Keys (or whole sections) a resumed run may change; see the module docstring.
RESUMABLE_KEYS = ("steps", "max_nonfinite_losses", "logging", "checkpoint")


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
class ParamGroupRule:
    """Parameters whose name matches the regular expression ``match`` train at ``lr * lr_scale``."""

    match: str = ""
    lr_scale: float = 1.0


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
    # Per-parameter-group learning rates: a trainable parameter whose name matches ``match``
    # (a regular expression, ``re.search``) trains at ``lr * lr_scale``; the first rule that
    # matches wins. E.g. ``[{match: "_gate$", lr_scale: 10}]`` for the tanh gates.
    param_groups: list[ParamGroupRule] = field(default_factory=list)


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
    # Flamingo stage: measure how much the model uses its images (train.diagnostics) on
    # ``image_reliance_samples`` samples of ``flamingo.heldout_sources`` at step 1, every
    # ``image_reliance_every`` steps and at the last step; 0 turns it off. A warning is logged
    # when image reliance is still below ``image_reliance_warn_below`` nats/token at a
    # measurement on or after step ``image_reliance_warn_after``.
    image_reliance_every: int = 50
    image_reliance_samples: int = 32
    image_reliance_warn_after: int = 200
    image_reliance_warn_below: float = 0.02


@dataclass
class LMShape:
    """Knobs of ``flamingo_kit.from_scratch.lm_config`` (any family it knows)."""

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
    """Knobs of ``flamingo_kit.from_scratch.vision_config`` (``kind`` is clip, siglip or bit)."""

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

    shards: str = "data/synth/pairs"  # local paths; see SourceSettings for the opt-ins
    allow_pipe: bool = False
    allow_remote: bool = False
    tokenizer: str = "runs/lm/final"
    loss: str = "clip"
    embed_dim: int = 64
    max_length: int = 32
    num_workers: int = 0
    # Word groups for hard negatives (train.hard_negatives): every caption also enters the
    # image->text softmax with one word of a group swapped for another of the same group.
    hard_negative_words: list[list[str]] = field(default_factory=list)
    vision: VisionShape = field(default_factory=VisionShape)
    text: TextTowerShape = field(default_factory=TextTowerShape)


@dataclass
class WeightChange:
    """After ``step`` optimizer steps (``step >= 1``), the source is sampled with ``weight``."""

    step: int = 0
    weight: float = 1.0


@dataclass
class SourceSettings:
    """One training source; mirrors ``data_pipelines.loading.SourceConfig``.

    ``weight_schedule`` (optional) changes the sampling weight during training, e.g. image-text
    pairs alone first and then the mix: ``weight: 0`` on the documents with
    ``weight_schedule: [{step: 300, weight: 1.0}]``. Steps count optimizer steps.
    """

    name: str = "docs"
    kind: str = "interleaved"
    # Local paths: a directory of .tar, a brace pattern, a glob, or a list of these.
    shards: Any = "data/synth/interleaved"
    weight: float = 1.0
    loss_weight: float = 1.0
    # Opt-ins for shard strings that are not local paths: `pipe:CMD` runs CMD in a shell;
    # `http(s)://`, `s3://`, `gs://`, ... fetch over the network (webdataset's openers).
    allow_pipe: bool = False
    allow_remote: bool = False
    weight_schedule: list[WeightChange] = field(default_factory=list)


@dataclass
class FlamingoStage:
    """Stage 3: Flamingo training of new modules between a frozen LM and a frozen vision tower."""

    lm: str = "runs/lm/final"
    vision: str = "runs/contrastive/final"
    # Relative shard paths of ``sources`` and ``heldout_sources`` are taken relative to this
    # directory ("" = the working directory), so one override moves a recipe to other data.
    data_root: str = ""
    # Keyword arguments of ``flamingo_kit.FlamingoConfig``; checked against it at setup.
    model: dict[str, Any] = field(default_factory=dict)
    # A saved flamingo-kit model directory (save_pretrained, flamingo-convert) to continue
    # training from: it replaces lm, vision and model (which must then be empty).
    init_from: str | None = None
    max_length: int = 128
    max_images: int = 4
    # Several documents per row of max_length tokens (micro_batch_size rows per batch), each
    # computed exactly as if alone; used when the LM's attention keeps packed documents apart
    # (checked at setup: llama, mistral, qwen2, gemma, gpt2, gpt_neox, phi do; OPT and MPT in
    # transformers 5.x do not, and train unpacked with a warning).
    packing: bool = True
    num_workers: int = 0
    sources: list[SourceSettings] = field(default_factory=lambda: [SourceSettings()])
    # Data the run does not train on, for the image-reliance diagnostics (logging.image_*);
    # shards shared with ``sources`` are refused. ``flamingo-data synth`` writes these.
    heldout_sources: list[SourceSettings] = field(default_factory=lambda: [
        SourceSettings(name="pairs", kind="pairs", shards="data/synth/heldout/pairs"),
        SourceSettings(name="docs", kind="interleaved", shards="data/synth/heldout/interleaved"),
    ])


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
        ("contrastive.vision.kind", cfg.contrastive.vision.kind, VISION_TOWER_KINDS),
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
    _check_diagnostics(cfg)
    _check_sources(cfg.flamingo.sources, "flamingo.sources")
    _check_sources(cfg.flamingo.heldout_sources, "flamingo.heldout_sources")
    for i, rule in enumerate(cfg.optim.param_groups):
        key = f"optim.param_groups[{i}]"
        try:
            re.compile(rule.match)
        except re.error as error:
            raise ConfigError(f"config key '{key}.match' is not a regular expression: "
                              f"{rule.match!r} ({error})") from None
        if not rule.lr_scale > 0:
            raise ConfigError(f"config key '{key}.lr_scale' must be > 0, got {rule.lr_scale}")


def _check_diagnostics(cfg: TrainConfig) -> None:
    log = cfg.logging
    if log.image_reliance_every < 0:
        raise ConfigError("config key 'logging.image_reliance_every' must be >= 0 (0 turns the "
                          f"image-reliance diagnostics off), got {log.image_reliance_every}")
    if log.image_reliance_samples < 2:
        raise ConfigError("config key 'logging.image_reliance_samples' must be >= 2 (images "
                          f"are permuted across samples), got {log.image_reliance_samples}")
    if cfg.stage == "flamingo" and log.image_reliance_every and not cfg.flamingo.heldout_sources:
        raise ConfigError(
            "config key 'flamingo.heldout_sources' is empty but logging.image_reliance_every="
            f"{log.image_reliance_every}: name held-out shards the run does not train on "
            "(flamingo-data synth writes DIR/heldout/{pairs,interleaved}), or set "
            "logging.image_reliance_every=0 to turn the image-reliance diagnostics off")


def _check_sources(sources: list[SourceSettings], key: str) -> None:
    """Weights >= 0, schedules in increasing steps, never every source at weight 0."""
    changes = sorted({c.step for s in sources for c in s.weight_schedule} | {0})
    for i, source in enumerate(sources):
        steps = [c.step for c in source.weight_schedule]
        weights = [source.weight] + [c.weight for c in source.weight_schedule]
        if min(weights) < 0:
            raise ConfigError(f"config key '{key}[{i}]' ({source.name}): weights must be >= 0, "
                              f"got {weights}")
        if steps != sorted(set(steps)) or (steps and steps[0] < 1):
            raise ConfigError(f"config key '{key}[{i}].weight_schedule' ({source.name}): steps "
                              f"must be >= 1 and strictly increasing, got {steps}")
    for step in changes:
        weights = [([s.weight] + [c.weight for c in s.weight_schedule if c.step <= step])[-1]
                   for s in sources]
        if sources and not any(w > 0 for w in weights):
            raise ConfigError(f"config key '{key}': every source has weight 0 at step {step}; "
                              "give at least one source a positive weight there")


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
        try:  # omegaconf's loader is yaml.SafeLoader: tags that build Python objects are refused
            layers.append((path, OmegaConf.load(path)))
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not a readable YAML config: "
                              f"{str(error).splitlines()[0]}") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        for override in overrides:
            try:
                layers.append((f"override {override!r}", OmegaConf.from_dotlist([override])))
            except yaml.YAMLError as error:
                raise ConfigError(f"override {override}: the value is not valid YAML "
                                  f"({str(error).splitlines()[0]}; quote strings holding "
                                  "backslashes with single quotes)") from None
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
    """Write the resolved config as YAML (what the run actually used), atomically."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every setting that differs.

    The sections of stages that neither config runs are left out (they change nothing).
    """
    unused = set(STAGES) - {old.stage, new.stage}
    flat_old, flat_new = (_flatten(OmegaConf.to_container(OmegaConf.structured(c)))
                          for c in (old, new))
    missing = object()
    changes = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if key.split(".")[0] in unused:
            continue
        before, after = flat_old.get(key, missing), flat_new.get(key, missing)
        if before != after:
            changes[key] = (None if before is missing else before,
                            None if after is missing else after)
    return changes


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)


def resume_conflicts(recorded: TrainConfig, current: TrainConfig) -> list[str]:
    """Keys that differ between a run's recorded config and ``current`` and may not change."""
    return [key for key in config_changes(recorded, current) if not _resumable(key)]


def check_resume(cfg: TrainConfig, recorded_path: str) -> dict[str, tuple[Any, Any]]:
    """Accept resuming the run recorded at ``recorded_path`` with ``cfg``, or raise ConfigError.

    Returns the allowed changes (``steps``, logging, ...) so they can be logged.
    """
    how = (f"resume with the recorded values, start a new run_dir, or set "
           f"checkpoint.resume=false to start {cfg.run_dir} over")
    if not os.path.isfile(recorded_path):
        raise ConfigError(f"{cfg.run_dir} holds checkpoints but no {CONFIG_FILE}, so the resume "
                          f"cannot be checked; {how}")
    try:
        recorded = load_config(recorded_path)
    except ConfigError as error:
        raise ConfigError(f"the run's recorded config cannot be read: {error}; {how}") from None
    changes = config_changes(recorded, cfg)
    conflicts = [key for key in changes if not _resumable(key)]
    if conflicts:
        listed = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in conflicts)
        raise ConfigError(
            f"{cfg.run_dir} holds a run recorded with different settings ({recorded_path}): "
            f"{listed}. A resume continues the recorded run; only {', '.join(RESUMABLE_KEYS)} "
            f"may change. To train with the new settings, {how}"
        )
    return changes
