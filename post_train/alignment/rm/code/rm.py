"""A reward model for RLHF: the sft model with a scalar head, trained on preference pairs with the
Bradley-Terry loss, in one file.

Bradley & Terry 1952; Christiano et al. 2017; Ouyang et al. 2022 (InstructGPT, Sec. 3.5, eq. 1):

    P(y_w > y_l | x) = sigma( r(x, y_w) - r(x, y_l) )                     the preference model
    L_BT             = - E_(x, y_w, y_l) [ log sigma( r(x, y_w) - r(x, y_l) ) ]
    r(x, y)          = w^T h_L(x, y)[last real token] + b                  core/nn/heads.py

The network is the sft model (its unembedding unused) with a linear head to one number, read at the
closing <|end|> of (prompt, response): the one position whose state has seen the whole answer. Only
differences of rewards enter L_BT, so r is defined up to a constant per prompt; two choices fix it:

    centring term   L = L_BT + eta E[ (r(x, y_w) + r(x, y_l))^2 ]         Eisenstein et al. 2023
                    (TRL's center_rewards_coefficient, 0.01 there and here): pulls each pair's two
                    rewards to sum to 0, so rewards stay near 0 and cannot drift as a whole
    offset          after training, b <- b - mean_train r: the mean reward over the training
                    responses (chosen and rejected) is subtracted in the head's bias, as InstructGPT
                    normalises its RM before RL. PPO then starts from centred rewards (an advantage
                    baseline absorbs a constant, but a critic initialised near 0 and the KL penalty's
                    scale do not), and the offset travels with the saved model

The pairs (core/data/preferences.py) are right by rule, so accuracy is measurable per kind:
correct (only the digits differ: the RM must check the arithmetic), format (the answer sentence the
verifier reads), on_topic (an answer at all). Held-out prompts share nothing with the training ones.

Chosen and rejected replies go through the network in one right-padded batch, chosen rows first:
InstructGPT puts all K-choose-2 comparisons of a prompt in one batch element for the same reason,
each reply is scored once per step and the comparison is between scores of the same weights. Right
padding is safe for a causal model: a real token never attends to the pads after it, so the score
at `length - 1` equals the unpadded sequence's (the run measures it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.artifacts import UserError, atomic_write_text
from core.config import Range, Seed
from core.data.chat import chat_example
from core.data.preferences import KINDS, PreferencePair, generate_pairs
from core.data.tokenizer import Tokenizer
from core.nn.heads import ScalarHeadModel, save_scalar_model
from core.nn.model import load_model
from core.nn.sequences import right_pad
from core.nn.training import adamw_groups, cosine_lr
from core.rl import preference
from core.run_context import upstream_models

EVAL_ROWS = 256
"""sequences per forward pass when scoring without gradients"""


@dataclass
class Config:
    n_pairs: Annotated[int, Range(ge=1, le=10_000)] = 6000
    """training pairs, one per training word problem, each of a kind drawn in equal thirds"""
    tiers: Annotated[tuple[int, ...], Range(ge=1, le=3)] = (1, 2, 3)
    """difficulty tiers of the problems (core/data/word_problems.py)"""
    n_held_out: Annotated[int, Range(ge=1, le=3000)] = 300
    """held-out problems; each is made into a pair of every kind, so 3 x n_held_out held-out pairs"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 300
    """optimizer steps (600 took 14.6 min on one thread and ended where step 100 was: format and on_topic
    learned, the arithmetic at 0.55 from step 100 to 600)"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 32
    """pairs per step (2 x batch_size sequences in one forward)"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 3e-4
    """peak learning rate, backbone and head alike"""
    warmup: Annotated[int, Range(ge=0, le=100_000)] = 30
    """linear warmup steps"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """the cosine decays to min_lr_ratio * lr"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.0
    """AdamW decoupled weight decay on weight matrices"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the global gradient norm to this"""
    freeze_layers: Annotated[int, Range(ge=0, le=64)] = 0
    """lowest transformer blocks kept frozen, with the embedding when more than 0 (0: the whole
    backbone is fine-tuned, as InstructGPT does; freezing trades accuracy for less memory and less
    forgetting of what the sft model knows)"""
    center_coef: Annotated[float, Range(ge=0, le=10)] = 0.01
    """eta of the centring term eta E[(r_w + r_l)^2] (Eisenstein et al. 2023; 0 turns it off)"""
    normalize: bool = True
    """subtract the mean training reward in the head's bias after training, so the saved model's
    rewards are centred for PPO"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """steps between held-out accuracy measurements"""
    seed: Seed = 0
    """seeds the pairs and the batches (the head starts at zero, so nothing else is random)"""


# --- the loss ----------------------------------------------------------------------------------
def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, center_coef: float = 0.0) -> Tensor:
    """-mean log sigma(r_w - r_l) + eta mean (r_w + r_l)^2 over a batch of pairs (B,), (B,).
    logsigmoid, not log(sigmoid(.)): sigmoid underflows to 0 for a margin below about -100 and the log is -inf."""
    bt = -F.logsigmoid(r_chosen - r_rejected).mean()
    return bt + center_coef * ((r_chosen + r_rejected) ** 2).mean()


# --- data --------------------------------------------------------------------------------------
def encode_pairs(tok: Tokenizer, pairs: Sequence[PreferencePair], block_size: int
                 ) -> tuple[list[tuple[list[int], list[int]]], list[PreferencePair]]:
    """(chosen ids, rejected ids) of each pair whose two conversations fit the context, and those pairs.
    Each conversation is the sft chat template: prompt, reply, closing <|end|> (where the score is read)."""
    encoded, kept = [], []
    for p in pairs:
        chosen, rejected = chat_example(tok, p.prompt, p.chosen)[0], chat_example(tok, p.prompt, p.rejected)[0]
        if max(len(chosen), len(rejected)) <= block_size:
            encoded.append((chosen, rejected))
            kept.append(p)
    return encoded, kept


def pair_rewards(model: ScalarHeadModel, batch: Sequence[tuple[list[int], list[int]]], pad_id: int
                 ) -> tuple[Tensor, Tensor]:
    """(r_chosen (B,), r_rejected (B,)): all 2B replies in one right-padded forward, chosen rows first."""
    rows = [c for c, _ in batch] + [r for _, r in batch]
    scores = model.score(right_pad(rows, pad_id), torch.tensor([len(r) for r in rows]))
    return scores[:len(batch)], scores[len(batch):]


@torch.no_grad()
def score_pairs(model: ScalarHeadModel, encoded: Sequence[tuple[list[int], list[int]]], pad_id: int
                ) -> tuple[Tensor, Tensor]:
    """pair_rewards over any number of pairs, EVAL_ROWS sequences at a time (the model has no dropout,
    so train and eval mode score alike)."""
    chosen, rejected = [], []
    for start in range(0, len(encoded), EVAL_ROWS // 2):
        c, r = pair_rewards(model, encoded[start:start + EVAL_ROWS // 2], pad_id)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def center_head(model: ScalarHeadModel, offset: float) -> None:
    """r <- r - offset for every input, stored in the head's bias so it is saved with the model."""
    with torch.no_grad():
        model.head.bias -= offset


