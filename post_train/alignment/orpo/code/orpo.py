"""Odds Ratio Preference Optimization (ORPO): supervised fine-tuning and preference alignment in one loss,
from the pretrained base model, with no reference model.

Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model":

    L_ORPO  = L_SFT + lambda L_OR
    L_SFT   = - mean over the chosen replies' tokens of log pi(y_t | x, y_<t)       sft's loss, on y_w only
    L_OR    = - log sigma( log odds(y_w|x) - log odds(y_l|x) )
    odds(y|x) = P(y|x) / (1 - P(y|x)),    P(y|x) = exp( (1/|y|) sum_t log pi(y_t | x, y_<t) )

    log odds = log P - log(1 - P) = m - log(1 - e^m),  m = the mean per-token log-prob (<= 0)
    gradient  d log odds / dm = 1 / (1 - P): grad L_OR = - sigma(-log odds ratio) [grad m_w / (1 - P_w)
              - grad m_l / (1 - P_l)], so a pair weighs more while the rejected reply's odds are high

Why P is length-normalised (the paper defines it so): with the summed log-prob, P of a 15-token reply is
exp(-30) ~ 1e-13 for an unlikely reply and well below 1 even for a likely one, so log(1 - P) ~ 0 and the
log-odds ratio collapses to the plain log-likelihood ratio log P_w - log P_l, which grows with the length
difference of the replies and can be driven to infinity by pushing the rejected reply's probability to 0.
The per-token mean keeps P in a range where 1 - P matters (a confident model's P is near 1 here), and makes
a long reply and a short one comparable.

Why no reference: L_SFT anchors the policy to the chosen replies (what a reference model and the KL do in
DPO), and L_OR only needs the policy's own odds. One model in memory and one forward per pair instead
of two models; but nothing holds the policy near where it started except the chosen data.

log(1 - e^m) is computed as log(-expm1(m)) for m > -ln 2 and log1p(-exp(m)) below (Maechler 2012,
"Accurately computing log(1 - exp(-|a|))"): each form is exact where the other loses digits. TRL's
log1p(-exp(m)) alone returns -inf in float32 once m > -6e-8 (exp(m) rounds to 1), and a fine-tuned
model's mean log-prob on its own chosen reply gets there.

The same loop with lambda = 0 is SFT on the chosen replies alone: the run trains that control too, from
the same base on the same pairs and steps, and compares. The pairs, batching, loop and measurements are
core/rl/preference.py; this file is the objective.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from core.config import Range
from core.rl.preference import Objective, PairLogps, PreferenceConfig, arm, plot_log_probs, train


@dataclass
class Config(PreferenceConfig):
    """Every field of the shared PreferenceConfig (pairs, steps, batch, lr, ...; see
    core/rl/preference.py or `--help`) plus ORPO's lambda."""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 300
    """optimizer steps (from the base model the task itself is learned here: sft takes 600 steps of 32
    demonstrations for it; this budget is a fraction of that, twice over for the lambda = 0 control)"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 8
    """pairs per step (2 x batch_size rows in the forward); at a fixed time budget, more small steps learn
    the task from the base model a little faster than fewer large ones"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 2e-3
    """peak AdamW learning rate (of the order of sft's: L_SFT is sft's loss, learning the task from scratch)"""
    lam: Annotated[float, Range(ge=0, le=10)] = 0.1
    """lambda: the weight of the odds-ratio term (TRL's default, its `beta`, is 0.1); 0 is SFT on the
    chosen replies alone"""


def log1mexp(m: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(m)) for m < 0, accurate on both sides of -ln 2."""
    return torch.where(m > -math.log(2), torch.log(-torch.expm1(m)), torch.log1p(-torch.exp(m)))


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) with P = exp(mean_logp)."""
    return mean_logp - log1mexp(mean_logp)


def mean_logps(policy: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """The length-normalised log-probs (per-token means) of chosen and rejected."""
    return policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens


def orpo_loss(policy: PairLogps, reference: None, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    nll = -policy.chosen.sum() / policy.chosen_tokens.sum()     # token mean over the batch, as sft_loss takes it
    chosen, rejected = mean_logps(policy)
    log_odds_ratio = log_odds(chosen) - log_odds(rejected)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio).mean()
    return nll + cfg.lam * odds_ratio_loss, {"nll": nll.detach(), "odds_ratio_loss": odds_ratio_loss.detach(),
                                            "log_odds_ratio": log_odds_ratio.detach().mean()}


def odds_rewards(policy: PairLogps, reference: None, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """What L_OR ranks the replies by: their log odds."""
    chosen, rejected = mean_logps(policy)
    return log_odds(chosen), log_odds(rejected)


ORPO = Objective(loss=orpo_loss, rewards=odds_rewards, uses_reference=False)

CONTROL_COLUMNS = ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected",
                   "answer_accuracy", "answer_lenient", "answer_format")


def run(cfg: Config, ctx) -> dict:
    ctx.say(f"ORPO from the pretrained base model: no sft stage, no reference model; lambda = {cfg.lam}")
    metrics, base, tok = train(cfg, ctx, ORPO, "nanogpt")
    control = arm(dataclasses.replace(cfg, lam=0.0), ORPO, base, tok, ctx)
    metrics.update({f"nll_only_{k}": control[k] for k in CONTROL_COLUMNS})
    for name, row in (("orpo", metrics), ("nll_only", control)):
        ctx.log("comparison", run=name, lam=cfg.lam if name == "orpo" else 0.0, **{k: row[k] for k in CONTROL_COLUMNS})
    ctx.say(f"the same steps with lambda = 0 (SFT on the chosen replies alone): held-out pairs ranked right "
            f"{control['reward_accuracy']:.3f} (ORPO {metrics['reward_accuracy']:.3f}), log-odds margin "
            f"{control['reward_margin']:.2f} ({metrics['reward_margin']:.2f}), log-prob of rejected "
            f"{control['logp_rejected']:.2f} ({metrics['logp_rejected']:.2f}), answers right "
            f"{control['answer_accuracy']:.3f} ({metrics['answer_accuracy']:.3f})")
    plot(ctx)
    return metrics


def plot(ctx) -> None:
    train_rows, evals, comparison = ctx.tables["train"], ctx.tables["train_eval"], ctx.tables["comparison"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = [r["step"] for r in train_rows]
    ax = axes[0]
    ax.plot(steps, [r["nll"] for r in train_rows], lw=0.8, label="L_SFT (chosen)")
    ax.plot(steps, [r["odds_ratio_loss"] for r in train_rows], lw=0.8, label="L_OR")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("the two terms of the loss (training batches)")
    ax.legend()
    ax = axes[1]
    plot_log_probs(ax, evals)
    control = comparison[1]
    ax.plot([evals[-1]["step"]], [control["logp_chosen"]], "C0x", ms=10, label="chosen, lambda = 0")
    ax.plot([evals[-1]["step"]], [control["logp_rejected"]], "C1x", ms=10, label="rejected, lambda = 0")
    ax.legend(fontsize=8)
    ax = axes[2]
    keys = ("reward_accuracy", "answer_accuracy", "answer_lenient", "answer_format")
    width = 0.38
    for i, row in enumerate(comparison):
        ax.bar([k + (i - 0.5) * width for k in range(len(keys))], [row[k] for k in keys], width,
               label=f"{row['run']} (lambda = {row['lam']:g})")
    ax.set_xticks(range(len(keys)), ["pairs ranked\nright", "answers\nright", "right, any\nphrasing", "answer\nformat"])
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out, after the same steps from the base model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.save_figure(fig, "orpo.png")
