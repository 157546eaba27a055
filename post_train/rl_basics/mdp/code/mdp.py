"""Value iteration and policy iteration on FrozenLake (Sutton & Barto ch. 4), solved from the
environment's own model `env.unwrapped.P` and then tested in the real environment.

Bellman optimality backup (value iteration):
    V_{k+1}(s) = max_a sum_{s'} P(s'|s,a) [ r(s,a,s') + gamma * V_k(s') * (1 - terminal) ]
Policy iteration alternates
    evaluation:   V^pi(s) = sum_{s'} P(s'|s,pi(s)) [ r + gamma * V^pi(s') ]   (iterated to a fixed point)
    improvement:  pi'(s)  = argmax_a Q^pi(s, a)
The exact check solves the linear Bellman system of the greedy policy in closed form:
    (I - gamma * P_pi) V = r_pi   =>   V = np.linalg.solve(I - gamma * P_pi, r_pi)
Those checks share the model P, R; the real env checks it: V*(start) = E[gamma^(T-1) 1{goal}] over
episodes of the greedy policy, and its success within the time limit against the exact probability.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import gymnasium as gym
import numpy as np
import matplotlib.pyplot as plt

from core.config import Range, Seed


@dataclass
class Config:
    map_name: Literal["4x4", "8x8"] = "4x4"
    """FrozenLake map"""
    is_slippery: bool = True
    """slippery ice: the intended move happens with probability 1/3, each perpendicular one 1/3"""
    gamma: Annotated[float, Range(ge=0, le=0.9999)] = 0.99
    """discount factor. Kept below 1: at gamma = 1 a greedy policy may pick a tied action that loops
    forever (on the non-slippery map every move that can still reach the goal is worth 1), and the
    linear solve of I - P_pi is then singular; 0.9999 already looks 10^4 steps ahead (time limit: 100)"""
    theta: Annotated[float, Range(ge=1e-15, le=1)] = 1e-11
    """stop when the largest Bellman residual of a sweep falls below this (values are <= 1: a smaller
    theta is below float64 rounding and would only run to max_sweeps)"""
    max_sweeps: Annotated[int, Range(ge=1, le=1_000_000)] = 100_000
    """safety cap on sweeps for value iteration and each policy evaluation (~30 us a sweep)"""
    eval_episodes: Annotated[int, Range(ge=2, le=1_000_000)] = 2000
    """episodes of the greedy (and of a random) policy played in the real gymnasium env (>= 2 for a
    standard error; ~2 ms per greedy + random pair on 4x4)"""
    gamma_sweep: Annotated[tuple[float, ...], Range(ge=0, le=0.9999)] = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
    """discounts for the success-vs-gamma curve (exact success probabilities from the model; below 1
    like gamma, and the plot's x axis is log(1 - gamma))"""
    seed: Seed = 0
    """seed of the evaluation episodes"""


ARROWS = {0: "←", 1: "↓", 2: "→", 3: "↑"}  # FrozenLake actions: left, down, right, up
PLAY_STEP_CAP = 1000
"""`play` cuts an episode here: a policy that never ends (e.g. pushing into a wall forever) must not
hang the run. A proper policy is still running after 1000 steps with probability ~1e-15 (mean
length 49), and gamma^1000 <= 4e-5 at gamma = 0.99, so the cut moves no reported number."""


def tabular_model(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    """From env.unwrapped.P build
    P[s, a, s'] = probability of moving to a *non-terminal continuation* s' (terminal moves are
                  dropped, so nothing is bootstrapped after the episode ends), and
    R[s, a]     = expected immediate reward."""
    n_s, n_a = env.observation_space.n, env.action_space.n
    P, R = np.zeros((n_s, n_a, n_s)), np.zeros((n_s, n_a))
    for s, by_action in env.unwrapped.P.items():
        for a, outcomes in by_action.items():
            for prob, s_next, reward, terminated in outcomes:
                R[s, a] += prob * reward
                if not terminated:
                    P[s, a, s_next] += prob
    # holes and the goal are absorbing: once there, no reward and no continuation
    for s in terminal_states(env):
        P[s], R[s] = 0.0, 0.0
    return P, R


def terminal_states(env: gym.Env) -> list[int]:
    desc = env.unwrapped.desc.flatten()
    return [i for i, c in enumerate(desc) if c in (b"H", b"G")]


def q_values(P: np.ndarray, R: np.ndarray, V: np.ndarray, gamma: float) -> np.ndarray:
    return R + gamma * P @ V                                      # Q(s,a) = r(s,a) + gamma * E[V(s')]


def value_iteration(P, R, gamma, theta, max_sweeps):
    V = np.zeros(P.shape[0])
    residuals = []
    for _ in range(max_sweeps):
        V_new = q_values(P, R, V, gamma).max(axis=1)              # Bellman optimality backup
        residuals.append(float(np.abs(V_new - V).max()))
        V = V_new
        if residuals[-1] < theta:
            break
    return V, q_values(P, R, V, gamma).argmax(axis=1), residuals


def policy_evaluation(P, R, policy, gamma, theta, max_sweeps, V=None):
    """Iterative (not closed-form) evaluation, so the linear solve below stays an independent check."""
    states = np.arange(P.shape[0])
    P_pi, R_pi = P[states, policy], R[states, policy]
    V = np.zeros(P.shape[0]) if V is None else V
    for sweep in range(1, max_sweeps + 1):
        V_new = R_pi + gamma * P_pi @ V                           # Bellman expectation backup
        done = np.abs(V_new - V).max() < theta
        V = V_new
        if done:
            break
    return V, sweep


def policy_iteration(P, R, gamma, theta, max_sweeps):
    policy = np.zeros(P.shape[0], dtype=int)
    V, history = None, []
    while True:
        V, sweeps = policy_evaluation(P, R, policy, gamma, theta, max_sweeps, V)
        Q = q_values(P, R, V, gamma)
        # keep the current action unless another is strictly better: prevents flip-flopping between ties
        best = Q.argmax(axis=1)
        improvable = Q[np.arange(len(policy)), best] > Q[np.arange(len(policy)), policy] + 1e-12
        changed = int(improvable.sum())
        history.append({"iteration": len(history) + 1, "evaluation_sweeps": sweeps, "actions_changed": changed,
                        "v_start": float(V[0])})
        if changed == 0:
            return V, policy, history
        policy = np.where(improvable, best, policy)


def solve_bellman_linear(P, R, policy, gamma):
    states = np.arange(P.shape[0])
    return np.linalg.solve(np.eye(P.shape[0]) - gamma * P[states, policy], R[states, policy])


def success_probability(env: gym.Env, P: np.ndarray, policy: np.ndarray, horizon: int) -> float:
    """Exact probability that `policy` reaches the goal within `horizon` steps (the env's time
    limit), by propagating the state distribution through the model."""
    n_s = P.shape[0]
    goal = int(np.flatnonzero(env.unwrapped.desc.flatten() == b"G")[0])
    terminals = set(terminal_states(env))
    full = np.zeros((n_s, n_s))  # transition matrix including the moves into terminal states
    for s, by_action in env.unwrapped.P.items():
        if s in terminals:
            full[s, s] = 1.0
            continue
        for prob, s_next, _, _ in by_action[int(policy[s])]:
            full[s, s_next] += prob
    dist = np.zeros(n_s)
    dist[0] = 1.0
    for _ in range(horizon):
        dist = dist @ full
    return float(dist[goal])


def play(env: gym.Env, policy: np.ndarray | None, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Length and outcome (goal reached or not) of each episode in the real env, played *without* its
    time limit (env.unwrapped: the same seeded dynamics, run on to a hole or the goal): one set of
    episodes gives both the success within the limit and the untruncated discounted return.
    Policy None plays uniformly random actions."""
    rng = np.random.default_rng(seed)
    lake = env.unwrapped
    lengths, won = np.zeros(episodes, dtype=int), np.zeros(episodes, dtype=bool)
    for ep in range(episodes):
        s, _ = lake.reset(seed=seed * 1_000_003 + ep)
        for step in range(1, PLAY_STEP_CAP + 1):
            a = int(policy[s]) if policy is not None else int(rng.integers(lake.action_space.n))
            s, r, terminated, _, _ = lake.step(a)
            if terminated:
                break
        lengths[ep], won[ep] = step, terminated and r > 0
    return lengths, won


def plot_values(env, V, policy, gamma):
    desc = env.unwrapped.desc
    n_rows, n_cols = desc.shape
    fig, ax = plt.subplots(figsize=(1.3 * n_cols + 1, 1.3 * n_rows))
    im = ax.imshow(V.reshape(n_rows, n_cols), cmap="viridis")
    fig.colorbar(im, ax=ax, label="V*(s)")
    for i in range(n_rows):
        for j in range(n_cols):
            cell, s = desc[i, j].decode(), i * n_cols + j
            label = cell if cell in "HG" else f"{ARROWS[int(policy[s])]}\n{V[s]:.2f}"
            # dark text on the bright end of viridis, white elsewhere (terminal cells have V = 0: dark)
            color = "black" if im.norm(V[s]) > 0.6 else "white"
            ax.text(j, i, label, ha="center", va="center", color=color, fontsize=10)
    ax.set_title(f"FrozenLake V* and greedy policy (gamma={gamma})")
    ax.set_xticks([]), ax.set_yticks([])
    return fig


def plot_convergence(residuals, pi_history):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.semilogy(np.arange(1, len(residuals) + 1), residuals)
    a1.set(xlabel="sweep", ylabel="max |V_{k+1} - V_k|", title="value iteration: Bellman residual")
    a2.bar([h["iteration"] for h in pi_history], [h["actions_changed"] for h in pi_history])
    a2.set(xlabel="policy-iteration step", ylabel="actions changed",
           title=f"policy iteration: converged in {len(pi_history)} steps")
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    env = gym.make("FrozenLake-v1", map_name=cfg.map_name, is_slippery=cfg.is_slippery)
    P, R = tabular_model(env)

    V_vi, pi_vi, residuals = value_iteration(P, R, cfg.gamma, cfg.theta, cfg.max_sweeps)
    V_pi, pi_pi, pi_history = policy_iteration(P, R, cfg.gamma, cfg.theta, cfg.max_sweeps)
    V_exact = solve_bellman_linear(P, R, pi_vi, cfg.gamma)
    for k, r in enumerate(residuals, 1):
        ctx.log("vi_convergence", sweep=k, bellman_residual=r)
    for row in pi_history:
        ctx.log("policy_iteration", **row)

    horizon = env.spec.max_episode_steps
    lengths, won = play(env, pi_vi, cfg.eval_episodes, cfg.seed)
    success = float(np.mean(won & (lengths <= horizon)))         # what the env's 100-step time limit scores
    success_model = success_probability(env, P, pi_vi, horizon)
    stderr = np.sqrt(max(success_model * (1 - success_model), 1e-12) / cfg.eval_episodes)
    # V^pi(start) = E[gamma^(T-1) 1{goal}]: reward 1 on the last step T, no time limit. Sampled from
    # the real env it shares nothing with the model P, R that VI solved, so it checks the model too.
    returns = np.where(won, cfg.gamma ** (lengths - 1.0), 0.0)
    v_start_mc = float(returns.mean())
    v_start_stderr = np.sqrt(max(float(returns.var(ddof=1)), 1e-12) / cfg.eval_episodes)
    random_lengths, random_won = play(env, None, cfg.eval_episodes, cfg.seed + 1)
    random_success = float(np.mean(random_won & (random_lengths <= horizon)))

    for gamma in cfg.gamma_sweep:
        _, pi_g, _ = value_iteration(P, R, gamma, cfg.theta, cfg.max_sweeps)
        ctx.log("gamma_sweep", gamma=gamma, success_probability=success_probability(env, P, pi_g, horizon))

    ctx.save_figure(plot_values(env, V_vi, pi_vi, cfg.gamma), "values_policy.png")
    ctx.save_figure(plot_convergence(residuals, pi_history), "convergence.png")
    sweep = ctx.tables["gamma_sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs, ys = [1 - r["gamma"] for r in sweep], [r["success_probability"] for r in sweep]
    ax.semilogx(xs, ys, "o-")
    for x, y, r in zip(xs, ys, sweep):
        ax.annotate(f"γ={r['gamma']:g}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.invert_xaxis()
    ax.set(xlabel="1 - gamma (log scale; far-sighted to the right)", ylabel=f"P(goal within {horizon} steps)", title="myopic agents fail more")
    ctx.save_figure(fig, "success_vs_gamma.png")

    ctx.say(f"V*(start)={V_vi[0]:.4f} (real env: {v_start_mc:.4f})  VI sweeps={len(residuals)}  "
            f"PI steps={len(pi_history)}  greedy success {success:.3f} (model says {success_model:.3f}), "
            f"random {random_success:.3f}")
    return {
        "vi_sweeps": len(residuals),
        "pi_iterations": len(pi_history),
        "v_start": float(V_vi[0]),
        "v_start_mc": v_start_mc,
        "v_start_z": float(abs(V_vi[0] - v_start_mc) / v_start_stderr),
        "vi_pi_max_abs_diff": float(np.abs(V_vi - V_pi).max()),
        "bellman_solve_max_abs_diff": float(np.abs(V_vi - V_exact).max()),
        "success_rate": success,
        "success_rate_model": success_model,
        "success_z": float(abs(success - success_model) / stderr),
        "random_success_rate": random_success,
    }
