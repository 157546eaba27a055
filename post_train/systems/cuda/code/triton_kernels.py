"""The tiled matmul and the FlashAttention forward of code/cuda.py as Triton kernels, checked against torch
and timed with CUDA events against torch.matmul (cuBLAS) and F.scaled_dot_product_attention.

Needs torch and Triton only (no other package of the project), so it runs on a bare GPU machine:

    python -m post_train.systems.cuda.code.triton_kernels          # exit 0: every comparison within tolerance

A Triton program is one thread block: it owns one output tile, `tl.load` brings a tile from HBM into
registers/shared memory, `tl.dot` runs it on the tensor cores, `tl.store` writes the result. The loops
are the ones of code/cuda.py (`tiled_matmul`, `flash_attention_forward`) with the Python tile loops
turned into the launch grid. Under TRITON_INTERPRET=1 the same kernels run on CPU tensors (slowly),
which is how tests/test_cuda.py checks them on a machine without a GPU when Triton is installed.

Tolerances (inputs in fp16, accumulation in fp32 in both Triton and torch):
- matmul: max |C - C_ref| / max |C_ref| <= MATMUL_TOL, C_ref the fp32 product of the same fp16 inputs.
  Rounding the output to fp16 alone costs up to 2^-11 ~ 4.9e-4 of an entry.
- attention: max |O - O_ref| <= ATTENTION_TOL, O_ref fp32 math-backend attention of the same fp16
  inputs (|O| <= max |V| ~ 4). P is rounded to fp16 before the P V product, as in FlashAttention.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MATMUL_TOL = 2e-3
"""fp16 output: about 4x the rounding of one fp16 entry, relative to the largest entry"""
ATTENTION_TOL = 1e-2
"""fp16 inputs and P: the bound FlashAttention's own tests use for fp16"""


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per BLOCK_M x BLOCK_N tile of C; k in steps of BLOCK_K, accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + depth
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)       # ragged edges read as 0
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def triton_matmul(a: torch.Tensor, b: torch.Tensor, block_m: int = 128, block_n: int = 128, block_k: int = 64,
                  num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """C = A B with matmul_kernel; blocks of at least 16 (tl.dot's smallest)."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return c


@triton.jit
def flash_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, N, scale,
                         HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, CAUSAL: tl.constexpr):
    """One program per (query block, batch x head); q, k, v, o contiguous (batch x heads, N, HEAD_DIM)."""
    q_block, head = tl.program_id(0), tl.program_id(1)
    base = head * N * HEAD_DIM
    rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + base + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < N, other=0.0)
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, HEAD_DIM), dtype=tl.float32)
    kv_end = N
    if CAUSAL:
        kv_end = tl.minimum((q_block + 1) * BLOCK_Q, N)   # keys after the block's last query are all masked: never loaded
    for k0 in range(0, kv_end, BLOCK_KV):
        cols = k0 + tl.arange(0, BLOCK_KV)
        k = tl.load(k_ptr + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < N, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * HEAD_DIM + dims[None, :], mask=cols[:, None] < N, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        keep = cols[None, :] < N
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))                  # the online softmax of code/cuda.py
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = alpha * l + tl.sum(p, 1)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
    tl.store(o_ptr + base + rows[:, None] * HEAD_DIM + dims[None, :], (acc / l[:, None]).to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < N)
    tl.store(lse_ptr + head * N + rows, m + tl.log(l), mask=rows < N)


def triton_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                           block_q: int = 128, block_kv: int = 64, num_warps: int = 4,
                           num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention forward over (..., N, d) tensors, d a power of two >= 16; returns O and the fp32
    logsumexp L of each query's scores."""
    *lead, n, d = q.shape
    q3, k3, v3 = (t.reshape(-1, n, d).contiguous() for t in (q, k, v))
    out = torch.empty_like(q3)
    lse = torch.empty(q3.shape[:2], device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_q), q3.shape[0])
    flash_forward_kernel[grid](q3, k3, v3, out, lse, n, 1 / math.sqrt(d), HEAD_DIM=d, BLOCK_Q=block_q,
                               BLOCK_KV=block_kv, CAUSAL=causal, num_warps=num_warps, num_stages=num_stages)
    return out.reshape(q.shape), lse.reshape(*lead, n)


