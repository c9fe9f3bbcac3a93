"""Stage 3: Flamingo training between a frozen LM and a frozen vision tower.

Trains the Perceiver Resampler, the gated cross-attention, the media-token rows (and LoRA when
``flamingo.model.lora`` is set) on a weighted mix of interleaved and pair sources, each with its
own loss weight and optional weight schedule. Batches are packed (``flamingo.packing``: several
documents per row, exact) when the LM keeps packed documents apart, which is measured at setup.
``flamingo.init_from`` continues from a saved model instead (e.g. a converted OpenFlamingo
checkpoint). With ``logging.image_reliance_every`` it also measures how much the model uses its
images on ``flamingo.heldout_sources`` (``train.diagnostics``). ``RUN/final`` loads with
``FlamingoModel.from_pretrained`` and ``FlamingoProcessor.from_pretrained``.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.shard_access import shard_kind
from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoProcessor
from flamingo_kit.backbones import require_local_dir
from flamingo_kit.lm_integration import packing_problem
from train import diagnostics
from train.config import FlamingoStage, SourceSettings, TrainConfig
from train.distributed import DistInfo
from train.stages import Batch, StageParts, count_attended_tokens, float_dtype, to_device


def make_loss(loss_weights: list[float]):
    """Batch -> cross-entropy where each token counts with its source's loss weight.

    A packed batch (it has ``position_ids``) goes to the model without its attention mask,
    which is how the model tells documents apart; its ``source_index`` is per token.
    """
    weights = torch.tensor(loss_weights, dtype=torch.float32)
    on_device: dict[torch.device, torch.Tensor] = {}

    def flamingo_loss(model, batch: Batch) -> torch.Tensor:
        device = batch["input_ids"].device
        if device not in on_device:
            on_device[device] = weights.to(device)
        packed = "position_ids" in batch
        out = model(input_ids=batch["input_ids"],
                    attention_mask=None if packed else batch["attention_mask"],
                    position_ids=batch.get("position_ids"), pixel_values=batch["pixel_values"],
                    labels=batch["labels"], loss_weights=on_device[device][batch["source_index"]])
        return out.loss

    return flamingo_loss


def under_root(shards, root: str):
    """Shard spec(s) with relative local paths taken relative to ``root`` (URLs, ``pipe:``
    commands and ``file:`` URLs are left as they are)."""
    if not isinstance(shards, str):
        return [under_root(spec, root) for spec in shards]
    return os.path.join(root, shards) if shard_kind(shards) == "local" and ":" not in shards \
        else shards


def source_configs(settings: list[SourceSettings], root: str = "", grad_accum: int = 1
                   ) -> list[SourceConfig]:
    """Loader sources; weight schedules turn from optimizer steps into batches."""
    return [SourceConfig(name=s.name, kind=s.kind, shards=under_root(s.shards, root),
                         weight=s.weight, loss_weight=s.loss_weight, allow_pipe=s.allow_pipe,
                         allow_remote=s.allow_remote,
                         weight_schedule=[(c.step * grad_accum, c.weight)
                                          for c in s.weight_schedule])
            for s in settings]


def check_heldout(train: list[SourceConfig], heldout: list[SourceConfig]) -> None:
    """Refuse held-out shards that are also training shards: they would not be held out."""
    used = {os.path.realpath(p) for s in train for p in s.shard_paths}
    shared = sorted(p for s in heldout for p in s.shard_paths if os.path.realpath(p) in used)
    if shared:
        raise ValueError(f"flamingo.heldout_sources share shards with flamingo.sources: "
                         f"{shared[:3]}; image reliance must be measured on data the run does "
                         "not train on")


def make_diagnose(cfg: TrainConfig, sources: list[SourceConfig], processor, image_processor):
    """``engine -> numbers`` on a fixed held-out batch, or ``None`` when turned off."""
    if not cfg.logging.image_reliance_every:
        return None
    heldout = source_configs(cfg.flamingo.heldout_sources, cfg.flamingo.data_root)
    check_heldout(sources, heldout)
    data = diagnostics.load_heldout(
        heldout, processor.tokenizer, image_processor, cfg.logging.image_reliance_samples,
        batch_size=cfg.deepspeed.micro_batch_size, max_length=cfg.flamingo.max_length,
        max_images=cfg.flamingo.max_images, seed=cfg.seed)

    def diagnose(engine) -> dict[str, float]:
        gather = None
        if cfg.deepspeed.zero_stage == 3:
            import deepspeed

            def gather(params):
                return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        dtype = float_dtype(cfg.deepspeed.precision)
        moved = diagnostics.HeldOutData([to_device(b, engine.device, dtype) for b in data.batches],
                                        data.source_names)
        return diagnostics.diagnose(engine, engine.module, moved, gather)

    return diagnose


def use_packing(stage: FlamingoStage, model: FlamingoModel) -> tuple[bool, str]:
    """Whether batches are packed, and why (logged): ``flamingo.packing`` and the LM's check."""
    if not stage.packing:
        return False, "off (flamingo.packing=false)"
    problem = packing_problem(model.lm)
    if problem is None:
        return True, "on"
    warnings.warn(f"flamingo.packing: {problem}, so batches are not packed (one document per "
                  "row); set flamingo.packing=false to silence this", stacklevel=2)
    return False, f"off ({problem})"


