"""Turn interleaved text+image prompts into model inputs, and token ids back into text.

A prompt is either a list of ``str`` and ``PIL.Image`` items (the image goes where it stands) or
a string with ``<image>`` placeholders plus an ``images=`` list. The processor owns the two media
tokens: ``<image>`` marks where an image is seen, ``<|endofchunk|>`` ends the text about it.

Prompt length: a prompt longer than ``max_length`` is never cut silently. By default
(``truncation="demonstrations"``, for inference) its earliest demonstrations (chunks ending in
``<|endofchunk|>``, with their images) are dropped whole, with a warning, and the query always
stays; if the query alone is too long, ``ValueError``. ``truncation="right"`` cuts the end (and
the images past the cut) as training sequences are cut.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import AutoImageProcessor, AutoTokenizer, BatchEncoding, PretrainedConfig

from flamingo_kit.batching import PADDING_SIDES, collate

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
MEDIA_TOKENS = (IMAGE_TOKEN, EOC_TOKEN)
PROCESSOR_CONFIG = "flamingo_processor_config.json"
TRUNCATION = ("demonstrations", "right")


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


def _is_list(item: Any) -> bool:
    return isinstance(item, Sequence) and not isinstance(item, (str, bytes))


def _rgb(index: int, item_index: int, image: Image.Image) -> Image.Image:
    """The image in RGB; empty or unreadable images raise ValueError naming the item."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"prompt {index}: item {item_index} is an empty image "
                         f"({image.width}x{image.height} pixels)")
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as error:  # e.g. a truncated file, decoded lazily here
        raise ValueError(f"prompt {index}: item {item_index} cannot be read as an image "
                         f"({error})") from None


def _check_text(index: int, item_index: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"prompt {index}: item {item_index} is not valid Unicode text ({error.reason} "
            f"{text[error.start:error.end]!r} at position {error.start})"
        ) from None


