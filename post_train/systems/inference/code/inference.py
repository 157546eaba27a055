"""LLM inference on the learner's nanogpt model: the KV cache, PagedAttention, continuous batching,
speculative decoding and int8 weights, each measured against its baseline in the same process.

    KV cache         decode step t feeds one token and reads the cached K, V of the P + t before it; without
                     the cache every step recomputes the whole prefix. Positions the linear layers process
                     for N new tokens after a prompt of P:
                         recompute  sum_{t=0}^{N-1} (P + t) = N P + N (N - 1) / 2      cached  P + N - 1
    PagedAttention   KV in blocks of B slots, a block table per sequence (code/engine.py). Share of the
                     allocated slots that hold no token, time-averaged over the steps (L = cached tokens):
                         paged   sum (B ceil(L / B) - L) / sum B ceil(L / B)  ~  ((B - 1) / 2) / (mean L + (B - 1) / 2)
                         static  1 - mean L / T_max        (a contiguous cache reserves the context T_max)
    continuous       the batch is re-formed every step (Orca): a finished sequence's slot goes to a
    batching         waiting one at once. Static batches run until their longest member is done:
                         static decode steps = sum over batches of (max_i G_i - 1)    (G_i: tokens of request i)
                         continuous          >= ceil(sum_i (G_i - 1) / max_running)
    speculative      a 1-layer draft trained here proposes gamma tokens, the target verifies them in one
    decoding         forward (code/speculative.py). Per tested draft: P(accept) = beta = sum_x min(p, q); tokens
                     per target call (1 - alpha^(gamma+1)) / (1 - alpha). The output's distribution is the
                     target's: chi-square test of the first two sampled tokens against the exact p.
    int8 weights     per-output-channel absmax scales (code/quantize.py): bytes, the error bound
                     |W - s Q| <= s / 2 per row, logit error, next-token agreement, held-out perplexity.

Times (tokens/s, speed-ups) vary from run to run: they go to run.json's timings; the metrics and checks
use counts that repeat exactly (model calls, slots, tokens, p-values at a fixed seed).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from core.config import Range, Seed
from core.data.corpus import TokenBins, generate_stories
from core.data.tokenizer import Tokenizer
from core.errors import UserError
from core.nn.model import Transformer, load_model, scaled_config
from core.nn.sequences import left_pad
from core.nn.training import adamw_groups, cosine_lr
from core.run_context import upstream_run

from .engine import Engine, SamplingParams
from .quantize import quantize_model, stored_bytes
from .speculative import SpeculativeStats, first_two_tokens, speculative_generate


@dataclass
class Config:
    n_requests: Annotated[int, Range(ge=2, le=1000)] = 64
    """requests of the workload: held-out story openings with mixed prompt and output lengths"""
    prompt_min: Annotated[int, Range(ge=1, le=2048)] = 16
    """shortest prompt (tokens, the leading <eos> included); lengths are uniform in [prompt_min, prompt_max]"""
    prompt_max: Annotated[int, Range(ge=1, le=2048)] = 64
    """longest prompt (prompt_max + output_max must fit the model's context)"""
    output_min: Annotated[int, Range(ge=1, le=2048)] = 4
    """smallest max_tokens of a request; max_tokens is uniform in [output_min, output_max] (<eos> may stop it earlier)"""
    output_max: Annotated[int, Range(ge=1, le=2048)] = 64
    """largest max_tokens of a request"""
    kv_block_size: Annotated[int, Range(ge=1, le=256)] = 4
    """KV slots per block. vLLM uses 16 on contexts of thousands; on a context of 128 a block of 16 is an
    eighth of the window and its last-block waste alone is about 8 / 60 tokens: 4 is the same proportion"""
    block_size_sweep: Annotated[tuple[int, ...], Range(ge=1, le=256)] = (1, 2, 4, 8, 16, 32)
    """block sizes at which the workload is rerun for the waste-vs-block-size plot"""
    max_running: Annotated[int, Range(ge=1, le=256)] = 8
    """sequences decoded together: the engine's max_running and the static batch size"""
    concurrency_sweep: Annotated[tuple[int, ...], Range(ge=1, le=256)] = (1, 2, 4, 8, 16)
    """max_running (and static batch sizes) of the throughput-vs-concurrency plot"""
    kv_new_tokens: Annotated[int, Range(ge=2, le=4096)] = 256
    """tokens generated in the KV-cache timing (the issue asks for 256)"""
    kv_prompt_tokens: Annotated[int, Range(ge=1, le=2048)] = 16
    """prompt tokens before them; the timing model's context is extended to fit kv_prompt + kv_new"""
    kv_batch: Annotated[int, Range(ge=1, le=64)] = 4
    """rows generated together in the KV-cache timing (a serving batch; at one row the toy's width-64 steps
    are so small that call overhead hides most of the recomputation)"""
    timing_repeats: Annotated[int, Range(ge=1, le=10)] = 2
    """each timed run is repeated and its fastest time kept (the machine is shared)"""
    draft_layers: Annotated[int, Range(ge=1, le=8)] = 1
    """layers of the speculative draft model (trained in the run on the target's corpus)"""
    draft_embd: Annotated[int, Range(ge=8, le=512)] = 32
    """width of the draft model"""
    draft_heads: Annotated[int, Range(ge=1, le=16)] = 2
    """attention heads of the draft model"""
    draft_steps: Annotated[int, Range(ge=1, le=100_000)] = 300
    """AdamW steps of the draft model"""
    draft_batch: Annotated[int, Range(ge=1, le=256)] = 16
    """windows of the target's context per draft training step"""
    draft_lr: Annotated[float, Range(gt=0, le=1)] = 5e-3
    """peak learning rate of the draft (warmup + cosine)"""
    gammas: Annotated[tuple[int, ...], Range(ge=1, le=16)] = (1, 2, 3, 4, 6, 8)
    """draft lengths of the acceptance-vs-gamma sweep"""
    gamma: Annotated[int, Range(ge=1, le=16)] = 4
    """the draft length whose speed-up is timed against plain decoding"""
    spec_prompts: Annotated[int, Range(ge=1, le=256)] = 8
    """prompts speculative decoding continues at each gamma (the workload's first ones)"""
    spec_new_tokens: Annotated[int, Range(ge=1, le=1024)] = 48
    """tokens sampled per prompt at each gamma"""
    spec_test_samples: Annotated[int, Range(ge=100, le=100_000)] = 4000
    """independent speculative samples of the first two tokens per test prompt for the chi-square test"""
    spec_test_prompts: Annotated[int, Range(ge=1, le=16)] = 2
    """prompts of the chi-square test, the workload's whose first two tokens spread over the most bins (the
    statistics and degrees of freedom add up over them)"""
    spec_test_gamma: Annotated[int, Range(ge=1, le=16)] = 1
    """draft length in the chi-square test: with 1, the first token is an accepted draft or a residual sample,
    and the second the bonus token (after an acceptance) or the next round's first (after a rejection)"""
    int8_eval_stories: Annotated[int, Range(ge=1, le=10_000)] = 32
    """held-out stories on which the int8 and fp32 models' perplexity and logits are compared"""
    seed: Seed = 0
    """seeds the workload, the draft model, the sampling and the tests"""

    def problems(self) -> list[str]:
        found = []
        for low, high in (("prompt_min", "prompt_max"), ("output_min", "output_max")):
            if getattr(self, low) > getattr(self, high):
                found.append(f"{low}={getattr(self, low)} exceeds {high}={getattr(self, high)}")
        if self.draft_embd % self.draft_heads or (self.draft_embd // self.draft_heads) % 2:
            found.append(f"draft_embd={self.draft_embd} / draft_heads={self.draft_heads} must be an even integer "
                         "(the head dimension; RoPE rotates pairs)")
        if self.gamma not in self.gammas:
            found.append(f"gamma={self.gamma} must be one of gammas={self.gammas} (its run is the timed one)")
        if self.max_running not in self.concurrency_sweep:
            found.append(f"max_running={self.max_running} must be one of concurrency_sweep={self.concurrency_sweep}")
        if self.kv_block_size not in self.block_size_sweep:
            found.append(f"kv_block_size={self.kv_block_size} must be one of block_size_sweep={self.block_size_sweep}")
        return found


# --- the workload ------------------------------------------------------------------------------------------
@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def held_out_stories(tok: Tokenizer, n: int, seed: int) -> list[list[int]]:
    """<eos> + story tokens of n generated stories from a seed no pretraining corpus uses (each story
    starts after an <eos>, as in the packed training stream)."""
    return [[tok.eos_id, *tok.encode(story)] for story in generate_stories(n, seed=seed + 1000)]


def make_workload(stories: list[list[int]], cfg: Config, context: int) -> list[Request]:
    if cfg.prompt_max + cfg.output_max > context:
        raise UserError(f"prompt_max + output_max = {cfg.prompt_max + cfg.output_max} exceeds the model's context "
                        f"of {context} tokens")
    rng = np.random.default_rng(cfg.seed)
    requests = []
    for story in stories:
        length = int(rng.integers(cfg.prompt_min, cfg.prompt_max + 1))
        requests.append(Request(story[:length], int(rng.integers(cfg.output_min, cfg.output_max + 1))))
    return requests


# --- 1. the KV cache against recomputation ------------------------------------------------------------------
def with_context(model: Transformer, context: int) -> Transformer:
    """The same weights with RoPE tables (derived from the config, not stored) for a longer context."""
    if context <= model.cfg.block_size:
        return model
    longer = Transformer(dataclasses.replace(model.cfg, block_size=context))
    longer.load_state_dict(model.state_dict())
    return longer.eval()


@torch.no_grad()
def recompute_generate(model: Transformer, idx: Tensor, new_tokens: int) -> tuple[Tensor, int]:
    """Greedy decoding without a cache: every step runs the whole prefix. -> (tokens, positions processed per row)."""
    positions = 0
    for _ in range(new_tokens):
        logits = model(idx)[:, -1]
        positions += idx.shape[1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx, positions


def timed(fn, repeats: int):
    """(fastest of `repeats` wall times, fn's result): the machine is shared, the minimum is the least disturbed."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def measure_kv_cache(model: Transformer, stories: list[list[int]], cfg: Config, ctx) -> dict:
    P, N = cfg.kv_prompt_tokens, cfg.kv_new_tokens
    long_model = with_context(model, P + N)
    idx = torch.tensor([s[:P] for s in stories[:cfg.kv_batch]])
    cached_s, _ = timed(lambda: long_model.generate(idx, N, temperature=0), cfg.timing_repeats)
    recompute_s, (_, recomputed) = timed(lambda: recompute_generate(long_model, idx, N), cfg.timing_repeats)
    speedup = recompute_s / cached_s
    ctx.measure(kv_cached_seconds=cached_s, kv_recompute_seconds=recompute_s, kv_cache_speedup=speedup)
    work_ratio = (N * P + N * (N - 1) / 2) / (P + N - 1)
    ctx.say(f"KV cache: {N} tokens after {P} for {cfg.kv_batch} rows in {cached_s:.2f} s; recomputing the prefix "
            f"every step {recompute_s:.2f} s: {speedup:.1f}x (linear-layer work ratio {work_ratio:.0f}x)")
    return {"kv_cache_speedup_over_3x": float(speedup >= 3.0), "kv_work_ratio": work_ratio,
            "kv_recomputed_positions": recomputed, "kv_recomputed_positions_formula": N * P + N * (N - 1) // 2}


# --- 2-4. the engine: paged == contiguous, KV waste, continuous against static batching ---------------------
@dataclass
class EngineRun:
    outputs: list[list[int]]
    decode_steps: int
    allocated_slots: int
    """KV slots allocated, summed over the steps (after each step)"""
    filled_slots: int
    """slots holding a token, summed the same way"""
    running_steps: int
    """running sequences, summed over the steps: what a contiguous cache per sequence would reserve contexts for"""
    leaked_blocks: int
    """blocks not back in the free list once every request finished"""
    seconds: float
    """wall time inside Engine.step"""
    prefill_forwards: int
    """prefill forwards (the requests admitted in one step share one)"""


def greedy(request: Request, stop_id: int) -> SamplingParams:
    return SamplingParams(max_tokens=request.max_tokens, temperature=0, stop_token_ids=(stop_id,))


def run_engine(model: Transformer, requests: list[Request], stop_id: int, kv_block_size: int,
               max_running: int) -> EngineRun:
    """Every request queued at once (an offline batch); the KV slots counted after every step."""
    engine = Engine(model, kv_block_size=kv_block_size, max_running=max_running, max_waiting=len(requests))
    sequences = [engine.add_request(r.prompt, greedy(r, stop_id))[0] for r in requests]
    allocated = filled = running = 0
    seconds = 0.0
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        seconds += time.perf_counter() - t0
        slots, tokens = engine.kv_slots()
        allocated, filled, running = allocated + slots, filled + tokens, running + engine.num_running
    return EngineRun([s.output_ids for s in sequences], engine.decode_steps, allocated, filled, running,
                     engine.num_kv_blocks - engine.free_blocks, seconds, engine.prefill_forwards)


def cached_lengths(requests: list[Request], outputs: list[list[int]]):
    """Cached tokens L of each sequence after each step it is running: P, P + 1, .., P + G - 2 (after its
    last token it is finished and freed)."""
    for request, output in zip(requests, outputs):
        yield from range(len(request.prompt), len(request.prompt) + len(output) - 1)


def paged_waste_formula(requests: list[Request], outputs: list[list[int]], block: int) -> float:
    """sum_L (B ceil(L / B) - L) / sum_L B ceil(L / B) over every running sequence's L at every step."""
    allocated = filled = 0
    for length in cached_lengths(requests, outputs):
        allocated += block * math.ceil(length / block)
        filled += length
    return 1 - filled / allocated


def static_waste_formula(requests: list[Request], outputs: list[list[int]], context: int) -> float:
    """1 - mean L / T_max: the mean over sequence-steps of P + (G - 2) / 2 for a sequence of G tokens
    (its G - 1 steps), against the context each contiguous cache reserves."""
    steps = sum(len(o) - 1 for o in outputs)
    mean_length = sum((len(o) - 1) * (len(r.prompt) + (len(o) - 2) / 2) for r, o in zip(requests, outputs)) / steps
    return 1 - mean_length / context


@torch.no_grad()
def static_batching(model: Transformer, requests: list[Request], stop_id: int, pad_id: int,
                    batch_size: int) -> tuple[list[list[int]], int, float]:
    """Fixed batches in arrival order, left-padded into the model's contiguous cache; a batch runs until
    its longest member is done (a finished row keeps its seat). -> (outputs, decode forwards, seconds)."""
    outputs, steps, seconds = [], 0, 0.0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        t0 = time.perf_counter()
        ids, mask = left_pad([r.prompt for r in batch], pad_id)
        longest = max(r.max_tokens for r in batch)
        caches = model.init_cache(len(batch), ids.shape[1] + longest)
        key_mask = torch.cat([mask, torch.ones(len(batch), longest, dtype=torch.bool)], dim=1)
        logits = model(ids, caches, pos=0, key_mask=key_mask)[:, -1]
        rows: list[list[int]] = [[] for _ in batch]
        for t in range(longest):
            token = logits.argmax(-1)
            for row, r, new in zip(rows, batch, token.tolist()):
                if len(row) < r.max_tokens and stop_id not in row:
                    row.append(new)
            if all(len(row) == r.max_tokens or stop_id in row for row, r in zip(rows, batch)):
                break
            logits = model(token[:, None], caches, pos=ids.shape[1] + t, key_mask=key_mask)[:, -1]
            steps += 1
        seconds += time.perf_counter() - t0
        outputs.extend(rows)
    return outputs, steps, seconds


@torch.no_grad()
def reference_outputs(model: Transformer, requests: list[Request], stop_id: int) -> list[list[int]]:
    """Transformer.generate one prompt at a time (a contiguous cache), cut after <eos>."""
    outputs = []
    for r in requests:
        row = model.generate(torch.tensor([r.prompt]), r.max_tokens, temperature=0, stop_token=stop_id)
        row = row[0, len(r.prompt):].tolist()
        outputs.append(row[:row.index(stop_id) + 1] if stop_id in row else row)
    return outputs


def token_mismatches(outputs: list[list[int]], expected: list[list[int]]) -> int:
    """Positions where two outputs differ, a length difference counting each missing token."""
    return sum(sum(a != b for a, b in zip(x, y)) + abs(len(x) - len(y)) for x, y in zip(outputs, expected))


def measure_engine(model: Transformer, requests: list[Request], tok: Tokenizer, cfg: Config, ctx) -> dict:
    stop, context = tok.eos_id, model.cfg.block_size
    # each concurrency: the engine and static batches back to back, so that both see the same machine load
    runs, static_runs = {}, {}
    for c in cfg.concurrency_sweep:
        runs[c] = run_engine(model, requests, stop, cfg.kv_block_size, c)
        static_runs[c] = static_batching(model, requests, stop, tok.pad_id, c)
    main = runs[cfg.max_running]
    outputs = main.outputs
    expected = reference_outputs(model, requests, stop)
    mismatches = token_mismatches(outputs, expected)
    generated = sum(len(o) for o in outputs)
    ctx.say(f"engine: {len(requests)} requests, {generated} tokens, max_running {cfg.max_running}, blocks of "
            f"{cfg.kv_block_size}: {mismatches} tokens differ from Transformer.generate one prompt at a time")

    # KV waste, counted from the block manager, at every block size of the sweep
    sweep, leaked = {}, max(run.leaked_blocks for run in runs.values())
    for block in cfg.block_size_sweep:
        run = main if block == cfg.kv_block_size else run_engine(model, requests, stop, block, cfg.max_running)
        sweep[block] = measured = 1 - run.filled_slots / run.allocated_slots
        leaked = max(leaked, run.leaked_blocks)
        ctx.log("block_sweep", kv_block_size=block, paged_waste=measured,
                paged_waste_formula=paged_waste_formula(requests, run.outputs, block),
                leaked_blocks=run.leaked_blocks)
    paged = sweep[cfg.kv_block_size]
    paged_formula = paged_waste_formula(requests, outputs, cfg.kv_block_size)
    static = 1 - main.filled_slots / (main.running_steps * context)
    static_formula = static_waste_formula(requests, outputs, context)
    mean_length = main.filled_slots / main.running_steps
    half_block = (cfg.kv_block_size - 1) / 2
    ctx.say(f"KV waste over the run: paged {paged:.2%} (formula {paged_formula:.2%}), static pre-allocation of the "
            f"{context}-token context {static:.2%} (formula {static_formula:.2%}); mean cached length {mean_length:.1f}")

    # continuous against static batching, at every concurrency
    lower_bound = math.ceil(sum(len(o) - 1 for o in outputs) / cfg.max_running)
    for c, run in runs.items():
        static_out, static_steps, static_s = static_runs[c]
        useful = sum(len(o) for o in run.outputs)
        ctx.log("concurrency", max_running=c, continuous_decode_steps=run.decode_steps, static_decode_steps=static_steps,
                continuous_prefill_forwards=run.prefill_forwards,
                continuous_tokens_per_s=useful / run.seconds, static_tokens_per_s=useful / static_s,
                static_mismatches=token_mismatches(static_out, expected))
        if c == cfg.max_running:
            main_static_steps, main_static_s = static_steps, static_s
            static_steps_formula = sum(max(len(o) for o in outputs[i:i + c]) - 1 for i in range(0, len(outputs), c))
    ctx.measure(continuous_tokens_per_s=generated / main.seconds, static_tokens_per_s=generated / main_static_s,
                continuous_over_static_throughput=main_static_s / main.seconds)
    ctx.say(f"batching at {cfg.max_running} sequences: continuous {main.decode_steps} decode steps "
            f"({generated / main.seconds:.0f} tokens/s), static {main_static_steps} "
            f"({generated / main_static_s:.0f} tokens/s); the continuous lower bound is {lower_bound}")
    return {
        "paged_vs_contiguous_mismatches": mismatches,
        "generated_tokens": generated,
        "leaked_blocks": leaked,
        "paged_kv_waste": paged, "paged_kv_waste_formula": paged_formula,
        "paged_kv_waste_approx": half_block / (mean_length + half_block),
        "paged_waste_formula_gap": abs(paged - paged_formula),
        "static_kv_waste": static, "static_kv_waste_formula": static_formula,
        "static_waste_formula_gap": abs(static - static_formula),
        "mean_cached_length": mean_length,
        "continuous_decode_steps": main.decode_steps, "static_decode_steps": main_static_steps,
        "static_decode_steps_formula": static_steps_formula,
        "continuous_steps_lower_bound": lower_bound,
        "decode_steps_ratio": main.decode_steps / main_static_steps,
    }


# --- 5. speculative decoding --------------------------------------------------------------------------------
def train_draft(target: Transformer, bins: TokenBins, cfg: Config) -> tuple[Transformer, float]:
    """A small model of the target's tokenizer and context, trained on the target's own training tokens
    (the nanogpt run's train.bin) with AdamW, warmup + cosine. -> (draft, mean loss of the last 10% of steps)."""
    torch.manual_seed(cfg.seed)
    draft = Transformer(scaled_config("llama", vocab_size=target.cfg.vocab_size, block_size=target.cfg.block_size,
                                      n_layer=cfg.draft_layers, n_embd=cfg.draft_embd, n_head=cfg.draft_heads))
    opt = torch.optim.AdamW(adamw_groups(draft, 0.1), lr=cfg.draft_lr, betas=(0.9, 0.95))
    windows = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.draft_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.draft_lr, max(1, cfg.draft_steps // 10), cfg.draft_steps)
        x, y = bins.get_batch("train", cfg.draft_batch, target.cfg.block_size, windows)
        loss = draft(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return draft.eval(), float(np.mean(losses[-max(1, len(losses) // 10):]))


@torch.no_grad()
def exact_two_token_bins(target: Transformer, prompt: list[int], n: int, min_expected: float = 5.0) -> dict:
    """{(x1, x2): p(x1) p(x2 | x1)} for the pairs expected at least min_expected times in n samples
    (the rest pooled by the test): the target's exact distribution of its first two tokens."""
    p1 = target(torch.tensor([prompt]))[0, -1].float().softmax(-1)
    firsts = (p1 * n >= min_expected).nonzero()[:, 0]
    contexts = torch.cat([torch.tensor([prompt]).expand(len(firsts), -1), firsts[:, None]], dim=1)
    p2 = target(contexts)[:, -1].float().softmax(-1) * p1[firsts, None]  # joint p(x1, x2)
    return {(int(firsts[i]), int(x2)): float(p2[i, x2]) for i, x2 in (p2 * n >= min_expected).nonzero().tolist()}


@torch.no_grad()
def ancestral_two_tokens(model: Transformer, prompt: list[int], n: int, generator: torch.Generator) -> Tensor:
    """n samples (temperature 1) of a model's own first two tokens, (n, 2): x1 ~ p(. | prompt), then
    x2 ~ p(. | prompt, x1), one forward per distinct x1."""
    first = torch.multinomial(model(torch.tensor([prompt]))[0, -1].float().softmax(-1), n, replacement=True,
                              generator=generator)
    firsts, which = first.unique(return_inverse=True)
    contexts = torch.cat([torch.tensor([prompt]).expand(len(firsts), -1), firsts[:, None]], dim=1)
    p2 = model(contexts)[:, -1].float().softmax(-1)
    return torch.stack([first, torch.multinomial(p2[which], 1, generator=generator)[:, 0]], dim=1)


def chi_square(samples: Tensor, probs: dict) -> tuple[float, int]:
    """Pearson's statistic of (n, 2) sampled pairs against the bins' probabilities, the other pairs pooled
    into one bin. -> (statistic, degrees of freedom = bins - 1)."""
    n = len(samples)
    counts: dict = {}
    for pair in map(tuple, samples.tolist()):
        counts[pair] = counts.get(pair, 0) + 1
    stat = sum((counts.get(pair, 0) - n * p) ** 2 / (n * p) for pair, p in probs.items())
    rest_expected = n * (1 - sum(probs.values()))
    rest_observed = n - sum(counts.get(pair, 0) for pair in probs)
    stat += (rest_observed - rest_expected) ** 2 / rest_expected
    return stat, len(probs)


def chi_square_pvalue(stat: float, dof: int) -> float:
    """P(chi^2_dof >= stat) = Q(dof / 2, stat / 2), the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@torch.no_grad()
def distribution_test(target: Transformer, draft: Transformer, prompts: list[list[int]], cfg: Config) -> dict:
    """The chi-square test of speculative samples against the target's exact distribution, and the same test
    of the draft's own samples (what a decoder that accepts every draft emits): the test must reject those.
    It runs after the spec_test_prompts prompts whose first two tokens spread over the most bins: after
    most prompts a trained model's next two tokens are nearly certain, and a test with one bin sees nothing."""
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    bins = [exact_two_token_bins(target, prompt, cfg.spec_test_samples) for prompt in prompts]
    chosen = sorted(range(len(prompts)), key=lambda i: -len(bins[i]))[:cfg.spec_test_prompts]
    stats = {"speculative": [0.0, 0], "draft": [0.0, 0]}
    for i in chosen:
        samples = {
            "speculative": first_two_tokens(target, draft, prompts[i], cfg.spec_test_samples, cfg.spec_test_gamma,
                                            generator),
            "draft": ancestral_two_tokens(draft, prompts[i], cfg.spec_test_samples, generator),
        }
        for name, pairs in samples.items():
            stat, dof = chi_square(pairs, bins[i])
            stats[name][0] += stat
            stats[name][1] += dof
    return {name: (stat, dof, chi_square_pvalue(stat, dof)) for name, (stat, dof) in stats.items()}


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Leviathan et al. eq. 1: (1 - alpha^(gamma + 1)) / (1 - alpha)."""
    return gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def measure_speculative(target: Transformer, bins: TokenBins, requests: list[Request], cfg: Config, ctx) -> dict:
    t0 = time.perf_counter()
    draft, draft_loss = train_draft(target, bins, cfg)
    ctx.measure(draft_training_seconds=time.perf_counter() - t0)
    prompts = [r.prompt for r in requests[:cfg.spec_prompts]]
    if max(len(p) for p in prompts) + cfg.spec_new_tokens > target.cfg.block_size:
        raise UserError(f"prompt_max + spec_new_tokens exceeds the model's context of {target.cfg.block_size} tokens")
    pooled = SpeculativeStats()
    for gamma in cfg.gammas:
        stats = SpeculativeStats()
        generator = torch.Generator().manual_seed(cfg.seed + gamma)
        t0 = time.perf_counter()
        for prompt in prompts:
            speculative_generate(target, draft, prompt, cfg.spec_new_tokens, gamma, 1.0, generator, stats)
        seconds = time.perf_counter() - t0
        for name in ("target_calls", "tested", "accepted", "beta_sum", "beta_variance", "new_tokens"):
            setattr(pooled, name, getattr(pooled, name) + getattr(stats, name))
        ctx.log("speculative", gamma=gamma, acceptance_rate=stats.acceptance_rate, alpha=stats.alpha,
                tokens_per_call=stats.tokens_per_call,
                tokens_per_call_formula=expected_tokens_per_call(stats.alpha, gamma), target_calls=stats.target_calls)
        if gamma == cfg.gamma:
            main, spec_seconds = stats, seconds
    generator = torch.Generator().manual_seed(cfg.seed)
    plain_seconds, _ = timed(lambda: [target.generate(torch.tensor([p]), cfg.spec_new_tokens, temperature=1.0,
                                                      generator=generator) for p in prompts], 1)
    ctx.measure(speculative_seconds=spec_seconds, plain_sampling_seconds=plain_seconds,
                speculative_speedup=plain_seconds / spec_seconds)
    z = (pooled.accepted - pooled.beta_sum) / math.sqrt(pooled.beta_variance)
    tests = distribution_test(target, draft, [r.prompt for r in requests], cfg)
    ctx.say(f"speculative (draft loss {draft_loss:.2f}): gamma {cfg.gamma} accepts {main.acceptance_rate:.1%} of tested "
            f"drafts (theory alpha {main.alpha:.1%}), {main.tokens_per_call:.2f} tokens per target call (eq. 1: "
            f"{expected_tokens_per_call(main.alpha, cfg.gamma):.2f}), {plain_seconds / spec_seconds:.2f}x the speed of "
            f"plain sampling; chi-square p = {tests['speculative'][2]:.3g} ({tests['speculative'][1]} dof), the draft's "
            f"own samples p = {tests['draft'][2]:.3g}")
    return {
        "draft_loss": draft_loss, "draft_params": draft.num_params(), "target_params": target.num_params(),
        "spec_acceptance_rate": main.acceptance_rate, "spec_alpha": main.alpha,
        "spec_tokens_per_call": main.tokens_per_call,
        "spec_tokens_per_call_formula": expected_tokens_per_call(main.alpha, cfg.gamma),
        "spec_acceptance_z": z,
        "spec_chi2": tests["speculative"][0], "spec_chi2_dof": tests["speculative"][1],
        "spec_chi2_pvalue": tests["speculative"][2], "draft_chi2_pvalue": tests["draft"][2],
    }


# --- 6. int8 weight-only quantisation -----------------------------------------------------------------------
@torch.no_grad()
def measure_int8(model: Transformer, stories: list[list[int]], cfg: Config, ctx) -> dict:
    quantized = quantize_model(model)
    over_bound = 0.0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # the LM head included (the tied embedding is its matrix)
            weight, int8 = module.weight, quantized.get_submodule(name)
            bound = weight.abs().amax(dim=1, keepdim=True) / 127 / 2  # |W - s Q| <= s / 2, s = row absmax / 127
            over_bound = max(over_bound, float(((weight - int8.dequantized()).abs() / bound).max()))
    nll = {"fp32": 0.0, "int8": 0.0}
    count = agree = 0
    max_logit_error = 0.0
    for story in stories[:cfg.int8_eval_stories]:
        ids = torch.tensor([story[:model.cfg.block_size]])
        logits = {"fp32": model(ids[:, :-1])[0], "int8": quantized(ids[:, :-1])[0]}
        for name, z in logits.items():
            nll[name] += float(torch.nn.functional.cross_entropy(z, ids[0, 1:], reduction="sum"))
        max_logit_error = max(max_logit_error, float((logits["int8"] - logits["fp32"]).abs().max()))
        agree += int((logits["int8"].argmax(-1) == logits["fp32"].argmax(-1)).sum())
        count += ids.shape[1] - 1
    ppl = {name: math.exp(total / count) for name, total in nll.items()}
    fp32_bytes, int8_bytes = stored_bytes(model), stored_bytes(quantized)
    ctx.say(f"int8: {int8_bytes / 2**20:.2f} MiB of weights against {fp32_bytes / 2**20:.2f} MiB fp32 "
            f"({int8_bytes / fp32_bytes:.3f}); held-out perplexity {ppl['int8']:.3f} against {ppl['fp32']:.3f}; "
            f"max logit error {max_logit_error:.3g}; next-token argmax agrees on {agree / count:.2%}")
    return {"fp32_weight_bytes": fp32_bytes, "int8_weight_bytes": int8_bytes, "int8_bytes_ratio": int8_bytes / fp32_bytes,
            "int8_error_over_bound": over_bound, "int8_max_logit_error": max_logit_error,
            "int8_top1_agreement": agree / count, "fp32_perplexity": ppl["fp32"], "int8_perplexity": ppl["int8"],
            "int8_perplexity_ratio": ppl["int8"] / ppl["fp32"]}


# --- plots --------------------------------------------------------------------------------------------------
def plot(ctx, cfg: Config, metrics: dict) -> None:
    rows = ctx.tables["concurrency"]
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(11, 4))
    c = [r["max_running"] for r in rows]
    ax.plot(c, [r["continuous_tokens_per_s"] for r in rows], "o-", label="continuous batching (paged engine)")
    ax.plot(c, [r["static_tokens_per_s"] for r in rows], "s--", label="static batches (contiguous cache)")
    ax.set(xscale="log", xlabel="concurrency (max_running = static batch size)", ylabel="generated tokens / s",
           title="throughput vs concurrency")
    ax.set_xticks(c, [str(x) for x in c])
    ax.legend()
    ax_steps.plot(c, [r["continuous_decode_steps"] for r in rows], "o-", label="continuous")
    ax_steps.plot(c, [r["static_decode_steps"] for r in rows], "s--", label="static")
    ax_steps.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="decode forwards (model calls)",
                 title="model calls for the same workload")
    ax_steps.set_xticks(c, [str(x) for x in c])
    ax_steps.legend()
    ctx.save_figure(fig, "throughput_vs_concurrency.png")

    sweep = ctx.tables["block_sweep"]
    fig, (ax_bar, ax_sweep) = plt.subplots(1, 2, figsize=(11, 4))
    ax_bar.bar(["paged", "static"], [metrics["paged_kv_waste"], metrics["static_kv_waste"]], color=["C0", "C3"])
    ax_bar.set(ylabel="allocated KV slots holding no token", ylim=(0, 1),
               title=f"KV waste (blocks of {cfg.kv_block_size} vs the full context)")
    blocks = [r["kv_block_size"] for r in sweep]
    ax_sweep.plot(blocks, [r["paged_waste"] for r in sweep], "o", label="counted by the block manager")
    ax_sweep.plot(blocks, [r["paged_waste_formula"] for r in sweep], "-", label="formula from the lengths")
    ax_sweep.axhline(0.04, color="grey", ls=":", label="4 %")
    ax_sweep.set(xscale="log", xlabel="kv_block_size", ylabel="paged KV waste", title="waste vs block size")
    ax_sweep.set_xticks(blocks, [str(b) for b in blocks])
    ax_sweep.legend()
    ctx.save_figure(fig, "kv_waste.png")

    spec = ctx.tables["speculative"]
    fig, (ax_acc, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
    g = [r["gamma"] for r in spec]
    ax_acc.plot(g, [r["acceptance_rate"] for r in spec], "o-", label="measured acceptance rate")
    ax_acc.plot(g, [r["alpha"] for r in spec], "x--", label="alpha = E[sum min(p, q)]")
    ax_acc.set(xlabel="gamma (draft tokens per round)", ylabel="acceptance", ylim=(0, 1), title="acceptance vs gamma")
    ax_acc.legend()
    ax_tok.plot(g, [r["tokens_per_call"] for r in spec], "o-", label="measured")
    ax_tok.plot(g, [r["tokens_per_call_formula"] for r in spec], "x--", label="(1 - alpha^(gamma+1)) / (1 - alpha)")
    ax_tok.set(xlabel="gamma", ylabel="tokens per target call", title="tokens per target forward")
    ax_tok.legend()
    ctx.save_figure(fig, "acceptance_vs_gamma.png")


# --- the run ------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict:
    model_dir, run_dir = upstream_run(ctx, "nanogpt")
    model, tok = load_model(model_dir).eval(), Tokenizer.load(model_dir)
    bins = TokenBins(run_dir / "data")
    if "train" not in bins.splits:
        raise UserError(f"{run_dir / 'data'}: no train.bin (the nanogpt run's tokens train the draft model)")
    context = model.cfg.block_size
    stories = held_out_stories(tok, max(cfg.n_requests, cfg.int8_eval_stories, cfg.kv_batch), cfg.seed)
    requests = make_workload(stories[:cfg.n_requests], cfg, context)
    ctx.say(f"target: the nanogpt {ctx.preset} model ({model.num_params():,} parameters, context {context}); "
            f"{len(requests)} requests")
    metrics = measure_kv_cache(model, stories, cfg, ctx)
    metrics |= measure_engine(model, requests, tok, cfg, ctx)
    metrics |= measure_speculative(model, bins, requests, cfg, ctx)
    metrics |= measure_int8(model, stories, cfg, ctx)
    plot(ctx, cfg, metrics)
    return metrics
