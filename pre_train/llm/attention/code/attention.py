"""MHA vs GQA vs MQA vs MLA vs sparse attention (MoBA, NSA): what each costs at decode time and what
it costs in quality, measured on the shared transformer family (core/nn/model.py, core/nn/attention.py).

Every architecture gets the same width, depth, data, step budget and seed; only the attention differs.
For each one we measure:

    KV cache per token      bytes of the tensors `init_cache(1, L)` allocates, summed over layers, / L
        closed forms (per layer, s = bytes per element, h = n_head, g = n_kv_head, d_h = head dim):
            MHA / GQA / MQA   2 g d_h s                       (K and V of each kv head; g = h, 1 < g < h, 1)
            MLA               (d_c + d_h^R) s                 (latent c_kv + the shared RoPE key;
                                                               DeepSeek-V2 Table 1)
            MoBA              2 g d_h s                       (full K/V: sparsity saves compute, not memory)
            NSA               3 * 2 g d_h s                   (separate K/V for the cmp, slc, win branches)
    parameters              model.num_params()
    decode tokens/s         cached greedy generation, as a ratio to MHA (timing: logged, never asserted)
    val loss                cross-entropy after the same short AdamW pretraining on the generated stories
    future leak             max_{t < c} |logits_t(x) - logits_t(x')|, x' = x with every token from c on
                            changed: a causal model's predictions cannot depend on later tokens (0)

and compare the val losses with the unigram entropy H = -sum_w p(w) log p(w) of the training tokens:
the loss of a model that ignores the context, so a model that learned nothing cannot beat it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from core.artifacts import UserError
from core.config import Range, Seed
from core.data.corpus import TokenBins, generate_stories, split_documents, unigram_entropy, write_token_bins
from core.data.tokenizer import load_tokenizer
from core.nn.attention import tensor_bytes
from core.nn.model import Transformer, scaled_config
from core.nn.training import adamw_groups, cosine_lr

ARCHS = ("llama", "gqa", "mqa", "mla", "moba", "nsa")
"""core/nn/model.py named configs; llama is the MHA baseline"""
LABELS = {"llama": "MHA", "gqa": "GQA", "mqa": "MQA", "mla": "MLA", "moba": "MoBA", "nsa": "NSA"}


@dataclass
class Config:
    seed: Seed = 0
    """seeds the corpus split, the weights and the batches (identical for every architecture)"""
    n_stories: Annotated[int, Range(ge=2, le=100_000)] = 1500
    """generated stories (core/data/corpus.py), split by document into train / val"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.1
    """fraction of the stories held out for the val loss"""
    vocab_size: Annotated[int, Range(ge=384, le=8192)] = 512
    """sentencepiece vocabulary (trained on demand by core/data/tokenizer.py and cached)"""
    n_layer: Annotated[int, Range(ge=1, le=48)] = 2
    """transformer blocks (the same for every architecture)"""
    n_embd: Annotated[int, Range(ge=8, le=1024)] = 128
    """model width d_model"""
    n_head: Annotated[int, Range(ge=1, le=64)] = 4
    """query heads; head_dim = n_embd / n_head"""
    gqa_kv_heads: Annotated[int, Range(ge=1, le=64)] = 2
    """kv heads of the GQA variant (MHA: n_head, MQA: 1)"""
    kv_lora_rank: Annotated[int, Range(ge=1, le=1024)] = 64
    """MLA latent rank d_c (the cached latent per token)"""
    block_size: Annotated[int, Range(ge=8, le=2048)] = 128
    """context length of training windows (also the longest generation)"""
    sparse_block: Annotated[int, Range(ge=1, le=1024)] = 16
    """MoBA block size and NSA compression/selection block size"""
    sparse_top_k: Annotated[int, Range(ge=1, le=2048)] = 2
    """blocks each query picks (MoBA: current block included; NSA: earlier blocks)"""
    nsa_window: Annotated[int, Range(ge=1, le=2048)] = 32
    """NSA sliding-window branch length"""
    steps: Annotated[int, Range(ge=1, le=1_000_000)] = 300
    """AdamW steps per architecture"""
    batch_size: Annotated[int, Range(ge=1, le=1024)] = 16
    """windows per step"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak learning rate (linear warmup, cosine decay to 10%)"""
    warmup: Annotated[int, Range(ge=0, le=1_000_000)] = 20
    """linear warmup steps"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.1
    """AdamW decoupled weight decay"""
    eval_batches: Annotated[int, Range(ge=1, le=1000)] = 8
    """val batches (the same windows for every architecture)"""
    decode_tokens: Annotated[int, Range(ge=1, le=2048)] = 100
    """tokens generated greedily with the KV cache for the decode-speed measurement"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        found = []
        if max(1, round(self.val_fraction * self.n_stories)) >= self.n_stories:  # as split_documents counts
            found.append(f"val_fraction={self.val_fraction} of n_stories={self.n_stories} leaves no training story")
        if self.decode_tokens >= self.block_size:
            found.append(f"decode_tokens={self.decode_tokens} must be below block_size={self.block_size}: "
                         f"the prompt token and the generated ones share one context")
        n_blocks = self.block_size // self.sparse_block
        if n_blocks < 3:
            found.append(f"block_size={self.block_size} holds {n_blocks} block(s) of sparse_block={self.sparse_block}: "
                         f"sparse attention needs at least 3 to select among")
        elif self.sparse_top_k > n_blocks - 2:
            found.append(f"sparse_top_k={self.sparse_top_k} must be at most {n_blocks - 2} with {n_blocks} blocks "
                         f"(block_size / sparse_block): NSA would select every earlier block, i.e. dense attention")
        if self.nsa_window > self.block_size:
            found.append(f"nsa_window={self.nsa_window} exceeds block_size={self.block_size}")
        if (logits := self.batch_size * self.block_size * self.vocab_size) > MAX_BATCH_LOGITS:
            found.append(f"batch_size x block_size x vocab_size = {logits:,} logits per batch, over "
                         f"{MAX_BATCH_LOGITS:,} (GBs of memory): lower one of them")
        for arch in ARCHS:  # the shapes every architecture's layers must take (core/nn/model.py)
            try:
                model_config(arch, self, self.vocab_size)  # the tokenizer has exactly vocab_size ids
            except ValueError as exc:
                found.append(f"{exc} (arch={arch})")
                break
        return found


