"""Train a small sentencepiece BPE tokenizer and expose it as a transformers tokenizer.

No pretrained tokenizer can be downloaded in an offline setting, so the LM pretraining stage and
the tests train one on text they have. The result saves as ``tokenizer.json`` and reloads with
``AutoTokenizer.from_pretrained`` with identical ids.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import sentencepiece as spm
from tokenizers import decoders
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

from flamingo_kit.processing import MEDIA_TOKENS, add_flamingo_tokens

# Byte fallback needs 256 byte pieces plus the specials; below this sentencepiece refuses.
MIN_VOCAB_SIZE = 280


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, add_media_tokens: bool = True
) -> PreTrainedTokenizerBase:
    """Train a byte-fallback BPE tokenizer on ``texts``.

    Byte fallback means any string (digits, unseen words, unicode) encodes without an unknown
    token. With ``add_media_tokens`` the ``<image>`` and ``<|endofchunk|>`` specials are added
    after the trained vocabulary, so their ids are ``vocab_size`` and ``vocab_size + 1``.

    Text right after a special token is split as at the start of a line (sentencepiece's
    ``▁`` prefix on every segment, Llama's "legacy" behaviour): the chunk ``Output: a red
    circle.`` after ``<image>`` gives the pieces the LM was pretrained on (``▁Output :``), not
    ``O ut put :``, which a text corpus never contains. The tokenizer is returned as a plain
    fast tokenizer so that this survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained``
    (``LlamaTokenizer`` rebuilds its pre-tokenizer on load and would drop it).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} with byte fallback, got {vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        n_lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for line in texts:
                line = line.replace("\n", " ").strip()
                if line:
                    f.write(line + "\n")
                    n_lines += 1
        if n_lines == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=1.0,
            hard_vocab_limit=False,
            bos_id=1,
            eos_id=2,
            unk_id=0,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        vocab, _, merges = SentencePieceExtractor(prefix + ".model").extract()
    # legacy=True: the "▁" prefix goes on every text segment, also after special tokens
    llama = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=llama.backend_tokenizer, bos_token=llama.bos_token,
        eos_token=llama.eos_token, unk_token=llama.unk_token, pad_token=llama.eos_token,
        padding_side=llama.padding_side)
    tokenizer.backend_tokenizer.decoder = _decoder([*tokenizer.all_special_tokens, *MEDIA_TOKENS])
    if add_media_tokens:
        add_flamingo_tokens(tokenizer)
    return tokenizer


def _decoder(special_tokens: Iterable[str]) -> decoders.Decoder:
    """sentencepiece decoding without the space that every text segment gets after a special token.

    ``<image>Output:`` encodes as ``<image> ▁Output :``; decoding gives ``<image>Output:`` back.
    """
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    steps += [decoders.Replace(token + " ", token) for token in special_tokens]
    return decoders.Sequence([*steps, decoders.Strip(content=" ", left=1)])
