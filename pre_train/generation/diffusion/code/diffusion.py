"""Denoising diffusion probabilistic models (DDPM) on 2-D toy distributions, in one file.

The DDPM itself (Ho, Jain & Abbeel 2020) is shared with the DiT module and lives in core/nn/ddpm.py,
its equations on top: the beta schedules (`betas_for`), every per-step coefficient (`Schedule`:
q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), sigma_t), the sinusoidal time embedding, L_simple
(`diffusion_loss`), the ancestral sampler (`p_sample_step`, `sample`) and the EMA. This file holds
what is particular to 2-D points: the data, the closed-form manifold, the eps_theta MLP, the forward
process checked against the iterated chain, and the run.

The data: two moons (two half circles of radius 1, the lower one shifted by (1, -0.5), centred) and
8 Gaussians (centres on a circle of radius RADIUS_8G), each point jittered by N(0, DATA_NOISE^2 I).
The manifold is the noise-free set: the two arcs, or the 8 centres. The metric is the share of
generated samples within 0.1 of it, the distance computed in closed form (`manifold_distance`);
pure noise N(0, I), the sampler's starting point, is the baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from core.config import Range, Seed
from core.nn.ddpm import EMA, Schedule, betas_for, diffusion_loss, sample, time_embedding

DATASETS = ("moons", "gaussians")
DATA_NOISE = 0.03
"""std of the jitter around the manifold: 3.3 std inside the 0.1 band (a true sample is within it
with probability 0.999 for the moons, 0.996 for the 8 Gaussians)"""
RADIUS_8G = 1.5
"""radius of the circle the 8 Gaussian centres sit on (the moons span about 3 x 1.5 after centring)"""
MOONS_SHIFT = (-0.5, -0.25)
"""added to the sklearn-style moons so their bounding box is centred on 0"""
NEAR = 0.1
"""a sample is on the manifold when its distance to it is below this"""


@dataclass
class Config:
    steps: Annotated[int, Range(ge=1, le=200_000)] = 8000
    """Adam steps of training per dataset"""
    batch_size: Annotated[int, Range(ge=1, le=65_536)] = 512
    """training points per step, each with its own t ~ U{1..T} and eps ~ N(0, I)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak Adam learning rate (linear warmup over the first 2% of the steps, cosine decay to 0)"""
    hidden: Annotated[int, Range(ge=8, le=1024)] = 128
    """width of the eps_theta MLP's hidden layers"""
    layers: Annotated[int, Range(ge=1, le=8)] = 3
    """hidden layers of the eps_theta MLP (each: Linear + SiLU, the time embedding added before it)"""
    time_dim: Annotated[int, Range(ge=2, le=512)] = 32
    """size of the sinusoidal time embedding of t (half sines, half cosines)"""
    ema_decay: Annotated[float, Range(ge=0, lt=1)] = 0.995
    """decay of the exponential moving average of the weights that samples (0: sample with the raw weights)"""
    T: Annotated[int, Range(ge=2, le=4000)] = 1000
    """diffusion steps"""
    schedule: Literal["linear", "cosine"] = "linear"
    """beta schedule: linear (Ho et al., beta_1 = beta_start, beta_T = beta_end) or cosine (Nichol & Dhariwal)"""
    beta_start: Annotated[float, Range(gt=0, lt=1)] = 1e-4
    """beta_1 of the linear schedule (Ho et al.'s value for T = 1000)"""
    beta_end: Annotated[float, Range(gt=0, lt=1)] = 0.02
    """beta_T of the linear schedule (Ho et al.'s value for T = 1000)"""
    sigma: Literal["beta", "beta_tilde"] = "beta_tilde"
    """sampling std sigma_t: sqrt(beta_t) (Ho et al.'s upper bound) or sqrt(beta~_t) (the true posterior's; tighter
    samples when the data sit close to a manifold, as here)"""
    n_train: Annotated[int, Range(ge=8, le=1_000_000)] = 20_000
    """training points drawn once per dataset"""
    n_samples: Annotated[int, Range(ge=8, le=200_000)] = 4000
    """samples generated per dataset (and reference points / noise points for the metrics)"""
    n_forward: Annotated[int, Range(ge=100, le=1_000_000)] = 50_000
    """chains per side in the closed-form vs iterated forward-process comparison"""
    log_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """log the mean training loss every this many steps"""
    seed: Seed = 0
    """seeds the data, the networks, the training noise and the sampler (each from its own stream)"""

    def problems(self) -> list[str]:
        if self.schedule == "linear" and self.beta_end < self.beta_start:
            return [f"beta_end={self.beta_end:g} is below beta_start={self.beta_start:g}: the noise would shrink"]
        return []


