"""Group Sequence Policy Optimization (GSPO) on the same word problems, from the same sft model.

Zheng et al. 2025 (Qwen team), "Group Sequence Policy Optimization", Eqs. 5-7: the reward belongs to
the whole response, so the importance ratio should too. GSPO replaces GRPO's per-token ratio with the
length-normalised sequence ratio, the geometric mean of the token ratios,

    s_i(theta) = ( pi_theta(y_i | x) / pi_old(y_i | x) )^(1/|y_i|)
               = exp( 1/|y_i| sum_t log( pi_theta(y_it | x, y_i,<t) / pi_old(y_it | x, y_i,<t) ) )

    J(theta) = E[ 1/G sum_i min( s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i ) ]

with the same group-relative advantage A_i. One ratio and one clip decision per response: a response
is kept or dropped whole, instead of the token-by-token noise of GRPO, whose per-token ratios are
single-sample importance weights that do not correct the sequence-level distribution shift. Because
s_i averages |y_i| log-ratios, it moves far less than a token ratio, so the clip range is tiny: the
paper's 3e-4 / 4e-4 (Sec. 5.1), against GRPO's 0.2. The paper uses no KL term (beta = 0 here).

The run also reads the grpo run of the same preset (built first if there is none) and plots the two
side by side: ratio spread, clip fraction and held-out accuracy.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import torch

from core.config import Range
from core.rl.group_policy import GroupPolicyConfig, k3_kl, kl_to_reference, train
from core.run_context import upstream_run


@dataclass
class Config(GroupPolicyConfig):
    """Every field of the shared GroupPolicyConfig (see core/rl/group_policy.py or `--help`) plus
    the sequence-level clip range."""
    beta: Annotated[float, Range(ge=0, le=10)] = 0.0
    """weight of the k3 KL penalty to the frozen sft model (the GSPO paper uses none)"""
    clip_low: Annotated[float, Range(gt=0, le=1)] = 3e-4
    """s_i is clipped below at 1 - clip_low (GSPO paper, Sec. 5.1: 3e-4)"""
    clip_high: Annotated[float, Range(gt=0, le=1)] = 4e-4
    """s_i is clipped above at 1 + clip_high (GSPO paper: 4e-4)"""


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = exp(mean over the response tokens of log pi - log pi_old): (N, T - 1) -> (N,)."""
    return torch.exp(((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1))


def gspo_objective(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, dict[str, float]]:
    """-J on a minibatch (shapes as in grpo_objective); the KL is kept as a per-token penalty when beta > 0."""
    ratio = sequence_ratio(logp, old_logp, mask)                            # s_i
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    surrogate = torch.min(unclipped, clipped)
    kl = k3_kl(logp, ref_logp)
    kl_per_sequence = (kl * mask).sum(1) / mask.sum(1).clamp(min=1)
    loss = -(surrogate - cfg.beta * kl_per_sequence).mean()               # 1/G sum_i, no 1/|y_i| outside
    with torch.no_grad():
        stats = {"kl": kl_to_reference(logp, old_logp, ref_logp, mask),
                 "clip_fraction": (clipped < unclipped).float().mean().item(),
                 "ratio_std": ratio.std().item() if len(ratio) > 1 else 0.0}
    return loss, stats


def run(cfg: Config, ctx) -> dict:
    grpo_out = upstream_run(ctx, "grpo")[1]
    metrics = train(cfg, ctx, gspo_objective)
    plot(ctx, read_table(grpo_out / "train.csv"), read_table(grpo_out / "eval.csv"))
    return metrics


def read_table(path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot(ctx, grpo_train: list[dict], grpo_eval: list[dict]) -> None:
    """GSPO against GRPO on the same task and chain: ratio spread, clip fraction, held-out accuracy."""
    runs = {"GSPO (sequence ratio)": (ctx.tables["train"], ctx.tables["eval"]),
            "GRPO (token ratios)": (grpo_train, grpo_eval)}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, (train_rows, evals) in runs.items():
        steps = [r["step"] for r in train_rows]
        axes[0].plot(steps, [r["ratio_std"] for r in train_rows], label=label)
        axes[1].plot(steps, [r["clip_fraction"] for r in train_rows], label=label)
        axes[2].plot([r["step"] for r in evals], [r["sampled"] for r in evals], "o-", label=label)
    for ax, title in zip(axes, ("std of the importance ratios", "clipped share (sequences / tokens)",
                                "held-out accuracy (sampled)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    ctx.save_figure(fig, "gspo_vs_grpo.png")
