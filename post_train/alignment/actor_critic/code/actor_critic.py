"""A2C, the synchronous advantage actor-critic (Mnih et al. 2016, "Asynchronous Methods for Deep
Reinforcement Learning", run synchronously as in OpenAI Baselines), on CartPole-v1.

Every update, each of E vectorised envs takes T steps with the current policy (T*E transitions, cut
anywhere inside episodes), then one gradient step on
    L = L_pi + c_V * L_V - c_H * H
    L_pi = -mean_t log pi(a_t | s_t) * A_t            policy gradient with a constant advantage
    L_V  =  mean_t (V(s_t) - R_t)^2                    critic regression on R_t = A_t + V(s_t)
    H    =  mean_t -sum_a pi(a|s_t) log pi(a|s_t)      entropy bonus: keeps exploring
Advantages: GAE (Schulman et al. 2016, eq. 16) over the rollout, bootstrapped with V(s_T) at its end
    delta_t = r_t + gamma V(s_{t+1}) (1 - done_t) - V(s_t),   A_t = sum_l (gamma lambda)^l delta_{t+l}
(lambda = 1: the n-step return of A3C minus V; lambda = 0: the one-step TD error.)

Termination vs truncation (Pardo et al. 2018): a pole that falls ends the episode, V(after) = 0; the
500-step time limit only stops it, and the state after it still has value, so that step's reward
becomes r_t + gamma V(s_final) before the episode boundary is cut. The vector env runs in gymnasium's
SAME_STEP autoreset mode: a sub-env that ends is reset inside the same step(), its returned
observation is already the next episode's first one, and the true s_final is in info["final_obs"].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn

from core.config import Range, Seed
from core.rl.rollouts import derived_seed, first_solved_episode, gae, play_episodes


EV_WINDOW = 20
"""updates in the moving mean of the critic's explained variance whose peak is reported: 20 rollouts
(2.5k transitions) average out the noise of a single 128-transition one"""
MAX_ENV_STEPS = 20_000_000
"""env steps of a whole run, all learners together: more is hours on a laptop, and every finished
episode and time-limit cut is logged in memory until the end"""
MAX_UPDATES = 1_000_000
"""updates (Adam steps) of a whole run, all learners together: each logs a row kept in memory"""


@dataclass
class Config:
    total_steps: Annotated[int, Range(ge=1, le=10_000_000)] = 300_000
    """environment steps per learner, summed over its vectorised envs (rounded down to whole rollouts)"""
    num_envs: Annotated[int, Range(ge=1, le=64)] = 8
    """synchronous CartPole-v1 copies stepped together"""
    max_episode_steps: Annotated[int, Range(ge=10, le=100_000)] = 500
    """time limit of the training episodes (CartPole-v1's is 500); where it cuts one, the learner
    bootstraps gamma V(s_final). The toy uses CartPole-v0's 200, so that cuts happen within its budget.
    At least 10: the pole needs 8 steps to fall, and a shorter limit leaves nothing to learn"""
    rollout_steps: Annotated[int, Range(ge=1, le=1024)] = 16
    """steps per env between updates (T); the batch of one update is T * num_envs transitions"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.99
    """discount factor (1 is fine: every training episode ends at the time limit at the latest)"""
    gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95
    """GAE lambda (1.0: n-step returns bootstrapped at the rollout end, as in A3C)"""
    hidden: Annotated[int, Range(ge=1, le=512)] = 64
    """units of each of the two tanh hidden layers"""
    shared_network: bool = False
    """one torso for actor and critic (two heads) instead of two separate networks"""
    lr: Annotated[float, Range(gt=0, le=1)] = 1e-3
    """Adam learning rate of the actor (and of a shared torso) at the start"""
    critic_lr: Annotated[float, Range(gt=0, le=1)] = 5e-3
    """Adam learning rate of the critic's own parameters at the start"""
    anneal_lr: bool = True
    """decay both learning rates linearly to 0 over the run (OpenAI Baselines' A2C default)"""
    ent_coef: Annotated[float, Range(ge=0, le=10)] = 0.01
    """c_H, weight of the entropy bonus"""
    vf_coef: Annotated[float, Range(ge=0, le=100)] = 0.5
    """c_V, weight of the value loss (with separate networks it barely matters, since Adam is invariant
    to the scale of a parameter's gradient: critic_lr sets the critic's speed; 0 leaves the critic untrained)"""
    max_grad_norm: Annotated[float, Range(ge=0, le=1e6)] = 0.0
    """clip the gradient norm of actor and critic parameters, each on its own, to this (0: no clipping)"""
    n_seeds: Annotated[int, Range(ge=1, le=20)] = 5
    """independent learners (init, env resets and action sampling derived from (seed, learner))"""
    final_episodes: Annotated[int, Range(ge=1, le=1000)] = 20
    """final return = mean return of each learner's last this-many training episodes"""
    solved_return: Annotated[float, Range(gt=0, le=100_000)] = 475.0
    """CartPole-v1's 'solved' level for the trailing mean over final_episodes episodes"""
    eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 20
    """greedy (argmax) evaluation episodes of each final policy"""
    random_episodes: Annotated[int, Range(ge=1, le=1000)] = 100
    """episodes of a uniformly random policy, the baseline return (~22)"""
    seed: Seed = 0
    """seed of everything random"""

    @property
    def rollout_size(self) -> int:
        """transitions per update, all envs together"""
        return self.num_envs * self.rollout_steps

    @property
    def updates(self) -> int:
        """updates per learner"""
        return self.total_steps // self.rollout_size

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        problems = []
        if self.rollout_size < 2:
            problems.append("num_envs * rollout_steps = 1: a one-transition rollout has no explained variance; "
                            "use at least 2 transitions per update")
        if self.updates < EV_WINDOW:
            problems.append(f"total_steps={self.total_steps} gives {self.updates} updates of num_envs * "
                            f"rollout_steps = {self.rollout_size} steps; the explained variance is a "
                            f"{EV_WINDOW}-update mean, so at least {EV_WINDOW} are needed: "
                            f"total_steps >= {EV_WINDOW * self.rollout_size}")
        if self.n_seeds * self.total_steps > MAX_ENV_STEPS:
            problems.append(f"n_seeds * total_steps = {self.n_seeds * self.total_steps:,} env steps exceeds "
                            f"{MAX_ENV_STEPS:,}")
        if self.n_seeds * self.updates > MAX_UPDATES:
            problems.append(f"n_seeds * updates = {self.n_seeds * self.updates:,} exceeds {MAX_UPDATES:,}: "
                            f"use fewer, larger rollouts (num_envs * rollout_steps)")
        return problems


OBS_DIM, N_ACTIONS = 4, 2


class ActorCritic(nn.Module):
    """pi(.|s) as logits and V(s). Separate (default): two MLPs, so the value loss, whose gradient is
    25-80x the policy loss's on CartPole (returns up to ~100), cannot reshape the policy's features,
    and each network gets its own learning rate. Shared: one torso, two linear heads; c_V then sets
    how much the torso serves the critic rather than the actor."""

    def __init__(self, hidden: int, shared: bool):
        super().__init__()
        torso = lambda: nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())  # noqa: E731
        self.actor_torso = torso()
        self.critic_torso = self.actor_torso if shared else torso()
        self.policy_head = nn.Linear(hidden, N_ACTIONS)
        self.value_head = nn.Linear(hidden, 1)

    def critic_parameters(self) -> list[nn.Parameter]:
        """What only the value loss trains: the value head, and the critic's torso when it has its own."""
        own_torso = [] if self.critic_torso is self.actor_torso else list(self.critic_torso.parameters())
        return own_torso + list(self.value_head.parameters())

    def actor_parameters(self) -> list[nn.Parameter]:
        """The policy head and the actor's torso (which the value loss also trains when shared)."""
        return list(self.actor_torso.parameters()) + list(self.policy_head.parameters())

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy_head(self.actor_torso(obs)), self.value_head(self.critic_torso(obs)).squeeze(-1)


