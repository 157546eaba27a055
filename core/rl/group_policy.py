"""Critic-free policy optimisation of a language model on a task with verifiable rewards: the pieces
GRPO and GSPO share (post_train/alignment/grpo, gspo). Each module writes its own objective; this
file samples the groups, scores them, normalises the rewards within each group and runs the
optimisation loop around the objective.

    rollout     P prompts x G samples, all in one left-padded, KV-cached generate call
                (core/nn/sampling.py), scored by exact match of the final answer (+ an optional
                format reward), each row stored right-padded as prompt + response
    advantage   A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      (Shao et al. 2024, Sec. 4.1.2)
                std is the sample std (ddof = 1, as TRL computes it); scale=False drops the division
                (Dr. GRPO, Liu et al. 2025): a group of equal rewards has A = 0 either way
    KL          k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased estimator of
                KL(pi || pi_ref) under samples of pi (Schulman 2020, "Approximating KL divergence");
                the objectives penalise it as the papers do, the log reports (pi / pi_old) k3, which
                stays unbiased once the samples are pi_old's and no longer pi's (kl_to_reference)
    loop        per generation batch: old log-probs (no grad) and reference log-probs once, then
                `iterations` passes (mu) of `minibatches` optimizer steps each, so the importance
                ratio pi / pi_old moves away from 1 after the first step
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Callable

import numpy as np
import torch

from core.artifacts import atomic_write_text
from core.checks import Check
from core.config import Range, Seed
from core.data.chat import prompt_ids, response_text
from core.data.tokenizer import Tokenizer
from core.data.word_problems import Problem, correct, generate_problems, lenient_correct, score, well_formed
from core.nn.model import Transformer, load_model, save_model
from core.nn.sampling import answer, sample_responses
from core.nn.sequences import right_pad, token_logprobs
from core.run_context import upstream_models


MAX_ROLLOUT_ROWS = 256
"""most rows (prompts_per_step x group_size) of one rollout: one generate chunk of core/nn/sampling.py,
and the old/reference log-probs of all of them are taken in one forward ((rows, T, vocab) float logits)"""


@dataclass
class GroupPolicyConfig:
    """The knobs every group-policy module shares; each module's Config adds its objective's own."""
    n_prompts: Annotated[int, Range(ge=1, le=10_000)] = 2000
    """training prompts (word problems of the train split, about 15,000 per tier; the held-out split is
    never trained on)"""
    tiers: Annotated[tuple[int, ...], Range(ge=1, le=3)] = (1, 2, 3)
    """difficulty tiers of the prompts (core/data/word_problems.py)"""
    n_held_out: Annotated[int, Range(ge=1, le=3000)] = 300
    """held-out problems for the accuracy before, during and after (a single tier has about 3,800)"""
    eval_samples: Annotated[int, Range(ge=1, le=32)] = 4
    """responses sampled per held-out problem for the sampled accuracy (pass@1 at the rollout temperature)"""
    steps: Annotated[int, Range(ge=1, le=10_000)] = 40
    """generation batches (one rollout, then iterations x minibatches optimizer steps each)"""
    prompts_per_step: Annotated[int, Range(ge=1, le=128)] = 16
    """prompts per generation batch"""
    group_size: Annotated[int, Range(ge=2, le=64)] = 8
    """G: responses sampled per prompt (a group of one has nothing to be compared with)"""
    iterations: Annotated[int, Range(ge=1, le=16)] = 2
    """mu: passes over each generation batch; the ratio pi / pi_old is exactly 1 only on the batch's first
    optimizer step, so mu > 1 or minibatches > 1 is what gives the clip something to do"""
    minibatches: Annotated[int, Range(ge=1, le=MAX_ROLLOUT_ROWS)] = 2
    """optimizer steps per pass (at most the prompts_per_step x group_size rows of a batch)"""
    lr: Annotated[float, Range(gt=0, le=1e-3)] = 5e-5
    """AdamW learning rate (constant)"""
    beta: Annotated[float, Range(ge=0, le=10)] = 0.04
    """weight of the k3 KL penalty to the frozen sft model (DeepSeekMath 0.04; TRL's default 0)"""
    scale_rewards: bool = True
    """divide the centred rewards by the group std (False: Dr. GRPO's unscaled advantages)"""
    adv_eps: Annotated[float, Range(ge=1e-8, le=1)] = 1e-4
    """added to the group std before dividing (TRL's value); a group of equal rewards has std 0"""
    temperature: Annotated[float, Range(ge=0.1, le=10)] = 1.0
    """sampling temperature of the rollouts (the log-probs are taken at the same temperature); near 0 the
    G samples of a prompt are all alike and have no advantage"""
    max_new_tokens: Annotated[int, Range(ge=1, le=2048)] = 40
    """response budget (a response that reaches it without <|end|> is cut; at most what the sft model's
    block_size leaves after the prompt)"""
    format_reward: Annotated[float, Range(ge=0, le=10)] = 0.0
    """added to the reward of a response that ends in "The answer is N." (0: correctness only)"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the global gradient norm to this"""
    eval_every: Annotated[int, Range(ge=1, le=10_000)] = 20
    """steps between held-out accuracy measurements"""
    checkpoint_every: Annotated[int, Range(ge=1, le=10_000)] = 20
    """steps between resumable checkpoints"""
    resume: bool = False
    """continue from the checkpoint of an interrupted run"""
    seed: Seed = 0
    """seeds the prompt order, the sampling and the minibatch order"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        rows = self.prompts_per_step * self.group_size
        out = []
        if rows > MAX_ROLLOUT_ROWS:
            out.append(f"prompts_per_step x group_size = {self.prompts_per_step} x {self.group_size} = {rows} rows "
                       f"per rollout exceeds {MAX_ROLLOUT_ROWS}")
        if self.minibatches > rows:
            out.append(f"minibatches={self.minibatches} exceeds the {rows} rows of a batch "
                       f"(prompts_per_step x group_size)")
        return out


@dataclass
class Rollout:
    ids: torch.Tensor
    """(N, T) prompt + response per row, right-padded; N = P * G, prompt-major"""
    response_mask: torch.Tensor
    """(N, T - 1) float, 1 where column j's token (j + 1) is a response token: the shifted layout of
    token_logprobs"""
    rewards: torch.Tensor
    """(P, G) total reward of each sample"""
    correct: torch.Tensor
    """(P, G) 1 for an exactly right final answer"""
    formatted: torch.Tensor
    """(P, G) 1 for a response that ends in the answer sentence"""
    lenient: torch.Tensor
    """(P, G) 1 for a response whose last number is the answer, however phrased"""


def collect_rollout(model: Transformer, tok: Tokenizer, problems: list[Problem], group_size: int,
                    max_new_tokens: int, temperature: float, format_reward: float,
                    generator: torch.Generator) -> Rollout:
    prompts = [prompt_ids(tok, p.question) for p in problems]
    responses = sample_responses(model, prompts, group_size, max_new_tokens, temperature,
                                 stop_token=tok.special_ids["<|end|>"], pad_id=tok.pad_id, generator=generator)
    rows, masks, texts = [], [], []
    for i, response in enumerate(responses):
        prompt = prompts[i // group_size]
        rows.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
        texts.append(response_text(tok, response))
    answers = [problems[i // group_size].answer for i in range(len(responses))]
    right = torch.tensor([correct(t, a) for t, a in zip(texts, answers)]).view(len(problems), group_size)
    formatted = torch.tensor([well_formed(t) for t in texts]).view(len(problems), group_size)
    lenient = torch.tensor([lenient_correct(t, a) for t, a in zip(texts, answers)]).view(len(problems), group_size)
    return Rollout(ids=right_pad(rows, tok.pad_id), response_mask=right_pad(masks, 0)[:, 1:].float(),
                   rewards=right + format_reward * formatted, correct=right, formatted=formatted, lenient=lenient)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): each reward minus its group's mean, divided by the
    group's sample std + eps when `scale`."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def kl_to_reference(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean KL(pi || pi_ref) per response token, estimated from tokens sampled from pi_old:
        E_{x ~ pi_old}[ pi(x) / pi_old(x) * k3(x) ] = E_{x ~ pi}[ k3(x) ] = KL(pi || pi_ref)    at each position.
    After the first optimizer step on a rollout its tokens are no longer samples of pi. Unweighted, k3 then
    scores tokens that pi has since made unlikely, where pi_ref / pi and with it k3 explode: in grpo's default
    run (step 2, the rollout's last minibatch) one token of 1,605 had gone from pi_old = 0.495 to pi = 1.4e-4
    (pi_ref = 0.754); its k3 was 5,244 and the minibatch's mean k3 read 4.05 where this weighted mean reads
    0.003. The weight there is pi / pi_old = 2.9e-4: a token that pi no longer samples no longer counts."""
    with torch.no_grad():
        weighted = torch.exp(logp - old_logp) * k3_kl(logp, ref_logp)
        return float((weighted * mask).sum() / mask.sum().clamp(min=1))


def sequence_logprobs(model: Transformer, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, T - 1) log pi(token j + 1 | tokens <= j) of right-padded rows, under the distribution the
    rollouts were sampled from: softmax(logits / temperature). At another temperature the ratio and the
    KL would describe a policy that never produced the samples."""
    return token_logprobs(model(ids) / temperature, ids)


LOSS_AGGREGATIONS = ("sequence", "token", "constant")


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, max_new_tokens: int) -> torch.Tensor:
    """Reduce a (N, T) per-token loss over the response tokens (mask) to a scalar:
        sequence   mean over each response's tokens, then over responses       (GRPO, Shao et al. 2024)
        token      sum over all response tokens / their number                  (DAPO, Yu et al. 2025)
        constant   sum over all response tokens / (N * max_new_tokens)           (Dr. GRPO, Liu et al. 2025)
    `sequence` weights a token of a short response more than one of a long response, which biases
    the length (short right answers, long wrong ones); the other two weight every token alike."""
    if how == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "constant":
        return (per_token * mask).sum() / (per_token.shape[0] * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}; choose one of {LOSS_AGGREGATIONS}")


Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]
"""objective(logp, old_logp, ref_logp, advantages (N,), response_mask, cfg) -> (loss, stats)"""


def optimise_on_rollout(model: Transformer, reference: Transformer, opt: torch.optim.Optimizer,
                        rollout: Rollout, advantages: torch.Tensor, objective: Objective, cfg: GroupPolicyConfig,
                        generator: torch.Generator) -> dict[str, float]:
    """cfg.iterations passes of cfg.minibatches optimizer steps over one rollout; returns the mean of
    each statistic the objective reports."""
    with torch.no_grad():
        old_logp = sequence_logprobs(model, rollout.ids, cfg.temperature)
        ref_logp = sequence_logprobs(reference, rollout.ids, cfg.temperature)
    flat_adv = advantages.reshape(-1)
    stats: dict[str, list[float]] = {}
    n = rollout.ids.shape[0]
    for _ in range(cfg.iterations):
        order = torch.randperm(n, generator=generator)
        for rows in order.chunk(cfg.minibatches):
            logp = sequence_logprobs(model, rollout.ids[rows], cfg.temperature)
            loss, step_stats = objective(logp, old_logp[rows], ref_logp[rows], flat_adv[rows],
                                         rollout.response_mask[rows], cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for key, value in step_stats.items():
                stats.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in stats.items()}


# --- the training driver -------------------------------------------------------------------------
def evaluate(model: Transformer, tok: Tokenizer, problems: list[Problem], cfg: GroupPolicyConfig) -> dict:
    """Held-out accuracy two ways: `sampled` = the mean reward of cfg.eval_samples responses per
    problem at the rollout temperature (pass@1 of the policy as it is trained: the quantity GRPO
    maximises), and `greedy` = exact match of the argmax decode; plus format compliance and the greedy
    texts. The samples come from a generator seeded the same way at every call, so two evaluations
    differ only by the model."""
    questions = [p.question for p in problems]
    greedy = answer(model, tok, questions, cfg.max_new_tokens)
    sampled = answer(model, tok, questions, cfg.max_new_tokens, n=cfg.eval_samples, temperature=cfg.temperature,
                     generator=torch.Generator().manual_seed(cfg.seed + 2))
    repeated = [p for p in problems for _ in range(cfg.eval_samples)]
    greedy_scores, sampled_scores = score(greedy, problems), score(sampled, repeated)
    return {"sampled": sampled_scores["accuracy"], "greedy": greedy_scores["accuracy"],
            "sampled_lenient": sampled_scores["lenient"], "format": greedy_scores["format"],
            "sampled_format": sampled_scores["format"], "texts": greedy}


def train(cfg: GroupPolicyConfig, ctx, objective: Objective) -> dict:
    """Optimise the latest sft model of this preset with `objective` on groups of sampled answers;
    logs the "train" and "eval" tables and returns the metrics every group-policy module reports."""
    sft_dir = upstream_models(ctx, "sft")
    policy, tok = load_model(sft_dir), Tokenizer.load(sft_dir)
    reference = load_model(sft_dir).eval().requires_grad_(False)  # frozen: the KL anchor
    prompts = generate_problems(cfg.n_prompts, cfg.tiers, cfg.seed + 1, "train")
    held_out = generate_problems(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out")
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sampling = torch.Generator().manual_seed(cfg.seed)     # the responses
    shuffling = torch.Generator().manual_seed(cfg.seed + 1)  # prompt picks and minibatch order
    timing = {"generate_s": 0.0, "learn_s": 0.0, "generated_tokens": 0.0}

    resumed = ctx.load_checkpoint(cfg.steps)
    if resumed:
        start, state = resumed
        with ctx.restoring(opt):
            policy.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sampling.set_state(state["sampling"])
            shuffling.set_state(state["shuffling"])
            before = state["before"]
    else:
        start = 0
        before = evaluate(policy, tok, held_out, cfg)
        ctx.log("eval", step=0, **{k: v for k, v in before.items() if k != "texts"})
    ctx.say(f"policy {sft_dir}: held-out accuracy {before['sampled']:.3f} sampled (T={cfg.temperature}), "
            f"{before['greedy']:.3f} greedy before; {cfg.steps} steps of "
            f"{cfg.prompts_per_step} prompts x G={cfg.group_size}, {cfg.iterations} x {cfg.minibatches} "
            f"optimizer steps per batch")
    policy.train()
    for step in ctx.track(range(start, cfg.steps), "optimising the policy", total=cfg.steps - start):
        picked = torch.randint(len(prompts), (cfg.prompts_per_step,), generator=shuffling).tolist()
        t0 = time.perf_counter()
        rollout = collect_rollout(policy, tok, [prompts[i] for i in picked], cfg.group_size, cfg.max_new_tokens,
                                  cfg.temperature, cfg.format_reward, sampling)
        t1 = time.perf_counter()
        advantages = group_advantages(rollout.rewards, cfg.scale_rewards, cfg.adv_eps)
        stats = optimise_on_rollout(policy, reference, opt, rollout, advantages, objective, cfg, shuffling)
        timing["generate_s"] += t1 - t0
        timing["learn_s"] += time.perf_counter() - t1
        timing["generated_tokens"] += float(rollout.response_mask.sum())
        ctx.log("train", step=step + 1, reward=rollout.rewards.mean().item(), correct=rollout.correct.mean().item(),
                format=rollout.formatted.mean().item(), lenient=rollout.lenient.mean().item(),
                zero_variance_groups=(rollout.rewards.std(1) == 0).float().mean().item(),
                response_length=rollout.response_mask.sum(1).mean().item(), **stats)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            during = evaluate(policy, tok, held_out, cfg)
            ctx.log("eval", step=done, **{k: v for k, v in during.items() if k != "texts"})
            policy.train()
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ctx.save_checkpoint(done, {"model": policy.state_dict(), "optimizer": opt.state_dict(),
                                       "sampling": sampling.get_state(), "shuffling": shuffling.get_state(),
                                       "before": before})

    after = evaluate(policy, tok, held_out, cfg)
    save_model(policy, ctx.models_dir)
    tok.save(ctx.models_dir)
    if timing["generate_s"] > 0:
        ctx.measure(rollout_tokens_per_s=timing["generated_tokens"] / timing["generate_s"],
                    generate_share=timing["generate_s"] / (timing["generate_s"] + timing["learn_s"]),
                    generate_s=timing["generate_s"], learn_s=timing["learn_s"])
    show_examples(ctx, held_out, before["texts"], after["texts"])
    train_rows = ctx.tables["train"]
    window = max(1, len(train_rows) // 10)

    def first_last(key: str) -> tuple[float, float]:
        values = [r[key] for r in train_rows]
        return float(np.mean(values[:window])), float(np.mean(values[-window:]))

    reward_first, reward_last = first_last("reward")
    kl_last = first_last("kl")[1]
    kl_max = float(max(r["kl"] for r in train_rows))
    ctx.say(f"held-out accuracy {before['sampled']:.3f} -> {after['sampled']:.3f} sampled, {before['greedy']:.3f} -> "
            f"{after['greedy']:.3f} greedy; right however phrased {before['sampled_lenient']:.3f} -> "
            f"{after['sampled_lenient']:.3f}; reward {reward_first:.3f} -> {reward_last:.3f} (first / last 10% of "
            f"steps), KL to the sft model at most {kl_max:.3f}")
    return {
        "sft_accuracy": before["sampled"], "accuracy": after["sampled"], "accuracy_gain": after["sampled"] - before["sampled"],
        "sft_greedy_accuracy": before["greedy"], "greedy_accuracy": after["greedy"],
        "sft_lenient": before["sampled_lenient"], "lenient": after["sampled_lenient"],
        "sft_format": before["sampled_format"], "format": after["sampled_format"],
        "reward_first": reward_first, "reward_last": reward_last,
        "kl_last": kl_last, "kl_max": kl_max,
        "clip_fraction_mean": float(np.mean([r["clip_fraction"] for r in train_rows])),
        "ratio_std_mean": float(np.mean([r["ratio_std"] for r in train_rows])),
        "zero_variance_groups_mean": float(np.mean([r["zero_variance_groups"] for r in train_rows])),
        "response_length_first": first_last("response_length")[0],
        "response_length_last": first_last("response_length")[1],
    }


TOY_PRESET = dict(n_prompts=600, n_held_out=90, steps=30, prompts_per_step=8, group_size=8, lr=1e-4, eval_every=15,
                  checkpoint_every=10)
"""the toy preset of every group-policy module: seconds on 2 cores, the same start and budget for each"""

LEARNING_CHECKS = [
    Check("accuracy", ">", ref="sft_accuracy", presets=("toy",),
          why="held-out accuracy rises over the sft model it starts from"),
    Check("accuracy_gain", ">=", 0.10, presets=("default",),
          why="held-out accuracy rises by at least 10 points over the sft start"),
    Check("reward_last", ">", ref="reward_first", why="the reward of the sampled answers rises"),
]
"""what every group-policy run must show, whatever its objective"""

GROUP_POLICY_METRICS = {
    "sft_accuracy": "held-out accuracy of the sft model this run starts from: mean exact match of eval_samples "
                    "responses per problem sampled at the rollout temperature (pass@1)",
    "accuracy": "the same held-out sampled accuracy after the run",
    "accuracy_gain": "accuracy - sft_accuracy",
    "sft_greedy_accuracy": "held-out exact-match accuracy of the sft model's greedy decode",
    "greedy_accuracy": "held-out exact-match accuracy of the greedy decode after the run",
    "sft_lenient": "the sft model's sampled held-out responses whose last number is right, however phrased",
    "lenient": "the same after the run: what changed in the arithmetic, apart from the answer's form",
    "sft_format": "share of the sft model's sampled held-out responses that end in 'The answer is N.'",
    "format": "the same after the run",
    "reward_first": "mean reward of the sampled responses over the first 10% of the steps",
    "reward_last": "mean reward of the sampled responses over the last 10% of the steps",
    "kl_last": "mean KL(pi || pi_ref) per response token over the last 10% of the steps (k3 weighted by pi / pi_old)",
    "kl_max": "largest mean KL of any step (the same estimate)",
    "clip_fraction_mean": "share of clipped samples (tokens, or sequences for sequence-level ratios), mean over steps",
    "ratio_std_mean": "std of the importance ratios pi / pi_old within a step, mean over steps",
    "zero_variance_groups_mean": "share of groups whose G rewards are all equal (advantage 0: no gradient)",
    "response_length_first": "mean response tokens over the first 10% of the steps",
    "response_length_last": "mean response tokens over the last 10% of the steps",
}
"""the metrics `train` returns, with their meanings (the grpo and gspo manifests list them)"""


def show_examples(ctx, problems: list[Problem], before: list[str], after: list[str], n: int = 3) -> None:
    """Three held-out problems the run changed the answer to (right ones first), before and after;
    all of them in examples.txt."""
    changed = [i for i in range(len(problems)) if before[i] != after[i]]
    changed.sort(key=lambda i: -correct(after[i], problems[i].answer))
    lines = []
    for i in range(len(problems)):
        mark = lambda text: "right" if correct(text, problems[i].answer) else "wrong"  # noqa: E731
        lines += [f"Q: {problems[i].question}  (answer {problems[i].answer})",
                  f"  before ({mark(before[i])}): {before[i]}", f"  after  ({mark(after[i])}): {after[i]}", ""]
    atomic_write_text(ctx.path("examples.txt"), "\n".join(lines))
    for i in (changed or list(range(len(problems))))[:n]:
        ctx.say(f"Q: {problems[i].question} (answer {problems[i].answer})\n"
                f"   before: {before[i]}\n   after:  {after[i]}")
