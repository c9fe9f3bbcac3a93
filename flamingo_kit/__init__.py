"""flamingo-kit: Flamingo-style few-shot vision-language models on any Hugging Face decoder LM."""

from flamingo_kit.processing import EOC_TOKEN, IMAGE_TOKEN, FlamingoProcessor

__all__ = ["EOC_TOKEN", "IMAGE_TOKEN", "FlamingoProcessor"]
