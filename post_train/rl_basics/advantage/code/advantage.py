"""Advantage estimators for the policy gradient, compared on CartPole-v1: learning curves and the
variance / bias of the gradient each one produces.

Policy-gradient theorem (Sutton & Barto 2nd ed. 13.2-13.3; Williams 1992), for one episode:
    g = sum_t grad log pi(a_t | s_t) * A_hat_t            E[g] = grad J  when A_hat is unbiased
Five choices of A_hat_t (Schulman et al. 2016, "GAE", section 3), gamma = discount:
    mc        G_t = sum_{k>=0} gamma^k r_{t+k}                         reward-to-go (REINFORCE)
    baseline  G_t - V(s_t)                                             S&B 13.4: any b(s) keeps E[g]
    td0       delta_t = r_t + gamma V(s_{t+1}) - V(s_t)                one-step actor-critic (S&B 13.5)
    nstep     sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n}) - V(s_t) = sum_{k<n} gamma^k delta_{t+k}
    gae       sum_{l>=0} (gamma lambda)^l delta_{t+l}                  lambda=0: td0, lambda=1: baseline
All sums stop at the end of the episode. mc and baseline use only sampled rewards, so their gradients
are unbiased for any V; td0 / nstep / gae bootstrap on V and are biased wherever V is wrong, in
exchange for lower variance.

Two experiments:
  1. Learning curves: one small MLP policy per (estimator, seed), vanilla policy gradient on batches
     of complete episodes (one Adam step per batch), a separate value MLP regressed on each
     estimator's own target A_hat + V.
  2. Gradient variance on a FIXED policy and a fixed V fitted to its returns on separate rollouts:
     per-episode gradients g_i of every estimator on the SAME episodes, their total variance
     tr Cov(g) relative to mc, and the paired difference g_est - g_mc projected on a fixed direction
     (its z-score tests E[g_est] = E[g_mc]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from core.config import Range, Seed
from core.rl.rollouts import EpisodeBatch, derived_seed, discounted_returns, gae, play_episodes


# Limits of the cross-field rules in Config.problems (memory and run time on a laptop)
MAX_EPISODE_STEPS = 500  # CartPole-v1's time limit
LEARNING_EPISODES_MAX = 100_000  # default 4,800 (~9 min for all five estimators); the cap is a few hours
BATCH_UNITS_MAX = 262_144  # e.g. 256 episodes x 1024 units: ~1.5 GB of activations at 500-step episodes
GRADIENT_SAMPLES_MAX = 1_000_000  # default 452,000: ~0.6 GB at the fixed policy's ~50-step episodes


@dataclass
class Config:
    updates: Annotated[int, Range(ge=1, le=10_000)] = 100
    """policy updates per learner in the learning-curve experiment"""
    episodes_per_update: Annotated[int, Range(ge=1, le=10_000)] = 16
    """complete episodes per batch (one vectorised CartPole env per episode)"""
    n_seeds: Annotated[int, Range(ge=1, le=100)] = 3
    """independent learners per estimator (learner k's init and episodes derive from (seed, k))"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.99
    """discount factor (1 is fine: CartPole-v1 ends every episode within 500 steps)"""
    gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95
    """lambda of the GAE estimator"""
    n_step: Annotated[int, Range(ge=1, le=MAX_EPISODE_STEPS)] = 10
    """horizon n of the n-step estimator (an episode lasts at most 500 steps: a longer n is G - V)"""
    hidden: Annotated[int, Range(ge=1, le=1024)] = 32
    """hidden units of the policy and of the value MLP (one tanh layer each)"""
    policy_lr: Annotated[float, Range(gt=0, le=1)] = 0.01
    """Adam learning rate of the policy (one step per batch)"""
    value_lr: Annotated[float, Range(gt=0, le=1)] = 0.01
    """Adam learning rate of the value function"""
    value_steps: Annotated[int, Range(ge=1, le=1000)] = 20
    """full-batch Adam steps on the value regression per batch"""
    final_window: Annotated[int, Range(ge=1, le=10_000)] = 10
    """final return = mean batch return over the last this-many updates (at most `updates`)"""
    random_episodes: Annotated[int, Range(ge=1, le=100_000)] = 200
    """episodes of a uniformly random policy (the baseline return, ~22 on CartPole)"""
    fixed_policy_updates: Annotated[int, Range(ge=0, le=100)] = 10
    """gradient-variance experiment: REINFORCE updates that produce the fixed policy (0: the init; a
    better-trained policy plays longer episodes, up to 500 steps, and the experiment's memory grows with them)"""
    value_fit_episodes: Annotated[int, Range(ge=1, le=10_000)] = 400
    """episodes (separate from the measured ones) whose returns the fixed V is regressed on"""
    value_fit_steps: Annotated[int, Range(ge=1, le=100_000)] = 400
    """full-batch Adam steps of that regression"""
    variance_episodes: Annotated[int, Range(ge=4, le=100_000)] = 2000
    """episodes of the fixed policy; each one is one sample of the gradient estimate g (>= 4: each half
    of them needs two for a standard error)"""
    variance_lambdas: Annotated[tuple[float, ...], Range(ge=0, le=1)] = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
    """GAE lambdas of the bias/variance sweep on the same episodes"""
    checkpoint_every: Annotated[int, Range(ge=1, le=10_000)] = 10
    """save a checkpoint of the learning-curve loop every this-many updates"""
    resume: bool = False
    """continue the learning-curve loop from the last checkpoint of this preset"""
    seed: Seed = 0
    """seed of network inits, env resets and action sampling"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        out = []
        if self.final_window > self.updates:
            out.append(f"final_window={self.final_window} exceeds updates={self.updates}")
        episodes = self.updates * self.episodes_per_update * self.n_seeds
        if episodes > LEARNING_EPISODES_MAX:
            out.append(f"updates x episodes_per_update x n_seeds = {episodes} exceeds {LEARNING_EPISODES_MAX} "
                       f"episodes per estimator (run time)")
        # a full-batch value regression holds (episodes x up to 500 steps, hidden) activations
        for name in ("episodes_per_update", "value_fit_episodes"):
            if getattr(self, name) * self.hidden > BATCH_UNITS_MAX:
                out.append(f"{name} x hidden = {getattr(self, name) * self.hidden} exceeds {BATCH_UNITS_MAX} (memory)")
        # per_step_logp_grads holds one gradient (7 hidden + 2 parameters) per step of the measured episodes
        grad_size = self.variance_episodes * (7 * self.hidden + 2)
        if grad_size > GRADIENT_SAMPLES_MAX:
            out.append(f"variance_episodes x policy parameters (7 hidden + 2) = {grad_size} exceeds "
                       f"{GRADIENT_SAMPLES_MAX} (memory of the per-step gradients)")
        return out


ESTIMATORS = ("mc", "baseline", "td0", "nstep", "gae")
CRITIC_FREE = ("mc", "baseline")  # use sampled returns only: unbiased whatever V is
OBS_DIM, N_ACTIONS = 4, 2


def mlp(n_out: int, hidden: int, seed: int) -> nn.Module:
    with torch.random.fork_rng():  # init from `seed` without touching the global torch RNG
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


# --- advantage estimators --------------------------------------------------------------------------
def td_errors(rewards, values, dones, last_value, gamma):
    """delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t); the TD(0) advantage."""
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)])
    return rewards + gamma * next_values * (1.0 - dones) - values


def n_step_advantages(rewards, values, dones, last_value, gamma, n):
    """A^(n)_t = sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n}) - V(s_t), cut at the episode end
    (then no bootstrap) and at the rollout end (then bootstrap on last_value = V(s_T)).
    Computed as the telescoping sum  A^(n)_t = sum_{k<n} gamma^k delta_{t+k}  (GAE paper eq. 11-14)."""
    deltas = td_errors(rewards, values, dones, last_value, gamma)
    T = rewards.shape[0]
    advantages = torch.zeros_like(deltas)
    weight = torch.ones_like(deltas)  # weight[t] = gamma^k * [no episode end in t .. t+k-1]
    for k in range(min(n, T)):
        advantages[:T - k] += weight[:T - k] * deltas[k:]
        weight[:T - k] = weight[:T - k] * gamma * (1.0 - dones[k:])
    return advantages


def estimate_advantages(estimator: str, batch: EpisodeBatch, values: torch.Tensor, final_values: torch.Tensor,
                        cfg: Config, lam: float | None = None) -> torch.Tensor:
    """A_hat_t (T, N) of one estimator; values = V(s_t) (T, N), final_values = V(final_obs) (N,)."""
    dones = batch.dones
    if estimator in CRITIC_FREE:
        returns = discounted_returns(batch.rewards, dones, cfg.gamma)  # G_t, reward-to-go
        return returns if estimator == "mc" else returns - values
    # A time-limit truncation is not a true end: bootstrap its tail with gamma * V(s_final).
    rewards = batch.rewards + cfg.gamma * final_values * batch.truncated
    last_value = torch.zeros_like(final_values)  # every episode ends inside the batch
    if estimator == "td0":
        return td_errors(rewards, values, dones, last_value, cfg.gamma)
    if estimator == "nstep":
        return n_step_advantages(rewards, values, dones, last_value, cfg.gamma, cfg.n_step)
    if estimator == "gae":
        return gae(rewards, values, dones, last_value, cfg.gamma, cfg.gae_lambda if lam is None else lam)[0]
    raise ValueError(f"unknown estimator {estimator!r}; known: {ESTIMATORS}")


# --- the learner: vanilla policy gradient + a value regression ------------------------------------
class Learner:
    def __init__(self, estimator: str, cfg: Config, init_seed: int):
        self.estimator, self.cfg = estimator, cfg
        self.policy = mlp(N_ACTIONS, cfg.hidden, derived_seed("policy-init", init_seed))
        self.policy_opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.policy_lr)
        self.value = self.value_opt = None
        if estimator != "mc":  # REINFORCE needs no critic
            self.value = mlp(1, cfg.hidden, derived_seed("value-init", init_seed))
            self.value_opt = torch.optim.Adam(self.value.parameters(), lr=cfg.value_lr)

    def values(self, batch: EpisodeBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """V(s_t) (T, N) and V(final_obs) (N,), without gradient (zeros for mc)."""
        if self.value is None:
            return torch.zeros(batch.rewards.shape), torch.zeros(batch.final_obs.shape[0])
        with torch.no_grad():
            return self.value(batch.obs).squeeze(-1), self.value(batch.final_obs).squeeze(-1)

    def update(self, batch: EpisodeBatch) -> None:
        values, final_values = self.values(batch)
        advantages = estimate_advantages(self.estimator, batch, values, final_values, self.cfg)
        mask = batch.valid.float()
        # gradient ascent on J:  g = (1/N) sum_i sum_t grad log pi(a_t|s_t) * A_hat_t
        logp = torch.log_softmax(self.policy(batch.obs), -1).gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
        policy_loss = -(logp * advantages * mask).sum() / batch.rewards.shape[1]
        self.policy_opt.zero_grad()
        policy_loss.backward()
        self.policy_opt.step()
        if self.value is not None:
            # the critic regresses on the estimator's own target: G_t, or A_hat + V (n-step / lambda-return)
            valid = batch.valid
            targets = (advantages + values)[valid]
            fit_value(self.value, self.value_opt, batch.obs[valid], targets, self.cfg.value_steps)

    def state_dict(self) -> dict:
        state = {"policy": self.policy.state_dict(), "policy_opt": self.policy_opt.state_dict()}
        if self.value is not None:
            state |= {"value": self.value.state_dict(), "value_opt": self.value_opt.state_dict()}
        return state

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.policy_opt] + ([self.value_opt] if self.value is not None else [])

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.policy_opt.load_state_dict(state["policy_opt"])
        if self.value is not None:
            self.value.load_state_dict(state["value"])
            self.value_opt.load_state_dict(state["value_opt"])


def fit_value(value: nn.Module, opt: torch.optim.Optimizer, obs: torch.Tensor, targets: torch.Tensor,
              steps: int) -> float:
    """Full-batch regression  min_V  mean_t (V(s_t) - target_t)^2  over the given steps (M, 4), (M,)."""
    for _ in range(steps):
        loss = ((value(obs).squeeze(-1) - targets) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def learning_curves(cfg: Config, ctx) -> None:
    """Train every (estimator, seed) learner in lockstep, one batch each per update; the batch
    returns go to the `learning_curve` table. Checkpoints hold every learner's networks and
    optimizers; all randomness of update u is derived from (cfg.seed, learner, u)."""
    learners = {(est, k): Learner(est, cfg, derived_seed(cfg.seed, k))
                for k in range(cfg.n_seeds) for est in ESTIMATORS}
    start = 0
    loaded = ctx.load_checkpoint(cfg.updates)
    if loaded is not None:
        start, state = loaded
        with ctx.restoring(*(opt for learner in learners.values() for opt in learner.optimizers)):
            for (est, k), learner in learners.items():
                learner.load_state_dict(state[f"{est}/{k}"])
    for update in ctx.track(range(start, cfg.updates), "learning curves", total=cfg.updates - start):
        for (est, k), learner in learners.items():
            # common random numbers: every estimator of seed k sees the same env starts and uniforms
            batch = play_episodes(learner.policy, cfg.episodes_per_update, derived_seed("train", cfg.seed, k, update))
            learner.update(batch)
            ctx.log("learning_curve", update=update + 1, estimator=est, seed=k,
                    mean_return=float(batch.episode_returns.mean()), env_steps=int(batch.valid.sum()))
        done = update + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.updates:
            ctx.save_checkpoint(done, {f"{est}/{k}": l.state_dict() for (est, k), l in learners.items()})


def return_curves(table: list[dict], cfg: Config) -> dict[str, np.ndarray]:
    """estimator -> (updates, seeds) batch mean returns, from the `learning_curve` table."""
    return {est: np.array([r["mean_return"] for r in table if r["estimator"] == est]).reshape(cfg.updates, cfg.n_seeds)
            for est in ESTIMATORS}


# --- gradient variance on a fixed policy -----------------------------------------------------------
def per_step_logp_grads(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(M, P): row m = grad_theta log pi(a_m | s_m), flattened over all policy parameters."""
    params = {name: p.detach() for name, p in policy.named_parameters()}

    def log_prob(p, s, a_onehot):
        return (torch.log_softmax(functional_call(policy, p, (s,)), -1) * a_onehot).sum()

    onehot = nn.functional.one_hot(actions, N_ACTIONS).to(obs.dtype)
    grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(params, obs, onehot)
    return torch.cat([g.reshape(len(obs), -1) for g in grads.values()], dim=1)


