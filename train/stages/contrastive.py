"""Stage 2: contrastive (CLIP or SigLIP) training of a vision tower against a small text tower.

Exists because no pretrained vision tower can be downloaded offline; with a real CLIP/SigLIP
checkpoint, skip it. ``RUN/final`` holds the vision tower and its image processor only (the
text tower is a training aid), loadable with ``AutoModel``/``AutoImageProcessor``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from data_pipelines.loading import SourceConfig, build_loader
from flamingo_kit.backbones import pooled_features, require_local_dir, vision_width
from flamingo_kit.from_scratch import VISION_KINDS, vision_config
from flamingo_kit.from_scratch import image_processor as make_image_processor
from flamingo_kit.processing import add_flamingo_tokens
from train.config import ContrastiveStage, TrainConfig
from train.distributed import DistInfo
from train.hard_negatives import swap_one_word, word_group_token_ids
from train.losses import (
    CLIP_INIT_LOG_SCALE,
    SIGLIP_INIT_BIAS,
    SIGLIP_INIT_LOG_SCALE,
    clip_loss,
    siglip_loss,
)
from train.stages import Batch, StageParts, count_attended_tokens


class DualEncoder(nn.Module):
    """Vision tower + text tower projected into one embedding space; ``forward`` is the loss.

    Text embeddings mean-pool the caption tokens (the media tokens and padding are left out),
    which, unlike CLIP's "last EOS" pooling, does not depend on where the tokenizer puts EOS.
    """

    def __init__(self, vision: nn.Module, text: nn.Module, embed_dim: int, loss: str,
                 media_token_ids: tuple[int, int],
                 hard_negative_groups: list[list[int]] | None = None):
        super().__init__()
        self.hard_negative_groups = hard_negative_groups or []
        self.vision = vision
        self.text = text
        self.vision_proj = nn.Linear(vision_width(vision.config), embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.loss_name = loss
        init_scale = CLIP_INIT_LOG_SCALE if loss == "clip" else SIGLIP_INIT_LOG_SCALE
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views.
        self.log_scale = nn.Parameter(torch.tensor([init_scale]))
        self.bias = nn.Parameter(torch.tensor([SIGLIP_INIT_BIAS])) if loss == "siglip" else None
        self.register_buffer("media_token_ids", torch.tensor(media_token_ids), persistent=False)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, embed_dim]`` (pooled tower output, projected)."""
        return self.vision_proj(pooled_features(self.vision(pixel_values=pixel_values)))

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` -> ``[B, embed_dim]`` (mean of caption-token states, projected)."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = attention_mask.bool() & ~torch.isin(input_ids, self.media_token_ids)
        weights = keep.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.text_proj(pooled)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of a batch of matching (image, text) pairs.

        With ``hard_negative_groups``, each caption with a swappable word also enters once more
        with that word swapped (:func:`train.hard_negatives.swap_one_word`), as a negative.
        """
        images = self.encode_images(pixel_values)
        texts = self.encode_texts(input_ids, attention_mask)
        negatives = mask = None
        if self.hard_negative_groups:
            negative_ids, mask = swap_one_word(input_ids, self.hard_negative_groups)
            negatives = self.encode_texts(negative_ids, attention_mask)
        if self.loss_name == "clip":
            return clip_loss(images, texts, self.log_scale, negatives, mask)
        return siglip_loss(images, texts, self.log_scale, self.bias, negatives, mask)


def build_dual_encoder(stage: ContrastiveStage, vocab_size: int,
                       media_token_ids: tuple[int, int], pad_token_id: int,
                       hard_negative_groups: list[list[int]] | None = None) -> DualEncoder:
    """Randomly initialised vision tower (clip/siglip/bit) and CLIP text tower of the given shapes."""
    v = stage.vision
    vision = VISION_KINDS[v.kind](vision_config(
        v.kind, image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        num_layers=v.num_layers, num_heads=v.num_heads))
    t = stage.text
    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, intermediate_size=4 * t.hidden_size,
        max_position_embeddings=stage.max_length, projection_dim=stage.embed_dim,
        pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    text_config._attn_implementation = "sdpa"
    return DualEncoder(vision, CLIPTextModel(text_config), stage.embed_dim, stage.loss,
                       media_token_ids, hard_negative_groups)


def contrastive_loss(model, batch: Batch) -> torch.Tensor:
    """Loss of the batch's pairs: its single image per row against the row's caption."""
    return model(pixel_values=batch["pixel_values"][:, 0, 0], input_ids=batch["input_ids"],
                 attention_mask=batch["attention_mask"])


def build(cfg: TrainConfig, dist: DistInfo) -> StageParts:
    """Pair-shard loader, dual encoder, and an export of the vision tower + image processor."""
    stage = cfg.contrastive
    tokenizer = AutoTokenizer.from_pretrained(require_local_dir(stage.tokenizer,
                                                           "contrastive.tokenizer"))
    media_ids = tuple(add_flamingo_tokens(tokenizer))
    image_processor = make_image_processor(stage.vision.image_size)
    loader = build_loader(
        [SourceConfig(name="pairs", kind="pairs", shards=stage.shards,
                      allow_pipe=stage.allow_pipe, allow_remote=stage.allow_remote)], tokenizer,
        image_processor, batch_size=cfg.deepspeed.micro_batch_size, max_length=stage.max_length,
        max_images=1, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
        num_workers=stage.num_workers)
    groups = word_group_token_ids(tokenizer, stage.hard_negative_words)
    model = build_dual_encoder(stage, len(tokenizer), media_ids, tokenizer.pad_token_id, groups)

    def export(module: DualEncoder, directory: str) -> None:
        module.vision.save_pretrained(directory)
        image_processor.save_pretrained(directory)

    return StageParts(model=model, loader=loader, loss=contrastive_loss, export=export,
                      count_tokens=count_attended_tokens)
