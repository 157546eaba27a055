"""Discrete Batch-Constrained deep Q-learning (Fujimoto, Conti, Ghavamzadeh & Pineau 2019,
"Benchmarking Batch Deep Reinforcement Learning Algorithms", section 4) on fixed CartPole-v1 datasets
of three qualities (core/rl/offline.py: expert, noisy, random), with a sweep over its threshold tau.

Offline Q-learning fails on actions the data never took: nothing corrects their Q-values, and the
max in the target picks whichever is over-estimated (extrapolation error, Fujimoto et al. 2019). BCQ
only lets the learner choose among actions the behaviour policy plausibly takes:
    G(a|s)      behaviour-cloning model, softmax of a network trained by  min  -log G(a_data | s)
    allowed(s)  = { a : G(a|s) / max_a' G(a'|s) >= tau }                    (the generative filter)
    a'          = argmax_{a in allowed(s')} Q(s', a)                         (online network picks)
    y           = r + gamma * (1 - terminated) * Q_target(s', a')            (target network scores)
    L_Q         = mean Huber(Q(s, a) - y)
    pi(s)       = argmax_{a in allowed(s)} Q(s, a)                           (the policy it acts with)
(The paper writes > tau; >= differs only at exact equality, and makes tau = 1 keep G's most likely
action instead of nothing.) tau = 0 allows every action: the update is (double) DQN. tau = 1 allows
only the most likely action of G: the policy is behaviour cloning whatever Q says. In between, Q may
deviate from the behaviour only towards actions the data covers well enough.

G does not depend on Q or tau, so it is trained once per dataset (the same minibatches the Q-learners
see) and shared by every tau of the sweep.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from core.config import Length, Range, Seed
from core.rl.offline import (QUALITIES, Minibatch, MinibatchSampler, OfflineDataset, bc_loss, collect_dataset,
                             greedy_returns, q_network, reachable_start_values, schedule_problems, start_value)
from core.rl.rollouts import derived_seed


@dataclass
class Config:
    dataset_size: Annotated[int, Range(ge=1, le=200_000)] = 20_000
    """transitions per dataset (whole episodes, at least this many; never fewer than 8 episodes)"""
    updates: Annotated[int, Range(ge=1, le=100_000)] = 4_000
    """gradient steps of every Q-learner (and of the behaviour model G)"""
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 128
    """transitions per minibatch, drawn uniformly with replacement (at most dataset_size)"""
    hidden: Annotated[int, Range(ge=1, le=512)] = 64
    """units of each of the two hidden layers (Q-network and G alike)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 1e-3
    """Adam learning rate"""
    gamma: Annotated[float, Range(ge=0, lt=1)] = 0.99
    """discount factor (below 1: value_upper_bound = 1/(1-gamma) is what the value checks compare with)"""
    target_update_every: Annotated[int, Range(ge=1, le=100_000)] = 50
    """copy the online Q-network into the target network every this-many updates (at most updates: the
    value check compares with what updates // target_update_every backups reach)"""
    tau: Annotated[float, Range(ge=0, le=1)] = 0.5
    """BCQ threshold: actions with G(a|s) / max G(.|s) >= tau are allowed (the paper uses 0.3, which
    lets through the noisy data's random actions: their ratio is 0.25 / 0.75 = 1/3)"""
    tau_sweep: Annotated[tuple[float, ...], Range(ge=0, le=1), Length(0, 16)] = (0.0, 0.1, 0.3, 0.4, 0.6, 0.9, 1.0)
    """thresholds of the sweep (tau, 0 and 1 are always added; empty: only those three)"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 1000
    """evaluate the greedy filtered policy every this-many updates (at most updates, and at most 100
    evaluations)"""
    eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 10
    """episodes per evaluation during training"""
    final_eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 20
    """episodes of the final evaluation, the reported return"""
    seed: Seed = 0
    """seed of the datasets, network inits, minibatches and evaluation episodes"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        return schedule_problems(self)


