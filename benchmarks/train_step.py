"""Training-step speed and memory: flamingo-kit vs Hugging Face IDEFICS at matched shapes.

One step = forward, next-token cross-entropy, backward, AdamW step, on the same batch
(``B`` sequences of ``T`` tokens holding ``N`` chunks ``<image> text <|endofchunk|>``). The same
parts train in both models: Perceiver Resampler, gated cross-attention, and the two new token
rows (IDEFICS: ``freeze_text_layers``, ``freeze_vision_layers``, ``freeze_lm_head``). The loss is
computed outside both models by one function (IDEFICS' own ``labels`` path crashes with
``additional_vocab_size > 0``).

Run: ``python -m benchmarks.train_step [--device cuda --dtype bf16] [--threads 2]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import (
    Runtime,
    image_sweep,
    image_sweep_parser,
    interleaved_ids,
    matched_inputs,
    matched_models,
    measure,
    random_pixels,
    setup_runtime,
    trainable_count,
)
from eval_fewshot.report import markdown_table
from flamingo_kit.batching import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, image_token_id: int):
    """Mean CE of predicting each next token, ``<image>`` targets ignored (fp32)."""
    labels = input_ids[:, 1:].masked_fill(input_ids[:, 1:] == image_token_id, IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX)


def train_step_fn(model: torch.nn.Module, batch: dict, image_token_id: int,
                  lr: float = 1e-4) -> Callable[[], float]:
    """A closure doing one optimizer step on ``batch``; returns the loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(**batch).logits
        loss = next_token_loss(logits, batch["input_ids"], image_token_id)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def run(rt: Runtime, images: list[int], batch_size: int, seq_len: int,
        seed: int) -> dict[tuple[str, int], dict[str, float]]:
    """Time both models at every image count; returns ``{(model, images): numbers}``."""
    models = matched_models(rt, seed, train=True)
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for n in tqdm(images, desc="images per sequence", leave=False):
        ids = interleaved_ids(rt.shape, batch_size, n, seq_len, generator)
        pixels = random_pixels(rt.shape, batch_size, n, generator)
        batches = matched_inputs(rt, ids, pixels)
        steps = {kind: train_step_fn(model, batches[kind], rt.shape.image_token_id)
                 for kind, model in models.items()}
        # The warm-up also creates the optimizer state.
        for kind, numbers in measure(steps, rt, rt.warmup).items():
            if not torch.isfinite(numbers["output"]):
                raise RuntimeError(f"{kind}: non-finite loss {float(numbers['output'])} at "
                                   f"{n} images")
            results[kind, n] = {"seconds": numbers["seconds"], "memory": numbers["memory"]}
    for kind, model in models.items():
        results[kind, "trainable"] = trainable_count(model)
    return results


def report(results: dict, images: list[int], batch_size: int, seq_len: int) -> str:
    """The table, the trainable counts and the target ratios."""
    rows = []
    for n in images:
        ours, theirs = results["ours", n], results["idefics", n]
        rows.append([n, 1e3 * ours["seconds"], 1e3 * theirs["seconds"],
                     theirs["seconds"] / ours["seconds"], ours["memory"], theirs["memory"],
                     ours["memory"] / theirs["memory"],
                     batch_size * seq_len / ours["seconds"],
                     batch_size * seq_len / theirs["seconds"]])
    lines = [markdown_table(
        ["images/seq", "ours ms/step", "IDEFICS ms/step", "speedup (IDEFICS/ours time)",
         "ours peak MiB", "IDEFICS peak MiB", "memory ours/IDEFICS", "ours tok/s",
         "IDEFICS tok/s"], rows)]
    lines.append(f"trainable parameters: ours {results['ours', 'trainable']:,}, "
                 f"IDEFICS {results['idefics', 'trainable']:,}")
    for n, target in ((4, 1.5), (32, 2.0)):
        if n in images:
            speedup = results["idefics", n]["seconds"] / results["ours", n]["seconds"]
            lines.append(f"speedup at {n} images/sequence: {speedup:.2f}x (target >= {target})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return the raw results."""
    args = image_sweep_parser(__doc__, images="1,4,16,32", seq_len=256).parse_args(argv)
    rt = setup_runtime(args)
    images, batch_size, seq_len = image_sweep(args)
    print(rt.header(f"train step (forward + loss + backward + AdamW), batch {batch_size} x "
                    f"{seq_len} tokens"))
    results = run(rt, images, batch_size, seq_len, args.seed)
    print(report(results, images, batch_size, seq_len))
    return results


if __name__ == "__main__":
    main()
