"""cuda: the tiled matmul and its byte counts on hand cases, the online softmax of two blocks, FlashAttention's
forward (causal blocks straddling the diagonal included) and backward against naive attention, autograd and
torch's own attention, the traffic formulas, the SRAM block rule, and the Triton kernels: on a CUDA device,
or under Triton's CPU interpreter where Triton is installed. The toy preset's determinism is covered in
tests/test_modules.py."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.paths import ROOT
from post_train.systems.cuda.code.cuda import (
    Traffic, causal_mask, flash_attention_backward, flash_attention_forward, flash_attention_traffic_formula,
    matmul_traffic_formula, naive_attention, naive_attention_traffic_formula, online_softmax_update, sram_block,
    tile_fast_memory, tiled_matmul,
)

F64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- tiled matmul ------------------------------------------------------------------------------------------
def test_two_by_two_tiles_by_hand():
    """4 x 4 matrices in 2 x 2 x 2 tiles: 4 output tiles x 2 steps x (an A tile + a B tile) of 4 elements
    = 64 read, 16 written; the tiled product is the ordinary one."""
    a = torch.arange(16, dtype=F64).reshape(4, 4)
    b = torch.eye(4, dtype=F64) * 2 + 1
    traffic = Traffic()
    c = tiled_matmul(a, b, 2, 2, 2, traffic)
    assert torch.equal(c, a @ b)
    assert (traffic.read, traffic.written) == (64, 16)
    assert matmul_traffic_formula(4, 4, 4, 2, 2) == 80
    assert tile_fast_memory(2, 2, 2) == 12
    naive = Traffic()                       # one thread per output element: a row and a column each
    tiled_matmul(a, b, 1, 1, 4, naive)
    assert (naive.read, naive.written) == (2 * 4 * 4 * 4, 16)


@pytest.mark.parametrize("shape, tiles", [
    ((7, 5, 3), (2, 2, 2)),          # ragged in every direction
    ((33, 17, 65), (32, 16, 16)),    # one element past a tile
    ((5, 9, 4), (8, 8, 8)),          # a tile bigger than the matrix
    ((12, 20, 6), (3, 5, 2)),        # tiles that divide exactly, B_m != B_n
], ids=["ragged", "one-past", "tile-bigger", "divides"])
def test_tiled_matmul_equals_matmul_and_its_traffic_the_formula(shape, tiles):
    m, n, k = shape
    a, b = randn(m, k, seed=1), randn(k, n, seed=2)
    traffic = Traffic()
    c = tiled_matmul(a, b, *tiles, traffic)
    assert not c.isnan().any(), "an output tile was never written"
    assert torch.allclose(c, a @ b, atol=1e-12, rtol=0)
    assert traffic.read + traffic.written == matmul_traffic_formula(m, n, k, tiles[0], tiles[1])
    assert traffic.written == m * n


def test_matmul_traffic_formula_on_a_hand_case_with_unequal_tiles():
    """m = 6, n = 4, k = 3 with B_m = 3, B_n = 2: A (18 elements) is read once per column block (2 of them),
    B (12) once per row block (2), C written once (24): 36 + 24 + 24 = 84."""
    assert matmul_traffic_formula(6, 4, 3, 3, 2) == 84
    traffic = Traffic()
    tiled_matmul(randn(6, 3), randn(3, 4), 3, 2, 3, traffic)
    assert traffic.total == 84
    # B read once per row block: with a taller tile (B_m = 6) B is read once, A still twice
    assert matmul_traffic_formula(6, 4, 3, 6, 2) == 36 + 12 + 24


# --- online softmax and FlashAttention ---------------------------------------------------------------------
def test_online_softmax_of_two_blocks_equals_the_softmax_of_their_concatenation():
    s = randn(3, 7, seed=3) * 4
    v = randn(7, 5, seed=4)
    first, second = s[:, :4], s[:, 4:]
    second[0] += 10                      # the second block raises row 0's max: the first must be rescaled
    m = torch.full((3,), -math.inf, dtype=F64)
    l, acc = torch.zeros(3, dtype=F64), torch.zeros(3, 5, dtype=F64)
    m, l, acc = online_softmax_update(m, l, acc, first, v[:4])
    m, l, acc = online_softmax_update(m, l, acc, second, v[4:])
    full = torch.cat([first, second], dim=1)
    assert torch.allclose(acc / l[:, None], torch.softmax(full, dim=1) @ v, atol=1e-14, rtol=0)
    assert torch.allclose(m + l.log(), torch.logsumexp(full, dim=1), atol=1e-14, rtol=0)
    assert torch.equal(m, full.amax(dim=1))


def test_naive_attention_equals_torch_scaled_dot_product_attention():
    q, k, v = randn(2, 3, 11, 8, seed=5), randn(2, 3, 11, 8, seed=6), randn(2, 3, 11, 8, seed=7)
    for causal in (False, True):
        out, lse = naive_attention(q, k, v, causal)
        assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-13, rtol=0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)      # the scale is 1 / sqrt(d)
        if causal:
            scores = scores.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), -math.inf)
        assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-13, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("blocks", [(4, 4), (3, 2), (2, 5), (16, 16), (1, 1)], ids=["square", "tall", "wide", "one-block", "single"])
def test_flash_forward_equals_naive_attention(causal, blocks):
    q, k, v = randn(2, 2, 13, 4, seed=8), randn(2, 2, 13, 4, seed=9), randn(2, 2, 13, 4, seed=10)
    out, lse = flash_attention_forward(q, k, v, *blocks, causal=causal)
    ref_out, ref_lse = naive_attention(q, k, v, causal)
    assert torch.allclose(out, ref_out, atol=1e-13, rtol=0)
    assert torch.allclose(lse, ref_lse, atol=1e-13, rtol=0)


def test_causal_blocks_straddling_the_diagonal():
    """B_r = 3, B_c = 2, N = 7: the diagonal cuts key blocks in the middle. Each query sees exactly the keys
    up to and including its own: changing a later key or value changes nothing before it, changing its own
    key changes it."""
    n = 7
    assert causal_mask(3, 6, 2, 4).tolist() == [[False, False], [False, False], [False, False]]
    assert causal_mask(0, 3, 0, 2).tolist() == [[False, True], [False, False], [False, False]]
    q, k, v = randn(n, 4, seed=11), randn(n, 4, seed=12), randn(n, 4, seed=13)
    out, _ = flash_attention_forward(q, k, v, 3, 2, causal=True)
    assert torch.allclose(out, naive_attention(q, k, v, causal=True)[0], atol=1e-13, rtol=0)
    assert torch.allclose(out[0], v[0], atol=1e-15), "the first query attends to itself only"
    for j in range(n):
        k2, v2 = k.clone(), v.clone()
        k2[j] += 1
        v2[j] += 1
        out2, _ = flash_attention_forward(q, k2, v2, 3, 2, causal=True)
        changed = (out2 - out).abs().amax(dim=-1) > 1e-12
        assert changed.tolist() == [i >= j for i in range(n)], j


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_backward_equals_autograd_through_naive_attention(causal):
    q, k, v = (randn(2, 2, 11, 4, seed=s).requires_grad_() for s in (14, 15, 16))
    d_out = randn(2, 2, 11, 4, seed=17)
    ref_out, _ = naive_attention(q, k, v, causal)
    ref_out.backward(d_out)
    out, lse = flash_attention_forward(q.detach(), k.detach(), v.detach(), 3, 4, causal)
    grads = flash_attention_backward(q.detach(), k.detach(), v.detach(), out, lse, d_out, 3, 4, causal)
    for name, got, ref in zip("qkv", grads, (q.grad, k.grad, v.grad)):
        assert torch.allclose(got, ref, atol=1e-13, rtol=0), name


# --- HBM traffic -------------------------------------------------------------------------------------------
def test_attention_traffic_by_hand():
    """N = 4, d = 2, B_r = B_c = 2. Naive: Q, K, V read and O written (4 x 8) + S and P written and read
    (4 x 16) = 96. Flash: Q 8 + K and V twice (2 query blocks x 2 x 8 = 32) + O 8 + L 4 = 52. Causal: the
    first query block loads only the first key block: 8 + 2 x 2 x (2 + 4) + 8 + 4 = 44."""
    q, k, v = randn(4, 2, seed=18), randn(4, 2, seed=19), randn(4, 2, seed=20)
    naive, flash, causal = Traffic(), Traffic(), Traffic()
    naive_attention(q, k, v, traffic=naive)
    flash_attention_forward(q, k, v, 2, 2, traffic=flash)
    flash_attention_forward(q, k, v, 2, 2, causal=True, traffic=causal)
    assert (naive.total, flash.total, causal.total) == (96, 52, 44)
    assert naive_attention_traffic_formula(4, 2) == 96
    assert flash_attention_traffic_formula(4, 2, 2, 2, False) == 52
    assert flash_attention_traffic_formula(4, 2, 2, 2, True) == 44
    assert (flash.written, naive.written) == (8 + 4, 16 + 16 + 8)   # flash writes O and L, never S or P


@pytest.mark.parametrize("n, d, blocks", [(13, 4, (3, 2)), (13, 4, (2, 5)), (64, 8, (16, 16)), (10, 2, (20, 3))],
                         ids=["tall", "wide", "square", "block-over-n"])
def test_flash_traffic_counted_equals_the_formula(n, d, blocks):
    q, k, v = randn(2, n, d, seed=21), randn(2, n, d, seed=22), randn(2, n, d, seed=23)
    for causal in (False, True):
        traffic = Traffic()
        flash_attention_forward(q, k, v, *blocks, causal=causal, traffic=traffic)
        assert traffic.total == flash_attention_traffic_formula(n, d, *blocks, causal, heads=2), causal


def test_sram_block_is_the_largest_that_fits_and_traffic_falls_as_sram_grows():
    d, n = 64, 4096
    for m in (300, 2048, 10_000, 100_000):
        b = sram_block(m, d)
        assert 4 * b * d + b * b + 2 * b <= m < 4 * (b + 1) * d + (b + 1) ** 2 + 2 * (b + 1)
    traffic = [flash_attention_traffic_formula(n, d, sram_block(m, d), sram_block(m, d), False) for m in (4096, 16384, 65536)]
    assert traffic[0] > traffic[1] > traffic[2]
    # the K/V term is 2 N^2 d / B_r with B_r = Theta(M / d): Theta(N^2 d^2 / M); a 4x larger SRAM cuts it 2.5-4x
    kv = [t - 2 * n * d - n for t in traffic]
    assert 2.5 < kv[0] / kv[1] < 4 and 2.5 < kv[1] / kv[2] < 4


def test_toy_run_passes_its_checks_and_reports_the_skipped_gpu_path(run_module):
    result = run_module("cuda", "toy")
    assert result.passed, [c for c in result.checks if not c["passed"]]
    metrics = result.metrics
    assert metrics["naive_matmul_intensity"] < 0.26 < 4 < metrics["matmul_intensity"]
    assert metrics["attention_traffic_saving"] > 1
    if not torch.cuda.is_available():
        assert metrics["gpu_available"] == 0 and math.isnan(metrics["gpu_attention_max_err"])
    for png in ("roofline.png", "traffic.png"):
        assert (result.out_dir / png).stat().st_size > 10_000, png


# --- the Triton kernels --------------------------------------------------------------------------------------
NO_CUDA = "skipped: no CUDA device (the Triton kernels need one)"
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason=NO_CUDA + " and Triton")
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-2)],
                         ids=["fp16", "bf16", "fp32-tf32"])
def test_gpu_triton_matmul_equals_torch(dtype, tol):
    """Ragged sizes; tolerance relative to the largest entry: fp16 output rounding ~5e-4, bf16 ~4e-3, fp32
    inputs go through TF32 tensor cores (10-bit mantissa) by Triton's default."""
    from post_train.systems.cuda.code.triton_kernels import triton_matmul
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn((1000, 700), generator=gen, device="cuda").to(dtype)
    b = torch.randn((700, 900), generator=gen, device="cuda").to(dtype)
    exact = a.double() @ b.double()
    block_k = 32 if dtype == torch.float32 else 64
    err = (triton_matmul(a, b, block_k=block_k).double() - exact).abs().max() / exact.abs().max()
    assert err <= tol
    if dtype != torch.float32:   # torch's fp32 matmul is full fp32 (no TF32 by default): no like-for-like baseline
        assert err <= 4 * (((a @ b).double() - exact).abs().max() / exact.abs().max()) + 1e-4   # near cuBLAS's own


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason=NO_CUDA + " and Triton")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_triton_flash_attention_equals_torch(causal, dtype):
    """N = 1000 (ragged against the 128 / 64 blocks), d = 64; against fp32 math-backend attention: fp16
    within 1e-2, bf16 (8-bit mantissa for P) within 3e-2; the logsumexp is computed in fp32 from the same
    inputs, within 1e-3."""
    from post_train.systems.cuda.code.triton_kernels import reference_attention, triton_flash_attention
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn((2, 4, 1000, 64), generator=gen, device="cuda").to(dtype) for _ in range(3))
    out, lse = triton_flash_attention(q, k, v, causal)
    ref_out, ref_lse = reference_attention(q, k, v, causal)
    assert (out.float() - ref_out).abs().max() <= (1e-2 if dtype == torch.float16 else 3e-2)
    assert (lse - ref_lse).abs().max() <= 1e-3