MAX_BATCH_LOGITS = 2 ** 28
"""fp32 logits of one batch (1 GiB)"""


def model_config(arch: str, cfg: Config, vocab_size: int):
    """The named config of `arch`, scaled to this run's width, depth and context (core/nn/model.py:
    scaled_config), with this module's kv-head, latent and sparse-block settings."""
    return scaled_config(
        arch, vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
        n_head=cfg.n_head, n_kv_head={"gqa": cfg.gqa_kv_heads, "mqa": 1}.get(arch, cfg.n_head),
        kv_lora_rank=cfg.kv_lora_rank, moba_block_size=cfg.sparse_block, moba_top_k=cfg.sparse_top_k,
        nsa_block_size=cfg.sparse_block, nsa_top_k=cfg.sparse_top_k, nsa_window=cfg.nsa_window)


def measured_cache_bytes_per_token(model: Transformer, length: int) -> float:
    """Bytes of the cache tensors the model really allocates for `length` tokens, per token."""
    caches = model.init_cache(1, length)
    return sum(tensor_bytes(c) for c in caches) / length


def pretrain(model: Transformer, bins: TokenBins, cfg: Config) -> None:
    """cfg.steps AdamW steps of next-token cross-entropy on random train windows."""
    opt = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(cfg.seed)  # the same windows for every architecture
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps)
        x, y = bins.get_batch("train", cfg.batch_size, cfg.block_size, batches)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # -1/N sum log p(x_{t+1} | x_<=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@torch.no_grad()
def val_loss(model: Transformer, bins: TokenBins, cfg: Config) -> float:
    model.eval()
    windows = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = bins.get_batch("val", cfg.batch_size, cfg.block_size, windows)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    return float(np.mean(losses))


@torch.no_grad()
def future_leak(model: Transformer, bins: TokenBins, cfg: Config, vocab_size: int) -> float:
    """Largest change of a logit before position c = block_size / 2 when every token from c on is
    replaced. 0 up to rounding for a causal model; a leak also makes the val loss a lie (the model
    reads the token it is asked to predict)."""
    model.eval()
    x, _ = bins.get_batch("val", 2, cfg.block_size, torch.Generator().manual_seed(cfg.seed + 2))
    cut = cfg.block_size // 2
    changed = x.clone()
    changed[:, cut:] = (x[:, cut:] + 1) % vocab_size  # a different token at every later position
    return (model(x)[:, :cut] - model(changed)[:, :cut]).abs().max().item()


@torch.no_grad()
def decode_tokens_per_s(model: Transformer, n_tokens: int, bos_id: int) -> float:
    """Greedy cached generation from a one-token prompt: prefill once, then one token per step."""
    model.eval()
    prompt = torch.full((1, 1), bos_id, dtype=torch.long)
    model.generate(prompt, 4, temperature=0)  # warm-up (allocator, kernels)
    start = time.perf_counter()
    model.generate(prompt, n_tokens, temperature=0)
    return n_tokens / (time.perf_counter() - start)


def build_token_bins(cfg: Config, ctx) -> tuple[TokenBins, int, int]:
    """Generated stories -> sentencepiece ids -> train.bin / val.bin in the run's output folder."""
    tok = load_tokenizer(cfg.vocab_size, say=ctx.say)
    train_docs, val_docs = split_documents(generate_stories(cfg.n_stories, cfg.seed), cfg.val_fraction, cfg.seed)
    folder = ctx.path("data/train.bin").parent
    ctx.path("data/val.bin")
    bins = write_token_bins(folder, {"train": train_docs, "val": val_docs}, tok.encode, tok.eos_id)
    for split in ("train", "val"):
        if len(bins.splits[split]) <= cfg.block_size:
            raise UserError(f"the {split} split has {len(bins.splits[split])} tokens, not more than "
                            f"block_size={cfg.block_size}: raise n_stories or "
                            + ("val_fraction" if split == "val" else "lower val_fraction"))
    return bins, tok.vocab_size, tok.bos_id


