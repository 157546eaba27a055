"""Offline RL: the shared CartPole datasets (core/rl/offline.py) and the loss pieces of cql and bcq,
against independent computations on hand-made inputs. The toy presets themselves (checks and
determinism) run in tests/test_modules.py."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from core.rl.offline import (QUALITIES, ExpertController, Minibatch, OfflineDataset, bc_loss, collect_dataset,
                             mc_returns, reachable_start_values)
from core.rl.rollouts import play_episodes
from post_train.offline_rl.bcq.code.bcq import FilteredPolicy, allowed_actions, bcq_target, filtered_argmax
from post_train.offline_rl.bcq.code.bcq import Config as BCQConfig
from post_train.offline_rl.cql.code.cql import cql_penalty, td_target

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Batches of 2-8 CartPole states: torch's intra-op threads only add synchronisation (10x slower
    on a busy machine), as in the modules' own runs (Module.threads = 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


ARRAYS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated", "episode_returns")


# --- datasets -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets() -> dict[str, OfflineDataset]:
    return {quality: collect_dataset(quality, 3000, seed=7) for quality in QUALITIES}


@pytest.mark.parametrize("quality", QUALITIES)
def test_same_seed_gives_identical_datasets(quality, datasets):
    again = collect_dataset(quality, 3000, seed=7)
    for name in ARRAYS:
        assert np.array_equal(getattr(again, name), getattr(datasets[quality], name)), name
    other = collect_dataset(quality, 3000, seed=8)
    assert not np.array_equal(other.obs[:50], datasets[quality].obs[:50])


def test_behaviour_returns_are_ordered_expert_noisy_random(datasets):
    returns = [datasets[q].behaviour_return for q in ("expert", "noisy", "random")]
    assert returns[0] == 500.0  # the hand-written controller never drops the pole
    assert returns[0] > returns[1] > 2 * returns[2]


def test_expert_controller_holds_every_episode_for_500_steps():
    assert (play_episodes(ExpertController(0.0), 30, seed=123).episode_returns == 500).all()


@pytest.mark.parametrize("quality", QUALITIES)
def test_transitions_are_consistent_episodes(quality, datasets):
    data = datasets[quality]
    assert len(data) >= 3000 and data.obs.shape == data.next_obs.shape == (len(data), 4)
    inside = ~data.episode_ends[:-1]  # s_{t+1} of one transition is s_t of the next inside an episode
    assert np.array_equal(data.next_obs[:-1][inside], data.obs[1:][inside])
    assert data.episode_ends[-1] and len(data.episode_starts) == len(data.episode_returns)
    assert np.allclose(np.add.reduceat(data.rewards, data.episode_starts), data.episode_returns)
    assert not (data.terminated & data.truncated).any()
    assert data.behaviour_return == pytest.approx(data.episode_returns.mean())


def test_noisy_data_takes_the_expert_action_three_times_in_four(datasets):
    data = datasets["noisy"]
    expert_actions = ExpertController(0.0)(torch.from_numpy(data.obs)).argmax(-1).numpy()
    assert (data.actions == expert_actions).mean() == pytest.approx(0.75, abs=0.03)  # 1 - eps/2, eps = 0.5


def test_save_and_load_round_trip(datasets, tmp_path):
    loaded = OfflineDataset.load(datasets["noisy"].save(tmp_path / "noisy.npz"))
    for name in ARRAYS:
        assert np.array_equal(getattr(loaded, name), getattr(datasets["noisy"], name)), name
    assert loaded.behaviour_return == datasets["noisy"].behaviour_return


def hand_made_dataset(rewards: list[float], terminated: list[bool], truncated: list[bool]) -> OfflineDataset:
    n = len(rewards)
    return OfflineDataset(obs=np.zeros((n, 4), np.float32), actions=np.zeros(n, np.int64),
                          rewards=np.array(rewards, np.float32), next_obs=np.zeros((n, 4), np.float32),
                          terminated=np.array(terminated), truncated=np.array(truncated),
                          episode_returns=np.zeros(0, np.float32), behaviour_return=0.0)


def test_mc_returns_stop_at_each_episode_end():
    # episode 1: rewards 1, 2, 3 then terminated; episode 2: rewards 4, 5 then truncated
    data = hand_made_dataset([1, 2, 3, 4, 5], [False, False, True, False, False], [False, False, False, False, True])
    g = 0.9
    expected = [1 + g * 2 + g * g * 3, 2 + g * 3, 3, 4 + g * 5, 5]
    assert np.allclose(mc_returns(data, g), expected)
    assert list(data.episode_starts) == [0, 3]


def test_reachable_start_values_sum_the_first_k_rewards_of_every_episode():
    # episodes of 3, 1 and 4 steps: K backups from Q = 0 see at most the first K rewards of each
    episodes = [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0, 7.0, 8.0]]
    rewards = [r for ep in episodes for r in ep]
    ends = [t == len(ep) - 1 for ep in episodes for t in range(len(ep))]
    data = hand_made_dataset(rewards, ends, [False] * len(rewards))
    g, backups = 0.9, [0, 1, 2, 3, 10]
    by_hand = [np.mean([sum(g ** t * r for t, r in enumerate(ep[:k])) for ep in episodes]) for k in backups]
    assert np.allclose(reachable_start_values(data, g, backups), by_hand, rtol=1e-9, atol=1e-12)


# --- CQL ------------------------------------------------------------------------------------------
def test_cql_penalty_is_logsumexp_minus_data_q():
    q = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 3.0]])
    actions = torch.tensor([0, 0, 1])
    by_hand = [math.log(math.exp(1.0) + math.exp(2.0)) - 1.0,
               math.log(math.exp(0.5) + math.exp(-1.0)) - 0.5,
               math.log(2 * math.exp(3.0)) - 3.0]
    assert cql_penalty(q, actions).item() == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    # ~0 when the data action dominates, > 0 otherwise (logsumexp > max >= Q_data)
    assert cql_penalty(torch.tensor([[50.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    assert (cql_penalty(torch.randn(64, 3), torch.randint(0, 3, (64,))) > 0).item()


def test_bc_loss_is_mean_negative_log_likelihood():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    actions = torch.tensor([0, 0])
    by_hand = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e))]
    assert bc_loss(logits, actions).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)


class TableQ(nn.Module):
    """Q(s, .) read from a table indexed by the first coordinate of s."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.table[obs[:, 0].long()]


