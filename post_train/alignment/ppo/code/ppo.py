"""Proximal Policy Optimization (PPO-clip) on CartPole-v1, in one file.

Schulman, Wolski, Dhariwal, Radford & Klimov 2017, "Proximal Policy Optimization Algorithms":
    r_t(theta) = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t)                                   (eq. 6)
    L^CLIP     = E_t[ min( r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t ) ]                         (eq. 7)
    L          = E_t[ L^CLIP - c1 L^VF + c2 H[pi_theta](s_t) ]      (maximised)                 (eq. 9)
Advantages A_t are GAE(gamma, lambda) (Schulman et al. 2016, eq. 16; `core.rl.gae`), computed once
per rollout with the critic that collected it. Each rollout of num_envs x rollout_steps transitions
is reused for `epochs` passes of `minibatches` Adam steps; the clip removes the incentive to move
r_t outside [1 - eps, 1 + eps], which is what makes that reuse safe.

Engineering choices (Engstrom et al. 2020 and Huang et al. 2022 list them as part of "PPO"):
separate actor and critic MLPs with orthogonal init, advantages normalised per minibatch, value
clipping, global gradient-norm clipping, a linearly annealed learning rate, optional early stopping
on the approximate KL. Diagnostics per update: approx-KL, clip fraction, explained variance.

Gymnasium 1.4's CartPole vector env auto-resets in NEXT_STEP mode: the step that ends an episode
returns the real final observation, and the NEXT call to step() ignores its action, resets that
sub-env and returns reward 0 with the first observation. That reset step is not a transition of
the MDP; the rollout stores it with valid = False and it is dropped from every loss and statistic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from core.config import Range, Seed
from core.rl.rollouts import first_solved_episode, gae, play_episodes


MIN_MINIBATCH = 8
"""fewest transitions a minibatch may hold (before auto-reset steps are masked): the advantage of a
single transition normalises to nan (std of one value) and poisons the weights"""
MAX_ENV_STEPS = 20_000_000
"""env steps of a whole run, all learners together: more is hours on a laptop, and every finished
episode is logged in memory until the end"""
MAX_ADAM_STEPS = 1_000_000
"""Adam steps of a whole run, all learners together (CleanRL's CartPole configuration takes 16k per learner)"""


@dataclass
class Config:
    total_steps: Annotated[int, Range(ge=1, le=10_000_000)] = 60_000
    """environment steps per learner (all sub-envs together, masked reset steps included; rounded
    down to whole rollouts)"""
    num_envs: Annotated[int, Range(ge=1, le=64)] = 8
    """parallel CartPole sub-envs of the vector env"""
    max_episode_steps: Annotated[int, Range(ge=10, le=100_000)] = 500
    """time limit of the training episodes (CartPole-v1's is 500); where it cuts one, the learner
    bootstraps gamma V(s_final). The toy uses CartPole-v0's 200, so that cuts happen within its budget.
    At least 10: the pole needs 8 steps to fall, and a shorter limit leaves nothing to learn"""
    rollout_steps: Annotated[int, Range(ge=1, le=1024)] = 64
    """steps per sub-env per rollout; one rollout = num_envs * rollout_steps transitions"""
    epochs: Annotated[int, Range(ge=1, le=100)] = 10
    """passes over each rollout (K in the PPO paper)"""
    minibatches: Annotated[int, Range(ge=1, le=1024)] = 4
    """minibatches per epoch (Adam steps per epoch); each holds at least MIN_MINIBATCH = 8 transitions
    of the rollout (they need not divide it: the last ones are one transition smaller)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 2.5e-3
    """Adam learning rate at the start (actor and critic)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.99
    """discount factor (1 is fine: every training episode ends at the time limit at the latest)"""
    gae_lambda: Annotated[float, Range(ge=0, le=1)] = 0.95
    """lambda of GAE (0: one-step TD error, 1: Monte-Carlo return minus V)"""
    clip_eps: Annotated[float, Range(gt=0, le=1)] = 0.2
    """epsilon of the clipped surrogate: r_t is clipped to [1 - eps, 1 + eps]"""
    value_clip: Annotated[float, Range(gt=0, le=1e6)] | None = 10.0
    """V may move at most this far from its rollout-time value before its loss is clipped (none: plain MSE)"""
    value_coef: Annotated[float, Range(ge=0, le=100)] = 0.5
    """c1: weight of the value loss (0: the critic is never trained)"""
    entropy_coef: Annotated[float, Range(ge=0, le=10)] = 0.0
    """c2: weight of the entropy bonus"""
    max_grad_norm: Annotated[float, Range(gt=0, le=1e6)] = 0.5
    """clip the global gradient norm of actor + critic to this"""
    target_kl: Annotated[float, Range(gt=0, le=100)] | None = None
    """stop the epochs of an update early once an epoch's mean approx-KL exceeds this (none: never)"""
    norm_adv: bool = True
    """normalise advantages to mean 0, std 1 within each minibatch"""
    hidden: Annotated[int, Range(ge=1, le=512)] = 64
    """units of the two tanh hidden layers of the actor and of the critic"""
    n_seeds: Annotated[int, Range(ge=1, le=20)] = 1
    """independent learners; learner k uses seed + k (steps-to-475 is averaged over them)"""
    solved_return: Annotated[float, Range(gt=0, le=100_000)] = 475.0
    """CartPole-v1 is solved when the mean of the last `solved_window` episode returns reaches this"""
    solved_window: Annotated[int, Range(ge=1, le=1000)] = 20
    """episodes in the moving mean of the solved criterion and of the final return (the checks use it;
    steps_to_475_window100 also reports CleanRL's usual 100-episode window, a later and fairer bar)"""
    eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 20
    """greedy (argmax) evaluation episodes per learner after training"""
    random_episodes: Annotated[int, Range(ge=1, le=1000)] = 100
    """episodes of a uniformly random policy (the baseline return, ~22)"""
    seed: Seed = 0
    """base seed: learner k seeds its nets, env resets, actions and minibatches from seed + k"""

    @property
    def rollout_size(self) -> int:
        """transitions per rollout, all sub-envs together (masked reset steps included)"""
        return self.num_envs * self.rollout_steps

    @property
    def iterations(self) -> int:
        """rollouts (and updates) per learner"""
        return self.total_steps // self.rollout_size

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        problems = []
        if self.iterations < 1:
            problems.append(f"total_steps={self.total_steps} is less than one rollout "
                            f"(num_envs * rollout_steps = {self.rollout_size}): there would be no update")
        if self.rollout_size < MIN_MINIBATCH * self.minibatches:
            problems.append(f"minibatches={self.minibatches} splits a rollout of {self.rollout_size} transitions into "
                            f"minibatches of fewer than {MIN_MINIBATCH}: use at most "
                            f"{self.rollout_size // MIN_MINIBATCH}")
        if self.n_seeds * self.total_steps > MAX_ENV_STEPS:
            problems.append(f"n_seeds * total_steps = {self.n_seeds * self.total_steps:,} env steps exceeds "
                            f"{MAX_ENV_STEPS:,}")
        if self.n_seeds * self.iterations * self.epochs * self.minibatches > MAX_ADAM_STEPS:
            problems.append(f"n_seeds * iterations * epochs * minibatches = "
                            f"{self.n_seeds * self.iterations * self.epochs * self.minibatches:,} Adam steps exceeds "
                            f"{MAX_ADAM_STEPS:,}")
        return problems


OBS_DIM, N_ACTIONS = 4, 2


# --- networks ---------------------------------------------------------------------------------------
def mlp(n_out: int, hidden: int, out_gain: float) -> nn.Sequential:
    """Two tanh hidden layers, orthogonal init (gain sqrt 2), zero biases; the output layer's gain
    `out_gain` is small for the actor (0.01: a near-uniform initial policy) and 1 for the critic."""
    net = nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                        nn.Linear(hidden, n_out))
    for layer, gain in zip(net[::2], (2 ** 0.5, 2 ** 0.5, out_gain)):
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.zeros_(layer.bias)
    return net


