"""Supervised fine-tuning (SFT) of the pretrained nanogpt model into a chat model that answers
arithmetic word problems, in one file.

    data     chat-formatted (instruction, response) pairs: word problems with a worked answer
             (core/data/word_problems.py, three tiers) that ends either in the verifiable "The answer
             is N." or in a plain sentence ("So Mia had 12 shells.") the checker does not read, plus
             story requests answered by the start of a story, so the model keeps some language
             (core/data/chat.py: demonstrations, chat_examples; peft trains on the same ones)
    template <eos> <|user|> instruction <|end|> <|assistant|> response <|end|>  (core/data/chat.py)
    loss     L = - sum_{b,t} m_{b,t} log p(x_{b,t} | x_{b,<t}) / sum_{b,t} m_{b,t}  (core/nn/sequences.py: sft_loss)
             m = 1 on response tokens and the closing <|end|>, 0 on the prompt and on padding:
             the model is taught to answer and to stop, never to predict the user's words
    batches  right-padded (a causal model never attends to the pads after a token, so padding
             changes no real logit; it only costs compute) rather than packed (no wasted compute,
             but packed examples must not attend across boundaries, which needs per-document masks)
    update   AdamW on every weight (full fine-tuning), warmup + cosine, gradient clipping
    measure  on held-out problems, greedy, for the base model and the fine-tuned one in the same run:
             accuracy (right and stated as "The answer is N."), lenient (the last number is right,
             however phrased) and format (ends in the verifiable sentence)

The base model is the latest nanogpt run at the same preset (built first when there is none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch

from core.artifacts import atomic_write_text
from core.config import Range, Seed
from core.data.chat import chat_examples, demonstrations
from core.data.tokenizer import Tokenizer
from core.data.word_problems import Problem, generate_problems, score
from core.nn.model import load_model, save_model
from core.nn.sampling import answer
from core.nn.sequences import right_pad, sft_loss
from core.nn.training import adamw_groups, cosine_lr
from core.run_context import upstream_models


@dataclass
class Config:
    n_problems: Annotated[int, Range(ge=1, le=10_000)] = 4000
    """training word problems (tiers in turn; a single tier has about 15,000 distinct train problems)"""
    tiers: Annotated[tuple[int, ...], Range(ge=1, le=3)] = (1, 2, 3)
    """difficulty tiers: 1 a+b, 2 a-b with a two-digit a, 3 a+b-c (core/data/word_problems.py)"""
    verifiable_fraction: Annotated[float, Range(ge=0, le=1)] = 0.5
    """share of the demonstrations that end in the verifiable "The answer is N."; the others end in a
    plain sentence ("So Mia had 12 shells.") that the answer checker does not read, as human-written
    answers often do. The sft model then ends both ways, and GRPO can find out which one is rewarded"""
    story_fraction: Annotated[float, Range(ge=0, le=1)] = 0.2
    """story requests per training word problem (0 drops them; the language then drifts further)"""
    n_held_out: Annotated[int, Range(ge=1, le=3000)] = 300
    """held-out problems for the accuracy (no question shared with training; a single tier has about 3,800)"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 600
    """optimizer steps"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 32
    """examples per step"""
    lr: Annotated[float, Range(gt=0, le=1e-2)] = 1e-3
    """peak learning rate (below pretraining's: the base model's language should survive)"""
    warmup: Annotated[int, Range(ge=0, le=100_000)] = 30
    """linear warmup steps"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """the cosine decays to min_lr_ratio * lr"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.0
    """AdamW decoupled weight decay on weight matrices"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the global gradient norm to this"""
    max_new_tokens: Annotated[int, Range(ge=1, le=2048)] = 40
    """response budget when answering held-out problems (at most what the base model's block_size
    leaves after the prompt)"""
    eval_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """steps between held-out accuracy measurements (greedy; the train loss is logged every step)"""
    checkpoint_every: Annotated[int, Range(ge=1, le=100_000)] = 100
    """steps between resumable checkpoints"""
    resume: bool = False
    """continue from the checkpoint of an interrupted run"""
    seed: Seed = 0
    """seeds the problems, the batches and the initialisation order"""