def run(cfg: Config, ctx) -> dict:
    bins, vocab_size, bos_id = build_token_bins(cfg, ctx)
    train_tokens = bins.splits["train"]
    entropy = unigram_entropy(train_tokens, vocab_size)
    ctx.say(f"{len(train_tokens)} train tokens, unigram entropy {entropy:.3f} nats")

    rows = {}
    for arch in ctx.track(ARCHS, "architectures", total=len(ARCHS)):
        torch.manual_seed(cfg.seed)  # same init stream for every architecture
        model = Transformer(model_config(arch, cfg, vocab_size))
        row = dict(arch=arch, label=LABELS[arch], params=model.num_params(),
                   cache_bytes_measured=measured_cache_bytes_per_token(model, cfg.block_size),
                   cache_bytes_formula=model.cache_bytes_per_token())
        pretrain(model, bins, cfg)
        row["val_loss"] = val_loss(model, bins, cfg)
        row["future_leak"] = future_leak(model, bins, cfg, vocab_size)
        row["decode_tok_per_s"] = decode_tokens_per_s(model, cfg.decode_tokens, bos_id)
        rows[arch] = row
    for row in rows.values():
        row["decode_vs_mha"] = row["decode_tok_per_s"] / rows["llama"]["decode_tok_per_s"]
        ctx.log("archs", **row)

    write_table(rows, entropy, ctx)
    plot(rows, entropy, cfg, ctx)

    element_size = 4  # fp32 weights -> fp32 cache
    metrics = {
        "cache_formula_max_rel_diff": max(abs(r["cache_bytes_measured"] - r["cache_bytes_formula"])
                                          / r["cache_bytes_formula"] for r in rows.values()),
        # DeepSeek-V2 Table 1: (d_c + d_h^R) elements per token and layer
        "mla_cache_from_config": (cfg.kv_lora_rank + (cfg.n_embd // cfg.n_head) // 2) * element_size * cfg.n_layer,
        "unigram_entropy": entropy,
        "future_leak_max": max(r["future_leak"] for r in rows.values()),
    }
    for arch, row in rows.items():
        metrics[f"cache_bytes_{arch}"] = row["cache_bytes_measured"]
    for arch, row in rows.items():
        metrics[f"params_{arch}"] = row["params"]
    for arch, row in rows.items():
        metrics[f"val_loss_{arch}"] = row["val_loss"]
    return metrics


def write_table(rows: dict, entropy: float, ctx) -> None:
    lines = ["| arch | KV cache B/token (measured) | formula | params | val loss | decode tok/s vs MHA |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows.values():
        lines.append(f"| {r['label']} | {r['cache_bytes_measured']:.0f} | {r['cache_bytes_formula']} | "
                     f"{r['params']:,} | {r['val_loss']:.3f} | {r['decode_vs_mha']:.2f} |")
    lines.append(f"\nUnigram entropy of the training tokens: {entropy:.3f} nats (context-blind baseline).\n"
                 "Decode speed is one timing on a shared CPU: indicative only.")
    ctx.path("table.md").write_text("\n".join(lines) + "\n")
    ctx.say("\n".join(lines))


def plot(rows: dict, entropy: float, cfg: Config, ctx) -> None:
    labels = [r["label"] for r in rows.values()]
    x = np.arange(len(labels))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, [r["cache_bytes_measured"] for r in rows.values()], color="tab:blue", label="measured (allocated tensors)")
    ax.scatter(x, [r["cache_bytes_formula"] for r in rows.values()], color="black", marker="_", s=600,
               zorder=3, label="closed-form formula")
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"KV-cache bytes per token ({cfg.n_layer} layers, fp32)")
    ax.set_title("KV cache per token")
    ax.legend()
    ctx.save_figure(fig, "cache_bytes.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, [r["val_loss"] for r in rows.values()], color="tab:green")
    ax.axhline(entropy, color="red", ls="--", label="unigram entropy (context-blind)")
    ax.set_xticks(x, labels)
    ax.set_ylabel("val cross-entropy (nats)")
    ax.set_title(f"Val loss after {cfg.steps} AdamW steps (same data, seed, budget)")
    ax.legend(loc="lower right")
    ctx.save_figure(fig, "val_loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x, [r["decode_tok_per_s"] for r in rows.values()], color="tab:orange")
    ax.set_xticks(x, labels)
    ax.set_ylabel("tokens / s (cached greedy decode, batch 1)")
    ax.set_title("Decode speed (one timing on a shared CPU)")
    ctx.save_figure(fig, "decode_speed.png")
