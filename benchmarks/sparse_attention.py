"""Long-context speed of MoBA and NSA computed on their selected keys only, against full causal attention
and against their own dense-mask versions, side by side in one process.

    python benchmarks/sparse_attention.py [--contexts 1024,4096,8192] [--rounds 3] [--threads 1]

One attention layer at nanogpt's default width (d 192, 6 heads of 32) with random weights, batch 1:
- prefill: the forward of a whole context of T tokens (what training and a prompt cost), no grad;
- decode: one new token attending to T cached ones (what each generated token costs).
Settings fixed across T, so the selected share shrinks as T grows: MoBA blocks of 128 with top-3 (its
own block + 2 earlier, 384 keys per query); NSA blocks of 64 with top-4 earlier + its own, a window of
256, and T / 64 compressed tokens. "full" is scaled_dot_product_attention with is_causal (MHA's path).
The dense-mask versions (`sparse = False`, the tests' reference) compute every query against all T keys
and mask, as the modules did before: they show what the gathering itself saves. Variants alternate in
each round and the median is kept; read the ratios of one run, never absolute figures across machines.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.attention_decode import at_least, contexts_list  # noqa: E402
from core.nn import attention  # noqa: E402
from core.nn.attention import GroupedQueryAttention, MoBA, NativeSparseAttention  # noqa: E402
from core.nn.model import named_config  # noqa: E402
from core.results import record_benchmark  # noqa: E402

SIZE = dict(vocab_size=4096, n_layer=1, n_embd=192, n_head=6, n_kv_head=6, moba_block_size=128, moba_top_k=3,
            nsa_block_size=64, nsa_top_k=4, nsa_window=256)
VARIANTS = {"full (SDPA)": ("llama", GroupedQueryAttention, True), "MoBA sparse": ("moba", MoBA, True),
            "MoBA dense mask": ("moba", MoBA, False), "NSA sparse": ("nsa", NativeSparseAttention, True),
            "NSA dense mask": ("nsa", NativeSparseAttention, False)}
"""row -> (named config, attention class, sparse)"""


def build(arch: str, cls, sparse: bool, block_size: int):
    torch.manual_seed(0)
    layer = cls(named_config(arch, block_size=block_size, **SIZE)).eval()
    layer.sparse = sparse
    return layer


@torch.no_grad()
def timed(layer, x: torch.Tensor) -> tuple[float, float]:
    """(prefill seconds for all of x, seconds of one decode step after it)."""
    T = x.shape[1]
    cache = layer.init_cache(1, T + 1)
    start = time.perf_counter()
    layer(x, cache, 0)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    layer(x[:, -1:], cache, T)
    return prefill, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=contexts_list, default=[1024, 4096, 8192], help="T values, comma-separated")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--record", action="store_true",
                        help="also write the table to assets/results/benchmarks/sparse_attention.json (README figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    attention.SPARSE_MIN_KEYS = 0  # the sparse rows take the sparse path at every T, short ones included
    layers = {name: build(arch, cls, sparse, max(args.contexts) + 1) for name, (arch, cls, sparse) in VARIANTS.items()}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for T in args.contexts:
        x = torch.randn(1, T, SIZE["n_embd"], generator=torch.Generator().manual_seed(T))
        for layer in layers.values():
            timed(layer, x[:, :256])  # warm-up
        for _ in range(args.rounds):
            for name, layer in layers.items():
                times.setdefault((name, T), []).append(timed(layer, x))
    table = Table(title=f"one attention layer (d 192, 6 heads), batch 1, {args.threads} thread(s), median of "
                        f"{args.rounds} alternating rounds; x = speed-up over full attention")
    table.add_column("attention")
    for T in args.contexts:
        table.add_column(f"prefill {T} ms", justify="right")
        table.add_column("x full", justify="right")
        table.add_column(f"decode at {T} ms", justify="right")
        table.add_column("x full", justify="right")
    rows = []
    for name in layers:
        cells = [name]
        for T in args.contexts:
            full = [statistics.median(t[i] for t in times["full (SDPA)", T]) for i in (0, 1)]
            mine = [statistics.median(t[i] for t in times[name, T]) for i in (0, 1)]
            for i in (0, 1):
                cells += [f"{mine[i] * 1e3:.1f}", f"{full[i] / mine[i]:.2f}"]
            rows.append({"attention": name, "context": T, "prefill_ms": mine[0] * 1e3, "prefill_vs_full": full[0] / mine[0],
                         "decode_ms": mine[1] * 1e3, "decode_vs_full": full[1] / mine[1]})
        table.add_row(*cells)
    Console(width=200).print(table)
    if args.record:
        print("recorded:", record_benchmark("sparse_attention", " ".join(["python", *sys.argv]), ["attention"], rows))


if __name__ == "__main__":
    main()
