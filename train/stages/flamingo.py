"""Stage 3: Flamingo training between a frozen LM and a frozen vision tower.

Trains the Perceiver Resampler, the gated cross-attention, the media-token rows (and LoRA when
``flamingo.model.lora`` is set) on a weighted mix of interleaved and pair sources, each with its
own loss weight. Batches are packed (``flamingo.packing``: several documents per row, exact)
when the LM keeps packed documents apart, which is measured at setup. ``flamingo.init_from``
continues from a saved model instead (e.g. a converted OpenFlamingo checkpoint). ``RUN/final``
loads with ``FlamingoModel.from_pretrained`` and ``FlamingoProcessor.from_pretrained``.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from data_pipelines.loading import SourceConfig, build_loader
from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoProcessor
from flamingo_kit.backbones import require_local_dir
from flamingo_kit.lm_integration import packing_problem
from train.config import FlamingoStage, TrainConfig
from train.distributed import DistInfo
from train.stages import Batch, StageParts, count_attended_tokens


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
    """Model and processor (new, or ``flamingo.init_from``), mixture loader, loss, export."""
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
    sources = [SourceConfig(name=s.name, kind=s.kind, shards=s.shards, weight=s.weight,
                            loss_weight=s.loss_weight, allow_pipe=s.allow_pipe,
                            allow_remote=s.allow_remote) for s in stage.sources]
    loader = build_loader(
        sources, processor.tokenizer, image_processor, batch_size=cfg.deepspeed.micro_batch_size,
        max_length=stage.max_length, max_images=stage.max_images, seed=cfg.seed, rank=dist.rank,
        world_size=dist.world_size, num_workers=stage.num_workers, pack=pack)

    def export(module: FlamingoModel, directory: str) -> None:
        module.save_pretrained(directory, self_contained=True)
        processor.save_pretrained(directory)

    return StageParts(model=model, loader=loader, loss=make_loss([s.loss_weight for s in sources]),
                      export=export, count_tokens=count_attended_tokens,
                      setup_info={"packing": packing})
