"""The frozen backbones, LM and vision tower: load them from modules or local directories, safely.

In memory a part's source is ``{"path": dir}`` (loaded from a local directory) or
``{"config": {...}}`` (a module built from a config). Loading never executes code: no remote
code, no hub look-ups, ``weights_only`` for ``.bin`` files, and safetensors only where asked
(parts written inside a saved directory). What ``save_pretrained`` records about a part, and how
``from_pretrained`` finds and verifies it, is in :mod:`flamingo_kit.part_records`.

Reading order: ``load_lm``, ``load_vision``, ``VisionEncoder`` (the tower inside the model:
images -> patch tokens).
"""

from __future__ import annotations

import glob
import os
import pickle
from collections.abc import Callable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from flamingo_kit.lm_integration import FlamingoLayer


def _source_of(model: PreTrainedModel) -> dict[str, Any]:
    path = getattr(model, "name_or_path", "") or ""
    if path and os.path.isdir(path):
        return {"path": os.path.abspath(path)}
    return {"config": model.config.to_dict()}


def _config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _safe_load_kwargs(safetensors_only: bool) -> dict[str, Any]:
    """Keyword arguments for HF ``from_pretrained`` that keep loading local and code-free."""
    return {"local_files_only": True, "weights_only": True,
            "use_safetensors": True if safetensors_only else None}


def load_lm(
    lm: nn.Module | str | os.PathLike | dict,
    dtype: torch.dtype | None = None,
    safetensors_only: bool = False,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A causal LM from a module, a local directory or a source; plus its source.

    ``safetensors_only`` refuses ``.bin`` weights (used for parts a saved directory holds).
    """
    if isinstance(lm, dict):
        if "path" in lm:
            return load_lm(lm["path"], dtype, safetensors_only)
        model = AutoModelForCausalLM.from_config(_config_from_dict(lm["config"]))
        return (model.to(dtype) if dtype else model), dict(lm)
    if isinstance(lm, (str, os.PathLike)):
        path = require_local_dir(lm, "lm", "config.json")
        model = _load_checked("lm", path, lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, **_safe_load_kwargs(safetensors_only)))
        return model, {"path": os.path.abspath(path)}
    if not isinstance(lm, PreTrainedModel) or not hasattr(lm, "get_output_embeddings"):
        raise TypeError(f"lm must be a Hugging Face causal LM or a local path, got {type(lm)}")
    if any(isinstance(m, FlamingoLayer) for m in lm.modules()):
        raise ValueError("lm already carries cross-attention (it is part of a FlamingoModel); "
                         "pass the bare LM")
    return lm, _source_of(lm)


def _vision_class(config: PretrainedConfig):
    """The vision-tower class for a vision config or a composite (e.g. full CLIP) config."""
    vision_config = getattr(config, "vision_config", None) or config
    try:
        return MODEL_MAPPING[type(vision_config)]
    except KeyError:
        raise ValueError(f"no vision model class known for {type(vision_config).__name__}") from None


def load_vision(
    vision: nn.Module | str | os.PathLike | dict,
    dtype: torch.dtype | None = None,
    safetensors_only: bool = False,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """A vision tower (e.g. CLIPVisionModel, SiglipVisionModel) and its source.

    A directory holding a full two-tower checkpoint (CLIP, SigLIP) yields its vision tower.
    """
    if isinstance(vision, dict):
        if "path" in vision:
            return load_vision(vision["path"], dtype, safetensors_only)
        config = _config_from_dict(vision["config"])
        model = AutoModel.from_config(config)
        return (model.to(dtype) if dtype else model), dict(vision)
    if isinstance(vision, (str, os.PathLike)):
        path = require_local_dir(vision, "vision", "config.json")
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = _load_checked("vision", path, lambda: _vision_class(config).from_pretrained(
            path, dtype=dtype, **_safe_load_kwargs(safetensors_only)))
        return model, {"path": os.path.abspath(path)}
    if not isinstance(vision, PreTrainedModel):
        raise TypeError(f"vision must be a Hugging Face vision model or a local path, got {type(vision)}")
    return vision, _source_of(vision)


def require_local_dir(path: str | os.PathLike, what: str, required_file: str | None = None) -> str:
    """``path`` if it is a local directory (holding ``required_file``); else a clear error.

    Called before any Hugging Face loader sees the string, so a bare name such as ``gpt2`` is
    never looked up on a model hub. ``what`` names the argument or config key in the message.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what}: {path!r} is not a local directory (weights cannot be downloaded here; "
            "pass a directory written by save_pretrained)"
        )
    if required_file is not None and not os.path.isfile(os.path.join(path, required_file)):
        raise FileNotFoundError(f"{what}: {path!r} has no {required_file}; pass a directory "
                                "written by save_pretrained")
    return path


