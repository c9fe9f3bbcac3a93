"""``python -m train.probe_vision TOWER_DIR --data CLASSIFICATION_ROOT``: what does a tower encode?

A linear probe on a frozen vision tower: features of the labelled images of a classification
set (``classes.json``, ``train.json``, ``test.json``: the ``classification`` task's format; the
synthetic world writes one under ``eval/classification``, labelled by shape) are fitted with a
multinomial logistic regression on ``train`` and scored on ``test``. Two features are probed:
the mean of the patch tokens and the tower's pooled output.

It answers a question the Flamingo stage cannot: when captions get an attribute wrong, is the
attribute in the tower's features at all? The cross-attention can only read what the frozen
tower encodes.

    python -m train.probe_vision runs/contrastive/final --data data/synth/eval/classification
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image

FEATURES = ("patch_mean", "pooled")


@dataclass
class ProbeResult:
    """Held-out accuracy of a linear probe per feature, next to chance and the majority class."""

    classes: list[str]
    n_train: int
    n_test: int
    chance: float
    majority: float
    train_accuracy: dict[str, float]
    test_accuracy: dict[str, float]


@torch.no_grad()
def tower_features(tower, processor, paths: list[str], batch_size: int = 64
                   ) -> dict[str, torch.Tensor]:
    """``{"patch_mean": [N, D], "pooled": [N, D]}`` of the images at ``paths``."""
    from flamingo_kit.backbones import has_class_token, patch_tokens, pooled_features

    first_patch = 1 if has_class_token(tower) else 0
    dtype = next(tower.parameters()).dtype
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        result = tower(pixel_values=pixels.to(dtype))
        patches = patch_tokens(result.last_hidden_state)[:, first_patch:]
        out["patch_mean"].append(patches.float().mean(1))
        out["pooled"].append(pooled_features(result).float())
    return {name: torch.cat(parts) for name, parts in out.items()}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, n_classes: int, steps: int = 500, l2: float = 1e-3,
                 seed: int = 0) -> tuple[float, float]:
    """(train, test) accuracy of an L2-regularised softmax regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(train_x.size(1), n_classes, generator=generator)).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = [float(((x @ weight + bias).argmax(1) == y).float().mean())
                    for x, y in ((train_x, train_y), (test_x, test_y))]
    return accuracy[0], accuracy[1]


def probe(tower_dir: str, data: str, steps: int = 500) -> ProbeResult:
    """Probe the tower at ``tower_dir`` (a CLIP/SigLIP directory) on the set at ``data``."""
    from transformers import AutoImageProcessor

    from eval_fewshot.datasets import TRAIN_POOL, read_classification
    from flamingo_kit.backbones import load_vision, require_local_dir

    task = read_classification(data)
    classes = task.choices[TRAIN_POOL]
    train, test = task.pools[TRAIN_POOL], task.queries
    if not train or not test:
        raise ValueError(f"{data}: the probe needs labelled train and test images, got "
                         f"{len(train)} and {len(test)}")
    tower, _ = load_vision(tower_dir)
    tower.eval()
    processor = AutoImageProcessor.from_pretrained(require_local_dir(tower_dir, "vision"))
    index = {name: i for i, name in enumerate(classes)}
    train_y = torch.tensor([index[e.label] for e in train])
    test_y = torch.tensor([index[e.label] for e in test])
    train_f = tower_features(tower, processor, [e.image for e in train])
    test_f = tower_features(tower, processor, [e.image for e in test])
    train_acc, test_acc = {}, {}
    for name in FEATURES:
        train_acc[name], test_acc[name] = linear_probe(
            train_f[name], train_y, test_f[name], test_y, len(classes), steps)
    counts = torch.bincount(test_y, minlength=len(classes))
    return ProbeResult(classes, len(train), len(test), 1 / len(classes),
                       float(counts.max()) / len(test), train_acc, test_acc)


def format_result(result: ProbeResult) -> str:
    """The probe's table: accuracy per feature against chance and the majority class."""
    lines = [f"linear probe over {len(result.classes)} classes ({', '.join(result.classes)}); "
             f"{result.n_train} train / {result.n_test} test images",
             f"{'feature':<12}{'train acc':>11}{'test acc':>10}"]
    for name in FEATURES:
        lines.append(f"{name:<12}{100 * result.train_accuracy[name]:>10.1f}%"
                     f"{100 * result.test_accuracy[name]:>9.1f}%")
    lines.append(f"chance {100 * result.chance:.1f}%, majority class {100 * result.majority:.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m train.probe_vision",
                                     description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tower", help="a local CLIP/SigLIP directory (e.g. runs/contrastive/final)")
    parser.add_argument("--data", required=True,
                        help="classification set: classes.json, train.json, test.json")
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps of the probe")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    try:
        result = probe(args.tower, args.data, args.steps)
    except (OSError, ValueError) as error:
        print(f"train.probe_vision: {error}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result), indent=1) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