# --- equality and timing on a CUDA device --------------------------------------------------------------------
def cuda_milliseconds(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median time of fn on the GPU, by CUDA events around each call (the launch is asynchronous: a host
    timer would measure the launch, not the kernel)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def causal_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores with every key after its query set to -inf."""
    n = scores.shape[-1]
    return scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Standard attention in separate torch kernels: the N x N scores and probabilities go through HBM."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(causal_scores(scores) if causal else scores, dim=-1) @ v


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention by torch's math backend (an implementation independent of the kernel) and the fp32
    logsumexp of the scores."""
    q, k, v = q.float(), k.float(), v.float()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return out, torch.logsumexp(causal_scores(scores) if causal else scores, dim=-1)


def compare_and_time(seed: int = 0, size: int = 4096, batch: int = 4, heads: int = 16, seq_len: int = 4096,
                     head_dim: int = 64, say=print, device: str = "cuda") -> dict:
    """Triton against torch on the current CUDA device, fp16: the errors of both against an fp32
    reference, and the TFLOP/s of both."""
    gen = torch.Generator(device=device).manual_seed(seed)
    a, b = (torch.randn((size, size), generator=gen, device=device, dtype=torch.float16) for _ in range(2))
    exact = a.float() @ b.float()
    scale = exact.abs().max()
    result = {"gpu_matmul_rel_err": float((triton_matmul(a, b).float() - exact).abs().max() / scale),
              "gpu_matmul_torch_rel_err": float(((a @ b).float() - exact).abs().max() / scale)}
    rows = [{"kernel": "matmul", "shape": f"{size}x{size}x{size} fp16", "flops": 2 * size ** 3,
             "triton_ms": cuda_milliseconds(lambda: triton_matmul(a, b)), "torch_ms": cuda_milliseconds(lambda: a @ b),
             "unfused_ms": math.nan}]

    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float16) for _ in range(3))
    errors, torch_errors = [], []
    for causal in (False, True):
        out, lse = triton_flash_attention(q, k, v, causal)
        ref_out, ref_lse = reference_attention(q[:1], k[:1], v[:1], causal)   # one batch row: the N^2 scores fit
        errors.append(max(float((out[:1].float() - ref_out).abs().max()), float((lse[:1] - ref_lse).abs().max())))
        sdpa = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], is_causal=causal)
        torch_errors.append(float((sdpa.float() - ref_out).abs().max()))
        attention_flops = 4 * batch * heads * seq_len ** 2 * head_dim // (2 if causal else 1)
        rows.append({"kernel": "flash_causal" if causal else "flash", "shape": f"{shape} fp16", "flops": attention_flops,
                     "triton_ms": cuda_milliseconds(lambda: triton_flash_attention(q, k, v, causal)),
                     "torch_ms": cuda_milliseconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
                     "unfused_ms": cuda_milliseconds(lambda: unfused_attention(q, k, v, causal))})
    result["gpu_attention_max_err"], result["gpu_attention_torch_max_err"] = max(errors), max(torch_errors)
    for row in rows:
        for impl in ("triton", "torch"):
            row[f"{impl}_tflops"] = row["flops"] / (row[f"{impl}_ms"] * 1e-3) / 1e12
        unfused = "" if math.isnan(row["unfused_ms"]) else f", unfused torch (S and P through HBM) {row['unfused_ms']:.3f} ms"
        say(f"{row['kernel']:>12} {row['shape']}: Triton {row['triton_ms']:.3f} ms ({row['triton_tflops']:.0f} TFLOP/s), "
            f"torch {row['torch_ms']:.3f} ms ({row['torch_tflops']:.0f} TFLOP/s){unfused}")
    say(f"matmul max rel err vs fp32: Triton {result['gpu_matmul_rel_err']:.1e}, torch {result['gpu_matmul_torch_rel_err']:.1e} "
        f"(tolerance {MATMUL_TOL:g}); attention max err vs fp32 math: Triton {result['gpu_attention_max_err']:.1e}, "
        f"torch sdpa {result['gpu_attention_torch_max_err']:.1e} (tolerance {ATTENTION_TOL:g})")
    result["timings"] = rows
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (the Triton kernels need one; their CPU reference is code/cuda.py)")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    result = compare_and_time()
    ok = result["gpu_matmul_rel_err"] <= MATMUL_TOL and result["gpu_attention_max_err"] <= ATTENTION_TOL
    print("PASS" if ok else "FAIL: a Triton kernel differs from torch beyond its tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
