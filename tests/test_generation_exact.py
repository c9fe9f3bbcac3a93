"""Exactness of generation on models whose every parameter is random (trained-like).

Prefix reuse (``prefill`` + ``generate(prefix=...)`` / ``forward(prefix=...)``) must compute
exactly the whole prompt: same logits (1e-5, fp32) and same greedy and beam tokens, with images
on both sides of the cut. Beam search must follow transformers' semantics (checked against the
bare LM's own ``generate``) and a query's beams must not depend on the other rows of its batch.
"""

from __future__ import annotations

import pytest
import torch

from flamingo_kit import from_scratch
from tests.conftest import build_model, randomize_all

IMG = object()  # marks an <image> in a list of prompt segments


def ids_of(tokenizer, model, segments, bos: bool = False) -> list[int]:
    """Token ids of text segments and ``IMG`` markers, tokenised piece by piece."""
    ids = [tokenizer.bos_token_id] if bos else []
    for seg in segments:
        if seg is IMG:
            ids.append(model.image_token_id)
        else:
            ids += tokenizer(seg, add_special_tokens=False)["input_ids"]
    return ids


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    return ids, mask


def pixels(images_per_row: list[list[int]], size: int = 32) -> torch.Tensor:
    """``[B, N, 1, 3, H, W]``: image ``k`` is noise seeded by ``k``; zero padding slots."""
    n = max(1, max(len(r) for r in images_per_row))
    out = torch.zeros(len(images_per_row), n, 1, 3, size, size)
    for b, row in enumerate(images_per_row):
        for j, k in enumerate(row):
            out[b, j, 0] = torch.randn(3, size, size, generator=torch.Generator().manual_seed(k))
    return out


def chunk(j: int) -> list:
    return [IMG, f"Output: thing {j} is red", "<|endofchunk|>"]


# Queries of different lengths holding 1 or 2 images (text before, between and after them).
QUERIES = [
    [IMG, "Question: what is here? Short answer:"],
    ["Question:", IMG, "Output: a", "<|endofchunk|>", IMG, "Output:"],
    [IMG, IMG, "Output:"],
    [IMG, "Output: two green triangles and", "<|endofchunk|>", IMG, "Short answer:"],
]


def trim(row: list[int], stop: set[int]) -> list[int]:
    """A generated row up to and including its first stop token (the rest is padding)."""
    end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
    return row[:end]


@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_then_query_is_exactly_the_whole_prompt(tokenizer, family, policy):
    model = randomize_all(build_model(family, processor=tokenizer, media_policy=policy), 1).eval()
    queries = [ids_of(tokenizer, model, q) for q in QUERIES]
    query_images = [[100 + 10 * i + j for j in range(q.count(IMG))] for i, q in enumerate(QUERIES)]
    worst = 0.0
    for n_prefix in (1, 2, 3):
        prefix = ids_of(tokenizer, model, [s for j in range(n_prefix) for s in chunk(j)], bos=True)
        prefix_images = list(range(n_prefix))
        state = model.prefill(torch.tensor([prefix]), pixel_values=pixels([prefix_images]))
        q_ids, q_mask = left_pad(queries)
        q_pixels = pixels(query_images)
        whole_ids, whole_mask = left_pad([prefix + q for q in queries])
        whole_pixels = pixels([prefix_images + imgs for imgs in query_images])
        whole = dict(input_ids=whole_ids, attention_mask=whole_mask, pixel_values=whole_pixels)
        after = dict(input_ids=q_ids, attention_mask=q_mask, pixel_values=q_pixels, prefix=state)

        for kwargs in (dict(), dict(num_beams=3), dict(num_beams=3, length_penalty=0.0)):
            expected = model.generate(**whole, max_new_tokens=8, **kwargs)
            got = model.generate(**after, max_new_tokens=8, **kwargs)
            assert torch.equal(got, expected), (n_prefix, kwargs)

        # Logits over the query and 8 generated tokens (the decoding positions too).
        new = model.generate(**whole, max_new_tokens=8, eos_token_id=[])
        with torch.no_grad():
            full = model(input_ids=torch.cat([whole_ids, new], 1),
                         attention_mask=torch.cat([whole_mask, torch.ones_like(new)], 1),
                         pixel_values=whole_pixels).logits
            cont = model(input_ids=torch.cat([q_ids, new], 1),
                         attention_mask=torch.cat([q_mask, torch.ones_like(new)], 1),
                         pixel_values=q_pixels, prefix=state).logits
        n_cont = cont.shape[1]
        diff = (full[:, -n_cont:] - cont).abs() * torch.cat([q_mask, torch.ones_like(new)], 1)[..., None]
        worst = max(worst, float(diff.max()))
        last_prefix = whole_ids.shape[1] - q_ids.shape[1] + (q_mask == 0).sum(1) - 1
        before_query = full[torch.arange(len(queries)), last_prefix]
        worst = max(worst, float((before_query - state.logits).abs().max()))
        assert full.abs().max() > 1.0  # logits of a scale where 1e-5 is a real test
    print(f"{family} {policy}: max |logit difference| prefix vs whole prompt = {worst:.2e}")
    assert worst < 1e-5