class FlamingoProcessor:
    """Tokenizer + image processor for interleaved prompts (one prompt or a batch).

    Returns ``input_ids``, ``attention_mask`` and ``pixel_values`` of shape
    ``[B, N_images, 1, C, H, W]`` (zero-padded to the largest image count in the batch), ready
    for ``FlamingoModel(**batch)``. Every ``<image>`` token has exactly one image, in order.
    ``max_length`` / ``truncation``: see the module docstring.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        max_images: int | None = None,
        max_length: int | None = None,
        padding_side: str = "right",
        truncation: str = "demonstrations",
    ):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        _check_truncation(truncation)
        self.truncation = truncation
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
                # One prompt: images=[img, ...] (its images) or images=[[img, ...]] (a batch of one).
                one_batch = _is_list(images) and len(images) == 1 and _is_list(images[0])
                prompts, images = [prompts], (images if one_batch else [images])
            if not _is_list(prompts) or not _is_list(images) or len(images) != len(prompts):
                raise ValueError("images= must hold one list of images per prompt")
            batch = []
            for i, (text, imgs) in enumerate(zip(prompts, images)):
                if not isinstance(text, str):
                    raise ValueError(f"prompt {i}: with images= each prompt must be a str")
                imgs = [imgs] if _is_image(imgs) else imgs
                if not _is_list(imgs):
                    raise ValueError(f"prompt {i}: images= holds a {type(imgs).__name__}; "
                                     "expected a list of PIL images")
                for k, img in enumerate(imgs):
                    if not _is_image(img):
                        raise ValueError(f"prompt {i}: image {k} is a {type(img).__name__}; "
                                         "expected PIL.Image.Image")
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
        if not _is_list(items):
            raise ValueError(f"prompt {index}: expected a list of str and PIL.Image items")
        text_parts, images = [], []
        for j, item in enumerate(items):
            if isinstance(item, str):
                _check_text(index, j, item)
                text_parts.append(item)
            elif _is_image(item):
                text_parts.append(IMAGE_TOKEN)
                images.append(_rgb(index, j, item))
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
        truncation: str | None = None,
    ) -> BatchEncoding:
        """Encode one prompt or a batch; see the class docstring for the formats.

        ``add_special_tokens=False`` (no BOS) suits text that continues a cached prefix.
        ``max_length`` and ``truncation`` override the processor's settings for this call.
        """
        if return_tensors not in ("pt", None):
            raise ValueError("only return_tensors='pt' is supported")
        side = padding_side or self.padding_side
        max_length = max_length or self.max_length
        truncation = truncation or self.truncation
        _check_truncation(truncation)
        encoded = [
            self._encode_one(i, p, add_special_tokens)
            for i, p in enumerate(self._normalise(prompts, images))
        ]
        if max_length is not None:
            cut = self._cut_right if truncation == "right" else self._drop_demonstrations
            for i, (ids, imgs) in enumerate(encoded):
                encoded[i] = cut(i, ids, imgs, max_length)
        return self._collate(encoded, side)

    def _cut_right(self, index: int, ids: list[int], images: list, max_length: int):
        """Training-style cut: the end goes, with the images whose ``<image>`` token went.

        The remaining ``<image>`` tokens and images still pair up in order.
        """
        ids = ids[:max_length]
        return ids, images[: ids.count(self.image_token_id)]

    def _drop_demonstrations(self, index: int, ids: list[int], images: list, max_length: int):
        """Drop the earliest whole demonstrations until the prompt fits; the query always stays.

        A demonstration is a chunk ending in ``<|endofchunk|>`` (text before the first image
        belongs to the first chunk); the query is what follows the last one. Leading and
        trailing special tokens (BOS/EOS) stay.
        """
        if len(ids) <= max_length:
            return ids, images
        specials = set(self.tokenizer.all_special_ids) - {self.image_token_id, self.eoc_token_id}
        head = next((i for i, t in enumerate(ids) if t not in specials), len(ids))
        tail = len(ids) - next((i for i in range(len(ids), head, -1) if ids[i - 1] not in specials),
                               head)
        ends = [i + 1 for i in range(head, len(ids) - tail) if ids[i] == self.eoc_token_id]
        if ends and ends[-1] == len(ids) - tail:  # the prompt ends its own chunk: that is the query
            ends.pop()
        for n_dropped, end in enumerate(ends, 1):
            if len(ids) - (end - head) <= max_length:
                n_images = ids[head:end].count(self.image_token_id)
                warnings.warn(
                    f"prompt {index}: {len(ids)} tokens exceed max_length={max_length}; dropped "
                    f"its first {n_dropped} of {len(ends)} demonstrations ({end - head} tokens, "
                    f"{n_images} images) so that it fits", stacklevel=3)
                return ids[:head] + ids[end:], images[n_images:]
        query = len(ids) - (ends[-1] - head if ends else 0)
        raise ValueError(
            f"prompt {index}: {len(ids)} tokens exceed max_length={max_length}, and without its "
            f"{len(ends)} demonstrations it is still {query} tokens; shorten the query or raise "
            "max_length"
        )

    def _collate(self, encoded, side: str) -> BatchEncoding:
        counts = [len(images) for _, images in encoded]
        all_images = [image for _, images in encoded for image in images]
        pixels = self.preprocess_images(all_images) if all_images else torch.empty(0)
        ids = [ids for ids, _ in encoded]
        return BatchEncoding(collate(ids, pixels.split(counts), self.tokenizer.pad_token_id, side))

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
        """Load what ``save_pretrained`` wrote, set up for inference.

        Prompts are limited to the context of the model saved in the same directory (its
        ``config.json``), not to the ``max_length`` saved with the processor (the training
        length), and too-long prompts lose whole demonstrations, never their end. Keyword
        arguments override any setting. Reads JSON and tokenizer files only; no code runs.
        """
        directory = os.fspath(directory)
        settings = _read_json(os.path.join(directory, PROCESSOR_CONFIG)) or {}
        settings.pop("max_length", None)
        settings["max_length"] = saved_context_length(directory)
        settings.update(overrides)
        safe = {"local_files_only": True, "trust_remote_code": False}
        try:
            # The directory's config.json is the Flamingo model's, not a tokenizer's: keep
            # AutoTokenizer from reading it (the class comes from tokenizer_config.json).
            tokenizer = AutoTokenizer.from_pretrained(directory, config=PretrainedConfig(), **safe)
            # The torchvision-backed image processors need torchvision; the PIL ones work
            # everywhere.
            image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil", **safe)
        except ValueError as error:  # includes undecodable JSON, which HF does not name
            raise ValueError(f"{directory}: cannot load the tokenizer and image processor "
                             f"({type(error).__name__}: {error})") from None
        return cls(tokenizer, image_processor, **settings)


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")


def _read_json(path: str) -> Any:
    """The JSON value in ``path`` (None when the file does not exist); errors name the file."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is not a JSON file ({error})") from None


def saved_context_length(directory: str | os.PathLike) -> int | None:
    """The LM context recorded in a saved model's ``config.json`` (None when unknown)."""
    config = _read_json(os.path.join(directory, "config.json"))
    if not isinstance(config, dict) or config.get("model_type") != "flamingo_kit":
        return None
    return (config.get("lm_source") or {}).get("context_length")
