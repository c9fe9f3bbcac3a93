"""LMs, vision towers and Flamingo models built from a config, with random weights.

The training stages build their text-only LM (stage a) and contrastive vision tower (stage b)
from these configs, since no pretrained weights can be downloaded offline; tests, the evaluation
toy and the benchmarks build their small models with the same functions, so every part of the
toolkit can be exercised without a checkpoint. ``lm_config`` speaks one vocabulary of
size/depth knobs across LM families, so the same test runs on all of them; ``build_flamingo``
joins two such parts with the small sizes of :data:`TINY_FLAMINGO`, and ``open_gates`` makes
its cross-attention count, as it does once trained. ``seed_everything`` is the one seeding of
Python, numpy and torch (the trainer's and the benchmarks').
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    BitConfig,
    BitModel,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from flamingo_kit.config import FlamingoConfig
from flamingo_kit.modeling import FlamingoModel

LM_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gpt2", "opt", "gpt_neox", "phi", "mpt")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices), so weights, dropout and data order repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lm_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
) -> PretrainedConfig:
    """A decoder-only LM config of ``family`` with the given shape (sdpa attention where the
    family has it)."""
    ffn = intermediate_size or 4 * hidden_size
    if family == "gpt2":
        kw = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=ffn,
                  n_positions=max_positions)
    elif family == "mpt":
        kw = dict(d_model=hidden_size, n_layers=num_layers, n_heads=num_heads,
                  expansion_ratio=ffn // hidden_size, max_seq_len=max_positions)
    elif family == "opt":
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, ffn_dim=ffn, word_embed_proj_dim=hidden_size,
                  max_position_embeddings=max_positions)
    else:
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, intermediate_size=ffn,
                  max_position_embeddings=max_positions)
        if family in ("llama", "mistral", "qwen2", "gemma"):
            kw["num_key_value_heads"] = max(1, num_heads // 2)
        if family == "gemma":
            kw["head_dim"] = hidden_size // num_heads
    if family not in LM_FAMILIES:
        raise ValueError(f"unknown LM family {family!r}; known: {', '.join(LM_FAMILIES)}")
    # Ids 1/2 are BOS/EOS of the tokenizers trained by data_pipelines.tokenizer.
    config = AutoConfig.for_model(
        family, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, **kw
    )
    config._attn_implementation = "eager" if family == "mpt" else "sdpa"  # MPT has no sdpa path
    return config


def build_lm(family: str = "llama", seed: int = 0, **shape) -> PreTrainedModel:
    """A randomly initialised causal LM (eval mode, fp32) from :func:`lm_config`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm_config(family, **shape))
    return model.eval()


VISION_KINDS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "bit": BitModel}


def vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8,
                  hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4) -> PretrainedConfig:
    """A vision-tower config of the given shape: a CLIP or SigLIP ViT, or a BiT convnet.

    ``bit`` is a pre-activation ResNet with group norm and weight-standardised convolutions
    (no batch norm, so it behaves the same frozen as in training, like Flamingo's NFNet):
    ``num_layers`` residual stages of one block each, widths doubling up to ``hidden_size``;
    its patch tokens are the cells of the last feature map, ``image_size / (4 * 2**(num_layers
    - 1))`` on a side. ``patch_size`` and ``num_heads`` apply to the ViTs only.
    """
    if kind == "bit":
        widths = [max(8, hidden_size >> (num_layers - 1 - i)) for i in range(num_layers)]
        return BitConfig(embedding_size=widths[0], hidden_sizes=widths, depths=[1] * num_layers,
                         layer_type="preactivation", num_groups=math.gcd(8, *widths),
                         global_padding="SAME")
    kw = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
              num_hidden_layers=num_layers, num_attention_heads=num_heads,
              intermediate_size=4 * hidden_size)
    if kind == "clip":
        config = CLIPVisionConfig(**kw)
    elif kind == "siglip":
        config = SiglipVisionConfig(**kw)
    else:
        raise ValueError(f"unknown vision kind {kind!r}; known: {', '.join(VISION_KINDS)}")
    config._attn_implementation = "sdpa"
    return config


def build_vision(kind: str = "clip", seed: int = 0, **shape) -> PreTrainedModel:
    """A randomly initialised vision tower (eval mode) of ``kind`` from :func:`vision_config`."""
    config = vision_config(kind, **shape)
    torch.manual_seed(seed)
    return VISION_KINDS[kind](config).eval()


def image_processor(image_size: int = 32) -> CLIPImageProcessorPil:
    """A PIL-based image processor that resizes/crops to ``image_size`` with CLIP statistics."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


# Flamingo sizes of the small models of tests, the evaluation toy and smoke runs: small enough to
# run anywhere, large enough to exercise multi-head and multi-latent code.
TINY_FLAMINGO = dict(
    cross_attn_every_n_layers=1,
    perceiver_num_latents=8,
    perceiver_depth=1,
    perceiver_heads=2,
    perceiver_dim_head=16,
    xattn_heads=2,
    xattn_dim_head=16,
)
# Names of the tanh gates of flamingo-kit's gated cross-attention blocks.
GATES = ("attn_gate", "ff_gate")


def build_flamingo(lm: PreTrainedModel | str, vision: PreTrainedModel | str, seed: int = 0,
                   processor=None, **config) -> FlamingoModel:
    """A FlamingoModel joining ``lm`` and ``vision`` with :data:`TINY_FLAMINGO` sizes.

    ``config`` overrides any :class:`~flamingo_kit.FlamingoConfig` field; the new parts
    (resampler, cross-attention, media-token rows) are initialised from ``seed``. With
    ``processor`` the media-token ids are the ones its tokenizer assigned.
    """
    torch.manual_seed(seed)
    config = FlamingoConfig(**{**TINY_FLAMINGO, **config})
    return FlamingoModel.from_parts(lm, vision, config, processor=processor)


@torch.no_grad()
def open_gates(model: torch.nn.Module, value: float = 1.0, names: tuple[str, ...] = GATES) -> None:
    """Set every gate parameter named in ``names`` to ``value``.

    Gates start at 0, where images change nothing; open, they let checks and timings see what a
    trained model does with its images.
    """
    for name, param in model.named_parameters():
        if name.endswith(names):
            param.fill_(value)
