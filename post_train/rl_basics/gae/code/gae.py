"""Bias and variance of Generalized Advantage Estimation as a function of lambda (Schulman et al.
2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation"), measured on a
small random MDP where every expectation can also be computed exactly.

    delta_t    = r_t + gamma * V_hat(s_{t+1}) * (1 - done_t) - V_hat(s_t)            (sec. 3)
    A_t^lambda = sum_{l>=0} (gamma * lambda)^l * delta_{t+l}    (within the episode)  (eq. 16)

The estimates come from the shared `core.rl.gae`, the one PPO and RLHF use. The critic V_hat is
deliberately wrong: V_hat(s) = V^pi(s) + e(s) with a fixed error e.

What the policy gradient needs is only the action-dependent part of the advantage. V_hat(s) is a
baseline: subtracting any function of the state leaves E[grad log pi(a|s) * (.)] unchanged. So the
estimate A_t^lambda is judged against

    target(s, a) = Q^pi(s, a) - V_hat(s)

for which lambda = 1 (Monte-Carlo return minus the baseline) is exactly unbiased, while lambda < 1
bootstraps from the wrong V_hat and pays a bias. Against the "true" advantage Q^pi - V^pi, lambda = 1
is off by exactly -e(s) on average: a state-only shift that the gradient never sees (also reported).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch

from core.config import Range, Seed
from core.rl.rollouts import discounted_returns, gae


# Limits of the cross-field rules in Config.problems (memory and run time on a laptop)
ROLLOUT_STEPS_MAX = 1.5e7  # default ~5e6 steps: 0.7 GB peak, ~2 GB at the cap
ROLLOUT_WORK_MAX = 1e9  # default ~6e7
ENV_PAIR_CELLS_MAX = 2e7  # default 480,000; float64: 160 MB at the cap


@dataclass
class Config:
    n_states: Annotated[int, Range(ge=1, le=300)] = 10
    """non-terminal states of the random MDP"""
    n_actions: Annotated[int, Range(ge=1, le=100)] = 3
    """actions per state"""
    termination_prob: Annotated[float, Range(ge=0.001, le=0.5)] = 0.05
    """mean per-step probability that the episode ends (each (s, a) draws its own in [0.5, 1.5] x this).
    Above 0: every episode ends, which makes gamma = 1 well defined and the rollout finite (beyond 2/3
    a drawn probability would exceed 1)"""
    reward_mean: Annotated[float, Range(ge=-1000, le=1000)] = 1.0
    """mean of the expected rewards r(s, a) ~ N(reward_mean, 1); > 0 makes episodes worth something"""
    reward_noise: Annotated[float, Range(ge=0, le=1000)] = 1.0
    """std of the Gaussian noise added to each sampled reward"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.95
    """discount factor (part of the problem: it sets what Q^pi and V^pi are). 1 is allowed: every
    (s, a) ends the episode with probability >= termination_prob / 2, so I - gamma P_pi is invertible"""
    lambdas: Annotated[tuple[float, ...], Range(ge=0, le=1)] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    """GAE lambdas to evaluate (0 and 1 are always added)"""
    value_error: Annotated[float, Range(ge=0, le=1000)] = 3.0
    """std over states of the critic's fixed error e(s) = V_hat(s) - V^pi(s), in reward units"""
    n_envs: Annotated[int, Range(ge=2, le=1_000_000)] = 16000
    """parallel environments; each one is a trajectory of several back-to-back episodes (>= 2: the
    standard errors are clustered by environment)"""
    horizon: Annotated[int, Range(ge=1, le=100_000)] = 128
    """steps per environment (PPO's num_steps); the episode running at the horizon is finished, not cut"""
    min_visits: Annotated[int, Range(ge=2, le=100_000_000)] = 200
    """(s, a) pairs visited fewer times are left out of the z-scores (too few samples for a standard error)"""
    mdp_seed: Seed = 0
    """seed of the random MDP, the policy and the critic's error (the problem)"""
    seed: Seed = 0
    """seed of the sampled trajectories (the experiment)"""

    def expected_steps(self) -> float:
        """About how many steps the rollout stores: n_envs x (horizon + the wait for the last episode
        to end, ~ln(n_envs) / termination_prob)."""
        return self.n_envs * (self.horizon + math.log(self.n_envs) / self.termination_prob)

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        out = []
        steps = self.expected_steps()
        if steps > ROLLOUT_STEPS_MAX:
            out.append(f"n_envs x (horizon + ln(n_envs) / termination_prob) = {steps:.3g} steps exceeds "
                       f"{ROLLOUT_STEPS_MAX:.3g} (the rollout's arrays, ~150 bytes a step)")
        elif steps * (self.n_states + 1) > ROLLOUT_WORK_MAX:
            out.append(f"{steps:.3g} rollout steps x (n_states + 1) outcomes = {steps * (self.n_states + 1):.3g} "
                       f"exceeds {ROLLOUT_WORK_MAX:.3g} (run time: each step samples the next state)")
        cells = self.n_envs * self.n_states * self.n_actions
        if cells > ENV_PAIR_CELLS_MAX:
            out.append(f"n_envs x n_states x n_actions = {cells} exceeds {ENV_PAIR_CELLS_MAX:.3g} "
                       f"(the clustered standard errors sum per environment and (s, a) pair)")
        return out