def _load_checked(what: str, path: str, load: Callable[[], PreTrainedModel]) -> PreTrainedModel:
    """Run an HF load; unreadable or code-carrying weight files become errors that name them."""
    try:
        return load()
    except pickle.UnpicklingError:
        files = ", ".join(sorted(glob.glob(os.path.join(path, "*.bin")))) or path
        raise ValueError(
            f"{what}: {files} holds objects other than tensors; they were not unpickled (loading "
            "never runs code from a file). Convert the weights to safetensors where you trust them."
        ) from None
    except SafetensorError as error:
        raise ValueError(f"{what}: {_unreadable_safetensors(path)} is not a readable safetensors "
                         f"file ({error})") from None


def _unreadable_safetensors(path: str) -> str:
    """The first safetensors file in ``path`` whose header does not parse (else ``path``)."""
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            return file
    return path


def lm_context_length(config: PretrainedConfig) -> int | None:
    """The LM's maximum sequence length from its (text) config, when it declares one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def has_class_token(tower: PreTrainedModel) -> bool:
    """Whether the tower's ``last_hidden_state`` starts with a class token (CLIP: yes, SigLIP: no)."""
    body = getattr(tower, "vision_model", tower)
    return hasattr(getattr(body, "embeddings", None), "class_embedding")


def vision_width(config: PretrainedConfig) -> int:
    """The channel width of a tower's patch tokens: ``hidden_size`` of a ViT (CLIP, SigLIP), the
    last stage's width of a convnet (BiT, ResNet, ConvNeXt); a composite config's vision part."""
    config = getattr(config, "vision_config", None) or config
    widths = getattr(config, "hidden_sizes", None)
    return int(widths[-1]) if widths else int(config.hidden_size)


def patch_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """A tower's ``last_hidden_state`` as tokens ``[B, P, D]``: a ViT's as is, a convnet's
    feature map ``[B, D, h, w]`` as its ``h * w`` cells in row-major order."""
    return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden


def pooled_features(output: Any) -> torch.Tensor:
    """A tower output's one vector per image ``[B, D]``: its ``pooler_output`` (a convnet's
    ``[B, D, 1, 1]`` flattened), else the mean of its patch tokens."""
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    return patch_tokens(output.last_hidden_state).mean(1)


class VisionEncoder(nn.Module):
    """Frozen-by-default vision tower: ``[M, F, C, H, W]`` images -> ``[M, F, P, D]`` patches.

    ``features="last_hidden_state"`` takes the tower's output as is (for CLIP: before its final
    LayerNorm, for SigLIP: after it); ``"post_layernorm"`` passes a CLIP tower's output through
    its ``post_layernorm`` (what open_clip >= 2.23 returns as tokens). ``drop_cls`` removes the
    class token (OpenFlamingo resamples patch tokens only). A convnet tower's patch tokens are
    the cells of its last feature map (:func:`patch_tokens`).
    """

    def __init__(self, tower: PreTrainedModel, features: str = "last_hidden_state",
                 drop_cls: bool = False):
        super().__init__()
        self.tower = tower
        config = getattr(tower.config, "vision_config", None) or tower.config
        self.hidden_size = vision_width(config)
        self.features, self.drop_cls = features, drop_cls
        body = getattr(tower, "vision_model", tower)
        if features == "post_layernorm" and not (
            config.model_type.startswith("clip") and hasattr(body, "post_layernorm")
        ):
            raise ValueError(
                f"vision_features='post_layernorm' needs a CLIP tower (its last_hidden_state is "
                f"taken before post_layernorm); got {type(tower).__name__}"
            )
        if drop_cls and not has_class_token(tower):
            raise ValueError(f"vision_drop_cls=True but {type(tower).__name__} has no class token")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of every frame (no gradient when the tower is frozen)."""
        m, f = images.shape[:2]
        trainable = any(p.requires_grad for p in self.tower.parameters())
        dtype = next(self.tower.parameters()).dtype
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            out = patch_tokens(self.tower(pixel_values=images.flatten(0, 1).to(dtype)).last_hidden_state)
            if self.features == "post_layernorm":
                out = getattr(self.tower, "vision_model", self.tower).post_layernorm(out)
        if self.drop_cls:
            out = out[:, 1:]
        return out.unflatten(0, (m, f))
