"""Offline preference optimisation of a language model on (prompt, chosen, rejected) pairs: the pieces
DPO and ORPO share (post_train/alignment/dpo, orpo). Each module writes its objective and the implicit
reward it ranks replies by; this file batches the pairs, takes their log-probs, runs the training loop
and measures held-out pairs and answers before and after.

    batch      B pairs -> 2B rows, the B chosen first, each "<eos> <|user|> prompt <|end|> <|assistant|>
               reply <|end|>" (core/data/chat.py), right-padded, with a mask on the reply and its
               closing <|end|>: one forward serves both replies of every pair
    log-probs  log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the reply tokens only, from shifted
               logits (core/nn/sequences.sequence_logprobs); the reply's token count is kept beside
               it, so an objective can take the per-token mean instead (ORPO)
    reference  a frozen copy of the starting model (its own tensors, no gradients) for objectives
               anchored to one (DPO); its log-probs are taken without a graph
    loop       AdamW on every weight of the policy, warmup + cosine, gradient clipping, random pairs
    measure    on held-out pairs (no prompt shared with training): the objective's implicit reward of
               chosen and rejected, the share of pairs that rank chosen higher (a tie counts one half,
               so a model that cannot tell the replies apart scores 0.5), the mean reward margin and
               the mean log-prob of each reply; greedy answers to held-out problems, scored strictly
               ("The answer is N."), leniently (last number right) and for format; with a reference,
               the KL to it, estimated on the policy's own samples
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import numpy as np
import torch
from torch import Tensor

from core.artifacts import atomic_write_text
from core.checks import Check
from core.config import Range, Seed
from core.data.chat import chat_example, prompt_ids
from core.data.preferences import KINDS, PreferencePair, generate_pairs
from core.data.tokenizer import Tokenizer
from core.data.word_problems import Problem, generate_problems, score
from core.nn.model import Transformer, load_model, save_model
from core.nn.sampling import answer, sample_responses
from core.nn.sequences import right_pad, sequence_logprobs
from core.nn.training import adamw_groups, cosine_lr
from core.run_context import upstream_models


@dataclass
class PreferenceConfig:
    """The knobs every preference module shares; each module's Config adds its objective's own."""
    n_pairs: Annotated[int, Range(ge=1, le=15_000)] = 3000
    """training pairs, one per train-split word problem, kinds in equal thirds (core/data/preferences.py)"""
    tiers: Annotated[tuple[int, ...], Range(ge=1, le=3)] = (1, 2, 3)
    """difficulty tiers of the problems behind the pairs (core/data/word_problems.py)"""
    n_held_out_pairs: Annotated[int, Range(ge=30, le=3000)] = 300
    """held-out pairs for the implicit-reward accuracy and margins (held-out prompts only; at least 30, so
    that each kind has pairs to be measured on)"""
    n_held_out: Annotated[int, Range(ge=1, le=3000)] = 300
    """held-out problems answered greedily before and after (sft's count and seed: eval's leaderboard asks
    the same problems)"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 300
    """optimizer steps"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 16
    """pairs per step (2 x batch_size rows in the forward)"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 1e-4
    """peak AdamW learning rate"""
    warmup: Annotated[int, Range(ge=0, le=100_000)] = 10
    """linear warmup steps"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """the cosine decays to min_lr_ratio * lr"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the global gradient norm to this"""
    max_new_tokens: Annotated[int, Range(ge=1, le=2048)] = 40
    """response budget of the answers to held-out problems"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """steps between measurements on the held-out pairs (answers are measured before and after only)"""
    seed: Seed = 0
    """seeds the pairs, the held-out problems, the batch order and the samples of the KL estimate"""


# --- batches and log-probs -----------------------------------------------------------------------
@dataclass
class PairBatch:
    ids: Tensor
    """(2B, T) chosen rows 0..B-1, then the rejected rows in the same order, right-padded"""
    reply_mask: Tensor
    """(2B, T) 1 on the reply tokens and the closing <|end|>, 0 on the prompt and the padding"""


def pair_batch(tok: Tokenizer, pairs: list[PreferencePair]) -> PairBatch:
    rows = [chat_example(tok, p.prompt, p.chosen) for p in pairs] + [chat_example(tok, p.prompt, p.rejected) for p in pairs]
    return PairBatch(ids=right_pad([ids for ids, _ in rows], tok.pad_id), reply_mask=right_pad([m for _, m in rows], 0))


@dataclass
class PairLogps:
    """Per pair (B,): log pi of each reply summed over its tokens, and its length in tokens."""
    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    def select(self, rows: Tensor) -> PairLogps:
        return PairLogps(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def pair_logps(model: Transformer, batch: PairBatch) -> PairLogps:
    """One forward over both replies of every pair; log pi(y | x) summed over the reply tokens only."""
    total = sequence_logprobs(model(batch.ids), batch.ids, batch.reply_mask)
    tokens = batch.reply_mask[:, 1:].sum(-1).to(total.dtype)  # the tokens sequence_logprobs summed over
    b = total.shape[0] // 2
    return PairLogps(total[:b], total[b:], tokens[:b], tokens[b:])


@torch.no_grad()
def score_pairs(model: Transformer, tok: Tokenizer, pairs: list[PreferencePair], chunk: int = 64) -> PairLogps:
    """pair_logps of many pairs, in chunks, without a graph."""
    parts = [pair_logps(model, pair_batch(tok, pairs[i:i + chunk])) for i in range(0, len(pairs), chunk)]
    return PairLogps(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(PairLogps)))


def frozen_reference(model: Transformer) -> Transformer:
    """A copy of `model` with its own tensors and no gradients: what the policy is anchored to. Were it
    the policy itself, every log-ratio to it would be 0 and so would DPO's implicit reward."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# --- the objective --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    loss: Callable[[PairLogps, PairLogps | None, Any], tuple[Tensor, dict[str, Tensor]]]
    """loss(policy, reference, cfg) -> (scalar loss, batch statistics); reference is None without one"""
    rewards: Callable[[PairLogps, PairLogps | None, Any], tuple[Tensor, Tensor]]
    """rewards(policy, reference, cfg) -> the implicit rewards (B,) of chosen and rejected whose gap the
    loss widens"""
    uses_reference: bool


