"""Packed rows: several documents in one row compute exactly what each document computes alone."""

from __future__ import annotations

import pytest
import torch

from flamingo_kit.batching import IGNORE_INDEX
from flamingo_kit.from_scratch import LM_FAMILIES, build_lm
from flamingo_kit.lm_integration import packing_problem
from tests.conftest import build_model, randomize_all

IMG, EOC, PAD = 300, 301, 0
PACKABLE = [f for f in LM_FAMILIES if f not in ("opt", "mpt")]


def make_documents(seed: int, n_docs: int = 5) -> list[dict]:
    """Documents with 0-3 images, text before the first image, varied lengths; every token
    but ``<image>`` and the first is supervised, so the test covers text before images too."""
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for d in range(n_docs):
        n_images = d % 4
        ids = [1] + torch.randint(3, 300, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                  generator=gen).tolist()
        for _ in range(n_images):
            text = torch.randint(3, 300, (int(torch.randint(2, 6, (1,), generator=gen)),),
                                 generator=gen).tolist()
            ids += [IMG] + text + [EOC]
        ids = torch.tensor(ids)
        labels = ids.masked_fill(ids == IMG, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        pixels = torch.randn(n_images, 1, 3, 32, 32, generator=gen)
        docs.append({"ids": ids, "labels": labels, "pixels": pixels,
                     "weight": 0.5 + float(torch.rand(1, generator=gen))})
    return docs


def unpacked_batch(docs: list[dict]) -> dict:
    width = max(len(d["ids"]) for d in docs)
    slots = max(1, max(len(d["pixels"]) for d in docs))
    batch = {"input_ids": torch.full((len(docs), width), PAD),
             "attention_mask": torch.zeros(len(docs), width, dtype=torch.long),
             "labels": torch.full((len(docs), width), IGNORE_INDEX),
             "pixel_values": torch.zeros(len(docs), slots, 1, 3, 32, 32),
             "loss_weights": torch.tensor([d["weight"] for d in docs])}
    for b, d in enumerate(docs):
        n = len(d["ids"])
        batch["input_ids"][b, :n], batch["labels"][b, :n] = d["ids"], d["labels"]
        batch["attention_mask"][b, :n] = 1
        batch["pixel_values"][b, : len(d["pixels"])] = d["pixels"]
    return batch


def packed_batch(rows: list[list[dict]], width: int) -> dict:
    """Rows of documents one after the other, padding as a last document of its own."""
    slots = max(1, max(sum(len(d["pixels"]) for d in row) for row in rows))
    batch = {"input_ids": torch.full((len(rows), width), PAD),
             "position_ids": torch.arange(width).repeat(len(rows), 1),
             "labels": torch.full((len(rows), width), IGNORE_INDEX),
             "pixel_values": torch.zeros(len(rows), slots, 1, 3, 32, 32),
             "loss_weights": torch.zeros(len(rows), width)}
    for b, row in enumerate(rows):
        start, image = 0, 0
        for d in row:
            span = slice(start, start + len(d["ids"]))
            batch["input_ids"][b, span], batch["labels"][b, span] = d["ids"], d["labels"]
            batch["position_ids"][b, span] = torch.arange(len(d["ids"]))
            batch["loss_weights"][b, span] = d["weight"]
            batch["pixel_values"][b, image: image + len(d["pixels"])] = d["pixels"]
            start, image = start + len(d["ids"]), image + len(d["pixels"])
        batch["position_ids"][b, start:] = torch.arange(width - start)
    return batch


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "phi"])
@pytest.mark.parametrize("policy", ["immediate", "all_previous"])
def test_packed_rows_equal_documents_run_alone(family, policy):
    """Loss and every gradient of a packed batch equal those of the same documents unpacked."""
    model = randomize_all(build_model(family, media_policy=policy), seed=1).train()
    docs = make_documents(0)
    rows = [docs[:3], docs[3:]]  # doc 0 has no image; docs 3 and 4 share a row
    width = max(sum(len(d["ids"]) for d in row) for row in rows) + 3  # padding at the end
    want_loss, want = loss_and_grads(model, unpacked_batch(docs))
    got_loss, got = loss_and_grads(model, packed_batch(rows, width))
    assert want_loss > 1.0
    assert torch.allclose(got_loss, want_loss, rtol=0, atol=1e-5), (got_loss, want_loss)
    for name, grad in want.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(got[name], grad, rtol=0, atol=1e-5), name


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_packing_problem_is_measured_per_family(family):
    """OPT and MPT build their attention mask without position ids: packing is refused."""
    problem = packing_problem(build_lm(family, vocab_size=300))
    assert (problem is None) == (family in PACKABLE), problem


def test_stage_trains_unpacked_with_a_warning_when_the_lm_cannot_pack():
    from train.config import FlamingoStage
    from train.stages.flamingo import use_packing

    with pytest.warns(UserWarning, match="OPTForCausalLM lets a token attend to the previous"):
        pack, why = use_packing(FlamingoStage(), build_model("opt"))
    assert not pack and why.startswith("off (OPTForCausalLM")
    assert use_packing(FlamingoStage(), build_model("llama")) == (True, "on")
    assert use_packing(FlamingoStage(packing=False), build_model("llama"))[0] is False


def test_a_tokenizer_larger_than_the_lm_vocabulary_is_refused():
    """Checked once at setup, so training steps need not check their ids (a host sync)."""
    model = build_model("llama")  # LM vocabulary 300, media tokens 300 and 301
    table = model.lm.get_input_embeddings()
    model.media_tokens.embedding.check_vocabulary(302, table)
    with pytest.raises(ValueError, match=r"the tokenizer has 303 ids .* ids \[302\] cannot be"):
        model.media_tokens.embedding.check_vocabulary(303, table)
