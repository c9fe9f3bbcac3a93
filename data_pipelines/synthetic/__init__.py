"""A procedural world of coloured shapes with exact ground truth.

No dataset or pretrained model can be downloaded offline, so the toolkit writes its own: a text
corpus, image-caption pair shards, interleaved document shards and evaluation sets in the real
benchmarks' formats, all from one seed (:func:`synthesize`).
"""

from data_pipelines.synthetic.world import WorldConfig, synthesize

__all__ = ["WorldConfig", "synthesize"]