# --- the loss pieces --------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of the taken actions."""
    return torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H[pi](s) = -sum_a pi(a|s) log pi(a|s), per state."""
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def clipped_surrogate_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                           clip_eps: float) -> torch.Tensor:
    """-L^CLIP: minus the mean of min(r A, clip(r, 1-eps, 1+eps) A), the pessimistic of the two.
    Where the clipped term is the smaller one, it is constant in theta: those samples give no gradient."""
    ratio = torch.exp(logp - old_logp)                                        # r_t = pi / pi_old  (eq. 6)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.min(unclipped, clipped).mean()                              # eq. 7, negated to minimise


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       value_clip: float | None) -> torch.Tensor:
    """L^VF = 1/2 mean max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), the pessimistic of the
    plain and the clipped squared error (as in OpenAI baselines' ppo2); 1/2 mean (V - R)^2 when c is none."""
    squared_error = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * squared_error.mean()
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    return 0.5 * torch.max(squared_error, (clipped_values - returns) ** 2).mean()


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """KL(pi_old || pi) estimated from samples a ~ pi_old as the mean of (r - 1) - log r, r = pi / pi_old:
    unbiased (E_old[r] = 1) and every term >= 0 (log r <= r - 1); Schulman's "k3" estimator."""
    log_ratio = logp - old_logp
    return (torch.expm1(log_ratio) - log_ratio).mean()   # expm1: no cancellation near r = 1


def normalize(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A - mean A) / (std A + eps) over one minibatch: a batch baseline plus a scale-free step size."""
    return (advantages - advantages.mean()) / (advantages.std() + eps)


def explained_variance(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 is no better than a constant, < 0 is worse."""
    variance = targets.var()
    return float(1 - (targets - predicted).var() / variance) if variance > 0 else float("nan")


# --- rollouts ---------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Time-major (T, N) storage of one rollout; row t holds what was seen and done at step t."""
    obs: torch.Tensor         # (T, N, 4) s_t
    actions: torch.Tensor     # (T, N)    a_t
    logp: torch.Tensor        # (T, N)    log pi_old(a_t|s_t)
    values: torch.Tensor      # (T, N)    V_old(s_t)
    rewards: torch.Tensor     # (T, N)    r_t
    terminated: torch.Tensor  # (T, N)    the episode truly ended with step t: V(s_{t+1}) = 0
    truncated: torch.Tensor   # (T, N)    the time limit (500 steps) hit with step t: not a true end
    valid: torch.Tensor       # (T, N)    False at an auto-reset step (the step after an episode end)
    last_value: torch.Tensor  # (N,)      V_old(s_T), the state after the last step

    def advantages_and_returns(self, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and value targets R_t = A_t + V_old(s_t), (T, N).

        After a done step t, s_{t+1} (obs of the masked reset step, or s_T) is the real final
        observation, so values[t+1] / last_value is V(s_final). A truncation bootstraps its tail
        with gamma V(s_final); both kinds of end stop the GAE recursion (Pardo et al. 2018)."""
        next_values = torch.cat([self.values[1:], self.last_value.unsqueeze(0)])
        rewards = self.rewards + gamma * next_values * self.cut_short
        return gae(rewards, self.values, self.terminated | self.truncated, self.last_value, gamma, lam)

    @property
    def cut_short(self) -> torch.Tensor:
        """(T, N) the time limit, not a fall, ended the episode with step t. The pole can fall on the
        last allowed step: then both flags are set and it is an end."""
        return self.truncated & ~self.terminated

    def flatten_valid(self, **per_step: torch.Tensor) -> dict[str, torch.Tensor]:
        """The valid transitions as flat tensors: the rollout's own fields and any extra (T, N) ones."""
        columns = {"obs": self.obs, "actions": self.actions, "logp": self.logp, "values": self.values, **per_step}
        return {name: column[self.valid] for name, column in columns.items()}


@dataclass
class Episode:
    end_step: int      # global env step (all sub-envs) at which the episode ended
    ret: float         # undiscounted return
    length: int


class VectorRunner:
    """Steps a CartPole vector env across rollouts, keeps each sub-env's running episode return and
    knows which sub-envs will auto-reset on the next step."""

    def __init__(self, num_envs: int, seed: int, max_episode_steps: int = 500):
        self.envs = gym.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode="vector_entry_point",
                                 max_episode_steps=max_episode_steps)
        self.obs = torch.from_numpy(self.envs.reset(seed=seed)[0])
        self.resets_next = np.zeros(num_envs, dtype=bool)  # previous step ended the episode
        self.episode_return = np.zeros(num_envs)
        self.episode_length = np.zeros(num_envs, dtype=int)
        self.global_step = 0

    @torch.no_grad()
    def collect(self, actor: nn.Module, critic: nn.Module, steps: int,
                rng: np.random.Generator) -> tuple[Rollout, list[Episode]]:
        n = self.envs.num_envs
        rows, episodes = [], []
        for _ in range(steps):
            logits, values = actor(self.obs), critic(self.obs).squeeze(-1)
            probs = torch.softmax(logits, -1).numpy()
            actions = (rng.random((n, 1)) > probs.cumsum(1)[:, :-1]).sum(1)  # inverse-CDF sample a ~ pi_old
            next_obs, rewards, terminated, truncated, _ = self.envs.step(actions)
            self.global_step += n
            valid = ~self.resets_next  # False: this call only reset the sub-env, its action was ignored
            rows.append({"obs": self.obs, "actions": torch.from_numpy(actions),
                         "logp": log_probs(logits, torch.from_numpy(actions)), "values": values,
                         "rewards": torch.from_numpy(rewards), "terminated": torch.from_numpy(terminated),
                         "truncated": torch.from_numpy(truncated), "valid": torch.from_numpy(valid)})
            self.episode_return += rewards * valid
            self.episode_length += valid
            done = terminated | truncated
            for i in np.flatnonzero(done):
                episodes.append(Episode(self.global_step, float(self.episode_return[i]), int(self.episode_length[i])))
            self.episode_return[done], self.episode_length[done] = 0.0, 0
            self.resets_next = done
            self.obs = torch.from_numpy(next_obs)  # after a done: the real final observation
        rollout = Rollout(**{k: torch.stack([row[k] for row in rows]) for k in rows[0]},
                          last_value=critic(self.obs).squeeze(-1))
        return rollout, episodes

    def close(self) -> None:
        self.envs.close()


# --- one learner ------------------------------------------------------------------------------------
@dataclass
class LearnerResult:
    seed: int
    episodes: list[Episode]
    updates: list[dict] = field(default_factory=list)
    steps_to_solved: float = float("nan")
    greedy_return: float = float("nan")
    cut_advantages: list[float] = field(default_factory=list)
    """GAE advantage of every step that a time limit cut (truncated, not terminated)"""

    def final_return(self, window: int) -> float:
        return float(np.mean([e.ret for e in self.episodes[-window:]]))


def steps_to_solved(episodes: list[Episode], threshold: float, window: int) -> float:
    """First global env step at which the mean return of the last `window` episodes is >= threshold."""
    solved_after = first_solved_episode([e.ret for e in episodes], threshold, window)
    return float(episodes[solved_after - 1].end_step) if solved_after else float("nan")


def ppo_update(actor, critic, optimizer, batch: dict[str, torch.Tensor], cfg: Config,
               rng: np.random.Generator) -> dict[str, float]:
    """`epochs` passes of `minibatches` Adam steps on L = -L^CLIP + c1 L^VF - c2 H over one rollout."""
    params = [*actor.parameters(), *critic.parameters()]
    n = len(batch["actions"])
    stats = []
    for epoch in range(cfg.epochs):
        for idx in np.array_split(rng.permutation(n), cfg.minibatches):
            mb = {k: v[idx] for k, v in batch.items()}
            logits = actor(mb["obs"])
            logp = log_probs(logits, mb["actions"])
            advantages = normalize(mb["advantages"]) if cfg.norm_adv else mb["advantages"]
            policy_loss = clipped_surrogate_loss(logp, mb["logp"], advantages, cfg.clip_eps)
            value_loss = clipped_value_loss(critic(mb["obs"]).squeeze(-1), mb["values"], mb["returns"], cfg.value_clip)
            entropy = categorical_entropy(logits).mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy   # -(eq. 9)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():  # measured on the minibatch before its step, as it was optimised
                ratio = torch.exp(logp - mb["logp"])
                stats.append({"epoch": epoch, "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                              "entropy": entropy.item(), "approx_kl": approx_kl(logp, mb["logp"]).item(),
                              "clip_fraction": ((ratio - 1).abs() > cfg.clip_eps).float().mean().item()})
        epoch_kl = np.mean([s["approx_kl"] for s in stats if s["epoch"] == epoch])
        if cfg.target_kl is not None and epoch_kl > cfg.target_kl:
            break
    means = {k: float(np.mean([s[k] for s in stats])) for k in stats[0] if k != "epoch"}
    return {**means, "epochs_run": epoch + 1}


def train(cfg: Config, seed: int, ctx) -> LearnerResult:
    """Train one actor-critic pair with PPO for cfg.total_steps env steps, then evaluate the greedy actor."""
    env_seed, action_seed, init_seed, eval_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(4))
    with torch.random.fork_rng():  # init from the learner's seed without touching the global torch RNG
        torch.manual_seed(init_seed)
        actor, critic = mlp(N_ACTIONS, cfg.hidden, 0.01), mlp(1, cfg.hidden, 1.0)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=cfg.lr, eps=1e-5)
    rng = np.random.default_rng(action_seed)
    runner = VectorRunner(cfg.num_envs, env_seed, cfg.max_episode_steps)
    result = LearnerResult(seed, episodes=[])
    iterations = cfg.iterations
    for it in ctx.track(range(iterations), f"PPO seed {seed}", total=iterations):
        lr = cfg.lr * (1 - it / iterations) if cfg.anneal_lr else cfg.lr   # linear decay to ~0
        for group in optimizer.param_groups:
            group["lr"] = lr
        rollout, episodes = runner.collect(actor, critic, cfg.rollout_steps, rng)
        result.episodes += episodes
        advantages, returns = rollout.advantages_and_returns(cfg.gamma, cfg.gae_lambda)
        result.cut_advantages += advantages[rollout.cut_short & rollout.valid].tolist()
        batch = rollout.flatten_valid(rewards=rollout.rewards, advantages=advantages, returns=returns)
        row = {"seed": seed, "iteration": it + 1, "env_step": runner.global_step, "lr": lr,
               "explained_variance": explained_variance(batch["values"], batch["returns"]),  # of V_old, before the update
               "value_target_std": float(batch["returns"].std()),
               "reward_mean": float(batch["rewards"].mean()),  # CartPole pays 1 per real step, 0 at a reset
               **ppo_update(actor, critic, optimizer, batch, cfg, rng)}
        result.updates.append(row)
        ctx.log("updates", **row)
    runner.close()
    for e in result.episodes:
        ctx.log("episodes", seed=seed, env_step=e.end_step, episode_return=e.ret, length=e.length)
    result.steps_to_solved = steps_to_solved(result.episodes, cfg.solved_return, cfg.solved_window)
    result.greedy_return = float(play_episodes(actor, cfg.eval_episodes, eval_seed, greedy=True).episode_returns.mean())
    return result


