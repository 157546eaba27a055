"""nanoGPT-style pretraining of the shared transformer family (core/nn/model.py) on generated stories.

    corpus   generated TinyStories-like stories (or the real TinyStories with source=tinystories),
             split by document, sentencepiece ids packed into uint16 bins, random windows of T tokens
    loss     L = -1/(B T) sum_b sum_t log p(x_{b,t+1} | x_{b,<=t})          next-token cross-entropy
             (+ aux_loss_coef * load-balancing loss for the MoE archs)
    update   AdamW (Loshchilov & Hutter 2019), decay on matrices only (core/nn/training.py: adamw_groups),
             linear warmup + cosine decay (cosine_lr), global-norm gradient clipping,
             gradient accumulation: the global batch of B windows runs as grad_accum micro-batches
             per rank, each loss divided by grad_accum so the summed gradient is that of the mean
    DDP      under torchrun every rank draws the same global batch from the same seeded generator
             and keeps its 1/world share; DistributedDataParallel averages the gradients, so a step
             is the single-process step on the same B windows (up to float summation order)
    measure  val loss and perplexity exp(L) every eval_every steps; tokens/s and MFU =
             (training FLOPs per token x tokens/s) / (matmul FLOP/s measured in this process, in
             the compute dtype: fp32, or bf16 with dtype=bf16)
    sample   stories continued from fixed prompts, decoded; the fraction of generated words that
             occur in the training text, against the same measure for the untrained model, and the
             fraction of words that repeat the word before them ("was was"), against the training text's

The baseline a trained model must beat: the unigram entropy H = -sum_w p(w) ln p(w) of the training
tokens, the loss of the best model that ignores the context.
"""
from __future__ import annotations

import contextlib
import re
import resource
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from core.artifacts import UserError, atomic_write_text
from core.config import InsideWorkdir, Range, Seed
from core.data.corpus import TokenBins, load_stories, split_documents, unigram_entropy, write_token_bins
from core.data.tokenizer import Tokenizer, load_tokenizer
from core.distributed import barrier, init_distributed
from core.nn.model import ModelConfig, Transformer, save_model, scaled_config
from core.nn.training import adamw_groups, cosine_lr
from core.paths import workdir

Arch = Literal["llama", "gqa", "mqa", "mla", "moba", "nsa", "moe", "deepseek_v2"]


