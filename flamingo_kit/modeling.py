"""FlamingoModel: a frozen decoder LM and vision tower joined by a resampler and cross-attention.

Reading order: ``from_parts`` (assembly), ``forward`` (encode images -> embed -> LM body with
media in scope -> logits from the LM head plus the media-token rows), then saving and loading.
Image encoding and media state live in ``media.py``, the media tokens' rows in
``media_tokens.py``, decoding (``generate``, ``prefill``) in ``generation.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from flamingo_kit.backbones import VisionEncoder, load_lm, load_vision
from flamingo_kit.batching import IGNORE_INDEX
from flamingo_kit.config import FlamingoConfig
from flamingo_kit.cross_attention import GatedCrossAttentionBlock
from flamingo_kit.generation import GenerationMixin
from flamingo_kit.lm_integration import (
    flamingo_layers,
    insert_cross_attention,
    lm_body,
    media_scope,
)
from flamingo_kit.loss import LossTargets
from flamingo_kit.media import (
    MediaState,
    PrefixState,
    continue_prefix,
    document_ids_from_positions,
    media_state,
)
from flamingo_kit.media_tokens import MediaTokens, media_token_ids
from flamingo_kit.part_records import load_recorded_part, record_part
from flamingo_kit.perceiver import PerceiverResampler

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# 3: media-token rows saved as ``media_tokens.*``; 2: frozen parts recorded with fingerprints,
# relative paths; 1: absolute paths only.
FORMAT_VERSION = 3
# Names of the media-token rows in model.safetensors before format_version 3.
LEGACY_KEYS = {"new_token_embeddings": "media_tokens.embedding.weight",
               "new_token_head": "media_tokens.head.weight",
               "new_token_head_bias": "media_tokens.head.bias"}


@dataclass
class FlamingoOutput(ModelOutput):
    """Output of :meth:`FlamingoModel.forward`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None


