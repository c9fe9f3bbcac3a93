"""Stage 3: Flamingo training between a frozen LM and a frozen vision tower.

Trains the Perceiver Resampler, the gated cross-attention, the media-token rows (and LoRA when
``flamingo.model.lora`` is set) on a weighted mix of interleaved and pair sources, each with its
own loss weight. ``flamingo.init_from`` continues from a saved model instead (e.g. a converted
OpenFlamingo checkpoint). ``RUN/final`` loads with ``FlamingoModel.from_pretrained`` and
``FlamingoProcessor.from_pretrained``.
"""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from data_pipelines.loading import SourceConfig, build_loader
from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoProcessor
from flamingo_kit.backbones import require_local_dir
from train.config import FlamingoStage, TrainConfig
from train.distributed import DistInfo
from train.stages import Batch, StageParts, count_attended_tokens


def make_loss(loss_weights: list[float]):
    """Batch -> cross-entropy where each row counts with its source's loss weight."""
    weights = torch.tensor(loss_weights, dtype=torch.float32)

    def flamingo_loss(model, batch: Batch) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"],
                    loss_weights=weights.to(batch["input_ids"].device)[batch["source_index"]])
        return out.loss

    return flamingo_loss


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
    """Model and processor (new, or ``flamingo.init_from``), mixture loader, loss, export."""
    stage = cfg.flamingo
    if not stage.sources:
        raise ValueError("flamingo.sources is empty; give at least one source "
                         "(name, kind: interleaved|pairs, shards, weight, loss_weight)")
    model, processor = build_model(stage)
    image_processor = processor.image_processor
    sources = [SourceConfig(name=s.name, kind=s.kind, shards=s.shards, weight=s.weight,
                            loss_weight=s.loss_weight, allow_pipe=s.allow_pipe,
                            allow_remote=s.allow_remote) for s in stage.sources]
    loader = build_loader(
        sources, processor.tokenizer, image_processor, batch_size=cfg.deepspeed.micro_batch_size,
        max_length=stage.max_length, max_images=stage.max_images, seed=cfg.seed, rank=dist.rank,
        world_size=dist.world_size, num_workers=stage.num_workers)

    def export(module: FlamingoModel, directory: str) -> None:
        module.save_pretrained(directory, self_contained=True)
        processor.save_pretrained(directory)

    return StageParts(model=model, loader=loader, loss=make_loss([s.loss_weight for s in sources]),
                      export=export, count_tokens=count_attended_tokens)