# --- eps_theta: an MLP with a sinusoidal time embedding ---------------------------------------------
class EpsMLP(nn.Module):
    """eps_theta(x_t, t): h = W_in x_t, then per hidden layer l: h <- SiLU(W_l (h + P_l e)), e = SiLU(W_t emb(t));
    out = W_out h. The time embedding enters every layer: the noise level decides how far to denoise."""

    def __init__(self, hidden: int = 128, layers: int = 3, time_dim: int = 32, dim: int = 2):
        super().__init__()
        self.time_dim = time_dim
        self.inp = nn.Linear(dim, hidden)
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU())
        self.time_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time(time_embedding(t, self.time_dim))
        h = self.inp(x)
        for proj, layer in zip(self.time_proj, self.hidden):
            h = nn.functional.silu(layer(h + proj(emb)))
        return self.out(h)


# --- training ----------------------------------------------------------------------------------------
def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over 2% of the steps, then cosine decay to 0."""
    warm = max(1, cfg.steps // 50)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def train(cfg: Config, sched: Schedule, data: torch.Tensor, seed: int, ctx, name: str) -> nn.Module:
    init_seed, noise_seed, batch_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    torch.manual_seed(init_seed)
    model = EpsMLP(cfg.hidden, cfg.layers, cfg.time_dim)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen, batch_gen = torch.Generator().manual_seed(noise_seed), torch.Generator().manual_seed(batch_seed)
    running = []
    for step in ctx.track(range(cfg.steps), f"DDPM {name}", total=cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x0 = data[torch.randint(0, len(data), (cfg.batch_size,), generator=batch_gen)]
        loss = diffusion_loss(model, sched, x0, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            ctx.log("history", dataset=name, step=step + 1, loss=float(np.mean(running)), lr=lr_at(step, cfg))
            running = []
    if cfg.ema_decay > 0:
        ema.copy_to(model)
    return model.eval()


# --- data and the manifold ------------------------------------------------------------------------------
def gaussian_centres() -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float32) * (math.pi / 4)
    return RADIUS_8G * torch.stack([angles.cos(), angles.sin()], -1)


def make_data(name: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """n points of `name`: a point of the manifold, uniformly chosen, plus N(0, DATA_NOISE^2 I)."""
    if name == "moons":
        theta = torch.rand(n, generator=gen) * math.pi
        upper = torch.rand(n, generator=gen) < 0.5
        x = torch.where(upper, theta.cos(), 1 - theta.cos())                  # sklearn's make_moons, in closed form
        y = torch.where(upper, theta.sin(), 0.5 - theta.sin())
        points = torch.stack([x, y], -1) + torch.tensor(MOONS_SHIFT)
    elif name == "gaussians":
        points = gaussian_centres()[torch.randint(0, 8, (n,), generator=gen)]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return points + DATA_NOISE * torch.randn((n, 2), generator=gen)


def arc_distance(p: torch.Tensor, centre: tuple[float, float], lo: float, hi: float) -> torch.Tensor:
    """Distance from each point to the unit-radius arc around `centre` with angles in [lo, hi]: | |p - c| - 1 |
    where the point's angle falls in the arc, else the distance to the nearer end point."""
    v = p - torch.tensor(centre)
    angle = torch.atan2(v[:, 1], v[:, 0])
    radial = (v.norm(dim=-1) - 1).abs()
    ends = torch.tensor([[math.cos(lo), math.sin(lo)], [math.cos(hi), math.sin(hi)]])
    to_ends = torch.cdist(v, ends).min(-1).values
    return torch.where((angle >= lo) & (angle <= hi), radial, to_ends)


