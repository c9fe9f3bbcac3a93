"""Cost of gated cross-attention per text token as the number of images in a sequence grows.

A sequence of fixed length ``T`` holds ``N`` chunks ``<image> text <|endofchunk|>``
(N = 1, 4, 16, 32, 64); each text token sees the latents of its latest image. Timed forward
passes (no autograd), per text token:

- ours, block: ``MediaLayout.build`` + ``GatedCrossAttentionBlock.forward`` with the image
  keys/values given. This is the per-token work (K/V are projected once per image per call, and
  once per prompt during generation);
- ours, incl. K/V: the same plus ``project_media`` of all N images' latents;
- IDEFICS: ``IdeficsGatedCrossAttentionLayer.forward`` plus the dense ``[B, 1, T, N*L]`` mask
  that ``IdeficsModel.forward`` builds for it (its K/V projection cannot be separated).

Run: ``python -m benchmarks.cross_attention [--device cuda --dtype bf16] [--threads 2]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from benchmarks.common import (
    GATE_VALUE,
    GATES,
    MatchedShape,
    Runtime,
    idefics_config,
    idefics_image_attention_mask,
    image_sweep,
    image_sweep_parser,
    interleaved_ids,
    measure,
    setup_runtime,
    xattn_ff_mult,
)
from eval_fewshot.report import markdown_table
from flamingo_kit.from_scratch import open_gates, seed_everything


def build_blocks(shape: MatchedShape, seed: int):
    """Our block and IDEFICS' layer with the shape of one cross-attention layer of the models."""
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    from flamingo_kit.cross_attention import GatedCrossAttentionBlock

    seed_everything(seed)
    ours = GatedCrossAttentionBlock(shape.hidden_size, shape.hidden_size, shape.num_heads,
                                    shape.hidden_size // shape.num_heads, xattn_ff_mult(shape))
    theirs = IdeficsGatedCrossAttentionLayer(idefics_config(shape), layer_idx=0)
    for block in (ours, theirs):
        open_gates(block, GATE_VALUE, GATES)
        block.eval()
    return ours, theirs


def idefics_masks(input_ids: torch.Tensor, shape: MatchedShape, num_images: int,
                  dtype: torch.dtype):
    """The float cross-attention mask and token gate, exactly as ``IdeficsModel.forward``."""
    mask = idefics_image_attention_mask(input_ids, shape.image_token_id, num_images)
    latents = shape.perceiver_num_latents
    mask = mask[..., None].expand(-1, -1, -1, latents).reshape(*mask.shape[:2], -1)
    mask = torch.where(mask[:, None].bool(), torch.zeros((), dtype=dtype, device=mask.device),
                       torch.finfo(dtype).min)
    gate = (mask == 0.0).any(dim=-1).to(dtype).squeeze(1)
    return mask, gate


def layer_calls(ours, theirs, shape: MatchedShape, input_ids: torch.Tensor,
                hidden: torch.Tensor, latents: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The three timed calls for one image count (see the module docstring)."""
    from flamingo_kit.cross_attention import MediaLayout

    n = latents.shape[1]
    kv = ours.project_media(latents)

    def ours_block():
        layout = MediaLayout.build(input_ids, shape.image_token_id, n, "immediate")
        return ours(hidden, kv, layout)

    def ours_with_kv():
        layout = MediaLayout.build(input_ids, shape.image_token_id, n, "immediate")
        return ours(hidden, ours.project_media(latents), layout)

    def idefics_layer():
        mask, gate = idefics_masks(input_ids, shape, n, hidden.dtype)
        return theirs(hidden, None, latents.flatten(1, 2), image_attention_mask=mask,
                      cross_attention_gate=gate)

    return {"ours block": ours_block, "ours incl. K/V": ours_with_kv, "IDEFICS": idefics_layer}


def run(rt: Runtime, images: list[int], batch_size: int, seq_len: int,
        seed: int) -> dict[tuple[str, int], dict[str, float]]:
    """Seconds per text token (and peak MiB) of each call at every image count."""
    ours, theirs = build_blocks(rt.shape, seed)
    ours.to(rt.device, rt.dtype)
    theirs.to(rt.device, rt.dtype)
    generator = torch.Generator().manual_seed(seed)
    results = {}
    with torch.inference_mode():
        for n in tqdm(images, desc="images per sequence", leave=False):
            ids = interleaved_ids(rt.shape, batch_size, n, seq_len, generator).to(rt.device)
            hidden = torch.randn(batch_size, seq_len, rt.shape.hidden_size, generator=generator)
            latents = torch.randn(batch_size, n, rt.shape.perceiver_num_latents,
                                  rt.shape.hidden_size, generator=generator)
            hidden, latents = (x.to(rt.device, rt.dtype) for x in (hidden, latents))
            calls = layer_calls(ours, theirs, rt.shape, ids, hidden, latents)
            for name, numbers in measure(calls, rt, rt.warmup).items():
                results[name, n] = {"per_token": numbers["seconds"] / (batch_size * seq_len),
                                    "memory": numbers["memory"]}
    return results


def report(results: dict, images: list[int]) -> str:
    """The table and the growth ratios from the fewest to the most images."""
    names = ["ours block", "ours incl. K/V", "IDEFICS"]
    rows = [[n, *(1e6 * results[name, n]["per_token"] for name in names),
             *(results[name, n]["memory"] for name in names)] for n in images]
    lines = [markdown_table(["images/seq", *(f"{name} us/token" for name in names),
                             *(f"{name} peak MiB" for name in names)], rows)]
    first, last = images[0], images[-1]
    for name in names:
        growth = results[name, last]["per_token"] / results[name, first]["per_token"]
        target = " (target <= 1.2)" if name == "ours block" else ""
        lines.append(f"{name}: time per token at {last} images / at {first}: "
                     f"{growth:.2f}x{target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return the raw results."""
    parser = image_sweep_parser(__doc__, images="1,4,16,32,64", seq_len=1024)
    parser.set_defaults(repeats=9)
    args = parser.parse_args(argv)
    rt = setup_runtime(args)
    images, batch_size, seq_len = image_sweep(args)
    print(rt.header(f"one cross-attention layer, forward, batch {batch_size} x {seq_len} tokens"))
    results = run(rt, images, batch_size, seq_len, args.seed)
    print(report(results, images))
    return results


if __name__ == "__main__":
    main()
