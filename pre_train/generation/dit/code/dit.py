"""A Diffusion Transformer (DiT) with adaLN-Zero and classifier-free guidance on the shape images, in one file.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers":
    tokens      x (B, 3, H, W) -> (H/p)(W/p) patches of p x p pixels, each a linear map of its 3 p^2
                values, plus fixed 2-D sin-cos positions                                    (sec. 3.2, "patchify")
    condition   c = emb_t(t) + emb_y(y): an MLP on the sinusoidal embedding of t plus a class-embedding
                table with one extra "null" class                                            (sec. 3.2)
    adaLN-Zero  per block, (shift_1, scale_1, gate_1, shift_2, scale_2, gate_2) = W_mod SiLU(c), W_mod = 0 at init;
                h = h + gate_1 * Attn( LN(h) (1 + scale_1) + shift_1 )
                h = h + gate_2 * MLP( LN(h) (1 + scale_2) + shift_2 )                        (sec. 3.2, Fig. 3)
                so every block starts as the identity; the final layer, LN(h) (1 + scale) + shift
                and a linear map back to p^2 pixel values, is zero at init too: eps_theta starts at 0
    output      unpatchify the tokens back to (B, 3, H, W): eps_theta(x_t, t, y). The paper also learns
                Sigma (a second output half); here sigma_t is fixed (sqrt(beta~_t)), eps only.
Classifier-free guidance (Ho & Salimans 2022): train one network on y and, with probability p_uncond
(0.1 here), on the null class; sample with
    eps~ = eps_theta(x_t, null) + s ( eps_theta(x_t, y) - eps_theta(x_t, null) )      (DiT's scale s;
                Ho & Salimans write (1 + w) eps_c - w eps_u, w = s - 1)
s = 1 is the conditional model alone (no guidance); s > 1 pushes the sample towards what makes class y
likely, trading diversity for fidelity.

The DDPM underneath (schedules, q(x_t | x_0), L_simple, the ancestral step, EMA) is core/nn/ddpm.py,
shared with the diffusion module. Sampling runs K << T respaced steps (Nichol & Dhariwal 2021, sec. 4):
on a subsequence t_1 < ... < t_K of the training steps, beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}, so the
respaced chain has exactly the training chain's abar at every kept step and the same network serves it.

The data: single-shape images of the shape world (core/data/shapes.py), one shape of a colour-kind
pair at its own pixel size, on a 16 x 16 canvas (the half of a 32 x 32 scene that one shape occupies),
its centre jittered by up to JITTER pixels each way. The class is the colour-kind pair: 15 classes.
A small CNN trained in the same run on real images (half of the positions; tested on the other half)
labels the generated samples; its accuracy on real images is reported, or the sample metric means nothing.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Range, Seed
from core.data.shapes import COLOURS, KINDS, SIZES, SIDE_X, Scene, Shape, render, shape_mask
from core.nn.ddpm import EMA, Schedule, betas_for, diffusion_loss, sample, time_embedding
from core.nn.training import cosine_lr

CANVAS = 16
"""image side in pixels: the half of a 32 x 32 scene that one shape occupies (its centre at SIDE_X["left"])"""
JITTER = 2
"""the shape's centre moves by up to this many pixels along each axis (the shape world jitters by 1 and 2)"""
CLASSES = [(colour, kind) for colour in COLOURS for kind in KINDS]
"""class index -> (colour, kind): 15 classes, chance 1/15"""
COLOUR_TOLERANCE = 0.1
"""a pixel shows a known colour when every RGB channel is within this of it (uniform noise: 1 pixel in 125 per colour)"""


