"""ppo: the loss pieces against independent computations on hand-made tensors, the rollout storage
(auto-reset steps masked, truncations bootstrapped) and the solved criterion. The toy preset and its
determinism are covered in tests/test_modules.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from post_train.alignment.ppo.code.ppo import (
    Episode, Rollout, VectorRunner, approx_kl, categorical_entropy, clipped_surrogate_loss,
    clipped_value_loss, normalize, steps_to_solved,
)

EPS = 0.2
# ratios below, inside and above [1 - eps, 1 + eps], each with a positive and a negative advantage
RATIOS = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5] * 2, dtype=torch.float64)
ADVANTAGES = torch.tensor([2.0] * 5 + [-3.0] * 5, dtype=torch.float64)


def test_clipped_surrogate_picks_the_pessimistic_term_and_zeroes_the_clipped_gradients():
    old_logp = torch.linspace(-2.0, -0.1, len(RATIOS), dtype=torch.float64)
    logp = (old_logp + RATIOS.log()).requires_grad_()
    loss = clipped_surrogate_loss(logp, old_logp, ADVANTAGES, EPS)
    loss.backward()

    # Independently: with A > 0 the objective is min(r, 1 + eps) A (only a rising ratio is capped);
    # with A < 0 it is max(r, 1 - eps) A (only a falling ratio is capped).
    r, a, n = RATIOS.tolist(), ADVANTAGES.tolist(), len(RATIOS)
    objective = [min(ri, 1 + EPS) * ai if ai > 0 else max(ri, 1 - EPS) * ai for ri, ai in zip(r, a)]
    assert loss.item() == pytest.approx(-sum(objective) / n)

    # d(-r A / n) / d log pi = -r A / n where the unclipped term is chosen, 0 where the clip is active
    capped = [(ai > 0 and ri > 1 + EPS) or (ai < 0 and ri < 1 - EPS) for ri, ai in zip(r, a)]
    expected_grad = [0.0 if c else -ri * ai / n for ri, ai, c in zip(r, a, capped)]
    assert capped == [False, False, False, False, True, True, False, False, False, False]
    assert logp.grad.tolist() == pytest.approx(expected_grad)
    # the pessimistic bound keeps the gradient where the ratio moved the WRONG way for its advantage
    assert logp.grad[0] != 0 and logp.grad[9] != 0


def test_clipped_surrogate_equals_the_policy_gradient_loss_at_ratio_one():
    logp = torch.tensor([-0.3, -1.2, -0.7], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    clipped_surrogate_loss(logp, logp.detach(), advantages, EPS).backward()
    # at theta = theta_old, grad L^CLIP = grad of E[log pi * A]: the vanilla policy gradient
    assert torch.allclose(logp.grad, -advantages / 3)


def test_value_clipping_against_a_hand_computation():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    values = torch.tensor([0.5, 3.0, 1.8, -2.0], requires_grad=True)
    returns = torch.tensor([1.0, 1.5, 2.0, 1.0])
    # clip c = 1: clipped values 0.5, 1.0, 1.0, -1.0
    # squared errors unclipped: 0.25, 2.25, 0.04, 9.0;  clipped: 0.25, 0.25, 1.0, 4.0
    # max per sample:            0.25, 2.25, 1.0 (clipped wins), 9.0
    loss = clipped_value_loss(values, old, returns, 1.0)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 2.25 + 1.0 + 9.0) / 4)
    loss.backward()
    # where the clipped error wins, V_old + clip(...) is constant in V: no gradient (sample 2);
    # elsewhere d/dV of 0.5 (V - R)^2 / 4 = (V - R) / 4
    assert values.grad.tolist() == pytest.approx([(0.5 - 1.0) / 4, (3.0 - 1.5) / 4, 0.0, (-2.0 - 1.0) / 4])
    assert clipped_value_loss(values, old, returns, None).item() == pytest.approx(0.5 * (0.25 + 2.25 + 0.04 + 9.0) / 4)


def test_categorical_entropy_is_minus_sum_p_log_p():
    logits = torch.tensor([[0.0, 0.0], [2.0, -1.0], [10.0, -10.0], [0.3, 0.1]], dtype=torch.float64)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    expected = -(p * np.log(p)).sum(1)
    assert categorical_entropy(logits).numpy() == pytest.approx(expected)
    assert categorical_entropy(logits)[0].item() == pytest.approx(math.log(2))  # uniform: the maximum


def test_approx_kl_is_nonnegative_zero_at_equality_and_unbiased_for_the_exact_kl():
    log_ratios = torch.linspace(-3, 3, 61, dtype=torch.float64)
    per_sample = [approx_kl(lr.reshape(1), torch.zeros(1, dtype=torch.float64)).item() for lr in log_ratios]
    assert min(per_sample) >= 0.0                                      # (r - 1) - log r >= 0 for every r
    assert approx_kl(torch.tensor([-0.4, -1.1]), torch.tensor([-0.4, -1.1])).item() == 0.0

    p_old, p_new = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
    exact = float((p_old * (p_old / p_new).log()).sum())              # KL(pi_old || pi)
    actions = torch.multinomial(p_old, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = approx_kl(p_new.log()[actions], p_old.log()[actions]).item()
    assert estimate == pytest.approx(exact, rel=0.03)


def test_advantage_normalisation_works_per_minibatch():
    advantages = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    for minibatch in (advantages[:3], advantages[3:]):
        normed = normalize(minibatch)
        assert normed.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert normed.std().item() == pytest.approx(1.0, abs=1e-6)
    # each minibatch is centred and scaled by its own statistics: both halves map to (-1, 0, 1)
    assert normalize(advantages[:3]).tolist() == pytest.approx(normalize(advantages[3:]).tolist())
    assert not torch.allclose(normalize(advantages)[:3], normalize(advantages[:3]))


def hand_made_rollout(terminated, truncated, values, last_value, rewards=None) -> Rollout:
    T, N = len(values), len(values[0])
    as_bool = lambda x: torch.tensor(x, dtype=torch.bool)  # noqa: E731
    return Rollout(obs=torch.zeros(T, N, 4), actions=torch.zeros(T, N, dtype=torch.long), logp=torch.zeros(T, N),
                   values=torch.tensor(values), rewards=torch.tensor(rewards or [[1.0] * N] * T),
                   terminated=as_bool(terminated), truncated=as_bool(truncated),
                   valid=torch.ones(T, N, dtype=torch.bool), last_value=torch.tensor(last_value))


def test_truncation_bootstraps_the_real_final_state_and_termination_does_not():
    # column 0: the time limit hits with step 1; column 1: the pole falls with step 1. Row 2 is the
    # masked reset step, whose state is the real final observation: values[2] = V(s_final).
    values = [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]
    rollout = hand_made_rollout(terminated=[[False, False], [False, True], [False, False]],
                                truncated=[[False, False], [True, False], [False, False]],
                                values=values, last_value=[8.0, 8.0])
    gamma = 0.9
    adv, returns = rollout.advantages_and_returns(gamma, lam=0.0)
    assert adv[1, 0].item() == pytest.approx(1.0 + gamma * 7.0 - 6.0)   # r + gamma V(s_final) - V(s)
    assert adv[1, 1].item() == pytest.approx(1.0 - 6.0)                 # r - V(s): nothing after the end
    assert adv[0].tolist() == pytest.approx([1.0 + gamma * 6.0 - 5.0] * 2)
    assert torch.allclose(returns, adv + torch.tensor(values))
    # lambda = 1: the return of step 0 stops at the episode end (the reset step's data never leaks back)
    adv1, _ = rollout.advantages_and_returns(gamma, lam=1.0)
    assert adv1[0].tolist() == pytest.approx([1 + gamma * (1 + gamma * 7.0) - 5.0, 1 + gamma * 1 - 5.0])


def test_a_fall_on_the_last_allowed_step_is_an_end_not_a_truncation():
    # CartPole's time limit also sets `truncated` when the pole falls on step 500: terminated wins
    rollout = hand_made_rollout(terminated=[[True]], truncated=[[True]], values=[[6.0]], last_value=[7.0])
    adv, _ = rollout.advantages_and_returns(gamma=0.9, lam=0.95)
    assert adv[0, 0].item() == pytest.approx(1.0 - 6.0)


class AlwaysRight(torch.nn.Module):
    """A policy that (almost) always pushes right, so episodes end within ~10 steps; V = 0."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tensor([-20.0, 20.0]).expand(len(obs), 2)


