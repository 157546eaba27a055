"""Training throughput of every architecture at nanogpt's default config: tokens/s and MFU, side by
side in one process, against the fp32 matmul peak measured here first.

    python benchmarks/nanogpt_throughput.py [--steps 8] [--archs llama,mla] [--threads N] [--bf16]

Each arch trains `--steps` timed optimizer steps (after 2 warm-up steps) on random tokens with the
default preset's width, depth, context, batch and vocabulary; MFU = FLOPs per token (Transformer.
flops_per_token: 6N + attention) x tokens/s / peak. `--bf16` adds a bf16-autocast row per arch. Each
peak is measured before and after the archs and the higher reading is kept (a busy moment lowers it).
Timings vary with the machine and its load: compare rows of one run, never across machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import typing
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.data.corpus import TokenBins, write_token_bin  # noqa: E402
from core.nn.model import Transformer  # noqa: E402
from core.nn.training import adamw_groups  # noqa: E402
from pre_train.llm.nanogpt.code.nanogpt import (Arch, compute_dtype, matmul_peak_flops, model_config,  # noqa: E402
                                               train_step)
from pre_train.llm.nanogpt.module import MODULE  # noqa: E402

DEFAULT = MODULE.presets["default"]
CPU = torch.device("cpu")


def tokens_per_second(cfg, bins: TokenBins, steps: int) -> tuple[float, Transformer]:
    torch.manual_seed(0)
    model = Transformer(model_config(cfg, cfg.vocab_size))
    opt = torch.optim.AdamW(adamw_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = torch.Generator().manual_seed(0)
    for _ in range(2):  # warm-up: allocator, first-call overheads
        train_step(model, model, opt, bins, batches, cfg, 0, 1, CPU)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, model, opt, bins, batches, cfg, 0, 1, CPU)
    return steps * cfg.batch_size * cfg.block_size / (time.perf_counter() - start), model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arch")
    parser.add_argument("--archs", default=",".join(typing.get_args(Arch)), help="comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = args.archs.split(",")
    unknown = sorted(set(archs) - set(typing.get_args(Arch)))
    if unknown:
        parser.error(f"unknown arch {', '.join(unknown)}; choose from {', '.join(typing.get_args(Arch))}")

    dtypes = ("fp32", "bf16") if args.bf16 else ("fp32",)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_token_bin(np.random.default_rng(0).integers(0, DEFAULT.vocab_size, 200_000), Path(tmp) / "train.bin")
        bins = TokenBins(tmp)
        peaks = {d: matmul_peak_flops(CPU, compute_dtype(dataclasses.replace(DEFAULT, dtype=d))) for d in dtypes}
        for arch in archs:
            for dtype in dtypes:
                rate, model = tokens_per_second(dataclasses.replace(DEFAULT, arch=arch, dtype=dtype), bins, args.steps)
                rows.append((arch, dtype, model.num_params(), model.flops_per_token(), rate))
        for d in dtypes:
            peaks[d] = max(peaks[d], matmul_peak_flops(CPU, compute_dtype(dataclasses.replace(DEFAULT, dtype=d))))

    table = Table(title=f"nanogpt default config (d={DEFAULT.n_embd}, L={DEFAULT.n_layer}, T={DEFAULT.block_size}, "
                        f"batch={DEFAULT.batch_size}, vocab={DEFAULT.vocab_size}) on {os.cpu_count()} cores, "
                        f"{torch.get_num_threads()} threads; matmul peak "
                        + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    for col, justify in (("arch", "left"), ("dtype", "left"), ("params", "right"), ("MFLOP/token", "right"),
                         ("tokens/s", "right"), ("vs llama fp32", "right"), ("MFU", "right")):
        table.add_column(col, justify=justify)
    baseline = rows[0][4]
    for arch, dtype, params, flops, rate in rows:
        table.add_row(arch, dtype, f"{params:,}", f"{flops / 1e6:.1f}", f"{rate:,.0f}", f"{rate / baseline:.2f}",
                      f"{flops * rate / peaks[dtype]:.1%}")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
