"""Conservative Q-Learning (Kumar et al. 2020, "Conservative Q-Learning for Offline Reinforcement
Learning", discrete CQL(H), eq. 4) against naive offline DQN and behaviour cloning, on fixed CartPole-v1
datasets of three qualities (core/rl/offline.py: expert, noisy, random).

Offline DQN (Mnih et al. 2015, without the environment) minimises the TD error on dataset transitions:
    y        = r + gamma * (1 - terminated) * max_a' Q_target(s', a')
    L_TD     = mean Huber(Q(s, a) - y)
The max in y is taken over ALL actions, including ones the data never shows in s'. Nothing pulls
those Q-values down, the max picks whichever is over-estimated, and bootstrapping spreads the error
(extrapolation error: Fujimoto et al. 2019). CQL adds a term that pushes down Q on every action,
softly weighted towards the largest, and pushes up Q on the action the data took:
    L_CQL    = L_TD + alpha * mean_s [ logsumexp_a Q(s, a) - Q(s, a_data) ]
Behaviour cloning ignores rewards and imitates the data:
    L_BC     = mean -log softmax(f(s))[a_data]
All three train the same network (same init, same minibatches) for the same number of updates and
are judged by their greedy policy argmax_a output(s) in the real environment.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from core.config import Range, Seed
from core.rl.offline import (QUALITIES, Minibatch, MinibatchSampler, OfflineDataset, bc_loss, collect_dataset,
                             greedy_returns, mc_returns, q_network, reachable_start_values, schedule_problems,
                             start_value)
from core.rl.rollouts import derived_seed


@dataclass
class Config:
    dataset_size: Annotated[int, Range(ge=1, le=200_000)] = 20_000
    """transitions per dataset (whole episodes, at least this many; never fewer than 8 episodes)"""
    updates: Annotated[int, Range(ge=1, le=200_000)] = 10_000
    """gradient steps per learner (the same for CQL, DQN and BC)"""
    batch_size: Annotated[int, Range(ge=1, le=4096)] = 128
    """transitions per minibatch, drawn uniformly with replacement (at most dataset_size)"""
    hidden: Annotated[int, Range(ge=1, le=512)] = 64
    """units of each of the two hidden layers of the network"""
    lr: Annotated[float, Range(gt=0, le=1)] = 1e-3
    """Adam learning rate"""
    gamma: Annotated[float, Range(ge=0, lt=1)] = 0.99
    """discount factor (below 1: value_upper_bound = 1/(1-gamma) is what the value checks compare with)"""
    target_update_every: Annotated[int, Range(ge=1, le=200_000)] = 50
    """copy the online network into the target network every this-many updates (at most updates: the
    value check compares with what updates // target_update_every backups reach)"""
    cql_alpha: Annotated[float, Range(ge=0, le=100)] = 1.0
    """weight alpha of the conservative term (alpha = 0 is offline DQN)"""
    eval_every: Annotated[int, Range(ge=1, le=200_000)] = 1000
    """evaluate the greedy policy every this-many updates (at most updates, and at most 100 evaluations)"""
    eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 10
    """episodes per evaluation during training"""
    final_eval_episodes: Annotated[int, Range(ge=1, le=1000)] = 20
    """episodes of the final evaluation, the reported return"""
    seed: Seed = 0
    """seed of the datasets, network inits, minibatches and evaluation episodes"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        return schedule_problems(self)


METHODS = ("cql", "dqn", "bc")


# --- losses --------------------------------------------------------------------------------------
@torch.no_grad()  # y is a regression target: no gradient through the target network
def td_target(target_net: nn.Module, batch: Minibatch, gamma: float) -> torch.Tensor:
    """y = r + gamma * (1 - terminated) * max_a' Q_target(s', a'); a truncation still bootstraps."""
    return batch.rewards + gamma * (1.0 - batch.terminated) * target_net(batch.next_obs).max(-1).values


def cql_penalty(q_values: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """mean_s [ logsumexp_a Q(s, a) - Q(s, a_data) ] >= 0 (CQL(H), Kumar et al. 2020 eq. 4)."""
    q_data = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
    return (torch.logsumexp(q_values, dim=1) - q_data).mean()


def loss(method: str, net: nn.Module, target_net: nn.Module, batch: Minibatch, cfg: Config) -> torch.Tensor:
    outputs = net(batch.obs)
    if method == "bc":
        return bc_loss(outputs, batch.actions)  # mean -log softmax(f(s))[a_data]
    q_data = outputs.gather(1, batch.actions.unsqueeze(1)).squeeze(1)
    td = nn.functional.smooth_l1_loss(q_data, td_target(target_net, batch, cfg.gamma))  # Huber(Q(s,a) - y)
    if method == "dqn":
        return td
    return td + cfg.cql_alpha * cql_penalty(outputs, batch.actions)  # L_TD + alpha * (logsumexp - data-Q)


# --- training ------------------------------------------------------------------------------------
def train(method: str, dataset: OfflineDataset, quality: str, cfg: Config, ctx) -> nn.Module:
    """One learner; every learner on a dataset starts from the same init and sees the same
    minibatches and evaluation episodes, so their curves differ only through the loss."""
    net = q_network(cfg.hidden, derived_seed("init", cfg.seed, quality))
    target_net = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sampler = MinibatchSampler(dataset)
    rng = np.random.default_rng(derived_seed("minibatches", cfg.seed, quality))
    starts = torch.from_numpy(dataset.obs[dataset.episode_starts])
    for update in ctx.track(range(1, cfg.updates + 1), f"{method} on {quality}", total=cfg.updates):
        step_loss = loss(method, net, target_net, sampler.sample(cfg.batch_size, rng), cfg)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        if update % cfg.target_update_every == 0:
            target_net.load_state_dict(net.state_dict())
        if update % cfg.eval_every == 0:
            returns = greedy_returns(net, cfg.eval_episodes, derived_seed("eval", cfg.seed, update))
            v_start = start_value(net, starts) if method != "bc" else float("nan")  # BC's outputs are logits
            ctx.log("curves", dataset=quality, method=method, update=update, eval_return=float(returns.mean()),
                    v_start=v_start, loss=float(step_loss.detach()))
    return net


# --- plots ---------------------------------------------------------------------------------------
COLORS = {"cql": "tab:blue", "dqn": "tab:red", "bc": "tab:gray"}


def rows_of(table: list[dict], quality: str, method: str) -> list[dict]:
    return [r for r in table if r["dataset"] == quality and r["method"] == method]


def plot_returns(table: list[dict], datasets: dict[str, OfflineDataset], cfg: Config):
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8), squeeze=False)
    for ax, (quality, dataset) in zip(axes[0], datasets.items()):
        for method in METHODS:
            rows = rows_of(table, quality, method)
            ax.plot([r["update"] for r in rows], [r["eval_return"] for r in rows], color=COLORS[method], label=method)
        ax.axhline(dataset.behaviour_return, color="black", ls=":", label="behaviour policy")
        ax.set(title=f"{quality} data", xlabel="update", ylim=(0, 520))
    axes[0][0].set(ylabel=f"greedy return ({cfg.eval_episodes} episodes)")
    axes[0][0].legend()
    return fig