def test_loss_after_a_prefix_equals_the_whole_prompt_loss(tokenizer):
    model = randomize_all(build_model("llama", processor=tokenizer), 2).eval()
    prefix = ids_of(tokenizer, model, chunk(0) + chunk(1), bos=True)
    state = model.prefill(torch.tensor([prefix]), pixel_values=pixels([[0, 1]]))
    conts = [ids_of(tokenizer, model, q) for q in QUERIES[:3]]
    width = max(len(c) for c in conts)
    ids = torch.zeros(len(conts), width, dtype=torch.long)  # right-padded continuations
    mask = torch.zeros_like(ids)
    for b, c in enumerate(conts):
        ids[b, : len(c)], mask[b, : len(c)] = torch.tensor(c), 1
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    labels[0, 0] = -100  # some label left out on purpose
    images = [[10 + 10 * b + j for j in range(c.count(model.image_token_id))]
              for b, c in enumerate(conts)]
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(images),
                     labels=labels, prefix=state).loss
        whole_ids = torch.cat([torch.tensor([prefix]).expand(len(conts), -1), ids], 1)
        whole_mask = torch.cat([torch.ones(len(conts), len(prefix), dtype=torch.long), mask], 1)
        whole_labels = torch.cat([torch.full((len(conts), len(prefix)), -100), labels], 1)
        whole = model(input_ids=whole_ids, attention_mask=whole_mask, labels=whole_labels,
                      pixel_values=pixels([[0, 1] + imgs for imgs in images])).loss
    assert torch.allclose(loss, whole, atol=1e-6), (float(loss), float(whole))


# -- beam search -----------------------------------------------------------------------------

TEXT_PROMPTS = [
    "Question: what colour is the circle? Short answer:",
    "A red circle",
    "The cat sits on the mat. It is small. Output: two green triangles and",
    "Output:",
]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_beam_search_equals_transformers(tokenizer, family, early_stopping, length_penalty):
    """Gates closed, text only: our beam search must give the bare LM's HF beam search output."""
    model = build_model(family, processor=tokenizer).eval()
    reference = from_scratch.build_lm(family, seed=0, vocab_size=300).eval()  # same weights, untouched
    with torch.no_grad():  # <|endofchunk|> out of the vocabulary: the bare LM has no such token
        model.media_tokens.head.bias[1] = -1e9
    rows = [ids_of(tokenizer, model, [p], bos=True) for p in TEXT_PROMPTS]
    ids, mask = left_pad(rows, pad=3)
    # Frequent tokens of this random LM end hypotheses at different steps.
    eos = [2, *torch.bincount(model.generate(ids, mask, max_new_tokens=12, eos_token_id=[])
                              .flatten()).topk(2).indices.tolist()]
    kwargs = dict(num_beams=3, max_new_tokens=10, eos_token_id=eos, pad_token_id=3,
                  length_penalty=length_penalty, early_stopping=early_stopping)
    ours = model.generate(ids, mask, **kwargs)
    theirs = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
    assert ours.tolist() == theirs[:, ids.shape[1]:].tolist()
    if length_penalty <= 1.0:  # (2.0 favours long hypotheses: all run to max_new_tokens)
        lengths = {len(trim(r, set(eos))) for r in ours.tolist()}
        assert len(lengths) > 1  # hypotheses of several lengths: finishing matters


def batch_query(tokenizer, model, i: int) -> tuple[list[int], list[int]]:
    """Query ``i`` of a varied set: 1-3 images, different text lengths."""
    n_images = 1 + i % 3
    segments = ["Question: thing " * (i % 4)]
    for j in range(n_images):
        segments += [IMG, f"Output: {'red ' * ((i + j) % 3)}circle", "<|endofchunk|>"]
    return ids_of(tokenizer, model, segments + [IMG, "Output:"], bos=True), \
        [1000 + 10 * i + j for j in range(n_images + 1)]


@pytest.mark.parametrize("early_stopping", [False, True])
def test_beam_search_does_not_depend_on_batch_mates(tokenizer, early_stopping):
    model = randomize_all(build_model("llama", processor=tokenizer), 4).eval()
    with torch.no_grad():  # <|endofchunk|> likely enough that beams end at different steps
        model.media_tokens.head.bias[1] = 1.5
    queries = [batch_query(tokenizer, model, i) for i in range(8)]
    stop = {model.eoc_token_id, 2}

    def run(indices):
        ids, mask = left_pad([queries[i][0] for i in indices])
        out = model.generate(ids, mask, pixels([queries[i][1] for i in indices]), num_beams=3,
                             max_new_tokens=10, early_stopping=early_stopping)
        return {i: trim(row, stop) for i, row in zip(indices, out.tolist())}

    alone = {}
    for i in range(8):
        alone.update(run([i]))
    assert len({len(r) for r in alone.values()}) > 1  # beams end at different steps
    assert run(list(range(8))) == alone
    for group in ([0, 3, 6], [7, 1, 4], [2, 5, 0]):
        assert run(group) == {i: alone[i] for i in group}


def test_early_stopping_is_checked():
    model = build_model("llama")
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(torch.tensor([[5, 6]]), num_beams=2, early_stopping="sometimes")