# --- the generative action filter ----------------------------------------------------------------
def allowed_actions(behaviour_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Boolean mask (B, A): G(a|s) / max_a' G(a'|s) >= tau, computed as
    log G(a|s) - max_a' log G(a'|s) >= log tau (the softmax normaliser cancels in the ratio).
    The most likely action always passes (ratio 1), so the mask is never empty."""
    log_ratio = behaviour_logits - behaviour_logits.max(-1, keepdim=True).values
    return log_ratio >= np.log(tau) if tau > 0 else torch.ones_like(log_ratio, dtype=torch.bool)


def filtered_argmax(q_values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """argmax over the allowed actions only: disallowed Q-values are set to -inf first."""
    return q_values.masked_fill(~allowed, -torch.inf).argmax(-1)


class FilteredPolicy(nn.Module):
    """Outputs Q(s, a) on allowed actions and -inf elsewhere, so `play_episodes(greedy=True)` plays
    pi(s) = argmax_{a in allowed(s)} Q(s, a)."""

    def __init__(self, q_net: nn.Module, behaviour: nn.Module, tau: float):
        super().__init__()
        self.q_net, self.behaviour, self.tau = q_net, behaviour, tau

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(obs).masked_fill(~allowed_actions(self.behaviour(obs), self.tau), -torch.inf)


# --- the Q-learning target ----------------------------------------------------------------------
@torch.no_grad()  # y is a regression target
def bcq_target(q_net: nn.Module, target_net: nn.Module, behaviour: nn.Module, batch: Minibatch,
               cfg: Config, tau: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * Q_target(s', argmax_{a in allowed(s')} Q(s', a))."""
    next_actions = filtered_argmax(q_net(batch.next_obs), allowed_actions(behaviour(batch.next_obs), tau))
    next_q = target_net(batch.next_obs).gather(1, next_actions.unsqueeze(1)).squeeze(1)
    return batch.rewards + cfg.gamma * (1.0 - batch.terminated) * next_q


# --- training ------------------------------------------------------------------------------------
def minibatches(dataset: OfflineDataset, quality: str, cfg: Config):
    """The same minibatch sequence for G and for every tau on one dataset (common random numbers)."""
    sampler = MinibatchSampler(dataset)
    rng = np.random.default_rng(derived_seed("minibatches", cfg.seed, quality))
    return (sampler.sample(cfg.batch_size, rng) for _ in range(cfg.updates))


def train_behaviour_model(dataset: OfflineDataset, quality: str, cfg: Config, ctx) -> nn.Module:
    behaviour = q_network(cfg.hidden, derived_seed("behaviour-init", cfg.seed, quality))
    opt = torch.optim.Adam(behaviour.parameters(), lr=cfg.lr)
    for batch in ctx.track(minibatches(dataset, quality, cfg), f"G(a|s) on {quality}", total=cfg.updates):
        loss = bc_loss(behaviour(batch.obs), batch.actions)  # min -log G(a_data | s)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return behaviour.requires_grad_(False)


def train_bcq(dataset: OfflineDataset, quality: str, behaviour: nn.Module, tau: float, cfg: Config, ctx) -> nn.Module:
    """Q-learning restricted to G's allowed actions; every tau starts from the same init.

    At tau = 1 only G's most likely action passes the filter, so Q cannot change the policy: it is
    not trained (its curve is the cloning policy evaluated at the same points, loss NaN)."""
    q_net = q_network(cfg.hidden, derived_seed("q-init", cfg.seed, quality))
    target_net = copy.deepcopy(q_net)
    opt = torch.optim.Adam(q_net.parameters(), lr=cfg.lr)
    policy = FilteredPolicy(q_net, behaviour, tau)
    batches = minibatches(dataset, quality, cfg)
    loss = torch.tensor(float("nan"))
    for update, batch in enumerate(ctx.track(batches, f"BCQ tau={tau:g} on {quality}", total=cfg.updates), 1):
        if tau < 1:
            q_data = q_net(batch.obs).gather(1, batch.actions.unsqueeze(1)).squeeze(1)
            loss = nn.functional.smooth_l1_loss(q_data, bcq_target(q_net, target_net, behaviour, batch, cfg, tau))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if update % cfg.target_update_every == 0:
                target_net.load_state_dict(q_net.state_dict())
        if update % cfg.eval_every == 0:
            returns = greedy_returns(policy, cfg.eval_episodes, derived_seed("eval", cfg.seed, update))
            ctx.log("curves", dataset=quality, tau=tau, update=update, eval_return=float(returns.mean()),
                    loss=float(loss.detach()))
    return policy


@torch.no_grad()
def filtered_fraction(dataset: OfflineDataset, behaviour: nn.Module, tau: float) -> float:
    """Share of (state, action) pairs of the data's states that the filter removes."""
    return float((~allowed_actions(behaviour(torch.from_numpy(dataset.obs)), tau)).float().mean())


