"""REINFORCE on CartPole-v1, with and without a learned state-value baseline.

Policy-gradient theorem, Monte-Carlo form (Williams 1992; Sutton & Barto 2nd ed. 13.2-13.4):
    grad J(theta) = E[ sum_t grad log pi(a_t | s_t) * (G_t - b(s_t)) ]
    G_t = sum_{k>=t} gamma^(k-t) r_k                     reward-to-go: rewards before t cannot depend on a_t
    b(s_t) = 0                                           plain REINFORCE (S&B 13.3)
    b(s_t) = V_w(s_t),  min_w E[(G_t - V_w(s_t))^2]      REINFORCE with baseline (S&B 13.4)
The estimator is sampled from complete episodes only: no bootstrapping, so it is unbiased for any b
that does not depend on a_t, and the baseline changes only the variance.

Each update plays `episodes_per_update` complete episodes with the current policy, takes one Adam
step on the surrogate loss  L(theta) = -(1/N) sum_i sum_t log pi(a_t|s_t) * (G_t - b(s_t)),  whose
gradient is minus the estimate above, then fits V to the same episodes' returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from core.config import Range, Seed
from core.rl.rollouts import EpisodeBatch, derived_seed, discounted_returns, first_solved_episode, play_episodes


# Limits of the cross-field rules in Config.problems (memory and run time on a laptop)
LEARNING_EPISODES_MAX = 200_000  # per variant; default 5,000 (~5 min for both variants); the cap is a few hours
BATCH_UNITS_MAX = 262_144  # e.g. 256 episodes x 1024 units: ~1.5 GB of activations at 500-step episodes


@dataclass
class Config:
    updates: Annotated[int, Range(ge=1, le=10_000)] = 100
    """policy updates per learner (each on a fresh batch of complete episodes)"""
    episodes_per_update: Annotated[int, Range(ge=1, le=10_000)] = 10
    """complete episodes per batch (played in parallel by core.rl.play_episodes)"""
    n_seeds: Annotated[int, Range(ge=1, le=100)] = 5
    """independent learners per variant; learner k of both variants shares its init and env seeds"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.99
    """discount factor of the reward-to-go (1 is fine: CartPole-v1 ends every episode within 500 steps)"""
    hidden: Annotated[int, Range(ge=1, le=1024)] = 32
    """hidden units of the policy MLP and of the value MLP (one tanh layer each)"""
    policy_lr: Annotated[float, Range(gt=0, le=1)] = 0.01
    """Adam learning rate of the policy (one step per batch)"""
    value_lr: Annotated[float, Range(gt=0, le=1)] = 0.01
    """Adam learning rate of the value baseline"""
    value_steps: Annotated[int, Range(ge=1, le=1000)] = 10
    """full-batch Adam steps of the value regression per batch (baseline variant only)"""
    normalize: bool = False
    """standardise the weights G_t - b(s_t) over the batch (mean 0, std 1) before the policy step"""
    final_episodes: Annotated[int, Range(ge=1, le=100_000)] = 20
    """final return = mean return of each learner's last this-many training episodes (at most
    updates x episodes_per_update)"""
    solved_return: Annotated[float, Range(gt=0, le=500)] = 475.0
    """CartPole-v1's 'solved' level: trailing mean over final_episodes episodes (an episode pays at most 500)"""
    random_episodes: Annotated[int, Range(ge=1, le=100_000)] = 100
    """episodes of a uniformly random policy, the baseline return (~22)"""
    seed: Seed = 0
    """seed of network inits, env resets and action sampling"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        out = []
        played = self.updates * self.episodes_per_update
        if self.final_episodes > played:
            out.append(f"final_episodes={self.final_episodes} exceeds the {played} training episodes "
                       f"(updates x episodes_per_update)")
        if played * self.n_seeds > LEARNING_EPISODES_MAX:
            out.append(f"updates x episodes_per_update x n_seeds = {played * self.n_seeds} exceeds "
                       f"{LEARNING_EPISODES_MAX} episodes per variant (run time)")
        # the policy and value forward passes hold (up to 500 steps, episodes, hidden) activations
        if self.episodes_per_update * self.hidden > BATCH_UNITS_MAX:
            out.append(f"episodes_per_update x hidden = {self.episodes_per_update * self.hidden} exceeds "
                       f"{BATCH_UNITS_MAX} (memory)")
        return out


VARIANTS = ("plain", "baseline")  # b(s) = 0, b(s) = V_w(s)
OBS_DIM, N_ACTIONS = 4, 2


def mlp(n_out: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


# --- the estimator -----------------------------------------------------------------------------------
def reward_to_go(batch: EpisodeBatch, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each episode, 0 on padding (T, N). A time-limit truncation
    is cut off like a termination: Monte-Carlo returns have nothing to bootstrap with."""
    return discounted_returns(batch.rewards, batch.dones, gamma)


