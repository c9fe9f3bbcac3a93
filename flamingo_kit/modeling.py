"""FlamingoModel: a frozen decoder LM and vision tower joined by a resampler and cross-attention.

Reading order: ``from_parts`` (assembly), ``forward`` (embed -> encode images -> LM with media in
scope -> logits), then saving and loading. Generation lives in ``generation.py``.
"""

from __future__ import annotations

import json
import os
import warnings
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from flamingo_kit.config import FlamingoConfig
from flamingo_kit.cross_attention import GatedCrossAttentionBlock, MediaLayout
from flamingo_kit.generation import GenerationMixin, PrefixState
from flamingo_kit.lm_integration import (
    MediaState,
    flamingo_layers,
    insert_cross_attention,
    media_scope,
)
from flamingo_kit.part_records import load_recorded_part, record_part
from flamingo_kit.parts import VisionEncoder, load_lm, load_vision
from flamingo_kit.perceiver import PerceiverResampler

# The model whose forward call is in progress: its LM-head hook then adds media-token logits.
_CALLING_MODEL: ContextVar[nn.Module | None] = ContextVar("flamingo_model", default=None)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# 2: frozen parts recorded with fingerprints, relative paths (1: absolute paths only).
FORMAT_VERSION = 2


@dataclass
class FlamingoOutput(ModelOutput):
    """Output of :meth:`FlamingoModel.forward`."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over labels that are not -100 nor padding."""
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
    )