# --- plots ---------------------------------------------------------------------------------------
def plot_tau_sweep(sweep: list[dict], datasets: dict[str, OfflineDataset]):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for quality, color in zip(datasets, ("tab:green", "tab:orange", "tab:gray")):
        rows = [r for r in sweep if r["dataset"] == quality]
        a1.plot([r["tau"] for r in rows], [r["final_return"] for r in rows], "o-", color=color, label=quality)
        a1.axhline(datasets[quality].behaviour_return, color=color, ls=":", lw=1)
        a2.plot([r["tau"] for r in rows], [r["filtered_fraction"] for r in rows], "o-", color=color)
    a1.set(xlabel="tau  (0: DQN ... 1: behaviour cloning)", ylabel="greedy return (dotted: behaviour policy)",
           title="BCQ final return vs tau", ylim=(0, 520))
    a1.legend()
    a2.set(xlabel="tau", ylabel="share of (s, a) pairs filtered out", title="how much the filter removes")
    return fig


def plot_curves(table: list[dict], datasets: dict[str, OfflineDataset], cfg: Config):
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8), squeeze=False)
    for ax, (quality, dataset) in zip(axes[0], datasets.items()):
        taus = sorted({r["tau"] for r in table if r["dataset"] == quality})
        for tau, color in zip(taus, plt.cm.viridis(np.linspace(0, 0.9, len(taus)))):
            rows = [r for r in table if r["dataset"] == quality and r["tau"] == tau]
            ax.plot([r["update"] for r in rows], [r["eval_return"] for r in rows], color=color, label=f"tau={tau:g}")
        ax.axhline(dataset.behaviour_return, color="black", ls=":", label="behaviour policy")
        ax.set(title=f"{quality} data", xlabel="update", ylim=(0, 520))
    axes[0][0].set(ylabel=f"greedy return ({cfg.eval_episodes} episodes)")
    axes[0][0].legend(fontsize=7)
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    taus = sorted({0.0, cfg.tau, 1.0, *cfg.tau_sweep})
    datasets = {quality: collect_dataset(quality, cfg.dataset_size, derived_seed("data", cfg.seed))
                for quality in QUALITIES}
    metrics: dict[str, float] = {"value_upper_bound": 1 / (1 - cfg.gamma)}  # sum_t gamma^t * (reward 1)
    for quality, dataset in datasets.items():
        dataset.save(ctx.path(f"dataset_{quality}.npz"))
        behaviour = train_behaviour_model(dataset, quality, cfg, ctx)
        starts = torch.from_numpy(dataset.obs[dataset.episode_starts])
        final, removed = {}, {}
        for tau in taus:
            policy = train_bcq(dataset, quality, behaviour, tau, cfg, ctx)
            returns = greedy_returns(policy, cfg.final_eval_episodes, derived_seed("final-eval", cfg.seed))
            final[tau], removed[tau] = float(returns.mean()), filtered_fraction(dataset, behaviour, tau)
            if tau == cfg.tau:  # max_{a in allowed(s_0)} Q(s_0, a): the policy outputs -inf on the others
                metrics[f"bcq_v_start_{quality}"] = start_value(policy, starts)
            ctx.log("tau_sweep", dataset=quality, tau=tau, final_return=final[tau], filtered_fraction=removed[tau])
        metrics |= {f"behaviour_return_{quality}": dataset.behaviour_return, f"bcq_return_{quality}": final[cfg.tau],
                    f"dqn_return_{quality}": final[0.0], f"bc_return_{quality}": final[1.0],
                    f"filtered_fraction_{quality}": removed[cfg.tau]}
        ctx.say(f"{quality:>6}: behaviour {dataset.behaviour_return:5.1f}  "
                + "  ".join(f"tau={tau:g}: {ret:5.1f}" for tau, ret in final.items()))
    metrics["bcq_to_behaviour_return_noisy"] = metrics["bcq_return_noisy"] / metrics["behaviour_return_noisy"]
    metrics["bcq_to_behaviour_return_random"] = metrics["bcq_return_random"] / metrics["behaviour_return_random"]
    metrics["reachable_start_expert"] = float(reachable_start_values(datasets["expert"], cfg.gamma,
                                                                     [cfg.updates // cfg.target_update_every])[0])
    # on expert data the filtered greedy policy is the behaviour policy, so its value is comparable with it
    metrics["bcq_v_start_to_reachable_expert"] = metrics["bcq_v_start_expert"] / metrics["reachable_start_expert"]
    ctx.save_figure(plot_tau_sweep(ctx.tables["tau_sweep"], datasets), "tau_sweep.png")
    ctx.save_figure(plot_curves(ctx.tables["curves"], datasets, cfg), "returns.png")
    return metrics
