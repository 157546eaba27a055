"""td_learning: closed-form random-walk values, hand-computed TD(0) / TD(lambda) updates (one episode and
two), TD(lambda=0) == TD(0) exactly, TD(lambda) == a plain per-episode loop. The toy run, its
determinism and resume are covered in tests/test_modules.py."""
from __future__ import annotations

import numpy as np
import pytest

from post_train.rl_basics.td_learning.code.td_learning import (
    WALK_STATES, random_walk_episode, stack_episodes, td0_episode, td_lambda, true_walk_values, walk_reward)


def test_true_values_are_the_closed_form_and_solve_the_bellman_system():
    i = np.arange(1, 20)
    assert np.allclose(true_walk_values(), (i - 10) / 10)
    # independent: v = P v + r for the walk (1/2 left, 1/2 right), terminals excluded, gamma = 1
    P = 0.5 * (np.eye(19, k=1) + np.eye(19, k=-1))
    r = np.zeros(19)
    r[0], r[-1] = -0.5, 0.5  # from state 1 a left step pays -1, from state 19 a right step pays +1
    assert np.allclose(np.linalg.solve(np.eye(19) - P, r), true_walk_values())


@pytest.mark.parametrize("episode, start, expected", [
    # right exit, alpha = 0.5: delta_1 = 0 + 0.4 - 0.2 = 0.2 -> V18 = 0.3; delta_2 = 1 + 0 - 0.4 -> V19 = 0.7
    ([18, 19, 20], {18: 0.2, 19: 0.4}, {18: 0.3, 19: 0.7}),
    # left exit: delta_1 = 0 - 0.4 - 0 -> V2 = -0.2; delta_2 = -1 + 0 + 0.4 = -0.6 -> V1 = -0.7
    ([2, 1, 0], {1: -0.4}, {2: -0.2, 1: -0.7}),
])
def test_td0_update_on_a_two_step_episode_matches_hand_computation(episode, start, expected):
    V = np.zeros(WALK_STATES + 2)
    for s, v in start.items():
        V[s] = v
    want = V.copy()
    for s, v in expected.items():
        want[s] = v
    td0_episode(V, np.array(episode), alpha=0.5)
    assert np.allclose(V, want)


@pytest.mark.parametrize("lam, v18, v19", [
    # from V = 0, alpha = 0.5: delta_1 = 0; then z = (lam, 1) on (18, 19) and delta_2 = 1
    (0.5, 0.25, 0.5),
    (1.0, 0.5, 0.5),  # lambda = 1 without revisits: alpha * (G - V) for every state, the Monte-Carlo update
])
def test_td_lambda_trace_passes_the_exit_reward_back(lam, v18, v19):
    V, rms = td_lambda(stack_episodes([[np.array([18, 19, 20])]]), (lam,), (0.5,), n_episodes=1)
    want = np.zeros(WALK_STATES + 2)
    want[18], want[19] = v18, v19
    assert np.allclose(V[0, 0, 0], want)
    assert np.isclose(rms[0, 0, 0, 0], np.sqrt(np.mean((want[1:-1] - true_walk_values()) ** 2)))


def test_td_lambda_at_lambda_zero_equals_td0_exactly():
    rng = np.random.default_rng(7)
    runs = [[random_walk_episode(rng) for _ in range(4)] for _ in range(3)]  # runs of unequal length: padding
    alphas = (0.1, 0.7)
    V, rms = td_lambda(stack_episodes(runs), (0.0, 0.9), alphas, n_episodes=4)
    assert rms.shape == (3, 2, 2, 4)
    for r, episodes in enumerate(runs):
        for j, alpha in enumerate(alphas):
            reference = np.zeros(WALK_STATES + 2)
            for episode in episodes:
                td0_episode(reference, episode, alpha)
            assert np.array_equal(V[r, 0, j], reference)  # bit for bit, not just close
            assert not np.array_equal(V[r, 1, j], reference)  # lambda = 0.9 really differs


def test_td_lambda_trace_starts_at_zero_in_every_episode():
    # the same episode twice, lambda = alpha = 0.5, from V = 0. Episode 1 (as above): V18 = 0.25, V19 = 0.5.
    # Episode 2, fresh trace: delta_1 = V19 - V18 = 0.25, z = (1, 0)   -> V18 = 0.375
    #                         delta_2 = 1 - V19 = 0.5,    z = (0.5, 1) -> V18 = 0.5, V19 = 0.75
    # (a trace carried over from episode 1 would give z = (1.25, 0.5) at the first step: V18 = 0.40625)
    episode = np.array([18, 19, 20])
    V, _ = td_lambda(stack_episodes([[episode, episode]]), (0.5,), (0.5,), n_episodes=2)
    want = np.zeros(WALK_STATES + 2)
    want[18], want[19] = 0.5, 0.75
    assert np.allclose(V[0, 0, 0], want)


def td_lambda_episode(V: np.ndarray, episode: np.ndarray, lam: float, alpha: float) -> None:
    """Plain-loop online TD(lambda), accumulating traces, one episode; the trace starts at 0."""
    z = np.zeros_like(V)
    for s, s_next in zip(episode[:-1], episode[1:]):
        delta = walk_reward(s_next) + V[s_next] - V[s]
        z *= lam
        z[s] += 1.0
        V += alpha * delta * z


def test_td_lambda_matches_a_plain_loop_episode_by_episode():
    rng = np.random.default_rng(3)
    runs = [[random_walk_episode(rng) for _ in range(5)] for _ in range(2)]
    lambdas, alphas = (0.4, 0.9), (0.05, 0.2)
    V, rms = td_lambda(stack_episodes(runs), lambdas, alphas, n_episodes=5)
    for r, episodes in enumerate(runs):
        for i, lam in enumerate(lambdas):
            for j, alpha in enumerate(alphas):
                reference = np.zeros(WALK_STATES + 2)
                for k, episode in enumerate(episodes):
                    td_lambda_episode(reference, episode, lam, alpha)
                    error = np.sqrt(np.mean((reference[1:-1] - true_walk_values()) ** 2))
                    assert np.isclose(rms[r, i, j, k], error, rtol=1e-12, atol=1e-12)
                assert np.allclose(V[r, i, j], reference, rtol=1e-12, atol=1e-12)