class FlamingoModel(GenerationMixin, nn.Module):
    """Flamingo-style vision-language model around any HF causal LM and vision tower.

    Build with :meth:`from_parts` or load with :meth:`from_pretrained`. ``model(**batch)`` takes
    the processor's output; ``pixel_values`` is ``[B, N_images, F, C, H, W]`` and image n of row
    b is used iff row b holds more than n ``<image>`` tokens (padding images are never encoded).
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, config: FlamingoConfig):
        super().__init__()
        self.config = config
        lm_body(lm)  # fails early for an LM without a separate body
        config.image_token_id, config.eoc_token_id = media_token_ids(
            lm, config.image_token_id, config.eoc_token_id)
        self.image_token_id, self.eoc_token_id = config.image_token_id, config.eoc_token_id
        lm_dim = lm.config.get_text_config().hidden_size
        if config.lora:
            lm = _inject_lora(lm, config.lora)
        # The trainable rows of <image> and <|endofchunk|> (embedding and head) beside the LM's.
        self.media_tokens = MediaTokens(lm, self.image_token_id, self.eoc_token_id)
        self.vision = VisionEncoder(vision, config.vision_features, config.vision_drop_cls)
        # Width of the latents that cross-attention reads keys/values from.
        media_dim = lm_dim if config.perceiver_output_proj else self.vision.hidden_size
        self.lm = lm
        self.perceiver = PerceiverResampler(
            dim=self.vision.hidden_size,
            out_dim=lm_dim if config.perceiver_output_proj else None,
            num_latents=config.perceiver_num_latents,
            depth=config.perceiver_depth,
            heads=config.perceiver_heads,
            dim_head=config.perceiver_dim_head,
            ff_mult=config.perceiver_ff_mult,
            max_media=config.perceiver_max_media,
            max_frames=config.perceiver_max_frames,
            patch_ff_mult=config.perceiver_patch_ff_mult,
        )
        insert_cross_attention(
            lm,
            lambda: GatedCrossAttentionBlock(
                lm_dim, media_dim, config.xattn_heads, config.xattn_dim_head,
                config.xattn_ff_mult, ff_all_tokens=config.xattn_ff_all_tokens,
            ),
            config.cross_attn_every_n_layers,
        )
        self._apply_freezing()

    # -- assembly ---------------------------------------------------------------------------

    @classmethod
    def from_parts(
        cls,
        lm: nn.Module | str | os.PathLike,
        vision: nn.Module | str | os.PathLike,
        config: FlamingoConfig | None = None,
        processor=None,
        dtype: torch.dtype | None = None,
    ) -> FlamingoModel:
        """Join an LM and a vision tower (modules or local directories).

        With ``processor`` (or a tokenizer) the media-token ids are the ones it assigned;
        otherwise they are appended after the LM's vocabulary.
        """
        config = FlamingoConfig.from_dict((config or FlamingoConfig()).to_dict())
        lm, config.lm_source = load_lm(lm, dtype)
        vision, config.vision_source = load_vision(vision, dtype)
        if processor is not None:
            tokenizer = getattr(processor, "tokenizer", processor)
            from flamingo_kit.processing import add_flamingo_tokens

            config.image_token_id, config.eoc_token_id = add_flamingo_tokens(tokenizer)
        return cls(lm, vision, config)

    def _apply_freezing(self) -> None:
        cfg = self.config
        self.lm.requires_grad_(not cfg.freeze_lm)
        self.vision.requires_grad_(not cfg.freeze_vision)
        for name, param in self.lm.named_parameters():
            if ".xattn." in name or (cfg.lora and "lora_" in name):
                param.requires_grad_(True)

    def train(self, mode: bool = True) -> FlamingoModel:
        """Like ``nn.Module.train`` but frozen towers stay in eval mode (no dropout).

        What trains inside a frozen LM follows ``mode``: the cross-attention blocks and the
        LoRA adapters' dropout (``lora={"dropout": p}``).
        """
        super().train(mode)
        if self.config.freeze_vision:
            self.vision.eval()
        if self.config.freeze_lm:
            self.lm.eval()
            for layer in flamingo_layers(self.lm):
                layer.xattn.train(mode)
            for module in self.lm.modules():
                lora_dropout = getattr(module, "lora_dropout", None)  # peft LoRA layers
                if isinstance(lora_dropout, nn.ModuleDict):
                    lora_dropout.train(mode)
        return self

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each cross-attention + decoder layer in backward to save memory."""
        for layer in flamingo_layers(self.lm):
            layer.activation_checkpointing = enabled

    def trainable_parameters(self):
        """Parameters the optimizer should update."""
        return (p for p in self.parameters() if p.requires_grad)

    def trainable_parameters_report(self) -> str:
        """A table of trainable / total parameter counts per part."""
        parts = {"vision tower": [], "perceiver": [], "cross-attention": [],
                 "new-token rows": [], "lm (incl. LoRA)": []}
        for name, p in self.named_parameters():
            if name.startswith("vision."):
                parts["vision tower"].append(p)
            elif name.startswith("perceiver."):
                parts["perceiver"].append(p)
            elif ".xattn." in name:
                parts["cross-attention"].append(p)
            elif name.startswith("media_tokens."):
                parts["new-token rows"].append(p)
            else:
                parts["lm (incl. LoRA)"].append(p)
        lines = [f"{'part':<18}{'trainable':>14}{'total':>14}"]
        for part, params in parts.items():
            trainable = sum(p.numel() for p in params if p.requires_grad)
            lines.append(f"{part:<18}{trainable:>14,}{sum(p.numel() for p in params):>14,}")
        return "\n".join(lines)

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        media: MediaState | None = None,
        prefix: PrefixState | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_weights: torch.Tensor | None = None,
        **lm_kwargs,
    ) -> FlamingoOutput:
        """Logits over the LM vocabulary plus the media tokens; or the loss, given ``labels``.

        With ``labels`` (``-100``: no loss) only the loss is computed (``flamingo_kit.loss``): the
        LM head runs on the supervised positions alone, in chunks, and ``logits`` is ``None``.
        ``loss_weights`` ``[B]`` or ``[B, T]`` weigh each row's (or label position's) tokens; the
        loss is normalised by the number of supervised tokens.

        Packed rows (several documents in one row, transformers' convention): pass
        ``position_ids`` that restart at 0 at every document and no ``attention_mask``. A token
        then attends only to earlier tokens of its own document, sees only its document's
        images (the first of them is its document's image 0 for the media-position embeddings),
        and tokens before a document's first image get nothing from cross-attention: each
        document is computed as if it were alone in its row. Packing needs an LM whose
        attention follows transformers' packed-sequence masks
        (:func:`~flamingo_kit.lm_integration.packing_problem` tells).

        ``media`` (from :func:`~flamingo_kit.media.media_state`, or a generation cache) replaces
        ``pixel_values``. With ``prefix`` (from :meth:`prefill`) each row continues the cached
        prefix: the logits are those of ``input_ids`` only, and rows may be right-padded (e.g. to
        score answers); ``labels`` then align with ``input_ids`` and the prefix's last logits
        score the first.
        ``logits_to_keep`` means what it means in transformers (``n``: the last n positions; 0:
        all). Other keyword arguments go to the LM's body.
        """
        if _checks_token_ids(self, input_ids):
            self.media_tokens.embedding.check_ids(input_ids, self.lm.get_input_embeddings())
        # Decisions that need the host (which positions are supervised, which token sees which
        # image) are taken first, before any heavy work is queued on an accelerator.
        targets = first = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}")
            if attention_mask is not None:  # padding carries no loss
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0,
                                            IGNORE_INDEX)
            targets = LossTargets.from_labels(labels, loss_weights)
            if prefix is not None:  # the prefix's last logits predict the input's first token
                first = _first_token_targets(labels, loss_weights)
        if prefix is not None:
            if past_key_values is not None or media is not None:
                raise ValueError("prefix replaces past_key_values and media; pass only one")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            past_key_values, attention_mask, media = continue_prefix(
                self, prefix, input_ids, attention_mask, pixel_values
            )
            use_cache = True
        elif media is None:  # encode the images: vision tower -> resampler, plus the layout
            packed = attention_mask is None and position_ids is not None and past_key_values is None
            documents = document_ids_from_positions(position_ids) if packed else None
            media = media_state(self, input_ids, pixel_values, document_ids=documents,
                                attention_mask=None if attention_mask is None
                                else attention_mask[:, -input_ids.shape[1]:])
        if position_ids is None and attention_mask is not None:
            # Positions count real tokens only, so left padding does not shift them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = position_ids[:, -input_ids.shape[1]:]
        # The LM's frozen table embeds its vocabulary, the media tokens' own rows embed them.
        embeds = self.media_tokens.embedding(input_ids, self.lm.get_input_embeddings())
        with media_scope(media):  # the cross-attention layers read the images from here
            out = lm_body(self.lm)(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **lm_kwargs,
            )
        hidden = out.last_hidden_state
        if targets is not None:
            loss = targets.per_token(hidden, self._head, self.media_tokens.head.vocab_size).sum()
            if first is not None:
                logits = prefix.logits[:, None].expand(input_ids.shape[0], 2, -1)
                loss = loss + first.per_token(logits).sum()
            count = targets.count + (first.count if first is not None else 0)
            return FlamingoOutput(loss=loss / max(count, 1), past_key_values=out.past_key_values)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self._head(hidden[:, keep])
        return FlamingoOutput(logits=logits, past_key_values=out.past_key_values)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits: the LM's frozen head scores its vocabulary; the media tokens' own head rows
        score ``<image>`` and ``<|endofchunk|>``."""
        return self.media_tokens.head(hidden, self.lm.get_output_embeddings())

    # -- saving and loading -----------------------------------------------------------------

    def _saved_keys(self) -> list[str]:
        """State-dict keys that ``save_pretrained`` writes: the parts that can train."""
        cfg = self.config

        def saved(key: str) -> bool:
            return (
                key.startswith(("perceiver.", "media_tokens."))
                or ".xattn." in key
                or (bool(cfg.lora) and "lora_" in key)
                or (not cfg.freeze_lm and key.startswith("lm."))
                or (not cfg.freeze_vision and key.startswith("vision."))
            )

        return [k for k in self.state_dict() if saved(k)]

    def save_pretrained(self, directory: str | os.PathLike, self_contained: bool = False) -> None:
        """Write ``config.json`` + ``model.safetensors`` (the trainable weights).

        ``config.json`` records each frozen part (LM, vision tower) with a fingerprint that
        :meth:`from_pretrained` verifies and its path relative to ``directory``. With
        ``self_contained=True`` the parts are written beside the model (``lm/`` without our
        wrappers and adapters, ``vision/``; plain HF checkpoints in safetensors), so the directory
        can be moved or copied to another machine and loads on its own. Parts built from a
        config (no directory to point at) are always written.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = FlamingoConfig.from_dict(self.config.to_dict())
        config.lm_source = self._part_record("lm", directory, self_contained)
        config.vision_source = self._part_record("vision", directory, self_contained)
        state = self.state_dict()
        tensors = {k: state[k].detach().cpu().contiguous().clone() for k in self._saved_keys()}
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"model_type": "flamingo_kit", "format_version": FORMAT_VERSION,
                       **config.to_dict()}, f, indent=2)

    def _part_record(self, kind: str, directory: str, self_contained: bool) -> dict[str, Any]:
        """The config.json record of frozen part ``kind`` ("lm" or "vision")."""
        if kind == "lm":
            part, source, trained = self.lm, self.config.lm_source, not self.config.freeze_lm
        else:
            part, source = self.vision.tower, self.config.vision_source
            trained = not self.config.freeze_vision
        return record_part(kind, part, source, trained, directory, self_contained)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        lm: nn.Module | str | os.PathLike | None = None,
        vision: nn.Module | str | os.PathLike | None = None,
        allow_different_parts: bool = False,
    ) -> FlamingoModel:
        """Rebuild from ``save_pretrained`` output; every saved key must match exactly.

        The frozen parts load from the paths ``config.json`` records (relative to ``directory``
        first, then where they were when saved), or from ``lm=`` / ``vision=`` (a local
        directory or a module). Each is checked against its recorded fingerprint (weights and
        config); a mismatch raises :class:`~flamingo_kit.part_records.PartMismatchError` naming the
        part, unless ``allow_different_parts=True`` (a deliberate swap; then it warns). Parts
        load in their recorded dtype (the fingerprint is of those bytes); ``dtype`` then casts
        the whole model. Directories of format_version 1 (no fingerprints) load with a warning;
        those of versions 1 and 2 name the media-token rows as in :data:`LEGACY_KEYS`.
        Nothing read here can execute code: JSON, safetensors, and HF loads without remote code.
        """
        directory = os.fspath(directory)
        config, version = _read_config(directory)
        verify = version >= 2
        if not verify:
            warnings.warn(
                f"{directory} was saved with format_version {version}, which records no "
                "fingerprints: its LM and vision tower are loaded without verification. Load "
                "it once and save_pretrained it again to record them.", stacklevel=2)
        lm, config.lm_source = load_recorded_part(
            "lm", config.lm_source, directory, lm, verify, allow_different_parts)
        vision, config.vision_source = load_recorded_part(
            "vision", config.vision_source, directory, vision, verify, allow_different_parts)
        model = cls(lm, vision, config)
        tensors = _read_weights(os.path.join(directory, WEIGHTS_NAME))
        if version < 3:
            tensors = {LEGACY_KEYS.get(key, key): value for key, value in tensors.items()}
        model.load_trainable_state(tensors)
        if dtype is not None:
            model.to(dtype)
        return model.to(device) if device is not None else model

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved weights in; missing, unexpected or mis-shaped keys raise, naming them."""
        expected = set(self._saved_keys())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise KeyError(
                "checkpoint does not match the model: "
                f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
            )
        state = self.state_dict()
        for key, value in tensors.items():
            if state[key].shape != value.shape:
                raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model "
                                 f"shape {tuple(state[key].shape)}")
        with torch.no_grad():
            for key, value in tensors.items():
                state[key].copy_(value)


def _read_config(directory: str) -> tuple[FlamingoConfig, int]:
    """The FlamingoConfig and format version of a saved directory, with clear errors."""
    path = os.path.join(directory, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON file ({error})") from None
    if not isinstance(data, dict) or data.pop("model_type", None) != "flamingo_kit":
        raise ValueError(f"{path} is not a flamingo_kit config")
    version = data.pop("format_version", 1)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version} is newer than this flamingo-kit "
                         f"reads ({FORMAT_VERSION}); upgrade flamingo-kit")
    return FlamingoConfig.from_dict(data), version


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged file is named in the error."""
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def _inject_lora(lm: nn.Module, options: dict[str, Any]) -> nn.Module:
    """Add LoRA adapters (peft) to the LM's linear layers, before cross-attention exists."""
    from peft import LoraConfig, inject_adapter_in_model

    options = dict(options)
    lora = LoraConfig(
        r=options.pop("r", 8),
        lora_alpha=options.pop("alpha", 16),
        lora_dropout=options.pop("dropout", 0.0),
        target_modules=options.pop("target_modules", "all-linear"),
    )
    if options:
        raise ValueError(f"unknown lora options {sorted(options)}; valid: r, alpha, dropout, "
                         "target_modules")
    return inject_adapter_in_model(lora, lm)


def _checks_token_ids(model: FlamingoModel, input_ids: torch.Tensor) -> bool:
    """Whether this forward checks its ids against the vocabulary (a host sync).

    Always on CPU, where a sync costs nothing, and outside training: a bad id gets an error that
    names it instead of an index error or a device-side assert. Not in training on an
    accelerator, where a per-step sync would stall the queue of kernels: there the ids come
    from the tokenizer that the trainer checked against the model once at setup. Never under
    ``torch.compile``.
    """
    if torch.compiler.is_compiling():
        return False
    return input_ids.device.type == "cpu" or not model.training


def _first_token_targets(labels: torch.Tensor, weights: torch.Tensor | None) -> LossTargets:
    """Targets of the first input token, predicted by the prefix's last logits: position 0 of
    ``[prefix logits ; unused]`` predicts ``labels[:, 0]``."""
    pair = F.pad(labels[:, :1], (1, 0), value=IGNORE_INDEX)
    if weights is not None and weights.dim() == 2:
        weights = F.pad(weights[:, :1], (1, 0))
    return LossTargets.from_labels(pair, weights)