def manifold_distance(name: str, p: torch.Tensor) -> torch.Tensor:
    """Closed-form distance of each point to the noise-free data set."""
    p = p.float()
    if name == "moons":
        sx, sy = MOONS_SHIFT
        upper = arc_distance(p, (0.0 + sx, 0.0 + sy), 0.0, math.pi)           # (cos th, sin th)
        lower = arc_distance(p, (1.0 + sx, 0.5 + sy), -math.pi, 0.0)          # (1 - cos th, 0.5 - sin th)
        return torch.minimum(upper, lower)
    return torch.cdist(p, gaussian_centres()).min(-1).values


def share_near(name: str, p: torch.Tensor) -> float:
    """Share of the points within NEAR of the manifold (nan-safe: a diverged sample counts as off it)."""
    d = manifold_distance(name, p)
    return float((d < NEAR).float().mean())


def coverage(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of reference (true) points with a generated sample within NEAR: the recall to the share's precision."""
    generated = torch.nan_to_num(generated, nan=1e6, posinf=1e6, neginf=-1e6)
    return float((torch.cdist(reference, generated).min(-1).values < NEAR).float().mean())


BALANCE_BINS = 6
"""bins per moon arc of the arc parameter theta (uniform on [0, pi] in the data, so every bin holds 1/12)"""


def component_bins(name: str, p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Each point's part of the manifold, parts of equal probability under the data: for the moons, which
    arc is nearer and which of BALANCE_BINS equal slices of theta on it; for the 8 Gaussians, the nearest centre."""
    p = torch.nan_to_num(p.float(), nan=0.0)
    if name == "gaussians":
        return torch.cdist(p, gaussian_centres()).argmin(-1), 8
    sx, sy = MOONS_SHIFT
    upper_v, lower_v = p - torch.tensor([sx, sy]), p - torch.tensor([1.0 + sx, 0.5 + sy])
    on_upper = arc_distance(p, (sx, sy), 0.0, math.pi) <= arc_distance(p, (1.0 + sx, 0.5 + sy), -math.pi, 0.0)
    theta = torch.where(on_upper, torch.atan2(upper_v[:, 1], upper_v[:, 0]),
                        -torch.atan2(lower_v[:, 1], lower_v[:, 0])).clamp(0, math.pi)  # both arcs: theta in [0, pi]
    slice_ = (theta / math.pi * BALANCE_BINS).long().clamp(max=BALANCE_BINS - 1)
    return slice_ + BALANCE_BINS * (~on_upper).long(), 2 * BALANCE_BINS


def balance_tv(name: str, p: torch.Tensor) -> float:
    """Total variation between the share of samples in each equal-probability part of the manifold and the
    data's (uniform) share: 0 when the mass is spread as in the data, whatever the precision and coverage."""
    bins, k = component_bins(name, p)
    freq = torch.bincount(bins, minlength=k).double() / len(p)
    return float(0.5 * (freq - 1.0 / k).abs().sum())


# --- the forward process: closed form against the iterated chain -------------------------------------------
FORWARD_X0 = (1.0, -0.5)
FORWARD_T = (1, 2, 10, 100, 250, 500, 750, 1000)
"""steps t (1-based; those <= T) at which q(x_t | x_0) is compared with the iterated chain"""


def forward_comparison(sched: Schedule, n: int, gen: torch.Generator) -> list[dict]:
    """From x_0 = FORWARD_X0: n chains iterated x_{t-1} -> x_t with fresh noise (eq. 2), and n independent
    closed-form draws q_sample(x_0, t) (eq. 4); per compared t, the mean and std per coordinate of both
    and the largest absolute difference."""
    x0 = torch.tensor(FORWARD_X0, dtype=torch.float64).expand(n, 2)
    keep = {t for t in FORWARD_T if t <= sched.T} | {sched.T}
    x, rows = x0.clone(), []
    for i in range(sched.T):
        x = sched.forward_step(x, i, torch.randn((n, 2), generator=gen, dtype=torch.float64))
        t = i + 1
        if t in keep:
            closed = sched.q_sample(x0, torch.full((n,), i), torch.randn((n, 2), generator=gen, dtype=torch.float64))
            dev = torch.cat([(x.mean(0) - closed.mean(0)).abs(), (x.std(0) - closed.std(0)).abs()])
            rows.append({"t": t, "alpha_bar": float(sched.alpha_bar[i]),
                         "iter_mean_x": float(x[:, 0].mean()), "closed_mean_x": float(closed[:, 0].mean()),
                         "iter_std_x": float(x[:, 0].std()), "closed_std_x": float(closed[:, 0].std()),
                         "expected_mean_x": math.sqrt(float(sched.alpha_bar[i])) * FORWARD_X0[0],
                         "expected_std": math.sqrt(1 - float(sched.alpha_bar[i])),
                         "max_dev": float(dev.max())})
    return rows


# --- plots -------------------------------------------------------------------------------------------------
def draw_manifold(ax, name: str) -> None:
    if name == "moons":
        th = np.linspace(0, np.pi, 200)
        sx, sy = MOONS_SHIFT
        ax.plot(np.cos(th) + sx, np.sin(th) + sy, color="tab:red", lw=0.8)
        ax.plot(1 - np.cos(th) + sx, 0.5 - np.sin(th) + sy, color="tab:red", lw=0.8)
    else:
        c = gaussian_centres().numpy()
        ax.plot(c[:, 0], c[:, 1], "+", color="tab:red", ms=8)


def plot_snapshots(snaps: dict[str, dict[int, torch.Tensor]], title: str, shares: dict[str, dict[int, float]]):
    names = list(snaps)
    steps = sorted(snaps[names[0]], reverse=True)
    fig, axes = plt.subplots(len(names), len(steps), figsize=(2.3 * len(steps), 2.4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, t in enumerate(steps):
            ax = axes[row, col]
            pts = snaps[name][t].float().numpy()[:2000]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="tab:blue")
            draw_manifold(ax, name)
            ax.set(xlim=(-2.6, 2.6), ylim=(-2.6, 2.6), xticks=[], yticks=[], aspect="equal")
            ax.set_title(f"{name}  t={t}\nnear: {shares[name][t]:.2f}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_schedules(T: int, cfg: Config):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for kind in ("linear", "cosine"):
        s = Schedule(betas_for(kind, T, cfg.beta_start, cfg.beta_end))
        t = np.arange(1, T + 1)
        axes[0].plot(t, s.alpha_bar.numpy(), label=kind)
        axes[1].semilogy(t, (s.alpha_bar / (1 - s.alpha_bar)).numpy(), label=kind)
    axes[0].set(xlabel="t", ylabel="abar_t", title="signal kept: abar_t")
    axes[1].set(xlabel="t", ylabel="SNR = abar / (1 - abar)", title="signal-to-noise ratio")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_loss(history: list[dict]):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name in DATASETS:
        rows = [r for r in history if r["dataset"] == name]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set(xlabel="step", ylabel="L_simple (mean over log window)", title="training loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    return fig


# --- the run -----------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    sched = Schedule(betas_for(cfg.schedule, cfg.T, cfg.beta_start, cfg.beta_end))
    seeds = [int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(6)]
    data_gen = torch.Generator().manual_seed(seeds[0])
    noise_gen = torch.Generator().manual_seed(seeds[1])
    sample_gen = torch.Generator().manual_seed(seeds[2])

    fwd = forward_comparison(sched, cfg.n_forward, torch.Generator().manual_seed(seeds[3]))
    for row in fwd:
        ctx.log("forward", **row)
    forward_max_dev = max(r["max_dev"] for r in fwd)
    ctx.say(f"forward process: closed-form q(x_t|x_0) vs {cfg.T} iterated steps, {cfg.n_forward} chains: "
            f"max |diff| of mean/std {forward_max_dev:.4f}")

    keep = tuple(sorted({cfg.T, int(cfg.T * 0.6), int(cfg.T * 0.3), int(cfg.T * 0.1), int(cfg.T * 0.03), 0}, reverse=True))
    results, reverse_snaps, forward_snaps, reverse_near, forward_near = {}, {}, {}, {}, {}
    for k, name in enumerate(DATASETS):
        data = make_data(name, cfg.n_train, data_gen)
        reference = make_data(name, cfg.n_samples, data_gen)
        noise = torch.randn((cfg.n_samples, 2), generator=noise_gen)
        model = train(cfg, sched, data, seeds[4] + k, ctx, name)
        samples, snaps = sample(model, sched, (cfg.n_samples, 2), cfg.sigma, sample_gen, keep)
        reverse_snaps[name] = snaps
        reverse_near[name] = {t: share_near(name, x) for t, x in snaps.items()}
        forward_snaps[name] = {t: reference if t == 0 else
                               sched.q_sample(reference, torch.full((len(reference),), t - 1), torch.randn(reference.shape, generator=noise_gen))
                               for t in keep}
        forward_near[name] = {t: share_near(name, x) for t, x in forward_snaps[name].items()}
        row = {"dataset": name, "share": share_near(name, samples), "noise_share": share_near(name, noise),
               "data_share": share_near(name, reference), "coverage": coverage(samples, reference),
               "balance_tv": balance_tv(name, samples), "data_balance_tv": balance_tv(name, reference),
               "sample_std": float(torch.nan_to_num(samples, nan=1e6).std(0).mean()),
               "data_std": float(reference.std(0).mean()),
               "final_loss": float(ctx.tables["history"][-1]["loss"])}
        row["std_ratio"] = row["sample_std"] / row["data_std"]
        results[name] = row
        ctx.log("datasets", **row)
        ctx.say(f"{name}: {row['share']:.3f} of {cfg.n_samples} samples within {NEAR} of the manifold "
                f"(true data {row['data_share']:.3f}, N(0, I) noise {row['noise_share']:.3f}); "
                f"coverage {row['coverage']:.3f}, balance TV {row['balance_tv']:.3f} (true data {row['data_balance_tv']:.3f}), "
                f"std ratio {row['std_ratio']:.3f}")

    ctx.save_figure(plot_snapshots(reverse_snaps, f"reverse process: x_T ~ N(0, I) -> x_0 ({cfg.schedule}, T={cfg.T})",
                                   reverse_near), "reverse_process.png")
    ctx.save_figure(plot_snapshots(forward_snaps, f"forward process: x_0 -> q(x_t | x_0) ({cfg.schedule}, T={cfg.T})",
                                   forward_near), "forward_process.png")
    ctx.save_figure(plot_schedules(cfg.T, cfg), "schedules.png")
    ctx.save_figure(plot_loss(ctx.tables["history"]), "loss.png")

    r = [results[n] for n in DATASETS]
    return {
        "share": min(x["share"] for x in r),
        "share_moons": results["moons"]["share"],
        "share_gaussians": results["gaussians"]["share"],
        "noise_share": max(x["noise_share"] for x in r),
        "data_share": min(x["data_share"] for x in r),
        "coverage": min(x["coverage"] for x in r),
        "balance_tv": max(x["balance_tv"] for x in r),
        "data_balance_tv": max(x["data_balance_tv"] for x in r),
        "std_ratio_min": min(x["std_ratio"] for x in r),
        "std_ratio_max": max(x["std_ratio"] for x in r),
        "forward_max_dev": forward_max_dev,
        "alpha_bar_T": float(sched.alpha_bar[-1]),
        "final_loss_moons": results["moons"]["final_loss"],
        "final_loss_gaussians": results["gaussians"]["final_loss"],
    }
