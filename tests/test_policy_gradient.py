"""policy_gradient: reward-to-go on a hand-made episode batch, the REINFORCE loss gradient of a linear
softmax policy against its closed form, the weights (baseline, normalisation, padding) and the
solved-time bookkeeping. The toy preset and determinism are covered in tests/test_modules.py."""
from __future__ import annotations

import numpy as np
import torch

from core.rl.rollouts import EpisodeBatch
from post_train.alignment.policy_gradient.code.policy_gradient import (
    Config, policy_weights, reinforce_loss, reward_to_go, time_to_solve,
)


def hand_made_batch() -> EpisodeBatch:
    """Two columns (T=4): column 0 holds an episode of 3 steps (terminated) then one padding step;
    column 1 holds an episode of 4 steps cut by the time limit (truncated)."""
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.5], [4.0, 1.0], [0.0, 6.0]])
    terminated = torch.tensor([[False, False], [False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, False], [False, False], [False, True]])
    valid = torch.tensor([[True, True], [True, True], [True, True], [False, True]])
    return EpisodeBatch(obs=torch.zeros(4, 2, 4), actions=torch.zeros(4, 2, dtype=torch.long), rewards=rewards,
                        terminated=terminated, truncated=truncated, valid=valid, final_obs=torch.ones(2, 4))


def test_reward_to_go_matches_a_hand_computation():
    g = 0.9
    expected = torch.tensor([
        [1 + g * 3 + g**2 * 4, 2 + g * 0.5 + g**2 * 1 + g**3 * 6],
        [3 + g * 4,            0.5 + g * 1 + g**2 * 6],
        [4.0,                  1 + g * 6],
        [0.0,                  6.0],  # padding stays 0; a truncation is cut off like an end (no bootstrap)
    ])
    assert torch.allclose(reward_to_go(hand_made_batch(), g), expected)


def test_reinforce_loss_gradient_equals_the_closed_form_for_a_linear_softmax_policy():
    # pi(.|s) = softmax(W s): d log pi(a|s) / dW = (onehot(a) - pi(.|s)) s^T, so
    # dL/dW = -(1/N) sum_t w_t (onehot(a_t) - pi_t) s_t^T for L = -(1/N) sum_t log pi(a_t|s_t) w_t
    gen = torch.Generator().manual_seed(0)
    T, N, obs_dim, n_actions = 5, 2, 4, 3
    W = torch.randn(n_actions, obs_dim, generator=gen, dtype=torch.float64, requires_grad=True)
    obs = torch.randn(T, N, obs_dim, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, n_actions, (T, N), generator=gen)
    weights = torch.randn(T, N, generator=gen, dtype=torch.float64)
    reinforce_loss(obs @ W.T, actions, weights, N).backward()

    s, a, w = obs.reshape(-1, obs_dim).numpy(), actions.reshape(-1).numpy(), weights.reshape(-1).numpy()
    W_np = W.detach().numpy()
    closed_form = np.zeros_like(W_np)
    for s_t, a_t, w_t in zip(s, a, w):
        logits = W_np @ s_t
        pi = np.exp(logits - logits.max())
        pi /= pi.sum()
        closed_form -= w_t * np.outer(np.eye(n_actions)[a_t] - pi, s_t) / N
    np.testing.assert_allclose(W.grad.numpy(), closed_form, rtol=1e-10, atol=1e-12)


def test_policy_weights_subtract_the_baseline_mask_padding_and_carry_no_gradient():
    batch = hand_made_batch()
    returns = reward_to_go(batch, 0.9)
    baseline = torch.full_like(returns, 2.0, requires_grad=True)
    weights = policy_weights(returns, baseline, batch.valid, normalize=False)
    assert not weights.requires_grad
    assert torch.equal(weights, (returns - 2.0) * batch.valid)

    normalized = policy_weights(returns, baseline, batch.valid, normalize=True)
    valid = normalized[batch.valid]
    assert normalized[~batch.valid].abs().max() == 0  # padding contributes nothing to the loss
    assert valid.mean().abs() < 1e-6 and (valid.std() - 1).abs() < 1e-6  # standardised over real steps only


def test_time_to_solve():
    returns = np.array([10.0, 20.0, 30.0, 500.0, 500.0, 500.0])  # trailing means of 2: 15, 25, 265, 500, 500
    cfg = Config(final_episodes=2, solved_return=475)
    lengths = returns.astype(int)  # CartPole: one reward per step
    assert time_to_solve(returns, lengths, cfg) == (5.0, 10 + 20 + 30 + 500 + 500)
    assert all(np.isnan(time_to_solve(returns[:4], lengths[:4], cfg)))


def test_return_normalisation_also_learns(run_module):
    # the toy preset runs with normalize=false in tests/test_modules.py; this covers the other branch
    result = run_module("policy_gradient", "toy", ["normalize=true", "n_seeds=1"])
    assert result.passed, result.checks
    assert result.metrics["plain_final_return"] > 3 * result.metrics["random_return"]