def preference_stats(objective: Objective, policy: PairLogps, reference: PairLogps | None, cfg) -> dict[str, float]:
    """Reward accuracy (a tie counts one half), mean reward margin, mean log-probs of chosen and rejected."""
    with torch.no_grad():
        r_w, r_l = objective.rewards(policy, reference, cfg)
        wins = (r_w > r_l).double() + 0.5 * (r_w == r_l).double()
        return {"reward_accuracy": wins.mean().item(), "reward_margin": (r_w - r_l).double().mean().item(),
                "logp_chosen": policy.chosen.double().mean().item(),
                "logp_rejected": policy.rejected.double().mean().item()}


# --- data, training loop, measurements ---------------------------------------------------------------
@dataclass
class Data:
    train: list[PreferencePair]
    held_out: list[PreferencePair]
    problems: list[Problem]
    """held-out word problems the model answers"""


def preference_data(cfg: PreferenceConfig) -> Data:
    return Data(train=generate_pairs(cfg.n_pairs, cfg.tiers, cfg.seed, "train"),
                held_out=generate_pairs(cfg.n_held_out_pairs, cfg.tiers, cfg.seed, "held_out"),
                problems=generate_problems(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out"))


def optimise(policy: Transformer, reference: Transformer | None, tok: Tokenizer, data: Data, objective: Objective,
             cfg: PreferenceConfig, ctx, table: str | None = None, held_out_reference: PairLogps | None = None) -> float:
    """cfg.steps AdamW steps of `objective` on random training pairs. With a `table`, every step is
    logged to it and the held-out pairs every cfg.eval_every steps to "<table>_eval". Returns the
    loss of the first batch, taken before any update."""
    opt = torch.optim.AdamW(adamw_groups(policy, 0.0), lr=cfg.lr, betas=(0.9, 0.95))
    picks = torch.Generator().manual_seed(cfg.seed)
    policy.train()
    first_loss = float("nan")
    for step in ctx.track(range(cfg.steps), f"optimising ({table or 'sweep'})", total=cfg.steps):
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = pair_batch(tok, [data.train[i] for i in torch.randint(len(data.train), (cfg.batch_size,),
                                                                      generator=picks).tolist()])
        logps = pair_logps(policy, batch)
        ref = None
        if reference is not None:
            with torch.no_grad():
                ref = pair_logps(reference, batch)
        loss, stats = objective.loss(logps, ref, cfg)
        if step == 0:
            first_loss = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if table is None:
            continue
        ctx.log(table, step=step + 1, lr=lr, loss=loss.item(), **{k: float(v) for k, v in stats.items()},
                **preference_stats(objective, logps, ref, cfg))
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            held = score_pairs(policy, tok, data.held_out)
            ctx.log(f"{table}_eval", step=step + 1, **preference_stats(objective, held, held_out_reference, cfg))
            policy.train()
    policy.eval()
    return first_loss


@torch.no_grad()
def sampled_kl(policy: Transformer, reference: Transformer, tok: Tokenizer, problems: list[Problem], cfg) -> float:
    """KL(pi || pi_ref) of whole responses, estimated as the mean of log pi(y|x) - log pi_ref(y|x) over
    one response y ~ pi (temperature 1) per held-out question: the quantity beta prices in the RLHF
    objective that DPO solves. Unbiased; a single estimate can come out slightly negative."""
    prompts = [prompt_ids(tok, p.question) for p in problems]
    responses = sample_responses(policy, prompts, 1, cfg.max_new_tokens, 1.0, stop_token=tok.special_ids["<|end|>"],
                                 pad_id=tok.pad_id, generator=torch.Generator().manual_seed(cfg.seed + 5))
    ids = right_pad([p + r for p, r in zip(prompts, responses)], tok.pad_id)
    mask = right_pad([[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)], 0)
    return (sequence_logprobs(policy(ids), ids, mask) - sequence_logprobs(reference(ids), ids, mask)).mean().item()


def measure(policy: Transformer, tok: Tokenizer, data: Data, objective: Objective, cfg: PreferenceConfig,
            reference: Transformer | None = None, reference_logps: PairLogps | None = None) -> dict[str, Any]:
    """The held-out pair statistics (overall and by kind), the greedy answers to the held-out problems
    and, given the reference model, the sampled KL to it."""
    policy.eval()
    logps = score_pairs(policy, tok, data.held_out)
    out = preference_stats(objective, logps, reference_logps, cfg)
    for kind in KINDS:
        rows = torch.tensor([p.kind == kind for p in data.held_out])
        ref = None if reference_logps is None else reference_logps.select(rows)
        out[f"reward_accuracy_{kind}"] = preference_stats(objective, logps.select(rows), ref, cfg)["reward_accuracy"]
    texts = answer(policy, tok, [p.question for p in data.problems], cfg.max_new_tokens)
    out.update({f"answer_{k}": v for k, v in score(texts, data.problems).items()}, texts=texts)
    if reference is not None:
        out["kl"] = sampled_kl(policy, reference, tok, data.problems, cfg)
    return out


SHARED_MEASURES = ("reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected",
                   "answer_accuracy", "answer_lenient", "answer_format")
"""what `measure` reports for every objective, before and after"""


def train(cfg: PreferenceConfig, ctx, objective: Objective, upstream: str) -> tuple[dict[str, Any], Transformer, Tokenizer]:
    """Load the latest `upstream` model of this preset, measure it, optimise it with `objective` on the
    preference pairs (logging "train", "train_eval" and "kinds"), measure it again and save it (eval's
    leaderboard gives it a row). Returns the metrics PREFERENCE_METRICS lists (plus `kl` and
    `reference_drift` when the objective has a reference), an untouched copy of the starting model
    for further arms, and the tokenizer."""
    start_dir = upstream_models(ctx, upstream)
    policy, tok = load_model(start_dir), Tokenizer.load(start_dir)
    start = copy.deepcopy(policy)
    ctx.say(f"policy: the {upstream} model {start_dir}")
    reference = frozen_reference(policy) if objective.uses_reference else None
    data = preference_data(cfg)
    ref_logps = score_pairs(reference, tok, data.held_out) if reference is not None else None
    before = measure(policy, tok, data, objective, cfg, reference, ref_logps)
    ctx.say(f"{policy.num_params():,} parameters, {'a frozen reference copy' if reference else 'no reference model'}; "
            f"{len(data.train)} training pairs, {cfg.steps} steps of {cfg.batch_size}; before: held-out pairs ranked "
            f"right {before['reward_accuracy']:.3f}, answers right {before['answer_accuracy']:.3f} "
            f"(any phrasing {before['answer_lenient']:.3f})")
    ctx.log("train_eval", step=0, **{k: before[k] for k in SHARED_MEASURES[:4]})
    step0_loss = optimise(policy, reference, tok, data, objective, cfg, ctx, "train", ref_logps)
    after = measure(policy, tok, data, objective, cfg, reference, ref_logps)
    ctx.log("train_eval", step=cfg.steps, **{k: after[k] for k in SHARED_MEASURES[:4]})
    for kind in KINDS:
        ctx.log("kinds", kind=kind, pairs=sum(p.kind == kind for p in data.held_out),
                before=before[f"reward_accuracy_{kind}"], after=after[f"reward_accuracy_{kind}"])
    write_examples(ctx, data.problems, before["texts"], after["texts"])
    ctx.say(f"held-out pairs ranked right {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, margin "
            f"{before['reward_margin']:.3f} -> {after['reward_margin']:.3f}; log-prob of chosen "
            f"{before['logp_chosen']:.2f} -> {after['logp_chosen']:.2f}, rejected {before['logp_rejected']:.2f} -> "
            f"{after['logp_rejected']:.2f}; answers right {before['answer_accuracy']:.3f} -> "
            f"{after['answer_accuracy']:.3f}, any phrasing {before['answer_lenient']:.3f} -> {after['answer_lenient']:.3f}")
    losses = [r["loss"] for r in ctx.tables["train"]]
    window = max(1, len(losses) // 10)
    metrics = {"step0_loss": step0_loss,
               **{f"{k}_before": before[k] for k in SHARED_MEASURES}, **{k: after[k] for k in SHARED_MEASURES},
               **{f"reward_accuracy_{kind}": after[f"reward_accuracy_{kind}"] for kind in KINDS},
               "loss_first_10pct": float(np.mean(losses[:window])), "loss_last_10pct": float(np.mean(losses[-window:]))}
    if reference is not None:
        metrics["kl"] = after["kl"]
        # the reference leaves the run as it came in: a copy that shares the policy's weights, or trains, moves
        moved = score_pairs(reference, tok, data.held_out)
        metrics["reference_drift"] = max((moved.chosen - ref_logps.chosen).abs().max().item(),
                                         (moved.rejected - ref_logps.rejected).abs().max().item())
    save_model(policy, ctx.models_dir)
    tok.save(ctx.models_dir)
    return metrics, start, tok


def arm(cfg: PreferenceConfig, objective: Objective, start: Transformer, tok: Tokenizer, ctx) -> dict[str, Any]:
    """A shorter account of another setting (a sweep point, a control): the same data, steps and seed
    from a fresh copy of `start`, measured after; no per-step logs."""
    policy = copy.deepcopy(start)
    reference = frozen_reference(start) if objective.uses_reference else None
    data = preference_data(cfg)
    ref_logps = score_pairs(reference, tok, data.held_out) if reference is not None else None
    optimise(policy, reference, tok, data, objective, cfg, ctx)
    result = measure(policy, tok, data, objective, cfg, reference, ref_logps)
    del result["texts"]
    return result


PREFERENCE_METRICS = {
    "step0_loss": "the loss of the first batch, before any update",
    "reward_accuracy_before": "held-out pairs whose chosen reply gets the higher implicit reward, at the start (a tie "
                              "counts one half)",
    "reward_accuracy": "the same after training",
    "reward_margin_before": "mean implicit-reward margin, chosen minus rejected, on the held-out pairs at the start",
    "reward_margin": "the same after training",
    "logp_chosen_before": "mean log-prob of the held-out chosen replies (summed over their tokens), at the start",
    "logp_chosen": "the same after training",
    "logp_rejected_before": "mean log-prob of the held-out rejected replies, at the start",
    "logp_rejected": "the same after training",
    "answer_accuracy_before": "held-out word problems answered right as 'The answer is N.' (greedy), at the start",
    "answer_accuracy": "the same after training",
    "answer_lenient_before": "held-out answers whose last number is right, however phrased, at the start",
    "answer_lenient": "the same after training",
    "answer_format_before": "held-out answers that end in 'The answer is N.', at the start",
    "answer_format": "the same after training",
    **{f"reward_accuracy_{kind}": f"held-out reward accuracy on the pairs of kind {kind!r}, after training"
       for kind in KINDS},
    "loss_first_10pct": "mean training loss over the first 10% of the steps",
    "loss_last_10pct": "mean training loss over the last 10% of the steps",
}
"""the metrics `train` returns for every objective, with their meanings"""

LEARNING_CHECKS = [
    Check("reward_accuracy", ">", ref="reward_accuracy_before",
          why="held-out pairs (prompts never trained on) are ranked right more often than at the start"),
    Check("reward_margin", ">", ref="reward_margin_before", why="the held-out chosen-minus-rejected margin widens"),
    Check("answer_format", ">", ref="answer_format_before",
          why="the format pairs are learned: more held-out answers end in the sentence the verifier reads"),
    Check("loss_last_10pct", "<", ref="loss_first_10pct", why="the training loss falls"),
]
"""what every preference run must show, whatever its objective"""


def plot_log_probs(ax, evals: list[dict[str, Any]]) -> None:
    """The held-out log-probs of the chosen and the rejected replies over the steps (the "train_eval" rows)."""
    ax.plot([r["step"] for r in evals], [r["logp_chosen"] for r in evals], "o-", label="chosen")
    ax.plot([r["step"] for r in evals], [r["logp_rejected"] for r in evals], "s-", label="rejected")
    ax.set_xlabel("step")
    ax.set_title("held-out log pi(y|x), summed over the reply")


def write_examples(ctx, problems: list[Problem], before: list[str], after: list[str], n: int = 3) -> None:
    """Every held-out answer before and after in examples.txt; on screen, the first n that changed."""
    lines = []
    for p, b, a in zip(problems, before, after):
        lines += [f"Q: {p.question}  (answer {p.answer})", f"  before: {b}", f"  after:  {a}", ""]
    atomic_write_text(ctx.path("examples.txt"), "\n".join(lines))
    for p, b, a in [(p, b, a) for p, b, a in zip(problems, before, after) if b != a][:n]:
        ctx.say(f"Q: {p.question} (answer {p.answer})\n   before: {b}\n   after:  {a}")
