"""Configuration of the parts that flamingo-kit adds around a frozen LM and vision tower."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MEDIA_POLICIES = ("immediate", "all_previous")
VISION_FEATURES = ("last_hidden_state", "post_layernorm")


@dataclass
class FlamingoConfig:
    """Shape and behaviour of the Perceiver Resampler and gated cross-attention.

    The defaults are flamingo-kit's architecture. A few fields exist only so that a real
    checkpoint format computes exactly what it computed where it was trained (OpenFlamingo:
    ``vision_drop_cls``, ``perceiver_output_proj=False``, ``perceiver_max_media=0``,
    ``perceiver_max_frames=0``, ``xattn_ff_all_tokens``; see ``flamingo_kit.convert``).

    ``lm_source`` / ``vision_source`` say where the frozen parts come from: in memory
    ``{"path": dir}`` for a local checkpoint or ``{"config": {...}}`` for a tower built from a
    config; in a saved ``config.json`` a verified record (path relative to the directory plus a
    fingerprint, see :mod:`flamingo_kit.part_records`). ``from_parts`` and ``save_pretrained`` fill
    them in; users do not set them by hand.
    """

    # Where cross-attention goes and what each text token may see.
    cross_attn_every_n_layers: int = 4
    media_policy: str = "immediate"
    # Perceiver Resampler: latents attend to [patch tokens ; latents].
    perceiver_num_latents: int = 64
    perceiver_depth: int = 6
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_ff_mult: int = 4
    # Media-position embeddings (images per sequence; 0: none). They tell a token that sees
    # several images (media_policy 'all_previous') which is which; under 'immediate' they only
    # make an image's latents depend on its place in the prompt (the shipped recipes use 0).
    perceiver_max_media: int = 64
    perceiver_max_frames: int = 8  # frame embeddings: frames per image/video; 0: none
    # >0: a trainable MLP (this width multiple) on every patch token before the resampler
    # attends, so features a frozen tower encodes nonlinearly per patch become poolable.
    perceiver_patch_ff_mult: int = 0
    # False: latents keep the vision width and cross-attention projects keys/values from it
    # (OpenFlamingo); True: latents are projected to the LM width.
    perceiver_output_proj: bool = True
    # Patch tokens from the vision tower: its ``last_hidden_state`` (for CLIP, before the final
    # LayerNorm) or that passed through the tower's ``post_layernorm`` (CLIP only). With
    # ``vision_drop_cls`` the class token is removed (OpenFlamingo uses patch tokens only).
    vision_features: str = "last_hidden_state"
    vision_drop_cls: bool = False
    # Gated cross-attention blocks (query width = LM hidden size).
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    # The gated feed-forward applies to tokens that have seen an image (False) or to every
    # token, including those before the first image and text-only prompts (True: OpenFlamingo).
    xattn_ff_all_tokens: bool = False
    # Media tokens; ``None`` means "resolved by from_parts" (processor ids or appended ids).
    image_token_id: int | None = None
    eoc_token_id: int | None = None
    # What trains. By default only the new parts do.
    freeze_lm: bool = True
    freeze_vision: bool = True
    lora: dict[str, Any] | None = None  # e.g. {"r": 8, "alpha": 16, "target_modules": [...]}
    # Rebuild recipes for the frozen parts (filled by from_parts).
    lm_source: dict[str, Any] = field(default_factory=dict)
    vision_source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.media_policy not in MEDIA_POLICIES:
            raise ValueError(
                f"media_policy must be one of {MEDIA_POLICIES}, got {self.media_policy!r}"
            )
        if self.vision_features not in VISION_FEATURES:
            raise ValueError(
                f"vision_features must be one of {VISION_FEATURES}, got {self.vision_features!r}"
            )
        for name in ("cross_attn_every_n_layers", "perceiver_num_latents", "perceiver_depth",
                     "perceiver_heads", "xattn_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("perceiver_max_media", "perceiver_max_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: no such embeddings), got "
                                 f"{getattr(self, name)}")
        if self.perceiver_patch_ff_mult < 0:
            raise ValueError("perceiver_patch_ff_mult must be >= 0 (0: no patch MLP), got "
                             f"{self.perceiver_patch_ff_mult}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlamingoConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FlamingoConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)
