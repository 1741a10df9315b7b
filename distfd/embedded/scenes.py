"""Procedural captioned scenes: coloured shapes on a coloured background.

Every scene is a 32x32 RGB image with one (optionally two) shapes, each with a
shape, colour, size and position, on a named background colour, e.g.
``"a small red circle at the top left on a blue background"``.

Everything is deterministic from a seed: the same ``(n, seed, two_shape_prob)``
gives bit-identical images, captions and labels on every machine (pure numpy
float64 arithmetic, no threading).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 205),
    "cyan": (50, 210, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "blue": (25, 40, 120),
    "green": (30, 90, 40),
}
SIZES: dict[str, float] = {"small": 4.5, "large": 8.0}
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) centre in pixels
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "centre": (16.0, 16.0),
}

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS)

#: label name -> class names, for the first shape and the scene background.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "size": SIZE_NAMES,
    "position": POSITION_NAMES,
    "background": BACKGROUND_NAMES,
}
#: Every word that can occur in a caption (used to build the tokenizer).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "at", "the", "in", "on", "and", "background"}
        | set(SHAPES)
        | set(COLOURS)
        | set(BACKGROUNDS)
        | set(SIZES)
        | {w for p in POSITIONS for w in p.split()}
    )
)


@dataclass(frozen=True)
class ShapeSpec:
    """One object in a scene (indices into the attribute tables)."""

    shape: int
    colour: int
    size: int
    position: int


@dataclass(frozen=True)
class SceneSpec:
    """A full scene description: one or two shapes on a background."""

    objects: tuple[ShapeSpec, ...]
    background: int

    @property
    def caption(self) -> str:
        parts = []
        for o in self.objects:
            pos = POSITION_NAMES[o.position]
            where = "in the centre" if pos == "centre" else f"at the {pos}"
            parts.append(f"a {SIZE_NAMES[o.size]} {COLOUR_NAMES[o.colour]} {SHAPES[o.shape]} {where}")
        return f"{' and '.join(parts)} on a {BACKGROUND_NAMES[self.background]} background"


@dataclass
class SceneBatch:
    """Rendered scenes: ``images`` is uint8 ``(n, 3, 32, 32)``; labels are int64 ``(n,)``.

    ``labels`` holds the ATTRIBUTES of the first shape plus ``n_shapes``; for
    two-shape scenes the second shape's labels are under ``shape2``, ``colour2``,
    ``size2`` and ``position2`` (``-1`` for single-shape scenes).
    """

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]

    def as_float(self) -> torch.Tensor:
        """Images as float32 in ``[-1, 1]``."""
        return to_float(self.images)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` images -> float32 ``[-1, 1]``."""
    return images.float().div(127.5).sub(1.0)


def _sample_spec(rng: np.random.Generator, two_shape_prob: float) -> SceneSpec:
    n_obj = 2 if rng.random() < two_shape_prob else 1
    positions = rng.permutation(len(POSITIONS))[:n_obj]
    objects = []
    for pos in positions:
        objects.append(
            ShapeSpec(
                shape=int(rng.integers(len(SHAPES))),
                colour=int(rng.integers(len(COLOURS))),
                size=int(rng.integers(len(SIZES))),
                position=int(pos),
            )
        )
    used = {COLOUR_NAMES[o.colour] for o in objects}
    allowed = [i for i, name in enumerate(BACKGROUND_NAMES) if name not in used]
    return SceneSpec(objects=tuple(objects), background=int(allowed[rng.integers(len(allowed))]))


def sample_specs(n: int, seed: int, two_shape_prob: float = 0.0) -> list[SceneSpec]:
    """Draw ``n`` scene descriptions deterministically from ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    return [_sample_spec(rng, two_shape_prob) for _ in range(n)]


def labels_of(specs: list[SceneSpec]) -> dict[str, torch.Tensor]:
    """Attribute labels (see :class:`SceneBatch`) of a list of specs."""
    out: dict[str, list[int]] = {
        k: [] for k in (*ATTRIBUTES, "n_shapes", "shape2", "colour2", "size2", "position2")
    }
    for s in specs:
        first = s.objects[0]
        second = s.objects[1] if len(s.objects) > 1 else None
        for key in ("shape", "colour", "size", "position"):
            out[key].append(getattr(first, key))
            out[f"{key}2"].append(getattr(second, key) if second else -1)
        out["background"].append(s.background)
        out["n_shapes"].append(len(s.objects))
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in out.items()}


def sample_captions(
    n: int, seed: int, two_shape_prob: float = 0.0
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Held-out prompts: ``n`` captions and their labels, without rendering.

    Use a seed that was not used for training to get a fresh draw; the captions
    equal those of ``generate_scenes(n, seed, two_shape_prob)``.
    """
    specs = sample_specs(n, seed, two_shape_prob)
    return [s.caption for s in specs], labels_of(specs)


_GRID = (np.arange(IMAGE_SIZE * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in ``[0, 1]`` of one shape, shape ``(32, 32)``."""
    dx = _GRID[None, :] - cx
    dy = _GRID[:, None] - cy
    if shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "square":
        h = 0.85 * r
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":
        top, bottom = -1.05 * r, 0.85 * r
        frac = (dy - top) / (bottom - top)
        m = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= frac * 1.1 * r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    s = SUPERSAMPLE
    return m.astype(np.float64).reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3))


def render(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """Render one scene to uint8 ``(3, 32, 32)``; ``rng`` drives small jitter."""
    bg = np.array(BACKGROUNDS[BACKGROUND_NAMES[spec.background]], dtype=np.float64)
    bg = np.clip(bg + rng.uniform(-8, 8, size=3), 0, 255)
    img = np.broadcast_to(bg[:, None, None], (3, IMAGE_SIZE, IMAGE_SIZE)).copy()
    for o in spec.objects:
        cx, cy = POSITIONS[POSITION_NAMES[o.position]]
        cx += rng.uniform(-1.5, 1.5)
        cy += rng.uniform(-1.5, 1.5)
        r = SIZES[SIZE_NAMES[o.size]] * rng.uniform(0.92, 1.08)
        colour = np.array(COLOURS[COLOUR_NAMES[o.colour]], dtype=np.float64)
        colour = np.clip(colour + rng.uniform(-12, 12, size=3), 0, 255)
        cover = _mask(SHAPES[o.shape], cx, cy, r)[None]
        img = img * (1.0 - cover) + colour[:, None, None] * cover
    return np.rint(img).astype(np.uint8)


def generate_scenes(n: int, seed: int, two_shape_prob: float = 0.0) -> SceneBatch:
    """Render ``n`` captioned scenes deterministically from ``seed``.

    Returns a :class:`SceneBatch` (uint8 images, captions, int64 labels).
    """
    specs = sample_specs(n, seed, two_shape_prob)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    images = np.stack([render(s, rng) for s in specs]) if specs else np.zeros((0, 3, 32, 32), np.uint8)
    return SceneBatch(
        images=torch.from_numpy(images), captions=[s.caption for s in specs], labels=labels_of(specs)
    )
