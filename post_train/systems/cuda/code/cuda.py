"""The GPU-programming interview topics, runnable on a CPU: tiling, the roofline, FlashAttention.

A GPU has a small fast memory next to its compute units (shared memory / SRAM, ~200 KB per SM) and a
large slow one (global memory / HBM, a few TB/s). A kernel is fast when it does many FLOPs per byte it
moves from HBM. This file runs the two classic answers with torch tensors standing in for the memory
levels: every tile a kernel would load into fast memory passes through `Traffic.load`, every result it
would write to HBM through `Traffic.store`, so the bytes each algorithm moves are counted from the loops
that compute, and checked against the closed forms below. The Python loops run over tiles only; each
tile's work is one small torch matmul. `code/triton_kernels.py` holds the same two kernels in Triton,
run and timed when a CUDA device is present.

1. Tiled matmul, C = A B with A: m x k, B: k x n. One thread block owns a B_m x B_n tile of C; it walks
   k in steps of B_k, loading an A tile (B_m x B_k) and a B tile (B_k x B_n) and accumulating their
   product in registers, then writes its C tile once. Elements moved (exact, ragged tiles included):
       reads  = m k ceil(n / B_n)      A is read once per column block of C
              + k n ceil(m / B_m)      B once per row block
       writes = m n
   = m n k (1/B_n + 1/B_m) + m n when the tiles divide the sizes. One thread per output element
   (B_m = B_n = 1) reads a row and a column each: 2 m n k + m n, the naive kernel.
   Arithmetic intensity I = FLOPs / bytes = 2 m n k / (elements x bytes per element): ~ B/4 flop/byte
   for square B x B tiles in fp32, 1/4 for the naive kernel.

2. Roofline (Williams, Waterman & Patterson 2009): attainable FLOP/s = min(peak, I x bandwidth), the
   ridge at I* = peak / bandwidth. Measured here: torch.matmul's FLOP/s for n x n matrices (I = n/6 in
   fp32 when each matrix crosses memory once), the peak as the best of them, the bandwidth from a large
   copy. Small matrices sit far below both roofs (call overhead), large ones reach the compute roof.

3. FlashAttention forward (Dao et al. 2022), in FlashAttention-2's loop order (Dao 2023: Q blocks
   outside, K/V blocks inside). Per block of B_r queries, running row max m, row sum l and unnormalised
   output O, folded over blocks of B_c keys with the online softmax (Milakov & Gimelshein 2018):
       S = Q_i K_j^T / sqrt(d)           (masked: key index > query index, when causal)
       m_new = max(m, rowmax(S)),  P = exp(S - m_new)
       l = exp(m - m_new) l + rowsum(P),   O = exp(m - m_new) O + P V_j,   m = m_new
   then O / l and the logsumexp L = m + log l, the only statistic saved for the backward.

4. FlashAttention backward (Dao 2023, Algorithm 2): K/V blocks outside, Q blocks inside; P is
   recomputed from the saved L, never stored:
       P = exp(S - L),  dV_j += P^T dO_i,  dP = dO_i V_j^T,  D_i = rowsum(dO_i * O_i),
       dS = P * (dP - D_i),  dQ_i += dS K_j / sqrt(d),  dK_j += dS^T Q_i / sqrt(d).

5. HBM traffic per (batch, head), in elements. Standard attention (Dao et al. 2022, Algorithm 0) writes
   and reads back the N x N score and probability matrices: 4 N d + 4 N^2. Flash (FA-2 order) reads Q
   once, K and V once per query block, writes O and L: 2 N d + 2 N d ceil(N / B_r) + N; with the
   largest B_r that fits an SRAM of M elements, B_r = Theta(M / d), that is Theta(N^2 d^2 / M)
   (Dao et al. 2022, Theorem 2).
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Annotated

import matplotlib.pyplot as plt
import numpy as np
import torch

from core.config import Range, Seed

ELEMENT_BYTES = 4
"""bytes per element of every traffic count: fp32, the dtype the roofline is measured in on this CPU
(a GPU kernel in fp16/bf16 moves half the bytes for the same elements)"""
FLOPS_RISE = 10.0
"""the largest roofline size must reach this many times the FLOP/s of the smallest: a call-overhead-bound
8 x 8 matmul against a compute-bound one (about 100x apart on one CPU thread)"""
MAX_SCORE_ELEMENTS = 16_000_000
"""most elements of the naive reference's batch x heads x N x N score matrix (fp64: 128 MB, held a few times over)"""
MAX_TILE_STEPS = 3_000_000
"""most Python-level tile steps a run may take (the default takes about 0.3M)"""
TIMING_CHUNKS = 3
"""each timing is the best of this many chunks of repeats: a moment when the shared CPU is busy only
lowers a reading, so the best chunk is the least disturbed"""


