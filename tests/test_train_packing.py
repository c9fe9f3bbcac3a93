"""Packed LM blocks and the copy warm-up that forms induction heads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flamingo_kit.from_scratch import lm_config
from train.packing import CopyWarmupLoader, PackedBlockLoader, pack_documents

TOKENS = list(range(5, 69))  # ids a copy row may use (0-4 stand for special tokens)


def _blocks(n: int = 64, block: int = 32) -> torch.Tensor:
    docs = [[5 + (i * 7 + j) % 60 for j in range(13)] for i in range(n)]
    return pack_documents(docs, eos_id=2, block_size=block)


def _is_copy_row(row: torch.Tensor, segment: int) -> bool:
    return bool((row[segment:] == row[:-segment]).all())


def _loader(warmup: int = 3, fraction: float = 0.25, seed: int = 0) -> CopyWarmupLoader:
    inner = PackedBlockLoader(_blocks(), batch_size=8, seed=seed)
    return CopyWarmupLoader(inner, TOKENS, warmup_steps=warmup, fraction=fraction, segment=8,
                            seed=seed)


def test_warmup_rows_then_fraction():
    batches = [b for _, b in zip(range(6), _loader(warmup=3, fraction=0.25))]
    plain = [b for _, b in zip(range(6), PackedBlockLoader(_blocks(), batch_size=8, seed=0))]
    for step, (batch, ref) in enumerate(zip(batches, plain)):
        ids = batch["input_ids"]
        assert torch.equal(ids, batch["labels"])
        copies = [_is_copy_row(r, 8) for r in ids]
        n_copies = 8 if step < 3 else 2
        assert set(ids[:n_copies].unique().tolist()) <= set(TOKENS)
        if step < 3:
            assert all(copies)
            assert len({tuple(r.tolist()) for r in ids}) == len(ids)  # rows differ
        else:
            assert copies[:2] == [True, True]
            assert torch.equal(ids[2:], ref["input_ids"][2:])  # the text rows are untouched


def test_resume_is_exact():
    full = [b["input_ids"] for _, b in zip(range(7), _loader())]
    first = _loader()
    head = [b["input_ids"] for _, b in zip(range(2), first)]
    resumed = _loader()
    resumed.load_state_dict(first.state_dict())
    tail = [b["input_ids"] for _, b in zip(range(5), resumed)]
    for a, b in zip(full, head + tail):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(warmup_steps=-1), dict(fraction=1.5),
                                    dict(segment=0)])
def test_bad_settings(kwargs):
    inner = PackedBlockLoader(_blocks(), batch_size=8)
    settings = dict(warmup_steps=1, fraction=0.1, segment=8) | kwargs
    with pytest.raises(ValueError):
        CopyWarmupLoader(inner, TOKENS, **settings)


def test_copy_warmup_forms_induction_heads():
    """After the warm-up a 2-layer LM continues a random segment it has never seen."""
    torch.manual_seed(0)
    config = lm_config("llama", vocab_size=70, hidden_size=64, num_layers=2, num_heads=4,
                       max_positions=64)
    lm = AutoModelForCausalLM.from_config(config)
    inner = PackedBlockLoader(_blocks(block=48), batch_size=16, seed=0)
    loader = CopyWarmupLoader(inner, TOKENS, warmup_steps=250, segment=16, seed=0)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=2e-3)
    for _, batch in zip(range(250), loader):
        loss = lm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(123)
    segment = torch.tensor(TOKENS)[torch.randint(len(TOKENS), (8, 16), generator=generator)]
    ids = segment.repeat(1, 3)
    with torch.no_grad():
        logp = lm(input_ids=ids).logits.log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert nll[:, :15].mean() > 3.0  # the first copy is unpredictable
    assert nll[:, 16:].mean() < 0.5  # later copies are read from the context
