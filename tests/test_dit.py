"""dit: adaLN-Zero makes every block the identity and the model exactly zero at init; patchify and unpatchify
are inverse and keep the patch order; classifier-free guidance on hand-made eps and through the sampler's
wrapper; label dropout's share; the respaced schedule keeps the training chain's abar; the data, the
shape detector and the judge; a tiny training run lowers the loss and trains the null class. The toy
preset's checks and determinism are covered in tests/test_modules.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.nn.ddpm import Schedule, betas_for, diffusion_loss
from pre_train.generation.dit.code.dit import (
    CANVAS, CLASSES, JITTER, Config, DiT, accuracies, drop_labels, guide, guided_eps_model, init_identity, patchify,
    render_images, respaced, shape_present, single_shape_scenes, split_positions, train, train_judge, unpatchify,
)

TINY = Config(width=32, depth=2, heads=2, time_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((n, 3, CANVAS, CANVAS), generator=gen), torch.randint(0, 1000, (n,), generator=gen),
            torch.randint(0, len(CLASSES) + 1, (n,), generator=gen))


def perturbed(model: nn.Module) -> nn.Module:
    """The model with every parameter moved off its init (the zero layers included), as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("patch", [2, 4])
def test_every_block_is_the_identity_and_the_model_outputs_zero_at_init(patch):
    torch.manual_seed(0)
    model = DiT(Config(width=32, depth=3, heads=2, time_dim=16, patch=patch))
    x, t, y = random_batch()
    c = model.condition(t, y)
    h = torch.randn(6, (CANVAS // patch) ** 2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h), "adaLN-Zero: the gates start at 0, so a block adds exactly nothing"
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    assert init_identity(model, x, t, y) == (0.0, 0.0)
    assert perturbed(model)(x, t, y).abs().max() > 0.01  # the zeros are the init's, not the architecture's


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_patchify_unpatchify_round_trip_and_the_patch_order(patch):
    images = torch.randn(2, 3, CANVAS, CANVAS)
    tokens = patchify(images, patch)
    grid = CANVAS // patch
    assert tokens.shape == (2, grid * grid, 3 * patch * patch)
    assert torch.equal(unpatchify(tokens, patch), images)
    for k in (0, 1, grid, grid * grid - 1):   # token k holds the patch at row k // grid, column k % grid
        r, c = divmod(k, grid)
        block = images[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
        assert torch.equal(tokens[:, k], block.reshape(2, -1)), k
    asymmetric = torch.zeros(1, (CANVAS // patch) ** 2, 3 * patch * patch)
    asymmetric[0, 1] = 1.0                    # token 1: the patch right of the top-left one, not the one below it
    assert unpatchify(asymmetric, patch)[0, :, :patch, patch:2 * patch].eq(1).all()
    assert unpatchify(asymmetric, patch)[0, :, patch:2 * patch, :patch].eq(0).all()


def test_guidance_formula_on_hand_made_eps():
    eps_cond, eps_uncond = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.5, 4.0, -1.0])
    assert torch.equal(guide(eps_cond, eps_uncond, 3.0), torch.tensor([2.0, -2.0, -1.0]))   # 0.5 + 3 * 0.5, 4 + 3 * -2
    assert torch.equal(guide(eps_cond, eps_uncond, 1.0), eps_cond)
    assert torch.equal(guide(eps_cond, eps_uncond, 0.0), eps_uncond)


class LabelEcho(nn.Module):
    """A stand-in network whose eps is its class label plus 1000 times the step it was given."""
    null_class = len(CLASSES)

    def forward(self, x, t, y):
        return (y.float() + 1000 * t.float()).view(-1, 1, 1, 1).expand_as(x).clone()


def test_the_sampler_wrapper_guides_towards_the_requested_class_at_the_training_step():
    y = torch.tensor([0, 3, 14])
    timesteps = torch.tensor([0, 7, 999])
    x = torch.zeros(3, 3, CANVAS, CANVAS)
    for scale in (1.0, 2.5):
        eps = guided_eps_model(LabelEcho(), y, scale, timesteps)(x, torch.tensor([1]))
        expected = 7000 + len(CLASSES) + scale * (y.float() - len(CLASSES))          # eps_u + s (eps_c - eps_u)
        assert torch.equal(eps[:, 0, 0, 0], expected), scale


def test_label_dropout_replaces_the_requested_share_by_the_null_class():
    labels = torch.arange(200_000) % len(CLASSES)
    null = len(CLASSES)
    dropped = drop_labels(labels, 0.1, null, torch.Generator().manual_seed(0))
    is_null = dropped == null
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.003)   # 4 binomial stds: 0.0027
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert not (drop_labels(labels, 0.0, null, torch.Generator().manual_seed(0)) == null).any()


def test_shapes_and_the_model_sees_t_and_the_class():
    torch.manual_seed(0)
    model = perturbed(DiT(TINY))
    x, t, y = random_batch(4)
    assert model(x, t, y).shape == x.shape
    same = x[:1].expand(4, -1, -1, -1)
    out_t = model(same, torch.tensor([0, 250, 500, 999]), torch.zeros(4, dtype=torch.long))
    assert (out_t - out_t[:1]).abs().flatten(1).amax(1)[1:].min() > 1e-3, "eps_theta ignores t"
    out_y = model(same, torch.full((4,), 500), torch.tensor([0, 5, 10, len(CLASSES)]))
    assert (out_y - out_y[:1]).abs().flatten(1).amax(1)[1:].min() > 1e-3, "eps_theta ignores the class"
    assert torch.allclose(model(x, torch.tensor([5]), y), model(x, torch.full((4,), 5), y), atol=1e-6)  # one t broadcasts


@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_the_respaced_chain_keeps_abar_at_the_kept_steps(steps):
    sched = Schedule(betas_for("linear", 1000))
    short, timesteps = respaced(sched, steps)
    assert len(timesteps) == short.T == steps and timesteps[0] == 0 and timesteps[-1] == 999
    assert (timesteps[1:] > timesteps[:-1]).all()
    assert torch.allclose(short.alpha_bar, sched.alpha_bar[timesteps], rtol=1e-12, atol=0)
    if steps == 1000:
        assert torch.allclose(short.betas, sched.betas, rtol=1e-12, atol=0)


def test_the_data_split_and_the_shape_detector():
    scenes = single_shape_scenes(0)
    placements = 2 * (2 * JITTER + 1) ** 2
    assert len(scenes) == len(CLASSES) * placements
    images = render_images([s for s, _ in scenes])
    assert images.shape == (len(scenes), 3, CANVAS, CANVAS) and len(set(map(bytes, images.numpy()))) == len(scenes)
    for (scene, label), image in zip(scenes[:30], images[:30]):
        shape = scene.shapes[0]
        assert (shape.colour, shape.kind) == CLASSES[label] and len(scene.shapes) == 1
        assert image.flatten(1).unique(dim=1).shape[1] == 2                     # black and the one colour
    train_idx, held_idx = split_positions(scenes)
    assert not set(train_idx) & set(held_idx) and len(train_idx) + len(held_idx) == len(scenes)
    place = lambda i: (scenes[i][0].shapes[0].size, scenes[i][0].shapes[0].x, scenes[i][0].shapes[0].y)  # noqa: E731
    assert not {place(i) for i in train_idx} & {place(i) for i in held_idx}, "a held-out placement was trained on"
    for idx in (train_idx, held_idx):
        assert sorted({scenes[i][1] for i in idx}) == list(range(len(CLASSES)))
    assert shape_present(images).all()
    assert not shape_present(torch.zeros(3, 3, CANVAS, CANVAS)).any()
    assert shape_present(torch.rand((200, 3, CANVAS, CANVAS), generator=torch.Generator().manual_seed(0))).float().mean() < 0.05


def test_the_judge_labels_held_out_real_images_and_reports_colour_and_kind():
    scenes = single_shape_scenes(0)
    images, labels = render_images([s for s, _ in scenes]), torch.tensor([label for _, label in scenes])
    train_idx, held_idx = split_positions(scenes)
    judge = train_judge(images[train_idx], labels[train_idx], 300, seed=0)
    acc = accuracies(judge, images[held_idx], labels[held_idx])
    assert acc["class"] >= 0.95 and acc["colour"] >= acc["class"] and acc["kind"] >= acc["class"]
    shifted = (labels[held_idx] + 1) % len(CLASSES)   # the next class: same colour, other kind (or next colour)
    wrong = accuracies(judge, images[held_idx], shifted)
    assert wrong["class"] < 0.05 and wrong["kind"] < 0.05


class Quiet:
    def __init__(self):
        self.tables = {}

    def track(self, iterable, description, total=None):
        return iterable

    def log(self, table, **row):
        self.tables.setdefault(table, []).append(row)


def test_a_tiny_training_run_lowers_the_loss_and_trains_the_null_class():
    scenes = single_shape_scenes(0)
    images, labels = render_images([s for s, _ in scenes]) * 2 - 1, torch.tensor([label for _, label in scenes])
    sched = Schedule(betas_for("linear", 1000))
    cfg = Config(width=32, depth=2, heads=2, time_dim=16, steps=120, batch_size=32, ema_decay=0.0, log_every=20)

    def held_loss(model):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            return diffusion_loss(lambda xt, t: model(xt, t, labels[:256]), sched, images[:256], gen).item()

    torch.manual_seed(11)
    before = DiT(cfg)
    null_before = before.class_embed.weight[-1].clone()
    model = train(cfg, sched, images, labels, [11, 12, 13, 14], Quiet())
    assert held_loss(before) == pytest.approx(1.0, abs=0.02)       # eps_theta = 0 at init: the loss is E[eps^2]
    assert held_loss(model) < 0.7 * held_loss(before)                # 120 steps: about 0.53
    assert not torch.equal(model.class_embed.weight[-1], null_before), "the null class was never trained"