@dataclass
class Config:
    matmul_m: Annotated[int, Range(ge=1, le=4096)] = 200
    """rows of A and C in the tiled-matmul equality and traffic check (not a multiple of block_m: a ragged
    last tile is part of the check)"""
    matmul_n: Annotated[int, Range(ge=1, le=4096)] = 136
    """columns of B and C"""
    matmul_k: Annotated[int, Range(ge=1, le=4096)] = 168
    """the inner dimension"""
    block_m: Annotated[int, Range(ge=1, le=4096)] = 32
    """B_m: rows of a C tile (one thread block's output rows)"""
    block_n: Annotated[int, Range(ge=1, le=4096)] = 16
    """B_n: columns of a C tile (unequal to B_m, so that a formula that swaps them fails)"""
    block_k: Annotated[int, Range(ge=1, le=4096)] = 16
    """B_k: the step along k (moves no extra bytes, sets the fast memory a tile pair takes)"""
    tile_sweep: Annotated[tuple[int, ...], Range(ge=1, le=1024)] = (1, 2, 4, 8, 16, 32, 64, 128)
    """square tile sizes B (B_m = B_n = B, B_k = block_k) whose traffic and intensity are counted on a
    sweep_size^3 matmul (1: the naive kernel)"""
    sweep_size: Annotated[int, Range(ge=1, le=1024)] = 128
    """m = n = k of the tile sweep's matmul"""
    roofline_sizes: Annotated[tuple[int, ...], Range(ge=1, le=4096)] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    """n of the n x n fp32 torch.matmul timed for the roofline (the first is the 'small', the last the 'large')"""
    seconds_per_size: Annotated[float, Range(gt=0, le=60)] = 1.0
    """time spent timing each roofline size (and the copy), split into chunks whose best is kept"""
    copy_mb: Annotated[int, Range(ge=1, le=1024)] = 256
    """size of the fp32 tensor copied to measure the memory bandwidth (well above the CPU's caches)"""
    batch: Annotated[int, Range(ge=1, le=64)] = 2
    """batch of the attention equality checks"""
    heads: Annotated[int, Range(ge=1, le=64)] = 2
    """heads of the attention equality checks"""
    seq_len: Annotated[int, Range(ge=1, le=8192)] = 300
    """N of the attention equality and traffic checks (not a multiple of the blocks: ragged last blocks)"""
    head_dim: Annotated[int, Range(ge=1, le=512)] = 32
    """d, the head dimension"""
    block_q: Annotated[int, Range(ge=1, le=8192)] = 64
    """B_r: queries per block (one thread block's rows)"""
    block_kv: Annotated[int, Range(ge=1, le=8192)] = 32
    """B_c: keys and values per block (unequal to B_r, so the causal diagonal crosses blocks)"""
    sram_sweep: Annotated[tuple[int, ...], Range(ge=64, le=1_048_576)] = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
    """SRAM sizes M, in elements, of the traffic-vs-M sweep: each gets the largest square block that fits"""
    sweep_seq_len: Annotated[int, Range(ge=1, le=8192)] = 2048
    """N of the SRAM sweep"""
    sweep_head_dim: Annotated[int, Range(ge=1, le=512)] = 64
    """d of the SRAM sweep (a common head size)"""
    gpu: bool = True
    """run the Triton kernels and time them against torch when a CUDA device and Triton are present"""
    seed: Seed = 0
    """seeds the matrices and the attention inputs"""

    def tile_steps(self) -> int:
        """Python-level tile steps of a run (each a few small torch calls, 10-40 us): the naive matmul, the
        tile sweep, forward and backward of both attentions, and the SRAM sweep."""
        m, n, k, size, sn = self.matmul_m, self.matmul_n, self.matmul_k, self.sweep_size, self.sweep_seq_len
        naive = m * n
        sweep = sum(ceil_div(size, t) ** 2 * ceil_div(size, self.block_k) for t in self.tile_sweep)
        attention = 4 * ceil_div(self.seq_len, self.block_q) * ceil_div(self.seq_len, self.block_kv)
        sram = sum(ceil_div(sn, max(1, min(sram_block(mem, self.sweep_head_dim), sn))) ** 2 for mem in self.sram_sweep)
        return naive + sweep + attention + sram

    def problems(self) -> list[str]:
        problems = []
        smallest = min(self.sram_sweep)
        if 4 * self.sweep_head_dim + 3 > smallest:
            problems.append(f"sram_sweep holds {smallest} elements, too few for one block of d={self.sweep_head_dim} "
                            f"(4 d + 3 = {4 * self.sweep_head_dim + 3})")
        if len(self.roofline_sizes) < 2:
            problems.append("roofline_sizes needs at least two sizes: the check compares the first with the last")
        if self.batch * self.heads * self.seq_len ** 2 > MAX_SCORE_ELEMENTS:
            problems.append(f"batch x heads x seq_len^2 = {self.batch * self.heads * self.seq_len ** 2:,} score elements: the "
                            f"naive reference and its autograd hold several such fp64 matrices; at most {MAX_SCORE_ELEMENTS:,}")
        if not problems and self.tile_steps() > MAX_TILE_STEPS:
            problems.append(f"these sizes and blocks make {self.tile_steps():,} Python tile steps, more than "
                            f"{MAX_TILE_STEPS:,} (about two minutes): use larger blocks or smaller sizes")
        return problems


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- memory traffic ----------------------------------------------------------------------------------
class Traffic:
    """Elements moved between slow memory (HBM) and fast memory (SRAM, registers), counted as the loops
    load tiles and store results."""

    def __init__(self) -> None:
        self.read = 0
        self.written = 0

    def load(self, tile: torch.Tensor) -> torch.Tensor:
        self.read += tile.numel()
        return tile

    def store(self, tile: torch.Tensor) -> torch.Tensor:
        self.written += tile.numel()
        return tile

    @property
    def total(self) -> int:
        return self.read + self.written