@dataclass
class TabularMDP:
    P: np.ndarray
    """P[s, a, s'] = probability of moving to non-terminal s'; the rest, 1 - sum_s' P, ends the episode"""
    R: np.ndarray
    """R[s, a] = expected reward"""
    pi: np.ndarray
    """pi[s, a] = probability that the fixed stochastic policy picks a in s"""
    value_error: np.ndarray
    """e(s) = V_hat(s) - V^pi(s), the critic's systematic error"""
    start_state: int = 0


def random_mdp(cfg: Config) -> TabularMDP:
    rng = np.random.default_rng(cfg.mdp_seed)
    S, A = cfg.n_states, cfg.n_actions
    stop = cfg.termination_prob * rng.uniform(0.5, 1.5, size=(S, A))
    P = rng.dirichlet(np.full(S, 0.5), size=(S, A)) * (1.0 - stop)[..., None]  # sparse-ish rows
    return TabularMDP(P=P, R=rng.normal(cfg.reward_mean, 1.0, size=(S, A)), pi=rng.dirichlet(np.ones(A), size=S),
                      value_error=cfg.value_error * rng.standard_normal(S))


def policy_transition(mdp: TabularMDP) -> np.ndarray:
    return np.einsum("sa,sat->st", mdp.pi, mdp.P)                # P_pi(s'|s) = sum_a pi(a|s) P(s'|s,a)


