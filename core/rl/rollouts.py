"""RL helpers shared by the policy-gradient family (advantage, actor-critic, PPO, RLHF).

Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eq. 16):

    delta_t   = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)              (one-step TD error)
    A_t       = sum_{l>=0} (gamma * lambda)^l * delta_{t+l}                   (within the episode)
              = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}             (backward recursion)
    R_t       = A_t + V(s_t)                                                  (the value target)

lambda = 0 gives the one-step TD error (low variance, biased by V's errors); lambda = 1 gives the
Monte-Carlo return minus V(s_t) (unbiased for the policy gradient, high variance).

`play_episodes` collects batches of complete episodes from a discrete-action gymnasium env, the
unit of data of Monte-Carlo policy-gradient learners (REINFORCE and the advantage study).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn


def derived_seed(*keys: int | str) -> int:
    """A seed that depends only on `keys`, e.g. ("train", cfg.seed, learner, update): every phase of
    a run draws its own reproducible randomness, so no RNG state has to cross a phase boundary (and a
    checkpoint need not carry one)."""
    ints = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def first_solved_episode(returns, threshold: float, window: int) -> int | None:
    """How many episodes were played when the mean return of the last `window` episodes first
    reached `threshold` (CartPole-v1 counts as solved at 475 over 100, here any window); None if never."""
    returns = np.asarray(returns, dtype=float)
    if len(returns) < window:
        return None
    trailing = np.convolve(returns, np.ones(window) / window, mode="valid")  # trailing[j]: episodes j..j+window-1
    reached = np.flatnonzero(trailing >= threshold)
    return int(reached[0]) + window if reached.size else None


@torch.no_grad()  # advantages and targets are constants in the losses that use them
def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and value targets for a rollout of T steps (any trailing batch shape).

    rewards, values, dones: (T, *B). values[t] = V(s_t); last_value: (*B) = V(s_T), the state after
    the last step. dones[t] = 1 when the episode ended with step t: nothing after t is bootstrapped
    or propagated back across the boundary.

    A time-limit truncation is not a true end: add gamma * V(s_final) to that step's reward and set
    its done flag, so the return is cut off but the tail is still estimated.

    Inputs are promoted to a floating type (integer rewards are fine); no gradient flows through
    the outputs, so a loss cannot train the critic through its own advantage targets.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values, last_value = rewards.to(dtype), values.to(dtype), last_value.to(dtype)
    not_done = 1.0 - dones.to(dtype)
    next_values = torch.cat([values[1:], last_value.unsqueeze(0)], dim=0)
    deltas = rewards + gamma * next_values * not_done - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.shape[0])):  # O(T), vectorised over the batch dims
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_{t+1} within each episode (no bootstrap): GAE with
    lambda = 1 and V = 0."""
    zeros = torch.zeros_like(rewards)
    return gae(rewards, zeros, dones, zeros[0], gamma, 1.0)[0]


# --- batches of complete episodes ----------------------------------------------------------------
@dataclass
class EpisodeBatch:
    """Time-major (T, N): N complete episodes padded to the longest, T steps."""
    obs: torch.Tensor         # (T, N, obs_dim) s_t
    actions: torch.Tensor     # (T, N)    a_t
    rewards: torch.Tensor     # (T, N)    r_t (0 on padding)
    terminated: torch.Tensor  # (T, N)    a true end with step t: V(s_{t+1}) = 0
    truncated: torch.Tensor   # (T, N)    the time limit cut the episode with step t (and it did not end)
    valid: torch.Tensor       # (T, N)    step t belongs to the episode
    final_obs: torch.Tensor   # (N, obs_dim) the state after the last step (bootstrap of a truncation)

    @property
    def dones(self) -> torch.Tensor:
        """Nothing is propagated across an episode end, nor out of the padding."""
        return (self.terminated | self.truncated | ~self.valid).float()

    @property
    def episode_returns(self) -> np.ndarray:
        return self.rewards.sum(0).numpy()


@torch.no_grad()
def play_episodes(policy: Callable[[torch.Tensor], torch.Tensor] | None, n_episodes: int, seed: int,
                  env_id: str = "CartPole-v1", greedy: bool = False) -> EpisodeBatch:
    """Play `n_episodes` complete episodes in parallel, sampling actions from softmax(policy(s))
    (None: uniformly random), or taking argmax policy(s) when `greedy` (policy may then output
    logits or Q-values alike). One sub-env per episode, all reset once from `seed`, so no env state
    crosses batches and the batch is a function of (policy, seed) alone; a sub-env that finished
    keeps stepping (it auto-resets) but those steps are masked out."""
    env_seed, action_seed = np.random.SeedSequence(seed).generate_state(2)
    rng = np.random.default_rng(action_seed)
    envs = gym.make_vec(env_id, num_envs=n_episodes, vectorization_mode="vector_entry_point")
    n_actions = int(envs.single_action_space.n)
    obs, _ = envs.reset(seed=int(env_seed))
    finished = np.zeros(n_episodes, dtype=bool)
    final_obs = np.zeros_like(obs)
    steps = []
    while not finished.all():
        if policy is None:
            probs = np.full((n_episodes, n_actions), 1.0 / n_actions)
        elif greedy:
            probs = nn.functional.one_hot(policy(torch.from_numpy(obs)).argmax(-1), n_actions).double().numpy()
        else:
            probs = torch.softmax(policy(torch.from_numpy(obs)), dim=-1).numpy()
        # inverse-CDF sampling with our own generator: reproducible from `seed` alone
        actions = (rng.random((n_episodes, 1)) > probs.cumsum(1)[:, :-1]).sum(1)
        next_obs, reward, terminated, truncated, _ = envs.step(actions)
        alive = ~finished
        # a pole that falls on the last allowed step is an end: the time limit only truncates the rest
        steps.append((obs, actions, reward * alive, terminated & alive, truncated & ~terminated & alive, alive))
        ended = (terminated | truncated) & alive
        final_obs[ended] = next_obs[ended]
        finished |= ended
        obs = next_obs
    envs.close()
    columns = [torch.from_numpy(np.stack(c)) for c in zip(*steps)]
    return EpisodeBatch(*columns, final_obs=torch.from_numpy(final_obs))
