"""Training data for flamingo-kit: synthetic world, shard formats, sequence building, loading.

- :mod:`data_pipelines.synthetic`: a procedural world of shapes with exact ground truth (corpus,
  pair and interleaved shards, evaluation sets in real benchmark formats);
- :mod:`data_pipelines.convert`: MMC4 / OBELICS-style jsonl -> interleaved shards;
- :mod:`data_pipelines.sequence`: ``<image>text<|endofchunk|>`` token layout and loss labels;
- :mod:`data_pipelines.loading`: weighted, deterministic, resumable batches
  (:func:`build_loader`, :class:`SourceConfig`);
- ``flamingo-data synth|convert|inspect`` (:mod:`data_pipelines.cli`).
"""

from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.sequence import IGNORE_INDEX, SequenceBuilder

__all__ = ["IGNORE_INDEX", "SequenceBuilder", "SourceConfig", "build_loader"]
