"""Parameter-efficient fine-tuning: LoRA and QLoRA SFT of the nanogpt base, against full SFT, in one file.

LoRA (Hu et al. 2021, eq. 3 and §4.1), on each adapted projection W0 (d x k), frozen:
    h    = W0 x + (alpha / r) B A dropout(x)     A (r x k) Kaiming-uniform, B (d x r) = 0
    W'   = W0 + (alpha / r) B A                  merged after training: the plain architecture again
    trainable share = sum over adapted matrices of r (d + k) / all parameters
QLoRA (Dettmers et al. 2023, §3): W0 stored in NF4, 16 levels at quantiles of N(0, 1) (the table of
its Appendix E, core/nn/lora.py: NF4_CODE), one absmax scale per block of 64 weights, the scales
themselves int8 with one fp32 step per 256 of them (double quantisation):
    bits per weight = 4 + 8 / 64 + 32 / (64 * 256) = 4.127
W0 is dequantised at every forward; the same adapter trains on top, its gradient flowing through the
dequantised weight.

The blocks (LoRALinear, NF4Linear, add_lora, merge_lora, save_adapter, load_adapter) are
core/nn/lora.py; this file is the experiment. Full SFT is the sft run of the same preset: LoRA and
QLoRA start from the same nanogpt base, train on the same conversations (its config, rebuilt by
core/data/chat.py) with the same loss (core/nn/sequences.py: sft_loss) and are scored on the same
held-out problems, greedy, with the same measures. The full-SFT figures are read from that run's
metrics.json rather than trained again here: one fine-tuning fewer, and the comparison is with the
model `eval` puts on the leaderboard.

    1 identity at init    add_lora changes no logit: B = 0 makes B A x exact zeros (bit for bit)
    2 LoRA SFT            AdamW on A and B (and the new tokens' rows), warmup + cosine, clipping
    3 merge               W0 + (alpha / r) B A into plain nn.Linear weights; logits as unmerged
                          (up to float rounding); the merged model is what this run saves
    4 the adapter alone   save_adapter writes only A and B (safetensors), the new tokens' rows go to
                          a second small file; loaded into a fresh LoRA model on the base they
                          reproduce the trained one's logits bit for bit
    5 QLoRA SFT           the same, on NF4 weights; bytes of the adapted weights measured from the
                          stored tensors, fp32 against NF4 codes + double-quantised scales
    6 NF4 vs int4         mean squared reconstruction error on N(0, 1) samples and on the base's own
                          weights, NF4 (double-quantised, as stored) against uniform int4 (fp32 scales)

Tokens the base never saw. LoRA freezes the embedding, and here the tied embedding is also the LM
head. The pretraining stories contain no "+", "=", "?", "0", "1", "2" and none of the chat markers
<|user|> <|assistant|> <|end|>: their rows were never an input, and as outputs they were only ever
pushed down (every softmax gradient lowers the logit of a token that is not the target). No adapter
on the projections can make the model emit "=" or stop with <|end|> when the row it must score
high is that: toy held-out response loss 1.5 after 100 LoRA steps against 0.48 for full SFT,
measured while writing this. So those rows train with the adapters (`unseen_tokens`, `train_rows`;
what Hugging Face PEFT calls trainable_token_indices, and the usual advice when a chat template
brings new special tokens): a few hundred numbers, saved beside the adapter. `ablation` measures
LoRA without them in the same run.

Learning rate. LoRA wants a higher peak than full fine-tuning (here 5x sft's). Adam moves every
trainable entry by about lr per step, whatever its gradient's size. Full fine-tuning moves each W
entry by ~lr. LoRA moves B (A's gradient is B^T g = 0 at the first step, so A starts moving only
once B has), and an entry of the change (alpha / r) B A sums r terms of size lr |A_lj| with
|A_lj| <= 1 / sqrt(k): with signs that do not line up, about lr alpha / sqrt(3 r k) per step, 0.35 lr
at the toy's k = 64 (r = 8, alpha = 16), less at larger k. And the change is confined to r directions
per matrix, so fewer steps can be spent where they matter.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from core.artifacts import atomic_write, atomic_write_text, read_json
from core.config import Length, Range, Seed
from core.data.chat import chat_example, chat_examples, demonstrations
from core.data.corpus import TokenBins
from core.data.tokenizer import Tokenizer
from core.data.word_problems import Problem, generate_problems, score
from core.nn.lora import (ADAPTER_NAMES, NF4Linear, add_lora, load_adapter, merge_lora, quantize_int4, quantize_nf4,
                          save_adapter)
from core.nn.model import Transformer, load_model, save_model
from core.nn.sampling import answer
from core.nn.sequences import right_pad, sft_loss
from core.nn.training import adamw_groups, cosine_lr
from core.paths import workdir
from core.run_context import MODEL_DIR, read_run_index, upstream_run

Target = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class Config:
    r: Annotated[int, Range(ge=1, le=64)] = 8
    """LoRA rank: A is r x k, B is d x r"""
    alpha: Annotated[float, Range(gt=0, le=1024)] = 16.0
    """LoRA alpha: the adapter's output is scaled by alpha / r (so a new r needs no new learning rate)"""
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """dropout on the adapter's input in training (QLoRA used 0.05 to 0.1). Off here: a few hundred steps
    do not overfit thousands of conversations, and on a CPU the dropout masks cost a third of a step"""
    targets: Annotated[tuple[Target, ...], Length(1, 7)] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
    """projections that get an adapter: attention wq wk wv wo, SwiGLU w1 (gate) w3 (up) w2 (down);
    QLoRA adapts all of them, the LoRA paper's GPT-3 runs only wq and wv"""
    qlora: bool = True
    """also fine-tune QLoRA (NF4 base + the same adapter); off, the NF4 model is still built and measured
    (bytes, reconstruction error, its loss before training) but not trained"""
    steps: Annotated[int, Range(ge=1, le=100_000)] = 300
    """optimizer steps of each fine-tuning (LoRA, QLoRA)"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 32
    """conversations per step"""
    lr: Annotated[float, Range(gt=0, le=1e-1)] = 5e-3
    """peak learning rate of the adapters (higher than full SFT's: see the module docstring)"""
    warmup: Annotated[int, Range(ge=0, le=100_000)] = 20
    """linear warmup steps"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """the cosine decays to min_lr_ratio * lr"""
    grad_clip: Annotated[float, Range(gt=0, le=100)] = 1.0
    """clip the trainable parameters' global gradient norm to this"""
    ablation: bool = False
    """also fine-tune LoRA with the whole embedding frozen (no new-token rows): what they are worth"""
    normal_samples: Annotated[int, Range(ge=64, le=10_000_000)] = 2**20
    """N(0, 1) samples for the NF4 / int4 reconstruction error"""
    seed: Seed = 0
    """seeds the adapters' initialisation, the dropout and the batches (the data are the sft run's)"""


# --- the new tokens' rows ---------------------------------------------------------------------------
def unseen_tokens(pretraining: np.ndarray, conversations: list[list[int]], vocab_size: int) -> list[int]:
    """The token ids of the fine-tuning conversations that the pretraining tokens never contain."""
    seen = np.bincount(pretraining, minlength=vocab_size) > 0
    return sorted({t for ids in conversations for t in ids if not seen[t]})


def train_rows(model: Transformer, rows: list[int]) -> None:
    """Let the embedding rows `rows` (the tied LM head's rows with them) train with the adapters: a
    hook zeroes every other row's gradient, and Adam without weight decay then leaves those rows bit
    for bit (its moments stay 0, so its step is 0)."""
    keep = torch.zeros(model.cfg.vocab_size, 1)
    keep[rows] = 1.0
    model.tok_emb.weight.requires_grad_(True).register_hook(lambda grad: grad * keep)


def save_rows(model: Transformer, rows: list[int], path: Path) -> Path:
    tensors = {"ids": torch.tensor(rows), "rows": model.tok_emb.weight.detach()[rows].contiguous()}
    return atomic_write(path, lambda f: f.write(save(tensors)))


@torch.no_grad()
def load_rows(model: Transformer, path: Path) -> Transformer:
    tensors = load_file(path)
    model.tok_emb.weight[tensors["ids"]] = tensors["rows"]
    return model


def trainable_count(model: nn.Module, rows: list[int]) -> int:
    """Adapter parameters plus the rows that train (the embedding's other rows are frozen by the hook)."""
    adapters = sum(p.numel() for name, p in model.named_parameters() if name.rpartition(".")[2] in ADAPTER_NAMES)
    return adapters + len(rows) * model.cfg.n_embd


# --- measurements ---------------------------------------------------------------------------------
def held_out_conversations(tok: Tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out problems with their verifiable worked solutions, right-padded: a loss to compare
    models on, finer than greedy accuracy on a few problems."""
    rows = [chat_example(tok, p.question, p.solution) for p in problems]
    return right_pad([ids for ids, _ in rows], tok.pad_id), right_pad([mask for _, mask in rows], 0)


@torch.no_grad()
def held_out_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    return sft_loss(model, *batch).item()


@torch.no_grad()
def max_logit_diff(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    a.eval(), b.eval()
    return (a(ids) - b(ids)).abs().max().item()


def adapted_weights(model: Transformer, targets: tuple[str, ...]) -> list[torch.Tensor]:
    return [m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the stored weights: every parameter, plus the NF4 codes and scales of a QLoRA model."""
    return (sum(p.nbytes for p in model.parameters())
            + sum(m.quantized.nbytes for m in model.modules() if isinstance(m, NF4Linear)))


def reconstruction_mse(weights: list[torch.Tensor]) -> tuple[float, float]:
    """(NF4 as QLoRA stores it, uniform int4 with fp32 scales): mean squared error over all values."""
    def mse(quantize) -> float:
        errors = sum(((quantize(w).dequantize() - w) ** 2).sum().item() for w in weights)
        return errors / sum(w.numel() for w in weights)
    return mse(quantize_nf4), mse(quantize_int4)


# --- training -------------------------------------------------------------------------------------
def finetune(model: nn.Module, ids: list[list[int]], masks: list[list[int]], pad_id: int, cfg: Config, ctx,
             method: str) -> None:
    """SFT of the trainable parameters only: AdamW, warmup + cosine, clipping."""
    opt = torch.optim.AdamW(adamw_groups(model, 0.0), lr=cfg.lr, betas=(0.9, 0.95))
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = torch.Generator().manual_seed(cfg.seed)  # the same batches for every method
    model.train()
    for step in ctx.track(range(cfg.steps), f"{method} fine-tuning", total=cfg.steps):
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=batches).tolist()
        loss = sft_loss(model, right_pad([ids[i] for i in pick], pad_id), right_pad([masks[i] for i in pick], 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctx.log("train", method=method, step=step + 1, lr=lr, loss=loss.item())
    model.eval()


def run(cfg: Config, ctx) -> dict:
    sft_models, sft_folder = upstream_run(ctx, "sft")  # builds nanogpt -> sft when missing
    sft_run = read_json(sft_folder / "run.json")
    nanogpt = read_run_index()["nanogpt"][sft_run["preset"]]  # the base sft started from, unless rerun since
    base_folder = workdir() / nanogpt["out_dir"]
    base_dir = base_folder / MODEL_DIR
    if nanogpt["finished_at"] > sft_run["started_at"]:
        ctx.say("note: nanogpt was run again after the sft run; full SFT started from an older base than LoRA")
    data, full = sft_run["config"], sft_run["metrics"]
    base, tok = load_model(base_dir), Tokenizer.load(base_dir)
    pairs = demonstrations(data["n_problems"], tuple(data["tiers"]), data["seed"], data["verifiable_fraction"],
                           data["story_fraction"])
    ids, masks, _ = chat_examples(tok, pairs, base.cfg.block_size)
    held_out = generate_problems(data["n_held_out"], tuple(data["tiers"]), data["seed"], "held_out")
    questions = [p.question for p in held_out]
    probe = held_out_conversations(tok, held_out)
    rows = unseen_tokens(TokenBins(base_folder / "data").splits["train"], ids, base.cfg.vocab_size)
    ctx.say(f"base {base_dir}: {base.num_params():,} parameters; the sft run's data: {len(ids)} conversations, "
            f"{len(held_out)} held-out problems; LoRA r={cfg.r} alpha={cfg.alpha:g} on {','.join(cfg.targets)}; "
            f"{len(rows)} tokens the pretraining data never contains: {' '.join(tok.decode([t]) for t in rows)}")

    def lora_model(quantize: bool, seed: int) -> Transformer:
        torch.manual_seed(seed)
        return add_lora(copy.deepcopy(base), cfg.r, cfg.alpha, cfg.dropout, cfg.targets, quantize=quantize)

    lora = lora_model(False, cfg.seed)
    init_diff = max_logit_diff(lora, base, probe[0])
    train_rows(lora, rows)
    finetune(lora, ids, masks, tok.pad_id, cfg, ctx, "LoRA")
    lora_loss = held_out_loss(lora, probe)

    adapter_path, rows_path = ctx.path("adapter.safetensors"), ctx.path("new_token_rows.safetensors")
    save_adapter(lora, adapter_path)
    save_rows(lora, rows, rows_path)
    reloaded = load_rows(load_adapter(lora_model(False, cfg.seed + 1), adapter_path), rows_path)  # another A
    reload_diff = max_logit_diff(reloaded, lora, probe[0])
    merged = merge_lora(copy.deepcopy(lora))
    merge_diff = max_logit_diff(merged, lora, probe[0])
    lora_scores = score(answer(merged, tok, questions, data["max_new_tokens"]), held_out)
    save_model(merged, ctx.models_dir)
    tok.save(ctx.models_dir)

    qlora = lora_model(True, cfg.seed)
    nf4_base_loss = held_out_loss(qlora, probe)  # B = 0: the quantised base alone
    qlora_scores = {"accuracy": None, "lenient": None, "format": None, "loss": None, "gap": None}
    if cfg.qlora:
        train_rows(qlora, rows)
        finetune(qlora, ids, masks, tok.pad_id, cfg, ctx, "QLoRA")
        qlora_scores = score(answer(qlora, tok, questions, data["max_new_tokens"]), held_out)
        qlora_scores |= {"loss": held_out_loss(qlora, probe), "gap": full["sft_lenient"] - qlora_scores["lenient"]}

    frozen = {"lenient": None, "loss": None}
    if cfg.ablation:
        no_rows = lora_model(False, cfg.seed)
        finetune(no_rows, ids, masks, tok.pad_id, cfg, ctx, "LoRA, embedding frozen")
        frozen = {"lenient": score(answer(no_rows, tok, questions, data["max_new_tokens"]), held_out)["lenient"],
                  "loss": held_out_loss(no_rows, probe)}

    normal = torch.randn(cfg.normal_samples, generator=torch.Generator().manual_seed(cfg.seed))
    nf4_normal, int4_normal = reconstruction_mse([normal])
    nf4_weights, int4_weights = reconstruction_mse(adapted_weights(base, cfg.targets))
    fp32_bytes = sum(w.nbytes for w in adapted_weights(base, cfg.targets))
    nf4_bytes = sum(m.quantized.nbytes for m in qlora.modules() if isinstance(m, NF4Linear))
    trainable = trainable_count(lora, rows)
    metrics = {
        "base_lenient": full["base_lenient"],
        "sft_accuracy": full["sft_accuracy"],
        "sft_lenient": full["sft_lenient"],
        "lora_accuracy": lora_scores["accuracy"],
        "lora_lenient": lora_scores["lenient"],
        "lora_format": lora_scores["format"],
        "lora_gap": full["sft_lenient"] - lora_scores["lenient"],
        "qlora_accuracy": qlora_scores["accuracy"],
        "qlora_lenient": qlora_scores["lenient"],
        "qlora_format": qlora_scores["format"],
        "qlora_gap": qlora_scores["gap"],
        "qlora_cost": None if qlora_scores["lenient"] is None else lora_scores["lenient"] - qlora_scores["lenient"],
        "frozen_embedding_lenient": frozen["lenient"],
        "base_loss": held_out_loss(base, probe),
        "sft_loss": held_out_loss(load_model(sft_models), probe),
        "lora_loss": lora_loss,
        "qlora_loss": qlora_scores["loss"],
        "qlora_loss_ratio": None if qlora_scores["loss"] is None else qlora_scores["loss"] / lora_loss,
        "frozen_embedding_loss": frozen["loss"],
        "nf4_base_loss": nf4_base_loss,
        "init_max_abs_diff": init_diff,
        "merge_max_abs_diff": merge_diff,
        "reload_max_abs_diff": reload_diff,
        "new_tokens": len(rows),
        "trainable_params": trainable,
        "trainable_share": trainable / sum(p.numel() for p in lora.parameters()),
        "adapter_file_bytes": adapter_path.stat().st_size + rows_path.stat().st_size,
        "adapted_bytes_fp32": fp32_bytes,
        "adapted_bytes_nf4": nf4_bytes,
        "nf4_bits_per_weight": 8 * nf4_bytes / (fp32_bytes / 4),
        "model_bytes_fp32": weight_bytes(base),
        "model_bytes_qlora": weight_bytes(qlora),
        "nf4_mse_normal": nf4_normal,
        "int4_mse_normal": int4_normal,
        "nf4_mse_weights": nf4_weights,
        "int4_mse_weights": int4_weights,
    }
    report(ctx, metrics)
    plot(ctx, metrics)
    return metrics


def report(ctx, m: dict) -> None:
    rows = [("full SFT (the sft run)", m["sft_accuracy"], m["sft_lenient"], m["sft_loss"], 1.0),
            ("LoRA + new-token rows", m["lora_accuracy"], m["lora_lenient"], m["lora_loss"], m["trainable_share"])]
    if m["qlora_loss"] is not None:
        rows.append(("QLoRA + new-token rows", m["qlora_accuracy"], m["qlora_lenient"], m["qlora_loss"],
                     m["trainable_share"]))
    lines = [f"{'held-out (greedy)':<24} {'accuracy':>8} {'lenient':>8} {'loss':>6} {'trains':>7}"]
    lines += [f"{name:<24} {acc:>8.3f} {lenient:>8.3f} {loss:>6.3f} {share:>7.2%}"
              for name, acc, lenient, loss, share in rows]
    if m["frozen_embedding_loss"] is not None:
        lines.append(f"{'LoRA, embedding frozen':<24} {'':>8} {m['frozen_embedding_lenient']:>8.3f} "
                     f"{m['frozen_embedding_loss']:>6.3f}")
    lines.append(f"adapted weights {m['adapted_bytes_fp32']:,} B fp32 -> {m['adapted_bytes_nf4']:,} B NF4 "
                 f"({m['nf4_bits_per_weight']:.3f} bits each); whole model {m['model_bytes_fp32']:,} -> "
                 f"{m['model_bytes_qlora']:,} B; adapter files {m['adapter_file_bytes']:,} B")
    lines.append(f"reconstruction MSE on N(0, 1): NF4 {m['nf4_mse_normal']:.5f}, int4 {m['int4_mse_normal']:.5f}; "
                 f"on the base's weights: NF4 {m['nf4_mse_weights']:.2e}, int4 {m['int4_mse_weights']:.2e}")
    atomic_write_text(ctx.path("comparison.txt"), "\n".join(lines) + "\n")
    ctx.say("\n".join(lines))


def plot(ctx, m: dict) -> None:
    train = ctx.tables["train"]
    fig, (ax, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in train):
        rows = [r for r in train if r["method"] == method]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.8, label=method)
    ax.axhline(m["sft_loss"], color="k", ls="--", lw=0.8, label="full SFT on the held-out solutions")
    ax.set_xlabel("step")
    ax.set_ylabel("response-token cross-entropy (nats)")
    ax.set_yscale("log")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    names, keys = ["full SFT", "LoRA"], ["sft", "lora"]
    if m["qlora_loss"] is not None:
        names, keys = [*names, "QLoRA"], [*keys, "qlora"]
    x = np.arange(len(names))
    ax_acc.bar(x - 0.2, [m[f"{k}_lenient"] for k in keys], 0.4, label="right, any phrasing")
    ax_acc.bar(x + 0.2, [m[f"{k}_accuracy"] for k in keys], 0.4, label='right as "The answer is N."')
    ax_acc.set_xticks(x, names)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_title("held-out word problems (greedy)")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    ctx.save_figure(fig, "peft.png")