def policy_weights(returns: torch.Tensor, baseline: torch.Tensor, valid: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The weight of each grad log pi(a_t|s_t): G_t - b(s_t), optionally standardised over the valid
    steps of the batch, and 0 on padding. A constant: no gradient flows through it."""
    weights = (returns - baseline).detach()
    if normalize:  # centring = an extra constant baseline, scaling = a per-batch step size
        weights = (weights - weights[valid].mean()) / (weights[valid].std() + 1e-8)
    return weights * valid


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, weights: torch.Tensor, n_episodes: int) -> torch.Tensor:
    """L = -(1/N) sum_{i,t} log pi(a_t|s_t) * w_t, so -grad L = the REINFORCE estimate averaged over
    the N episodes of the batch. logits (T, N, A), actions (T, N), weights (T, N) with 0 on padding."""
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return -(log_probs * weights).sum() / n_episodes


def explained_variance(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G): 1 is a perfect baseline, 0 is no better than a constant (b = 0 scores
    exactly 0), < 0 is worse."""
    return float(1 - (targets - predicted).var() / targets.var())


def fit_baseline(value: nn.Module, opt: torch.optim.Optimizer, batch: EpisodeBatch, returns: torch.Tensor,
                 steps: int) -> float:
    """min_w mean over valid steps of (V_w(s_t) - G_t)^2: V tracks the current policy's returns."""
    obs, targets = batch.obs[batch.valid], returns[batch.valid]
    for _ in range(steps):
        loss = ((value(obs).squeeze(-1) - targets) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


# --- training ----------------------------------------------------------------------------------------
def train(variant: str, learner: int, cfg: Config, ctx) -> tuple[np.ndarray, np.ndarray]:
    """Train one learner; returns the returns and the lengths of all its training episodes in the
    order played."""
    torch.manual_seed(derived_seed(cfg.seed, learner))  # the same init for both variants of a learner
    policy, value = mlp(N_ACTIONS, cfg.hidden), mlp(1, cfg.hidden)
    policy_opt = torch.optim.Adam(policy.parameters(), lr=cfg.policy_lr)
    value_opt = torch.optim.Adam(value.parameters(), lr=cfg.value_lr)
    episode_returns, episode_lengths = [], []
    for update in range(cfg.updates):
        # common random numbers: both variants of a learner see the same env starts and uniforms
        batch = play_episodes(policy, cfg.episodes_per_update, derived_seed(cfg.seed, learner, update))
        returns = reward_to_go(batch, cfg.gamma)
        baseline = value(batch.obs).squeeze(-1) if variant == "baseline" else torch.zeros_like(returns)
        # measured before V is fitted to this batch: how well it predicts returns it has not seen
        explained = explained_variance(baseline.detach()[batch.valid], returns[batch.valid])
        weights = policy_weights(returns, baseline, batch.valid, cfg.normalize)
        loss = reinforce_loss(policy(batch.obs), batch.actions, weights, cfg.episodes_per_update)
        policy_opt.zero_grad()
        loss.backward()
        policy_opt.step()
        value_loss = fit_baseline(value, value_opt, batch, returns, cfg.value_steps) if variant == "baseline" else 0.0

        episode_returns.extend(batch.episode_returns.tolist())
        episode_lengths.extend(batch.valid.sum(0).tolist())
        ctx.log("learning_curve", variant=variant, learner=learner, update=update + 1,
                episodes=len(episode_returns), env_steps=sum(episode_lengths),
                mean_return=float(batch.episode_returns.mean()), value_loss=value_loss,
                explained_variance=explained)
    return np.array(episode_returns), np.array(episode_lengths)


def time_to_solve(returns: np.ndarray, lengths: np.ndarray, cfg: Config) -> tuple[float, float]:
    """(episodes, env steps) played until the trailing mean over `final_episodes` episodes (a full
    window) first reaches `solved_return`; (nan, nan) if it never does."""
    solved_after = first_solved_episode(returns, cfg.solved_return, cfg.final_episodes)
    if solved_after is None:
        return float("nan"), float("nan")
    return float(solved_after), float(lengths[:solved_after].sum())


# --- plot --------------------------------------------------------------------------------------------
COLORS = {"plain": "tab:gray", "baseline": "tab:blue"}
LABELS = {"plain": "REINFORCE (b = 0)", "baseline": "REINFORCE with baseline (b = V(s))"}


def plot_learning_curves(curves: dict[str, np.ndarray], random_return: float, cfg: Config):
    """curves: variant -> (n_seeds, updates) batch mean returns."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    episodes = np.arange(1, cfg.updates + 1) * cfg.episodes_per_update
    for variant, curve in curves.items():
        mean, std = curve.mean(0), curve.std(0)
        ax.plot(episodes, mean, color=COLORS[variant], label=LABELS[variant])
        ax.fill_between(episodes, mean - std, np.minimum(mean + std, 500), color=COLORS[variant], alpha=0.2)
        for seed_curve in curve:
            ax.plot(episodes, seed_curve, color=COLORS[variant], lw=0.5, alpha=0.35)
    ax.axhline(random_return, color="black", ls=":", label=f"random policy ({random_return:.0f})")
    ax.axhline(cfg.solved_return, color="tab:green", ls="--", lw=0.8, label=f"solved ({cfg.solved_return:g})")
    ax.set(xlabel="training episodes", ylabel="batch mean episode return",
           title=f"REINFORCE on CartPole-v1: mean ± 1 std over {cfg.n_seeds} seeds (thin: each seed)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def fmt(values: np.ndarray, spec: str) -> str:
    return ", ".join(format(v, spec) for v in values)


def mean_if_any(values: np.ndarray) -> float:
    """Mean of the finite entries (the seeds that solved); nan when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def run(cfg: Config, ctx) -> dict[str, float]:
    random_return = float(play_episodes(None, cfg.random_episodes, derived_seed(cfg.seed, 10**6)).episode_returns.mean())
    episodes = {variant: [train(variant, k, cfg, ctx) for k in ctx.track(range(cfg.n_seeds), f"REINFORCE {variant}")]
                for variant in VARIANTS}
    curves = {variant: np.array([r["mean_return"] for r in ctx.tables["learning_curve"] if r["variant"] == variant])
              .reshape(cfg.n_seeds, cfg.updates) for variant in VARIANTS}
    ctx.save_figure(plot_learning_curves(curves, random_return, cfg), "learning_curves.png")

    metrics = {"random_return": random_return}
    for variant, per_seed in episodes.items():
        final = np.array([returns[-cfg.final_episodes:].mean() for returns, _ in per_seed])
        solve_episodes, solve_steps = np.array([time_to_solve(returns, lengths, cfg) for returns, lengths in per_seed]).T
        mean_return = float(np.mean([returns.mean() for returns, _ in per_seed]))  # area under the learning curve
        metrics |= {
            f"{variant}_final_return": float(final.mean()),
            f"{variant}_worst_final_return": float(final.min()),
            f"{variant}_final_over_random": float(final.mean() / random_return),
            f"{variant}_mean_return": mean_return,
            f"{variant}_mean_over_random": mean_return / random_return,
            f"{variant}_seeds_solved": float(np.isfinite(solve_episodes).mean()),
            f"{variant}_episodes_to_solve": mean_if_any(solve_episodes),
            f"{variant}_steps_to_solve": mean_if_any(solve_steps),
        }
        ctx.say(f"{variant}: last-{cfg.final_episodes} mean per seed {fmt(final, '.1f')}; "
                f"episodes to {cfg.solved_return:g}: {fmt(solve_episodes, 'g')}")
    # the second half of training: V starts untrained (explained variance ~0) and needs a few batches
    late = [r["explained_variance"] for r in ctx.tables["learning_curve"]
            if r["variant"] == "baseline" and r["update"] > cfg.updates // 2]
    metrics["baseline_explained_variance"] = float(np.mean(late))
    ctx.say(f"random policy: {random_return:.1f}")
    return metrics
