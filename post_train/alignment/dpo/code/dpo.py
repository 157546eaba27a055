"""Direct Preference Optimization (DPO) of the sft chat model on preference pairs, with the IPO and the
conservative (label-smoothed) variants and a sweep of beta.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".
The KL-regularised RLHF objective

    max_pi  E_x [ E_{y ~ pi} r(x, y)  -  beta KL( pi(.|x) || pi_ref(.|x) ) ]

is maximised by pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so every reward can be written through
its optimal policy, r(x, y) = beta log pi*(y|x)/pi_ref(y|x) + beta log Z(x). In the Bradley-Terry model
p(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)) the partition function Z(x) cancels, and the likelihood
of the preferences becomes a loss on the policy alone (eq. 7):

    L_DPO = - E log sigma( beta h ),   h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

    implicit reward  r_hat(x, y) = beta (log pi(y|x) - log pi_ref(y|x))
    gradient         - beta sigma(-beta h) [grad log pi(y_w|x) - grad log pi(y_l|x)]: a pair the policy
                     already ranks right by a wide margin weighs little

log pi(y|x) sums the reply's token log-probs, read from shifted logits (core/rl/preference.py). At step 0
the policy is the reference, so h = 0 and L = -log sigma(0) = ln 2 exactly: the run checks it.

Variants (`loss_type`, `label_smoothing`):
    ipo   L = (h - 1/(2 beta))^2        Azar et al. 2023 (IPO), eq. 17 with tau = beta. When every pair
          is preferred with certainty (here: chosen is right by construction), DPO's optimum is
          h -> infinity, held back only by early stopping; IPO's squared loss pulls h to a finite target
    cDPO  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)      Mitchell 2023: each label is
          taken as flipped with probability eps, so the optimum is the finite h = log((1 - eps)/eps) / beta

The pairs, the batching, the loop and the measurements are core/rl/preference.py; this file is the
objective and the beta sweep.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from core.config import Length, Range
from core.data.preferences import KINDS
from core.rl.preference import Objective, PairLogps, PreferenceConfig, arm, plot_log_probs, train


@dataclass
class Config(PreferenceConfig):
    """Every field of the shared PreferenceConfig (pairs, steps, batch, lr, ...; see
    core/rl/preference.py or `--help`) plus DPO's own."""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 100
    """optimizer steps of the main run and of each sweep point (from the sft model DPO moves fast: 30 steps
    took the held-out pairs ranked right from 0.5 to 0.86 while writing this; a step of 16 pairs costs about a
    second on one core, so 100 steps keep the run with its sweep near 8 minutes)"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 25
    """steps between measurements on the held-out pairs (answers are measured before and after only)"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 3e-5
    """peak AdamW learning rate (at 1e-4 the toy run's chosen replies lose likelihood, the KL to the sft model
    grows 27-fold and fewer answers are right than the sft model's, while the reward accuracy still rises)"""
    beta: Annotated[float, Range(gt=0, le=10)] = 0.1
    """beta: the price of KL(pi || pi_ref) in the objective DPO solves (the paper's and TRL's default 0.1);
    a smaller beta lets the policy move further from the sft model"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO, -log sigma(beta h); ipo: (h - 1/(2 beta))^2"""
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0
    """eps of conservative DPO: the share of labels assumed flipped (sigmoid loss only; 0 is plain DPO)"""
    betas: Annotated[tuple[float, ...], Range(gt=0, le=10), Length(0, 8)] = (0.01, 1.0)
    """beta sweep: each value trains another policy from the same sft model on the same pairs and steps, and
    is measured like the main run (empty: no sweep). The main run's beta is always a point of it"""

    def problems(self) -> list[str]:
        if self.loss_type == "ipo" and self.label_smoothing > 0:
            return [f"label_smoothing={self.label_smoothing} applies to the sigmoid loss only, not loss_type=ipo"]
        return []


def log_ratio_margin(policy: PairLogps, reference: PairLogps) -> torch.Tensor:
    """h: how much more the policy raised the chosen reply over the reference than the rejected one."""
    return (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)


def dpo_loss(policy: PairLogps, reference: PairLogps, cfg: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    h = log_ratio_margin(policy, reference)
    if cfg.loss_type == "ipo":
        losses = (h - 1 / (2 * cfg.beta)) ** 2
    else:
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)
    return losses.mean(), {"h": h.detach().mean()}


