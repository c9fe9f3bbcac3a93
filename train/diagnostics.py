"""Does a Flamingo model look at its images? Numbers measured on a fixed held-out batch.

A falling training loss says nothing about the images: on interleaved data most tokens are
predictable from the text alone (prompt formats, names repeated in the context), and a model
can learn all of that with its gated cross-attention shut. These measurements tell the two
apart; the trainer logs them during the Flamingo stage (``logging.image_reliance_every``) and
``python -m train.diagnose`` reports them for any saved model. Both call :func:`diagnose`.

- ``image_reliance`` (nats per supervised token): held-out loss with every row's images
  replaced by another row's images, minus the loss with the true images. 0 for a model whose
  output does not depend on its images (exactly 0 while every gate is 0); it grows as the text
  comes to depend on *which* image was shown. Also per source (``image_reliance_<name>``).
- ``blank_reliance``: the same against blank images (all-zero pixels after normalisation,
  the processor's mean colour): how much the model leans on having an image at all.
- ``gate_attn_<i>`` / ``gate_ff_<i>``: ``tanh`` of each cross-attention layer's gates, the
  factors by which image information enters the LM's residual stream.
- ``perceiver_spread`` / ``vision_spread``: how much the resampler's latents (and the vision
  tower's patch tokens) differ across held-out images: the mean over features of the standard
  deviation across images, divided by the standard deviation over all images and features.
  Near 0 means every image gives the same latents, so no cross-attention could tell them apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from data_pipelines.loading import SourceConfig, build_loader
from flamingo_kit.lm_integration import flamingo_layers
from flamingo_kit.loss import LossTargets

Batch = dict[str, torch.Tensor]


@dataclass
class HeldOutData:
    """Fixed held-out batches and the names of the sources their rows came from."""

    batches: list[Batch]
    source_names: list[str]

    @property
    def n_samples(self) -> int:
        """Rows over all batches."""
        return sum(len(b["input_ids"]) for b in self.batches)


def load_heldout(sources: Sequence[SourceConfig], tokenizer, image_processor, n_samples: int,
                 batch_size: int, max_length: int, max_images: int, seed: int = 0
                 ) -> HeldOutData:
    """The first ``n_samples`` samples of ``sources`` (mixed by weight, one pass, seeded).

    The same arguments always give the same batches, on every rank and in every process, so
    numbers logged at different steps, or by ``train.diagnose`` later, are comparable.
    """
    if n_samples < 2:
        raise ValueError(f"image reliance needs at least 2 held-out samples, got {n_samples}")
    loader = build_loader(list(sources), tokenizer, image_processor, batch_size=batch_size,
                          max_length=max_length, max_images=max_images, seed=seed, rank=0,
                          world_size=1, resampled=False)
    batches, total = [], 0
    for batch in loader:
        keep = min(len(batch["input_ids"]), n_samples - total)
        batches.append({k: v[:keep] for k, v in batch.items()})
        total += keep
        if total >= n_samples:
            break
    if total < 2:
        raise ValueError(f"the held-out sources {[s.name for s in sources]} hold {total} usable "
                         "sample(s); image reliance needs at least 2")
    return HeldOutData(batches, [s.name for s in sources])


def permute_images(pixel_values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each row's images replaced by those of the next row that has images (cyclically).

    ``pixel_values`` is ``[B, N, F, C, H, W]`` and ``counts[b]`` the images row ``b`` uses.
    Image ``j`` of row ``b`` becomes image ``j mod counts[b']`` of row ``b'``, the next row with
    at least one image, so every used slot gets a real image from another document.
    """
    rows = [b for b in range(len(counts)) if int(counts[b]) > 0]
    if len(rows) < 2:
        raise ValueError("permuting images across rows needs at least 2 rows with images")
    out = pixel_values.clone()
    for i, row in enumerate(rows):
        donor = rows[(i + 1) % len(rows)]
        take = torch.arange(int(counts[row]), device=counts.device) % int(counts[donor])
        out[row, : int(counts[row])] = pixel_values[donor, take]
    return out


def _image_counts(module, batch: Batch) -> torch.Tensor:
    return (batch["input_ids"] == module.image_token_id).sum(1)


