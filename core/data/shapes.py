"""A synthetic image world for the vision-language and image-generation modules: small RGB images of
one or two coloured shapes, each with a caption and question/answer pairs, generated offline and
deterministically from a seed.

    scene    one or two shapes; two always differ in kind and sit on opposite sides
    shape    kind (circle, square, triangle) x colour (5) x size (small, large) x side (left, right),
             its centre jittered by a pixel or two so no two images of a description are identical
    caption  "a small red circle on the left and a large blue square on the right"
    Q/A      "what colour is the circle?" red | "what shape is on the left?" circle |
             "where is the blue square?" right | "what size is the square?" large |
             "how many shapes are there?" two                        (answers are one word)

Generalisation, not memorisation: HELD_OUT lists five colour-kind pairs (one per colour) that no
training scene contains; the held-out split puts one of them in every scene, and its questions ask
about that shape. Every colour and every kind still appear in training, in other pairings, so a
model that composes "colour" and "kind" answers the held-out questions and one that memorised
whole objects does not.

    scenes = make_scenes(1000, "train", seed=0)
    images = render_batch(scenes)            # (N, 3, 32, 32) float32 in [0, 1]
    caption(scenes[0]), qa_pairs(scenes[0])
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

IMAGE_SIZE = 32
KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (0.86, 0.16, 0.16), "green": (0.16, 0.71, 0.24), "blue": (0.2, 0.35, 0.9),
           "yellow": (0.92, 0.82, 0.16), "purple": (0.59, 0.24, 0.75)}
"""colour name -> RGB in [0, 1], far apart so a colour is never a matter of shading"""
SIZES = {"small": 3, "large": 6}
"""size name -> radius (circle), half side (square), half height (triangle), in pixels"""
SIDES = ("left", "right")
SIDE_X = {"left": 8, "right": 24}
"""the x of a shape's centre on each half of the 32-pixel image, before jitter"""
HELD_OUT = (("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
            ("purple", "square"))
"""colour-kind pairs never seen in training: one per colour, each kind kept with 3 or 4 colours"""

Split = Literal["train", "heldout", "pretrain"]
"""train: no held-out pair; heldout: one held-out pair per scene; pretrain: any pair (the vision
encoder's own pretraining, like a CLIP model that has seen every object, core/nn/vision.py)"""


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    side: str
    x: int
    """centre column in pixels"""
    y: int
    """centre row in pixels"""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    """left to right"""


def shape_mask(shape: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) bool: the pixels the shape covers."""
    rows, cols = np.mgrid[0:size, 0:size]
    r = SIZES[shape.size]
    dx, dy = cols - shape.x, rows - shape.y
    if shape.kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape.kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # an upright triangle: apex r above the centre, base r below it, as wide as it is tall
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(3, size, size) float32 in [0, 1]: the shapes on a black background."""
    image = np.zeros((3, size, size), dtype=np.float32)
    for shape in scene.shapes:
        image[:, shape_mask(shape, size)] = np.array(COLOURS[shape.colour], dtype=np.float32)[:, None]
    return image


def render_batch(scenes: list[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([render(s) for s in scenes]))


def describe(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} on the {shape.side}"


def caption(scene: Scene) -> str:
    return " and ".join(describe(s) for s in scene.shapes)


def qa_pairs(scene: Scene, about: Shape | None = None) -> list[tuple[str, str]]:
    """Questions with one-word answers; about a given shape (the held-out one), else every shape."""
    pairs = []
    for s in [about] if about is not None else scene.shapes:
        pairs += [(f"what colour is the {s.kind}?", s.colour), (f"what shape is on the {s.side}?", s.kind),
                  (f"where is the {s.name}?", s.side), (f"what size is the {s.kind}?", s.size)]
    pairs.append(("how many shapes are there?", ("one", "two")[len(scene.shapes) - 1]))
    return pairs


def held_out_shape(scene: Scene) -> Shape | None:
    """The shape of the scene whose colour-kind pair is held out (at most one per scene), if any."""
    return next((s for s in scene.shapes if (s.colour, s.kind) in HELD_OUT), None)


def _random_shape(rng: random.Random, kind: str, colour: str, side: str) -> Shape:
    return Shape(kind, colour, rng.choice(tuple(SIZES)), side, SIDE_X[side] + rng.randint(-1, 1),
                 IMAGE_SIZE // 2 + rng.randint(-2, 2))


def make_scenes(n: int, split: Split, seed: int) -> list[Scene]:
    """n scenes of the split, the same list for the same arguments (the two splits draw from
    different streams, so they never repeat each other by construction of the seed)."""
    rng = random.Random(f"shapes/{split}/{seed}")
    allowed = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]
    scenes = []
    for _ in range(n):
        count = rng.choice((1, 2))
        pool = [(c, k) for c in COLOURS for k in KINDS] if split == "pretrain" else allowed
        first = rng.choice(HELD_OUT if split == "heldout" else pool)
        pairs = [first] + ([rng.choice([p for p in pool if p[1] != first[1]])] if count == 2 else [])
        sides = rng.sample(SIDES, count)
        shapes = sorted((_random_shape(rng, kind, colour, side) for (colour, kind), side in zip(pairs, sides)),
                        key=lambda s: SIDES.index(s.side))
        scenes.append(Scene(tuple(shapes)))
    return scenes