@dataclass
class Config:
    arch: Arch = "llama"
    """model family member (core/nn/model.py NAMED_CONFIGS), scaled to n_layer / n_embd / n_head"""
    source: Literal["generated", "tinystories"] = "generated"
    """corpus: the offline story generator, or the real TinyStories (downloads ~19 MB once)"""
    n_stories: Annotated[int, Range(ge=2, le=100_000)] = 12000
    """stories in the corpus (~620 bytes each from the generator)"""
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.05
    """fraction of whole stories held out for the val loss"""
    cache_dir: Annotated[str, InsideWorkdir()] = "output/datasets"
    """where a downloaded corpus is cached (relative to the work dir)"""
    vocab_size: Annotated[int, Range(ge=384, le=8192)] = 4096
    """sentencepiece vocabulary (the tokenizer module's model, or one trained on demand)"""
    n_layer: Annotated[int, Range(ge=1, le=48)] = 4
    """transformer blocks"""
    n_embd: Annotated[int, Range(ge=8, le=1024)] = 192
    """model width d_model"""
    n_head: Annotated[int, Range(ge=1, le=64)] = 6
    """query heads (head_dim = n_embd / n_head)"""
    block_size: Annotated[int, Range(ge=32, le=2048)] = 128
    """context length T of the training windows"""
    steps: Annotated[int, Range(ge=1, le=1_000_000)] = 500
    """optimizer steps"""
    batch_size: Annotated[int, Range(ge=1, le=1024)] = 32
    """global batch: windows per optimizer step, over all ranks and micro-batches"""
    grad_accum: Annotated[int, Range(ge=1, le=1024)] = 1
    """micro-batches per optimizer step on each rank (batch_size / (ranks * grad_accum) windows each)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """peak learning rate"""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """the cosine decays to min_lr_ratio * lr at the last step"""
    warmup: Annotated[int, Range(ge=0, le=1_000_000)] = 40
    """linear warmup steps"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.1
    """AdamW decoupled weight decay on weight matrices (none on norms, biases, embeddings)"""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW first-moment decay"""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW second-moment decay (0.95 rather than 0.999: steadier with small batches)"""
    grad_clip: Annotated[float, Range(ge=0, le=100)] = 1.0
    """clip the global gradient norm to this (0 = no clipping)"""
    aux_loss_coef: Annotated[float, Range(ge=0, le=10)] = 0.01
    """weight of the MoE load-balancing loss (moe, deepseek_v2 archs)"""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16 runs the forward under torch.autocast (weights and optimizer stay fp32)"""
    compile: bool = False
    """torch.compile the model for training (needs a C++ compiler on CPU; the first steps compile)"""
    eval_every: Annotated[int, Range(ge=1, le=1_000_000)] = 100
    """steps between val-loss measurements"""
    eval_batches: Annotated[int, Range(ge=1, le=1000)] = 8
    """val batches per measurement (the same windows every time)"""
    n_samples: Annotated[int, Range(ge=1, le=64)] = 4
    """stories generated at the end (one per prompt, cycling through PROMPTS)"""
    sample_tokens: Annotated[int, Range(ge=1, le=2048)] = 120
    """tokens generated per sample (stops early at <eos>)"""
    temperature: Annotated[float, Range(ge=0, le=10)] = 0.8
    """sampling temperature of the samples (0 = greedy)"""
    top_k: Annotated[int, Range(ge=1, le=8192)] = 40
    """top-k filter of the samples"""
    checkpoint_every: Annotated[int, Range(ge=1, le=1_000_000)] = 100
    """steps between resumable checkpoints"""
    resume: bool = False
    """continue from the checkpoint of an interrupted run"""
    seed: Seed = 0
    """seeds the corpus, the split, the weights, the batches and the samples"""

    def problems(self) -> list[str]:
        """Rules between fields (each field's own range is in its annotation)."""
        found = []
        if max(1, round(self.val_fraction * self.n_stories)) >= self.n_stories:  # as split_documents counts
            found.append(f"val_fraction={self.val_fraction} of n_stories={self.n_stories} leaves no training story")
        if self.batch_size % self.grad_accum:
            found.append(f"batch_size={self.batch_size} must divide into grad_accum={self.grad_accum} equal "
                         f"micro-batches")
        if self.sample_tokens >= self.block_size:
            found.append(f"sample_tokens={self.sample_tokens} must be below block_size={self.block_size}: "
                         f"the prompt and the sample share one context")
        if 0 < self.temperature < 0.01:
            found.append(f"temperature={self.temperature} overflows the scaled logits: 0 (greedy) or at least 0.01")
        if (logits := self.batch_size * self.block_size * self.vocab_size) > MAX_BATCH_LOGITS:
            found.append(f"batch_size x block_size x vocab_size = {logits:,} logits per batch, over "
                         f"{MAX_BATCH_LOGITS:,} (GBs of memory): lower one of them")
        try:
            model_config(self, self.vocab_size)  # the tokenizer has exactly vocab_size ids
        except UserError as exc:
            found.append(str(exc))
        return found


MAX_BATCH_LOGITS = 2 ** 28
"""fp32 logits of one batch (1 GiB; the val batch is not split into micro-batches)"""


PROMPTS = ("Once upon a time,", "One day, there was", "Long ago, there was a little", "There was once a")
"""story openings the samples continue (the generator uses these openings, TinyStories does too)"""


# --- data ----------------------------------------------------------------------------------------
def prepare_data(cfg: Config, ctx) -> tuple[TokenBins, Tokenizer, list[str]]:
    """Stories -> train / val token bins in the run's output folder (rank 0 writes, the others wait
    and open them), the tokenizer, and the training documents (rank 0; [] elsewhere)."""
    folder = ctx.path("data/train.bin").parent
    ctx.path("data/val.bin")
    train_docs: list[str] = []
    if ctx.is_main:
        tok = load_tokenizer(cfg.vocab_size, say=ctx.say)
        docs = load_stories(cfg.source, cfg.n_stories, cfg.seed, workdir() / cfg.cache_dir)
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
        write_token_bins(folder, {"train": train_docs, "val": val_docs}, tok.encode, tok.eos_id)
    barrier()
    if not ctx.is_main:
        tok = load_tokenizer(cfg.vocab_size, say=ctx.say)  # rank 0 trained or found it
    bins = TokenBins(folder)
    for split in ("train", "val"):
        if len(bins.splits[split]) <= cfg.block_size:
            raise UserError(f"the {split} split has {len(bins.splits[split])} tokens, not more than "
                            f"block_size={cfg.block_size}: raise n_stories or "
                            + ("val_fraction" if split == "val" else "lower val_fraction"))
    return bins, tok, train_docs


def model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    try:
        return scaled_config(cfg.arch, vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                             n_embd=cfg.n_embd, n_head=cfg.n_head)
    except ValueError as exc:  # a --set that the architecture cannot take: exit 2 with the reason
        raise UserError(f"{exc} (arch={cfg.arch})") from None


# --- measuring -----------------------------------------------------------------------------------
def compute_dtype(cfg: Config) -> torch.dtype:
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")


@torch.no_grad()
def evaluate(model: Transformer, bins: TokenBins, cfg: Config, device: torch.device) -> float:
    """Mean cross-entropy on eval_batches fixed val batches (the same windows at every call)."""
    model.eval()
    windows = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = (t.to(device) for t in bins.get_batch("val", cfg.batch_size, cfg.block_size, windows))
        with autocast(cfg, device):
            logits = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train()
    return float(np.mean(losses))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of repeated n x n matmuls in `dtype` on this device with this process's threads: the
    denominator of MFU, measured rather than looked up (a CPU's peak depends on its vector units,
    its clock and the threads torch uses). A bf16 run is measured against the bf16 peak: against
    the fp32 one, a CPU with bf16 dot-product units would show an MFU above 100%."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b  # warm-up
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        sync()
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


WORD = re.compile(r"[a-z]+")


def known_word_fraction(texts: list[str], vocabulary: set[str]) -> float:
    """Fraction of the words in `texts` that occur in the training text (0 when there are none)."""
    words = [w for t in texts for w in WORD.findall(t.lower())]
    return sum(w in vocabulary for w in words) / len(words) if words else 0.0


def word_repeat_fraction(texts: list[str]) -> float:
    """Fraction of the word-to-word transitions in `texts` where a word repeats the one before it
    ("was was"), 0 when there are none. The stories do it rarely ("named Tom. Tom loved"); a model
    stuck copying its input token does it on almost every word."""
    repeats = transitions = 0
    for text in texts:
        words = WORD.findall(text.lower())
        repeats += sum(a == b for a, b in zip(words, words[1:]))
        transitions += max(len(words) - 1, 0)
    return repeats / transitions if transitions else 0.0


@torch.no_grad()
def write_samples(model: Transformer, tok: Tokenizer, cfg: Config, device: torch.device) -> list[str]:
    """Continue n_samples prompts (after <eos>, where every training story starts); cut at <eos>."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    continuations = []
    for i in range(cfg.n_samples):
        prompt = [tok.eos_id, *tok.encode(PROMPTS[i % len(PROMPTS)])]
        n_new = min(cfg.sample_tokens, cfg.block_size - len(prompt))
        with autocast(cfg, device):
            out = model.generate(torch.tensor([prompt], device=device), n_new, temperature=cfg.temperature,
                                 top_k=cfg.top_k, generator=generator)
        new = out[0, len(prompt):].tolist()
        continuations.append(tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new))
    model.train()
    return continuations


# --- training ------------------------------------------------------------------------------------
def train_step(model, raw: Transformer, opt: torch.optim.Optimizer, bins: TokenBins, batches: torch.Generator,
               cfg: Config, rank: int, world: int, device: torch.device) -> tuple[float, float]:
    """One optimizer step on a global batch of batch_size windows -> (its mean loss, grad norm)."""
    x, y = bins.get_batch("train", cfg.batch_size, cfg.block_size, batches)  # identical on every rank
    x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)  # this rank's share
    loss_sum = torch.zeros((), device=device)
    for i, (mx, my) in enumerate(zip(x.chunk(cfg.grad_accum), y.chunk(cfg.grad_accum))):
        last = i == cfg.grad_accum - 1
        # DDP all-reduces gradients on every backward; skip it until the last micro-batch
        sync = contextlib.nullcontext() if last or world == 1 else model.no_sync()
        with sync:
            with autocast(cfg, device):  # the loss comes fused with the LM head: no (B, T, V) logits
                ce = model(mx, targets=my)
            loss = ce + cfg.aux_loss_coef * raw.aux_loss if raw.cfg.ffn == "moe" else ce
            (loss / cfg.grad_accum).backward()  # sum of micro-gradients = gradient of the mean
        loss_sum += ce.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss = loss_sum / cfg.grad_accum
    if world > 1:  # the global batch's mean loss: the ranks' shares are equal in size
        torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
    return loss.item(), grad_norm.item()


def check_batch(cfg: Config, world: int) -> None:
    """The one rule that needs the world size (Config.problems checks the single-process split)."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise UserError(f"batch_size={cfg.batch_size} must divide into {world} rank(s) x grad_accum="
                        f"{cfg.grad_accum} equal micro-batches")