def _loss_sums(model: Callable, batch: Batch, pixel_values: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy and supervised-token count with these pixels."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=pixel_values)
    return LossTargets.from_labels(batch["labels"]).row_sums(out.logits)


def reliance(model: Callable, module, data: HeldOutData) -> dict[str, float]:
    """Held-out losses with true, permuted and blank images, and their differences."""
    sums = {"true": [], "permuted": [], "blank": []}
    counts, sources = [], []
    for batch in data.batches:
        pixels = batch["pixel_values"]
        variants = {"true": pixels,
                    "permuted": permute_images(pixels, _image_counts(module, batch)),
                    "blank": torch.zeros_like(pixels)}
        for name, values in variants.items():
            loss, n = _loss_sums(model, batch, values)
            sums[name].append(loss.float())
        counts.append(n)
        sources.append(batch["source_index"])
    loss = {k: torch.cat(v).cpu() for k, v in sums.items()}
    n, source = torch.cat(counts).float().cpu(), torch.cat(sources).cpu()
    total = n.sum().clamp(min=1)
    out = {
        "heldout_loss": float(loss["true"].sum() / total),
        "heldout_loss_permuted": float(loss["permuted"].sum() / total),
        "heldout_loss_blank": float(loss["blank"].sum() / total),
    }
    out["image_reliance"] = out["heldout_loss_permuted"] - out["heldout_loss"]
    out["blank_reliance"] = out["heldout_loss_blank"] - out["heldout_loss"]
    for index, name in enumerate(data.source_names):
        rows = source == index
        if bool(rows.any()):
            diff = (loss["permuted"][rows] - loss["true"][rows]).sum()
            out[f"image_reliance_{name}"] = float(diff / n[rows].sum().clamp(min=1))
    return out


def gates(module) -> dict[str, float]:
    """``tanh`` of every cross-attention layer's attention and feed-forward gate."""
    out = {}
    for i, layer in enumerate(flamingo_layers(module.lm)):
        out[f"gate_attn_{i}"] = float(torch.tanh(layer.xattn.attn_gate.detach().float()).item())
        out[f"gate_ff_{i}"] = float(torch.tanh(layer.xattn.ff_gate.detach().float()).item())
    return out


def spread(features: torch.Tensor) -> float:
    """``mean over features of std across items / std over everything`` of ``[M, ...]``."""
    flat = features.flatten(1).float()
    overall = flat.std()
    if len(flat) < 2 or overall == 0:
        return 0.0
    return float(flat.std(0).mean() / overall)


def feature_spreads(module, data: HeldOutData) -> dict[str, float]:
    """Spread across held-out images of the patch tokens and of the resampler's latents.

    Every image is encoded alone at media position 0, so position embeddings add nothing.
    """
    patches, latents = [], []
    for batch in data.batches:
        counts = _image_counts(module, batch)
        valid = torch.arange(batch["pixel_values"].shape[1], device=counts.device)[None] \
            < counts[:, None]
        pixels = batch["pixel_values"][valid]
        tokens = module.vision(pixels)
        positions = torch.zeros(len(pixels), dtype=torch.long, device=pixels.device)
        patches.append(tokens.float())
        latents.append(module.perceiver(tokens.to(module.perceiver.latents.dtype), positions))
    return {"vision_spread": spread(torch.cat(patches)),
            "perceiver_spread": spread(torch.cat(latents))}


@torch.no_grad()
def diagnose(model: Callable, module, data: HeldOutData,
             gather: Callable[[list], contextlib.AbstractContextManager] | None = None
             ) -> dict[str, float]:
    """All numbers of the module docstring for ``data`` (a flat dict of floats).

    ``model`` runs the forward pass (a DeepSpeed engine or the module itself); ``module`` is the
    :class:`~flamingo_kit.FlamingoModel`, put in eval mode for the measurement and restored.
    ``gather(params)`` makes partitioned parameters readable (ZeRO-3); ``None`` for plain ones.
    """
    was_training = module.training
    module.eval()
    try:
        out = reliance(model, module, data)
        gate_params = [p for layer in flamingo_layers(module.lm)
                       for p in (layer.xattn.attn_gate, layer.xattn.ff_gate)]
        with (gather(gate_params) if gather else contextlib.nullcontext()):
            out.update(gates(module))
        out.update(feature_spreads(module, data))
    finally:
        module.train(was_training)
    return out
