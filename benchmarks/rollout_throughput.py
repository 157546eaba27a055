"""Rollout throughput of GRPO-style sampling: generated tokens per second for G = 4, 8, 16 samples of
P prompts, all rows in one left-padded KV-cached `generate` call (core/nn/sampling.py), against the
same rows generated one prompt at a time (G rows per call) and one row at a time. Printed as ratios
measured side by side in one process; nothing is asserted.

    python benchmarks/rollout_throughput.py [--size toy|default] [--prompts 8] [--tokens 32] [--threads 1]

The model has random weights of the nanogpt preset's size (generation cost does not depend on what
the weights learned); no response stops early, so every row generates exactly --tokens tokens.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.data.chat import prompt_ids  # noqa: E402
from core.data.corpus import generate_stories  # noqa: E402
from core.data.tokenizer import Tokenizer, train_sentencepiece  # noqa: E402
from core.data.word_problems import TIERS, generate_problems  # noqa: E402
from core.nn.model import Transformer, scaled_config  # noqa: E402
from core.nn.sampling import sample_responses  # noqa: E402
from pre_train.llm.nanogpt.module import MODULE  # noqa: E402

NO_STOP = -1  # a token id no model produces: every row runs to max_new_tokens


def tokens_per_second(model, prompts, group, tokens, rows_per_call) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    if rows_per_call == "all":
        out = sample_responses(model, prompts, group, tokens, 1.0, NO_STOP, 0, generator)
    elif rows_per_call == "group":
        out = [r for p in prompts for r in sample_responses(model, [p], group, tokens, 1.0, NO_STOP, 0, generator)]
    else:
        out = [r for p in prompts for _ in range(group)
               for r in sample_responses(model, [p], 1, tokens, 1.0, NO_STOP, 0, generator)]
    return sum(map(len, out)) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("toy", "default"), default="toy")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = MODULE.presets[args.size]
    tok = Tokenizer(train_sentencepiece(generate_stories(2000, seed=0), cfg.vocab_size))
    torch.manual_seed(0)
    model = Transformer(scaled_config(cfg.arch, vocab_size=tok.vocab_size, block_size=cfg.block_size,
                                      n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head)).eval()
    prompts = [prompt_ids(tok, p.question) for p in generate_problems(args.prompts, TIERS, 0, "train")]
    table = Table(title=f"rollout tokens/s, {args.size} model ({model.num_params():,} parameters), "
                        f"{args.prompts} prompts x G, {args.tokens} new tokens, {args.threads} thread(s)")
    for col in ("G", "rows", "one call", "a call per prompt", "a call per row", "one call / per row"):
        table.add_column(col, justify="right")
    for group in (4, 8, 16):
        batched = tokens_per_second(model, prompts, group, args.tokens, "all")
        per_prompt = tokens_per_second(model, prompts, group, args.tokens, "group")
        per_row = tokens_per_second(model, prompts, group, args.tokens, "row")
        table.add_row(str(group), str(group * args.prompts), f"{batched:,.0f}", f"{per_prompt:,.0f}",
                      f"{per_row:,.0f}", f"{batched / per_row:.1f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
