"""Shared pieces of the benchmarks: matched-shape models, few-shot batches, timing and memory.

Every benchmark compares a ``FlamingoModel`` with a Hugging Face ``IdeficsForVisionText2Text``
whose shapes match: same LM width/depth/heads/vocabulary (both full multi-head attention, gated
SiLU MLP), same vision tower (CLIP-style ViT), same Perceiver Resampler (latents, depth, heads),
same number and width of cross-attention layers, same trainable set. The one structural
difference that cannot be removed: IDEFICS' cross-attention feed-forward is a gated SiLU MLP of
``intermediate_size`` (3 matrices) while ours is a 2-matrix GELU MLP, so ours gets
``ff_mult = 1.5 * intermediate_size / hidden_size`` to match its parameters and FLOPs.

Both models read the same token ids: the LM vocabulary, then ``<image>`` and
``<|endofchunk|>`` as the two ids after it (IDEFICS' ``additional_vocab_size=2``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from flamingo_kit import from_scratch  # noqa: E402 (after the offline settings)
from flamingo_kit.from_scratch import seed_everything  # noqa: E402
from train.stages import to_device  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MatchedShape:
    """Sizes shared by both models; defaults are a small config that runs on a laptop CPU."""

    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 256
    vision_layers: int = 2
    vision_heads: int = 4
    # Named as in FlamingoConfig, which takes them as they are.
    perceiver_num_latents: int = 64
    perceiver_depth: int = 2
    perceiver_heads: int = 4
    perceiver_dim_head: int = 64
    cross_attn_every_n_layers: int = 1

    @property
    def image_token_id(self) -> int:
        return self.vocab_size

    @property
    def eoc_token_id(self) -> int:
        return self.vocab_size + 1

    def describe(self) -> str:
        """One line listing every size, for the benchmark header."""
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


# The smallest shapes that still exercise multi-head, multi-layer and multi-latent code paths.
SMOKE_SHAPE = MatchedShape(
    vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
    image_size=16, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2,
    perceiver_num_latents=4, perceiver_depth=1, perceiver_heads=2, perceiver_dim_head=16,
    cross_attn_every_n_layers=1,
)
# MatchedShape sizes that FlamingoConfig takes under the same names.
FLAMINGO_SIZES = ("perceiver_num_latents", "perceiver_depth", "perceiver_heads",
                  "perceiver_dim_head", "cross_attn_every_n_layers")


# -- models ---------------------------------------------------------------------------------


def xattn_ff_mult(shape: MatchedShape) -> int:
    """Our cross-attention MLP width matching IDEFICS' gated MLP (3*D*I weights = 2*D*mult*D)."""
    return max(1, round(1.5 * shape.intermediate_size / shape.hidden_size))


def ours_lm(shape: MatchedShape, seed: int = 0):
    """Our frozen LM of ``shape``: a Llama decoder without grouped-query attention (as IDEFICS')."""
    from transformers import AutoModelForCausalLM

    lm_cfg = from_scratch.lm_config(
        "llama", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        num_layers=shape.num_layers, num_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size, max_positions=4096,
    )
    lm_cfg.num_key_value_heads = shape.num_heads  # IDEFICS' LM has no grouped-query attention
    seed_everything(seed)
    return AutoModelForCausalLM.from_config(lm_cfg).eval()


def ours_vision(shape: MatchedShape, seed: int = 0):
    """Our frozen CLIP vision tower of ``shape``."""
    return from_scratch.build_vision(
        "clip", seed=seed, image_size=shape.image_size, patch_size=shape.patch_size,
        hidden_size=shape.vision_hidden_size, num_layers=shape.vision_layers,
        num_heads=shape.vision_heads,
    )


def ours_flamingo_config(shape: MatchedShape) -> dict[str, int]:
    """The ``FlamingoConfig`` fields that match IDEFICS' resampler and cross-attention."""
    return dict(**{name: getattr(shape, name) for name in FLAMINGO_SIZES},
                xattn_heads=shape.num_heads, xattn_dim_head=shape.hidden_size // shape.num_heads,
                xattn_ff_mult=xattn_ff_mult(shape))