def implicit_rewards(policy: PairLogps, reference: PairLogps, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """r_hat = beta (log pi - log pi_ref) of chosen and of rejected."""
    return cfg.beta * (policy.chosen - reference.chosen), cfg.beta * (policy.rejected - reference.rejected)


DPO = Objective(loss=dpo_loss, rewards=implicit_rewards, uses_reference=True)


def loss_at_zero(cfg: Config) -> float:
    """The loss when the policy is the reference (h = 0), in closed form: ln 2 for the sigmoid loss
    whatever eps ((1 - eps) ln 2 + eps ln 2), 1/(4 beta^2) for IPO."""
    return 1 / (4 * cfg.beta ** 2) if cfg.loss_type == "ipo" else math.log(2)


def run(cfg: Config, ctx) -> dict:
    ctx.say(f"DPO from the sft model, a frozen copy of it as the reference; {cfg.loss_type} loss, beta = {cfg.beta}")
    metrics, start, tok = train(cfg, ctx, DPO, "sft")
    metrics["step0_loss_closed_form"] = loss_at_zero(cfg)
    metrics["step0_loss_error"] = abs(metrics["step0_loss"] - metrics["step0_loss_closed_form"])
    ctx.say(f"step-0 loss {metrics['step0_loss']:.9f} against the closed form {metrics['step0_loss_closed_form']:.9f}; "
            f"sampled KL to the sft model {metrics['kl']:.3f} nats per response")

    points = {cfg.beta: {k: metrics[k] for k in SWEEP_COLUMNS}}
    for beta in sorted(set(cfg.betas) - {cfg.beta}):
        points[beta] = {k: v for k, v in arm(dataclasses.replace(cfg, beta=beta), DPO, start, tok, ctx).items()
                        if k in SWEEP_COLUMNS}
    for beta in sorted(points):
        row = points[beta]
        ctx.log("beta_sweep", beta=beta, **row, log_ratio_margin=row["reward_margin"] / beta)
        ctx.say(f"beta {beta:g}: held-out pairs ranked right {row['reward_accuracy']:.3f}, log-ratio margin "
                f"{row['reward_margin'] / beta:.2f}, KL {row['kl']:.3f}, answers right {row['answer_accuracy']:.3f} "
                f"(any phrasing {row['answer_lenient']:.3f})")
    metrics["kl_smallest_beta"] = points[min(points)]["kl"]
    metrics["kl_largest_beta"] = points[max(points)]["kl"]
    plot(ctx)
    return metrics


SWEEP_COLUMNS = ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected", "kl",
                 "answer_accuracy", "answer_lenient", "answer_format", *(f"reward_accuracy_{k}" for k in KINDS))


def plot(ctx) -> None:
    train_rows, evals, sweep = ctx.tables["train"], ctx.tables["train_eval"], ctx.tables["beta_sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot([r["step"] for r in evals], [r["reward_accuracy"] for r in evals], "o-", label="held-out reward accuracy")
    ax.plot([r["step"] for r in train_rows], [r["reward_accuracy"] for r in train_rows], lw=0.6, alpha=0.5,
            label="training batch")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_title("chosen ranked above rejected (tie = 1/2)")
    ax.legend()
    plot_log_probs(axes[1], evals)
    axes[1].legend()
    ax = axes[2]
    betas = [r["beta"] for r in sweep]
    ax.plot(betas, [r["answer_lenient"] for r in sweep], "o-", label="answers right, any phrasing")
    ax.plot(betas, [r["answer_accuracy"] for r in sweep], "s-", label='answers right as "The answer is N."')
    ax.plot(betas, [r["reward_accuracy"] for r in sweep], "^-", label="held-out reward accuracy")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("beta")
    ax.legend(loc="lower right", fontsize=8)
    kl = ax.twinx()
    kl.plot(betas, [r["kl"] for r in sweep], "kx--", label="KL to the sft model")
    kl.set_ylabel("sampled KL(pi || pi_ref), nats per response (x, dashed)")
    ax.set_title("beta sweep (same pairs, steps, lr)")
    fig.tight_layout()
    ctx.save_figure(fig, "dpo.png")