def per_episode_gradients(step_grads: torch.Tensor, advantages: torch.Tensor, episode: torch.Tensor,
                          n_episodes: int) -> torch.Tensor:
    """(N, P): g_i = sum_{t in episode i} grad log pi(a_t|s_t) * A_hat_t."""
    return torch.zeros(n_episodes, step_grads.shape[1], dtype=torch.float64).index_add_(
        0, episode, step_grads.double() * advantages.double().unsqueeze(1))


def mean_and_se(samples: torch.Tensor) -> tuple[float, float]:
    """Mean of i.i.d. samples and its standard error std / sqrt(n)."""
    return float(samples.mean()), float(samples.std() / len(samples) ** 0.5)


def gradient_variance(cfg: Config, ctx) -> tuple[dict[str, float], dict[str, dict]]:
    """Returns (summary metrics, per-estimator results)."""
    # The fixed policy: a few REINFORCE updates from a seeded init, then frozen.
    trainer = Learner("mc", cfg, derived_seed(cfg.seed, "fixed-policy"))
    for update in range(cfg.fixed_policy_updates):
        trainer.update(play_episodes(trainer.policy, cfg.episodes_per_update, derived_seed("fixed-policy", cfg.seed, update)))
    policy = trainer.policy

    # The fixed V: regression on that policy's Monte-Carlo returns from separate episodes.
    fit = play_episodes(policy, cfg.value_fit_episodes, derived_seed("value-fit", cfg.seed))
    value = mlp(1, cfg.hidden, derived_seed("fixed-value-init", cfg.seed))
    fit_returns = discounted_returns(fit.rewards, fit.dones, cfg.gamma)
    fit_value(value, torch.optim.Adam(value.parameters(), lr=cfg.value_lr), fit.obs[fit.valid],
              fit_returns[fit.valid], cfg.value_fit_steps)

    batch = play_episodes(policy, cfg.variance_episodes, derived_seed("variance", cfg.seed))
    with torch.no_grad():
        values, final_values = value(batch.obs).squeeze(-1), value(batch.final_obs).squeeze(-1)
    valid = batch.valid
    episode = torch.arange(cfg.variance_episodes).expand_as(valid)[valid]
    step_grads = per_step_logp_grads(policy, batch.obs[valid], batch.actions[valid])

    def episode_grads(estimator, lam=None):
        advantages = estimate_advantages(estimator, batch, values, final_values, cfg, lam)
        return per_episode_gradients(step_grads, advantages[valid], episode, cfg.variance_episodes)

    grads = {est: episode_grads(est) for est in ESTIMATORS}
    # tr Cov(g): the summed variance of every gradient coordinate over independent episodes
    total_var = {est: float(g.var(dim=0).sum()) for est, g in grads.items()}
    # Unbiasedness, paired: the direction u is the mc mean gradient of the first half of the
    # episodes; the z-scores use only the second half, so u is independent of what it tests.
    half = cfg.variance_episodes // 2
    direction = grads["mc"][:half].mean(0)
    direction = direction / direction.norm()

    def compare(g: torch.Tensor) -> dict[str, float]:
        projection = g[half:] @ direction
        mean, se = mean_and_se(projection)
        # paired: E[(g - g_mc) . u] = 0 for an unbiased g, and the shared noise of the episode cancels
        diff_mean, diff_se = mean_and_se(projection - grads["mc"][half:] @ direction)
        return {"projection": mean, "projection_se": se,
                "bias_z": diff_mean / diff_se if diff_se > 0 else float("nan"),  # nan: mc against itself
                "variance_ratio": float(g.var(dim=0).sum()) / total_var["mc"]}

    rows = {est: compare(g) for est, g in grads.items()}
    for est, row in rows.items():
        ctx.log("gradient_variance", estimator=est, total_variance=total_var[est], **row)
    for lam in cfg.variance_lambdas:
        ctx.log("lambda_sweep", gae_lambda=lam, **compare(episode_grads("gae", lam)))

    returns = discounted_returns(batch.rewards, batch.dones, cfg.gamma)[valid]
    explained = 1.0 - float((returns - values[valid]).var() / returns.var())
    ctx.save_figure(plot_gradient_variance(rows), "gradient_variance.png")
    ctx.save_figure(plot_lambda_sweep(ctx.tables["lambda_sweep"], rows), "lambda_sweep.png")
    summary = {"fixed_policy_return": float(batch.episode_returns.mean()), "value_explained_variance": explained,
               "mc_grad_total_variance": total_var["mc"]}
    return summary, rows


