"""Stage 1: causal-LM pretraining of a small decoder and its sentencepiece tokenizer.

Exists because no pretrained LM can be downloaded offline; with a real checkpoint, skip it and
point the Flamingo stage at that directory. ``RUN/final`` loads with ``AutoTokenizer`` and
``AutoModelForCausalLM``.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit.from_scratch import lm_config
from flamingo_kit.loss import causal_lm_loss
from train.atomic import atomic_directory
from train.config import TrainConfig
from train.distributed import DistInfo, barrier
from train.packing import CopyWarmupLoader, PackedBlockLoader, pack_documents
from train.stages import Batch, StageParts, count_attended_tokens

TOKENIZER_DIR = "tokenizer"


def read_corpus(path: str) -> list[str]:
    """Non-empty lines of a one-document-per-line text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"LM corpus not found: {path}; write one with `flamingo-data synth --out DIR` and "
            "pass lm.corpus=DIR/corpus.txt"
        )
    with open(path, encoding="utf-8") as f:
        docs = [line.strip() for line in f]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"LM corpus {path} is empty")
    return docs


def prepare_tokenizer(cfg: TrainConfig, docs: list[str], dist: DistInfo):
    """Train the tokenizer once (rank 0) into ``RUN/tokenizer``; every rank loads it from disk.

    Loading from disk on every rank, and on resume, guarantees identical ids everywhere. The
    media tokens are not added: like any real LM, this one does not know them, and the Flamingo
    stage adds them beside the frozen vocabulary. The directory appears whole or not at all
    (``train.atomic``), so a run killed while saving it trains it again on the next run.
    """
    directory = os.path.join(cfg.run_dir, TOKENIZER_DIR)
    if dist.is_main and not os.path.isdir(directory):
        tokenizer = train_tokenizer(docs, vocab_size=cfg.lm.tokenizer_vocab_size,
                                    add_media_tokens=False)
        with atomic_directory(directory) as tmp:
            tokenizer.save_pretrained(tmp)
    barrier()
    return AutoTokenizer.from_pretrained(directory)


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the packed block."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_loss(out.logits, batch["labels"])


def build(cfg: TrainConfig, dist: DistInfo) -> StageParts:
    """Tokenizer, packed corpus, randomly initialised LM of the configured family and shape."""
    stage = cfg.lm
    if stage.block_size > stage.model.max_positions:
        raise ValueError(f"lm.block_size={stage.block_size} exceeds "
                         f"lm.model.max_positions={stage.model.max_positions}")
    docs = read_corpus(stage.corpus)
    tokenizer = prepare_tokenizer(cfg, docs, dist)
    token_lists = tokenizer(docs, add_special_tokens=False)["input_ids"]
    blocks = pack_documents(token_lists, tokenizer.eos_token_id, stage.block_size)
    loader = PackedBlockLoader(blocks, cfg.deepspeed.micro_batch_size, seed=cfg.seed,
                               rank=dist.rank, world_size=dist.world_size)
    if stage.copy_warmup_steps or stage.copy_fraction:
        special = set(tokenizer.all_special_ids)
        loader = CopyWarmupLoader(
            loader, [i for i in range(len(tokenizer)) if i not in special],
            warmup_steps=stage.copy_warmup_steps, fraction=stage.copy_fraction,
            seed=cfg.seed * 7919 + dist.rank)
    shape = stage.model
    config = lm_config(shape.family, vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                       num_layers=shape.num_layers, num_heads=shape.num_heads,
                       intermediate_size=shape.intermediate_size,
                       max_positions=shape.max_positions)
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)

    def export(module: torch.nn.Module, directory: str) -> None:
        module.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return StageParts(model=model, loader=loader, loss=lm_loss, export=export,
                      count_tokens=count_attended_tokens)
