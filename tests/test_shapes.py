"""The synthetic shape world (core/data/shapes.py): pixels, descriptions and the held-out split."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.data.shapes import (COLOURS, HELD_OUT, IMAGE_SIZE, KINDS, SIZES, Scene, Shape, caption, held_out_shape,
                              make_scenes, qa_pairs, render, render_batch, shape_mask)


def test_each_kind_covers_its_closed_form_area():
    """Pixels covered: a square exactly (2r + 1)^2, a circle about pi r^2, a triangle about half its box."""
    r = SIZES["large"]
    area = {k: shape_mask(Shape(k, "red", "large", "left", 16, 16)).sum() for k in KINDS}
    assert area["square"] == (2 * r + 1) ** 2
    assert abs(area["circle"] - math.pi * r * r) < 2 * math.pi * r  # within one perimeter of pixels
    # the triangle is 2r + 1 rows tall and as wide as tall at its base: about half its bounding box
    assert 0.4 < area["triangle"] / (2 * r + 1) ** 2 < 0.6
    assert area["triangle"] < area["circle"] < area["square"]


def test_render_puts_each_shape_in_its_colour_on_its_side():
    scene = make_scenes(50, "train", seed=3)
    for s in scene:
        image = render(s)
        assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == np.float32
        covered = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for shape in s.shapes:
            mask = shape_mask(shape)
            assert (image[:, mask] == np.array(COLOURS[shape.colour], dtype=np.float32)[:, None]).all()
            cols = np.nonzero(mask)[1]
            assert (cols < IMAGE_SIZE // 2).all() if shape.side == "left" else (cols >= IMAGE_SIZE // 2).all()
            covered |= mask
        assert (image[:, ~covered] == 0).all(), "the background stays black"


def test_descriptions_follow_the_attributes():
    left = Shape("circle", "red", "small", "left", 8, 16)
    right = Shape("square", "blue", "large", "right", 24, 16)
    scene = Scene((left, right))
    assert caption(scene) == "a small red circle on the left and a large blue square on the right"
    qa = dict(qa_pairs(scene))
    assert qa["what colour is the circle?"] == "red" and qa["what shape is on the right?"] == "square"
    assert qa["where is the blue square?"] == "right" and qa["what size is the square?"] == "large"
    assert qa["how many shapes are there?"] == "two"


def test_held_out_pairs_never_train_and_always_test():
    train, heldout = make_scenes(2000, "train", seed=0), make_scenes(500, "heldout", seed=0)
    assert all(held_out_shape(s) is None for s in train)
    assert all(held_out_shape(s) is not None for s in heldout)
    seen = {(sh.colour, sh.kind) for s in train for sh in s.shapes}
    assert seen == {(c, k) for c in COLOURS for k in KINDS} - set(HELD_OUT)
    assert {c for c, _ in seen} == set(COLOURS) and {k for _, k in seen} == set(KINDS)
    assert {(sh.colour, sh.kind) for s in heldout for sh in s.shapes} & set(HELD_OUT) == set(HELD_OUT)
    for s in train + heldout:  # two shapes differ in kind and sit on both sides: questions are unambiguous
        assert len({sh.kind for sh in s.shapes}) == len(s.shapes) == len({sh.side for sh in s.shapes})


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_scenes_repeat_for_a_seed_and_vary_across_seeds(split):
    assert make_scenes(30, split, seed=1) == make_scenes(30, split, seed=1)
    assert make_scenes(30, split, seed=1) != make_scenes(30, split, seed=2)
    images = render_batch(make_scenes(200, split, seed=1))
    assert images.shape == (200, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert len({img.numpy().tobytes() for img in images}) > 150, "jitter keeps most images distinct"