def test_rollout_masks_the_auto_reset_step_and_keeps_the_real_final_observation():
    runner = VectorRunner(num_envs=3, seed=0)
    rng = np.random.default_rng(0)
    critic = lambda obs: torch.zeros(len(obs), 1)  # noqa: E731
    rollout, episodes = runner.collect(AlwaysRight(), critic, 40, rng)
    done = (rollout.terminated | rollout.truncated).numpy()
    valid = rollout.valid.numpy()
    assert done.sum() >= 6                                                      # several episodes per sub-env
    assert valid[0].all() and (valid[1:] == ~done[:-1]).all()                   # the step after an end is masked
    assert (rollout.rewards.numpy()[~valid] == 0).all() and not done[~valid].any()
    theta_limit = 12 * 2 * math.pi / 360
    for t, i in zip(*np.nonzero(done[:-2])):
        final_obs = rollout.obs[t + 1, i].numpy()                               # state of the masked step
        assert abs(final_obs[0]) > 2.4 or abs(final_obs[2]) > theta_limit       # the real terminal state
        assert (np.abs(rollout.obs[t + 2, i].numpy()) <= 0.05).all()            # a fresh reset state
    # recorded episodes count only valid steps; every valid step belongs to exactly one episode (+ the open ones)
    assert all(e.ret == e.length for e in episodes)
    assert sum(e.length for e in episodes) + runner.episode_length.sum() == valid.sum()
    flat = rollout.flatten_valid(advantages=torch.zeros(40, 3))
    assert len(flat["obs"]) == len(flat["advantages"]) == valid.sum()
    # the mask carries across rollouts: an episode ending with the last step masks the next rollout's first
    next_rollout, _ = runner.collect(AlwaysRight(), critic, 5, rng)
    assert (next_rollout.valid[0].numpy() == ~done[-1]).all()
    runner.close()


def test_steps_to_solved_is_the_first_step_where_the_moving_mean_reaches_the_threshold():
    returns = [100, 480, 490, 500, 470, 500, 500]
    episodes = [Episode(end_step=1000 * (k + 1), ret=r, length=r) for k, r in enumerate(returns)]
    # means of 3: 356.7, 490, 486.7, 490 -> first >= 475 after episode 3 (480, 490, 500)
    assert steps_to_solved(episodes, 475, 3) == 4000
    assert math.isnan(steps_to_solved(episodes[:3], 475, 3))
    assert math.isnan(steps_to_solved(episodes, 501, 3))
