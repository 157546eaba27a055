"""advantage: estimator values on hand-made episodes, the per-episode policy gradient against a closed
form, rollouts. The toy preset, determinism and exact resume are covered in tests/test_modules.py."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from core.rl.rollouts import EpisodeBatch, gae, play_episodes
from post_train.rl_basics.advantage.code.advantage import (
    Config, estimate_advantages, n_step_advantages, per_episode_gradients, per_step_logp_grads,
    td_errors,
)

def one_column_batch(rewards, terminated, truncated=None, valid=None, final_obs=0.0) -> EpisodeBatch:
    """A batch with a single column (N=1) holding the given per-step flags."""
    T = len(rewards)
    column = lambda xs, dtype: torch.tensor(xs, dtype=dtype).reshape(T, 1)  # noqa: E731
    return EpisodeBatch(
        obs=torch.zeros(T, 1, 4), actions=torch.zeros(T, 1, dtype=torch.long),
        rewards=column(rewards, torch.float32), terminated=column(terminated, torch.bool),
        truncated=column(truncated or [False] * T, torch.bool), valid=column(valid or [True] * T, torch.bool),
        final_obs=torch.full((1, 4), final_obs))


def test_reward_to_go_and_baseline_on_hand_made_episodes():
    # two episodes in one column: rewards 1,2,3 (ends) then 4,5 (ends); gamma = 0.5
    batch = one_column_batch([1, 2, 3, 4, 5], [False, False, True, False, True])
    cfg = Config(gamma=0.5)
    values = torch.tensor([[0.5], [1.0], [1.5], [2.0], [2.5]])
    expected = torch.tensor([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 4 + 0.5 * 5, 5]).reshape(5, 1)
    final = torch.zeros(1)
    assert torch.allclose(estimate_advantages("mc", batch, values, final, cfg), expected)
    assert torch.allclose(estimate_advantages("baseline", batch, values, final, cfg), expected - values)


def naive_n_step(rewards, values, dones, last_value, gamma, n):
    """sum_{k<m} gamma^k r_{t+k} + gamma^m V(s_{t+m}) - V(s_t), m = steps until the episode end
    (no bootstrap), n, or the rollout end (bootstrap on last_value)."""
    T = len(rewards)
    out = []
    for t in range(T):
        ret, k = 0.0, 0
        while True:
            ret += gamma ** k * rewards[t + k]
            k += 1
            if dones[t + k - 1]:
                break
            if k == n or t + k == T:
                ret += gamma ** k * (values[t + k] if t + k < T else last_value)
                break
        out.append(ret - values[t])
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_n_step_matches_naive_with_episode_end_inside_the_window(n):
    rewards = [1.0, 0.5, 2.0, -1.0, 3.0, 0.25, 1.5]
    values = [0.3, -0.2, 0.8, 1.1, 0.4, -0.5, 0.9]
    dones = [0, 0, 1, 0, 0, 0, 0]  # an episode ends at t=2; the rollout stops mid-episode at T=7
    last_value, gamma = 0.7, 0.9
    got = n_step_advantages(torch.tensor(rewards).unsqueeze(1), torch.tensor(values).unsqueeze(1),
                            torch.tensor(dones, dtype=torch.float32).unsqueeze(1), torch.tensor([last_value]), gamma, n)
    want = naive_n_step(rewards, values, dones, last_value, gamma, n)
    assert torch.allclose(got.squeeze(1), torch.tensor(want), atol=1e-6)


def test_td0_is_gae_lambda_0_and_n_step_1_and_long_n_step_is_return_minus_baseline():
    g = torch.Generator().manual_seed(0)
    T, N, gamma = 12, 3, 0.95
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = (torch.rand(T, N, generator=g) < 0.25).float()
    dones[-1] = 1.0  # complete episodes, as in the module
    last_value = torch.zeros(N)
    td = td_errors(rewards, values, dones, last_value, gamma)
    assert torch.allclose(td, gae(rewards, values, dones, last_value, gamma, 0.0)[0], atol=1e-6)
    assert torch.allclose(td, n_step_advantages(rewards, values, dones, last_value, gamma, 1), atol=1e-6)
    returns = gae(rewards, torch.zeros_like(values), dones, last_value, gamma, 1.0)[0]
    assert torch.allclose(n_step_advantages(rewards, values, dones, last_value, gamma, T), returns - values, atol=1e-5)


def test_time_limit_truncation_is_bootstrapped_only_by_critic_estimators():
    cfg = Config(gamma=0.5)
    batch = one_column_batch([1.0, 1.0], [False, False], truncated=[False, True], final_obs=1.0)
    values, final = torch.tensor([[2.0], [4.0]]), torch.tensor([6.0])
    # td0 at the truncated step: r + gamma * V(s_final) - V(s) = 1 + 3 - 4
    assert estimate_advantages("td0", batch, values, final, cfg)[1, 0].item() == pytest.approx(0.0)
    # REINFORCE uses sampled rewards only: G_1 = 1
    assert estimate_advantages("mc", batch, values, final, cfg)[1, 0].item() == pytest.approx(1.0)


def test_per_episode_gradient_of_a_linear_softmax_policy_matches_the_closed_form():
    # pi(a|s) = softmax(W s)_a  =>  grad_W log pi(a|s) = (onehot(a) - pi(.|s)) s^T
    g = torch.Generator().manual_seed(1)
    policy = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        policy.weight.copy_(torch.randn(2, 4, generator=g))
    obs, actions = torch.randn(7, 4, generator=g), torch.randint(0, 2, (7,), generator=g)
    advantages = torch.randn(7, generator=g)
    episode = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    got = per_episode_gradients(per_step_logp_grads(policy, obs, actions), advantages, episode, 3)
    probs = torch.softmax(obs @ policy.weight.T, -1).detach()
    per_step = (nn.functional.one_hot(actions, 2) - probs).unsqueeze(2) * obs.unsqueeze(1)  # (7, 2, 4)
    want = torch.zeros(3, 2, 4).index_add_(0, episode, per_step * advantages[:, None, None]).reshape(3, 8)
    assert torch.allclose(got.float(), want, atol=1e-5)


def test_rollout_plays_complete_reproducible_episodes():
    batch = play_episodes(None, 8, seed=3)
    lengths = batch.valid.sum(0)
    # valid steps are a prefix of each column, each ending with exactly one episode end
    assert torch.equal(batch.valid, torch.arange(batch.valid.shape[0]).unsqueeze(1) < lengths)
    assert torch.equal((batch.terminated | batch.truncated).sum(0), torch.ones(8, dtype=torch.long))
    assert np.array_equal(batch.episode_returns, lengths.numpy())  # CartPole pays +1 per step
    # a terminated episode's final state is outside the allowed cart position / pole angle
    x, theta = batch.final_obs[:, 0], batch.final_obs[:, 2]
    assert bool(((x.abs() > 2.4) | (theta.abs() > 12 * np.pi / 180)).all())
    again = play_episodes(None, 8, seed=3)
    assert torch.equal(batch.obs, again.obs) and torch.equal(batch.actions, again.actions)
