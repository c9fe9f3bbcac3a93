"""Trainer throughput on a realistic document mix: flamingo-kit packed and unpacked vs HF IDEFICS.

Every configuration runs the trainer's own step, ``train.recipe.train_step``: the next batch from
the mixture loader (decode, tokenise, image transform), the DeepSpeed engine's forward, loss,
backward and AdamW step (ZeRO 0, one process), the finiteness check and the bookkeeping.

- ours packed: ``train.recipe.setup`` of a Flamingo-stage config, ``flamingo.packing=true``:
  ``--rows`` rows of ``--max-length`` tokens, several documents per row.
- ours unpacked: the same with ``flamingo.packing=false``: ``--batch-size`` documents per batch,
  right-padded to the longest.
- IDEFICS: ``IdeficsForVisionText2Text`` of the matched shape (``benchmarks.common``) in a
  DeepSpeed engine built by ``train.engine.build_engine`` with the same settings, stepped by the
  same ``train_step``, fed the unpacked batches as its processor builds them (padded to the
  longest document and to the largest image count, every image slot encoded, the
  ``image_attention_mask`` of each token's latest image). Its loss is the trainer's loss
  function on its logits (its own ``labels`` path crashes with ``additional_vocab_size > 0``).

The documents are OBELICS-like: 1-6 images and 20-400 tokens each, text before the first image
in most, text segments of random length between images; written as webdataset shards in a
temporary directory with a tokenizer trained on them. Reported per configuration: supervised
tokens/s (tokens whose next-token loss is trained), images/s, documents/s, seconds per step,
tokens per step (real and as run, padding included), and peak memory of one step.

Run: ``python -m benchmarks.trainer_throughput [--threads 1] [--profile]``.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from benchmarks.common import (
    DTYPES,
    SMOKE_SHAPE,
    MatchedShape,
    benchmark_parser,
    build_idefics,
    idefics_image_attention_mask,
    ours_flamingo_config,
    ours_lm,
    ours_vision,
    peak_memory_mib,
    setup_process,
    with_overrides,
)
from eval_fewshot.report import markdown_table

CONFIGS = ("ours packed", "ours unpacked", "IDEFICS")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi",
             "ja", "pe", "qu", "ze", "xo", "wy", "cy")


@dataclass
class Mix:
    """The spread of the synthetic documents."""

    documents: int = 240
    images: tuple[int, int] = (1, 6)
    tokens: tuple[int, int] = (20, 400)


def words(rng: random.Random, n: int) -> str:
    """``n`` pseudo-words of 1-3 syllables (a few thousand distinct words)."""
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
                    for _ in range(n))


def document(rng: random.Random, mix: Mix, image_size: int, tokens_per_word: float) -> list:
    """One document: text and noise images in reading order, with a number of tokens drawn
    from ``mix.tokens`` (each image adds ``<image>`` and ``<|endofchunk|>``, plus BOS/EOS)."""
    from PIL import Image

    n_images = rng.randint(*mix.images)
    n_words = max(n_images + 1,
                  round((rng.randint(*mix.tokens) - 2 * n_images - 2) / tokens_per_word))
    cuts = sorted(rng.sample(range(1, n_words), n_images - 1)) if n_images > 1 else []
    first = rng.randint(0, n_words // 3) if rng.random() < 0.7 else 0  # text before image 1
    bounds = [0, first] + [first + (c * (n_words - first)) // n_words for c in cuts] + [n_words]
    items = [words(rng, first)] if first else []
    for i in range(n_images):
        pixels = bytes(rng.getrandbits(8) for _ in range(image_size * image_size * 3))
        items.append(Image.frombytes("RGB", (image_size, image_size), pixels))
        items.append(words(rng, max(1, bounds[i + 2] - bounds[i + 1])))
    return items


def write_world(root: str, shape: MatchedShape, mix: Mix, seed: int) -> tuple[str, MatchedShape]:
    """Shards, tokenizer, LM and vision directories under ``root``; the shape with the
    tokenizer's vocabulary size (the LM's)."""
    from data_pipelines.shards import interleaved_sample, write_shards
    from data_pipelines.tokenizer import train_tokenizer
    from flamingo_kit import from_scratch

    rng = random.Random(seed)
    corpus = [words(rng, 50) for _ in range(2000)]
    tokenizer = train_tokenizer(corpus, vocab_size=shape.vocab_size, add_media_tokens=False)
    shape = with_overrides(shape, vocab_size=len(tokenizer))
    per_word = (sum(len(ids) for ids in tokenizer(corpus[:200], add_special_tokens=False)[
        "input_ids"]) / (200 * 50))
    docs = [document(rng, mix, shape.image_size, per_word) for _ in range(mix.documents)]
    write_shards((interleaved_sample(f"doc{i:05d}", doc) for i, doc in enumerate(docs)),
                 os.path.join(root, "docs"), "docs", shard_size=max(1, mix.documents // 4))
    ours_lm(shape, seed).save_pretrained(os.path.join(root, "lm"))
    tokenizer.save_pretrained(os.path.join(root, "lm"))
    ours_vision(shape, seed).save_pretrained(os.path.join(root, "vision"))
    from_scratch.image_processor(shape.image_size).save_pretrained(os.path.join(root, "vision"))
    return root, shape


def trainer_config(root: str, shape: MatchedShape, args, packing: bool):
    """The Flamingo-stage config of one of our two configurations."""
    from train.config import load_config

    sources = f"[{{name: docs, kind: interleaved, shards: {root}/docs}}]"
    model = "{" + ", ".join(f"{k}: {v}" for k, v in ours_flamingo_config(shape).items()) + "}"
    batch = args.rows if packing else args.batch_size
    return load_config(None, [
        "stage=flamingo", f"run_dir={root}/run-{'packed' if packing else 'unpacked'}",
        f"seed={args.seed}", "steps=1000000", "logging.progress=false",
        "logging.tensorboard=false", "logging.image_reliance_every=0", "checkpoint.every=1000000",
        f"deepspeed.precision={'bf16' if args.dtype == 'bf16' else 'fp32'}",
        f"deepspeed.micro_batch_size={batch}", "optim.warmup_steps=1",
        f"flamingo.lm={root}/lm", f"flamingo.vision={root}/vision", f"flamingo.model={model}",
        f"flamingo.max_length={args.max_length}", "flamingo.max_images=6",
        f"flamingo.packing={packing}", f"flamingo.sources={sources}"])


@dataclass
class Tally:
    """What the timed steps of one configuration processed."""

    seconds: float = 0.0
    steps: int = 0
    supervised: int = 0
    images: int = 0
    documents: int = 0
    tokens: int = 0
    tokens_run: int = 0
    memory: float = float("nan")
    losses: list[float] = field(default_factory=list)
    doc_tokens: list[int] = field(default_factory=list)  # unpacked batches: tokens per document
    doc_images: list[int] = field(default_factory=list)


def counted(batches: Iterator[dict], image_token_id: int, tally: list[Tally]) -> Iterator[dict]:
    """The batches, each one added to ``tally[0]`` on the way (the tally in use is swapped)."""
    for batch in batches:
        t = tally[0]
        t.supervised += int((batch["labels"][:, 1:] != -100).sum())
        t.images += int((batch["input_ids"] == image_token_id).sum())
        real = batch["attention_mask"].bool()
        packed_starts = (batch["position_ids"] == 0) & real if "position_ids" in batch else None
        t.documents += int(packed_starts.sum()) if packed_starts is not None else len(real)
        t.tokens += int(real.sum())
        t.tokens_run += batch["input_ids"].numel()
        if packed_starts is None:
            t.doc_tokens += real.sum(1).tolist()
            t.doc_images += (batch["input_ids"] == image_token_id).sum(1).tolist()
        yield batch


def idefics_session(root: str, shape: MatchedShape, args, ours):
    """A trainer session stepping IDEFICS on the unpacked batches of ``ours`` (same loader)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from data_pipelines.loading import SourceConfig, build_loader
    from train.engine import build_engine
    from train.metrics import count_parameters
    from train.recipe import Session
    from train.stages import StageParts, count_attended_tokens

    cfg = trainer_config(root, shape, args, packing=False)
    model = build_idefics(shape, args.seed).train()
    # The loader of ours unpacked, built alike: the same batches in the same order.
    loader = build_loader([SourceConfig("docs", "interleaved", f"{root}/docs")],
                          AutoTokenizer.from_pretrained(f"{root}/lm"),
                          AutoImageProcessor.from_pretrained(f"{root}/vision", backend="pil"),
                          batch_size=args.batch_size, max_length=args.max_length, max_images=6,
                          seed=args.seed)

    def idefics_loss(engine, batch):
        from flamingo_kit.loss import causal_lm_loss

        pixels = batch["pixel_values"][:, :, 0]  # [B, N, C, H, W], as its processor pads them
        mask = idefics_image_attention_mask(batch["input_ids"], shape.image_token_id,
                                            pixels.shape[1])
        out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixels, image_attention_mask=mask)
        return causal_lm_loss(out.logits, batch["labels"])

    parts = StageParts(model=model, loader=loader, loss=idefics_loss, export=lambda *a: None,
                       count_tokens=count_attended_tokens)
    engine = build_engine(model, cfg.deepspeed, cfg.optim, cfg.steps)
    engine.train()
    return Session(cfg=cfg, dist=ours.dist, parts=parts, engine=engine, logger=ours.logger,
                   n_trainable=count_parameters(model)[0], n_frozen=count_parameters(model)[1],
                   data_iter=iter(loader))


