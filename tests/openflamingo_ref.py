"""OpenFlamingo's own code as a reference for the converter tests (open-flamingo 2.0.1).

The package's ``__init__`` imports open_clip, which needs torchvision (no CPU build exists), so
its modules are loaded from their files under a private package name: ``src/utils.py``,
``src/helpers.py``, ``src/flamingo_lm.py``, ``src/flamingo.py``, ``src/factory.py`` and
``train/train_utils.py``. Two imports are stood in for while they load:

- ``open_clip``: ``factory.create_model_and_transforms`` asks it for a CLIP model whose
  ``.visual`` returns ``(pooled, tokens)`` with ``output_tokens=True``, and for the vision width.
  The stand-in's ``.visual`` runs a Hugging Face ``CLIPVisionModel`` (the same network as
  open_clip's ViT: ``pre_layrnorm`` = ``ln_pre``, ``post_layernorm`` = ``ln_post``) and returns
  tokens as open_clip's ``VisionTransformer.forward`` does: the class token dropped, before
  ``ln_post`` in open_clip 2.16-2.22 (``transformer.py``: ``pooled, tokens =
  self._global_pool(x)`` then ``pooled = self.ln_post(pooled)``), after it from 2.23
  (``x = self.ln_post(x)`` before pooling, ``final_ln_after_pool=False``).
- ``wandb``: imported at the top of ``train_utils.py``, unused by the function we call.

Everything else is OpenFlamingo's code: its factory adds the tokens, resizes and wraps the LM,
builds the resampler and the gated cross-attention; its ``filter_state_dict_to_trainable``
decides what ``checkpoint.pt`` holds. One adaptation to transformers 5: ``generate`` drops an
all-ones ``attention_mask`` while ``FlamingoLMMixin.forward`` requires one positionally, so that
argument gets the default ``None`` (which the LM reads as "attend to every token", the same).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch
from torch import nn

PACKAGE = "_openflamingo_reference"
_MODULES = ("src.utils", "src.helpers", "src.flamingo_lm", "src.flamingo", "src.factory",
            "train.train_utils")


def openflamingo_root() -> str | None:
    """Directory of the installed open_flamingo package (not imported), or None."""
    spec = importlib.util.find_spec("open_flamingo")
    return None if spec is None else spec.submodule_search_locations[0]


class OpenClipVisual(nn.Module):
    """open_clip's ``VisionTransformer`` interface (``output_tokens=True``) over an HF CLIP tower."""

    def __init__(self, clip: nn.Module, ln_post_on_tokens: bool):
        super().__init__()
        self.clip, self.ln_post_on_tokens = clip, ln_post_on_tokens
        self.output_tokens = False  # the factory sets it to True

    def forward(self, pixels: torch.Tensor):
        x = self.clip(pixel_values=pixels).last_hidden_state  # after the last block, before ln_post
        post = getattr(self.clip, "vision_model", self.clip).post_layernorm
        if self.ln_post_on_tokens:  # open_clip >= 2.23
            x = post(x)
            pooled = x[:, 0]
        else:  # open_clip 2.16-2.22
            pooled = post(x[:, 0])
        tokens = x[:, 1:]
        return (pooled, tokens) if self.output_tokens else pooled


class _OpenClipStandIn(types.ModuleType):
    """The two functions of open_clip that OpenFlamingo's factory calls."""

    def __init__(self, clip: nn.Module, ln_post_on_tokens: bool):
        super().__init__("open_clip")
        self.clip, self.ln_post_on_tokens = clip, ln_post_on_tokens

    def create_model_and_transforms(self, name, pretrained=None, **kwargs):
        model = nn.Module()
        model.visual = OpenClipVisual(self.clip, self.ln_post_on_tokens)
        return model, None, None

    def get_model_config(self, name):
        return {"vision_cfg": {"width": self.clip.config.hidden_size}}


def load_openflamingo() -> dict[str, types.ModuleType]:
    """OpenFlamingo's modules by short name (``factory``, ``train_utils``, ...), loaded once."""
    if PACKAGE in sys.modules:
        return {name.split(".")[-1]: sys.modules[f"{PACKAGE}.{name}"] for name in _MODULES}
    root = openflamingo_root()
    saved = {name: sys.modules.get(name) for name in ("open_clip", "wandb")}
    sys.modules["open_clip"] = _OpenClipStandIn(None, False)
    sys.modules["wandb"] = types.ModuleType("wandb")
    try:
        for package, path in ((PACKAGE, root), (f"{PACKAGE}.src", f"{root}/src"),
                              (f"{PACKAGE}.train", f"{root}/train")):
            module = types.ModuleType(package)
            module.__path__ = [path]
            sys.modules[package] = module
        for name in _MODULES:
            spec = importlib.util.spec_from_file_location(
                f"{PACKAGE}.{name}", os.path.join(root, *name.split(".")) + ".py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    mixin = sys.modules[f"{PACKAGE}.src.flamingo_lm"].FlamingoLMMixin
    forward = mixin.forward

    def forward_with_optional_mask(self, input_ids, attention_mask=None, **kwargs):
        return forward(self, input_ids, attention_mask, **kwargs)

    mixin.forward = forward_with_optional_mask
    return load_openflamingo()


def build_openflamingo(lm_dir: str, clip: nn.Module, cross_attn_every_n_layers: int,
                       ln_post_on_tokens: bool = False):
    """OpenFlamingo's ``create_model_and_transforms`` on a local LM dir and an HF CLIP tower.

    Returns ``(model, tokenizer)``: the Flamingo model (frozen parts frozen, trainable parts as
    OpenFlamingo trains them) and the tokenizer with ``<|endofchunk|>``, ``<image>`` (and
    ``<PAD>``) added.
    """
    factory = load_openflamingo()["factory"]
    factory.open_clip = _OpenClipStandIn(clip, ln_post_on_tokens)
    model, _, tokenizer = factory.create_model_and_transforms(
        clip_vision_encoder_path="ViT-L-14", clip_vision_encoder_pretrained="openai",
        lang_encoder_path=lm_dir, tokenizer_path=lm_dir,
        cross_attn_every_n_layers=cross_attn_every_n_layers, use_local_files=True,
    )
    return model.eval(), tokenizer


def save_openflamingo_checkpoint(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Write ``checkpoint.pt`` as OpenFlamingo's training code filters it; return the dict."""
    train_utils = load_openflamingo()["train_utils"]
    state = train_utils.filter_state_dict_to_trainable(model, model.state_dict())
    torch.save(state, path)
    return state