def build_ours(shape: MatchedShape, seed: int = 0):
    """FlamingoModel: a Llama LM and a CLIP vision tower of ``shape``, all new parts trainable."""
    return from_scratch.build_flamingo(
        ours_lm(shape, seed), ours_vision(shape, seed), seed, **ours_flamingo_config(shape),
        image_token_id=shape.image_token_id, eoc_token_id=shape.eoc_token_id,
    )


def idefics_config(shape: MatchedShape):
    """IdeficsConfig of ``shape``: LM, vision and LM head frozen except the two new tokens."""
    from transformers import IdeficsConfig

    config = IdeficsConfig(
        vocab_size=shape.vocab_size,
        additional_vocab_size=2,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        cross_layer_interval=shape.cross_attn_every_n_layers,
        max_position_embeddings=4096,
        pad_token_id=0,
        freeze_text_layers=True,
        freeze_lm_head=True,
        freeze_vision_layers=True,
        use_resampler=True,
        vision_config=dict(
            embed_dim=shape.vision_hidden_size,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            intermediate_size=4 * shape.vision_hidden_size,
        ),
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=shape.perceiver_num_latents,
            resampler_depth=shape.perceiver_depth,
            resampler_n_heads=shape.perceiver_heads,
            resampler_head_dim=shape.perceiver_dim_head,
        ),
    )
    config._attn_implementation = "sdpa"
    return config


def build_idefics(shape: MatchedShape, seed: int = 0):
    """IdeficsForVisionText2Text of ``shape`` (eval mode, fp32)."""
    from transformers import IdeficsForVisionText2Text

    seed_everything(seed)
    return IdeficsForVisionText2Text(idefics_config(shape)).eval()


# The gates of both models: ours (tanh gates) and IDEFICS' (``alpha_*``), opened to 0.5 so that
# cross-attention changes the output, as trained (``flamingo_kit.from_scratch.open_gates``).
GATES = from_scratch.GATES + ("alpha_cross_attn", "alpha_dense")
GATE_VALUE = 0.5


def matched_models(rt: Runtime, seed: int, train: bool) -> dict[str, torch.nn.Module]:
    """``{"ours": ..., "idefics": ...}`` of ``rt.shape``, gates opened, on ``rt``'s device and
    dtype, in training or eval mode."""
    models = {"ours": build_ours(rt.shape, seed), "idefics": build_idefics(rt.shape, seed)}
    for model in models.values():
        from_scratch.open_gates(model, GATE_VALUE, GATES)
        model.to(rt.device, rt.dtype).train(train)
    return models


def trainable_count(model: torch.nn.Module) -> int:
    """Number of trainable scalars (both models must agree up to their structural difference)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- inputs ---------------------------------------------------------------------------------


def interleaved_ids(
    shape: MatchedShape,
    batch_size: int,
    num_images: int,
    seq_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, seq_len]`` ids: BOS, then ``num_images`` chunks ``<image> text <|endofchunk|>``.

    Chunks split the sequence evenly; the text is random ids from the LM vocabulary.
    """
    chunk = (seq_len - 1) // num_images
    if chunk < 3:
        raise ValueError(f"seq_len={seq_len} is too short for {num_images} images (3+ tokens each)")
    ids = torch.randint(3, shape.vocab_size, (batch_size, seq_len), generator=generator)
    ids[:, 0] = 1
    starts = 1 + chunk * torch.arange(num_images)
    ids[:, starts] = shape.image_token_id
    ids[:, starts + chunk - 1] = shape.eoc_token_id
    return ids