def max_abs_diff(*pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |x - y| over the pairs; NaN if any difference is NaN (Python's max() would hide a NaN that
    is not the first value it sees)."""
    return float(torch.stack([(x - y).abs().max() for x, y in pairs]).max())


# --- 1. tiled matmul -----------------------------------------------------------------------------------
def tiled_matmul(a: torch.Tensor, b: torch.Tensor, block_m: int, block_n: int, block_k: int,
                 traffic: Traffic | None = None) -> torch.Tensor:
    """C = A B one B_m x B_n output tile at a time (a thread block each), stepping k by B_k."""
    traffic = traffic or Traffic()
    m, k = a.shape
    n = b.shape[1]
    c = a.new_full((m, n), math.nan)  # NaN until a tile writes it: an element the loops miss shows
    for row in range(0, m, block_m):
        for col in range(0, n, block_n):
            acc = a.new_zeros(min(block_m, m - row), min(block_n, n - col))   # the tile's registers
            for depth in range(0, k, block_k):
                a_tile = traffic.load(a[row:row + block_m, depth:depth + block_k])
                b_tile = traffic.load(b[depth:depth + block_k, col:col + block_n])
                acc += a_tile @ b_tile
            c[row:row + block_m, col:col + block_n] = traffic.store(acc)
    return c


def matmul_traffic_formula(m: int, n: int, k: int, block_m: int, block_n: int) -> int:
    """Elements a tiled matmul moves, in closed form: A once per column block, B once per row block, C once."""
    reads = m * k * ceil_div(n, block_n) + k * n * ceil_div(m, block_m)
    return reads + m * n


def tile_fast_memory(block_m: int, block_n: int, block_k: int) -> int:
    """Elements a tile holds in fast memory at once: an A tile, a B tile and the C accumulator."""
    return block_m * block_k + block_k * block_n + block_m * block_n


# --- 2. the roofline -------------------------------------------------------------------------------------
def best_seconds(fn, seconds: float) -> float:
    """Seconds per call of fn: after one warm-up call, the best of TIMING_CHUNKS chunks of repeats."""
    fn()
    best = math.inf
    for _ in range(TIMING_CHUNKS):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / TIMING_CHUNKS:
                break
        best = min(best, elapsed / calls)
    return best


def matmul_flops(n: int, seconds: float, gen: torch.Generator) -> float:
    """FLOP/s of an n x n fp32 torch.matmul: 2 n^3 FLOPs per call."""
    a, b = torch.randn((n, n), generator=gen), torch.randn((n, n), generator=gen)
    out = torch.empty(n, n)
    return 2 * n ** 3 / best_seconds(lambda: torch.mm(a, b, out=out), seconds)


def copy_bandwidth(megabytes: int, seconds: float) -> float:
    """Bytes/s of a large fp32 copy: each element is read once and written once."""
    src = torch.ones(megabytes * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / best_seconds(lambda: dst.copy_(src), seconds)


def matmul_intensity(n: int) -> float:
    """FLOPs per byte of an n x n fp32 matmul when A, B and C each cross memory once: 2 n^3 / (3 n^2 x 4)."""
    return 2 * n ** 3 / (3 * n * n * ELEMENT_BYTES)


# --- 3. attention: naive, FlashAttention forward and backward ----------------------------------------------
def causal_mask(q_start: int, q_end: int, k_start: int, k_end: int) -> torch.Tensor:
    """True where a key comes after its query (masked): the block [q_start, q_end) x [k_start, k_end)."""
    queries = torch.arange(q_start, q_end)[:, None]
    keys = torch.arange(k_start, k_end)[None, :]
    return keys > queries


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    traffic: Traffic | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T / sqrt(d)) V as the three kernels of standard attention, each reading its inputs
    from HBM and writing its output there; returns (O, logsumexp of each score row). Differentiable:
    autograd through it is the backward's reference."""
    traffic = traffic or Traffic()
    n, d = q.shape[-2:]
    scores = traffic.store(traffic.load(q) @ traffic.load(k).transpose(-1, -2) / math.sqrt(d))   # S: N^2 written
    s = traffic.load(scores)                                                                 # read back
    if causal:   # built apart from causal_mask(), which the flash kernels use: the reference shares no code with them
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(diagonal=1), -math.inf)
    probs = traffic.store(torch.softmax(s, dim=-1))                                          # P: N^2 written
    out = traffic.store(traffic.load(probs) @ traffic.load(v))                               # P read back
    return out, torch.logsumexp(s, dim=-1)


