"""A tiny synthetic world for the trainer tests: corpus, tokenizer, towers, pair and doc shards.

Everything is a few kilobytes and built in seconds so each stage can run for real on CPU; the
``world`` fixture (``tests/conftest.py``) builds it once per session. Also the settings that point
each stage at it, and a runner of ``python -m train`` in a fresh process.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

from PIL import Image, ImageDraw

from data_pipelines.shards import interleaved_sample, png_bytes, write_shards
from data_pipelines.tokenizer import train_tokenizer
from flamingo_kit import from_scratch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
          "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
IMAGE_SIZE = 32


def draw(color: str, shape: str, size: int = IMAGE_SIZE) -> Image.Image:
    """One coloured shape on a white background."""
    image = Image.new("RGB", (size, size), "white")
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    painter = ImageDraw.Draw(image)
    (painter.rectangle if shape == "square" else painter.ellipse)(box, fill=COLORS[color])
    return image


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}."


def write_corpus(path: str, n_docs: int = 300, seed: int = 0) -> str:
    """Short repetitive English-like documents, one per line."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sentences = [f"there is {caption(rng.choice(list(COLORS)), rng.choice(SHAPES))}"
                         for _ in range(rng.randint(1, 3))]
            f.write(" ".join(sentences) + "\n")
    return path


def _random_objects(rng: random.Random, n: int):
    return [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(n)]


def write_pairs(directory: str, n: int = 48, seed: int = 0) -> str:
    """Pair shards: ``KEY.png`` + ``KEY.txt``."""
    rng = random.Random(seed)
    samples = ({"__key__": f"p{i:05d}", "png": png_bytes(draw(c, s)),
                "txt": caption(c, s).encode()} for i, (c, s) in enumerate(_random_objects(rng, n)))
    write_shards(samples, directory, "pairs", shard_size=max(1, n // 2))
    return directory


def write_docs(directory: str, n: int = 32, seed: int = 0) -> str:
    """Interleaved shards: each document shows 2 images, each followed by its caption."""
    rng = random.Random(seed)

    def items(objects):
        for c, s in objects:
            yield draw(c, s)
            yield f"this is {caption(c, s)}"

    samples = (interleaved_sample(f"d{i:05d}", list(items(_random_objects(rng, 2))))
               for i in range(n))
    write_shards(samples, directory, "docs", shard_size=max(1, n // 2))
    return directory


def build_world(root: str) -> dict[str, str]:
    """Write the whole tiny world under ``root``; return its paths by name."""
    corpus = write_corpus(os.path.join(root, "corpus.txt"))
    with open(corpus) as f:
        tokenizer = train_tokenizer(f.read().splitlines(), vocab_size=300,
                                    add_media_tokens=False)
    tokenizer_dir = os.path.join(root, "tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    lm_dir = os.path.join(root, "lm")
    from_scratch.build_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_layers=2,
                  num_heads=2).save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    vision_dir = os.path.join(root, "vision")
    from_scratch.build_vision("clip", image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_layers=1,
                      num_heads=2).save_pretrained(vision_dir)
    from_scratch.image_processor(IMAGE_SIZE).save_pretrained(vision_dir)
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer_dir, "lm": lm_dir,
            "vision": vision_dir, "pairs": write_pairs(os.path.join(root, "pairs")),
            "docs": write_docs(os.path.join(root, "docs")),
            "heldout_pairs": write_pairs(os.path.join(root, "heldout", "pairs"), n=16, seed=1),
            "heldout_docs": write_docs(os.path.join(root, "heldout", "docs"), n=8, seed=1)}


def common_overrides(run_dir: str, steps: int) -> list[str]:
    """Settings every test run shares: quiet, fast, fp32, single process."""
    return [f"run_dir={run_dir}", f"steps={steps}", "logging.progress=false",
            "logging.tensorboard=false", f"checkpoint.every={max(steps, 1)}",
            "optim.warmup_steps=2", "deepspeed.micro_batch_size=4"]


def stage_overrides(world: dict[str, str], stage: str) -> list[str]:
    """Point a stage at the tiny world with tiny shapes."""
    if stage == "lm":
        return ["stage=lm", f"lm.corpus={world['corpus']}", "lm.block_size=32",
                "lm.tokenizer_vocab_size=300", "lm.model.hidden_size=32", "lm.model.num_heads=2",
                "optim.lr=3e-3"]
    if stage == "contrastive":
        return ["stage=contrastive", f"contrastive.shards={world['pairs']}",
                f"contrastive.tokenizer={world['tokenizer']}", "contrastive.max_length=16",
                "contrastive.embed_dim=32", "contrastive.vision.hidden_size=32",
                "contrastive.vision.num_heads=2", "contrastive.vision.num_layers=1",
                "contrastive.text.hidden_size=32", "contrastive.text.num_heads=2",
                "contrastive.text.num_layers=1", "optim.lr=2e-3"]
    if stage == "flamingo":
        sources = (f"[{{name: docs, kind: interleaved, shards: {world['docs']}, weight: 1.0, "
                   f"loss_weight: 1.0}}, {{name: pairs, kind: pairs, shards: {world['pairs']}, "
                   "weight: 0.5, loss_weight: 0.5}]")
        heldout = (f"[{{name: pairs, kind: pairs, shards: {world['heldout_pairs']}}}, "
                   f"{{name: docs, kind: interleaved, shards: {world['heldout_docs']}}}]")
        model = ("{cross_attn_every_n_layers: 1, perceiver_num_latents: 4, perceiver_depth: 1, "
                 "perceiver_heads: 2, perceiver_dim_head: 16, xattn_heads: 2, xattn_dim_head: 16}")
        return ["stage=flamingo", f"flamingo.lm={world['lm']}",
                f"flamingo.vision={world['vision']}", f"flamingo.sources={sources}",
                f"flamingo.heldout_sources={heldout}", "logging.image_reliance_samples=8",
                f"flamingo.model={model}", "flamingo.max_length=48", "flamingo.max_images=2",
                "optim.lr=3e-3"]
    raise ValueError(stage)


def run_cli(args: list[str], timeout: float = 300, launcher: list[str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run ``python -m train ARGS`` (or ``LAUNCHER ARGS``) in a fresh process, as users do."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = (launcher or [sys.executable, "-m", "train"]) + list(args)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