INTERPRETER_SCRIPT = """
import torch
from post_train.systems.cuda.code.cuda import flash_attention_forward
from post_train.systems.cuda.code.triton_kernels import triton_flash_attention, triton_matmul
gen = torch.Generator().manual_seed(0)
a, b = torch.randn((70, 50), generator=gen), torch.randn((50, 40), generator=gen)
print("matmul", float((triton_matmul(a, b, 32, 16, 16, num_warps=1, num_stages=1) - a @ b).abs().max()))
q, k, v = (torch.randn((2, 45, 16), generator=gen) for _ in range(3))
for causal in (False, True):
    out, lse = triton_flash_attention(q, k, v, causal, block_q=32, block_kv=16)
    ref_out, ref_lse = flash_attention_forward(q, k, v, 32, 16, causal)
    print("attention", max(float((out - ref_out).abs().max()), float((lse - ref_lse).abs().max())))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (its CPU interpreter runs the kernels without a GPU)")
@pytest.mark.skipif(tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4),
                    reason="Triton 3.6's interpreter turns 1-element arrays into scalars, which numpy >= 2.4 refuses")
def test_triton_kernels_under_the_cpu_interpreter_equal_the_cpu_reference():
    """The same Triton kernels, run by TRITON_INTERPRET=1 on CPU tensors in fp32, against code/cuda.py's
    flash forward and torch.matmul (ragged sizes, causal and not, B_r != B_c)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = [float(line.split()[1]) for line in done.stdout.splitlines()]
    assert len(errors) == 3 and max(errors) < 1e-4, done.stdout
