"""RL helpers shared by the policy-gradient family (advantage, actor-critic, PPO, RLHF).

Generalised Advantage Estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using
Generalized Advantage Estimation", eq. 16):

    delta_t   = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)              (one-step TD error)
    A_t       = sum_{l>=0} (gamma * lambda)^l * delta_{t+l}                   (within the episode)
              = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}             (backward recursion)
    R_t       = A_t + V(s_t)                                                  (the value target)

lambda = 0 gives the one-step TD error (low variance, biased by V's errors); lambda = 1 gives the
Monte-Carlo return minus V(s_t) (unbiased for the policy gradient, high variance).
"""
from __future__ import annotations

import torch


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
