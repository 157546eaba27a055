#!/usr/bin/env python
"""Training and serving memory of a transformer of any size: weights, gradients, optimizer states (per
ZeRO stage, data- and tensor-parallel degree), activations with and without checkpointing, the
communication of a step, and the KV cache (MHA / GQA / MQA / MLA). The formulas are core/memory.py's,
the ones post_train/systems/deepspeed measures on real ranks.

    python scripts/memcalc.py --preset llama-7b --seq 4096 --batch 1            # one GPU, bf16, no ZeRO
    python scripts/memcalc.py --preset llama-7b --zero 3 --dp 64 --checkpointing
    python scripts/memcalc.py --params 7.5e9 --dp 64 --zero 1                   # model states only (the ZeRO paper's example)
    python scripts/memcalc.py --layers 32 --d-model 4096 --heads 32 --kv-heads 8 --ffn 14336 --vocab 32000
    python scripts/memcalc.py --preset deepseek-v2-lite --seq 32768 --json      # every number as JSON

Training is mixed-precision Adam for --dtype bf16/fp16 (2 + 2 + 12 bytes a parameter) and fp32 Adam for
--dtype fp32 (4 + 4 + 8). Activations count what this project's Llama block saves for its backward
(core/memory.layer_activation_bytes: dense SwiGLU, GQA attention; the tests check it against the saved
tensors of core/nn/model.py); an MLA or MoE model gets model states and KV cache only. Exit status
(core/cli.py): 0 printed, 2 bad input (one line says which flag), 3 an internal error (traceback in
output/crash/memcalc.log), 130 interrupted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.cli import Console, Parser, crash_log, guard  # noqa: E402
from core.errors import UserError  # noqa: E402
from core.memory import (  # noqa: E402
    DTYPE_BYTES, PRESETS, ModelShape, activation_bytes, human_bytes, kv_cache_bytes_per_token, paper_comm_bytes,
    training_model_states,
)

SHAPE_FLAGS = {"layers": "layers", "d_model": "d_model", "heads": "heads", "kv_heads": "kv_heads", "ffn": "ffn",
               "vocab": "vocab", "kv_lora_rank": "kv_lora_rank", "rope_dim": "rope_dim", "attention": "attention"}
"""command-line destination -> ModelShape field"""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parameter_count(text: str) -> int:
    """7.5e9, 7500000000 or 6.7B / 350M."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 7.5e9 or 7B, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a finite count of at least 1, got {text!r}")
    return round(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named model shape (flags override its fields)")
    p.add_argument("--params", type=parameter_count, help="parameter count given outright (7.5e9, 7B)")
    p.add_argument("--layers", type=positive_int, help="transformer blocks")
    p.add_argument("--d-model", type=positive_int, help="model width")
    p.add_argument("--heads", type=positive_int, help="query heads")
    p.add_argument("--kv-heads", type=positive_int, help="key/value heads (default: --heads, MHA; 1 is MQA)")
    p.add_argument("--ffn", type=positive_int, help="SwiGLU hidden width")
    p.add_argument("--vocab", type=positive_int, help="vocabulary size")
    p.add_argument("--tied", action=argparse.BooleanOptionalAction, default=None,
                   help="embedding shared with the LM head (default: the preset's, else tied)")
    p.add_argument("--attention", choices=("gqa", "mla"), help="gqa (also MHA, MQA) or mla")
    p.add_argument("--kv-lora-rank", type=positive_int, help="MLA: width of the cached latent")
    p.add_argument("--rope-dim", type=positive_int, help="MLA: width of the cached RoPE key")
    p.add_argument("--seq", type=positive_int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences per GPU (micro-batch; default 1)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage (default 0)")
    p.add_argument("--dp", type=positive_int, default=1, help="data-parallel ranks ZeRO shards over (default 1)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16",
                   help="training dtype: bf16/fp16 = mixed-precision Adam, fp32 = fp32 Adam (default bf16)")
    p.add_argument("--kv-dtype", choices=sorted(DTYPE_BYTES), help="KV-cache dtype (default: --dtype)")
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing of every block")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    return p.parse_args(argv)


def model_shape(args: argparse.Namespace) -> tuple[ModelShape | None, int]:
    """(the shape, or None when only a parameter count is known; the parameter count)."""
    given = {field: getattr(args, dest) for dest, field in SHAPE_FLAGS.items() if getattr(args, dest) is not None}
    if args.tied is not None:
        given["tied"] = args.tied
    if args.preset:
        shape = dataclasses.replace(PRESETS[args.preset], **given)
    elif {"layers", "d_model", "heads", "ffn", "vocab"} <= set(given):
        shape = ModelShape(**{"kv_heads": given["heads"], **given})
    elif given:
        missing = sorted({"layers", "d_model", "heads", "ffn", "vocab"} - set(given))
        raise UserError(f"an incomplete shape: also give --{' --'.join(m.replace('_', '-') for m in missing)}, "
                        f"or a --preset, or only --params")
    elif args.params is None:
        raise UserError("give a --preset, the shape (--layers --d-model --heads --ffn --vocab) or --params")
    else:
        return None, args.params
    if args.params is not None:
        shape = dataclasses.replace(shape, params=args.params)
    problems = []
    if shape.d_model % shape.heads:
        problems.append(f"--heads {shape.heads} does not divide --d-model {shape.d_model}")
    if shape.heads % shape.kv_heads:
        problems.append(f"--kv-heads {shape.kv_heads} does not divide --heads {shape.heads}")
    if shape.heads % args.tp:
        problems.append(f"--tp {args.tp} does not divide --heads {shape.heads}")
    if shape.attention == "mla" and not (shape.kv_lora_rank and shape.rope_dim):
        problems.append("--attention mla needs --kv-lora-rank and --rope-dim")
    if problems:
        raise UserError("; ".join(problems))
    return shape, shape.param_count()


def report(args: argparse.Namespace) -> dict:
    shape, psi = model_shape(args)
    element = DTYPE_BYTES[args.dtype]
    out: dict = {"params": psi, "dtype": args.dtype, "zero": args.zero, "dp": args.dp, "tp": args.tp,
                 "seq": args.seq, "batch": args.batch}
    states = {s: training_model_states(psi, args.dtype, s, args.dp, args.tp) for s in range(4)}
    out["model_states"] = {f"stage{s}": dataclasses.asdict(st) | {"total": st.total} for s, st in states.items()}
    out["comm_bytes_per_step"] = paper_comm_bytes(args.zero, psi / args.tp * element, args.dp)
    total = states[args.zero].total
    if shape is not None and shape.attention == "gqa" and shape.params is None:
        act = activation_bytes(shape, args.batch, args.seq, element, args.checkpointing, args.tp)
        out["activations"] = dataclasses.asdict(act) | {"checkpointing": args.checkpointing}
        total += act.peak
    if shape is not None:
        kv_element = DTYPE_BYTES[args.kv_dtype or args.dtype]
        per_token = kv_cache_bytes_per_token(shape, kv_element)
        # tensor parallelism splits the kv heads (an MLA latent is shared by the heads: replicated)
        per_token_gpu = per_token if shape.attention == "mla" else per_token // min(args.tp, shape.kv_heads)
        out["kv_cache"] = {"bytes_per_token": per_token, "bytes_per_token_per_gpu": per_token_gpu,
                           "bytes": per_token_gpu * args.seq * args.batch, "dtype": args.kv_dtype or args.dtype,
                           "attention": shape.attention if shape.attention == "mla" else
                           {1: "mqa", shape.heads: "mha"}.get(shape.kv_heads, "gqa")}
    out["training_total"] = total
    return out


def show(argv: list[str]) -> int:
    args = parse_args(argv)
    out = report(args)
    console = Console()
    if args.json:
        console.print_json(json.dumps(out))
        return 0
    k = 8 if args.dtype == "fp32" else 12
    console.print(f"{out['params']:,} parameters (Psi = {out['params'] / 1e9:.2f}B), {args.dtype} training "
                  f"(K = {k}), dp {args.dp}, tp {args.tp}", highlight=False)
    console.print("model states per GPU        weights      gradients    optimizer    total", highlight=False)
    for stage in range(4):
        st = out["model_states"][f"stage{stage}"]
        mark = "  <-" if stage == args.zero else ""
        console.print(f"  ZeRO stage {stage}               {human_bytes(st['params']):>12} {human_bytes(st['grads']):>12} "
                      f"{human_bytes(st['optimizer']):>12} {human_bytes(st['total']):>12}{mark}", highlight=False)
    console.print(f"communication per step per GPU (ring, stage {args.zero}): {human_bytes(out['comm_bytes_per_step'])}",
                  highlight=False)
    if "activations" in out:
        act = out["activations"]
        how = "with full checkpointing" if act["checkpointing"] else "no checkpointing"
        console.print(f"activations, {args.batch} x {args.seq} tokens, {how}: {human_bytes(act['kept'])} kept after the "
                      f"forward, {human_bytes(act['peak'])} at the peak of the backward; of what is kept, "
                      f"{human_bytes(act['weight_copies'])} are weight-sized copies this project's fused matmuls and "
                      f"fused loss save (core/memory.activation_bytes)", highlight=False)
    elif "kv_cache" in out:
        console.print("activations: not modelled for an MLA or MoE model (model states and KV cache only)", highlight=False)
    if "kv_cache" in out:
        kv = out["kv_cache"]
        console.print(f"KV cache ({kv['attention']}, {kv['dtype']}): {human_bytes(kv['bytes_per_token'])} per token, "
                      f"{human_bytes(kv['bytes'])} for {args.batch} x {args.seq} tokens per GPU", highlight=False)
    console.print(f"training total per GPU: {human_bytes(out['training_total'])}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; exit status per core/cli.py."""
    return guard(lambda: show(sys.argv[1:] if argv is None else argv), crash_log=crash_log("memcalc"))


if __name__ == "__main__":
    sys.exit(main())