def run(args) -> dict[str, Tally]:
    """Build the three sessions in a temporary directory, time them in turn, measure memory;
    ``{config: Tally}``."""
    shape = SMOKE_SHAPE if args.smoke else with_overrides(MatchedShape(), **{
        name: getattr(args, name, None) for name in MatchedShape.__dataclass_fields__})
    shape = with_overrides(shape, vocab_size=max(shape.vocab_size, 300))  # byte-fallback BPE
    mix = Mix(documents=24, tokens=(20, 80), images=(1, 3)) if args.smoke else Mix()
    with tempfile.TemporaryDirectory(prefix="trainer_throughput_") as root:
        root, shape = write_world(root, shape, mix, args.seed)
        print(f"# shape: {shape.describe()}")
        return measure(root, shape, args)


def measure(root: str, shape: MatchedShape, args) -> dict[str, Tally]:
    """The timed rounds, the memory pass and the optional profile of the three sessions."""
    from train.recipe import setup, train_step

    sessions = {"ours packed": setup(trainer_config(root, shape, args, packing=True)),
                "ours unpacked": setup(trainer_config(root, shape, args, packing=False))}
    sessions["IDEFICS"] = idefics_session(root, shape, args, sessions["ours unpacked"])
    tallies = {name: Tally() for name in CONFIGS}
    current = [Tally()]  # warm-up, memory and profile steps are counted here and dropped
    try:
        for s in sessions.values():
            s.data_iter = counted(s.data_iter, shape.image_token_id, current)
            train_step(s)  # warm-up: first-call costs, optimizer state
        for _ in range(args.rounds):  # alternate, so load on a shared machine hits all alike
            for name, s in sessions.items():
                current[0] = tallies[name]
                for _ in range(args.steps_per_round):
                    start = time.perf_counter()
                    metrics = train_step(s)
                    tallies[name].seconds += time.perf_counter() - start
                    tallies[name].steps += 1
                    tallies[name].losses.append(metrics["loss"])
        current[0] = Tally()
        if not args.no_memory:
            for name, s in sessions.items():
                tallies[name].memory = peak_memory_mib(lambda s=s: train_step(s),
                                                       torch.device("cpu"))
        if args.profile:
            profile(sessions)
    finally:
        for s in {id(s.logger): s for s in sessions.values()}.values():
            s.logger.close()
    return tallies