def freeze_lower(model: ScalarHeadModel, n_layers: int) -> None:
    if n_layers > len(model.backbone.blocks):
        raise UserError(f"freeze_layers={n_layers} exceeds the sft model's {len(model.backbone.blocks)} blocks")
    if n_layers:
        model.backbone.tok_emb.requires_grad_(False)
        for block in model.backbone.blocks[:n_layers]:
            block.requires_grad_(False)


def accuracy(r_chosen: Tensor, r_rejected: Tensor) -> float:
    """Share of pairs with r_w > r_l; a tie counts one half (an untrained zero head scores 0.5, chance)."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean().item()


# --- training ----------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict:
    sft_dir = upstream_models(ctx, "sft")
    tok = Tokenizer.load(sft_dir)
    model = ScalarHeadModel(load_model(sft_dir))
    block = model.backbone.cfg.block_size
    train, train_pairs = encode_pairs(tok, generate_pairs(cfg.n_pairs, cfg.tiers, cfg.seed, "train"), block)
    # every held-out problem as a pair of each kind: the per-kind accuracies compare the same prompts
    held = {k: encode_pairs(tok, generate_pairs(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out", {k: 1.0}), block)
            for k in KINDS}
    if not train:
        raise UserError(f"no training pair fits the sft model's block_size {block}")
    freeze_lower(model, cfg.freeze_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx.say(f"sft model {sft_dir}: {model.backbone.num_params():,} parameters ({trainable:,} trained); "
            f"{len(train)} training pairs, {sum(len(e) for e, _ in held.values())} held-out pairs")

    # the baseline: the sft model's own log-likelihood of each reply, log pi_sft(y | x), as the reward
    baseline = {}
    for kind, (_, pairs) in held.items():
        logps = preference.score_pairs(model.backbone, tok, pairs)
        baseline[kind] = accuracy(logps.chosen, logps.rejected)
    ctx.say("baseline, the sft model's log-likelihood of the reply as the reward: held-out accuracy "
            + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()))

    def evaluate(step: int) -> dict[str, tuple[Tensor, Tensor]]:
        scored = {k: score_pairs(model, encoded, tok.pad_id) for k, (encoded, _) in held.items()}
        ctx.log("eval", step=step, **{k: accuracy(*v) for k, v in scored.items()})
        return scored

    opt = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(cfg.seed)
    evaluate(0)
    for step in ctx.track(range(cfg.steps), "reward model", total=cfg.steps):
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(train), (cfg.batch_size,), generator=batches).tolist()
        r_chosen, r_rejected = pair_rewards(model, [train[i] for i in pick], tok.pad_id)
        loss = bradley_terry_loss(r_chosen, r_rejected, cfg.center_coef)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.log("train", step=step + 1, lr=lr, loss=loss.item(), accuracy=accuracy(r_chosen, r_rejected),
                reward_mean=(r_chosen + r_rejected).mean().item() / 2)
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            evaluate(step + 1)

    offset = torch.cat(score_pairs(model, train, tok.pad_id)).mean().item() if cfg.normalize else 0.0
    center_head(model, offset)
    scored = evaluate(cfg.steps)
    save_scalar_model(model, ctx.models_dir)
    tok.save(ctx.models_dir)

    chosen = torch.cat([c for c, _ in scored.values()])
    rejected = torch.cat([r for _, r in scored.values()])
    right, wrong = scored["correct"]
    losses = [r["loss"] for r in ctx.tables["train"]]
    tenth = max(1, len(losses) // 10)
    metrics = {
        "held_out_accuracy": accuracy(chosen, rejected),
        **{f"accuracy_{k}": accuracy(*v) for k, v in scored.items()},
        "baseline_accuracy": float(np.mean(list(baseline.values()))),
        "baseline_accuracy_correct": baseline["correct"],
        "correct_reward_gap": (right.mean() - wrong.mean()).item(),
        "chosen_reward_mean": chosen.mean().item(),
        "chosen_reward_std": chosen.std().item(),
        "rejected_reward_mean": rejected.mean().item(),
        "rejected_reward_std": rejected.std().item(),
        "margin_mean": (chosen - rejected).mean().item(),
        "held_out_reward_mean": torch.cat([chosen, rejected]).mean().item(),
        "reward_offset": offset,
        "padding_max_abs_diff": padding_gap(model, held["correct"][0][:16], tok.pad_id),
        "train_loss_first_10pct": float(np.mean(losses[:tenth])),
        "train_loss_last_10pct": float(np.mean(losses[-tenth:])),
        "initial_loss": losses[0],
        "train_pairs": len(train),
        "trainable_share": trainable / sum(p.numel() for p in model.parameters()),
    }
    ctx.say("held-out pairwise accuracy " + ", ".join(f"{k} {metrics['accuracy_' + k]:.3f}" for k in KINDS)
            + f" (all {metrics['held_out_accuracy']:.3f}; chance 0.5)")
    ctx.say(f"held-out rewards: chosen {metrics['chosen_reward_mean']:+.2f} ± {metrics['chosen_reward_std']:.2f}, "
            f"rejected {metrics['rejected_reward_mean']:+.2f} ± {metrics['rejected_reward_std']:.2f}, "
            f"margin {metrics['margin_mean']:.2f}; offset {offset:+.3f} subtracted in the head's bias")
    write_examples(ctx, held, scored)
    plot(ctx, scored)
    return metrics


def padding_gap(model: ScalarHeadModel, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    """max |reward from pair_rewards in a batch padded to the full context - reward of the reply alone|:
    padding must change no reward (a score read at a pad, or pads attended to, would), and the halves
    must come back as (chosen, rejected)."""
    filler = [pad_id] * model.backbone.cfg.block_size   # one more pair, as long as the context, pads the rest
    with torch.no_grad():
        batch = torch.stack(pair_rewards(model, [*pairs, (filler, filler)], pad_id), 1)[:-1]
        alone = torch.tensor([[model.score(torch.tensor([reply]), torch.tensor([len(reply)])).item() for reply in pair]
                              for pair in pairs])
    return (batch - alone).abs().max().item()


def write_examples(ctx, held: dict, scored: dict[str, tuple[Tensor, Tensor]], n: int = 3) -> None:
    lines = []
    for kind, (_, pairs) in held.items():
        r_chosen, r_rejected = scored[kind]
        for p, c, r in list(zip(pairs, r_chosen.tolist(), r_rejected.tolist()))[:n]:
            lines += [f"[{kind}] Q: {p.prompt}", f"  chosen   {c:+.2f}  {p.chosen!r}", f"  rejected {r:+.2f}  {p.rejected!r}", ""]
    atomic_write_text(ctx.path("examples.txt"), "\n".join(lines))


def plot(ctx, scored: dict[str, tuple[Tensor, Tensor]]) -> None:
    train, evals = ctx.tables["train"], ctx.tables["eval"]
    fig, (ax_loss, ax_acc, ax_hist) = plt.subplots(1, 3, figsize=(15, 4))
    window = max(1, len(train) // 30)
    steps = [r["step"] for r in train][window - 1:]
    ax_loss.plot(steps, np.convolve([r["loss"] for r in train], np.ones(window) / window, "valid"))
    ax_loss.axhline(math.log(2), ls=":", c="gray", label="ln 2 (zero head)")
    ax_loss.set_title(f"training loss ({window}-step mean)")
    ax_loss.set_xlabel("step")
    ax_loss.legend()
    for kind, style in zip(scored, ("o-", "s--", "^:")):   # format and on_topic often coincide: both stay visible
        ax_acc.plot([r["step"] for r in evals], [r[kind] for r in evals], style, label=kind)
    ax_acc.axhline(0.5, ls=":", c="gray")
    ax_acc.set_ylim(0.4, 1.02)
    ax_acc.set_title("held-out pairwise accuracy")
    ax_acc.set_xlabel("step")
    ax_acc.legend()
    every = torch.cat([torch.cat(pair) for pair in scored.values()])
    bins = np.linspace(every.min().item(), every.max().item(), 40)
    ax_hist.hist(scored["correct"][0].numpy(), bins, histtype="step", lw=2, label="chosen (the same reply in every kind)")
    for kind, (_, rejected) in scored.items():
        ax_hist.hist(rejected.numpy(), bins, histtype="step", label=f"rejected: {kind}")
    ax_hist.set_title("held-out rewards after centring")
    ax_hist.set_xlabel("r(x, y)")
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    ctx.save_figure(fig, "rm.png")
