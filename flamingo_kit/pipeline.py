"""Prompt a trained model with images and text, get strings back."""

from __future__ import annotations

import os

import torch
from PIL import Image
from transformers import GenerationConfig

from flamingo_kit.backbones import lm_context_length
from flamingo_kit.modeling import FlamingoModel
from flamingo_kit.processing import FlamingoProcessor


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (
        isinstance(prompts, list) and all(isinstance(p, (str, Image.Image)) for p in prompts)
    )


def _options(generate_kwargs: dict) -> dict:
    """The generation options of a call: its keyword arguments over its ``generation_config``."""
    config = generate_kwargs.get("generation_config")
    base = vars(config) if isinstance(config, GenerationConfig) else {}  # generate checks it
    return base | {k: v for k, v in generate_kwargs.items() if v is not None}


class FlamingoPipeline:
    """Interleaved prompt(s) in, completion string(s) out.

    ``pipe([img1, "An image of two cats.<|endofchunk|>", img2, "An image of"])`` returns the
    completion; a list of such prompts returns a list, generated in batches of ``batch_size``.

    A prompt and its completion must fit the LM's context: a longer prompt loses its earliest
    demonstrations (with a warning), never its query; a query that does not fit raises.
    """

    def __init__(
        self,
        model: FlamingoModel,
        processor: FlamingoProcessor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ):
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.dtype = dtype or next(model.parameters()).dtype
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> FlamingoPipeline:
        """Load the model and processor that ``save_pretrained`` wrote to one directory."""
        model = FlamingoModel.from_pretrained(directory, dtype=dtype)
        return cls(model, FlamingoProcessor.from_pretrained(directory), device, dtype)

    def __call__(self, prompts, batch_size: int = 8, **generate_kwargs) -> str | list:
        """Complete each prompt; keyword arguments go to ``FlamingoModel.generate``.

        Generation options (``generation_config=``, ``repetition_penalty=``, ``stop_strings=``,
        ``streamer=``, ...) pass through; the processor's tokenizer serves ``stop_strings``.
        With ``num_return_sequences=n`` each prompt gives a list of ``n`` strings.
        """
        single = _is_single_prompt(prompts)
        batch_prompts = [prompts] if single else list(prompts)
        options = _options(generate_kwargs)
        if options.get("return_dict_in_generate") or options.get("output_scores") \
                or options.get("output_logits"):
            raise ValueError("FlamingoPipeline returns text: call model.generate for "
                             "return_dict_in_generate / output_scores / output_logits")
        generate_kwargs.setdefault("tokenizer", self.processor.tokenizer)
        max_length = self.max_prompt_length(options.get("max_new_tokens") or 20)
        n = options.get("num_return_sequences") or 1
        results: list = []
        for start in range(0, len(batch_prompts), batch_size):
            batch = self.processor(batch_prompts[start : start + batch_size], padding_side="left",
                                   max_length=max_length, truncation="demonstrations")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
            new_tokens = self.model.generate(**batch, **generate_kwargs)
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            results += texts if n == 1 else [texts[i : i + n] for i in range(0, len(texts), n)]
        return results[0] if single else results

    def max_prompt_length(self, max_new_tokens: int) -> int | None:
        """Tokens a prompt may have: the LM's context less the completion (and the processor's
        own limit, if lower); None when neither is known."""
        limits = [self.processor.max_length]
        context = lm_context_length(self.model.lm.config)
        if context is not None:
            if max_new_tokens >= context:
                raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                                 f"the LM's context of {context} tokens")
            limits.append(context - max_new_tokens)
        limits = [n for n in limits if n is not None]
        return min(limits) if limits else None