def naive_attention_traffic_formula(n: int, d: int, heads: int = 1) -> int:
    """Elements standard attention moves: Q, K, V read and O written (4 N d), S and P each written and read (4 N^2)."""
    return heads * (4 * n * d + 4 * n * n)


def online_softmax_update(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, s: torch.Tensor,
                          v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of scores s (rows x keys) and its values v into the running row max m, row sum l
    and unnormalised output acc. Whatever was summed under the old max is rescaled by exp(m - m_new)."""
    m_new = torch.maximum(m, s.amax(dim=-1))
    alpha = torch.exp(m - m_new)          # 0 on the first block (m = -inf): nothing to rescale yet
    p = torch.exp(s - m_new[..., None])
    l = alpha * l + p.sum(dim=-1)
    acc = alpha[..., None] * acc + p @ v
    return m_new, l, acc


def flash_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_kv: int,
                            causal: bool = False, traffic: Traffic | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention forward over (..., N, d) tensors: Q blocks outside, K/V blocks inside, nothing of
    size N x N ever stored. Returns O and the logsumexp L of each query's scores."""
    traffic = traffic or Traffic()
    n, d = q.shape[-2:]
    scale = 1 / math.sqrt(d)
    out = torch.full_like(q, math.nan)
    lse = q.new_full(q.shape[:-1], math.nan)
    for q_start in range(0, n, block_q):
        q_end = min(q_start + block_q, n)
        q_tile = traffic.load(q[..., q_start:q_end, :])
        m = q.new_full(q_tile.shape[:-1], -math.inf)
        l = torch.zeros_like(m)
        acc = torch.zeros_like(q_tile)
        # causal: key blocks that start after this block's last query are all masked, so they are never loaded
        kv_blocks = (q_end - 1) // block_kv + 1 if causal else ceil_div(n, block_kv)
        for j in range(kv_blocks):
            k_start, k_end = j * block_kv, min((j + 1) * block_kv, n)
            k_tile = traffic.load(k[..., k_start:k_end, :])
            v_tile = traffic.load(v[..., k_start:k_end, :])
            s = q_tile @ k_tile.transpose(-1, -2) * scale
            if causal:
                s = s.masked_fill(causal_mask(q_start, q_end, k_start, k_end), -math.inf)
            m, l, acc = online_softmax_update(m, l, acc, s, v_tile)
        out[..., q_start:q_end, :] = traffic.store(acc / l[..., None])
        lse[..., q_start:q_end] = traffic.store(m + torch.log(l))
    return out, lse


def flash_attention_traffic_formula(n: int, d: int, block_q: int, block_kv: int, causal: bool, heads: int = 1) -> int:
    """Elements the flash forward moves: Q read and O written once (2 N d), L written (N), and per query
    block the K and V rows it loads: all N, or when causal, whole key blocks up to its last query."""
    if causal:
        kv_rows = sum(min(n, ceil_div(min(q_start + block_q, n), block_kv) * block_kv)
                      for q_start in range(0, n, block_q))
    else:
        kv_rows = ceil_div(n, block_q) * n
    return heads * (2 * n * d + 2 * d * kv_rows + n)


def flash_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, d_out: torch.Tensor, block_q: int, block_kv: int,
                             causal: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of FlashAttention from the forward's O and L: K/V blocks outside (their dK, dV stay in
    fast memory), Q blocks inside (dQ accumulates in HBM); P recomputed block by block from L."""
    n, d = q.shape[-2:]
    scale = 1 / math.sqrt(d)
    delta = (d_out * out).sum(dim=-1)      # D = rowsum(dO * O) = rowsum(P * dP): one number per query
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for k_start in range(0, n, block_kv):
        k_end = min(k_start + block_kv, n)
        k_tile, v_tile = k[..., k_start:k_end, :], v[..., k_start:k_end, :]
        dk_acc, dv_acc = torch.zeros_like(k_tile), torch.zeros_like(v_tile)
        # causal: query blocks that end before this key block's first key never see it
        first_q = (k_start // block_q) * block_q if causal else 0
        for q_start in range(first_q, n, block_q):
            q_end = min(q_start + block_q, n)
            q_tile, do_tile = q[..., q_start:q_end, :], d_out[..., q_start:q_end, :]
            p = torch.exp(q_tile @ k_tile.transpose(-1, -2) * scale - lse[..., q_start:q_end, None])
            if causal:
                p = p.masked_fill(causal_mask(q_start, q_end, k_start, k_end), 0.0)
            dv_acc += p.transpose(-1, -2) @ do_tile
            dp = do_tile @ v_tile.transpose(-1, -2)
            ds = p * (dp - delta[..., q_start:q_end, None])
            dq[..., q_start:q_end, :] += ds @ k_tile * scale
            dk_acc += ds.transpose(-1, -2) @ q_tile * scale
        dk[..., k_start:k_end, :] = dk_acc
        dv[..., k_start:k_end, :] = dv_acc
    return dq, dk, dv


def sram_block(sram_elements: int, d: int) -> int:
    """The largest square block B (B_r = B_c = B) whose working set fits in M elements of SRAM: Q_i and the
    O accumulator (2 B d), K_j and V_j (2 B d), the scores S (B^2) and m, l (2 B)."""
    b = int((math.sqrt((4 * d + 2) ** 2 + 4 * sram_elements) - (4 * d + 2)) / 2)
    while b * b + (4 * d + 2) * b > sram_elements:   # the float root can land one above
        b -= 1
    while (b + 1) ** 2 + (4 * d + 2) * (b + 1) <= sram_elements:
        b += 1
    return b


# --- the GPU path ------------------------------------------------------------------------------------------
def gpu_ready() -> str | None:
    """None when the Triton kernels can run here, else why they cannot."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


