"""The shape world's vision encoder (core/nn/vision.py): patches, the attribute objective, the cache."""
from __future__ import annotations

import pytest
import torch

from core.artifacts import UserError
from core.data.shapes import IMAGE_SIZE, make_scenes, render_batch
from core.nn.vision import (ATTRIBUTES, AttributeHeads, VisionConfig, VisionEncoder, attribute_accuracy,
                            attribute_targets, cache_dir, load_vision_encoder, pretrain)


def test_patches_are_the_image_tiles_in_row_major_order():
    encoder = VisionEncoder(VisionConfig())
    images = torch.arange(2 * 3 * IMAGE_SIZE * IMAGE_SIZE, dtype=torch.float32).view(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    patches = encoder.patchify(images)
    assert patches.shape == (2, 64, 48)
    row, col = 2, 5  # patch 2 * 8 + 5 covers rows 8..11, columns 20..23
    torch.testing.assert_close(patches[1, row * 8 + col], images[1, :, 8:12, 20:24].reshape(-1), rtol=0, atol=0)


def test_attribute_heads_pool_the_left_and_right_patch_columns():
    heads = AttributeHeads(d=1, grid=8)
    columns = torch.arange(8.0).repeat(8)[None, :, None]  # each patch's feature = its column index
    for head in heads.heads.values():
        torch.nn.init.ones_(head.weight)
        torch.nn.init.zeros_(head.bias)
    logits = heads(columns)["kind"][0, :, 0]
    torch.testing.assert_close(logits, torch.tensor([1.5, 5.5]))  # mean of columns 0-3 and of 4-7


def test_targets_mark_empty_halves_none():
    scenes = make_scenes(40, "train", seed=0)
    targets = attribute_targets(scenes)
    for i, scene in enumerate(scenes):
        sides = {s.side for s in scene.shapes}
        for side_index, side in enumerate(("left", "right")):
            is_none = targets["colour"][i, side_index] == ATTRIBUTES["colour"].index("none")
            assert bool(is_none) == (side not in sides)


def test_pretraining_learns_every_attribute_far_above_an_untrained_encoder():
    cfg = VisionConfig()  # the configuration the vision-language modules load
    encoder, heads = pretrain(cfg)
    fresh = make_scenes(300, "heldout", seed=5)
    trained = attribute_accuracy(encoder, heads, fresh)
    torch.manual_seed(1)
    untrained_encoder = VisionEncoder(cfg)
    untrained = attribute_accuracy(untrained_encoder, AttributeHeads(cfg.d, untrained_encoder.grid), fresh)
    for attribute in ATTRIBUTES:
        assert trained[attribute] > 0.95 and trained[attribute] > untrained[attribute] + 0.5, (trained, untrained)


def test_the_encoder_is_pretrained_once_then_read_frozen_from_the_cache(workdir):
    cfg = VisionConfig(pretrain_steps=2, pretrain_scenes=32, batch=8)
    said = []
    first = load_vision_encoder(cfg, say=said.append)
    second = load_vision_encoder(cfg, say=said.append)
    assert len(said) == 1 and "pretraining" in said[0]
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
    images = render_batch(make_scenes(4, "train", seed=0))
    torch.testing.assert_close(first(images), second(images), rtol=0, atol=0)
    (cache_dir(cfg) / "encoder.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="encoder.safetensors"):
        load_vision_encoder(cfg, say=said.append)