# --- plots ------------------------------------------------------------------------------------------
def moving_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at every position (of all values so far at the start)."""
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    end = np.arange(1, len(x) + 1)
    start = np.maximum(end - window, 0)
    return (cumsum[end] - cumsum[start]) / (end - start)


def plot_returns(results: list[LearnerResult], cfg: Config, random_return: float):
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r, color in zip(results, plt.cm.tab10.colors):
        steps = np.array([e.end_step for e in r.episodes])
        returns = np.array([e.ret for e in r.episodes])
        ax.plot(steps, returns, ".", color=color, alpha=0.25, ms=3)
        ax.plot(steps, moving_mean(returns, cfg.solved_window), color=color,
                label=f"seed {r.seed} (mean of last {cfg.solved_window})")
        if np.isfinite(r.steps_to_solved):
            ax.axvline(r.steps_to_solved, color=color, ls=":", lw=1)
    ax.axhline(cfg.solved_return, color="black", ls="--", lw=0.8, label=f"solved ({cfg.solved_return:g})")
    ax.axhline(random_return, color="gray", ls=":", label="random policy")
    ax.set(xlabel="environment steps", ylabel="episode return", title="PPO on CartPole-v1 (dotted: steps to solved)")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_diagnostics(results: list[LearnerResult], cfg: Config):
    panels = (("approx_kl", "approx-KL  mean of (r-1) - log r"), ("clip_fraction", f"clip fraction  |r-1| > {cfg.clip_eps}"),
              ("explained_variance", "explained variance of V_old"), ("entropy", "policy entropy (nats)"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for r, color in zip(results, plt.cm.tab10.colors):
            ax.plot([u["env_step"] for u in r.updates], [u[key] for u in r.updates], color=color, lw=1,
                    label=f"seed {r.seed}")
        ax.set(title=title)
    axes[1, 0].set_ylim(-1, 1.05)
    for ax in axes[1]:
        ax.set_xlabel("environment steps")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


WIDE_WINDOW = 100
"""the moving-mean window CleanRL's and most papers' "solved" curves use: a 20-episode mean reaches 475
earlier, so steps-to-475 is reported both ways"""


def run(cfg: Config, ctx) -> dict[str, float]:
    results = []
    for k in range(cfg.n_seeds):
        result = train(cfg, cfg.seed + k, ctx)
        results.append(result)
        ctx.log("learners", seed=result.seed, steps_to_475=result.steps_to_solved,
                steps_to_475_window100=steps_to_solved(result.episodes, cfg.solved_return, WIDE_WINDOW),
                final_return=result.final_return(cfg.solved_window), greedy_return=result.greedy_return)
        ctx.say(f"seed {result.seed}: steps to {cfg.solved_return:g} = {result.steps_to_solved:g}, final "
                f"last-{cfg.solved_window} mean = {result.final_return(cfg.solved_window):.1f}, "
                f"greedy = {result.greedy_return:.1f}")
    random_return = float(play_episodes(None, cfg.random_episodes, cfg.seed).episode_returns.mean())
    ctx.save_figure(plot_returns(results, cfg, random_return), "episode_return.png")
    ctx.save_figure(plot_diagnostics(results, cfg), "diagnostics.png")
    final = [r.final_return(cfg.solved_window) for r in results]
    solved_at = [r.steps_to_solved for r in results]
    solved_at_wide = [steps_to_solved(r.episodes, cfg.solved_return, WIDE_WINDOW) for r in results]
    updates = [u for r in results for u in r.updates]
    late = [u for r in results for u in r.updates[-10:]]  # once solved, every target is ~1/(1-gamma)
    return {
        "steps_to_475": float(np.mean(solved_at)),  # nan (-> check fails) if any learner never solved
        "steps_to_475_max": float(np.max(solved_at)),
        "steps_to_475_window100": float(np.mean(solved_at_wide)),
        "final_return": float(np.mean(final)),
        "final_return_min": float(np.min(final)),
        "greedy_return_min": float(min(r.greedy_return for r in results)),
        "random_return": random_return,
        "final_over_random": float(np.min(final)) / random_return,
        "approx_kl_mean": float(np.mean([u["approx_kl"] for u in updates])),
        "clip_fraction_mean": float(np.mean([u["clip_fraction"] for u in updates])),
        "explained_variance_peak": float(np.mean([np.nanmax([u["explained_variance"] for u in r.updates])
                                                  for r in results])),
        "value_target_std_late": float(np.mean([u["value_target_std"] for u in late])),
        "trained_reward_mean": float(np.mean([u["reward_mean"] for u in updates])),
        "cut_advantage_mean": float(np.mean([a for r in results for a in r.cut_advantages])),  # nan: no cut
    }
