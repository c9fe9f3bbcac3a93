"""Import checkpoints of other Flamingo implementations into flamingo-kit's format.

``flamingo-convert openflamingo --checkpoint checkpoint.pt --lm LM_DIR --vision CLIP_DIR --out OUT``
(or ``python -m flamingo_kit.convert ...``) writes a directory that
``FlamingoModel.from_pretrained`` and ``FlamingoProcessor.from_pretrained`` load, computing the
same logits as the original model. Checkpoints are read with ``torch.load(weights_only=True)``:
a file that would execute code while unpickling is refused.
"""

from flamingo_kit.convert.openflamingo import (
    ConversionError,
    ConversionReport,
    convert_openflamingo,
    load_checkpoint,
)

__all__ = ["ConversionError", "ConversionReport", "convert_openflamingo", "load_checkpoint"]