def plot_values(table: list[dict], datasets: dict[str, OfflineDataset], metrics: dict[str, float], cfg: Config):
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.8), squeeze=False)
    for ax, (quality, dataset) in zip(axes[0], datasets.items()):
        for method in ("cql", "dqn"):
            rows = rows_of(table, quality, method)
            ax.plot([r["update"] for r in rows], [r["v_start"] for r in rows], color=COLORS[method], label=method)
        ax.axhline(metrics[f"mc_start_{quality}"], color="black", ls=":", label="MC return of the data")
        updates = np.array([r["update"] for r in rows])
        ax.plot(updates, reachable_start_values(dataset, cfg.gamma, updates // cfg.target_update_every),
                color="black", ls="--", lw=0.8, label="the data's value after the backups so far")
        ax.axhline(metrics["value_upper_bound"], color="tab:green", ls="--", lw=0.8,
                   label="1/(1-gamma): no policy earns more")
        ax.set_yscale("symlog", linthresh=10)  # linear below 10, logarithmic above: DQN's values explode
        ax.set(title=f"{quality} data", xlabel="update", ylim=(0, None))
    axes[0][0].set(ylabel="max_a Q(s_0, a) at the data's episode starts")
    axes[0][-1].legend(loc="lower right", fontsize=8)  # the panel with room below its curves
    return fig


def run(cfg: Config, ctx) -> dict[str, float]:
    datasets = {quality: collect_dataset(quality, cfg.dataset_size, derived_seed("data", cfg.seed))
                for quality in QUALITIES}
    metrics: dict[str, float] = {"value_upper_bound": 1 / (1 - cfg.gamma)}  # sum_t gamma^t * (reward 1)
    for quality, dataset in datasets.items():
        dataset.save(ctx.path(f"dataset_{quality}.npz"))
        starts = torch.from_numpy(dataset.obs[dataset.episode_starts])
        metrics[f"behaviour_return_{quality}"] = dataset.behaviour_return
        metrics[f"mc_start_{quality}"] = float(mc_returns(dataset, cfg.gamma)[dataset.episode_starts].mean())
        for method in METHODS:
            net = train(method, dataset, quality, cfg, ctx)
            returns = greedy_returns(net, cfg.final_eval_episodes, derived_seed("final-eval", cfg.seed))
            metrics[f"{method}_return_{quality}"] = float(returns.mean())
            if method != "bc":
                metrics[f"{method}_v_start_{quality}"] = start_value(net, starts)
        ctx.say(f"{quality:>6}: behaviour {dataset.behaviour_return:5.1f}  "
                + "  ".join(f"{m} {metrics[f'{m}_return_{quality}']:5.1f}" for m in METHODS)
                + f"  | V(s_0): data MC {metrics[f'mc_start_{quality}']:.1f}"
                + f"  cql {metrics[f'cql_v_start_{quality}']:.1f}  dqn {metrics[f'dqn_v_start_{quality}']:.3g}")
    metrics["reachable_start_expert"] = float(reachable_start_values(datasets["expert"], cfg.gamma,
                                                                     [cfg.updates // cfg.target_update_every])[0])
    # on expert data CQL's greedy policy is the behaviour policy, so its value is comparable with it
    metrics["cql_v_start_to_reachable_expert"] = metrics["cql_v_start_expert"] / metrics["reachable_start_expert"]
    metrics["dqn_to_cql_return_expert"] = metrics["dqn_return_expert"] / metrics["cql_return_expert"]
    metrics["cql_to_behaviour_return_random"] = metrics["cql_return_random"] / metrics["behaviour_return_random"]
    ctx.save_figure(plot_returns(ctx.tables["curves"], datasets, cfg), "returns.png")
    ctx.save_figure(plot_values(ctx.tables["curves"], datasets, metrics, cfg), "q_vs_mc.png")
    return metrics
