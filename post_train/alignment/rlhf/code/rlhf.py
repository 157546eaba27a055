"""RLHF the InstructGPT way: PPO on a language model against a learned reward model, with a per-token
KL penalty to the sft model folded into the reward, in one file.

Ouyang et al. 2022 (InstructGPT, Sec. 3.5), after Stiennon et al. 2020 and Ziegler et al. 2019. Four
models: the actor pi_theta (starts as the sft model, trained), the critic V_phi (a transformer with a
scalar head, trained), the reference pi_ref (the sft model, frozen) and the reward model r_psi (the rm
module's model, frozen). A response y = (a_1 .. a_n) to a prompt x is an episode; the state s_t is the
prompt and the tokens before a_t. Per response token:

    r_t   = -beta (log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t))  +  [t = n] r_psi(x, y)     shaped reward
    A_t   = GAE(gamma, lambda) of r_t with V_phi(s_t), the episode ending with a_n         core.rl.gae
    rho_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t)                                            ratio to the sampler
    L_pi  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))                    clipped policy loss
    L_V   = mean_t 1/2 max((V - R_t)^2, (V_old + clip(V - V_old, -c, c) - R_t)^2)          clipped value loss

The sum of the shaped rewards is r_psi(x, y) - beta sum_t log(pi_theta/pi_ref): the RM score minus beta
times the k1 estimate of KL(pi_theta || pi_ref) on this sample, the objective of InstructGPT's eq. 2
(without its pretraining-mix term). Every mean is over response tokens only: the prompt and the right
padding are masked out of the rewards, the advantages, their whitening and both losses.

One rollout = `batch_size` prompts with one sampled response each (one KV-cached, left-padded generate
call), the old/reference log-probs, the old values and the RM scores taken once, then `epochs` passes
of `minibatches` steps of the actor and the critic on it. With `compare_without_kl` the same run is
repeated from the same sft model and seed with beta = 0, to see whether the policy games the reward
model when nothing holds it near the sft model: RM score up, true (verifier) accuracy down.

Engineering choices, each a field below: separate actor and critic networks with their own AdamW (so
PPO's value-loss coefficient, which only rescales the critic's gradient, is moot under Adam), the
critic initialised from the reward model (Stiennon et al. 2020) or from the sft model with a
zero head, advantages whitened over the rollout's response tokens, gamma = 1 (a response is short and
the reward arrives at its end; TRL's default too).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch

from core.config import Range, Seed
from core.data.tokenizer import Tokenizer
from core.data.word_problems import Problem, generate_problems
from core.nn.heads import ScalarHeadModel, load_scalar_model
from core.nn.model import Transformer, load_model, save_model
from core.nn.sequences import masked_mean
from core.rl.group_policy import Rollout, collect_rollout, sequence_logprobs
from core.rl.rollouts import gae
from core.run_context import upstream_models


@dataclass
class Config:
    n_prompts: Annotated[int, Range(ge=1, le=10_000)] = 2000
    """training prompts (word problems of the train split; the held-out split is never trained on)"""
    tiers: Annotated[tuple[int, ...], Range(ge=1, le=3)] = (1, 2, 3)
    """difficulty tiers of the problems (core/data/word_problems.py)"""
    n_held_out: Annotated[int, Range(ge=1, le=3000)] = 200
    """held-out problems on which RM score, true accuracy and KL are measured before, during and after"""
    eval_samples: Annotated[int, Range(ge=1, le=32)] = 1
    """responses sampled per held-out problem at the rollout temperature"""
    steps: Annotated[int, Range(ge=1, le=10_000)] = 12
    """rollouts (each followed by epochs x minibatches steps of the actor and of the critic)"""
    batch_size: Annotated[int, Range(ge=2, le=256)] = 32
    """prompts per rollout, one sampled response each"""
    epochs: Annotated[int, Range(ge=1, le=16)] = 4
    """PPO epochs: passes over each rollout (TRL's default is 4)"""
    minibatches: Annotated[int, Range(ge=1, le=256)] = 2
    """optimizer steps per epoch (at most batch_size)"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 5e-5
    """AdamW learning rate of the actor (constant)"""
    critic_lr: Annotated[float, Range(gt=0, le=1e-2)] = 2e-4
    """AdamW learning rate of the critic (constant); a critic may move faster than the policy it judges"""
    kl_coef: Annotated[float, Range(ge=0, le=10)] = 0.2
    """beta: weight of the per-token KL penalty in the reward. It trades against the RM score, whose scale
    Bradley-Terry leaves free (InstructGPT used 0.02 with its RM); the rm module's scores span a few units"""
    compare_without_kl: bool = True
    """also run the same training with kl_coef = 0 (same sft start, same seed) and report both"""
    clip_eps: Annotated[float, Range(gt=0, le=1)] = 0.2
    """epsilon of the clipped ratio"""
    value_clip: Annotated[float, Range(gt=0, le=100)] = 0.2
    """c: a value may move this far from its rollout-time value before its loss is clipped (TRL's 0.2)"""
    gamma: Annotated[float, Range(ge=0, le=1)] = 1.0
    """discount over response tokens"""
    lam: Annotated[float, Range(ge=0, le=1)] = 0.95
    """lambda of GAE"""
    whiten_advantages: bool = True
    """normalise the advantages to mean 0, std 1 over the rollout's response tokens"""
    critic_init: Literal["reward_model", "sft"] = "reward_model"
    """reward_model: the critic starts as a copy of the RM (Stiennon et al. 2020); sft: the sft model with a
    zero head (every value starts at 0)"""
    temperature: Annotated[float, Range(ge=0.1, le=10)] = 1.0
    """sampling temperature of the rollouts (the log-probs are taken at the same temperature)"""
    max_new_tokens: Annotated[int, Range(ge=1, le=2048)] = 40
    """response budget; a response that reaches it without <|end|> is scored as it stands"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip each network's global gradient norm to this"""
    eval_every: Annotated[int, Range(ge=1, le=10_000)] = 6
    """rollouts between held-out measurements"""
    seed: Seed = 0
    """seeds the prompt picks, the sampling and the minibatch order"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        if self.minibatches > self.batch_size:
            return [f"minibatches={self.minibatches} exceeds batch_size={self.batch_size}"]
        return []


# --- the formulas ------------------------------------------------------------------------------
# Tensors are (N, T - 1) in the shifted layout of core/nn/sequences.token_logprobs: column j is the
# action "token j + 1" taken in the state "tokens 0 .. j". `mask` is 1 on response tokens.

def last_response_column(mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's last response column: where the episode ends and the RM scores it."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    return (columns * mask.long()).argmax(1)


def shaped_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """r_t = -beta (log pi - log pi_ref) on every response token, plus the RM score (N,) on the last one;
    0 on the prompt and the padding."""
    rewards = -kl_coef * (logp - ref_logp) * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_response_column(mask)] += scores
    return rewards


def response_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                 lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) of each row's response, 0 elsewhere. core.rl.gae runs time-major and
    bootstraps gamma V(s_{t+1}) unless done_t; the episode ends with the last response token, so done_t
    = 1 where column t + 1 is not a response token: the critic's value at a padding position (it has
    one: the head reads every position) never leaks into the response."""
    mask = mask.to(values.dtype)
    done = 1.0 - torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    advantages, returns = gae(rewards.T, values.T, done.T, torch.zeros_like(mask[:, 0]), gamma, lam)
    return advantages.T * mask, returns.T * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked-in entries only (padding would drag both towards 0)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, float]:
    """(clipped surrogate loss, share of response tokens where the clipped term is the one taken)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).item()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """1/2 max of the squared errors of the new value and of the value kept within c of the old one: the
    pessimistic choice, so moving V far from V_old earns the critic nothing on this rollout."""
    kept_close = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (kept_close - returns) ** 2), mask)


# --- memory ------------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors among `tensors` (None skipped: a parameter without a gradient)."""
    unique = {id(t): t for t in tensors if t is not None}  # a tied embedding is one tensor
    return sum(t.numel() * t.element_size() for t in unique.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's per-parameter moments (exp_avg, exp_avg_sq) as they sit in opt.state."""
    return tensor_bytes(v for state in opt.state.values() for k, v in state.items() if k != "step")


# --- one run -----------------------------------------------------------------------------------
@dataclass
class Models:
    actor: Transformer
    critic: ScalarHeadModel
    reference: Transformer
    reward_model: ScalarHeadModel


@torch.no_grad()
def score_rollout(models: Models, rollout: Rollout, temperature: float) -> dict[str, torch.Tensor]:
    """Log-probs of the actor and the reference, the RM score and the KL of each response, without
    gradients (the critic's values are PPO's business: ppo_step)."""
    mask = rollout.response_mask
    lengths = last_response_column(mask) + 2  # column j scores token j + 1: the row's real length is j + 2
    logp = sequence_logprobs(models.actor, rollout.ids, temperature)
    ref_logp = sequence_logprobs(models.reference, rollout.ids, temperature)
    return {"logp": logp, "ref_logp": ref_logp, "scores": models.reward_model.score(rollout.ids, lengths),
            "kl": ((logp - ref_logp) * mask).sum(1)}  # k1 estimate of KL(pi || pi_ref) per response


def evaluate(models: Models, tok: Tokenizer, held_out: list[Problem], cfg: Config) -> dict[str, float]:
    """RM score, true accuracy (the verifier of core/data/word_problems) and KL to the reference of
    cfg.eval_samples sampled responses per held-out problem; the same generator seed at every call."""
    rollout = collect_rollout(models.actor, tok, held_out, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature,
                              0.0, torch.Generator().manual_seed(cfg.seed + 2))
    scored = score_rollout(models, rollout, cfg.temperature)
    return {"rm_score": scored["scores"].mean().item(), "accuracy": rollout.correct.mean().item(),
            "lenient": rollout.lenient.mean().item(), "format": rollout.formatted.mean().item(),
            "kl": scored["kl"].mean().item(), "response_length": rollout.response_mask.sum(1).mean().item()}


def ppo_step(models: Models, opts: tuple[torch.optim.Optimizer, torch.optim.Optimizer], rollout: Rollout,
             cfg: Config, kl_coef: float, shuffling: torch.Generator, memory: dict[str, int]) -> dict[str, float]:
    """Rewards, GAE and cfg.epochs x cfg.minibatches clipped updates of actor and critic on one rollout."""
    actor_opt, critic_opt = opts
    mask = rollout.response_mask
    old = score_rollout(models, rollout, cfg.temperature)
    with torch.no_grad():
        old["values"] = models.critic.values(rollout.ids)[:, :-1]  # V(s_t): the state before token t + 1
    rewards = shaped_rewards(old["logp"], old["ref_logp"], old["scores"], mask, kl_coef)
    advantages, returns = response_gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
    # the critic's error against the Monte-Carlo return (lambda = 1, no bootstrap: a target it cannot bias)
    to_go = response_gae(rewards, torch.zeros_like(rewards), mask, cfg.gamma, 1.0)[1]
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    clip_fractions, value_losses = [], []
    for _ in range(cfg.epochs):
        for rows in torch.randperm(len(mask), generator=shuffling).chunk(cfg.minibatches):
            logp = sequence_logprobs(models.actor, rollout.ids[rows], cfg.temperature)
            loss, clipped = policy_loss(logp, old["logp"][rows], advantages[rows], mask[rows], cfg.clip_eps)
            loss.backward()
            values = models.critic.values(rollout.ids[rows])[:, :-1]
            v_loss = value_loss(values, old["values"][rows], returns[rows], mask[rows], cfg.value_clip)
            v_loss.backward()
            if not memory:  # the first update: gradients of both trained networks exist now
                memory["actor_grads"] = tensor_bytes(p.grad for p in models.actor.parameters())
                memory["critic_grads"] = tensor_bytes(p.grad for p in models.critic.parameters())
            for model, opt in ((models.actor, actor_opt), (models.critic, critic_opt)):
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            clip_fractions.append(clipped)
            value_losses.append(v_loss.item())
    return {"rm_score": old["scores"].mean().item(), "kl": old["kl"].mean().item(),
            "kl_penalty": (kl_coef * old["kl"]).mean().item(), "correct": rollout.correct.mean().item(),
            "lenient": rollout.lenient.mean().item(), "format": rollout.formatted.mean().item(),
            "response_length": mask.sum(1).mean().item(), "clip_fraction": float(np.mean(clip_fractions)),
            "value_loss": float(np.mean(value_losses)),
            "value_mse": masked_mean((old["values"] - to_go) ** 2, mask).item(),
            "zero_value_mse": masked_mean(to_go ** 2, mask).item()}


def build_models(sft_dir: Path, rm_dir: Path, critic_init: str) -> Models:
    reward_model = load_scalar_model(rm_dir).eval().requires_grad_(False)
    critic = copy.deepcopy(reward_model).requires_grad_(True) if critic_init == "reward_model" \
        else ScalarHeadModel(load_model(sft_dir))
    return Models(actor=load_model(sft_dir), critic=critic.train(),
                  reference=load_model(sft_dir).eval().requires_grad_(False), reward_model=reward_model)


def train(cfg: Config, ctx, kl_coef: float, label: str, sft_dir: Path, rm_dir: Path, start: dict[str, float]
          ) -> tuple[Models, dict]:
    """One PPO run from the sft model; logs rows tagged `label` into the "train" and "eval" tables.
    Returns the trained models and the memory the four of them held, measured from their tensors."""
    tok = Tokenizer.load(sft_dir)
    models = build_models(sft_dir, rm_dir, cfg.critic_init)
    prompts = generate_problems(cfg.n_prompts, cfg.tiers, cfg.seed + 1, "train")
    held_out = generate_problems(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out")
    opts = (torch.optim.AdamW(models.actor.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0),
            torch.optim.AdamW(models.critic.parameters(), lr=cfg.critic_lr, betas=(0.9, 0.95), weight_decay=0.0))
    sampling, shuffling = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    memory: dict[str, int] = {}
    seconds = dict.fromkeys(("generate_s", "learn_s", "eval_s"), 0.0)
    ctx.log("eval", run=label, kl_coef=kl_coef, step=0, **start)
    models.actor.train()
    for step in ctx.track(range(cfg.steps), f"PPO, kl_coef={kl_coef}", total=cfg.steps):
        t0 = time.perf_counter()
        picked = torch.randint(len(prompts), (cfg.batch_size,), generator=shuffling).tolist()
        rollout = collect_rollout(models.actor, tok, [prompts[i] for i in picked], 1, cfg.max_new_tokens,
                                  cfg.temperature, 0.0, sampling)
        t1 = time.perf_counter()
        stats = ppo_step(models, opts, rollout, cfg, kl_coef, shuffling, memory)
        t2 = time.perf_counter()
        ctx.log("train", run=label, kl_coef=kl_coef, step=step + 1, **stats)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ctx.log("eval", run=label, kl_coef=kl_coef, step=step + 1, **evaluate(models, tok, held_out, cfg))
            models.actor.train()
        seconds["generate_s"] += t1 - t0
        seconds["learn_s"] += t2 - t1
        seconds["eval_s"] += time.perf_counter() - t2
    ctx.measure(**{f"{label}_{key}": value for key, value in seconds.items()})
    memory.update(actor_weights=tensor_bytes(models.actor.parameters()),
                  critic_weights=tensor_bytes(models.critic.parameters()),
                  reference_weights=tensor_bytes(models.reference.parameters()),
                  reward_model_weights=tensor_bytes(models.reward_model.parameters()),
                  actor_adam=optimizer_state_bytes(opts[0]), critic_adam=optimizer_state_bytes(opts[1]))
    return models, memory


def run(cfg: Config, ctx) -> dict:
    sft_dir, rm_dir = upstream_models(ctx, "sft"), upstream_models(ctx, "rm")
    tok = Tokenizer.load(sft_dir)
    held_out = generate_problems(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out")
    start = evaluate(build_models(sft_dir, rm_dir, cfg.critic_init), tok, held_out, cfg)
    ctx.say(f"sft model on {len(held_out)} held-out problems: RM score {start['rm_score']:.3f}, true accuracy "
            f"{start['accuracy']:.3f}; PPO for {cfg.steps} rollouts of {cfg.batch_size} responses, "
            f"{cfg.epochs} epochs x {cfg.minibatches} minibatches, critic from the {cfg.critic_init.replace('_', ' ')}")

    models, memory = train(cfg, ctx, cfg.kl_coef, "kl", sft_dir, rm_dir, start)
    save_model(models.actor, ctx.models_dir)
    tok.save(ctx.models_dir)
    metrics = summarise(ctx, "kl", start)
    metrics.update(memory_metrics(memory, models))
    no_kl = {}
    if cfg.compare_without_kl:
        train(cfg, ctx, 0.0, "no_kl", sft_dir, rm_dir, start)
        no_kl = summarise(ctx, "no_kl", start)
    metrics.update({f"{key}_no_kl": no_kl.get(key) for key in NO_KL_METRICS})
    ctx.say(f"with kl_coef={cfg.kl_coef}: RM score {start['rm_score']:.3f} -> {metrics['rm_score']:.3f}, true accuracy "
            f"{start['accuracy']:.3f} -> {metrics['accuracy']:.3f}, KL to the sft model {metrics['kl']:.3f} nats "
            f"per response")
    if cfg.compare_without_kl:
        ctx.say(f"with kl_coef=0:    RM score {start['rm_score']:.3f} -> {metrics['rm_score_no_kl']:.3f}, true accuracy "
                f"{start['accuracy']:.3f} -> {metrics['accuracy_no_kl']:.3f}, KL {metrics['kl_no_kl']:.3f}")
    ctx.say(f"memory of the four models: {metrics['memory_mb']:.2f} MB measured, {metrics['cheat_sheet_mb']:.2f} MB by "
            f"the cheat sheet (10 x the weights); GRPO would hold {metrics['grpo_mb']:.2f} MB")
    plot(ctx, cfg, memory)
    return metrics


NO_KL_METRICS = ("rm_score", "accuracy", "lenient", "format", "kl", "kl_max", "reward_last", "response_length")
"""what the kl_coef = 0 run reports beside the main run's (None when compare_without_kl is off)"""


def summarise(ctx, label: str, start: dict[str, float]) -> dict[str, float]:
    train_rows = [r for r in ctx.tables["train"] if r["run"] == label]
    final = [r for r in ctx.tables["eval"] if r["run"] == label][-1]
    window = max(1, len(train_rows) // 10)
    first = lambda key: float(np.mean([r[key] for r in train_rows[:window]]))  # noqa: E731
    last = lambda key: float(np.mean([r[key] for r in train_rows[-window:]]))  # noqa: E731
    return {
        "sft_rm_score": start["rm_score"], "rm_score": final["rm_score"],
        "sft_accuracy": start["accuracy"], "accuracy": final["accuracy"],
        "sft_lenient": start["lenient"], "lenient": final["lenient"],
        "sft_format": start["format"], "format": final["format"],
        "kl": final["kl"], "kl_max": float(max(r["kl"] for r in train_rows)),
        "reward_first": first("rm_score"), "reward_last": last("rm_score"),
        "clip_fraction_mean": float(np.mean([r["clip_fraction"] for r in train_rows])),
        "value_mse_first": train_rows[0]["value_mse"], "zero_value_mse_first": train_rows[0]["zero_value_mse"],
        "value_mse_last": last("value_mse"),
        "response_length": final["response_length"],
    }


def memory_metrics(memory: dict[str, int], models: Models) -> dict[str, float]:
    """Measured bytes against the cheat sheet: the two trained networks hold weights + gradients + two
    Adam moments (4 W each), the two frozen ones their weights (W each): 10 W, W = one model's weights.
    GRPO keeps the actor and the reference only (no critic; a verifiable reward instead of an RM): 5 W."""
    w = memory["actor_weights"]
    total = sum(memory.values())
    grpo = memory["actor_weights"] + memory["actor_grads"] + memory["actor_adam"] + memory["reference_weights"]
    counts = {f"params_{name}": float(sum(p.numel() for p in getattr(models, name).parameters()))
              for name in ("actor", "critic", "reference", "reward_model")}
    return {**counts, "memory_mb": total / 1e6, "cheat_sheet_mb": 10 * w / 1e6, "grpo_mb": grpo / 1e6,
            "memory_over_cheat_sheet": total / (10 * w), "memory_over_grpo": total / grpo,
            **{f"{part}_mb": size / 1e6 for part, size in memory.items()}}


def plot(ctx, cfg: Config, memory: dict[str, int]) -> None:
    runs = [("kl", f"kl_coef = {cfg.kl_coef}", "C0")] + ([("no_kl", "kl_coef = 0", "C3")] if cfg.compare_without_kl else [])
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    panels = (("eval", "rm_score", "held-out RM score"), ("eval", "accuracy", "held-out true accuracy (verifier)"),
              ("eval", "kl", "held-out KL to the sft model (nats / response)"),
              ("train", "rm_score", "RM score of the rollouts"), ("train", "value_mse", "critic's squared error against the return"))
    for ax, (table, key, title) in zip(axes.flat, panels):
        for label, name, colour in runs:
            rows = [r for r in ctx.tables[table] if r["run"] == label]
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], "o-" if table == "eval" else "-",
                    color=colour, label=name, lw=1)
        ax.set_title(title)
        ax.set_xlabel("rollout")
        ax.legend()
    ax = axes.flat[5]
    names = ("actor", "critic", "reference", "reward_model")
    bottom = np.zeros(len(names))
    for part in ("weights", "grads", "adam"):
        sizes = np.array([memory.get(f"{name}_{part}", 0) / 1e6 for name in names])
        ax.bar(names, sizes, bottom=bottom, label=part)
        bottom += sizes
    ax.set_ylabel("MB (measured from the tensors)")
    ax.set_title("memory: 4 W per trained model, W per frozen one")
    ax.legend()
    fig.tight_layout()
    ctx.save_figure(fig, "rlhf.png")
