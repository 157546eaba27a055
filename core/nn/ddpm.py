"""The DDPM pieces every diffusion module shares: the beta schedules, the per-step coefficients of the
forward process, the posterior and the sampler, the sinusoidal time embedding, the L_simple loss, the
ancestral sampler and the EMA of the weights that samples. The data and the network are the modules'
own (pre_train/generation/diffusion: 2-D points and an MLP; dit: images and a Transformer).

Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (indices t = 1..T):
    forward step   q(x_t | x_{t-1}) = N( sqrt(1 - beta_t) x_{t-1}, beta_t I )                  (eq. 2)
    closed form    q(x_t | x_0)     = N( sqrt(abar_t) x_0, (1 - abar_t) I ),
                   alpha_t = 1 - beta_t,  abar_t = prod_{s<=t} alpha_s                          (eq. 4)
    posterior      q(x_{t-1} | x_t, x_0) = N( mu~_t, beta~_t I ),
                   mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0
                           + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
                   beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t                              (eqs. 6-7)
    eps-prediction mu_theta(x_t, t) = 1/sqrt(alpha_t) ( x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t) )  (eq. 11)
    loss           L_simple = E_{t, x_0, eps} || eps - eps_theta( sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t ) ||^2  (eq. 14)
    sampling       x_T ~ N(0, I);  x_{t-1} = mu_theta(x_t, t) + sigma_t z,  z ~ N(0, I) for t > 1, else 0,
                   sigma_t^2 = beta_t (or beta~_t)                                              (Algorithm 2)
Schedules: linear beta_t from 1e-4 to 0.02 over T = 1000 (Ho et al.); cosine (Nichol & Dhariwal 2021,
eq. 17): abar_t = f(t) / f(0), f(t) = cos^2( (t/T + s) / (1 + s) * pi/2 ), s = 0.008,
beta_t = min(1 - abar_t / abar_{t-1}, 0.999).

The arrays are 0-based: index i holds step t = i + 1 (betas[i] = beta_{i+1}); abar_0 = 1 is
`alpha_bar_prev[0]`. An eps model is any callable eps_model(x_t, t) -> eps of x_t's shape, t holding
0-based indices (one per row, or one for the whole batch); a conditional network is wrapped in one.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- the noise schedule ------------------------------------------------------------------------------
def betas_for(schedule: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02, s: float = 0.008) -> torch.Tensor:
    """beta_1..beta_T (float64), index i = step t = i + 1."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)              # Ho et al. 2020, sec. 4
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2                                 # f(t), t = 0..T
    abar = f / f[0]                                                                      # Nichol & Dhariwal eq. 17
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)                                   # beta_t = 1 - abar_t / abar_{t-1}


class Schedule:
    """Every per-step coefficient of the forward process, the posterior and the sampler (float64 buffers)."""

    def __init__(self, betas: torch.Tensor):
        self.T = len(betas)
        self.betas = betas                                                               # beta_t
        self.alphas = 1 - betas                                                          # alpha_t = 1 - beta_t
        self.alpha_bar = torch.cumprod(self.alphas, 0)                                   # abar_t = prod_{s<=t} alpha_s (eq. 4)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=betas.dtype), self.alpha_bar[:-1]])  # abar_{t-1}, abar_0 = 1
        self.beta_tilde = (1 - self.alpha_bar_prev) / (1 - self.alpha_bar) * betas      # eq. 7

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: one draw from q(x_t | x_0) (eq. 4); t holds 0-based
        indices, one per row of x0 (a point or an image: the coefficient broadcasts over the rest)."""
        ab = self.alpha_bar[t].to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def forward_step(self, x_prev: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps: one step of the forward chain (eq. 2)."""
        beta = float(self.betas[i])
        return math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * noise

    def posterior_mean(self, x0: torch.Tensor, xt: torch.Tensor, i: int) -> torch.Tensor:
        """mu~_t(x_t, x_0) of q(x_{t-1} | x_t, x_0) (eq. 7): the sampler's target, written independently of it."""
        ab, ab_prev, beta = float(self.alpha_bar[i]), float(self.alpha_bar_prev[i]), float(self.betas[i])
        return (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * xt

    def sigma(self, i: int, kind: str) -> float:
        """sigma_t of the reverse step: sqrt(beta_t) or sqrt(beta~_t) (Ho et al. sec. 3.2)."""
        return math.sqrt(float(self.betas[i] if kind == "beta" else self.beta_tilde[i]))


# --- the time input --------------------------------------------------------------------------------------
def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of the step t = i + 1: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = (t.float() + 1).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


# --- training and sampling ----------------------------------------------------------------------------
def diffusion_loss(eps_model: EpsModel, sched: Schedule, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """L_simple (eq. 14): t ~ U{1..T}, eps ~ N(0, I), regress eps from x_t."""
    t = torch.randint(0, sched.T, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    xt = sched.q_sample(x0, t, noise)
    return ((eps_model(xt, t) - noise) ** 2).mean()


@torch.no_grad()
def p_sample_step(eps_model: EpsModel, sched: Schedule, xt: torch.Tensor, i: int, sigma: str,
                  gen: torch.Generator) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4); i = t - 1."""
    eps = eps_model(xt, torch.tensor([i]))    # one t for the whole batch: its embedding is computed once and broadcast
    alpha, ab, beta = 1 - float(sched.betas[i]), float(sched.alpha_bar[i]), float(sched.betas[i])
    mean = (xt - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)                     # mu_theta (eq. 11)
    noise = torch.randn(xt.shape, generator=gen) if i > 0 else torch.zeros_like(xt)     # z = 0 at t = 1
    return mean + sched.sigma(i, sigma) * noise                                          # + sigma_t z


@torch.no_grad()
def sample(eps_model: EpsModel, sched: Schedule, shape: tuple[int, ...], sigma: str, gen: torch.Generator,
           keep: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """x_T ~ N(0, I) of `shape`, then T ancestral steps to x_0; also returns x_t at the steps t in `keep`."""
    x = torch.randn(shape, generator=gen)
    snapshots = {sched.T: x.clone()} if sched.T in keep else {}
    for i in reversed(range(sched.T)):
        x = p_sample_step(eps_model, sched, x, i, sigma, gen)
        if i in keep:                     # x now holds x_i = x_{t-1}
            snapshots[i] = x.clone()
    return x, snapshots


class EMA:
    """theta_ema <- d theta_ema + (1 - d) theta after every step; samples come from theta_ema."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            s.lerp_(p.detach(), 1 - self.decay)

    def copy_to(self, model: nn.Module) -> None:
        with torch.no_grad():
            for s, p in zip(self.shadow, model.parameters()):
                p.copy_(s)