@dataclass
class Config:
    steps: Annotated[int, Range(ge=1, le=200_000)] = 4000
    """AdamW steps of DiT training"""
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 32
    """images per step, each with its own class, position, size, t and eps"""
    lr: Annotated[float, Range(gt=0, le=1)] = 2e-3
    """peak AdamW learning rate (linear warmup over the first 5% of the steps, cosine decay to a tenth)"""
    width: Annotated[int, Range(ge=8, le=1024)] = 64
    """token width d"""
    depth: Annotated[int, Range(ge=1, le=24)] = 4
    """DiT blocks"""
    heads: Annotated[int, Range(ge=1, le=16)] = 4
    """attention heads (width must divide by it)"""
    patch: Literal[2, 4, 8] = 2
    """patch side p in pixels: (16 / p)^2 tokens of 3 p^2 values (DiT-XL/2's p = 2: 64 tokens; p = 4 trains 3x
    faster per step but its samples are blockier and their kind is right less often)"""
    mlp_ratio: Annotated[int, Range(ge=1, le=8)] = 4
    """hidden width of each block's MLP, in multiples of d"""
    time_dim: Annotated[int, Range(ge=2, le=512)] = 64
    """size of the sinusoidal embedding of t before its MLP"""
    label_dropout: Annotated[float, Range(ge=0, lt=1)] = 0.1
    """p_uncond: share of training images whose class is replaced by the null class (trains the unconditional branch)"""
    guidance_scale: Annotated[float, Range(ge=0, le=20)] = 4.0
    """s of the guided samples, eps_u + s (eps_c - eps_u); the unguided samples use s = 1"""
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.995
    """decay of the exponential moving average of the weights that samples (0: sample with the raw weights)"""
    T: Annotated[int, Range(ge=2, le=4000)] = 1000
    """diffusion steps of training"""
    schedule: Literal["linear", "cosine"] = "linear"
    """beta schedule (core/nn/ddpm.py), DiT's linear one by default"""
    sample_steps: Annotated[int, Range(ge=2, le=4000)] = 25
    """respaced ancestral steps of sampling (evenly spread over 1..T)"""
    sigma: Literal["beta", "beta_tilde"] = "beta_tilde"
    """sampling std: sqrt(beta_t) or sqrt(beta~_t) of the respaced chain (fixed, not learnt)"""
    samples_per_class: Annotated[int, Range(ge=1, le=1000)] = 20
    """samples generated per class, with guidance and without"""
    classifier_steps: Annotated[int, Range(ge=1, le=20_000)] = 300
    """Adam steps of the judge CNN on real images"""
    log_every: Annotated[int, Range(ge=1, le=100_000)] = 50
    """log the mean training loss every this many steps"""
    seed: Seed = 0
    """seeds the data split, the networks, the training noise, the label dropout and the sampler (each its own stream)"""

    def problems(self) -> list[str]:
        problems = []
        if self.width % self.heads or (self.width // self.heads) % 2:
            problems.append(f"width={self.width} must split into heads={self.heads} heads of an even size")
        if self.width % 4:
            problems.append(f"width={self.width} must divide by 4 (2-D sin-cos positions: sin and cos of rows and columns)")
        if self.sample_steps > self.T:
            problems.append(f"sample_steps={self.sample_steps} exceeds T={self.T}")
        return problems


# --- patches -------------------------------------------------------------------------------------------------
def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p): patches in row-major order, each flattened channel-first."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)                     # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """The inverse of patchify: (B, g g, C p p) -> (B, C, g p, g p) for a square grid g x g."""
    B, N, _ = tokens.shape
    g = math.isqrt(N)
    x = tokens.reshape(B, g, g, channels, p, p)                        # (B, gh, gw, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, g * p, g * p)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D positions (grid^2, dim): the first half the sinusoid of the patch's row, the second of its
    column (DiT's get_2d_sincos_pos_embed), the same sinusoid as the time embedding's."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([time_embedding(rows.flatten(), dim // 2), time_embedding(cols.flatten(), dim // 2)], -1)


# --- the network -----------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LN(x) (1 + scale) + shift, shift and scale (B, d) from the condition, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def zero_init(layer: nn.Linear) -> nn.Linear:
    """The "Zero" of adaLN-Zero: the layer outputs 0 until training moves it."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DiTBlock(nn.Module):
    """A pre-LN Transformer block whose LayerNorms have no parameters of their own: their shift and scale,
    and a gate on each residual branch, are regressed from the condition c (adaLN-Zero)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv, self.attn_out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(width, 6 * width)))

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        B, N, d = h.shape
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.attn_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, -1)
        h = h + gate1.unsqueeze(1) * self.attention(modulate(self.attn_norm(h), shift1, scale1))
        return h + gate2.unsqueeze(1) * self.mlp(modulate(self.mlp_norm(h), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c; no gate) and a linear map of each token to its p^2 C pixel values, both zero at init."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(width, 2 * width)))
        self.linear = zero_init(nn.Linear(width, out))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm(h), shift, scale))


class DiT(nn.Module):
    """eps_theta(x_t, t, y): patchify -> embed + positions -> blocks conditioned on c = emb_t + emb_y -> final
    layer -> unpatchify. Class index `num_classes` is the null class of classifier-free guidance."""

    def __init__(self, cfg: Config, num_classes: int = len(CLASSES), channels: int = 3, image: int = CANVAS):
        super().__init__()
        self.patch, self.channels, self.time_dim, self.null_class = cfg.patch, channels, cfg.time_dim, num_classes
        grid = image // cfg.patch
        self.embed = nn.Linear(channels * cfg.patch ** 2, cfg.width)
        self.register_buffer("positions", sincos_positions(grid, cfg.width), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        # N(0, 1) rows (torch's default), not DiT's N(0, 0.02^2): the class reaches the blocks only through the
        # zero-initialised modulation, and a tiny embedding times a zero weight gets almost no gradient; on a budget
        # of a few thousand steps the 0.02 table left the unguided samples' colour near chance (0.32 against 0.76)
        self.class_embed = nn.Embedding(num_classes + 1, cfg.width)
        self.blocks = nn.ModuleList(DiTBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.width, channels * cfg.patch ** 2)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = emb_t(t) + emb_y(y), (B, d); a single t broadcasts over the batch."""
        return self.time_mlp(time_embedding(t, self.time_dim)) + self.class_embed(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.condition(t, y)
        h = self.embed(patchify(x, self.patch)) + self.positions
        for block in self.blocks:
            h = block(h, c)
        return unpatchify(self.final(h, c), self.patch, self.channels)


def drop_labels(y: torch.Tensor, p: float, null_class: int, gen: torch.Generator) -> torch.Tensor:
    """Each label replaced by the null class with probability p: the same network learns eps(x_t, null)."""
    drop = torch.rand(y.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided_eps_model(model: DiT, y: torch.Tensor, scale: float, timesteps: torch.Tensor):
    """The eps model the sampler calls, eps(x, k) for the k-th respaced step: the network at the training
    step timesteps[k], with guidance scale s. s = 1 is the conditional network alone (one pass); otherwise
    the conditional and the null-class rows run as one batch of 2B and are mixed by `guide`."""
    null = torch.full_like(y, model.null_class)

    def eps(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = timesteps[k]
        if scale == 1:
            return model(x, t, y)
        eps_cond, eps_uncond = model(torch.cat([x, x]), t, torch.cat([y, null])).chunk(2)
        return guide(eps_cond, eps_uncond, scale)
    return eps


def respaced(sched: Schedule, steps: int) -> tuple[Schedule, torch.Tensor]:
    """K = `steps` evenly spread training steps (0-based indices, the last one T - 1) and the schedule of the
    chain that visits only them: beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}} (abar before the first is 1)."""
    timesteps = torch.linspace(0, sched.T - 1, steps).round().long()
    abar = sched.alpha_bar[timesteps]
    abar_prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return Schedule(1 - abar / abar_prev), timesteps


# --- the data ----------------------------------------------------------------------------------------------------
def single_shape_scenes(seed: int) -> list[tuple[Scene, int]]:
    """Every distinct single-shape image of the canvas: each class x size x centre offset (dx, dy) in
    [-JITTER, JITTER]^2, shuffled by `seed`; (scene, class index)."""
    centre = SIDE_X["left"]                                              # = CANVAS / 2
    scenes = [(Scene((Shape(kind, colour, size, "left", centre + dx, centre + dy),)), label)
              for label, (colour, kind) in enumerate(CLASSES) for size in SIZES
              for dx, dy in itertools.product(range(-JITTER, JITTER + 1), repeat=2)]
    random.Random(seed).shuffle(scenes)
    return scenes


def render_images(scenes: list[Scene]) -> torch.Tensor:
    """(N, 3, CANVAS, CANVAS) in [0, 1]."""
    return torch.from_numpy(np.stack([render(s, CANVAS) for s in scenes]))


def split_positions(scenes: list[tuple[Scene, int]]) -> tuple[list[int], list[int]]:
    """Indices of a classifier train / held-out split by (size, offset): half of the placements of every class
    are never shown to the classifier, so its held-out accuracy is on images it has not seen."""
    placements = sorted({(s.shapes[0].size, s.shapes[0].x, s.shapes[0].y) for s, _ in scenes})
    held = set(placements[1::2])
    train = [i for i, (s, _) in enumerate(scenes) if (s.shapes[0].size, s.shapes[0].x, s.shapes[0].y) not in held]
    return train, [i for i in range(len(scenes)) if i not in set(train)]


def smallest_shape_pixels() -> int:
    """Pixels of the smallest shape on the canvas (a small triangle)."""
    c = SIDE_X["left"]
    return min(int(shape_mask(Shape(kind, "red", size, "left", c, c), CANVAS).sum()) for kind in KINDS for size in SIZES)


def shape_present(images: torch.Tensor) -> torch.Tensor:
    """(N,) bool: at least half the smallest shape's pixels show one known colour (images in [0, 1])."""
    palette = torch.tensor(list(COLOURS.values()))                            # (5, 3)
    close = ((images.unsqueeze(1) - palette[None, :, :, None, None]).abs() <= COLOUR_TOLERANCE).all(2)  # (N, 5, H, W)
    return close.flatten(2).sum(-1).max(-1).values >= smallest_shape_pixels() / 2


# --- the judge: a small CNN trained on real images -------------------------------------------------------------------
class Judge(nn.Module):
    """Three 3 x 3 convolutions (16, 32, 32 channels), 2 x 2 max pooling after the first two, a global max pool
    (is the feature anywhere in the image?) and a linear 15-way head."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                 nn.Linear(32, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def train_judge(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int) -> Judge:
    """Adam on batches of 64 real images in [0, 1]."""
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=order)
        loss = F.cross_entropy(judge(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return judge.eval()


@torch.no_grad()
def accuracies(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Share of images the judge gives the requested class, and the requested colour and kind separately."""
    predicted = judge(images).argmax(-1)
    colour = lambda k: torch.tensor([CLASSES[i][0] == CLASSES[j][0] for i, j in zip(k.tolist(), labels.tolist())])  # noqa: E731
    kind = lambda k: torch.tensor([CLASSES[i][1] == CLASSES[j][1] for i, j in zip(k.tolist(), labels.tolist())])  # noqa: E731
    return {"class": float((predicted == labels).float().mean()), "colour": float(colour(predicted).float().mean()),
            "kind": float(kind(predicted).float().mean())}


# --- training --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def init_identity(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """adaLN-Zero at init: the largest |block(h) - h| over the blocks, and the largest |eps_theta| (both exactly 0)."""
    c = model.condition(t, y)
    h = model.embed(patchify(x, model.patch)) + model.positions
    change = max(float((block(h, c) - h).abs().max()) for block in model.blocks)
    return change, float(model(x, t, y).abs().max())


def train(cfg: Config, sched: Schedule, images: torch.Tensor, labels: torch.Tensor, seeds: list[int], ctx) -> DiT:
    """L_simple on images in [-1, 1] with label dropout; AdamW (no weight decay), warmup + cosine; EMA weights out."""
    init_seed, noise_seed, batch_seed, drop_seed = seeds
    torch.manual_seed(init_seed)
    model = DiT(cfg)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen, batch_gen, drop_gen = (torch.Generator().manual_seed(s) for s in (noise_seed, batch_seed, drop_seed))
    warmup, running = max(1, cfg.steps // 20), []
    for step in ctx.track(range(cfg.steps), "DiT", total=cfg.steps):
        lr = cosine_lr(step, cfg.lr, warmup, cfg.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=batch_gen)
        y = drop_labels(labels[idx], cfg.label_dropout, model.null_class, drop_gen)
        loss = diffusion_loss(lambda xt, t: model(xt, t, y), sched, images[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            ctx.log("history", step=step + 1, loss=float(np.mean(running)), lr=lr)
            running = []
    if cfg.ema_decay > 0:
        ema.copy_to(model)
    return model.eval()


def generate(model: DiT, cfg: Config, sched: Schedule, scale: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """samples_per_class samples of every class with guidance scale s, in [0, 1]; (images, requested labels)."""
    short, timesteps = respaced(sched, cfg.sample_steps)
    y = torch.arange(len(CLASSES)).repeat_interleave(cfg.samples_per_class)
    x, _ = sample(guided_eps_model(model, y, scale, timesteps), short, (len(y), 3, CANVAS, CANVAS), cfg.sigma, gen)
    return ((x.clamp(-1, 1) + 1) / 2), y


# --- plots ---------------------------------------------------------------------------------------------------------------
def plot_grid(images: torch.Tensor, per_row: int, title: str, row_names: list[str]):
    """One row per class: the first `per_row` images of each."""
    rows = len(row_names)
    grid = images.view(rows, -1, 3, CANVAS, CANVAS)[:, :per_row]
    canvas = torch.ones(3, rows * (CANVAS + 1), per_row * (CANVAS + 1))          # a white pixel between images
    for r, c in itertools.product(range(rows), range(per_row)):
        canvas[:, r * (CANVAS + 1):r * (CANVAS + 1) + CANVAS, c * (CANVAS + 1):c * (CANVAS + 1) + CANVAS] = grid[r, c]
    fig, ax = plt.subplots(figsize=(0.45 * per_row + 1.6, 0.45 * rows + 0.6))
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([r * (CANVAS + 1) + CANVAS / 2 for r in range(rows)], row_names, fontsize=7)
    ax.set_xticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_loss(history: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history])
    ax.set(xlabel="step", ylabel="L_simple (mean over log window)", title="DiT training loss", yscale="log")
    fig.tight_layout()
    return fig


# --- the run ---------------------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    seeds = [int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(8)]
    scenes = single_shape_scenes(seeds[0])
    real = render_images([s for s, _ in scenes])
    labels = torch.tensor([label for _, label in scenes])
    judge_train, judge_held = split_positions(scenes)
    judge = train_judge(real[judge_train], labels[judge_train], cfg.classifier_steps, seeds[1])
    judge_real = accuracies(judge, real[judge_held], labels[judge_held])
    ctx.say(f"judge CNN: {judge_real['class']:.3f} of {len(judge_held)} held-out real images labelled right "
            f"({len(judge_train)} trained on; chance {1 / len(CLASSES):.3f})")

    sched = Schedule(betas_for(cfg.schedule, cfg.T))
    torch.manual_seed(seeds[2])
    probe = DiT(cfg)                              # the very initial weights `train` starts from (same seed)
    probe_gen = torch.Generator().manual_seed(seeds[7])
    x_probe = torch.randn((len(CLASSES), 3, CANVAS, CANVAS), generator=probe_gen)
    block_change, init_output = init_identity(probe, x_probe, torch.randint(0, cfg.T, (len(CLASSES),), generator=probe_gen),
                                              torch.arange(len(CLASSES)))
    ctx.say(f"adaLN-Zero at init: max |block(h) - h| = {block_change:g}, max |eps_theta| = {init_output:g}")

    model = train(cfg, sched, real * 2 - 1, labels, seeds[2:6], ctx)
    ctx.say(f"DiT: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.steps} steps, "
            f"final loss {ctx.tables['history'][-1]['loss']:.4f}")

    sample_gen = torch.Generator().manual_seed(seeds[6])
    results = {}
    for name, scale in (("guided", cfg.guidance_scale), ("unguided", 1.0)):
        images, requested = generate(model, cfg, sched, scale, sample_gen)
        acc = accuracies(judge, images, requested)
        present = float(shape_present(images).float().mean())
        results[name] = {"accuracy": acc, "present": present}
        ctx.log("samples", branch=name, scale=scale, class_accuracy=acc["class"], colour_accuracy=acc["colour"],
                kind_accuracy=acc["kind"], shape_present=present)
        ctx.say(f"{name} (s = {scale:g}): judge gives the requested class to {acc['class']:.3f} of "
                f"{len(requested)} samples (colour {acc['colour']:.3f}, kind {acc['kind']:.3f}); a shape in {present:.3f}")
        ctx.save_figure(plot_grid(images, min(cfg.samples_per_class, 12), f"DiT samples, {name} (s = {scale:g})",
                                  [f"{c} {k}" for c, k in CLASSES]), f"samples_{name}.png")
    by_class = torch.cat([real[labels == k][:12] for k in range(len(CLASSES))])
    ctx.save_figure(plot_grid(by_class, 12, "real images", [f"{c} {k}" for c, k in CLASSES]), "real.png")
    ctx.save_figure(plot_loss(ctx.tables["history"]), "loss.png")

    g, u = results["guided"], results["unguided"]
    return {
        "guided_accuracy": g["accuracy"]["class"],
        "guided_colour_accuracy": g["accuracy"]["colour"],
        "guided_kind_accuracy": g["accuracy"]["kind"],
        "unguided_accuracy": u["accuracy"]["class"],
        "unguided_colour_accuracy": u["accuracy"]["colour"],
        "unguided_kind_accuracy": u["accuracy"]["kind"],
        "chance": 1 / len(CLASSES),
        "judge_accuracy": judge_real["class"],
        "guided_shape_present": g["present"],
        "unguided_shape_present": u["present"],
        "real_shape_present": float(shape_present(real).float().mean()),
        "init_block_max_change": block_change,
        "init_max_output": init_output,
        "final_loss": float(ctx.tables["history"][-1]["loss"]),
    }