def exact_values(mdp: TabularMDP, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """V^pi and Q^pi by one linear solve of the Bellman equation (Sutton & Barto 2nd ed., sec. 3.5, 4.1)."""
    r_pi = (mdp.pi * mdp.R).sum(axis=1)                           # r_pi(s) = sum_a pi(a|s) r(s,a)
    V = np.linalg.solve(np.eye(len(r_pi)) - gamma * policy_transition(mdp), r_pi)  # (I - gamma P_pi) V = r_pi
    Q = mdp.R + gamma * mdp.P @ V                                 # Q(s,a) = r(s,a) + gamma sum_s' P(s'|s,a) V(s')
    return V, Q


def expected_gae_bias(mdp: TabularMDP, gamma: float, lam: float) -> np.ndarray:
    """E[A_t^lambda | s_t=s, a_t=a] - (Q^pi(s,a) - V_hat(s)), in closed form, for V_hat = V^pi + e.

    E[delta_t | s, a]           = Q^pi(s,a) - V_hat(s) + gamma (P_a e)(s)
    E[delta_{t+l} | s, a], l>=1 = P_a P_pi^(l-1) (gamma P_pi - I) e   (a ~ pi averages out Q - V)
    summing (gamma lambda)^l over l:
    bias(s,a) = gamma P_a e + gamma lambda P_a (I - gamma lambda P_pi)^-1 (gamma P_pi - I) e
    At lambda = 1 the two terms cancel (the errors telescope); at lambda = 0 only gamma P_a e is left.
    """
    e, P_pi = mdp.value_error, policy_transition(mdp)
    drift = gamma * P_pi @ e - e                                  # E[delta | s] under pi: (gamma P_pi - I) e
    tail = np.linalg.solve(np.eye(len(e)) - gamma * lam * P_pi, drift)  # sum_k (gamma lambda P_pi)^k drift
    return gamma * mdp.P @ e + gamma * lam * mdp.P @ tail


@dataclass
class Rollout:
    """(T, n_envs) arrays. Steps after an environment's last episode are padding (real = False,
    done = True, reward 0), so the final episodes all end inside the array: nothing is truncated."""
    states: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray
    real: np.ndarray


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of `probs` (rows sum to 1), by inverting the cumulative distribution."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def rollout(mdp: TabularMDP, cfg: Config, rng: np.random.Generator) -> Rollout:
    """Run n_envs environments for `horizon` steps with automatic resets to the start state (like a
    PPO rollout), then keep each one going until its current episode ends. Whether a new episode
    starts depends only on the clock, never on that episode's future, so every episode is an
    unbiased sample and no step needs a bootstrapped tail."""
    S = mdp.P.shape[0]
    outcomes = np.concatenate([mdp.P, 1.0 - mdp.P.sum(axis=2, keepdims=True)], axis=2)  # last = episode ends
    state = np.full(cfg.n_envs, mdp.start_state)
    running = np.ones(cfg.n_envs, dtype=bool)
    steps = []
    while running.any():
        action = sample_categorical(mdp.pi[state], rng)
        reward = mdp.R[state, action] + cfg.reward_noise * rng.standard_normal(cfg.n_envs)
        next_state = sample_categorical(outcomes[state, action], rng)
        ended = next_state == S
        steps.append((state, action, np.where(running, reward, 0.0), ended | ~running, running.copy()))
        state = np.where(ended, mdp.start_state, next_state)
        if len(steps) >= cfg.horizon:
            running &= ~ended                                     # past the horizon: stop at the next episode end
    return Rollout(*(np.stack(column) for column in zip(*steps)))


def gae_advantages(ro: Rollout, V_hat: np.ndarray, gamma: float, lam: float, mask_dones: bool = True) -> np.ndarray:
    """GAE(gamma, lambda) for every step with the shared core.rl.gae; mask_dones=False is the classic
    bug (bootstrapping and propagating across episode boundaries), kept as a negative control."""
    values = torch.from_numpy(np.where(ro.real, V_hat[ro.states], 0.0))
    dones = torch.from_numpy(ro.dones if mask_dones else np.zeros_like(ro.dones))
    last_value = torch.zeros(values.shape[1], dtype=torch.float64)  # every environment ends on a done
    advantages, _ = gae(torch.from_numpy(ro.rewards), values, dones, last_value, gamma, lam)
    return advantages.numpy()[ro.real]


@dataclass
class PairStats:
    """Per (s, a) pair: statistics of the estimation error x_t = A_t - target(s_t, a_t)."""
    visits: np.ndarray
    bias: np.ndarray
    """mean error: the Monte-Carlo estimate of E[A | s, a] - target(s, a)"""
    variance: np.ndarray
    """Var[A | s, a] (the target is fixed given (s, a))"""
    stderr: np.ndarray
    """standard error of `bias`, clustered by environment (visits in one trajectory are correlated)"""


def pair_stats(errors: np.ndarray, pair: np.ndarray, env: np.ndarray, n_pairs: int, n_envs: int) -> PairStats:
    visits = np.bincount(pair, minlength=n_pairs)
    bias = np.bincount(pair, errors, minlength=n_pairs) / np.maximum(visits, 1)
    centered = errors - bias[pair]
    variance = np.bincount(pair, centered ** 2, minlength=n_pairs) / np.maximum(visits, 1)
    # cluster-robust standard error: sum the centred errors per (environment, pair) first
    per_env = np.bincount(env * n_pairs + pair, centered, minlength=n_envs * n_pairs).reshape(n_envs, n_pairs)
    stderr = np.sqrt((per_env ** 2).sum(axis=0)) / np.maximum(visits, 1)
    return PairStats(visits, bias, variance, stderr)


def max_abs_z(stats: PairStats, expected_bias: np.ndarray, min_visits: int) -> float:
    """Largest |measured bias - expected bias| in standard errors over well-visited pairs (nan when no
    pair has min_visits visits: then there is nothing to test, and a check on it fails)."""
    ok = stats.visits >= min_visits
    if not ok.any():
        return float("nan")
    return float(np.max(np.abs(stats.bias[ok] - expected_bias[ok]) / stats.stderr[ok]))


def plot_tradeoff(sweep: list[dict], best_lambda: float):
    lam = [row["lambda"] for row in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lam, [r["bias2"] for r in sweep], "o", color="C0", label="bias² (Monte-Carlo)")
    ax.plot(lam, [r["bias2_exact"] for r in sweep], "-", color="C0", alpha=0.6, label="bias² (closed form)")
    ax.plot(lam, [r["variance"] for r in sweep], "s-", color="C1", label="variance")
    ax.plot(lam, [r["mse"] for r in sweep], "^-", color="C2", label="MSE = bias² + variance")
    ax.plot(lam, [r["bias2_vs_true_advantage"] for r in sweep], ":", color="gray",
            label="bias² vs Q−V (baseline shift, gradient-irrelevant)")
    ax.axvline(best_lambda, color="C2", ls="--", lw=1, label=f"MSE-optimal λ = {best_lambda:g}")
    ax.set(xlabel="λ", ylabel="per-step error², visitation-weighted",
           title="GAE(γ, λ) against Q^π(s,a) − V̂(s)")
    ax.legend(fontsize=8)
    return fig


def plot_pairs(target: np.ndarray, means: dict[float, np.ndarray], visited: np.ndarray):
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for lam, mean in means.items():
        ax.plot(target[visited], mean[visited], "o", ms=4, alpha=0.8, label=f"λ = {lam:g}")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="unbiased")
    ax.set(xlabel="Q^π(s,a) − V̂(s) (exact)", ylabel="mean GAE estimate at (s,a)",
           title="per (s, a): λ=1 sits on the diagonal")
    ax.legend(fontsize=8)
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    rng = np.random.default_rng(cfg.seed)
    mdp = random_mdp(cfg)
    V, Q = exact_values(mdp, cfg.gamma)
    V_hat = V + mdp.value_error                                   # the imperfect critic
    target = (Q - V_hat[:, None]).ravel()                         # what the policy gradient needs, per (s, a)
    state_error = mdp.value_error.repeat(cfg.n_actions)           # e(s) per (s, a) pair

    ro = rollout(mdp, cfg, rng)
    n_pairs = cfg.n_states * cfg.n_actions
    pair = (ro.states * cfg.n_actions + ro.actions)[ro.real]       # (s, a) of every real step
    env = np.broadcast_to(np.arange(cfg.n_envs), ro.states.shape)[ro.real]

    def stats_of(advantages: np.ndarray) -> PairStats:
        return pair_stats(advantages - target[pair], pair, env, n_pairs, cfg.n_envs)

    lambdas = sorted(set(cfg.lambdas) | {0.0, 1.0})
    stats_by_lambda = {}
    for lam in ctx.track(lambdas, "GAE over the lambda grid"):
        adv = gae_advantages(ro, V_hat, cfg.gamma, lam)
        stats = stats_by_lambda[lam] = stats_of(adv)
        weight = stats.visits / stats.visits.sum()                # visitation distribution of (s, a)
        exact_bias = expected_gae_bias(mdp, cfg.gamma, lam).ravel()
        ctx.log("lambda_sweep", **{
            "lambda": lam,
            "bias2": float(weight @ stats.bias ** 2),              # E_(s,a)[(E[A|s,a] - target)^2]
            "bias2_exact": float(weight @ exact_bias ** 2),
            "variance": float(weight @ stats.variance),           # E_(s,a)[Var[A|s,a]]
            "mse": float(np.mean((adv - target[pair]) ** 2)),     # = bias2 + variance (exactly, in-sample)
            # against Q - V instead: A - (Q - V) = (A - target) - e(s)
            "bias2_vs_true_advantage": float(weight @ (stats.bias - state_error) ** 2),
            "max_z_vs_exact": max_abs_z(stats, exact_bias, cfg.min_visits),
        })
    sweep = ctx.tables["lambda_sweep"]
    at = {row["lambda"]: row for row in sweep}
    best = min(sweep, key=lambda row: row["mse"])
    unbiased = np.zeros(n_pairs)
    unmasked = stats_of(gae_advantages(ro, V_hat, cfg.gamma, 1.0, mask_dones=False))

    # Monte-Carlo check of the sampler: mean discounted return of the episodes vs exact V^pi(s0)
    returns = discounted_returns(torch.from_numpy(ro.rewards), torch.from_numpy(ro.dones), cfg.gamma).numpy()
    episode_start = np.zeros_like(ro.real)
    episode_start[0] = True
    episode_start[1:] = ro.dones[:-1] & ro.real[1:]
    start_returns = returns[episode_start]
    v_start_mc = float(start_returns.mean())
    v_start_stderr = float(start_returns.std(ddof=1) / np.sqrt(len(start_returns)))

    visits = stats_by_lambda[0.0].visits
    for g in range(n_pairs):
        s, a = divmod(g, cfg.n_actions)
        ctx.log("pairs", state=s, action=a, visits=int(visits[g]), Q=Q[s, a], V=V[s], V_hat=V_hat[s],
                target=target[g], mean_adv_lambda0=stats_by_lambda[0.0].bias[g] + target[g],
                mean_adv_lambda1=stats_by_lambda[1.0].bias[g] + target[g])

    ctx.save_figure(plot_tradeoff(sweep, best["lambda"]), "bias_variance.png")
    shown = {lam: stats_by_lambda[lam].bias + target for lam in dict.fromkeys([0.0, best["lambda"], 1.0])}
    ctx.save_figure(plot_pairs(target, shown, visits >= cfg.min_visits), "mean_advantage_vs_target.png")

    ctx.say(f"{len(pair)} steps in {len(start_returns)} episodes; MSE-optimal lambda = {best['lambda']:g} "
            f"(bias² {best['bias2']:.3f}, var {best['variance']:.3f}); lambda=0: bias² {at[0.0]['bias2']:.3f}, "
            f"var {at[0.0]['variance']:.3f}; lambda=1: bias² {at[1.0]['bias2']:.4f}, var {at[1.0]['variance']:.3f}")
    return {
        "v_start_exact": float(V[mdp.start_state]),
        "v_start_mc": v_start_mc,
        # a sampler with no noise at all (reward_noise=0, one action, gamma=0) has stderr 0: z undefined
        "mc_value_z": (abs(v_start_mc - float(V[mdp.start_state])) / v_start_stderr if v_start_stderr > 0
                       else float("nan")),
        "bias2_lambda0": at[0.0]["bias2"],
        "bias2_lambda1": at[1.0]["bias2"],
        "var_lambda0": at[0.0]["variance"],
        "var_lambda1": at[1.0]["variance"],
        "mse_lambda0": at[0.0]["mse"],
        "mse_lambda1": at[1.0]["mse"],
        "best_lambda": best["lambda"],
        "mse_best": best["mse"],
        "bias_z_lambda0": max_abs_z(stats_by_lambda[0.0], unbiased, cfg.min_visits),
        "bias_z_lambda1": max_abs_z(stats_by_lambda[1.0], unbiased, cfg.min_visits),
        "bias_exact_max_z": max(row["max_z_vs_exact"] for row in sweep),
        "bias_z_lambda1_no_done_mask": max_abs_z(unmasked, unbiased, cfg.min_visits),
        "bias2_true_adv_lambda1": at[1.0]["bias2_vs_true_advantage"],
        "value_error_ms": float(visits @ state_error ** 2 / visits.sum()),
        "n_steps": int(len(pair)),
        "n_episodes": int(len(start_returns)),
    }