def batch_to(next_states: list[int], terminated: list[float]) -> Minibatch:
    n = len(next_states)
    next_obs = torch.zeros(n, 4)
    next_obs[:, 0] = torch.tensor(next_states, dtype=torch.float32)
    return Minibatch(obs=torch.zeros(n, 4), actions=torch.zeros(n, dtype=torch.long), rewards=torch.ones(n),
                     next_obs=next_obs, terminated=torch.tensor(terminated))


def test_dqn_target_bootstraps_on_the_max_unless_terminated():
    target = TableQ([[1.0, 5.0], [2.0, -3.0]])
    y = td_target(target, batch_to([0, 1, 0], [0.0, 0.0, 1.0]), gamma=0.5)
    assert torch.allclose(y, torch.tensor([1 + 0.5 * 5, 1 + 0.5 * 2, 1.0]))


# --- BCQ ------------------------------------------------------------------------------------------
# G(a|s) of four states over three actions, as probabilities; the filter compares G(a|s) / max G(.|s)
G = np.array([[0.70, 0.20, 0.10],    # ratios 1, 0.286, 0.143
              [0.40, 0.40, 0.20],    # ratios 1, 1, 0.5
              [0.05, 0.05, 0.90],    # ratios 0.056, 0.056, 1
              [1 / 3, 1 / 3, 1 / 3]])


@pytest.mark.parametrize("tau, expected", [
    (0.0, [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),       # tau = 0: every action (DQN)
    (0.1, [[1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]),
    (0.25, [[1, 1, 0], [1, 1, 1], [0, 0, 1], [1, 1, 1]]),
    (0.3, [[1, 0, 0], [1, 1, 1], [0, 0, 1], [1, 1, 1]]),
    (0.6, [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]]),
    (1.0, [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 1, 1]]),       # tau = 1: only the most likely (ties kept)
])
def test_bcq_filter_keeps_actions_above_tau_times_the_most_likely(tau, expected):
    logits = torch.log(torch.tensor(G, dtype=torch.float32)) + torch.tensor([[3.0], [-1.0], [0.5], [7.0]])
    mask = allowed_actions(logits, tau)  # a per-state shift of the logits leaves G unchanged
    ratio = G / G.max(1, keepdims=True)
    assert np.array_equal(mask.numpy(), ratio >= tau - 1e-6)  # independent: probability ratios
    assert mask.numpy().astype(int).tolist() == expected


def test_filtered_argmax_picks_the_best_allowed_action():
    q = torch.tensor([[0.0, 9.0, 5.0], [3.0, 1.0, 8.0], [7.0, 6.0, 1.0], [1.0, 2.0, 3.0]])
    logits = torch.log(torch.tensor(G, dtype=torch.float32))
    assert filtered_argmax(q, allowed_actions(logits, 0.0)).tolist() == [1, 2, 0, 2]  # plain argmax
    assert filtered_argmax(q, allowed_actions(logits, 0.25)).tolist() == [1, 2, 2, 2]
    assert filtered_argmax(q, allowed_actions(logits, 0.6)).tolist() == [0, 0, 2, 2]


def test_filtered_policy_masks_disallowed_actions_with_minus_infinity():
    q_net, behaviour = TableQ([[0.0, 9.0, 5.0]]), TableQ(np.log(G[:1]).tolist())
    out = FilteredPolicy(q_net, behaviour, 0.25)(torch.zeros(1, 4))
    assert out[0, :2].tolist() == [0.0, 9.0] and out[0, 2].item() == -math.inf


def test_bcq_target_scores_the_filtered_online_argmax_with_the_target_network():
    online = TableQ([[0.0, 9.0, 5.0], [3.0, 1.0, 8.0]])
    target = TableQ([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    behaviour = TableQ(np.log(G[:2]).tolist())
    batch = batch_to([0, 1, 0], [0.0, 0.0, 1.0])
    cfg = BCQConfig(gamma=0.5)
    # tau 0.6: state 0 allows only action 0 -> target Q 10; state 1 allows 0, 1 -> online picks 0 -> 40
    assert bcq_target(online, target, behaviour, batch, cfg, 0.6).tolist() == [1 + 5, 1 + 20, 1]
    # tau 0: double DQN, online argmax 1 (Q 9) and 2 (Q 8) scored by the target: 20 and 60
    assert bcq_target(online, target, behaviour, batch, cfg, 0.0).tolist() == [1 + 10, 1 + 30, 1]
