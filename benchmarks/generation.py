"""Greedy k-shot generation speed: flamingo-kit vs Hugging Face IDEFICS at matched shapes.

Each prompt is BOS, k demonstrations ``<image> caption <|endofchunk|>`` and a query
``<image> prompt``; both models generate exactly ``--new-tokens`` tokens greedily (stopping is
disabled). Reported per shot count:

- tokens/s: ``batch * new_tokens / time of one generate call`` (prompt + decoding);
- ms per new token: decoding only, ``(t(new_tokens) - t(1)) / (new_tokens - 1)``;
- peak MiB of tensors allocated during one generate call (see ``common.peak_memory_mib``).

Run: ``python -m benchmarks.generation [--device cuda --dtype bf16] [--threads 2]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from benchmarks.common import (
    Runtime,
    benchmark_parser,
    few_shot_ids,
    matched_inputs,
    matched_models,
    measure,
    peak_memory_mib,
    random_pixels,
    setup_runtime,
)
from eval_fewshot.report import markdown_table

MODELS = ("ours", "idefics")


def generate_fn(kind: str, model, batch: dict, new_tokens: int) -> Callable[[], torch.Tensor]:
    """A call that generates exactly ``new_tokens`` greedy tokens per row and returns them."""
    if kind == "ours":
        return lambda: model.generate(**batch, max_new_tokens=new_tokens, eos_token_id=[])
    prompt_len = batch["input_ids"].shape[1]
    return lambda: model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        num_beams=1, use_cache=True, pad_token_id=0,
    )[:, prompt_len:]


def check_length(kind: str, out: torch.Tensor, ids: torch.Tensor, new_tokens: int) -> None:
    """Both models must generate exactly ``new_tokens`` per row, or the rates are not comparable."""
    if out.shape != (ids.shape[0], new_tokens):
        raise RuntimeError(f"{kind} generated {tuple(out.shape)}, expected {new_tokens} tokens")


def run(rt: Runtime, shots: list[int], batch_size: int, new_tokens: int, caption_len: int,
        query_len: int, seed: int) -> dict[tuple[str, int], dict[str, float]]:
    """Measure both models at every shot count; returns ``{(model, shots): numbers}``."""
    models = matched_models(rt, seed, train=False)
    generator = torch.Generator().manual_seed(seed)
    results = {}
    with torch.inference_mode():
        for i, k in enumerate(tqdm(shots, desc="shot counts", leave=False)):
            ids = few_shot_ids(rt.shape, batch_size, k, caption_len, query_len, generator)
            batches = matched_inputs(rt, ids, random_pixels(rt.shape, batch_size, k + 1, generator))
            full = {kind: generate_fn(kind, model, batches[kind], new_tokens)
                    for kind, model in models.items()}
            prompt_only = {kind: generate_fn(kind, model, batches[kind], 1)
                           for kind, model in models.items()}
            # The first shot count also pays the one-off costs; each call is checked once. Both
            # timings come before the memory pass, which runs the full calls once more.
            whole = measure(full, rt, 1 + rt.warmup if i == 0 else 1, memory=False)
            prompt = measure(prompt_only, rt, 1, memory=False)
            for kind in models:
                check_length(kind, whole[kind]["output"], ids, new_tokens)
                seconds = whole[kind]["seconds"]
                per_token = (seconds - prompt[kind]["seconds"]) / max(new_tokens - 1, 1)
                memory = peak_memory_mib(full[kind], rt.device) if rt.memory else float("nan")
                results[kind, k] = {"seconds": seconds, "per_token": per_token,
                                    "memory": memory, "prompt_len": ids.shape[1]}
    return results


def report(results: dict, shots: list[int], batch_size: int, new_tokens: int) -> str:
    """The table plus the two target ratios."""
    rows = []
    for k in shots:
        ours, theirs = results["ours", k], results["idefics", k]
        tps = [batch_size * new_tokens / r["seconds"] for r in (ours, theirs)]
        rows.append([k, k + 1, ours["prompt_len"], tps[0], tps[1], tps[0] / tps[1],
                     1e3 * ours["per_token"], 1e3 * theirs["per_token"],
                     ours["memory"], theirs["memory"]])
    table = markdown_table(
        ["shots", "images", "prompt tokens", "ours tok/s", "IDEFICS tok/s", "speedup",
         "ours ms/new tok", "IDEFICS ms/new tok", "ours peak MiB", "IDEFICS peak MiB"], rows)
    lines = [table]
    if 8 in shots:
        speedup = results["idefics", 8]["seconds"] / results["ours", 8]["seconds"]
        lines.append(f"speedup at 8 shots (ours tok/s / IDEFICS tok/s): {speedup:.2f}x "
                     "(target >= 2)")
    if 4 in shots and 32 in shots:
        for kind, target in (("ours", " (target <= 1.3)"), ("idefics", "")):
            ratio = results[kind, 32]["per_token"] / results[kind, 4]["per_token"]
            lines.append(f"{kind}: decoding time per new token, 32 shots / 4 shots: "
                         f"{ratio:.2f}x{target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return the raw results."""
    parser = benchmark_parser(__doc__)
    parser.add_argument("--shots", default="0,4,8,32", help="comma-separated shot counts")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--caption-len", type=int, default=10, help="text tokens per demo")
    parser.add_argument("--query-len", type=int, default=3, help="text tokens after query image")
    args = parser.parse_args(argv)
    rt = setup_runtime(args)
    shots = [int(k) for k in args.shots.split(",")]
    new_tokens, batch_size = args.new_tokens, args.batch_size
    if args.smoke:
        shots, new_tokens, batch_size = [0, 1], 3, 1
    print(rt.header(f"greedy generation, batch {batch_size}, {new_tokens} new tokens, "
                    f"{args.caption_len}-token captions"))
    results = run(rt, shots, batch_size, new_tokens, args.caption_len, args.query_len, args.seed)
    print(report(results, shots, batch_size, new_tokens))
    return results


if __name__ == "__main__":
    main()
