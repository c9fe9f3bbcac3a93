"""Configuration of the parts that flamingo-kit adds around a frozen LM and vision tower."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MEDIA_POLICIES = ("immediate", "all_previous")


@dataclass
class FlamingoConfig:
    """Shape and behaviour of the Perceiver Resampler and gated cross-attention.

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
    perceiver_max_media: int = 64  # media-position embeddings: images per sequence
    perceiver_max_frames: int = 8  # frame embeddings: frames per image/video
    # >0: a trainable MLP (this width multiple) on every patch token before the resampler
    # attends, so features a frozen tower encodes nonlinearly per patch become poolable.
    perceiver_patch_ff_mult: int = 0
    # Gated cross-attention blocks (query width = LM hidden size).
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
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
        for name in ("cross_attn_every_n_layers", "perceiver_num_latents", "perceiver_depth",
                     "perceiver_heads", "xattn_heads", "perceiver_max_media",
                     "perceiver_max_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
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
