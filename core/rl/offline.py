"""Offline RL on CartPole-v1: fixed datasets of three qualities and the pieces every offline learner
shares (the Monte-Carlo returns of the data and the value K backups can reach, the Q-network and its
value at the start states, the behaviour-cloning loss, the minibatch sampler, greedy evaluation in the
real environment, derived seeds). Each algorithm's own losses stay in its module (post_train/offline_rl/).

An offline learner never touches the environment while it learns: it sees only transitions
(s, a, r, s', terminated, truncated) that some behaviour policy beta collected earlier, and is judged
by playing its final greedy policy. The datasets differ only in beta:

    expert   a hand-written controller: push the cart towards where the pole is falling,
             a = 1[theta + 0.5 * theta_dot > 0]  (pole angle, angular velocity); it holds the pole for
             the full 500 steps from every start state, and it is deterministic: the data contain one
             action per state, so Q(s, other action) is never observed
    noisy    epsilon-mixed expert, epsilon = NOISY_EPSILON = 0.5: with probability 0.5 a uniformly
             random action, i.e. the expert's action 75% of the time; episode return ~150
    random   uniformly random actions; episode return ~22

Every dataset is a deterministic function of (quality, min_transitions, seed): whole episodes are
played with `core.rl.play_episodes` (reproducible from its seed) until at least `min_transitions`
transitions are collected. Modules write the datasets they train on into their own run's output
folder (`OfflineDataset.save(ctx.path("dataset_<quality>.npz"))`): collecting one takes about a
second, so a shared cache would only add a way for stale data to outlive a change of this file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from core.artifacts import atomic_write
from core.rl.rollouts import EpisodeBatch, derived_seed, discounted_returns, play_episodes

QUALITIES = ("expert", "noisy", "random")
NOISY_EPSILON = 0.5
"""probability that the noisy behaviour policy replaces the expert's action by a uniform one"""
OBS_DIM, N_ACTIONS = 4, 2
FIRST_BATCH_EPISODES = 8
"""episodes of the first collection batch; each later batch aims at half of what is still missing
(from the mean episode length so far), so the last episode overshoots `min_transitions` only a little"""


class ExpertController(nn.Module):
    """Behaviour policy as log-probabilities (play_episodes samples softmax(output)):
    pi(a|s) = (1 - epsilon) * 1[a = a_expert(s)] + epsilon / 2,  a_expert(s) = 1[theta + 0.5 theta_dot > 0]."""

    def __init__(self, epsilon: float = 0.0):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        pole_angle, pole_velocity = obs[..., 2], obs[..., 3]
        push_right = (pole_angle + 0.5 * pole_velocity > 0).long()
        probs = (1 - self.epsilon) * nn.functional.one_hot(push_right, N_ACTIONS).double() + self.epsilon / N_ACTIONS
        return torch.log(probs)  # log 0 = -inf for the expert: softmax gives that action probability 0


def behaviour_policy(quality: str) -> nn.Module | None:
    """The policy that collects a dataset (None: uniformly random, as play_episodes takes it)."""
    if quality == "expert":
        return ExpertController(0.0)
    if quality == "noisy":
        return ExpertController(NOISY_EPSILON)
    if quality == "random":
        return None
    raise ValueError(f"unknown dataset quality {quality!r}; known: {QUALITIES}")


@dataclass
class OfflineDataset:
    """N transitions stored episode after episode (episode i's steps are contiguous, in order)."""
    obs: np.ndarray              # (N, 4) float32  s_t
    actions: np.ndarray          # (N,)   int64    a_t ~ beta(.|s_t)
    rewards: np.ndarray          # (N,)   float32  r_t
    next_obs: np.ndarray         # (N, 4) float32  s_{t+1} (the real final state at an episode end)
    terminated: np.ndarray       # (N,)   bool     the pole fell: Q(s_{t+1}, .) = 0
    truncated: np.ndarray        # (N,)   bool     the 500-step limit: not an end of the MDP, bootstrap
    episode_returns: np.ndarray  # (E,)   float32  undiscounted return of every episode in the data
    behaviour_return: float      # mean of episode_returns: the score of beta itself

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def episode_ends(self) -> np.ndarray:
        """True on the last transition of every episode."""
        return self.terminated | self.truncated

    @property
    def episode_starts(self) -> np.ndarray:
        """Indices of every episode's first transition."""
        return np.flatnonzero(np.concatenate([[True], self.episode_ends[:-1]]))

    def save(self, path: str | Path) -> Path:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "OfflineDataset":
        with np.load(path) as data:
            arrays = {f.name: data[f.name] for f in fields(cls)}
        return cls(**{**arrays, "behaviour_return": float(arrays["behaviour_return"])})