GPU_METRICS = ("gpu_matmul_rel_err", "gpu_matmul_torch_rel_err", "gpu_attention_max_err", "gpu_attention_torch_max_err")


def gpu_path(cfg: Config, ctx) -> dict[str, float]:
    """The Triton matmul and flash-attention forward against torch, equality and speed; NaN metrics
    (null in metrics.json) and one line saying why when it cannot run."""
    skipped = "--set gpu=false" if not cfg.gpu else gpu_ready()
    if skipped:
        ctx.say(f"GPU path skipped: {skipped}. The Triton kernels run and are timed against torch.matmul and "
                f"F.scaled_dot_product_attention only on a CUDA device (python -m post_train.systems.cuda.code.triton_kernels).")
        return {"gpu_available": 0.0, **{name: math.nan for name in GPU_METRICS}}
    from .triton_kernels import compare_and_time   # imports triton: only where it can run

    report = compare_and_time(seed=cfg.seed, say=ctx.say)
    for row in report["timings"]:
        ctx.log("gpu", **row)
        ctx.measure(**{f"gpu_{row['kernel']}_{impl}_tflops": row[f"{impl}_tflops"] for impl in ("triton", "torch")})
    return {"gpu_available": 1.0, **{name: report[name] for name in GPU_METRICS}}


