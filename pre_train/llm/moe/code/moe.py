"""Router behaviour of a mixture-of-experts layer, made visible on a tiny next-token model.

Data: a synthetic order-2 Markov source over a small vocabulary (sparse Dirichlet next-token
tables), generated here from the seed, so the exact conditional entropy H(next | 2 previous) is a
known floor and the unigram entropy a baseline. Model: embed the two previous tokens, one residual
MoE feed-forward block (core/nn/moe.py), predict the next token:

    h = W_in [emb(a); emb(b)]
    h = h + MoE(RMSNorm(h))                                    # the layer under study
    logits = W_out RMSNorm(h)
    loss = CE(logits, next) + aux_coef * aux                   # aux = E * sum_i f_i P_i  (= 1 at balance)

Three variants trained on the same data and step budget:
    no_aux     Switch-style top-1 routing (top_k, renormalize configurable: Mixtral is top-2 renormalised),
               aux_coef = 0                                   -> the router is free to collapse
    aux        the same with the load-balancing loss
    deepseek   DeepSeekMoE: fine-grained experts (split m: m*E experts of width d_hidden/m) and
               n_shared always-on experts, top (m*k - n_shared) routed, softmax weights without
               renormalisation, with the aux loss; active FFN width equals the other two's.
Load imbalance = max_i n_i / mean_i n_i over the experts' routed assignments n_i (1 = perfect).
After training, each model is evaluated at several capacity factors: dropped-assignment rate and
val loss when the over-capacity assignments are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.config import Range, Seed
from core.nn.moe import MoE

VARIANTS = ("no_aux", "aux", "deepseek")


@dataclass
class Config:
    vocab_size: Annotated[int, Range(ge=2, le=256)] = 32
    """tokens of the synthetic Markov source"""
    dirichlet_alpha: Annotated[float, Range(ge=1e-3, le=100)] = 0.1
    """concentration of each context's next-token distribution (small: few likely successors)"""
    zipf_exponent: Annotated[float, Range(ge=0, le=4)] = 1.0
    """token frequencies follow a Zipf law 1 / rank^s, as in natural text (0: all tokens alike)"""
    train_tokens: Annotated[int, Range(ge=100, le=5_000_000)] = 200_000
    """length of the generated training sequence"""
    val_tokens: Annotated[int, Range(ge=100, le=100_000)] = 20_000
    """length of the generated validation sequence"""
    d_model: Annotated[int, Range(ge=1, le=256)] = 32
    """residual width"""
    d_hidden: Annotated[int, Range(ge=1, le=1024)] = 32
    """hidden width of one (Mixtral-style) expert"""
    n_experts: Annotated[int, Range(ge=2, le=64)] = 8
    """routed experts of the Mixtral-style variants"""
    top_k: Annotated[int, Range(ge=1, le=64)] = 1
    """experts per token of the no_aux / aux variants (Switch: 1; Mixtral: 2)"""
    renormalize: bool = False
    """Mixtral: top-k weights renormalised to sum to 1 (no_aux / aux variants). Keep false at top_k=1:
    renormalised top-1 weights are constant 1 and the router gets no task gradient"""
    fine_grained_split: Annotated[int, Range(ge=1, le=8)] = 2
    """DeepSeekMoE split m: m * n_experts experts of width d_hidden / m"""
    n_shared: Annotated[int, Range(ge=0, le=64)] = 1
    """DeepSeekMoE shared experts (each of width d_hidden / m); they take shared slots out of m * top_k"""
    aux_coef: Annotated[float, Range(ge=0, le=10)] = 0.1
    """weight of the load-balancing loss in the aux and deepseek variants (Switch used 0.01 over far
    more steps; 0.01 is too weak to undo the collapse within this budget)"""
    steps: Annotated[int, Range(ge=1, le=1_000_000)] = 1500
    """optimizer steps per variant"""
    batch_size: Annotated[int, Range(ge=1, le=65536)] = 256
    """(context, next token) pairs per step"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """Adam learning rate"""
    log_every: Annotated[int, Range(ge=1, le=1_000_000)] = 25
    """steps between load measurements on the validation set"""
    capacity_factors: Annotated[tuple[float, ...], Range(gt=0, le=64)] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
    """capacity factors evaluated after training"""
    seed: Seed = 0
    """seed of the Markov source, the data and (through execute) the weights"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        found = []
        if self.top_k > self.n_experts:
            found.append(f"top_k={self.top_k} must not exceed n_experts={self.n_experts}")
        m = self.fine_grained_split
        if self.d_hidden % m:
            found.append(f"d_hidden={self.d_hidden} must divide into fine_grained_split={m} equal experts")
        if self.n_shared >= m * self.top_k:
            found.append(f"n_shared={self.n_shared} must be below fine_grained_split x top_k = {m * self.top_k}: "
                         f"the deepseek variant needs a routed expert among its active slots")
        return found


# --- data: an order-2 Markov source -------------------------------------------------------------