def transitions(batch: EpisodeBatch) -> dict[str, np.ndarray]:
    """Flatten a time-major batch of complete episodes into episode-contiguous transitions."""
    valid = batch.valid.T.numpy()                         # (N, T): a prefix of True per episode
    obs = batch.obs.transpose(0, 1).numpy()               # (N, T, 4)
    next_obs = np.concatenate([obs[:, 1:], obs[:, :1]], axis=1)  # s_{t+1}; last column is overwritten
    lengths = valid.sum(1)
    next_obs[np.arange(len(lengths)), lengths - 1] = batch.final_obs.numpy()  # true s_T of each episode

    def column(x: torch.Tensor) -> np.ndarray:  # (T, N) -> episode-contiguous (M,)
        return x.T.numpy()[valid]

    return {"obs": obs[valid].astype(np.float32), "actions": column(batch.actions).astype(np.int64),
            "rewards": column(batch.rewards).astype(np.float32), "next_obs": next_obs[valid].astype(np.float32),
            "terminated": column(batch.terminated), "truncated": column(batch.truncated)}


def collect_dataset(quality: str, min_transitions: int, seed: int) -> OfflineDataset:
    """Play whole episodes of `quality`'s behaviour policy until at least `min_transitions` are
    collected. Batch k is played from a seed derived from (seed, quality, k); batch sizes depend
    only on the lengths already collected, so the dataset is a function of the arguments alone."""
    policy = behaviour_policy(quality)
    parts, returns, collected, k = [], [], 0, 0
    n_episodes = FIRST_BATCH_EPISODES
    while collected < min_transitions:
        batch_seed = derived_seed("collect", quality, seed, k)
        batch = play_episodes(policy, n_episodes, batch_seed)
        parts.append(transitions(batch))
        returns.append(batch.episode_returns)
        collected += len(parts[-1]["actions"])
        mean_length = collected / sum(len(r) for r in returns)
        n_episodes = max(1, math.ceil(0.5 * (min_transitions - collected) / mean_length))
        k += 1
    episode_returns = np.concatenate(returns).astype(np.float32)
    return OfflineDataset(**{key: np.concatenate([p[key] for p in parts]) for key in parts[0]},
                          episode_returns=episode_returns, behaviour_return=float(episode_returns.mean()))


def mc_returns(dataset: OfflineDataset, gamma: float) -> np.ndarray:
    """G_t = sum_{k>=0} gamma^k r_{t+k} within each episode of the data (no bootstrap): the discounted
    return beta actually obtained from (s_t, a_t). Near a truncation it is cut short, so compare
    learned Q-values with it at episode starts, where the cut-off tail weighs gamma^500."""
    dones = torch.from_numpy(dataset.episode_ends).double()
    return discounted_returns(torch.from_numpy(dataset.rewards).double(), dones, gamma).numpy()


def reachable_start_values(dataset: OfflineDataset, gamma: float, backups: Sequence[int]) -> np.ndarray:
    """For each K in `backups`, the mean over the data's episode starts of sum_{t<K} gamma^t r_t: the
    behaviour policy's value after K exact Bellman backups from Q = 0 (each backup adds one step of
    reward). A learner that copies its target network every `target_update_every` updates has made
    K = updates / target_update_every backups, so this, not the full G_0, is what its V_hat(s_0) can
    honestly reach. From the data's rewards alone:
        sum_{t<K} gamma^t r_t = G_0 - gamma^K G_K    (G_K = 0 when the episode ends before step K)."""
    g = mc_returns(dataset, gamma)  # one pass over the data for every K
    starts = dataset.episode_starts
    ends = np.append(starts[1:], len(dataset))  # one past each episode's last transition
    k = np.asarray(backups)[:, None]            # (len(backups), 1) against (episodes,)
    later = starts + k
    tail = np.where(later < ends, g[np.minimum(later, len(g) - 1)], 0.0)
    return (g[starts] - gamma ** k * tail).mean(-1)


