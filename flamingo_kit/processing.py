"""Turn interleaved text+image prompts into model inputs, and token ids back into text.

A prompt is either a list of ``str`` and ``PIL.Image`` items (the image goes where it stands) or
a string with ``<image>`` placeholders plus an ``images=`` list. The processor owns the two media
tokens: ``<image>`` marks where an image is seen, ``<|endofchunk|>`` ends the text about it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding, PretrainedConfig

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
MEDIA_TOKENS = (IMAGE_TOKEN, EOC_TOKEN)
PROCESSOR_CONFIG = "flamingo_processor_config.json"


def add_flamingo_tokens(tokenizer) -> list[int]:
    """Add ``<image>`` and ``<|endofchunk|>`` as special tokens if missing; return their ids.

    Also gives the tokenizer a pad token (its EOS) when it has none: batching needs one and the
    attention mask, not the pad id, decides what is ignored.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in MEDIA_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS))


def _is_image(item: Any) -> bool:
    return isinstance(item, Image.Image)


class FlamingoProcessor:
    """Tokenizer + image processor for interleaved prompts (one prompt or a batch).

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` of shape
    ``[B, N_images, 1, C, H, W]`` (zero-padded to the largest image count in the batch), ready
    for ``FlamingoModel(**batch)``. Every ``<image>`` token has exactly one image, in order.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        max_images: int | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_images = max_images
        self.max_length = max_length
        self.padding_side = padding_side
        self.image_token_id, self.eoc_token_id = add_flamingo_tokens(tokenizer)

    # -- inputs -----------------------------------------------------------------------------

    def _normalise(self, prompts, images) -> list[list]:
        """Return a batch of prompts, each a list of str / PIL.Image items."""
        if images is not None:
            if isinstance(prompts, str):
                prompts, images = [prompts], [images]
            if not isinstance(images, Sequence) or len(images) != len(prompts):
                raise ValueError("images= must hold one list of images per prompt")
            batch = []
            for i, (text, imgs) in enumerate(zip(prompts, images)):
                if not isinstance(text, str):
                    raise ValueError(f"prompt {i}: with images= each prompt must be a str")
                imgs = [imgs] if _is_image(imgs) else list(imgs)
                pieces = text.split(IMAGE_TOKEN)
                if len(pieces) - 1 != len(imgs):
                    raise ValueError(
                        f"prompt {i}: {len(pieces) - 1} {IMAGE_TOKEN} placeholders but "
                        f"{len(imgs)} images"
                    )
                items: list = [pieces[0]]
                for img, piece in zip(imgs, pieces[1:]):
                    items += [img, piece]
                batch.append(items)
            return batch
        if isinstance(prompts, (str, Image.Image)):
            return [[prompts]]
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
            raise ValueError(f"expected a prompt or a list of prompts, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("empty batch: no prompts given")
        if all(isinstance(p, (str, Image.Image)) for p in prompts) and any(
            _is_image(p) for p in prompts
        ):
            return [list(prompts)]  # one interleaved prompt
        if all(isinstance(p, str) for p in prompts):
            return [[p] for p in prompts]  # a batch of text-only prompts
        return [[p] if isinstance(p, (str, Image.Image)) else p for p in prompts]

    def _encode_one(
        self, index: int, items, add_special_tokens: bool = True
    ) -> tuple[list[int], list[Image.Image]]:
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise ValueError(f"prompt {index}: expected a list of str and PIL.Image items")
        text_parts, images = [], []
        for j, item in enumerate(items):
            if isinstance(item, str):
                text_parts.append(item)
            elif _is_image(item):
                text_parts.append(IMAGE_TOKEN)
                images.append(item.convert("RGB"))
            else:
                raise ValueError(
                    f"prompt {index}: item {j} is a {type(item).__name__}; "
                    "expected str or PIL.Image.Image"
                )
        text = "".join(text_parts)
        if not text.strip():
            raise ValueError(f"prompt {index}: empty prompt")
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        n_tokens = ids.count(self.image_token_id)
        if n_tokens != len(images):
            raise ValueError(
                f"prompt {index}: {n_tokens} {IMAGE_TOKEN} tokens but {len(images)} images "
                f"(a text item must not contain the literal {IMAGE_TOKEN})"
            )
        if self.max_images is not None and len(images) > self.max_images:
            raise ValueError(
                f"prompt {index}: {len(images)} images, more than max_images={self.max_images}"
            )
        return ids, images

    def __call__(
        self,
        prompts,
        images=None,
        return_tensors: str | None = "pt",
        padding_side: str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one prompt or a batch; see the class docstring for the formats.

        ``add_special_tokens=False`` (no BOS) suits text that continues a cached prefix.
        """
        if return_tensors not in ("pt", None):
            raise ValueError("only return_tensors='pt' is supported")
        side = padding_side or self.padding_side
        max_length = max_length or self.max_length
        encoded = [
            self._encode_one(i, p, add_special_tokens)
            for i, p in enumerate(self._normalise(prompts, images))
        ]
        if max_length is not None:
            # Cutting from the right drops the trailing images with their tokens, so the
            # remaining <image> tokens and images still pair up in order.
            encoded = [
                (ids[:max_length], imgs[: ids[:max_length].count(self.image_token_id)])
                for ids, imgs in encoded
            ]
        return self._collate(encoded, side)

    def _collate(self, encoded, side: str) -> BatchEncoding:
        width = max(len(ids) for ids, _ in encoded)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, (ids, _) in enumerate(encoded):
            span = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        n_max = max(len(imgs) for _, imgs in encoded)
        if n_max:
            all_images = [img for _, imgs in encoded for img in imgs]
            pixels = self.preprocess_images(all_images)
            pixel_values = pixels.new_zeros((len(encoded), n_max, 1, *pixels.shape[1:]))
            start = 0
            for row, (_, imgs) in enumerate(encoded):
                pixel_values[row, : len(imgs), 0] = pixels[start : start + len(imgs)]
                start += len(imgs)
            out["pixel_values"] = pixel_values
        return BatchEncoding(out)

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> ``[N, C, H, W]`` float tensor with the vision tower's own transform."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    # -- outputs ----------------------------------------------------------------------------

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Token ids -> strings (``skip_special_tokens`` drops the media tokens and padding)."""
        return self.tokenizer.batch_decode(
            sequences, skip_special_tokens=skip_special_tokens, **kwargs
        )

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        """One sequence of token ids -> string."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    # -- persistence ------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer, image processor and processor settings to ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        settings = {
            "max_images": self.max_images,
            "max_length": self.max_length,
            "padding_side": self.padding_side,
        }
        with open(os.path.join(directory, PROCESSOR_CONFIG), "w") as f:
            json.dump(settings, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **overrides) -> FlamingoProcessor:
        """Load what ``save_pretrained`` wrote; keyword arguments override saved settings."""
        path = os.path.join(directory, PROCESSOR_CONFIG)
        settings = {}
        if os.path.exists(path):
            with open(path) as f:
                settings = json.load(f)
        settings.update(overrides)
        # The directory's config.json is the Flamingo model's, not a tokenizer's: keep
        # AutoTokenizer from reading it (the class comes from tokenizer_config.json).
        tokenizer = AutoTokenizer.from_pretrained(directory, config=PretrainedConfig())
        # The torchvision-backed image processors need torchvision; the PIL ones work everywhere.
        image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")
        return cls(tokenizer, image_processor, **settings)