def markov_source(cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """table[a, b] = p(next | previous two tokens a, b), each row ~ Dirichlet(alpha * V * zipf),
    zipf_r = r^-s / sum_r' r'^-s: rows are sparse and frequent tokens are frequent everywhere."""
    V = cfg.vocab_size
    zipf = np.arange(1, V + 1, dtype=float) ** -cfg.zipf_exponent
    return rng.dirichlet(cfg.dirichlet_alpha * V * zipf / zipf.sum(), size=(V, V))


def sample_sequence(table: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    V = table.shape[0]
    cumulative = table.cumsum(axis=-1)
    u = rng.random(length)
    seq = np.empty(length, dtype=np.int64)
    seq[:2] = rng.integers(V, size=2)
    for t in range(2, length):
        row = cumulative[seq[t - 2], seq[t - 1]]
        seq[t] = min(np.searchsorted(row, u[t], side="right"), V - 1)  # inverse-CDF sampling
    return seq


def as_pairs(seq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts (N, 2), next tokens (N,)) for every position of the sequence."""
    contexts = np.stack([seq[:-2], seq[1:-1]], axis=1)
    return torch.from_numpy(contexts), torch.from_numpy(seq[2:].copy())


def entropy_nats(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def conditional_entropy(table: np.ndarray, contexts: torch.Tensor) -> float:
    """H(next | a, b) averaged over the observed contexts: the best loss any model can reach."""
    per_context = -(table * np.log(np.clip(table, 1e-300, None))).sum(-1)
    return float(per_context[contexts[:, 0].numpy(), contexts[:, 1].numpy()].mean())


# --- model ---------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)  # x / rms(x)


class MoENextToken(nn.Module):
    def __init__(self, cfg: Config, moe: MoE):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.mix = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.norm_ffn, self.moe = RMSNorm(cfg.d_model), moe
        self.norm_out, self.head = RMSNorm(cfg.d_model), nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.embed(contexts).flatten(1))           # W_in [emb(a); emb(b)]
        h = h + self.moe(self.norm_ffn(h))                      # pre-norm residual MoE block
        return self.head(self.norm_out(h))


def build_moe(cfg: Config, variant: str) -> MoE:
    if variant == "deepseek":
        m = cfg.fine_grained_split
        return MoE(cfg.d_model, cfg.d_hidden // m, n_experts=m * cfg.n_experts,
                   top_k=m * cfg.top_k - cfg.n_shared, n_shared=cfg.n_shared, renormalize=False)
    return MoE(cfg.d_model, cfg.d_hidden, cfg.n_experts, cfg.top_k, renormalize=cfg.renormalize)


def load_imbalance(tokens_per_expert: torch.Tensor) -> float:
    """max_i n_i / mean_i n_i: 1.0 when balanced, n_experts when one expert takes everything."""
    n = tokens_per_expert.float()
    return float(n.max() / n.mean())


@torch.no_grad()
def evaluate(model: MoENextToken, contexts: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    loss = F.cross_entropy(model(contexts), targets)
    moe = model.moe
    return {"val_loss": float(loss), "aux": float(moe.aux_loss), "imbalance": load_imbalance(moe.tokens_per_expert),
            "dropped_fraction": moe.dropped_fraction}


def train_variant(cfg: Config, variant: str, train, val, rng: np.random.Generator, ctx) -> MoENextToken:
    model = MoENextToken(cfg, build_moe(cfg, variant))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    aux_coef = 0.0 if variant == "no_aux" else cfg.aux_coef
    contexts, targets = train
    for step in ctx.track(range(cfg.steps + 1), f"training {variant}", total=cfg.steps + 1):
        if step % cfg.log_every == 0 or step == cfg.steps:
            ctx.log("history", variant=variant, step=step, **evaluate(model, *val))
        if step == cfg.steps:
            break
        batch = torch.from_numpy(rng.integers(len(targets), size=cfg.batch_size))
        ce = F.cross_entropy(model(contexts[batch]), targets[batch])
        loss = ce + aux_coef * model.moe.aux_loss               # L = CE + alpha * E * sum_i f_i P_i
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model


def perfect_balance_aux(n_experts: int, top_k: int, rng: np.random.Generator) -> float:
    """The aux loss of a real MoE forward whose routing is perfectly balanced by construction:
    router = identity, token i's input = the same random logit vector rolled by i, so the
    router-probability rows are permutations of each other (P_i = 1/E) and every expert is chosen
    by exactly k tokens (f_i = 1/E). Documented value: E * sum_i (1/E)(1/E) = 1."""
    moe = MoE(n_experts, 1, n_experts, top_k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(n_experts))
    logits = torch.from_numpy(rng.normal(size=n_experts)).float()
    with torch.no_grad():
        moe(torch.stack([logits.roll(i) for i in range(n_experts)]))
    return float(moe.aux_loss)


@torch.no_grad()
def capacity_sweep(cfg: Config, models: dict[str, MoENextToken], val, ctx) -> None:
    for variant, model in models.items():
        for factor in cfg.capacity_factors:
            model.moe.capacity_factor = factor
            ctx.log("capacity", variant=variant, capacity_factor=factor, **evaluate(model, *val))
        model.moe.capacity_factor = None


def plot_history(ctx, history: list[dict], baselines: dict[str, float]) -> None:
    fig, (ax_imb, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        rows = [r for r in history if r["variant"] == variant]
        steps = [r["step"] for r in rows]
        ax_imb.plot(steps, [r["imbalance"] for r in rows], label=variant)
        ax_loss.plot(steps, [r["val_loss"] for r in rows], label=variant)
    ax_imb.axhline(1.0, color="gray", ls=":", label="perfect balance")
    ax_imb.set(xlabel="step", ylabel="max / mean tokens per expert", title="load imbalance (val set)")
    for name, value in baselines.items():
        ax_loss.axhline(value, ls=":", color="gray")
        ax_loss.annotate(name, (0, value), fontsize=8, va="bottom")
    ax_loss.set(xlabel="step", ylabel="val cross-entropy (nats)", title="next-token loss")
    ax_imb.legend(), ax_loss.legend()
    ctx.save_figure(fig, "imbalance_over_training.png")


def plot_load_histograms(ctx, loads: dict[str, torch.Tensor]) -> None:
    fig, axes = plt.subplots(1, len(loads), figsize=(4 * len(loads), 3.5))
    for ax, (variant, n) in zip(axes, loads.items()):
        share = (n.float() / n.sum()).numpy()
        ax.bar(range(len(share)), share)
        ax.axhline(1 / len(share), color="gray", ls=":", label="uniform")
        ax.set(title=f"{variant}: imbalance {load_imbalance(n):.2f}", xlabel="expert", ylabel="share of assignments")
        ax.legend()
    ctx.save_figure(fig, "expert_load_histograms.png")


def plot_capacity(ctx, rows: list[dict]) -> None:
    fig, (ax_drop, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        factors = [r["capacity_factor"] for r in mine]
        ax_drop.plot(factors, [r["dropped_fraction"] for r in mine], "o-", label=variant)
        ax_loss.plot(factors, [r["val_loss"] for r in mine], "o-", label=variant)
    ax_drop.set(xlabel="capacity factor", ylabel="dropped assignments", title="capacity factor vs drop rate")
    ax_loss.set(xlabel="capacity factor", ylabel="val loss with dropping", title="cost of dropping")
    ax_drop.legend(), ax_loss.legend()
    ctx.save_figure(fig, "capacity_vs_dropped.png")


def run(cfg: Config, ctx) -> dict[str, float]:
    rng = np.random.default_rng(cfg.seed)
    table = markov_source(cfg, rng)
    train = as_pairs(sample_sequence(table, cfg.train_tokens, rng))
    val = as_pairs(sample_sequence(table, cfg.val_tokens, rng))
    unigram = entropy_nats(np.bincount(train[1].numpy(), minlength=cfg.vocab_size) / len(train[1]))
    floor = conditional_entropy(table, val[0])
    ctx.say(f"unigram entropy {unigram:.3f} nats, true conditional entropy {floor:.3f} nats")

    models = {}
    for variant in VARIANTS:
        models[variant] = train_variant(cfg, variant, train, val, rng, ctx)
    final = {v: evaluate(m, *val) for v, m in models.items()}
    loads = {}
    for variant, model in models.items():
        model(val[0])
        loads[variant] = model.moe.tokens_per_expert.clone()
    capacity_sweep(cfg, models, val, ctx)

    plot_history(ctx, ctx.tables["history"], {"unigram": unigram, "H(next|a,b)": floor})
    plot_load_histograms(ctx, loads)
    plot_capacity(ctx, ctx.tables["capacity"])

    at_cf1 = {r["variant"]: r["dropped_fraction"] for r in ctx.tables["capacity"] if r["capacity_factor"] == 1.0}
    metrics = {
        "aux_at_perfect_balance": perfect_balance_aux(cfg.n_experts, cfg.top_k, rng),
        "imbalance_no_aux": final["no_aux"]["imbalance"],
        "imbalance_aux": final["aux"]["imbalance"],
        "imbalance_deepseek": final["deepseek"]["imbalance"],
        "imbalance_ratio": final["aux"]["imbalance"] / final["no_aux"]["imbalance"],
        "aux_loss_no_aux": final["no_aux"]["aux"],
        "aux_loss_aux": final["aux"]["aux"],
        "val_loss_no_aux": final["no_aux"]["val_loss"],
        "val_loss_aux": final["aux"]["val_loss"],
        "val_loss_deepseek": final["deepseek"]["val_loss"],
        "unigram_entropy": unigram,
        "conditional_entropy": floor,
        "dropped_cf1_no_aux": at_cf1.get("no_aux", math.nan),
        "dropped_cf1_aux": at_cf1.get("aux", math.nan),
    }
    return metrics
