"""Training speed of the shared transformer (core/nn/model.py, Llama-style) against a GPT-2-style
reference of the same non-embedding size, side by side in one process, at 1 and 2 threads.

    python benchmarks/transformer_vs_gpt2.py [--steps 20] [--threads 1,2] [--arch llama]

The reference is what nanoGPT's `model.py` is, written here from the GPT-2 papers (Radford et al.
2018, 2019): learned positions, pre-LayerNorm, one fused QKV projection, a 4x GELU MLP, tied
embeddings, GPT-2's init, no biases (nanoGPT's faster `bias=False` setting, the stricter rival).
Ours at nanogpt's default size (L4 d192 H6 T128, vocab 4096, batch 32): RMSNorm, RoPE, SwiGLU of
width 8/3 d, so both spend 12 d^2 matmul weights per layer (ours 4 d^2 + 3 x 512 d, GPT-2 4 d^2 + 8 d^2).

Both train with the same loss, AdamW groups, gradient clipping and data; their steps alternate
(ours, reference, ours, ...) so a busy moment of this shared machine slows both. The ratio printed
is the reference's median step time over ours: > 1 means ours is faster.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.nn.model import NAMED_CONFIGS, Transformer  # noqa: E402
from core.nn.training import adamw_groups  # noqa: E402
from core.results import record_benchmark  # noqa: E402
from pre_train.llm.nanogpt.code.nanogpt import model_config  # noqa: E402
from pre_train.llm.nanogpt.module import MODULE  # noqa: E402

DEFAULT = MODULE.presets["default"]


class GPT2Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)  # q, k, v in one matmul
        self.c_proj = nn.Linear(d, d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab: int, block_size: int, n_layer: int, d: int, n_head: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(GPT2Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2: N(0, 0.02), the residual projections scaled by 1/sqrt(2 L)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def non_embedding_params(model: nn.Module) -> int:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def step_seconds(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, fused_loss: bool) -> float:
    start = time.perf_counter()
    loss = model(x, targets=y) if fused_loss else F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULT.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def ratio_at(threads: int, arch: str, steps: int, fused_loss: bool) -> tuple[float, float, float]:
    """(reference median step s, ours median step s, reference / ours) at `threads` torch threads;
    fused_loss: ours computes its loss with the LM head (model(x, targets=y)), else from the logits."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ours = Transformer(model_config(dataclasses.replace(DEFAULT, arch=arch), DEFAULT.vocab_size))
    ref = GPT2(DEFAULT.vocab_size, DEFAULT.block_size, DEFAULT.n_layer, DEFAULT.n_embd, DEFAULT.n_head)
    models = {"ours": ours, "reference": ref}
    opts = {name: torch.optim.AdamW(adamw_groups(m, DEFAULT.weight_decay), lr=DEFAULT.lr,
                                    betas=(DEFAULT.beta1, DEFAULT.beta2)) for name, m in models.items()}
    data = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 2):  # the first two steps of each warm the allocator up; not timed
        x, y = torch.randint(0, DEFAULT.vocab_size, (2, DEFAULT.batch_size, DEFAULT.block_size), generator=data)
        for name, model in models.items():
            seconds = step_seconds(model, opts[name], x, y, fused_loss and name == "ours")
            if i >= 2:
                times[name].append(seconds)
    ref_s, ours_s = statistics.median(times["reference"]), statistics.median(times["ours"])
    return ref_s, ours_s, ref_s / ours_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each model per thread count")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--arch", default="llama", choices=list(NAMED_CONFIGS), help="our architecture")
    parser.add_argument("--record", action="store_true",
                        help="also write the table to assets/results/benchmarks/transformer_vs_gpt2.json (README figures)")
    args = parser.parse_args()
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if args.steps < 1 or min(thread_counts) < 1:
        parser.error("--steps and every --threads value must be at least 1")

    torch.manual_seed(0)
    ours = Transformer(model_config(dataclasses.replace(DEFAULT, arch=args.arch), DEFAULT.vocab_size))
    ref = GPT2(DEFAULT.vocab_size, DEFAULT.block_size, DEFAULT.n_layer, DEFAULT.n_embd, DEFAULT.n_head)
    print(f"L{DEFAULT.n_layer} d{DEFAULT.n_embd} H{DEFAULT.n_head} T{DEFAULT.block_size} vocab {DEFAULT.vocab_size} "
          f"batch {DEFAULT.batch_size}, fp32, {args.steps} alternating steps each; non-embedding parameters: "
          f"ours ({args.arch}) {non_embedding_params(ours):,}, GPT-2 reference {non_embedding_params(ref):,}")
    print(f"{'our loss':>22}  {'threads':>7}  {'GPT-2 ms/step':>13}  {'ours ms/step':>12}  "
          f"{'ours vs GPT-2 (tokens/s ratio)':>30}")
    rows = []
    for fused_loss in (True, False):
        for threads in thread_counts:
            ref_s, ours_s, ratio = ratio_at(threads, args.arch, args.steps, fused_loss)
            print(f"{'fused with the LM head' if fused_loss else 'from logits, as GPT-2':>22}  {threads:>7}  "
                  f"{ref_s * 1e3:>13.0f}  {ours_s * 1e3:>12.0f}  {ratio:>29.2f}x")
            rows.append({"arch": args.arch, "fused_loss": fused_loss, "threads": threads, "gpt2_ms_per_step": ref_s * 1e3,
                         "ours_ms_per_step": ours_s * 1e3, "ours_vs_gpt2": ratio})
    if args.record:
        print("recorded:", record_benchmark("transformer_vs_gpt2", " ".join(["python", *sys.argv]), ["nanogpt"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
