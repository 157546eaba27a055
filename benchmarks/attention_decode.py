"""Cached decoding at long context: tokens/s of MHA, GQA, MQA and MLA (naive and absorbed) side by side
in one process, as a ratio to MHA, with the KV-cache bytes each reads per token.

    python benchmarks/attention_decode.py [--contexts 1024,4096] [--new-tokens 32] [--batch 4] [--threads 1]

Every model has nanogpt's default width and depth (4 layers, d 192, 6 heads; GQA keeps 3 kv heads, MQA 1,
MLA a latent of 96 plus a 16-dim RoPE key: core/nn/model.py, scaled_config) and random weights: decode
speed does not depend on what the weights learned. Each measurement prefills a prompt of the context
length into a KV cache (not timed) and times `--new-tokens` greedy one-token steps on that cache. Archs alternate within each of `--rounds` rounds and the median is
kept, so a busy moment of the machine hits every arch alike. Timings vary with the machine and its load:
read the ratios of one run, never absolute figures across machines.
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

from core.nn.model import Transformer, scaled_config  # noqa: E402
from core.results import record_benchmark  # noqa: E402

ARCHS = {"MHA": ("llama", {}), "GQA": ("gqa", {}), "MQA": ("mqa", {}),
         "MLA naive": ("mla", {"mla_absorb": False}), "MLA absorbed": ("mla", {"mla_absorb": True})}
"""row name -> (named config, overrides)"""


def build(arch: str, overrides: dict, block_size: int) -> Transformer:
    torch.manual_seed(0)
    cfg = scaled_config(arch, vocab_size=4096, block_size=block_size, n_layer=4, n_embd=192, n_head=6, **overrides)
    return Transformer(cfg).eval()


@torch.no_grad()
def decode_rate(model: Transformer, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decoded tokens per second per sequence: the prompt is prefilled into a KV cache (not
    timed), then `new_tokens` one-token steps read the cache and append to it (timed)."""
    batch, context = prompt.shape
    caches = model.init_cache(batch, context + new_tokens)
    token = model(prompt, caches, pos=0)[:, -1:].argmax(-1)
    start = time.perf_counter()
    for step in range(new_tokens):
        token = model(token, caches, pos=context + step)[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start)


def at_least(low: int):
    """An argparse type: an int >= low, else a one-line usage error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def contexts_list(text: str) -> list[int]:
    return [at_least(1)(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=contexts_list, default=[1024, 4096], help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=at_least(1), default=32, help="decoded tokens (timed, after the prefill)")
    parser.add_argument("--batch", type=at_least(1), default=4)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--record", action="store_true",
                        help="also write the table to assets/results/benchmarks/attention_decode.json (README figures)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contexts = args.contexts
    models = {name: build(arch, overrides, max(contexts) + args.new_tokens) for name, (arch, overrides) in ARCHS.items()}
    rates: dict[tuple[str, int], list[float]] = {}
    for context in contexts:
        prompt = torch.randint(0, 4096, (args.batch, context), generator=torch.Generator().manual_seed(context))
        for name, model in models.items():
            decode_rate(model, prompt[:, :64], 2)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                rates.setdefault((name, context), []).append(decode_rate(model, prompt, args.new_tokens))
    table = Table(title=f"cached decode, batch {args.batch}, {args.new_tokens} new tokens, {args.threads} thread(s), "
                        f"median of {args.rounds} alternating rounds")
    table.add_column("attention")
    table.add_column("KV cache B/token", justify="right")
    for context in contexts:
        table.add_column(f"tok/s at {context}", justify="right")
        table.add_column("x MHA", justify="right")
    rows = []
    for name, model in models.items():
        cells = [name, f"{model.cache_bytes_per_token():,}"]
        for context in contexts:
            rate = statistics.median(rates[name, context])
            vs_mha = rate / statistics.median(rates["MHA", context])
            cells += [f"{rate * args.batch:,.0f}", f"{vs_mha:.2f}"]
            rows.append({"attention": name, "context": context, "tokens_per_s": rate * args.batch, "vs_mha": vs_mha})
        table.add_row(*cells)
    Console().print(table)
    if args.record:
        print("recorded:", record_benchmark("attention_decode", " ".join(["python", *sys.argv]), ["attention"], rows))


if __name__ == "__main__":
    main()
