"""Benchmarks keep running, and their two models really are matched (no timing assertions)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import (
    common,
    cross_attention,
    generation,
    ptb_tokenizer,
    train_step,
    trainer_throughput,
)
from benchmarks import data as data_benchmark
from benchmarks import eval as eval_benchmark
from eval_fewshot.metrics.java_ptb import java_available

SMOKE = ["--smoke", "--threads", "1"]


def _finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_generation_smoke_measures_both_models():
    results = generation.main(SMOKE)
    for kind in generation.MODELS:
        for shots in (0, 1):
            numbers = results[kind, shots]
            assert _finite_positive(numbers["seconds"])
            assert _finite_positive(numbers["memory"])
            assert numbers["prompt_len"] > 1


def test_train_step_smoke_measures_both_models():
    results = train_step.main(SMOKE)
    for kind in ("ours", "idefics"):
        for n in (1, 4):
            assert _finite_positive(results[kind, n]["seconds"])
            assert _finite_positive(results[kind, n]["memory"])
        assert results[kind, "trainable"] > 0


def test_trainer_throughput_smoke_runs_the_trainer_step_of_all_three(single_process, capsys):
    tallies = trainer_throughput.main(SMOKE + ["--profile"])
    for name in trainer_throughput.CONFIGS:
        t = tallies[name]
        assert t.steps == 1 and _finite_positive(t.seconds) and _finite_positive(t.memory)
        assert t.supervised > 0 and t.images > 0 and math.isfinite(t.losses[0])
    # Same batches for ours unpacked and IDEFICS; packed rows (2 per batch) hold several
    # documents each.
    assert tallies["ours unpacked"].supervised == tallies["IDEFICS"].supervised
    assert tallies["ours packed"].documents > 2
    out = capsys.readouterr().out
    assert "supervised tokens/s, ours packed / IDEFICS" in out
    assert out.count("## profile:") == 3 and "frozen LM layers" in out


def test_cross_attention_smoke_measures_all_calls():
    results = cross_attention.main(SMOKE)
    for name in ("ours block", "ours incl. K/V", "IDEFICS"):
        for n in (1, 4):
            assert _finite_positive(results[name, n]["per_token"])


def test_eval_smoke_times_both_modes_with_identical_predictions():
    results = eval_benchmark.main(SMOKE)
    assert _finite_positive(results["whole prompts"]) and _finite_positive(results["prefix reuse"])
    assert results["identical"]


def test_data_smoke_measures_the_loader():
    assert _finite_positive(data_benchmark.main(SMOKE)[0])


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_frozen_towers_have_identical_sizes():
    shape = common.SMOKE_SHAPE
    ours, theirs = common.build_ours(shape), common.build_idefics(shape)
    assert _params(ours.vision.tower) == _params(theirs.model.vision_model)
    # IDEFICS' decoupled embedding/head hold the 2 new tokens; ours keeps them outside the LM.
    their_lm = (_params(theirs.model.layers) + _params(theirs.model.norm)
                + theirs.model.embed_tokens.weight.numel() + theirs.lm_head.weight.numel())
    our_lm = sum(p.numel() for n, p in ours.lm.named_parameters() if ".xattn." not in n)
    assert our_lm == their_lm


def test_same_parts_train_in_both_models():
    shape = common.SMOKE_SHAPE
    ours, theirs = common.build_ours(shape), common.build_idefics(shape)
    our_parts = {"xattn" if ".xattn." in n else n.split(".")[0]
                 for n, p in ours.named_parameters() if p.requires_grad}
    assert our_parts == {"perceiver", "xattn", "media_tokens"}
    their_trainable = [n for n, p in theirs.named_parameters() if p.requires_grad]
    assert all(n.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers.",
                             "model.embed_tokens.additional_", "lm_head.additional_"))
               for n in their_trainable)
    our_blocks = [n for n, _ in ours.named_modules() if n.endswith(".xattn")]
    assert len(our_blocks) == len(theirs.model.gated_cross_attn_layers)


class _ImageTokenizer:
    """What IDEFICS' mask builder reads from a tokenizer."""

    def __init__(self, image_token_id: int):
        self.image_token_id, self.eos_token_id = image_token_id, 2

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.image_token_id


def test_image_attention_mask_matches_idefics_processor():
    from transformers.models.idefics.processing_idefics import (
        image_attention_mask_for_packed_input_ids_pt,
        incremental_to_binary_attention_mask,
    )

    shape = common.SMOKE_SHAPE
    ids = common.few_shot_ids(shape, 3, 4, 5, 2, torch.Generator().manual_seed(0))
    ids[ids == 2] = 3  # the processor stops image attention after EOS; our prompts hold none
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(
        ids, _ImageTokenizer(shape.image_token_id))
    expected = incremental_to_binary_attention_mask(incremental, "pt", num_classes=5)
    got = common.idefics_image_attention_mask(ids, shape.image_token_id, 5)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shots", [0, 3])
def test_few_shot_prompt_layout(shots):
    shape = common.SMOKE_SHAPE
    ids = common.few_shot_ids(shape, 2, shots, 5, 2, torch.Generator().manual_seed(0))
    assert ids.shape == (2, 1 + shots * 7 + 3)
    assert ((ids == shape.image_token_id).sum(1) == shots + 1).all()
    assert ((ids == shape.eoc_token_id).sum(1) == shots).all()
    assert (ids[:, -3] == shape.image_token_id).all()


def test_peak_memory_counts_live_tensors():
    def allocate():
        kept = torch.zeros(1024, 256)  # 1 MiB, alive to the end
        torch.zeros(1024, 256) + kept  # 1 MiB operand and 1 MiB result alive together
        return kept

    assert common.peak_memory_mib(allocate, torch.device("cpu")) == pytest.approx(3.0)


def test_ptb_tokenizer_benchmark_counts_agreement():
    if not java_available():
        pytest.skip("java is not installed: the benchmark compares with the Java tokenizer")
    results = ptb_tokenizer.main(["--captions", "40", "--hard", "20"])
    captions = results["COCO-style captions"]
    assert captions["strings"] == captions["scored"] == captions["raw"] == 40
    assert 0 < results["hard strings"]["scored"] <= 20
