"""Generation: cached decoding equals recomputation, prefix reuse, call counts, decoding modes."""

from __future__ import annotations

import pytest
import torch

from flamingo_kit.from_scratch import open_gates
from tests.conftest import build_model, random_image


def reference_greedy(model, ids, mask, pixels, max_new, stop):
    """Recompute the whole forward at every step: no cache of any kind."""
    out = []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
        logits[:, model.image_token_id] = float("-inf")
        token = logits.argmax(-1).masked_fill(done, stop[-1])
        out.append(token)
        done |= torch.isin(token, torch.tensor(stop))
        if done.all():
            break
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(token[:, None])], 1)
    return torch.stack(out, 1)


def prompts_with(counts, seed=0):
    """One prompt per entry of ``counts``, holding that many images."""
    prompts = []
    for i, n in enumerate(counts):
        items = ["Question: what is here?"]
        for j in range(n):
            items += [random_image(seed + 10 * i + j), f"Output: thing {j}<|endofchunk|>"]
        prompts.append(items + ["Output:"])
    return prompts


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_cached_greedy_equals_full_recomputation(processor, family, policy):
    model = build_model(family, processor=processor, media_policy=policy).eval()
    open_gates(model, 1.0)
    batch = processor(prompts_with([1, 3, 5]), padding_side="left")
    stop = [model.eoc_token_id, 2]
    ours = model.generate(**batch, max_new_tokens=8)
    ref = reference_greedy(model, batch["input_ids"], batch["attention_mask"],
                           batch["pixel_values"], 8, stop)
    assert torch.equal(ours, ref)


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    return calls


def test_prefix_reuse_gives_full_prompt_tokens_and_runs_prefix_once(processor):
    model = build_model("llama", processor=processor).eval()
    open_gates(model, 1.0)
    demos = prompts_with([4], seed=100)[0][:-1]  # 4-shot prefix without the final "Output:"
    queries = [[random_image(200 + q), f"Question: item {q}? Short answer:"] for q in range(10)]
    full = processor([demos + q for q in queries], padding_side="left")
    expected = model.generate(**full, max_new_tokens=6)

    vision_calls = count_calls(model.vision.tower)
    lm_calls = []
    model.lm.base_model.register_forward_pre_hook(
        lambda m, a, kw: lm_calls.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    prefix_batch = processor([demos])
    state = model.prefill(**prefix_batch)
    prefix_len = prefix_batch["input_ids"].shape[1]
    assert vision_calls == [4] and lm_calls == [prefix_len]
    query = processor(queries, padding_side="left", add_special_tokens=False)
    got = model.generate(**query, prefix=state, max_new_tokens=6)
    assert torch.equal(got, expected)
    assert vision_calls == [4, 10]  # the prefix images were not encoded again
    assert prefix_len not in lm_calls[1:]  # no forward over the prefix again


def test_beam_search_encodes_each_image_once(processor):
    model = build_model("llama", processor=processor).eval()
    open_gates(model, 0.5)
    batch = processor(prompts_with([1, 3]), padding_side="left")
    calls = count_calls(model.vision.tower)
    out = model.generate(**batch, num_beams=3, max_new_tokens=5)
    assert calls == [4]  # 4 distinct images in the batch, encoded once
    assert out.shape[0] == 2 and out.shape[1] <= 5


def test_beam_search_with_one_beam_matches_greedy(processor):
    model = build_model("gpt2", processor=processor).eval()
    open_gates(model, 0.5)
    batch = processor(prompts_with([2]), padding_side="left")
    greedy = model.generate(**batch, max_new_tokens=6, eos_token_id=[])
    beam = model.generate(**batch, num_beams=3, max_new_tokens=6, eos_token_id=[])
    assert beam.shape == greedy.shape == (1, 6)
    # The beam's best sequence is at least as likely as the greedy one.
    def logprob(new):
        ids = torch.cat([batch["input_ids"], new], 1)
        mask = torch.ones_like(ids)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
        logp = logits[:, -new.shape[1] - 1 : -1].log_softmax(-1)
        return logp.gather(-1, new[..., None]).sum()
    assert logprob(beam) >= logprob(greedy) - 1e-4


def test_sampling_is_seeded_and_respects_limits(processor):
    model = build_model("llama", processor=processor).eval()
    batch = processor(prompts_with([1, 2]), padding_side="left")
    kwargs = dict(do_sample=True, temperature=1.5, top_p=0.9, top_k=50, max_new_tokens=7)
    a = model.generate(**batch, seed=3, **kwargs)
    b = model.generate(**batch, seed=3, **kwargs)
    c = model.generate(**batch, seed=4, **kwargs)
    assert torch.equal(a, b) and a.shape[1] <= 7
    assert not torch.equal(a, c)
    assert not (a == model.image_token_id).any()


def test_stops_at_end_of_chunk_and_pads(processor):
    model = build_model("llama", processor=processor).eval()
    with torch.no_grad():  # make <|endofchunk|> the most likely token right away
        model.media_tokens.head.bias[1] = 1e4
    batch = processor(prompts_with([1, 2]), padding_side="left")
    out = model.generate(**batch, max_new_tokens=5)
    assert out.tolist() == [[model.eoc_token_id], [model.eoc_token_id]]
    full = model.generate(**batch, max_new_tokens=5, return_prompt=True)
    assert torch.equal(full[:, :-1], batch["input_ids"])
    assert processor.batch_decode(out) == ["", ""]


def test_right_padded_prompts_are_rejected(processor):
    model = build_model("llama", processor=processor)
    batch = processor(["a", "a longer prompt"], padding_side="right")
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(**batch)


def test_forward_after_a_prefix_scores_like_the_full_sequence(processor):
    model = build_model("llama", processor=processor).eval()
    open_gates(model, 1.0)
    context = [random_image(1), "Output: a red circle<|endofchunk|>", random_image(2), "Output:"]
    prefix = processor([context])
    answers = processor([" a blue", " a green square now"], padding_side="right",
                        add_special_tokens=False)
    state = model.prefill(**prefix)
    with torch.no_grad():
        cont = model(**answers, prefix=state).logits
        for row in range(2):
            n = int(answers["attention_mask"][row].sum())
            ids = torch.cat([prefix["input_ids"][0], answers["input_ids"][row, :n]])[None]
            full = model(input_ids=ids, pixel_values=prefix["pixel_values"]).logits
            assert torch.allclose(full[0, -n:], cont[row, :n], atol=1e-5)
            assert torch.allclose(full[0, -n - 1], state.logits[0], atol=1e-5)