# --- plots -----------------------------------------------------------------------------------------
COLORS = dict(zip(ESTIMATORS, ("tab:gray", "tab:blue", "tab:red", "tab:orange", "tab:green")))


def plot_learning_curves(curves: dict[str, np.ndarray], random_return: float, cfg: Config):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(1, cfg.updates + 1)
    for est, curve in curves.items():
        ax.plot(x, curve.mean(1), color=COLORS[est], label=est)
        if cfg.n_seeds > 1:
            ax.fill_between(x, curve.min(1), curve.max(1), color=COLORS[est], alpha=0.15)
    ax.axhline(random_return, color="black", ls=":", label="random policy")
    band = f"mean of {cfg.n_seeds} seeds, band min-max" if cfg.n_seeds > 1 else "1 seed"
    ax.set(xlabel=f"update ({cfg.episodes_per_update} episodes each)", ylabel="episode return",
           title=f"CartPole-v1 policy gradient per advantage estimator ({band})")
    ax.legend()
    return fig


def plot_gradient_variance(rows: dict[str, dict]):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(rows)
    colors = [COLORS[n] for n in names]
    a1.bar(names, [rows[n]["variance_ratio"] for n in names], color=colors)
    a1.axhline(1.0, color="black", lw=0.8)
    a1.set(ylabel="tr Cov(g) / tr Cov(g_mc)", title="gradient variance relative to REINFORCE")
    a2.errorbar(names, [rows[n]["projection"] for n in names], yerr=[1.96 * rows[n]["projection_se"] for n in names],
                fmt="o", capsize=4)
    a2.axhline(rows["mc"]["projection"], color="tab:gray", ls=":", lw=0.8)
    a2.set(ylabel="mean g projected on u (95% CI)", title="mean gradient along a fixed direction u")
    return fig


