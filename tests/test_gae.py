"""GAE: the shared core.rl.gae / discounted_returns against hand computations and a naive O(T^2)
definition, then the gae module's exact MDP quantities, its statistics and its presets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import read_metrics
from core.rl.rollouts import discounted_returns, gae
from post_train.rl_basics.gae.code.gae import (Config, exact_values, expected_gae_bias, gae_advantages, pair_stats,
                                               policy_transition, random_mdp, rollout)

F64 = torch.float64


def naive_gae(rewards, values, dones, last_value, gamma, lam):
    """A_t = sum_l (gamma lambda)^l delta_{t+l}, summed term by term until the episode's end (O(T^2)),
    for one trajectory given as python lists."""
    T = len(rewards)
    next_values = list(values[1:]) + [last_value]
    deltas = [rewards[t] + gamma * next_values[t] * (1 - dones[t]) - values[t] for t in range(T)]
    advantages = []
    for t in range(T):
        total = 0.0
        for l in range(T - t):
            total += (gamma * lam) ** l * deltas[t + l]
            if dones[t + l]:
                break
        advantages.append(total)
    return advantages


def naive_gae_batch(rewards, values, dones, last_value, gamma, lam):
    """naive_gae over every trailing batch index of (T, *B) tensors."""
    out = torch.zeros_like(values)
    for idx in np.ndindex(*rewards.shape[1:]):
        column = (slice(None), *idx)
        out[column] = torch.tensor(naive_gae(rewards[column].tolist(), values[column].tolist(),
                                             dones[column].float().tolist(), last_value[idx].item(), gamma, lam),
                                   dtype=values.dtype)
    return out


def random_rollout(T, batch, done_prob, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(T, *batch, generator=g, dtype=F64)
    values = torch.randn(T, *batch, generator=g, dtype=F64)
    dones = torch.rand(T, *batch, generator=g) < done_prob
    last_value = torch.randn(*batch, generator=g, dtype=F64)
    return rewards, values, dones, last_value


# --- core.rl.gae ----------------------------------------------------------------------------------
def test_lambda_zero_is_the_one_step_td_error():
    rewards, values, dones, last_value = random_rollout(12, (3,), 0.3, seed=0)
    gamma = 0.9
    adv, _ = gae(rewards, values, dones, last_value, gamma, lam=0.0)
    for t in range(12):
        v_next = values[t + 1] if t < 11 else last_value
        delta = rewards[t] + gamma * v_next * (~dones[t]).double() - values[t]
        torch.testing.assert_close(adv[t], delta, rtol=0, atol=1e-12)
    assert adv.dtype == F64 and adv.shape == (12, 3)


def test_lambda_one_with_zero_values_is_the_reward_to_go_within_each_episode():
    # column 0: episode ends after step 2, then a second episode (steps 3, 4) cut off with V = 0
    # column 1: one episode over all five steps, ending with a done
    rewards = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0], [5.0, 1.0]], dtype=F64)
    dones = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 0], [0, 1]])
    zeros = torch.zeros_like(rewards)
    adv, targets = gae(rewards, zeros, dones, zeros[0], gamma=0.5, lam=1.0)
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 1 + 0.5 + 0.25 + 0.125 + 0.0625],
                             [2 + 0.5 * 3, 1 + 0.5 + 0.25 + 0.125],
                             [3.0, 1 + 0.5 + 0.25],
                             [4 + 0.5 * 5, 1 + 0.5],
                             [5.0, 1.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(targets, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(discounted_returns(rewards, dones, 0.5), expected, rtol=0, atol=1e-12)


def test_a_done_stops_propagation_of_later_rewards():
    rewards, values, _, last_value = random_rollout(10, (2,), 0.0, seed=1)
    dones = torch.zeros(10, 2, dtype=torch.bool)
    dones[4] = True                                               # boundary after step 4 in both columns
    before, _ = gae(rewards, values, dones, last_value, 0.99, 0.95)
    changed = rewards.clone()
    changed[5:] += 100.0                                          # only rewards after the boundary move
    after, _ = gae(changed, values, dones, last_value, 0.99, 0.95)
    torch.testing.assert_close(after[:5], before[:5], rtol=0, atol=0)
    assert (after[5:] - before[5:]).abs().min() > 1.0             # ... and the later steps do see them
    without_done, _ = gae(changed, values, torch.zeros_like(dones), last_value, 0.99, 0.95)
    assert (without_done[:5] - before[:5]).abs().min() > 1.0      # without the done they would leak back


@pytest.mark.parametrize("gamma, lam", [(0.99, 0.95), (0.9, 0.5), (1.0, 1.0), (0.8, 0.0)])
def test_matches_the_naive_definition_with_boundaries_and_a_batch(gamma, lam):
    rewards, values, dones, last_value = random_rollout(40, (5,), 0.15, seed=2)
    assert dones.sum(0).min() >= 2, "want several episode boundaries in every column"
    assert not dones[-1].all(), "want some columns that bootstrap from last_value"
    adv, targets = gae(rewards, values, dones, last_value, gamma, lam)
    torch.testing.assert_close(adv, naive_gae_batch(rewards, values, dones, last_value, gamma, lam),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(targets, adv + values, rtol=0, atol=0)
    assert adv.dtype == F64 and targets.shape == (40, 5)


def test_any_trailing_batch_shape_and_bool_or_float_dones():
    rewards, values, dones, last_value = random_rollout(15, (2, 3), 0.2, seed=3)
    adv_bool, _ = gae(rewards, values, dones, last_value, 0.97, 0.9)
    adv_float, _ = gae(rewards, values, dones.double(), last_value, 0.97, 0.9)
    torch.testing.assert_close(adv_bool, naive_gae_batch(rewards, values, dones, last_value, 0.97, 0.9),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv_float, adv_bool, rtol=0, atol=0)


def test_time_limit_trick_equals_splitting_the_rollout_and_bootstrapping():
    """Step 3 hits a time limit in state s_final (not a true end): adding gamma V(s_final) to its
    reward and setting done must equal running GAE on the cut segment with last_value = V(s_final)."""
    rewards, values, _, last_value = random_rollout(8, (1,), 0.0, seed=4)
    v_final = torch.tensor([2.5], dtype=F64)
    gamma, lam = 0.95, 0.9
    dones = torch.zeros(8, 1)
    dones[3] = 1.0
    patched = rewards.clone()
    patched[3] += gamma * v_final
    adv, _ = gae(patched, values, dones, last_value, gamma, lam)
    first, _ = gae(rewards[:4], values[:4], torch.zeros(4, 1), v_final, gamma, lam)
    second, _ = gae(rewards[4:], values[4:], torch.zeros(4, 1), last_value, gamma, lam)
    torch.testing.assert_close(adv, torch.cat([first, second]), rtol=1e-12, atol=1e-12)


def test_discounted_returns_by_hand():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 3.0], dtype=F64)
    dones = torch.tensor([0, 0, 1, 0, 1])
    g = 0.9
    expected = torch.tensor([1 + g * 0 + g * g * 2, 0 + g * 2, 2.0, 1 + g * 3, 3.0], dtype=F64)
    torch.testing.assert_close(discounted_returns(rewards, dones, g), expected, rtol=0, atol=1e-12)


# --- the module's exact quantities ------------------------------------------------------------------
@pytest.fixture
def mdp_and_cfg():
    cfg = Config(n_envs=500, horizon=32)
    return random_mdp(cfg), cfg


def test_exact_values_satisfy_the_bellman_equations(mdp_and_cfg):
    mdp, cfg = mdp_and_cfg
    V, Q = exact_values(mdp, cfg.gamma)
    S, A = mdp.R.shape
    for s in range(S):
        # V(s) = sum_a pi(a|s) [r(s,a) + gamma sum_s' P(s'|s,a) V(s')], written out element by element
        backup = sum(mdp.pi[s, a] * (mdp.R[s, a] + cfg.gamma * sum(mdp.P[s, a, s2] * V[s2] for s2 in range(S)))
                     for a in range(A))
        assert V[s] == pytest.approx(backup, abs=1e-10)
        assert V[s] == pytest.approx(mdp.pi[s] @ Q[s], abs=1e-10)   # V = E_a~pi[Q]
        for a in range(A):                                            # Q Bellman equation, in Q only
            q_backup = mdp.R[s, a] + cfg.gamma * sum(mdp.P[s, a, s2] * mdp.pi[s2] @ Q[s2] for s2 in range(S))
            assert Q[s, a] == pytest.approx(q_backup, abs=1e-10)
    V_iter = np.zeros(S)                                              # iterative policy evaluation agrees
    for _ in range(2000):
        V_iter = (mdp.pi * (mdp.R + cfg.gamma * mdp.P @ V_iter)).sum(axis=1)
    np.testing.assert_allclose(V_iter, V, atol=1e-9)


def test_the_mdp_ends_episodes_and_the_policy_is_a_distribution(mdp_and_cfg):
    mdp, _ = mdp_and_cfg
    stop = 1.0 - mdp.P.sum(axis=2)
    assert (stop > 0).all() and (stop < 0.1).all()
    np.testing.assert_allclose(mdp.pi.sum(axis=1), 1.0)


def test_closed_form_bias_against_a_term_by_term_sum(mdp_and_cfg):
    """bias(s,a) = gamma P_a e + sum_{l>=1} (gamma lambda)^l d_l (gamma P_pi e - e), d_1 = P_a, d_{l+1} = d_l P_pi."""
    mdp, cfg = mdp_and_cfg
    e, P_pi, gamma = mdp.value_error, policy_transition(mdp), cfg.gamma
    for lam in (0.0, 0.3, 0.9, 1.0):
        dist = mdp.P.copy()                                           # (S, A, S): where s_{t+1} is, still alive
        total = gamma * dist @ e
        for l in range(1, 1500):
            total += (gamma * lam) ** l * dist @ (gamma * P_pi @ e - e)
            dist = dist @ P_pi
        np.testing.assert_allclose(expected_gae_bias(mdp, gamma, lam), total, atol=1e-9)
    np.testing.assert_allclose(expected_gae_bias(mdp, gamma, 1.0), 0.0, atol=1e-10)   # lambda = 1: unbiased
    np.testing.assert_allclose(expected_gae_bias(mdp, gamma, 0.0), gamma * mdp.P @ e, atol=1e-12)


def test_rollout_ends_every_episode_and_lambda_one_is_return_minus_baseline(mdp_and_cfg):
    mdp, cfg = mdp_and_cfg
    ro = rollout(mdp, cfg, np.random.default_rng(0))
    T = ro.states.shape[0]
    assert T > cfg.horizon and ro.states.shape == (T, cfg.n_envs)
    last_real = T - 1 - np.argmax(ro.real[::-1], axis=0)              # each env's last real step
    assert ro.dones[last_real, np.arange(cfg.n_envs)].all()           # ... ends an episode: nothing truncated
    assert (last_real >= cfg.horizon - 1).all()
    assert (ro.real.cumsum(0)[-1] == last_real + 1).all()             # real steps form a prefix
    assert (ro.rewards[~ro.real] == 0).all() and ro.dones[~ro.real].all()
    starts = np.r_[np.ones((1, cfg.n_envs), bool), ro.dones[:-1]] & ro.real
    assert (ro.states[starts] == mdp.start_state).all()

    V, _ = exact_values(mdp, cfg.gamma)
    V_hat = V + mdp.value_error
    adv = gae_advantages(ro, V_hat, cfg.gamma, 1.0)
    returns = discounted_returns(torch.from_numpy(ro.rewards), torch.from_numpy(ro.dones), cfg.gamma).numpy()
    np.testing.assert_allclose(adv, returns[ro.real] - V_hat[ro.states[ro.real]], atol=1e-10)


def test_pair_stats_split_mse_into_bias_and_variance():
    rng = np.random.default_rng(0)
    pair = rng.integers(0, 4, size=1000)
    env = rng.integers(0, 50, size=1000)
    errors = rng.normal(loc=pair * 0.5, scale=1.0 + pair)             # pair k: bias 0.5 k, std 1 + k
    stats = pair_stats(errors, pair, env, n_pairs=4, n_envs=50)
    for k in range(4):
        np.testing.assert_allclose(stats.bias[k], errors[pair == k].mean())
        np.testing.assert_allclose(stats.variance[k], errors[pair == k].var())
    weight = stats.visits / stats.visits.sum()
    assert weight @ stats.bias ** 2 + weight @ stats.variance == pytest.approx(np.mean(errors ** 2))
    # independent samples: the clustered standard error is close to the plain one
    plain = np.sqrt(stats.variance / stats.visits)
    np.testing.assert_allclose(stats.stderr, plain, rtol=0.25)


# --- the module end to end ------------------------------------------------------------------------
def test_toy_preset_passes_all_its_checks(run_module):
    result = run_module("gae", "toy")
    assert result.passed, [c for c in result.checks if not c["passed"]]
    assert len(result.checks) == 9                                    # the design-point checks applied too
    m = read_metrics(result)
    assert m["mse_lambda0"] == pytest.approx(m["bias2_lambda0"] + m["var_lambda0"])
    assert 0.0 < m["best_lambda"] < 1.0
    # against the true advantage Q - V, lambda = 1 is off by exactly -e(s): a state-only shift
    assert m["bias2_true_adv_lambda1"] == pytest.approx(m["value_error_ms"], rel=0.05)
    assert (result.out_dir / "bias_variance.png").exists() and (result.out_dir / "lambda_sweep.csv").exists()


def test_same_seed_same_metrics_and_another_seed_differs(run_module):
    small = ["n_envs=800", "horizon=32", "lambdas=0,0.5,1"]
    first = read_metrics(run_module("gae", "toy", small, seed=5))
    second = read_metrics(run_module("gae", "toy", small, seed=5))
    other = read_metrics(run_module("gae", "toy", small, seed=6))
    assert first == second
    assert first["v_start_mc"] != other["v_start_mc"]
    assert first["v_start_exact"] == other["v_start_exact"]          # the seed samples; mdp_seed fixes the problem


def test_no_critic_error_means_no_bias_at_any_lambda(run_module):
    result = run_module("gae", "toy", ["value_error=0", "n_envs=1500", "horizon=32"])
    m = read_metrics(result)
    assert m["bias_z_lambda0"] < 4.0 and m["bias_z_lambda1"] < 4.0
    assert m["best_lambda"] == 0.0                                    # no bias to buy off: lowest variance wins
    assert all(c["passed"] for c in result.checks)                    # design-point checks are skipped here