# --- training ----------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict:
    base_dir = upstream_models(ctx, "nanogpt")
    model, tok = load_model(base_dir), Tokenizer.load(base_dir)
    pairs = demonstrations(cfg.n_problems, cfg.tiers, cfg.seed, cfg.verifiable_fraction, cfg.story_fraction)
    ids, masks, dropped = chat_examples(tok, pairs, model.cfg.block_size)
    held_out = generate_problems(cfg.n_held_out, cfg.tiers, cfg.seed, "held_out")
    ctx.say(f"base model {base_dir}: {model.num_params():,} parameters; {len(ids)} training conversations "
            f"({dropped} longer than block_size {model.cfg.block_size} dropped), {len(held_out)} held-out problems")

    opt = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(cfg.seed)
    resumed = ctx.load_checkpoint(cfg.steps)
    if resumed:
        start, state = resumed
        with ctx.restoring(opt):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            batches.set_state(state["batches"])
            base = state["base"]
    else:
        start = 0
        base_responses = answer(model, tok, [p.question for p in held_out], cfg.max_new_tokens)
        base = {**score(base_responses, held_out), "responses": base_responses}
        ctx.log("eval", step=0, **score(base_responses, held_out))
    response_tokens = sum(map(sum, masks)) / sum(map(len, masks))
    model.train()
    for step in ctx.track(range(start, cfg.steps), "fine-tuning", total=cfg.steps - start):
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=batches).tolist()
        batch, mask = right_pad([ids[i] for i in pick], tok.pad_id), right_pad([masks[i] for i in pick], 0)
        loss = sft_loss(model, batch, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.log("train", step=step + 1, lr=lr, loss=loss.item())
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            ctx.log("eval", step=done, **score(answer(model, tok, [p.question for p in held_out], cfg.max_new_tokens),
                                               held_out))
            model.train()
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ctx.save_checkpoint(done, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                       "batches": batches.get_state(), "base": base})

    responses = answer(model, tok, [p.question for p in held_out], cfg.max_new_tokens)
    final = score(responses, held_out)
    save_model(model, ctx.models_dir)
    tok.save(ctx.models_dir)
    write_examples(ctx, held_out, base["responses"], responses)
    plot(ctx)
    for tier in cfg.tiers:
        pairs = [(r, p) for r, p in zip(responses, held_out) if p.tier == tier]
        if pairs:
            ctx.log("tiers", tier=tier, problems=len(pairs), **score([r for r, _ in pairs], [p for _, p in pairs]))
    ctx.say("held-out accuracy by tier (verifiable / any phrasing): " + ", ".join(
        f"{r['tier']}: {r['accuracy']:.2f} / {r['lenient']:.2f}" for r in ctx.tables["tiers"]))
    losses = [r["loss"] for r in ctx.tables["train"]]
    return {
        "base_accuracy": base["accuracy"],
        "base_lenient": base["lenient"],
        "base_format": base["format"],
        "sft_accuracy": final["accuracy"],
        "sft_lenient": final["lenient"],
        "sft_format": final["format"],
        "train_loss_first_10pct": float(np.mean(losses[:max(1, len(losses) // 10)])),
        "train_loss_last_10pct": float(np.mean(losses[-max(1, len(losses) // 10):])),
        "response_token_share": response_tokens,
        "examples": len(ids),
    }


def write_examples(ctx, problems: list[Problem], before: list[str], after: list[str], n: int = 6) -> None:
    lines = []
    for p, b, a in list(zip(problems, before, after))[:n]:
        lines += [f"Q: {p.question}  (answer {p.answer})", f"  base: {b!r}", f"  sft:  {a!r}", ""]
    atomic_write_text(ctx.path("examples.txt"), "\n".join(lines))
    for p, a in list(zip(problems, after))[:3]:
        ctx.say(f"{p.question} -> {a}")


def plot(ctx) -> None:
    train, evals = ctx.tables["train"], ctx.tables["eval"]
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on response tokens (nats)")
    ax.set_title("SFT loss")
    ax_acc.plot([r["step"] for r in evals], [r["lenient"] for r in evals], "o-", label="right answer, any phrasing")
    ax_acc.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "s-", label="right and verifiable")
    ax_acc.plot([r["step"] for r in evals], [r["format"] for r in evals], "^--", label='ends in "The answer is N."')
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.legend()
    ax_acc.set_title("Held-out word problems (greedy)")
    ctx.save_figure(fig, "sft.png")