# --- rollouts ----------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """T steps of E envs, time-major; every step is a real transition (SAME_STEP autoreset)."""
    obs: torch.Tensor         # (T, E, obs_dim) s_t
    actions: torch.Tensor     # (T, E)  a_t
    rewards: torch.Tensor     # (T, E)  r_t
    terminated: torch.Tensor  # (T, E)  the episode ended with step t: V(s_{t+1}) = 0
    truncated: torch.Tensor   # (T, E)  the time limit stopped it with step t: V(s_{t+1}) > 0
    final_obs: torch.Tensor   # (T, E, obs_dim) the real s_{t+1} where step t ended an episode, else 0
    next_obs: torch.Tensor    # (E, obs_dim) s_T, the observation after the rollout (bootstrap)


class EpisodeLog:
    """Returns of finished training episodes and the env step (all envs summed) each finished at."""

    def __init__(self, num_envs: int):
        self.running = np.zeros(num_envs)
        self.returns: list[float] = []
        self.finished_at: list[int] = []
        self.steps = 0

    def record(self, rewards: np.ndarray, done: np.ndarray) -> None:
        self.running += rewards
        self.steps += len(rewards)
        for i in np.flatnonzero(done):
            self.returns.append(float(self.running[i]))
            self.finished_at.append(self.steps)
            self.running[i] = 0.0


def make_envs(num_envs: int, max_episode_steps: int = 500) -> gym.vector.VectorEnv:
    # gymnasium's default is NEXT_STEP autoreset: the step after an episode end is a dummy reset step
    # whose action is ignored. SAME_STEP keeps every stored step a real transition instead.
    return gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="sync",
                        max_episode_steps=max_episode_steps, vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})