def few_shot_ids(
    shape: MatchedShape,
    batch_size: int,
    shots: int,
    caption_len: int,
    query_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, T]`` prompt: BOS, ``shots`` demos ``<image> caption <|endofchunk|>``, then a query
    ``<image> prompt`` whose continuation is generated. All rows have the same length."""
    demo = 1 + caption_len + 1
    demos = interleaved_ids(shape, batch_size, shots, 1 + shots * demo, generator) if shots else (
        torch.ones(batch_size, 1, dtype=torch.long))
    query = torch.randint(3, shape.vocab_size, (batch_size, 1 + query_len), generator=generator)
    query[:, 0] = shape.image_token_id
    return torch.cat([demos, query], dim=1)


def random_pixels(
    shape: MatchedShape, batch_size: int, num_images: int, generator: torch.Generator
) -> torch.Tensor:
    """``[B, N, C, H, W]`` normalised-looking pixels."""
    size = (batch_size, num_images, 3, shape.image_size, shape.image_size)
    return torch.randn(size, generator=generator)


def idefics_image_attention_mask(input_ids: torch.Tensor, image_token_id: int, num_images: int):
    """``[B, T, N]``: token t sees image n iff n is the latest image at or before t.

    This is what ``IdeficsProcessor`` builds (and Flamingo's ``immediate`` policy); tokens before
    the first image see none.
    """
    latest = torch.cumsum((input_ids == image_token_id).long(), dim=1) - 1
    return (latest[..., None] == torch.arange(num_images, device=input_ids.device)).long()


def model_inputs(model_kind: str, input_ids: torch.Tensor, pixels: torch.Tensor,
                 shape: MatchedShape) -> dict[str, torch.Tensor]:
    """Keyword arguments of ``forward``/``generate`` for ``"ours"`` or ``"idefics"``."""
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if model_kind == "ours":
        batch["pixel_values"] = pixels.unsqueeze(2)  # one frame per image
    elif model_kind == "idefics":
        batch["pixel_values"] = pixels
        batch["image_attention_mask"] = idefics_image_attention_mask(
            input_ids, shape.image_token_id, pixels.shape[1])
    else:
        raise ValueError(f"model_kind must be 'ours' or 'idefics', got {model_kind!r}")
    return batch


def matched_inputs(rt: Runtime, input_ids: torch.Tensor,
                   pixels: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's keyword arguments (:func:`model_inputs`) on ``rt``'s device and dtype."""
    return {kind: to_device(model_inputs(kind, input_ids, pixels, rt.shape), rt.device, rt.dtype)
            for kind in ("ours", "idefics")}


# -- timing and memory ----------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(calls: dict[str, Callable[[], object]], times: int) -> dict[str, object]:
    """Run each call ``times`` times (at least once) before it is timed; return its last output.

    First calls pay one-off costs (allocations, kernel selection, optimizer state, caches) that
    are not the cost being measured; the outputs serve the benchmarks' sanity checks.
    """
    outputs = {}
    for name, fn in calls.items():
        for _ in range(max(times, 1)):
            outputs[name] = fn()
    return outputs


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(calls: dict[str, Callable[[], object]], device: torch.device,
                        repeats: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn within every repeat.

    Alternating the models spreads the noise of a shared machine over both of them, so their
    ratio is steadier than two separate timing loops would give.
    """
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def measure(calls: dict[str, Callable[[], object]], rt: Runtime, warmup: int,
            memory: bool = True) -> dict[str, dict[str, object]]:
    """Per call: ``seconds`` (median), ``memory`` (peak MiB) and ``output`` (for checks).

    The calls are warmed up (:func:`warm_up`, ``warmup`` runs each, at least one), timed in turn
    in every one of ``rt.repeats`` (:func:`interleaved_medians`), then each one's peak memory is
    measured in an untimed pass (NaN with ``--no-memory`` or ``memory=False``).
    """
    outputs = warm_up(calls, warmup)
    seconds = interleaved_medians(calls, rt.device, rt.repeats)
    return {name: {"seconds": seconds[name], "output": outputs[name],
                   "memory": peak_memory_mib(fn, rt.device) if memory and rt.memory
                   else float("nan")}
            for name, fn in calls.items()}


class _TensorBytesTracker(TorchDispatchMode):
    """Counts bytes of tensor storages created inside the mode and still alive; keeps the peak.

    CPU has no allocator statistics, so this follows every op's outputs: a new storage adds its
    size, and a weakref callback subtracts it when the storage is freed. Views and in-place
    results share a storage already counted. Used in an untimed pass (it slows ops down).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MiB of tensors allocated while ``fn()`` runs, on top of what existed before.

    CUDA: ``torch.cuda.max_memory_allocated`` delta. CPU: live tensor storages counted by a
    dispatch mode (tensor memory only, not allocator overhead or Python objects).
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    tracker = _TensorBytesTracker()
    with tracker:
        fn()
    return tracker.peak / 2**20


# -- command line and output ----------------------------------------------------------------


def benchmark_parser(doc: str, model: bool = True, matched: bool = True) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with the flags the benchmarks share.

    Every benchmark: ``--threads``, ``--seed``, ``--smoke``. Those that run a model
    (``model``): ``--device``, ``--dtype``, ``--repeats``. Those comparing the matched models
    (``matched``): ``--no-memory`` and the :class:`MatchedShape` overrides.
    """
    parser = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: $OMP_NUM_THREADS or all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and one repetition: checks the benchmark runs")
    if model:
        parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
        parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
        parser.add_argument("--repeats", type=int, default=3,
                            help="timed runs; the median is kept")
    if matched:
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
        sizes = parser.add_argument_group("shape overrides (default: MatchedShape())")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "image_size", *FLAMINGO_SIZES):
            sizes.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    return parser


def image_sweep_parser(doc: str, images: str, seq_len: int) -> argparse.ArgumentParser:
    """:func:`benchmark_parser` plus the sweep that :func:`image_sweep` reads."""
    parser = benchmark_parser(doc)
    parser.add_argument("--images", default=images, help="images per sequence, comma-separated")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    return parser


def image_sweep(args: argparse.Namespace) -> tuple[list[int], int, int]:
    """(images per sequence, batch size, sequence length) to run; tiny under ``--smoke``."""
    if args.smoke:
        return [1, 4], 1, 16
    return [int(n) for n in args.images.split(",")], args.batch_size, args.seq_len


def setup_process(args: argparse.Namespace) -> int:
    """Apply ``--threads`` and ``--seed``; returns the number of intra-op threads."""
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    seed_everything(args.seed)
    return threads


def device_of(args: argparse.Namespace) -> torch.device:
    """``--device``, refused when it names a GPU this machine does not have."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    return device


@dataclass
class Runtime:
    """Where and how a benchmark runs, resolved from the common flags."""

    device: torch.device
    dtype: torch.dtype
    threads: int
    shape: MatchedShape
    repeats: int
    warmup: int
    memory: bool

    def header(self, title: str) -> str:
        """The lines a benchmark prints first, so a table is never read without its setup."""
        return (f"# {title}\n# device={self.device} dtype={str(self.dtype).removeprefix('torch.')}"
                f" threads={self.threads} torch={torch.__version__}"
                f" repeats={self.repeats} (median) warmup={self.warmup}\n"
                f"# shape: {self.shape.describe()}")


def setup_runtime(args: argparse.Namespace, shape: MatchedShape | None = None) -> Runtime:
    """Apply threads/seed from ``args``; smoke runs use :data:`SMOKE_SHAPE` and one repeat."""
    device, threads = device_of(args), setup_process(args)
    if args.smoke:
        return Runtime(device, DTYPES[args.dtype], threads, SMOKE_SHAPE, 1, 0, not args.no_memory)
    overrides = {name: getattr(args, name, None) for name in MatchedShape.__dataclass_fields__}
    shape = with_overrides(shape or MatchedShape(), **overrides)
    return Runtime(device, DTYPES[args.dtype], threads, shape, args.repeats, 1, not args.no_memory)


def with_overrides(shape: MatchedShape, **sizes: int | None) -> MatchedShape:
    """``shape`` with the sizes that are not None replaced."""
    return replace(shape, **{k: v for k, v in sizes.items() if v is not None})