# --- pieces every offline learner uses ------------------------------------------------------------
def q_network(hidden: int, seed: int) -> nn.Sequential:
    """s -> one output per action (Q-values, or logits of a behaviour-cloning model): 2 ReLU layers,
    initialised from `seed` without touching the global torch RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(OBS_DIM, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, N_ACTIONS))


def bc_loss(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Behaviour cloning by maximum likelihood: mean -log softmax(logits)[a_data]."""
    return nn.functional.cross_entropy(logits, actions)


@dataclass
class Minibatch:
    """B transitions drawn from a dataset, as tensors."""
    obs: torch.Tensor         # (B, 4)
    actions: torch.Tensor     # (B,) int64
    rewards: torch.Tensor     # (B,)
    next_obs: torch.Tensor    # (B, 4)
    terminated: torch.Tensor  # (B,) float: 1 where the bootstrap is cut off


class MinibatchSampler:
    """Uniform minibatches with replacement from a dataset held as tensors (converted once)."""

    def __init__(self, dataset: OfflineDataset):
        self.obs, self.next_obs = torch.from_numpy(dataset.obs), torch.from_numpy(dataset.next_obs)
        self.actions, self.rewards = torch.from_numpy(dataset.actions), torch.from_numpy(dataset.rewards)
        self.terminated = torch.from_numpy(dataset.terminated).float()

    def sample(self, batch_size: int, rng: np.random.Generator) -> Minibatch:
        idx = torch.from_numpy(rng.integers(0, len(self.actions), size=batch_size))
        return Minibatch(self.obs[idx], self.actions[idx], self.rewards[idx], self.next_obs[idx],
                         self.terminated[idx])


@torch.no_grad()
def start_value(q_net: nn.Module, starts: torch.Tensor) -> float:
    """mean over the data's episode starts of V_hat(s_0) = max_a Q(s_0, a): the return the greedy
    policy believes it will get, to compare with the data's Monte-Carlo returns and with 1/(1-gamma)."""
    return float(q_net(starts).max(-1).values.mean())


def greedy_returns(q_net: nn.Module, n_episodes: int, seed: int) -> np.ndarray:
    """Undiscounted returns of the greedy policy argmax_a q_net(s)[a] in the real environment."""
    return play_episodes(q_net, n_episodes, seed, greedy=True).episode_returns


MAX_EVALUATIONS = 100
"""evaluations per learner during training (updates // eval_every): points enough for a curve, and each
plays eval_episodes full episodes"""


def schedule_problems(cfg) -> list[str]:
    """Rules between the fields every offline learner's config has (dataset_size, batch_size, updates,
    target_update_every, eval_every): the part of its `Config.problems()` they share."""
    problems = []
    if cfg.batch_size > cfg.dataset_size:
        problems.append(f"batch_size={cfg.batch_size} exceeds dataset_size={cfg.dataset_size}: "
                        f"a minibatch would only repeat transitions")
    if cfg.target_update_every > cfg.updates:
        problems.append(f"target_update_every={cfg.target_update_every} exceeds updates={cfg.updates}: the "
                        f"target network would never be copied (0 backups for the value check to compare with)")
    if cfg.eval_every > cfg.updates:
        problems.append(f"eval_every={cfg.eval_every} exceeds updates={cfg.updates}: no evaluation during training")
    elif cfg.updates // cfg.eval_every > MAX_EVALUATIONS:
        problems.append(f"updates // eval_every = {cfg.updates // cfg.eval_every} evaluations per learner "
                        f"exceeds {MAX_EVALUATIONS}: use eval_every >= {-(-cfg.updates // MAX_EVALUATIONS)}")
    return problems
