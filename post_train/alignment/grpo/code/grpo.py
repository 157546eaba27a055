"""Group Relative Policy Optimization (GRPO) on arithmetic word problems with a verifiable reward.

Shao et al. 2024, "DeepSeekMath", Sec. 4.1: for each prompt q sample G responses o_1..o_G from
pi_old, score them (here: 1 for an exactly right final answer, + format_reward for the answer
sentence), and maximise

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( r_it A_i, clip(r_it, 1 - eps, 1 + eps) A_i ) - beta D_it } ]

    r_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)          per-token importance ratio
    A_i  = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps_A)                group-relative advantage
    D_it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1                      k3 estimator of KL(pi || pi_ref)

No critic: the group's mean reward is the baseline (the value model of PPO-RLHF is gone, and with it
half the memory). A group whose G rewards are all equal has A = 0 and teaches nothing; the share of
such groups is logged every step. The ratio is 1 at the first optimizer step on a batch and moves
after it: each generation batch is reused for `iterations` (mu) passes of `minibatches` steps.

The 1/|o_i| (per-sequence mean) of the paper favours short right answers and long wrong ones; DAPO
(Yu et al. 2025) averages over all tokens of the batch, Dr. GRPO (Liu et al. 2025) divides by a
constant and drops the std. `loss_agg` chooses; the default is the token-level mean, which is also
TRL's current default (`loss_type="dapo"`; TRL defaults beta to 0 and num_iterations to 1; we keep
beta = 0.04 from DeepSeekMath and mu = 2 so that the KL and the clipping are visible).

The shared machinery (sampling the groups in one KV-cached call, the advantages, the k3 KL, the
loop over a rollout, held-out evaluation) is core/rl/group_policy.py; this file is the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import torch

from core.config import Range
from core.rl.group_policy import GroupPolicyConfig, aggregate, k3_kl, kl_to_reference, train


@dataclass
class Config(GroupPolicyConfig):
    """Every field of the shared GroupPolicyConfig (prompts, G, mu, lr, beta, temperature, ...; see
    core/rl/group_policy.py or `--help`) plus the token-level clip and the loss aggregation."""
    clip_eps: Annotated[float, Range(gt=0, le=1)] = 0.2
    """epsilon of the clipped ratio: r is clipped to [1 - eps, 1 + eps]"""
    loss_agg: Literal["sequence", "token", "constant"] = "token"
    """sequence: per-response mean, then mean (GRPO paper); token: mean over the batch's tokens
    (DAPO, TRL's default); constant: sum / (responses x max_new_tokens) (Dr. GRPO)"""


def grpo_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    """-J on a minibatch: logp, old_logp, ref_logp, mask (N, T - 1) in the shifted layout of
    core/nn/sequences.token_logprobs; advantages (N,), one per response, shared by its tokens."""
    ratio = torch.exp(logp - old_logp)                                      # r_it
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
    surrogate = torch.min(unclipped, clipped)                               # pessimistic of the two
    kl = k3_kl(logp, ref_logp)                                              # D_it >= 0
    loss = aggregate(-(surrogate - cfg.beta * kl), mask, cfg.loss_agg, cfg.max_new_tokens)
    with torch.no_grad():
        on = mask.bool()
        was_clipped = (clipped < unclipped)[on]                             # the clip is the active term
        stats = {"kl": kl_to_reference(logp, old_logp, ref_logp, mask),
                 "clip_fraction": was_clipped.float().mean().item(),
                 "ratio_std": ratio[on].std().item() if on.sum() > 1 else 0.0}
    return loss, stats


def run(cfg: Config, ctx) -> dict:
    metrics = train(cfg, ctx, grpo_objective)
    plot(ctx)
    return metrics


def plot(ctx) -> None:
    train_rows, evals = ctx.tables["train"], ctx.tables["eval"]
    steps = [r["step"] for r in train_rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = (("reward", "mean reward of the samples"), ("kl", "KL to the sft model (k3 weighted by pi / pi_old)"),
              ("clip_fraction", "clipped share of tokens"), ("response_length", "response tokens"),
              ("zero_variance_groups", "groups with equal rewards (no gradient)"))
    for ax, (key, title) in zip(axes.flat[1:], panels):
        ax.plot(steps, [r[key] for r in train_rows], lw=0.9)
        ax.set_title(title)
        ax.set_xlabel("step")
    ax = axes.flat[0]
    ax.plot([r["step"] for r in evals], [r["sampled"] for r in evals], "o-", label="sampled (pass@1)")
    ax.plot([r["step"] for r in evals], [r["greedy"] for r in evals], "s--", label="greedy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out accuracy")
    ax.set_xlabel("step")
    fig.tight_layout()
    ctx.save_figure(fig, "grpo.png")
