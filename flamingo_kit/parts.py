"""Load or rebuild the frozen parts (LM and vision tower) and describe how to rebuild them.

A part passed as a module built from a config has no checkpoint to point at; its recipe is
``{"config": {...}}`` and ``save_pretrained`` writes its weights next to the model. A part
loaded from a local directory is recorded as ``{"path": dir}``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING


def _source_of(model: PreTrainedModel) -> dict[str, Any]:
    path = getattr(model, "name_or_path", "") or ""
    if path and os.path.isdir(path):
        return {"path": os.path.abspath(path)}
    return {"config": model.config.to_dict()}


def _config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def load_lm(
    lm: nn.Module | str | os.PathLike | dict, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A causal LM from a module, a local directory or a recipe; plus its recipe."""
    if isinstance(lm, dict):
        if "path" in lm:
            return load_lm(lm["path"], dtype)
        model = AutoModelForCausalLM.from_config(_config_from_dict(lm["config"]))
        return (model.to(dtype) if dtype else model), dict(lm)
    if isinstance(lm, (str, os.PathLike)):
        path = _require_dir(lm, "lm")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, {"path": os.path.abspath(path)}
    if not isinstance(lm, PreTrainedModel) or not hasattr(lm, "get_output_embeddings"):
        raise TypeError(f"lm must be a Hugging Face causal LM or a local path, got {type(lm)}")
    return lm, _source_of(lm)


def _vision_class(config: PretrainedConfig):
    """The vision-tower class for a vision config or a composite (e.g. full CLIP) config."""
    vision_config = getattr(config, "vision_config", None) or config
    try:
        return MODEL_MAPPING[type(vision_config)]
    except KeyError:
        raise ValueError(f"no vision model class known for {type(vision_config).__name__}") from None


def load_vision(
    vision: nn.Module | str | os.PathLike | dict, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A vision tower (e.g. CLIPVisionModel, SiglipVisionModel) and its recipe.

    A directory holding a full two-tower checkpoint (CLIP, SigLIP) yields its vision tower.
    """
    if isinstance(vision, dict):
        if "path" in vision:
            return load_vision(vision["path"], dtype)
        config = _config_from_dict(vision["config"])
        model = AutoModel.from_config(config)
        return (model.to(dtype) if dtype else model), dict(vision)
    if isinstance(vision, (str, os.PathLike)):
        path = _require_dir(vision, "vision")
        cls = _vision_class(AutoConfig.from_pretrained(path))
        return cls.from_pretrained(path, dtype=dtype), {"path": os.path.abspath(path)}
    if not isinstance(vision, PreTrainedModel):
        raise TypeError(f"vision must be a Hugging Face vision model or a local path, got {type(vision)}")
    return vision, _source_of(vision)


def _require_dir(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what}: {path!r} is not a local directory (weights cannot be downloaded here; "
            "pass a directory written by save_pretrained)"
        )
    return path


class VisionEncoder(nn.Module):
    """Frozen-by-default vision tower: ``[M, F, C, H, W]`` images -> ``[M, F, P, D]`` patches.

    ``features="last_hidden_state"`` takes the tower's output as is (for CLIP: before its final
    LayerNorm, for SigLIP: after it); ``"post_layernorm"`` passes a CLIP tower's output through
    its ``post_layernorm`` (what open_clip >= 2.23 returns as tokens). ``drop_cls`` removes the
    class token (OpenFlamingo resamples patch tokens only).
    """

    def __init__(self, tower: PreTrainedModel, features: str = "last_hidden_state",
                 drop_cls: bool = False):
        super().__init__()
        self.tower = tower
        config = getattr(tower.config, "vision_config", None) or tower.config
        self.hidden_size = config.hidden_size
        self.features, self.drop_cls = features, drop_cls
        body = getattr(tower, "vision_model", tower)
        if features == "post_layernorm" and not (
            config.model_type.startswith("clip") and hasattr(body, "post_layernorm")
        ):
            raise ValueError(
                f"vision_features='post_layernorm' needs a CLIP tower (its last_hidden_state is "
                f"taken before post_layernorm); got {type(tower).__name__}"
            )
        if drop_cls and not hasattr(getattr(body, "embeddings", None), "class_embedding"):
            raise ValueError(f"vision_drop_cls=True but {type(tower).__name__} has no class token")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of every frame (no gradient when the tower is frozen)."""
        m, f = images.shape[:2]
        trainable = any(p.requires_grad for p in self.tower.parameters())
        dtype = next(self.tower.parameters()).dtype
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            out = self.tower(pixel_values=images.flatten(0, 1).to(dtype)).last_hidden_state
            if self.features == "post_layernorm":
                out = getattr(self.tower, "vision_model", self.tower).post_layernorm(out)
        if self.drop_cls:
            out = out[:, 1:]
        return out.unflatten(0, (m, f))
