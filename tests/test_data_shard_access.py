"""Shard strings are local paths unless a source opts in: no shell command or download runs from
a shard list by default, and a local-looking string never reaches webdataset's opener."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from data_pipelines.loading import SourceConfig, build_loader
from data_pipelines.shards import interleaved_sample, write_shards
from data_pipelines.streams import SourceStream
from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.from_scratch import image_processor


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = (interleaved_sample(f"doc{i:04d}", [Image.new("RGB", (16, 16), (i, 0, 0)),
                                                  f"sample {i:04d}."]) for i in range(8))
    return write_shards(samples, str(root / "docs"), "docs", 4)


def _loader(source: SourceConfig):
    tok = train_tokenizer(["sample 0001 is red."] * 20, vocab_size=280)
    return build_loader([source], tok, image_processor(16), batch_size=2, max_length=32,
                        resampled=False)


@pytest.mark.parametrize("spec,opt_in", [
    ("pipe:touch {marker}; cat {shard}", "allow_pipe"),
    ("pipe:cat {shard}", "allow_pipe"),
    ("https://example.com/docs-{{000000..000001}}.tar", "allow_remote"),
    ("s3://bucket/docs-000000.tar", "allow_remote"),
    ("gs://bucket/docs-000000.tar", "allow_remote"),
])
def test_pipe_and_remote_shards_are_refused_without_the_opt_in(shards, tmp_path, spec, opt_in):
    marker = tmp_path / "code-ran"
    text = spec.format(marker=marker, shard=shards[0])
    with pytest.raises(ValueError) as error:
        source = SourceConfig("docs", "interleaved", [shards[1], text])
        list(_loader(source))  # the old code ran the command here
    assert "'docs'" in str(error.value) and opt_in in str(error.value)
    assert not marker.exists()


def test_pipe_shards_are_read_with_the_opt_in(shards, tmp_path):
    source = SourceConfig("docs", "interleaved", [f"pipe:cat {s}" for s in shards],
                          allow_pipe=True)
    rows = sum(len(batch["input_ids"]) for batch in _loader(source))
    assert rows == 8


def test_remote_shards_pass_the_check_with_the_opt_in():
    source = SourceConfig("docs", "interleaved", "https://example.com/docs-{000000..000003}.tar",
                          allow_remote=True)
    assert source.shard_paths[-1] == "https://example.com/docs-000003.tar"


def test_a_local_path_is_opened_as_a_file_and_nothing_else(shards, tmp_path, monkeypatch):
    """webdataset's gopen rewrites URLs from GOPEN_REWRITE (local prefix -> ``pipe:``): the
    stream opener must not go through it, nor through any other scheme dispatch."""
    marker = tmp_path / "code-ran"
    directory = os.path.dirname(shards[0])
    monkeypatch.setenv("GOPEN_REWRITE", f"{directory}=pipe:touch {marker}; cat {directory}")
    stream = SourceStream("docs", shards, seed=0, stream=(0, 1, 0, 1), resampled=False)
    assert sum(1 for _ in iter(stream.next, None)) == 8
    assert not marker.exists()


def test_a_scheme_that_slips_past_the_source_check_is_refused_when_opened(tmp_path):
    marker = tmp_path / "code-ran"
    stream = SourceStream("docs", [f"pipe:touch {marker}"], seed=0, stream=(0, 1, 0, 1),
                          resampled=False)
    with pytest.raises(ValueError, match="allow_pipe"):
        stream.next()
    assert not marker.exists()


def test_globs_and_brace_patterns_expand_to_local_files(shards):
    directory = os.path.dirname(shards[0])
    assert SourceConfig("d", "interleaved", os.path.join(directory, "docs-*.tar")).shard_paths \
        == shards
    pattern = os.path.join(directory, "docs-{000000..000001}.tar")
    assert SourceConfig("d", "interleaved", pattern).shard_paths == shards


def test_a_missing_shard_in_an_explicit_list_warns_once_naming_it(shards, tmp_path):
    missing = str(tmp_path / "docs-000099.tar")
    with pytest.warns(UserWarning, match="docs-000099.tar") as warned:
        source = SourceConfig("docs", "interleaved", [*shards, missing])
        batches = list(_loader(source))
    assert len([w for w in warned if "docs-000099" in str(w.message)]) == 1
    assert sum(len(b["input_ids"]) for b in batches) == 8
    with pytest.raises(ValueError, match="none of"):
        SourceConfig("docs", "interleaved", [missing])
