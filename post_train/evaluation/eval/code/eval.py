"""A leaderboard of every language model the chain has produced for a preset: the pretrained base,
sft, grpo, gspo, and any later stage whose manifest says `produces_lm=True` (no edit here).

Each model answers the same held-out word problems and reads the same held-out stories:

    accuracy    exact match of "The answer is N." under greedy decoding, with a 95% Wilson interval
                (Wilson 1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96;
                it stays inside [0, 1] and is honest at p near 0 or 1, where p +- z sqrt(p(1-p)/n) is not
    lenient     the last number of the response is right, however phrased (what a human would accept)
    format      the response ends in "The answer is N."
    pass@k      n samples per problem at temperature T, c of them right: the unbiased estimator
                pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, Codex, Eq. 1), for k = 1 and n
    perplexity  exp(mean next-token loss) on held-out generated stories, "<eos> story <eos>" as in
                pretraining: what post-training costs the language model

The held-out problems are the sft run's own (its n_held_out, tiers and seed), so the sft row must
reproduce the accuracy that run reported: the leaderboard checks itself against the chain.
RL on a verifiable reward typically raises pass@1 more than pass@k for large k (it sharpens what
the model could already sample; Yue et al. 2025), which the two pass@ columns show.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from core.artifacts import read_json
from core.config import Range, Seed
from core.data.corpus import generate_stories
from core.data.tokenizer import Tokenizer
from core.data.word_problems import correct, generate_problems, score
from core.nn.model import Transformer, load_model
from core.nn.sampling import answer
from core.paths import workdir
from core.registry import Module, discover
from core.run_context import MODEL_DIR, output_link, read_run_index, upstream_models


@dataclass
class Config:
    samples: Annotated[int, Range(ge=1, le=64)] = 8
    """n: responses sampled per problem for pass@1 and pass@n"""
    temperature: Annotated[float, Range(ge=0.01, le=10)] = 1.0
    """sampling temperature of the pass@k samples"""
    max_new_tokens: Annotated[int, Range(ge=1, le=1024)] = 40
    """response budget"""
    n_stories: Annotated[int, Range(ge=1, le=10_000)] = 200
    """held-out generated stories for the perplexity"""
    z: Annotated[float, Range(gt=0, le=6)] = 1.96
    """normal quantile of the accuracy interval (1.96: 95%)"""
    seed: Seed = 0
    """seeds the samples and the held-out stories"""


# --- the statistics ------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c right) is right."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def story_perplexity(model: Transformer, tok: Tokenizer, stories: list[str]) -> float:
    """exp of the mean next-token loss over all tokens of the stories (each cut to the context)."""
    model.eval()
    total, count = 0.0, 0
    for story in stories:
        ids = torch.tensor([[tok.eos_id, *tok.encode(story), tok.eos_id][:model.cfg.block_size]])
        logits = model(ids[:, :-1])
        total += F.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total / count)


# --- the rows ------------------------------------------------------------------------------------
def lm_modules() -> list[Module]:
    """The registered modules that produce a language model, upstream stages first."""
    modules = {m.name: m for m in discover().modules.values() if m.produces_lm}

    def depth(m: Module) -> int:
        return 1 + max((depth(modules[d]) for d in m.depends if d in modules), default=0)
    return sorted(modules.values(), key=lambda m: (depth(m), m.name))


def present_models(ctx, candidates: list[Module]) -> list[Module]:
    index = read_run_index()
    return [m for m in candidates if ctx.preset in index.get(m.name, {})
            and (output_link(m, ctx.preset) / MODEL_DIR / "model.safetensors").exists()]


def run(cfg: Config, ctx) -> dict:
    candidates = lm_modules()
    if not any(m.name == "sft" for m in present_models(ctx, candidates)):
        upstream_models(ctx, "sft")  # the leaderboard needs the chat model at least (and builds its base)
    rows = present_models(ctx, candidates)
    sft_run = read_json(workdir() / read_run_index()["sft"][ctx.preset]["out_dir"] / "run.json")
    sft_cfg = sft_run["config"]
    problems = generate_problems(sft_cfg["n_held_out"], tuple(sft_cfg["tiers"]), sft_cfg["seed"], "held_out")
    stories = generate_stories(cfg.n_stories, seed=cfg.seed + 1000)  # seeds no pretraining corpus uses
    ctx.say(f"{len(rows)} models at preset {ctx.preset}: {', '.join(m.name for m in rows)}; "
            f"{len(problems)} held-out problems (the sft run's), {cfg.samples} samples each, {len(stories)} stories")

    results = {}
    for module in ctx.track(rows, "evaluating"):
        folder = output_link(module, ctx.preset) / MODEL_DIR
        model, tok = load_model(folder), Tokenizer.load(folder)
        questions = [p.question for p in problems]
        greedy = score(answer(model, tok, questions, cfg.max_new_tokens), problems)
        sampled = answer(model, tok, questions, cfg.max_new_tokens, n=cfg.samples, temperature=cfg.temperature,
                         generator=torch.Generator().manual_seed(cfg.seed))
        right = [int(sum(correct(sampled[i * cfg.samples + j], p.answer) for j in range(cfg.samples)))
                 for i, p in enumerate(problems)]
        low, high = wilson_interval(round(greedy["accuracy"] * len(problems)), len(problems), cfg.z)
        results[module.name] = row = {
            "model": module.name, **greedy, "ci_low": low, "ci_high": high,
            "pass_at_1": float(np.mean([pass_at_k(cfg.samples, c, 1) for c in right])),
            f"pass_at_{cfg.samples}": float(np.mean([pass_at_k(cfg.samples, c, cfg.samples) for c in right])),
            "story_perplexity": story_perplexity(model, tok, stories)}
        ctx.log("leaderboard", **row)
    print_table(ctx, results.values(), cfg.samples)
    plot(ctx, list(results.values()), cfg.samples)

    chat = [r for name, r in results.items() if name != rows[0].name]
    base = results[rows[0].name]
    return {
        "models": len(results),
        "base_accuracy": base["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in results.values()),
        "sft_accuracy_reported": sft_run["metrics"]["sft_accuracy"],
        "sft_accuracy_measured": results["sft"]["accuracy"],
        "base_perplexity": base["story_perplexity"],
        "worst_perplexity_ratio": max(r["story_perplexity"] for r in chat) / base["story_perplexity"],
    }


def print_table(ctx, rows, samples: int) -> None:
    header = f"{'model':<10} {'accuracy [95% CI]':<24} {'lenient':>8} {'format':>7} {'pass@1':>7} " \
             f"{f'pass@{samples}':>7} {'story ppl':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:<10} {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                     f"{'':<4} {r['lenient']:>8.3f} {r['format']:>7.3f} {r['pass_at_1']:>7.3f} "
                     f"{r[f'pass_at_{samples}']:>7.3f} {r['story_perplexity']:>10.2f}")
    ctx.say("\n".join(lines))


def plot(ctx, rows: list[dict], samples: int) -> None:
    names = [r["model"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4), width_ratios=(3, 1))
    acc = np.array([r["accuracy"] for r in rows])
    ax.bar(x - 0.3, acc, 0.2, yerr=[acc - [r["ci_low"] for r in rows], [r["ci_high"] for r in rows] - acc],
           capsize=3, label="accuracy (greedy, 95% CI)")
    ax.bar(x - 0.1, [r["lenient"] for r in rows], 0.2, label="right, any phrasing")
    ax.bar(x + 0.1, [r["pass_at_1"] for r in rows], 0.2, label="pass@1 (sampled)")
    ax.bar(x + 0.3, [r[f"pass_at_{samples}"] for r in rows], 0.2, label=f"pass@{samples}")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.set_title("held-out word problems")
    ax.legend(fontsize=8)
    ax_ppl.bar(x, [r["story_perplexity"] for r in rows], color="tab:gray")
    ax_ppl.set_xticks(x, names)
    ax_ppl.set_title("perplexity on held-out stories")
    fig.tight_layout()
    ctx.save_figure(fig, "leaderboard.png")
