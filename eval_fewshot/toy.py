"""A toy evaluation world: tiny datasets in the real formats and a tiny untrained model.

Used by the tests, the benchmark and smoke runs of the CLI. The datasets follow the synthetic
world's layout (``ROOT/eval/{captioning,vqa,classification,label_binding}``) with images of one
coloured shape each, so every task reader and metric runs end to end in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220)}
SIZES = ("small", "large")


def draw_shape(shape: str, color: str, size: str, x: float, y: float, px: int = 32) -> Image.Image:
    """An RGB image with one ``shape`` of ``color`` centred at (x, y) in [0, 1] coordinates."""
    img = Image.new("RGB", (px, px), (245, 245, 245))
    r = px * (0.3 if size == "large" else 0.15)
    cx, cy = x * px, y * px
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def _random_object(rng: random.Random) -> dict:
    return {"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)),
            "size": rng.choice(SIZES), "x": round(rng.uniform(0.35, 0.65), 3),
            "y": round(rng.uniform(0.35, 0.65), 3)}


def _save(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    draw_shape(**obj).save(path)


def _write_json(data, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _captions(obj: dict) -> list[dict]:
    s, c, z = obj["shape"], obj["color"], obj["size"]
    raws = [f"A {z} {c} {s}.", f"a {c} {s}", f"There is a {c} {s}.", f"A {s} that is {c}.",
            f"One {z} {s} in {c}."]
    return [{"raw": r, "tokens": r.lower().strip(".").split()} for r in raws]


def write_toy_eval_sets(root: str, seed: int = 0, n_train: int = 12, n_test: int = 6) -> str:
    """Write ``root/eval/...`` in the synthetic world's formats; returns ``root``."""
    rng = random.Random(seed)
    ev = os.path.join(root, "eval")
    objects = [_random_object(rng) for _ in range(n_train + n_test)]
    splits = ["train"] * n_train + ["test"] * n_test
    # Captioning (Karpathy format).
    images = []
    for i, (obj, split) in enumerate(zip(objects, splits)):
        name = f"{i:06d}.png"
        _save(obj, os.path.join(ev, "captioning", "images", name))
        images.append({"filepath": "images", "filename": name, "imgid": i, "cocoid": 1000 + i,
                       "split": split, "sentences": _captions(obj), "objects": [obj]})
    _write_json({"dataset": "synthetic", "images": images},
                os.path.join(ev, "captioning", "dataset.json"))
    # VQA (VQAv2 format): one colour and one shape question per image.
    for split in ("train", "test"):
        questions, annotations = [], []
        for i, (obj, s) in enumerate(zip(objects, splits)):
            if s != split:
                continue
            image_id = 5000 + i
            _save(obj, os.path.join(ev, "vqa", "images", f"{image_id:012d}.png"))
            for j, (q, a) in enumerate([("What color is the shape?", obj["color"]),
                                        ("What shape is it?", obj["shape"])]):
                qid = image_id * 10 + j
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                answers = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                           for k in range(10)]
                annotations.append({"question_id": qid, "image_id": image_id,
                                    "question_type": "what", "answer_type": "other",
                                    "multiple_choice_answer": a, "answers": answers})
        _write_json({"questions": questions}, os.path.join(ev, "vqa", f"{split}_questions.json"))
        _write_json({"annotations": annotations},
                    os.path.join(ev, "vqa", f"{split}_annotations.json"))
    # Classification by shape.
    classes = list(SHAPES)
    _write_json({"classes": classes}, os.path.join(ev, "classification", "classes.json"))
    for split in ("train", "test"):
        samples = []
        for i, (obj, s) in enumerate(zip(objects, splits)):
            if s == split:
                name = f"images/{i:06d}.png"
                _save(obj, os.path.join(ev, "classification", name))
                samples.append({"filename": name, "label": classes.index(obj["shape"])})
        _write_json({"samples": samples}, os.path.join(ev, "classification", f"{split}.json"))
    _write_label_binding(os.path.join(ev, "label_binding"), rng)
    return root


def _write_label_binding(directory: str, rng: random.Random, n_episodes: int = 2) -> None:
    words = ["blick", "dax", "wug", "fep", "tove", "zorp"]
    episodes = []
    for e in range(n_episodes):
        pair = rng.sample(SHAPES, 2)
        names = dict(zip(pair, words[2 * e : 2 * e + 2]))

        def items(n: int, tag: str, e=e, pair=pair) -> list[dict]:
            out = []
            for i in range(n):
                obj = _random_object(rng) | {"shape": pair[i % 2]}
                name = f"images/ep{e}-{tag}{i}.png"
                _save(obj, os.path.join(directory, name))
                out.append({"filename": name, "class": obj["shape"]})
            return out

        episodes.append({"episode_id": e, "names": names, "support": items(16, "s"),
                         "queries": items(4, "q")})
    _write_json({"episodes": episodes}, os.path.join(directory, "episodes.json"))


def build_toy_model(out_dir: str, seed: int = 0, image_size: int = 32, hidden_size: int = 64,
                    num_layers: int = 2, open_gates: bool = True) -> str:
    """Save an untrained tiny FlamingoModel + processor to ``out_dir``; returns ``out_dir``.

    ``open_gates`` sets the cross-attention gates to 1: at their initial 0 the images have no
    effect at all, which would hide image-handling mistakes in checks built on this model.
    """
    import torch

    from data_pipelines.tokenizer import train_tokenizer
    from flamingo_kit import FlamingoConfig, FlamingoModel, FlamingoProcessor
    from flamingo_kit.from_scratch import build_lm, build_vision, image_processor

    words = [f"{z} {c} {s}" for s in SHAPES for c in COLORS for z in SIZES]
    corpus = words + ["Question: What color is the shape? Short answer: red",
                      "Output: There is a blue square.", "blick dax wug fep tove zorp"] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    processor = FlamingoProcessor(tokenizer, image_processor(image_size))
    config = FlamingoConfig(cross_attn_every_n_layers=1, perceiver_num_latents=8,
                            perceiver_depth=1, perceiver_heads=2, perceiver_dim_head=16,
                            xattn_heads=2, xattn_dim_head=16)
    lm = build_lm("llama", seed=seed, vocab_size=len(tokenizer), hidden_size=hidden_size,
                  num_layers=num_layers, max_positions=1024)
    vision = build_vision("clip", seed=seed, image_size=image_size, hidden_size=32,
                          num_layers=1, num_heads=2)
    model = FlamingoModel.from_parts(lm, vision, config, processor=processor)
    if open_gates:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_gate"):
                    param.fill_(1.0)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
