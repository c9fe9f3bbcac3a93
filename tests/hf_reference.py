"""transformers' own ``generate`` over a FlamingoModel, as the reference for our cached ``generate``.

:class:`HFGenerateReference` is a transformers ``PreTrainedModel`` + ``GenerationMixin`` whose
forward is the Flamingo model's plain, uncached forward over the whole sequence so far (images
encoded again at every step, no KV cache, no cross-attention K/V cache, no prefix), with
``<image>`` removed from the next-token logits as flamingo-kit's ``generate`` removes it.
Driving it with ``use_cache=False`` therefore runs transformers' decoding loops, logits
processors, stopping criteria, beam search, sampling and streamers exactly as transformers runs
them, on the same next-token distribution our cached ``generate`` decodes from.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class ReferenceConfig(PretrainedConfig):
    model_type = "flamingo_kit_reference"


class HFGenerateReference(PreTrainedModel, GenerationMixin):
    """transformers' ``generate`` over ``model``'s uncached forward (see the module docstring)."""

    config_class = ReferenceConfig

    def __init__(self, model):
        text = model.lm.config.get_text_config()
        super().__init__(ReferenceConfig(vocab_size=model.media_tokens.head.vocab_size,
                                         max_position_embeddings=getattr(
                                             text, "max_position_embeddings", None)))
        self.flamingo = model
        self.eval()

    def forward(self, input_ids, attention_mask=None, pixel_values=None, **_unused):
        logits = self.flamingo(input_ids=input_ids, attention_mask=attention_mask,
                               pixel_values=pixel_values).logits.clone()
        logits[..., self.flamingo.image_token_id] = float("-inf")
        return CausalLMOutput(logits=logits)

    def reference_generate(self, **kwargs):
        """transformers' ``generate`` without any cache; returns what it returns."""
        return self.generate(use_cache=False, **kwargs)


def new_tokens(output, prompt_width: int) -> torch.Tensor:
    """The generated part of transformers' ``sequences`` (prompt + new tokens)."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return sequences[:, prompt_width:]
