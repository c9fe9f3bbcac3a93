"""Prefix reuse (one shared demo set, prefilled once) gives the same predictions as whole prompts."""

from dataclasses import replace

import pytest
import torch

from eval_fewshot.inference import FewShotModel, TokenBoundaryError
from eval_fewshot.prompts import build_prompt
from eval_fewshot.runner import EvalConfig, Evaluator
from eval_fewshot.tasks import get_task
from eval_fewshot.toy import build_toy_model, write_toy_eval_sets
from flamingo_kit import FlamingoModel, FlamingoProcessor


@torch.no_grad()
def rank_uncached(model: FewShotModel, prompt, choices) -> list[float]:
    """The reference for ``FewShotModel.rank``: no prefix cache, the whole prompt repeated for
    every choice, each choice scored by the mean log-probability of its tokens."""
    context, conts = model._choice_ids(prompt.text, choices)
    rows = [context + c for c in conts]
    batch = model._collate(rows, [prompt.images] * len(rows), side="right")
    logp = torch.log_softmax(model.model(**batch).logits.float(), dim=-1)
    scores = []
    for b, c in enumerate(conts):
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(c))
        targets = torch.tensor(c, device=logp.device)
        scores.append(float(logp[b, positions, targets].mean()))
    return scores


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    world = write_toy_eval_sets(str(root / "world"), seed=1)
    model_dir = build_toy_model(str(root / "model"), seed=1)
    torch.manual_seed(0)
    model = FewShotModel(FlamingoModel.from_pretrained(model_dir),
                         FlamingoProcessor.from_pretrained(model_dir))
    return world, model


def test_generation_after_prefix_equals_whole_prompts(toy):
    world, model = toy
    task = get_task("synth_vqa")
    data = task.load(world)
    demos, queries = data.pools[""][:4], data.queries[:6]
    prompts = [build_prompt(task.template, demos, q) for q in queries]
    whole = model.generate(prompts, max_new_tokens=6)
    state, query_ids = model.prefill(prompts[0].context, prompts[0].context_images,
                                     [p.query for p in prompts])
    reused = model.generate_after_prefix(state, query_ids, [p.query_image for p in prompts], 6)
    assert reused == whole
    assert len(set(whole)) > 1  # images change the answers, so the check has teeth


def test_evaluator_predictions_identical_with_and_without_prefix_reuse(toy):
    world, model = toy
    task = get_task("synth_vqa", num_beams=2)
    data = task.load(world)

    def predictions(prefix_reuse: bool):
        config = EvalConfig(shots=[0, 3], trials=2, fixed_demos=True, prefix_reuse=prefix_reuse,
                            batch_size=4)
        results = Evaluator(task, data, model, config).run()
        return [[r["raw_prediction"] for t in res.trials for r in t["predictions"]]
                for res in results]

    assert predictions(True) == predictions(False)


def test_rank_with_cached_context_equals_uncached(toy):
    world, model = toy
    task = get_task("synth_label_binding")
    data = task.load(world)
    query = data.queries[0]
    prompt = build_prompt(task.template, data.pools[query.pool][:4], query)
    choices = data.choices[query.pool] + ["a longer answer"]
    cached = model.rank(prompt, choices)
    assert cached == pytest.approx(rank_uncached(model, prompt, choices), abs=1e-4)
    assert len(set(round(s, 4) for s in cached)) == len(choices)


def test_prefix_ids_raises_its_own_error_at_a_merging_boundary(toy):
    _, model = toy
    # "re" + "d" tokenise apart, but "red" inside the whole prompt is one token.
    assert model.prefix_ids("Output: red", ["<image>Output:"])
    with pytest.raises(TokenBoundaryError):
        model.prefix_ids("Output: re", ["d circle"])


def test_only_token_boundary_errors_fall_back_to_whole_prompts(toy, monkeypatch):
    """Another ValueError from prefill (e.g. too many images for the perceiver) must surface."""
    world, model = toy
    task = get_task("synth_vqa", num_beams=1, max_new_tokens=3)
    data = task.load(world)
    config = EvalConfig(shots=[2], trials=1, fixed_demos=True, limit=4)
    whole = Evaluator(task, data, model, replace(config, prefix_reuse=False)).run()

    def overflow(*args, **kwargs):
        raise ValueError("image position 2 exceeds perceiver_max_media=2")

    monkeypatch.setattr(model, "prefill", overflow)
    with pytest.raises(ValueError, match="perceiver_max_media"):
        Evaluator(task, data, model, config).run()

    def boundary(*args, **kwargs):
        raise TokenBoundaryError("query 'x' does not tokenise the same after the context")

    monkeypatch.setattr(model, "prefill", boundary)
    fallback = Evaluator(task, data, model, config).run()
    assert fallback[0].trials[0]["predictions"] == whole[0].trials[0]["predictions"]
