"""flamingo-kit: Flamingo-style few-shot vision-language models on any Hugging Face decoder LM."""

from flamingo_kit.config import FlamingoConfig
from flamingo_kit.media import PrefixState
from flamingo_kit.modeling import FlamingoModel, FlamingoOutput
from flamingo_kit.part_records import PartMismatchError
from flamingo_kit.pipeline import FlamingoPipeline
from flamingo_kit.processing import EOC_TOKEN, IMAGE_TOKEN, FlamingoProcessor

__all__ = [
    "EOC_TOKEN",
    "IMAGE_TOKEN",
    "FlamingoConfig",
    "FlamingoModel",
    "FlamingoOutput",
    "FlamingoPipeline",
    "FlamingoProcessor",
    "PartMismatchError",
    "PrefixState",
]
