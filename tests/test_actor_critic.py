"""actor_critic: the A2C loss pieces against independent computations on hand-made tensors, the
truncation bootstrap on a hand-made rollout, a real SAME_STEP rollout's final observations, the
shared/separate networks and the solved-time bookkeeping. The toy preset and determinism are covered
in tests/test_modules.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from post_train.alignment.actor_critic.code.actor_critic import (
    ActorCritic, Config, EpisodeLog, a2c_losses, advantages_and_targets, collect_rollout, make_envs, steps_to_solve,
)


def test_a2c_loss_pieces_match_naive_loops():
    logits = torch.tensor([[[2.0, -1.0], [0.0, 0.0]], [[0.5, 1.5], [-3.0, 1.0]], [[1.0, 1.0], [0.2, -0.7]]])
    values = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    actions = torch.tensor([[0, 1], [1, 1], [0, 0]])
    advantages = torch.tensor([[0.5, -2.0], [1.0, 0.0], [-0.3, 4.0]])
    targets = torch.tensor([[1.5, 0.0], [1.5, -1.0], [2.7, 4.0]])
    policy_loss, value_loss, entropy = a2c_losses(logits, values, actions, advantages, targets)

    n, pl, vl, ent = 6, 0.0, 0.0, 0.0
    for t in range(3):
        for e in range(2):
            z = logits[t, e].tolist()
            probs = [math.exp(x) / sum(math.exp(y) for y in z) for x in z]
            pl -= math.log(probs[actions[t, e]]) * advantages[t, e].item() / n
            vl += (values[t, e].item() - targets[t, e].item()) ** 2 / n
            ent -= sum(p * math.log(p) for p in probs) / n
    assert policy_loss.item() == pytest.approx(pl, abs=1e-6)
    assert value_loss.item() == pytest.approx(vl, abs=1e-5)
    assert entropy.item() == pytest.approx(ent, abs=1e-6)
    assert entropy.item() <= math.log(2)


def test_a2c_policy_loss_does_not_train_through_the_advantage():
    logits = torch.zeros(2, 1, 2, requires_grad=True)
    values = torch.zeros(2, 1, requires_grad=True)
    advantages = torch.ones(2, 1, requires_grad=True)
    policy_loss, _, _ = a2c_losses(logits, values, torch.zeros(2, 1, dtype=torch.long), advantages.detach(),
                                   torch.zeros(2, 1))
    policy_loss.backward()
    assert values.grad is None and advantages.grad is None and logits.grad is not None


def test_truncation_is_bootstrapped_and_termination_is_not():
    """One env, T=5: steps 0-1 end with a truncation (time limit), steps 2-3 with a termination, step 4
    is mid-episode at the rollout end. Hand computation with gamma=0.9, lambda=0.5."""
    g, lam = 0.9, 0.5
    rewards = torch.ones(5, 1)
    values = torch.tensor([[2.0], [3.0], [1.0], [4.0], [5.0]])
    terminated = torch.tensor([[False], [False], [False], [True], [False]])
    truncated = torch.tensor([[False], [True], [False], [False], [False]])
    final_values = torch.tensor([[0.0], [10.0], [0.0], [7.0], [0.0]])  # V(real s_{t+1}) where step t ended
    last_value = torch.tensor([6.0])
    adv, targets = advantages_and_targets(rewards, terminated, truncated, values, final_values, last_value, g, lam)

    d4 = 1 + g * 6 - 5             # rollout end: bootstrap on V(s_T)
    d3 = 1 - 4                     # termination: no bootstrap (its final value 7 must be ignored)
    d2 = 1 + g * 4 - 1
    d1 = 1 + g * 10 - 3            # truncation: bootstrap on V(s_final), not on V(s_2) = the reset state
    d0 = 1 + g * 3 - 2
    expected = torch.tensor([[d0 + g * lam * d1], [d1], [d2 + g * lam * d3], [d3], [d4]])
    assert torch.allclose(adv, expected)
    assert torch.allclose(targets, expected + values)


def test_a_step_both_terminated_and_truncated_counts_as_terminated():
    args = dict(rewards=torch.ones(1, 1), values=torch.zeros(1, 1), final_values=torch.tensor([[50.0]]),
                last_value=torch.zeros(1), gamma=0.9, lam=1.0)
    both = advantages_and_targets(terminated=torch.tensor([[True]]), truncated=torch.tensor([[True]]), **args)[0]
    assert both.item() == 1.0


def test_same_step_rollout_stores_the_real_final_observation():
    # A random policy on CartPole ends many episodes in 200 steps; every terminal state recorded must lie
    # outside the termination bounds (|x| > 2.4 or |theta| > 12 degrees), which a freshly reset state
    # (all components within +-0.05) never does.
    torch.manual_seed(0)
    envs = make_envs(4)
    obs, _ = envs.reset(seed=0)
    episodes = EpisodeLog(4)
    rollout = collect_rollout(envs, ActorCritic(8, shared=False), obs, 200, episodes)
    envs.close()
    ended = rollout.terminated | rollout.truncated
    assert rollout.terminated.sum() >= 5 and not rollout.truncated.any()
    final = rollout.final_obs[ended]
    assert ((final[:, 0].abs() > 2.4) | (final[:, 2].abs() > 12 * 2 * math.pi / 360)).all()
    assert rollout.final_obs[~ended].abs().max() == 0
    # the observation after an episode end is the next episode's start
    after = rollout.obs[1:][ended[:-1]]
    assert after.abs().max() <= 0.05
    assert len(episodes.returns) == int(ended.sum()) and sum(episodes.returns) <= 4 * 200


@pytest.mark.parametrize("shared", [False, True])
def test_shared_network_shares_exactly_the_torso(shared):
    net = ActorCritic(16, shared)
    n_torso = sum(p.numel() for p in net.actor_torso.parameters())
    n_heads = sum(p.numel() for p in (*net.policy_head.parameters(), *net.value_head.parameters()))
    assert sum(p.numel() for p in net.parameters()) == n_heads + n_torso * (1 if shared else 2)
    logits, values = net(torch.zeros(3, 5, 4))
    assert logits.shape == (3, 5, 2) and values.shape == (3, 5)


def test_steps_to_solve_uses_the_trailing_window():
    episodes = EpisodeLog(1)
    episodes.returns = [100.0, 480.0, 470.0, 490.0]
    episodes.finished_at = [100, 580, 1050, 1540]
    assert steps_to_solve(episodes, Config(final_episodes=2, solved_return=475)) == 1050  # (480 + 470) / 2 = 475
    assert steps_to_solve(episodes, Config(final_episodes=2, solved_return=476)) == 1540  # (470 + 490) / 2 = 480
    assert np.isnan(steps_to_solve(episodes, Config(final_episodes=2, solved_return=490)))