@torch.no_grad()
def collect_rollout(envs: gym.vector.VectorEnv, net: ActorCritic, obs: np.ndarray, steps: int,
                    episodes: EpisodeLog) -> Rollout:
    columns = []
    for _ in range(steps):
        logits, _ = net(torch.from_numpy(obs))
        actions = torch.distributions.Categorical(logits=logits).sample()
        next_obs, rewards, terminated, truncated, info = envs.step(actions.numpy())
        final_obs = np.zeros_like(obs)
        if "final_obs" in info:  # only present when some sub-env ended this step
            ended = info["_final_obs"]
            final_obs[ended] = np.stack(info["final_obs"][ended])
        columns.append((obs, actions.numpy(), rewards, terminated, truncated, final_obs))
        episodes.record(rewards, terminated | truncated)
        obs = next_obs
    stacked = [torch.from_numpy(np.stack(c)) for c in zip(*columns)]
    return Rollout(*stacked, next_obs=torch.from_numpy(obs))


# --- the losses --------------------------------------------------------------------------------------
def advantages_and_targets(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                           values: torch.Tensor, final_values: torch.Tensor, last_value: torch.Tensor,
                           gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages A_t and critic targets R_t = A_t + V(s_t) of a rollout (T, E).
    final_values[t] = V(real s_{t+1}) where step t ended an episode; last_value = V(s_T)."""
    # A truncated episode is cut, not over: r_t + gamma V(s_final) stands in for the missing tail.
    # Terminated wins when both flags are set (the pole fell on the last allowed step).
    cut_short = truncated & ~terminated
    rewards = rewards + gamma * final_values * cut_short
    # done_t stops both the bootstrap from and the propagation across the (auto-reset) boundary
    return gae(rewards, values, terminated | truncated, last_value, gamma, lam)


def a2c_losses(logits: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_pi, L_V, H), each a mean over the T*E transitions; advantages and targets are constants."""
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    policy_loss = -(chosen * advantages).mean()                     # -E[log pi(a|s) A]
    value_loss = ((values - targets) ** 2).mean()                   # E[(V(s) - R)^2]
    entropy = -(log_probs.exp() * log_probs).sum(-1).mean()         # E[-sum_a pi log pi]
    return policy_loss, value_loss, entropy


# --- training ----------------------------------------------------------------------------------------
def train(learner: int, cfg: Config, ctx) -> tuple[ActorCritic, EpisodeLog]:
    seed = derived_seed(cfg.seed, learner)
    torch.manual_seed(seed)  # init and action sampling
    net = ActorCritic(cfg.hidden, cfg.shared_network)
    groups = [{"params": net.actor_parameters(), "lr": cfg.lr}, {"params": net.critic_parameters(), "lr": cfg.critic_lr}]
    optimizer = torch.optim.Adam(groups)
    envs = make_envs(cfg.num_envs, cfg.max_episode_steps)
    obs, _ = envs.reset(seed=seed)  # sub-env i is seeded with seed + i; later resets continue its RNG
    episodes = EpisodeLog(cfg.num_envs)
    n_updates = cfg.updates
    for update in range(n_updates):
        if cfg.anneal_lr:
            for group, lr in zip(optimizer.param_groups, (cfg.lr, cfg.critic_lr)):
                group["lr"] = lr * (1.0 - update / n_updates)
        rollout = collect_rollout(envs, net, obs, cfg.rollout_steps, episodes)
        obs = rollout.next_obs.numpy()

        logits, values = net(rollout.obs)
        with torch.no_grad():
            final_values = net(rollout.final_obs)[1]
            last_value = net(rollout.next_obs)[1]
        advantages, targets = advantages_and_targets(rollout.rewards, rollout.terminated, rollout.truncated,
                                                     values.detach(), final_values, last_value,
                                                     cfg.gamma, cfg.gae_lambda)
        policy_loss, value_loss, entropy = a2c_losses(logits, values, rollout.actions, advantages, targets)
        explained = 1 - float((targets - values.detach()).var() / targets.var())  # of V before this update's step
        for advantage in advantages[rollout.truncated & ~rollout.terminated].tolist():
            ctx.log("cuts", learner=learner, env_steps=episodes.steps, advantage=advantage)
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        optimizer.zero_grad()
        loss.backward()
        if cfg.max_grad_norm > 0:
            for group in optimizer.param_groups:
                nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
        optimizer.step()

        recent = episodes.returns[-cfg.final_episodes:]
        ctx.log("training", learner=learner, update=update + 1, env_steps=episodes.steps,
                trailing_return=float(np.mean(recent)) if recent else float("nan"),
                policy_loss=policy_loss.item(), value_loss=value_loss.item(), entropy=entropy.item(),
                explained_variance=explained)
    envs.close()
    return net, episodes


def steps_to_solve(episodes: EpisodeLog, cfg: Config) -> float:
    """Env steps until the mean of the last `final_episodes` episodes first reaches `solved_return`;
    nan if it never does."""
    solved_after = first_solved_episode(episodes.returns, cfg.solved_return, cfg.final_episodes)
    return float(episodes.finished_at[solved_after - 1]) if solved_after else float("nan")


# --- plots -------------------------------------------------------------------------------------------
def moving_average(curves: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last `window` updates (fewer at the start), along the last axis."""
    if window == 1:  # also keeps the leading nans (no episode finished yet) from spreading
        return curves
    cumsum = np.cumsum(curves, axis=-1)
    shifted = np.concatenate([np.zeros_like(cumsum[..., :window]), cumsum[..., :-window]], axis=-1)
    return (cumsum - shifted) / np.minimum(np.arange(1, curves.shape[-1] + 1), window)


def plot_training(table: list[dict], random_return: float, cfg: Config):
    """Trailing return, policy entropy and critic loss against env steps: mean and min-max band over
    learners (thin lines: each learner); entropy and loss averaged over 20 updates."""
    panels = [("trailing_return", f"mean return of the last {cfg.final_episodes} episodes", 1),
              ("entropy", "policy entropy (nats)", 20), ("value_loss", "critic loss (V - R)^2", 20)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = np.array([r["env_steps"] for r in table if r["learner"] == 0])
    for ax, (key, label, window) in zip(axes, panels):
        curves = moving_average(np.array([r[key] for r in table], dtype=float).reshape(cfg.n_seeds, -1), window)
        ax.plot(steps, curves.mean(0), color="tab:blue")
        ax.fill_between(steps, curves.min(0), curves.max(0), color="tab:blue", alpha=0.2)
        for curve in curves:
            ax.plot(steps, curve, color="tab:blue", lw=0.4, alpha=0.4)
        ax.set(xlabel="environment steps", ylabel=label)
    axes[0].axhline(random_return, color="black", ls=":", label=f"random policy ({random_return:.0f})")
    axes[0].axhline(cfg.solved_return, color="tab:green", ls="--", lw=0.8, label=f"solved ({cfg.solved_return:g})")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[2].set_yscale("log")
    network = "shared" if cfg.shared_network else "separate"
    fig.suptitle(f"A2C on CartPole-v1 ({cfg.num_envs} envs x {cfg.rollout_steps} steps, GAE lambda={cfg.gae_lambda}, "
                 f"{network} networks): mean and min-max over {cfg.n_seeds} seeds")
    fig.tight_layout()
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    random_return = float(play_episodes(None, cfg.random_episodes, derived_seed(cfg.seed, 10**6)).episode_returns.mean())
    final, solved_at, greedy = [], [], []
    for learner in ctx.track(range(cfg.n_seeds), "A2C learners"):
        net, episodes = train(learner, cfg, ctx)
        final.append(np.mean(episodes.returns[-cfg.final_episodes:]))
        solved_at.append(steps_to_solve(episodes, cfg))
        actor = lambda obs: net(obs)[0]  # noqa: E731  play_episodes wants a callable returning logits
        evaluation = play_episodes(actor, cfg.eval_episodes, derived_seed(cfg.seed, learner, 10**6), greedy=True)
        greedy.append(evaluation.episode_returns.mean())
        ctx.say(f"learner {learner}: last-{cfg.final_episodes} mean {final[-1]:.1f}, greedy {greedy[-1]:.1f}, "
                f"steps to {cfg.solved_return:g}: {solved_at[-1]:g}")
    ctx.save_figure(plot_training(ctx.tables["training"], random_return, cfg), "training.png")

    final, solved_at = np.array(final), np.array(solved_at)
    explained = np.array([r["explained_variance"] for r in ctx.tables["training"]]).reshape(cfg.n_seeds, -1)
    explained_peak = moving_average(explained, EV_WINDOW)[:, EV_WINDOW - 1:].max(axis=1)  # full windows only
    solved = solved_at[np.isfinite(solved_at)]
    return {
        "random_return": random_return,
        "final_return": float(final.mean()),
        "worst_final_return": float(final.min()),
        "final_over_random": float(final.mean() / random_return),
        "greedy_return": float(np.mean(greedy)),
        "seeds_solved": float(np.isfinite(solved_at).mean()),
        "steps_to_solve": float(solved.mean()) if solved.size else float("nan"),
        "explained_variance_peak": float(explained_peak.mean()),
        "cut_advantage_mean": float(np.mean([r["advantage"] for r in ctx.tables.get("cuts", [])])),  # nan: no cut
    }