def run(cfg: Config, ctx) -> dict:
    rank, world = init_distributed()
    check_batch(cfg, world)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    bins, tok, train_docs = prepare_data(cfg, ctx)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    raw = Transformer(model_config(cfg, tok.vocab_size)).to(device)
    opt = torch.optim.AdamW(adamw_groups(raw, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = torch.Generator().manual_seed(cfg.seed)
    vocabulary = {w for d in train_docs for w in WORD.findall(d.lower())}
    train_repeats = word_repeat_fraction(train_docs)  # 0.0 on ranks > 0 (no documents): rank 0 reports

    resumed = ctx.load_checkpoint(cfg.steps)
    if resumed:
        start, state = resumed
        with ctx.restoring(opt):
            raw.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            batches.set_state(state["batches"])
            untrained = {k: float(state["untrained"][k]) for k in ("val_loss", "known_words")}
    else:
        start = 0
        untrained = {"val_loss": evaluate(raw, bins, cfg, device), "known_words": 0.0}
        if ctx.is_main:
            untrained["known_words"] = known_word_fraction(write_samples(raw, tok, cfg, device), vocabulary)
        ctx.log("eval", step=0, val_loss=untrained["val_loss"], val_ppl=float(np.exp(untrained["val_loss"])))
    ctx.say(f"{raw.num_params():,} parameters ({cfg.arch}), {len(bins.splits['train']):,} train tokens, "
            f"{world} process(es) on {device}")

    model = raw
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=raw.cfg.ffn == "moe")  # an expert no token chose has no gradient
    if cfg.compile:
        model = torch.compile(model)

    peak = torch.tensor(matmul_peak_flops(device, compute_dtype(cfg)))
    if world > 1:  # every rank measures at once, as they train: the machine's peak is the sum
        torch.distributed.all_reduce(peak)
    train_seconds = 0.0
    for step in ctx.track(range(start, cfg.steps), "pretraining", total=cfg.steps - start):
        lr = cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        loss, grad_norm = train_step(model, raw, opt, bins, batches, cfg, rank, world, device)
        if step > start:  # the first step warms up (and with compile=true, compiles): not timed
            train_seconds += time.perf_counter() - t0
        ctx.log("train", step=step + 1, lr=lr, loss=loss, grad_norm=grad_norm)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate(raw, bins, cfg, device)
            ctx.log("eval", step=done, val_loss=val, val_ppl=float(np.exp(val)))
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ctx.save_checkpoint(done, {"model": raw.state_dict(), "optimizer": opt.state_dict(),
                                       "batches": batches.get_state(), "untrained": untrained})

    tokens_per_s = (cfg.steps - start - 1) * cfg.batch_size * cfg.block_size / max(train_seconds, 1e-9)
    ctx.measure(tokens_per_s=tokens_per_s, mfu=raw.flops_per_token() * tokens_per_s / peak.item(),
                peak_matmul_gflops=peak.item() / 1e9,  # in the compute dtype
                train_seconds=train_seconds, peak_memory_mb=peak_memory_mb(device))

    metrics = None
    if ctx.is_main:
        metrics = finish(raw, tok, bins, vocabulary, train_repeats, untrained, cfg, ctx, device)
    if world > 1:  # the other ranks report what rank 0 measured
        box = [metrics]
        torch.distributed.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


def finish(model: Transformer, tok: Tokenizer, bins: TokenBins, vocabulary: set[str], train_repeats: float,
           untrained: dict, cfg: Config, ctx, device: torch.device) -> dict:
    """Rank 0: samples, the final model, plots and the metrics."""
    entropy = unigram_entropy(np.asarray(bins.splits["train"]), tok.vocab_size)
    samples = write_samples(model, tok, cfg, device)
    atomic_write_text(ctx.path("samples.txt"), "".join(
        f"--- {PROMPTS[i % len(PROMPTS)]}\n{PROMPTS[i % len(PROMPTS)]}{s}\n\n" for i, s in enumerate(samples)))
    save_model(model, ctx.models_dir)
    tok.save(ctx.models_dir)  # the model's tokenizer travels with it (sft and later stages load both)
    val = ctx.tables["eval"][-1]["val_loss"]
    train_losses = [r["loss"] for r in ctx.tables["train"]]
    plot(ctx, entropy, untrained["val_loss"])
    for prompt, sample in zip(PROMPTS, samples):
        ctx.say(f"sample: {prompt}{sample[:160]}")
    return {
        "unigram_entropy": entropy,
        "initial_val_loss": untrained["val_loss"],
        "val_loss": val,
        "val_perplexity": float(np.exp(val)),
        "entropy_gap": entropy - val,
        "train_loss_last_10pct": float(np.mean(train_losses[-max(1, len(train_losses) // 10):])),
        "sample_known_words": known_word_fraction(samples, vocabulary),
        "sample_known_words_untrained": untrained["known_words"],
        "sample_word_repeats": word_repeat_fraction(samples),
        "train_word_repeats": train_repeats,
        "params": model.num_params(),
        "train_flops_per_token": model.flops_per_token(),
        "tokens_trained": cfg.steps * cfg.batch_size * cfg.block_size,
    }


def plot(ctx, entropy: float, initial_val: float) -> None:
    train, evals = ctx.tables["train"], ctx.tables["eval"]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    ax.axhline(entropy, color="red", ls="--", label=f"unigram entropy {entropy:.2f} (context-blind)")
    ax.set_ylim(0, max(initial_val, entropy) * 1.05)
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Pretraining loss")
    ax.legend()
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:purple")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_ylabel("learning rate")
    ctx.save_figure(fig, "loss.png")