# --- plots -------------------------------------------------------------------------------------------------
def plot_roofline(rows: list[dict], peak: float, bandwidth: float):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    intensity = np.array([r["intensity"] for r in rows])
    flops = np.array([r["gflops"] for r in rows])
    grid = np.logspace(np.log10(min(intensity.min(), 0.5) / 2), np.log10(max(intensity.max(), 2 * peak / bandwidth) * 2), 200)
    ax = axes[0]
    ax.loglog(grid, np.minimum(peak, grid * bandwidth) / 1e9, color="tab:red", label="roofline: min(peak, I x bandwidth)")
    ax.axvline(peak / bandwidth, color="tab:red", ls=":", lw=0.8)
    ax.loglog(intensity, flops, "o-", color="tab:blue", label="torch.matmul, n x n fp32")
    for r in rows:
        ax.annotate(str(r["n"]), (r["intensity"], r["gflops"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set(xlabel="arithmetic intensity (FLOP / byte)", ylabel="GFLOP/s",
           title=f"roofline: peak {peak / 1e9:.0f} GFLOP/s, copy {bandwidth / 1e9:.1f} GB/s, ridge {peak / bandwidth:.1f} FLOP/B")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogx([r["n"] for r in rows], flops, "o-", color="tab:blue", base=2)
    ax.axhline(peak / 1e9, color="tab:red", ls="--", lw=0.8, label="peak (best measured)")
    ax.set(xlabel="n", ylabel="GFLOP/s", title="FLOP/s vs matrix size (one thread)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_traffic(tiles: list[dict], sram: list[dict], naive_elements: int, n: int, d: int):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.loglog([r["tile"] for r in tiles], [r["intensity"] for r in tiles], "o", color="tab:blue", base=2,
              label="counted (tiled loops)")
    ax.loglog([r["tile"] for r in tiles], [r["intensity_formula"] for r in tiles], "-", color="tab:gray", base=2,
              label="closed form")
    ax.set(xlabel="tile size B (B_m = B_n)", ylabel="FLOP / byte (fp32)", title="tiled matmul: intensity grows with the tile")
    ax.legend(fontsize=8)
    ax = axes[1]
    mem = np.array([r["sram_elements"] for r in sram])
    ax.loglog(mem, [r["flash_elements"] for r in sram], "o", color="tab:blue", label="flash, counted")
    ax.loglog(mem, [r["flash_formula"] for r in sram], "-", color="tab:gray", label="flash, formula")
    ax.loglog(mem, 8 * n * n * d * d / mem, "--", color="tab:green", lw=0.8, label="8 N^2 d^2 / M")
    ax.axhline(naive_elements, color="tab:red", label="standard attention (4 N d + 4 N^2)")
    ax.set(xlabel="SRAM size M (elements)", ylabel="HBM elements moved",
           title=f"attention forward, N = {n}, d = {d}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- the run -----------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    seeds = [int(s) for s in np.random.SeedSequence(cfg.seed).generate_state(4)]
    gen = torch.Generator().manual_seed(seeds[0])

    # 1. tiled matmul: equality, traffic counted vs the closed form, naive vs tiled
    m, n, k = cfg.matmul_m, cfg.matmul_n, cfg.matmul_k
    a = torch.randn((m, k), generator=gen, dtype=torch.float64)
    b = torch.randn((k, n), generator=gen, dtype=torch.float64)
    tiled, naive = Traffic(), Traffic()
    matmul_max_err = max_abs_diff((tiled_matmul(a, b, cfg.block_m, cfg.block_n, cfg.block_k, tiled), a @ b))
    tiled_matmul(a, b, 1, 1, k, naive)
    flops = 2 * m * n * k
    ctx.say(f"tiled matmul {m}x{k} @ {k}x{n}, tiles {cfg.block_m}x{cfg.block_n}x{cfg.block_k}: max |C - A@B| "
            f"{matmul_max_err:.1e} (fp64); {tiled.total} elements moved (formula "
            f"{matmul_traffic_formula(m, n, k, cfg.block_m, cfg.block_n)}), naive {naive.total}: "
            f"{flops / (tiled.total * ELEMENT_BYTES):.2f} vs {flops / (naive.total * ELEMENT_BYTES):.3f} FLOP/byte")
    size = cfg.sweep_size
    sa, sb = torch.randn((size, size), generator=gen), torch.randn((size, size), generator=gen)
    tile_rows = []
    for tile in cfg.tile_sweep:
        counter = Traffic()
        tiled_matmul(sa, sb, tile, tile, cfg.block_k, counter)
        formula = matmul_traffic_formula(size, size, size, tile, tile)
        row = {"tile": tile, "elements": counter.total, "elements_formula": formula,
               "fast_memory_elements": tile_fast_memory(tile, tile, min(cfg.block_k, size)),
               "intensity": 2 * size ** 3 / (counter.total * ELEMENT_BYTES),
               "intensity_formula": 2 * size ** 3 / (formula * ELEMENT_BYTES)}
        tile_rows.append(row)
        ctx.log("tiles", **row)

    # 2. the roofline of this CPU
    sizes = []
    for size_n in ctx.track(cfg.roofline_sizes, "roofline"):
        rate = matmul_flops(size_n, cfg.seconds_per_size, gen)
        sizes.append({"n": size_n, "intensity": matmul_intensity(size_n), "gflops": rate / 1e9})
    bandwidth = copy_bandwidth(cfg.copy_mb, cfg.seconds_per_size)
    peak = max(r["gflops"] for r in sizes) * 1e9
    for r in sizes:
        r["attainable_gflops"] = min(peak, r["intensity"] * bandwidth) / 1e9
        ctx.log("roofline", **r)
    rise = sizes[-1]["gflops"] / sizes[0]["gflops"]
    ridge = peak / bandwidth
    ctx.measure(peak_gflops=peak / 1e9, copy_gb_per_s=bandwidth / 1e9, ridge_flop_per_byte=ridge,
                small_gflops=sizes[0]["gflops"], large_gflops=sizes[-1]["gflops"], flops_rise=rise)
    ctx.say(f"roofline: torch.matmul {sizes[0]['gflops']:.2f} GFLOP/s at n={sizes[0]['n']} -> "
            f"{sizes[-1]['gflops']:.1f} at n={sizes[-1]['n']} ({rise:.0f}x); peak {peak / 1e9:.1f} GFLOP/s, "
            f"copy {bandwidth / 1e9:.1f} GB/s, ridge {ridge:.1f} FLOP/byte (n ~ {6 * ridge:.0f})")

    # 3. attention: flash forward and backward against naive, fp64, causal and not
    agen = torch.Generator().manual_seed(seeds[1])
    shape = (cfg.batch, cfg.heads, cfg.seq_len, cfg.head_dim)
    q, kk, v, d_out = (torch.randn(shape, generator=agen, dtype=torch.float64) for _ in range(4))
    heads = cfg.batch * cfg.heads
    errors, grad_errors, counts = [], [], {}
    for causal in (False, True):
        flash_traffic, naive_traffic = Traffic(), Traffic()
        out, lse = flash_attention_forward(q, kk, v, cfg.block_q, cfg.block_kv, causal, flash_traffic)
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, kk, v))
        ref_out, ref_lse = naive_attention(qr, kr, vr, causal, naive_traffic)
        errors.append(max_abs_diff((out, ref_out.detach()), (lse, ref_lse.detach())))
        ref_out.backward(d_out)
        grads = flash_attention_backward(q, kk, v, out, lse, d_out, cfg.block_q, cfg.block_kv, causal)
        grad_errors.append(max_abs_diff(*zip(grads, (qr.grad, kr.grad, vr.grad))))
        counts[causal] = (flash_traffic.total, naive_traffic.total)
        ctx.log("attention", causal=causal, out_lse_max_err=errors[-1], grad_max_err=grad_errors[-1],
                flash_elements=flash_traffic.total,
                flash_formula=flash_attention_traffic_formula(cfg.seq_len, cfg.head_dim, cfg.block_q, cfg.block_kv, causal, heads),
                naive_elements=naive_traffic.total)
    attention_max_err, backward_max_err = float(np.max(errors)), float(np.max(grad_errors))   # NaN wins, as it must
    ctx.say(f"flash attention (B_r={cfg.block_q}, B_c={cfg.block_kv}) vs naive, N={cfg.seq_len}, d={cfg.head_dim}, fp64, "
            f"causal and not: O and logsumexp max err {attention_max_err:.1e}, dQ/dK/dV max err {backward_max_err:.1e}")

    # 4. HBM traffic against the SRAM size
    sgen = torch.Generator().manual_seed(seeds[2])
    sn, sd = cfg.sweep_seq_len, cfg.sweep_head_dim
    sq, sk, sv = (torch.randn((sn, sd), generator=sgen) for _ in range(3))
    sweep_naive = Traffic()
    naive_attention(sq, sk, sv, traffic=sweep_naive)
    sram_rows, mismatch = [], 0
    for sram in ctx.track(cfg.sram_sweep, "SRAM sweep"):
        block = min(sram_block(sram, sd), sn)
        counter = Traffic()
        flash_attention_forward(sq, sk, sv, block, block, traffic=counter)
        formula = flash_attention_traffic_formula(sn, sd, block, block, False)
        mismatch = max(mismatch, abs(counter.total - formula))
        row = {"sram_elements": sram, "block": block, "flash_elements": counter.total, "flash_formula": formula,
               "naive_elements": sweep_naive.total, "saving": sweep_naive.total / counter.total}
        sram_rows.append(row)
        ctx.log("sram", **row)
    ctx.say(f"SRAM sweep (N={sn}, d={sd}), naive / flash HBM traffic: " + ", ".join(
        f"M={r['sram_elements']} (B={r['block']}) {r['saving']:.2f}" for r in sram_rows))

    ctx.save_figure(plot_roofline(sizes, peak, bandwidth), "roofline.png")
    ctx.save_figure(plot_traffic(tile_rows, sram_rows, sweep_naive.total, sn, sd), "traffic.png")

    gpu = gpu_path(cfg, ctx)
    flash_elements, naive_elements = counts[False]
    return {
        "matmul_max_err": matmul_max_err,
        "matmul_bytes": tiled.total * ELEMENT_BYTES,
        "matmul_bytes_formula": matmul_traffic_formula(m, n, k, cfg.block_m, cfg.block_n) * ELEMENT_BYTES,
        "naive_matmul_bytes": naive.total * ELEMENT_BYTES,
        "naive_matmul_bytes_formula": matmul_traffic_formula(m, n, k, 1, 1) * ELEMENT_BYTES,
        "matmul_intensity": flops / (tiled.total * ELEMENT_BYTES),
        "naive_matmul_intensity": flops / (naive.total * ELEMENT_BYTES),
        "tile_fast_memory_bytes": tile_fast_memory(cfg.block_m, cfg.block_n, cfg.block_k) * ELEMENT_BYTES,
        "flops_rise_over_10x": float(rise >= FLOPS_RISE),
        "attention_max_err": attention_max_err,
        "attention_backward_max_err": backward_max_err,
        "flash_bytes": flash_elements * ELEMENT_BYTES,
        "flash_bytes_formula": flash_attention_traffic_formula(
            cfg.seq_len, cfg.head_dim, cfg.block_q, cfg.block_kv, False, heads) * ELEMENT_BYTES,
        "flash_causal_bytes": counts[True][0] * ELEMENT_BYTES,
        "flash_causal_bytes_formula": flash_attention_traffic_formula(
            cfg.seq_len, cfg.head_dim, cfg.block_q, cfg.block_kv, True, heads) * ELEMENT_BYTES,
        "naive_attention_bytes": naive_elements * ELEMENT_BYTES,
        "naive_attention_bytes_formula": naive_attention_traffic_formula(cfg.seq_len, cfg.head_dim, heads) * ELEMENT_BYTES,
        "attention_traffic_saving": naive_elements / flash_elements,
        "sram_sweep_mismatch": float(mismatch),
        "sram_sweep_best_saving": max(r["saving"] for r in sram_rows),
        **gpu,
    }