def model_parts(module: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The modules of each part of either model, for the profile's breakdown."""
    from flamingo_kit.lm_integration import find_decoder_layers, flamingo_layers

    if hasattr(module, "perceiver"):  # FlamingoModel
        wrapped = flamingo_layers(module.lm)
        return {"vision tower": [module.vision], "resampler": [module.perceiver],
                "cross-attention": [m for layer in wrapped for m in (layer.xattn,
                                                                      layer.xattn.to_kv)],
                "frozen LM layers": [getattr(layer, "decoder_layer", layer)
                                     for layer in find_decoder_layers(module.lm)],
                "LM head": [module.media_tokens.head]}
    body = module.model  # IdeficsForVisionText2Text
    return {"vision tower": [body.vision_model], "resampler": [body.perceiver_resampler],
            "cross-attention": list(body.gated_cross_attn_layers),
            "frozen LM layers": list(body.layers), "LM head": [module.lm_head]}


def part_times(session, train_step) -> tuple[float, dict[str, tuple[float, float]]]:
    """One step under the torch profiler: its seconds and, per model part, forward and
    backward seconds. Forward ops are attributed to the part whose module they ran in (a
    ``record_function`` range opened by forward hooks, here only); backward ops to the part of
    the forward op that created them (the autograd sequence number links the two)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    parts = model_parts(session.engine.module)
    stack, handles = [], []
    for name, modules in parts.items():
        for module in modules:
            def enter(*_, name=name):
                stack.append(record_function(f"part::{name}"))
                stack[-1].__enter__()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(
                lambda *_: stack.pop().__exit__(None, None, None)))
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            train_step(session)
            seconds = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    part_of_op: dict[int, str] = {}
    forward = dict.fromkeys(parts, 0.0)
    backward = dict.fromkeys(parts, 0.0)
    for event in prof.events():
        if event.name.startswith("part::"):
            outer = event.cpu_parent
            while outer is not None and not outer.name.startswith("part::"):
                outer = outer.cpu_parent
            if outer is None:  # a part inside another part counts for the outer one
                forward[event.name[6:]] += event.cpu_time_total / 1e6
        elif event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            owner = event.cpu_parent
            while owner is not None and not owner.name.startswith("part::"):
                owner = owner.cpu_parent
            if owner is not None:
                part_of_op.setdefault(event.sequence_nr, owner.name[6:])
    for event in prof.events():
        if event.name.startswith("autograd::engine::evaluate_function"):
            part = part_of_op.get(event.sequence_nr)
            if part is not None:
                backward[part] += event.cpu_time_total / 1e6
    return seconds, {name: (forward[name], backward[name]) for name in parts}


def profile(sessions: dict) -> None:
    """One step of each configuration under the torch profiler: time by model part (what the
    rest of the step is: data loading, the layout, loss glue, the optimizer)."""
    from train.recipe import train_step

    for name, s in sessions.items():
        seconds, parts = part_times(s, train_step)
        rows = [[part, 1e3 * f, 1e3 * b, 1e3 * (f + b), 100 * (f + b) / seconds]
                for part, (f, b) in parts.items()]
        rest = seconds - sum(f + b for f, b in parts.values())
        rows.append(["rest of the step", float("nan"), float("nan"), 1e3 * rest,
                     100 * rest / seconds])
        print(f"\n## profile: {name}, one step ({1e3 * seconds:.0f} ms under the profiler)")
        print(markdown_table(["part", "forward ms", "backward ms", "total ms", "% of step"],
                             rows))


def spread(values: list[int]) -> str:
    """``min / median / max`` of a list."""
    ordered = sorted(values)
    return f"{ordered[0]} / {ordered[len(ordered) // 2]} / {ordered[-1]}"


def report(tallies: dict[str, Tally]) -> str:
    """The table and the target ratios."""
    rows = []
    for name, t in tallies.items():
        rows.append([name, t.steps, t.documents / t.steps, t.supervised / t.steps,
                     t.tokens / t.steps, t.tokens_run / t.steps, t.seconds / t.steps,
                     t.supervised / t.seconds, t.images / t.seconds, t.documents / t.seconds,
                     t.memory])
    unpacked = tallies["ours unpacked"]
    lines = [f"documents trained (unpacked batches): tokens min / median / max "
             f"{spread(unpacked.doc_tokens)}, images {spread(unpacked.doc_images)}",
             markdown_table(["config", "steps", "docs/step", "supervised/step",
                             "real tokens/step", "tokens run/step", "s/step", "supervised tok/s",
                             "images/s", "docs/s", "peak MiB"], rows)]
    rate = {name: t.supervised / t.seconds for name, t in tallies.items()}
    for a, b, target in (("ours packed", "IDEFICS", 1.5), ("ours packed", "ours unpacked", 1.3),
                         ("ours unpacked", "IDEFICS", None)):
        goal = f" (target >= {target})" if target else ""
        lines.append(f"supervised tokens/s, {a} / {b}: {rate[a] / rate[b]:.2f}x{goal}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None):
    parser = benchmark_parser(__doc__, model=False)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=4,
                        help="documents per batch, unpacked (ours and IDEFICS)")
    parser.add_argument("--rows", type=int, default=2, help="rows per batch, packed")
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per document (cut) and per packed row")
    parser.add_argument("--rounds", type=int, default=4,
                        help="timed rounds; each runs every configuration in turn")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also print each configuration's top ops (torch profiler)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps_per_round, args.max_length = 1, 1, 128
    return args


def main(argv: list[str] | None = None) -> dict[str, Tally]:
    """Run the benchmark, print the table, return the tallies."""
    args = parse_args(argv)
    threads = setup_process(args)
    print(f"# trainer throughput (train.recipe.train_step: loader + model + DeepSpeed engine), "
          f"threads={threads} dtype={args.dtype} torch={torch.__version__}\n"
          f"# unpacked: {args.batch_size} documents/batch; packed: {args.rows} rows x "
          f"{args.max_length} tokens; {args.rounds} rounds x {args.steps_per_round} steps each")
    start = time.perf_counter()
    tallies = run(args)
    print(report(tallies))
    print(f"# wall time {time.perf_counter() - start:.0f} s")
    return tallies


if __name__ == "__main__":
    main()