def plot_lambda_sweep(sweep: list[dict], rows: dict[str, dict]):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lams = [r["gae_lambda"] for r in sweep]
    a1.plot(lams, [r["variance_ratio"] for r in sweep], "o-", color=COLORS["gae"], label="GAE(lambda)")
    a1.axhline(rows["baseline"]["variance_ratio"], color=COLORS["baseline"], ls="--", label="G - V (= lambda 1)")
    a1.set(xlabel="lambda", ylabel="tr Cov(g) / tr Cov(g_mc)", title="GAE gradient variance vs lambda")
    a1.legend()
    a2.plot(lams, [r["bias_z"] for r in sweep], "o-", color=COLORS["gae"])
    a2.axhspan(-2, 2, color="gray", alpha=0.2, label="|z| < 2")
    a2.set(xlabel="lambda", ylabel="z of E[g - g_mc] along u", title="GAE bias (paired z vs mc) vs lambda")
    a2.legend()
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    learning_curves(cfg, ctx)
    random_return = float(play_episodes(None, cfg.random_episodes, derived_seed("random", cfg.seed)).episode_returns.mean())
    curves = return_curves(ctx.tables["learning_curve"], cfg)
    final = {est: float(c[-cfg.final_window:].mean()) for est, c in curves.items()}  # asymptotic performance
    average = {est: float(c.mean()) for est, c in curves.items()}  # area under the curve: sample efficiency
    ctx.save_figure(plot_learning_curves(curves, random_return, cfg), "learning_curves.png")

    variance, rows = gradient_variance(cfg, ctx)
    del rows["mc"]  # the reference itself: ratio 1, z undefined
    ctx.say("final return " + "  ".join(f"{e}={v:.1f}" for e, v in final.items()) + f"  random={random_return:.1f}")
    ctx.say("gradient variance / mc's " + "  ".join(f"{e}={r['variance_ratio']:.3f} (bias z={r['bias_z']:+.1f})"
                                                   for e, r in rows.items()))
    return {
        **{f"{est}_final_return": final[est] for est in ESTIMATORS},
        **{f"{est}_mean_return": average[est] for est in ESTIMATORS},
        "random_return": random_return,
        "best_over_random": max(final.values()) / random_return,
        **variance,
        **{f"{est}_variance_ratio": row["variance_ratio"] for est, row in rows.items()},
        **{f"{est}_bias_z": abs(row["bias_z"]) for est, row in rows.items()},
    }
