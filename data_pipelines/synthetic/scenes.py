"""Procedural scenes: 1-4 coloured shapes on a 3x2 grid, rendered with PIL, exact ground truth.

Objects sit in distinct grid cells (columns left/middle/right, rows top/bottom) with a little
jitter, so every position word is unambiguous and objects never overlap. Rendering is a pure
function of the scene, so the scene is the ground truth of everything said about the image.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
    "white": (235, 235, 235),
}
SIZES = {"small": 0.16, "large": 0.28}  # object width as a fraction of the image side
COLUMNS = ("left", "middle", "right")
ROWS = ("top", "bottom")
BACKGROUND = (24, 24, 28)
MAX_OBJECTS = len(COLUMNS) * len(ROWS)


@dataclass(frozen=True)
class SceneObject:
    """One shape: attributes by name and its centre in [0, 1] image coordinates."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    @property
    def column(self) -> str:
        """Horizontal position word (``left``/``middle``/``right``)."""
        return COLUMNS[min(int(self.x * len(COLUMNS)), len(COLUMNS) - 1)]

    def as_dict(self) -> dict:
        """JSON ground truth (``shape``, ``color``, ``size``, ``x``, ``y``)."""
        return asdict(self)


def sample_scene(
    rng: random.Random,
    n_objects: int | None = None,
    shape: str | None = None,
    color: str | None = None,
) -> list[SceneObject]:
    """A random scene, objects sorted left to right (then top to bottom).

    ``shape``/``color`` fix the attribute of every object (used for classification and label
    binding images, which hold one object of a known class).
    """
    n = n_objects if n_objects is not None else rng.randint(1, 4)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in [1, {MAX_OBJECTS}], got {n}")
    cells = rng.sample(range(MAX_OBJECTS), n)
    objects = []
    for cell in sorted(cells, key=lambda c: (c % len(COLUMNS), c // len(COLUMNS))):
        col, row = cell % len(COLUMNS), cell // len(COLUMNS)
        # centre of the cell plus jitter small enough to stay inside it
        x = (col + 0.5 + rng.uniform(-0.15, 0.15)) / len(COLUMNS)
        y = (row + 0.5 + rng.uniform(-0.12, 0.12)) / len(ROWS)
        objects.append(SceneObject(
            shape=shape or rng.choice(SHAPES),
            color=color or rng.choice(list(COLORS)),
            size=rng.choice(list(SIZES)),
            x=round(x, 4),
            y=round(y, 4),
        ))
    return objects


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    t = r / 3  # cross: a plus sign with arms one third as thick as it is long
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]


def render(objects: list[SceneObject], image_size: int = 64) -> Image.Image:
    """Draw a scene (deterministic: same scene, same pixels)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        cx, cy = obj.x * image_size, obj.y * image_size
        r = SIZES[obj.size] * image_size / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image


class UniqueImages:
    """Remembers every image handed out so no two samples anywhere share pixels.

    The world draws train, eval-train and eval-test images from one registry, which is what
    guarantees that evaluation images never appear in training data or across splits.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self._seen: set[bytes] = set()

    def draw(self, rng: random.Random, **scene_kw) -> tuple[list[SceneObject], Image.Image]:
        """Sample and render scenes until one is new; return it with its image."""
        for _ in range(1000):
            objects = sample_scene(rng, **scene_kw)
            image = render(objects, self.image_size)
            digest = hashlib.blake2b(image.tobytes(), digest_size=16).digest()
            if digest not in self._seen:
                self._seen.add(digest)
                return objects, image
        raise RuntimeError(
            f"could not draw a new unique image with {scene_kw}; use a larger --image-size or "
            "fewer images"
        )
