"""Shared fixtures: a tiny tokenizer, image processor and Flamingo model built offline, the tiny
training world (:mod:`tests.train_world`) and a one-process rendezvous."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from flamingo_kit import FlamingoModel, FlamingoProcessor, from_scratch  # noqa: E402
from tests.train_world import build_world  # noqa: E402

CORPUS = [
    "A red circle is above a blue square.",
    "Question: what colour is the circle? Short answer: red",
    "Output: two green triangles and a yellow star.",
    "The cat sits on the mat. It is small.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    """A 300-piece BPE tokenizer (ids 300/301 are <image>/<|endofchunk|>)."""
    from data_pipelines.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="session")
def image_processor():
    return from_scratch.image_processor(32)


@pytest.fixture
def processor(tokenizer, image_processor):
    return FlamingoProcessor(tokenizer, image_processor)


def random_image(seed: int, size: int = 32) -> Image.Image:
    """A deterministic noise image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def build_model(family: str = "llama", processor=None, seed: int = 0, **overrides) -> FlamingoModel:
    """A tiny Flamingo model whose LM vocabulary matches the test tokenizer (300)."""
    lm = from_scratch.build_lm(family, seed=seed, vocab_size=300)
    vision = from_scratch.build_vision("clip", seed=seed)
    return from_scratch.build_flamingo(lm, vision, seed, processor, **overrides)


@torch.no_grad()
def randomize_all(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give EVERY parameter random values of a trained-like scale (for equivalence tests).

    Several parameters start at zero (tanh gates, media-position and frame embeddings) or at a
    shared value (new-token rows), which hides bugs that only show once they have trained.
    Gates get magnitudes in [0.3, 1.2] with random signs; norm scales 1 + N(0, 0.1^2); other
    vectors (biases) N(0, 0.1^2); latents and media-position/frame embeddings N(0, 1); every
    other matrix (weights, embedding tables, new-token rows) N(0, 1/width).
    """
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for leaf, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights: randomise once
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen)
            if leaf.endswith("gate"):
                sign = torch.where(torch.rand(param.shape, generator=gen) < 0.5, -1.0, 1.0)
                value = sign * (0.3 + 0.9 * torch.rand(param.shape, generator=gen))
            elif is_norm and leaf == "weight":
                value = 1.0 + 0.1 * noise
            elif param.dim() == 1:
                value = 0.1 * noise
            elif leaf in ("media_pos_embs", "frame_embs", "latents"):
                value = noise
            else:
                value = noise / param.shape[-1] ** 0.5
            param.copy_(value.to(param.dtype))
    return model


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, str]:
    """The tiny training world (:func:`tests.train_world.build_world`), built once per session."""
    return build_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture
def single_process(monkeypatch):
    """Rendezvous variables of a one-process job on a fresh port, restored afterwards."""
    from train.distributed import free_port

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    yield