class FlamingoModel(GenerationMixin, nn.Module):
    """Flamingo-style vision-language model around any HF causal LM and vision tower.

    Build with :meth:`from_parts` or load with :meth:`from_pretrained`. ``model(**batch)`` takes
    the processor's output; ``pixel_values`` is ``[B, N_images, F, C, H, W]`` and image n of row
    b is used iff row b holds more than n ``<image>`` tokens (padding images are never encoded).
    """

    def __init__(self, lm: nn.Module, vision: nn.Module, config: FlamingoConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(vision, config.vision_features, config.vision_drop_cls)
        lm_dim = lm.config.get_text_config().hidden_size
        # Width of the latents that cross-attention reads keys/values from.
        media_dim = lm_dim if config.perceiver_output_proj else self.vision.hidden_size
        self._init_media_token_ids(lm, config)
        if config.lora:
            lm = _inject_lora(lm, config.lora)
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
        )
        insert_cross_attention(
            lm,
            lambda: GatedCrossAttentionBlock(
                lm_dim, media_dim, config.xattn_heads, config.xattn_dim_head,
                config.xattn_ff_mult, ff_all_tokens=config.xattn_ff_all_tokens,
            ),
            config.cross_attn_every_n_layers,
        )
        self._init_new_token_rows()
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

    def _init_media_token_ids(self, lm: nn.Module, config: FlamingoConfig) -> None:
        vocab = lm.get_input_embeddings().num_embeddings
        if config.image_token_id is None:
            config.image_token_id = vocab
        if config.eoc_token_id is None:
            config.eoc_token_id = config.image_token_id + 1
        if config.image_token_id == config.eoc_token_id:
            raise ValueError("image_token_id and eoc_token_id must differ")
        self.image_token_id, self.eoc_token_id = config.image_token_id, config.eoc_token_id
        self.register_buffer(
            "media_token_ids",
            torch.tensor([config.image_token_id, config.eoc_token_id]),
            persistent=False,
        )
        self.vocab_size = max(vocab, lm.get_output_embeddings().weight.shape[0],
                              config.image_token_id + 1, config.eoc_token_id + 1)

    @torch.no_grad()
    def _init_new_token_rows(self) -> None:
        """New-token rows start at the mean of the LM's rows: plausible, not dominant."""
        embed = self.lm.get_input_embeddings()
        n, total = embed.num_embeddings, None
        for start in range(0, n, 8192):  # chunked: vocabularies can be large
            ids = torch.arange(start, min(n, start + 8192), device=embed.weight.device)
            part = embed(ids).float().sum(0)
            total = part if total is None else total + part
        self.new_token_embeddings = nn.Parameter((total / n).repeat(2, 1))
        head = self.lm.get_output_embeddings()
        self.new_token_head = nn.Parameter(head.weight.float().mean(0).repeat(2, 1))
        bias = getattr(head, "bias", None)
        init_bias = bias.float().mean() if bias is not None else torch.tensor(0.0)
        self.new_token_head_bias = nn.Parameter(init_bias.repeat(2))
        self._head_hook = head.register_forward_hook(self._extend_logits)

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
            elif name.startswith("new_token"):
                parts["new-token rows"].append(p)
            else:
                parts["lm (incl. LoRA)"].append(p)
        lines = [f"{'part':<18}{'trainable':>14}{'total':>14}"]
        for part, params in parts.items():
            trainable = sum(p.numel() for p in params if p.requires_grad)
            lines.append(f"{part:<18}{trainable:>14,}{sum(p.numel() for p in params):>14,}")
        return "\n".join(lines)

    # -- forward ----------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings: the frozen table, except media tokens from the trainable rows."""
        embed = self.lm.get_input_embeddings()
        is_image = input_ids == self.image_token_id
        is_new = is_image | (input_ids == self.eoc_token_id)
        base_ids = input_ids.masked_fill(is_new, 0)
        bad = (base_ids < 0) | (base_ids >= embed.num_embeddings)
        if bool(bad.any()):
            where = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"input_ids{list(where)} = {int(input_ids[where])} is not a token id: the LM "
                f"vocabulary is 0..{embed.num_embeddings - 1}, the media tokens "
                f"{self.image_token_id} and {self.eoc_token_id}")
        base = embed(base_ids)
        new = self.new_token_embeddings[(~is_image).long()].to(base.dtype)
        return torch.where(is_new[..., None], new, base)

    def _extend_logits(self, module, args, logits):
        """Forward hook on the LM head: add the media tokens' logits inside Flamingo calls."""
        if _CALLING_MODEL.get() is not self:
            return None
        hidden = args[0]
        extra = F.linear(hidden, self.new_token_head.to(hidden.dtype),
                         self.new_token_head_bias.to(hidden.dtype)).to(logits.dtype)
        if logits.shape[-1] < self.vocab_size:
            pad = logits.new_full((*logits.shape[:-1], self.vocab_size - logits.shape[-1]),
                                  torch.finfo(logits.dtype).min)
            logits = torch.cat([logits, pad], dim=-1)
        return logits.index_copy(-1, self.media_token_ids, extra)

    def encode_images(
        self, pixel_values: torch.Tensor, counts: torch.Tensor, first_position: int = 0
    ) -> torch.Tensor:
        """Latents ``[B, N, L, D]`` of the first ``counts[b]`` images of each row (others 0).

        Image n of a row is the sequence's image ``first_position + n`` (its media-position
        embedding): ``first_position`` counts the images of a cached prefix before it.
        """
        b, n = pixel_values.shape[:2]
        valid = torch.arange(n, device=counts.device)[None] < counts[:, None]
        positions = (torch.arange(n, device=counts.device) + first_position).expand(b, n)[valid]
        patches = self.vision(pixel_values[valid.to(pixel_values.device)])
        latents = self.perceiver(patches.to(self.perceiver.latents.dtype), positions)
        out = latents.new_zeros(b, n, *latents.shape[1:])
        return out.index_put((valid,), latents)

    def media_state(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        earlier_latents: torch.Tensor | None = None,
    ) -> MediaState | None:
        """Encode the images of a batch and lay out which token sees which image.

        ``earlier_latents`` ``[B, N0, L, D]`` are the images of a cached prefix that
        ``input_ids`` continue: the new images are the sequence's images N0, N0+1, ... both for
        their media-position embeddings and for the layout, exactly as in the whole prompt.
        """
        counts = (input_ids == self.image_token_id).sum(1)
        n_max = int(counts.max()) if counts.numel() else 0
        n_before = 0 if earlier_latents is None else earlier_latents.shape[1]
        if n_max == 0 and n_before == 0:
            return None
        latents = earlier_latents
        if n_max:
            if pixel_values is None:
                raise ValueError("input_ids contain <image> tokens but no pixel_values were given")
            if pixel_values.dim() == 5:  # [B, N, C, H, W]: one frame per image
                pixel_values = pixel_values.unsqueeze(2)
            if pixel_values.dim() != 6 or pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"pixel_values must be [B, N_images, F, C, H, W] with B={input_ids.shape[0]}, "
                    f"got {tuple(pixel_values.shape)}"
                )
            if pixel_values.shape[1] < n_max:
                raise ValueError(
                    f"a row has {n_max} <image> tokens but pixel_values holds only "
                    f"{pixel_values.shape[1]} images per row"
                )
            new = self.encode_images(pixel_values, counts, first_position=n_before)
            latents = new if earlier_latents is None else torch.cat([earlier_latents, new], dim=1)
        images_before = None
        if n_before:
            images_before = torch.full((input_ids.shape[0],), n_before, device=input_ids.device)
        layout = MediaLayout.build(input_ids, self.image_token_id, latents.shape[1],
                                   self.config.media_policy, images_before=images_before)
        return MediaState(latents, layout)

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
        **lm_kwargs,
    ) -> FlamingoOutput:
        """Logits over the LM vocabulary plus the media tokens; loss when ``labels`` given.

        ``media`` (from :meth:`media_state`, or a generation cache) replaces ``pixel_values``.
        With ``prefix`` (from :meth:`prefill`) each row continues the cached prefix: the logits
        are those of ``input_ids`` only, and rows may be right-padded (e.g. to score answers);
        ``labels`` then align with ``input_ids`` and the prefix's last logits score the first.
        """
        if prefix is not None:
            if past_key_values is not None or media is not None:
                raise ValueError("prefix replaces past_key_values and media; pass only one")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if labels is not None:
                labels = self._labels_after_prefix(labels, attention_mask)
            past_key_values, attention_mask, media = self._continue_prefix(
                prefix, input_ids, attention_mask, pixel_values
            )
            use_cache = True
        elif media is None:
            media = self.media_state(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None:
            # Positions count real tokens only, so left padding does not shift them.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            position_ids = position_ids[:, -input_ids.shape[1]:]
        calling = _CALLING_MODEL.set(self)
        try:
            with media_scope(media):
                out = self.lm(
                    inputs_embeds=self.embed(input_ids),
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    past_key_values=past_key_values,
                    use_cache=use_cache,
                    **lm_kwargs,
                )
        finally:
            _CALLING_MODEL.reset(calling)
        loss = None
        if labels is not None and prefix is not None:
            # Target t of the input is predicted by the logits before it: the prefix's last
            # logits for t = 0, the input's own for the others (``labels`` were shifted to match).
            first = prefix.logits[:, None].expand(input_ids.shape[0], 1, -1)
            loss = causal_lm_loss(torch.cat([first.to(out.logits.dtype), out.logits], 1), labels)
        elif labels is not None:
            loss = causal_lm_loss(out.logits, labels, attention_mask)
        return FlamingoOutput(loss=loss, logits=out.logits, past_key_values=out.past_key_values)

    @staticmethod
    def _labels_after_prefix(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + T]`` labels for logits ``[prefix's last ; input]``; padding ignored."""
        if labels.shape != attention_mask.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                             f"{tuple(attention_mask.shape)}")
        labels = labels.masked_fill(attention_mask == 0, -100)
        return F.pad(labels, (1, 0), value=-100)

    # -- saving and loading -----------------------------------------------------------------

    def _saved_keys(self) -> list[str]:
        """State-dict keys that ``save_pretrained`` writes: the parts that can train."""
        cfg = self.config

        def saved(key: str) -> bool:
            return (
                key.startswith(("perceiver.", "new_token_"))
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
        the whole model. Directories of format_version 1 (no fingerprints) load with a warning.
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
        model.load_trainable_state(_read_weights(os.path.join(directory, WEIGHTS_NAME)))
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