def build_model(stage: FlamingoStage) -> tuple[FlamingoModel, FlamingoProcessor]:
    """A new model from the LM/vision dirs, or the saved model ``stage.init_from``."""
    if stage.init_from:
        if stage.model:
            raise ValueError(
                f"flamingo.init_from={stage.init_from} brings its own architecture "
                f"(its config.json); flamingo.model must be empty, got keys "
                f"{sorted(stage.model)} (override it with 'flamingo.model={{}}')")
        init_dir = require_local_dir(stage.init_from, "flamingo.init_from", "config.json")
        processor = FlamingoProcessor.from_pretrained(
            init_dir, max_images=stage.max_images, max_length=stage.max_length)
        return FlamingoModel.from_pretrained(init_dir), processor
    # Local directories only, checked before any loader sees the name: a bare name such as
    # `gpt2` would otherwise be looked up on a model hub.
    lm_dir = require_local_dir(stage.lm, "flamingo.lm", "config.json")
    vision_dir = require_local_dir(stage.vision, "flamingo.vision", "config.json")
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    # The PIL processors work without torchvision; the fast ones do not.
    image_processor = AutoImageProcessor.from_pretrained(vision_dir, backend="pil")
    processor = FlamingoProcessor(tokenizer, image_processor, max_images=stage.max_images,
                                  max_length=stage.max_length)
    try:
        model_config = FlamingoConfig.from_dict(dict(stage.model))
    except (TypeError, ValueError) as error:
        raise ValueError(f"flamingo.model: {error}") from None
    model = FlamingoModel.from_parts(lm=lm_dir, vision=vision_dir, config=model_config,
                                     processor=processor)
    return model, processor


def build(cfg: TrainConfig, dist: DistInfo) -> StageParts:
    """Model and processor (new, or ``flamingo.init_from``), mixture loader, loss, export and
    image-reliance diagnostics."""
    stage = cfg.flamingo
    if not stage.sources:
        raise ValueError("flamingo.sources is empty; give at least one source "
                         "(name, kind: interleaved|pairs, shards, weight, loss_weight)")
    model, processor = build_model(stage)
    image_processor = processor.image_processor
    # Every id the data can hold embeds: so training steps need not check ids (a host sync).
    model.media_tokens.embedding.check_vocabulary(len(processor.tokenizer),
                                                  model.lm.get_input_embeddings())
    pack, packing = use_packing(stage, model)
    sources = source_configs(stage.sources, stage.data_root, cfg.deepspeed.grad_accum)
    loader = build_loader(
        sources, processor.tokenizer, image_processor, batch_size=cfg.deepspeed.micro_batch_size,
        max_length=stage.max_length, max_images=stage.max_images, seed=cfg.seed, rank=dist.rank,
        world_size=dist.world_size, num_workers=stage.num_workers, pack=pack)

    def export(module: FlamingoModel, directory: str) -> None:
        module.save_pretrained(directory, self_contained=True)
        processor.save_pretrained(directory)

    return StageParts(model=model, loader=loader, loss=make_loss([s.loss_weight for s in sources]),
                      export=export, count_tokens=count_attended_tokens,
                      setup_info={"packing": packing},
                      diagnose=make_diagnose(cfg, sources, processor, image_processor))
