"""Attention variants of the shared transformer family, built by `build_attention(cfg)`.

Every variant has the same interface, so `core/nn/model.py` never looks inside:

    forward(x (B, T, C), cache: dict | None, pos: int) -> (B, T, C)
        `pos` is the absolute position of x[:, 0]; with a cache, the new keys are written at
        [pos, pos + T) and the queries attend to everything cached in [0, pos + T).
    init_cache(batch, max_len) -> dict[str, Tensor]   the tensors this variant keeps per token
    cache_bytes_per_token() -> int                     closed form of those tensors' bytes / token

Variants:
- `GroupedQueryAttention`: MHA (n_kv_head = n_head), GQA (1 < n_kv_head < n_head), MQA (n_kv_head = 1)
  (Vaswani et al. 2017; Shazeer 2019; Ainslie et al. 2023).
- `MultiHeadLatentAttention`: MLA from DeepSeek-V2 (DeepSeek-AI 2024, Sec. 2.1).
- `MoBA`: Mixture of Block Attention (Lu et al. 2025).
- `NativeSparseAttention`: NSA (Yuan et al. 2025).

RoPE uses the "rotate half" layout (pairs (x_i, x_{i+d/2})), the layout of Hugging Face's Llama, so
exported weights need no q/k permutation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.nn.fused import fused_linear
from core.nn.norm import RMSNorm

# ----------------------------------------------------------------------------------------- RoPE

def rope_cos_sin(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and signed sin of the rotation angles, shape (max_len, head_dim), float64 (cast on use).
    The sign of the rotation is folded into the sin table, (-sin, sin) over the two halves, so that
    applying RoPE needs no negation: see apply_rope."""
    # RoFormer (Su et al. 2021), Eq. 15: theta_i = base^(-2i/d), i = 0 .. d/2 - 1
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # m * theta_i
    # the same angle rotates x_i and x_{i+d/2}
    return torch.cat([angles.cos(), angles.cos()], dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """x * cos + sign * swap(x) * sin, swap(x_1, x_2) = (x_2, x_1) over the last dimension (each
    element's pair partner), the swapped product added into each half in place rather than built
    as a concatenated copy."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


class _Rotate(torch.autograd.Function):
    """y = R x = x * cos + swap(x) * sin_signed, and its backward, the inverse rotation
    R^T g = g * cos + swap(g * sin_signed) = g * cos - swap(g) * sin_signed (swap(sin_signed) =
    -sin_signed). Written out because autograd through the forward would take twice the passes over
    q and k (zero-filled slice gradients, then their sum): RoPE was the largest element-wise cost of
    a training step."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate_pairs(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return rotate_pairs(grad, cos, sin, -1.0), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) of x (..., T, d) by the angle m * theta_i of its position;
    cos and sin (T, d) from rope_cos_sin (sin signed).

    RoFormer Eq. 34: R x = x * cos(m theta) + (-x_2, x_1) * sin(m theta), so that <R_m q, R_n k>
    depends on m - n only; here (-x_2, x_1) * sin = swap(x) * (-sin, sin)."""
    return _Rotate.apply(x, cos.to(x.dtype), sin.to(x.dtype))


class Rotary(nn.Module):
    """Precomputed cos/sin tables (non-persistent buffers: derived from the config, not learned)."""

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        cos, sin = rope_cos_sin(head_dim, max_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor, pos: int) -> Tensor:
        """x (..., T, d) holding positions pos .. pos + T - 1."""
        T = x.shape[-2]
        return apply_rope(x, self.cos[pos:pos + T], self.sin[pos:pos + T])


# -------------------------------------------------------------------------------- shared helpers

def causal_mask(T: int, pos: int, device=None) -> Tensor:
    """(T, pos + T) bool: query i (absolute position pos + i) may see key j iff j <= pos + i."""
    q_pos = torch.arange(pos, pos + T, device=device)[:, None]
    return torch.arange(pos + T, device=device)[None, :] <= q_pos


def padded_causal_mask(key_mask: Tensor, T: int, pos: int) -> Tensor:
    """(B, 1, T, pos + T) bool for a left-padded batch: the causal mask, minus the keys that
    `key_mask` (B, pos + T) marks as padding. A padding query still sees itself, so its row is never
    empty (an all-masked softmax row is NaN, and NaN times a zero weight would reach real tokens).
    RoPE scores depend on relative positions only, so a row shifted right by its padding attends
    exactly as it would unpadded."""
    device = key_mask.device
    itself = torch.arange(pos + T, device=device)[None, :] == torch.arange(pos, pos + T, device=device)[:, None]
    return causal_mask(T, pos, device) & (key_mask[:, None, None, :pos + T] | itself)


def no_padding(key_mask: Tensor | None, name: str) -> None:
    if key_mask is not None:
        raise ValueError(f"{name} attention takes no padded batches (key_mask); use a dense variant "
                         "(llama, gqa, mqa, mla) for batched generation of prompts of different lengths")


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale, masked) v  (Vaswani et al. 2017, Eq. 1).

    q (B, H, T, d), k (B, H, S, d), v (B, H, S, dv), mask broadcastable to (B, H, T, S).
    A query that may see no key at all (possible in the sparse branches) gets a zero output."""
    return masked_softmax((q @ k.transpose(-2, -1)) * scale, mask) @ v


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.masked_fill(~mask, 0.0)  # all-masked rows are NaN after softmax; make them 0


def write_cache(cache: dict[str, Tensor], pos: int, **new: Tensor) -> dict[str, Tensor]:
    """Store the new entries at positions [pos, pos + T) (dim -2) and return everything in
    [0, pos + T)."""
    out = {}
    for name, value in new.items():
        T = value.shape[-2]
        if pos + T > cache[name].shape[-2]:
            raise ValueError(f"cache holds {cache[name].shape[-2]} positions, asked for {pos + T}")
        cache[name][..., pos:pos + T, :] = value
        out[name] = cache[name][..., :pos + T, :]
    return out


def tensor_bytes(cache: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())


class _CachedAttention(nn.Module):
    """Shared bookkeeping: the cache is a dict of (B, [heads,] max_len, dim) tensors named in
    `cache_shapes()`, in the dtype of the weights; each variant states its bytes per token as a
    formula in `cache_bytes_per_token()` (the tests compare it with the allocated tensors)."""

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """name -> shape of one token's entry (without batch and time)."""
        raise NotImplementedError

    def init_cache(self, batch: int, max_len: int) -> dict[str, Tensor]:
        w = next(self.parameters())
        out = {}
        for name, shape in self.cache_shapes().items():
            *lead, dim = shape  # time goes second to last: (B, *lead, max_len, dim)
            out[name] = torch.zeros(batch, *lead, max_len, dim, dtype=w.dtype, device=w.device)
        return out

    def element_size(self) -> int:
        return next(self.parameters()).element_size()


# ---------------------------------------------------------------------------- MHA / GQA / MQA

class GroupedQueryAttention(_CachedAttention):
    """n_head query heads share n_kv_head key/value heads (n_head / n_kv_head queries per group).

    Cache per token and layer: 2 * n_kv_head * head_dim numbers (K and V)."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.rope = Rotary(self.head_dim, cfg.block_size, cfg.rope_theta)

    def cache_shapes(self):
        return {"k": (self.n_kv_head, self.head_dim), "v": (self.n_kv_head, self.head_dim)}

    def cache_bytes_per_token(self) -> int:
        return 2 * self.n_kv_head * self.head_dim * self.element_size()  # K and V of each kv head

    def project_qkv(self, x: Tensor, cache: dict | None, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, n_head, T, hd) and all visible k, v (B, n_kv_head, pos + T, hd), RoPE applied. Query
        head h reads kv head h // (n_head / n_kv_head); the K/V are not copied out to every query head
        (`scaled_dot_product_attention(..., enable_gqa=True)` groups the query heads instead), so
        GQA and MQA read a smaller cache at every decode step rather than a copy as large as MHA's."""
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = fused_linear(x, self.wq, self.wk, self.wv).view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([H + H_kv, H_kv], dim=1)
        q, k = self.rope(qk, pos).split([H, H_kv], dim=1)  # one rotation for the query and key heads
        if cache is not None:
            k, v = write_cache(cache, pos, k=k, v=v).values()
        return q, k, v

    def expand_kv(self, kv: Tensor) -> Tensor:
        """(B, n_kv_head, S, hd) -> (B, n_head, S, hd): each kv head copied to the `group` consecutive
        query heads it serves, for the code that indexes heads itself (MoBA's block gate); none for MHA."""
        group = self.n_head // self.n_kv_head
        return kv if group == 1 else kv.repeat_interleave(group, dim=1)

    def merge_heads(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def forward(self, x: Tensor, cache: dict | None = None, pos: int = 0, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.project_qkv(x, cache, pos)
        grouped = self.n_kv_head != self.n_head
        if key_mask is not None:  # a left-padded batch
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=padded_causal_mask(key_mask, q.shape[2], pos),
                                               enable_gqa=grouped)
        elif k.shape[2] == q.shape[2]:  # no earlier tokens: the plain causal mask (fast kernel)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q.shape[2], pos, x.device),
                                               enable_gqa=grouped)
        return self.merge_heads(y)


# ------------------------------------------------------------------------------------------ MLA

class MultiHeadLatentAttention(_CachedAttention):
    """Multi-head Latent Attention, DeepSeek-V2 (2024) Sec. 2.1, Eqs. 9-19.

    Keys and values of all heads are up-projected from one low-rank latent c_kv per token; a
    separate small RoPE key, shared by all heads, carries the position (RoPE cannot pass through
    the absorbed up-projection). Cache per token and layer: kv_lora_rank + qk_rope_head_dim.

    Two equivalent paths: naive (materialise per-head k and v from the latents) and absorbed (W_UK
    folded into the query, W_UV applied after attention over the latents: attention runs directly on
    the cache). A call that attends to earlier cached tokens (decoding, pos > 0) takes the absorbed
    path unless `mla_absorb` is off: the naive path would re-expand every cached latent into per-head
    keys and values at every step. Training and the first chunk of a prompt (nothing cached yet) take
    the naive path: there each latent is expanded once and serves T queries, and the per-head scores
    are over d_h + d_h^R numbers instead of d_c + d_h^R."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.absorb = cfg.mla_absorb
        self.q_lora_rank = cfg.q_lora_rank
        q_dim = self.n_head * (self.nope_dim + self.rope_dim)
        if cfg.q_lora_rank:  # Eqs. 12-13: c_q = W_DQ h, q = W_UQ c_q
            self.wq_down = nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_up = nn.Linear(cfg.q_lora_rank, q_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.n_embd, q_dim, bias=False)
        # Eq. 9 (c_kv = W_DKV h) fused with Eq. 15 (k_rope = RoPE(W_KR h)): one down-projection
        self.wkv_down = nn.Linear(cfg.n_embd, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.wk_up = nn.Linear(self.kv_rank, self.n_head * self.nope_dim, bias=False)  # W_UK, Eq. 10
        self.wv_up = nn.Linear(self.kv_rank, self.n_head * self.v_dim, bias=False)  # W_UV, Eq. 11
        self.wo = nn.Linear(self.n_head * self.v_dim, cfg.n_embd, bias=False)  # W_O, Eq. 19
        self.rope = Rotary(self.rope_dim, cfg.block_size, cfg.rope_theta)
        self.scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)  # Eq. 18: sqrt(d_h + d_h^R)

    def cache_shapes(self):
        return {"c_kv": (self.kv_rank,), "k_rope": (self.rope_dim,)}

    def cache_bytes_per_token(self) -> int:
        return (self.kv_rank + self.rope_dim) * self.element_size()  # DeepSeek-V2 Table 1: (d_c + d_h^R) l

    def forward(self, x: Tensor, cache: dict | None = None, pos: int = 0, key_mask: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        H = self.n_head
        if self.q_lora_rank:
            q = self.wq_up(self.q_norm(self.wq_down(x)))
        else:
            q = self.wq(x)
        q = q.view(B, T, H, self.nope_dim + self.rope_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = self.rope(q_rope, pos)  # Eq. 14: q^R = RoPE(W_QR c_q)
        c_kv, k_rope = self.wkv_down(x).split([self.kv_rank, self.rope_dim], dim=-1)
        c_kv, k_rope = self.kv_norm(c_kv), self.rope(k_rope, pos)  # (B, T, r), (B, T, d_R)
        if cache is not None:
            c_kv, k_rope = write_cache(cache, pos, c_kv=c_kv, k_rope=k_rope).values()
        mask = causal_mask(T, pos, x.device) if key_mask is None else padded_causal_mask(key_mask, T, pos)
        k_rope = k_rope.unsqueeze(1)  # one RoPE key shared by every head (Eq. 17)
        if self.absorb and pos > 0:
            y = self._absorbed(q_nope, q_rope, c_kv, k_rope.squeeze(1), mask)
        else:
            y = self._naive(q_nope, q_rope, c_kv, k_rope, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        B, S, _ = c_kv.shape
        H = self.n_head
        k_nope = self.wk_up(c_kv).view(B, S, H, self.nope_dim).transpose(1, 2)  # Eq. 10
        v = self.wv_up(c_kv).view(B, S, H, self.v_dim).transpose(1, 2)  # Eq. 11
        q = torch.cat([q_nope, q_rope], dim=-1)  # Eq. 16: q = [q^C; q^R]
        k = torch.cat([k_nope, k_rope.expand(B, H, S, self.rope_dim)], dim=-1)  # Eq. 17
        return masked_attention(q, k, v, mask, self.scale)  # Eq. 18

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """q_nope (B, H, T, d_h), q_rope (B, H, T, d_R), c_kv (B, S, r), k_rope (B, S, d_R), mask
        broadcastable to (B, H, T, S) -> (B, H, T, d_v)."""
        B, H, T, _ = q_nope.shape
        # q^C . (W_UK c) = (W_UK^T q^C) . c : fold W_UK into the query, score against the latent
        w_uk = self.wk_up.weight.view(H, self.nope_dim, self.kv_rank)
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        # every head attends to the same keys [c_kv; k_rope] with the same value c_kv: a multi-query
        # attention, so the heads fold into the query rows, (B, H T, r + d_R) x (B, r + d_R, S): one
        # matmul over the cache as stored, no per-head K/V and no per-head copy of the latents
        q = torch.cat([q_latent, q_rope], dim=-1).reshape(B, H * T, -1)
        k = torch.cat([c_kv, k_rope], dim=-1)
        scores = (q @ k.transpose(-2, -1)).view(B, H, T, -1) * self.scale
        probs = masked_softmax(scores, mask).view(B, H * T, -1)
        o_latent = (probs @ c_kv).view(B, H, T, self.kv_rank)  # (B, H, T, r)
        # sum_j p_j W_UV c_j = W_UV (sum_j p_j c_j): W_UV applied once per query, after attention
        w_uv = self.wv_up.weight.view(H, self.v_dim, self.kv_rank)
        return torch.einsum("bhtr,hvr->bhtv", o_latent, w_uv)


# ----------------------------------------------------------------------------------------- MoBA

def block_index(positions: Tensor, block: int) -> Tensor:
    return torch.div(positions, block, rounding_mode="floor")


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T scale) v over one set of keys, and the log-sum-exp of its scores, so that results
    over disjoint key sets merge exactly (merge_partial_attention). Every row must see a key."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def merge_partial_attention(outputs: Tensor, lse: Tensor) -> Tensor:
    """outputs (..., n, d_v) of attention over n disjoint key sets, lse (..., n) their log-sum-exps
    (-inf for an empty set) -> attention over the union: sum_i o_i exp(lse_i - logsumexp(lse)), the
    combination FlashAttention uses across key tiles."""
    return (torch.softmax(lse, dim=-1)[..., None] * outputs).sum(-2)


SPARSE_MIN_KEYS = 1024
"""MoBA and NSA compute on their selected keys alone when a call sees at least this many keys; below
it they take the dense-mask path, which is faster there on a CPU (the gathering and grouping are many
small operations), and equal (tests/test_attention.py). Forward + backward of one layer, d 192, 2,048
tokens a batch, 1 thread, sparse vs dense ms: MoBA (blocks of 32, top-3) 271 vs 50 at T = 128, 164 vs
135 at 512, 170 vs 367 at 1024; NSA (blocks of 16, window 64) 533 vs 233 at 512, 588 vs 734 at 1024
(one run of a throwaway script; benchmarks/sparse_attention.py times both paths at 1k-8k)."""

GATHER_MAX_NUMBERS = 1 << 18
"""block_sparse_attention gathers the chosen keys per query up to this many numbers (1 MB in fp32)"""


def _gathered_block_attention(q: Tensor, k: Tensor, v: Tensor, picked: Tensor, picked_ok: Tensor, block: int,
                              pos: int, scale: float) -> Tensor:
    """block_sparse_attention for few queries: each gathers the keys of its n + 1 blocks (own last)
    straight from k and v (no padded copy of the cache)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    batch_index = torch.arange(B, device=q.device)[:, None, None, None, None]
    kv_head = (torch.arange(H, device=q.device) // (H // k.shape[1]))[None, :, None, None, None]
    q_pos = torch.arange(pos, pos + T, device=q.device)
    own = block_index(q_pos, block).expand(B, H, T)[..., None]
    blocks = torch.cat([picked, own], dim=-1)  # (B, H, T, n + 1)
    ok = torch.cat([picked_ok, torch.ones_like(own, dtype=torch.bool)], dim=-1)
    key_pos = blocks[..., None] * block + torch.arange(block, device=q.device)  # (B, H, T, n + 1, block)
    # an earlier block lies wholly before the query: "not after it" only cuts into the own block
    mask = (ok[..., None] & (key_pos <= q_pos[:, None, None])).flatten(3, 4)
    index = (batch_index, kv_head, key_pos.clamp(max=S - 1))  # positions past the end are masked
    keys, values = k[index].flatten(3, 4), v[index].flatten(3, 4)  # (B, H, T, (n + 1) block, d)
    scores = (q[..., None, :] @ keys.transpose(-2, -1)).squeeze(-2) * scale
    return (masked_softmax(scores, mask)[..., None, :] @ values).squeeze(-2)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, picked: Tensor, picked_ok: Tensor, block: int,
                           pos: int, scale: float) -> Tensor:
    """Attention of each query to the keys of the earlier blocks it picked and, causally, to its own
    block, computed on those keys alone: T (n + 1) block scores instead of T S. Equal to
    masked_attention with the mask "key in a picked block, or in the query's own block and not after
    it" (the dense reference the tests compare with).

    q (B, H, T, d) at positions pos .. pos + T - 1; k, v (B, H_kv, S, d / d_v), query head h reading kv
    head h // (H / H_kv); picked (B, H, T, n) indices of earlier blocks, picked_ok (B, H, T, n) False
    for a slot that picked nothing (fewer earlier blocks than slots). -> (B, H, T, d_v).

    Few queries (decoding) gather their blocks' keys and attend in one product. Many queries (a
    prompt, training) would gather far more than the keys hold; there, as in MoBA's own kernel, the
    work is grouped by key block so that it runs as matrix products: the own blocks as one batched
    (block x block) causal product, then for each earlier block the queries that picked it against
    its keys; the partial results merge by their log-sum-exps."""
    B, H, T, d = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    group = H // H_kv
    n = picked.shape[-1]
    if B * H * T * (n + 1) * block * max(d, v.shape[-1]) <= GATHER_MAX_NUMBERS:
        return _gathered_block_attention(q, k, v, picked, picked_ok, block, pos, scale)
    n_blocks = -(-S // block)
    pad = (0, 0, 0, n_blocks * block - S)
    k_blocks = F.pad(k, pad).view(B, H_kv, n_blocks, block, d)
    v_blocks = F.pad(v, pad).view(B, H_kv, n_blocks, block, -1)
    outputs = q.new_zeros(B, H, T, n + 1, v.shape[-1])
    lse = q.new_full((B, H, T, n + 1), float("-inf"))

    # own blocks: align the queries to block boundaries (dummy queries before pos and after the end,
    # dropped afterwards), then one batched product of each query block with its key block
    lead = pos % block
    first = pos // block
    n_q_blocks = -(-(lead + T) // block)
    q_aligned = F.pad(q, (0, 0, lead, n_q_blocks * block - lead - T)).view(B, H, n_q_blocks, block, d)
    own_keys = k_blocks[:, :, first:first + n_q_blocks].repeat_interleave(group, dim=1)
    own_values = v_blocks[:, :, first:first + n_q_blocks].repeat_interleave(group, dim=1)
    within = torch.arange(block, device=q.device)
    causal = within[None, :] <= within[:, None]  # a dummy query before pos still sees its own slot
    o_own, lse_own = attend_with_lse(q_aligned, own_keys, own_values, causal, scale)
    outputs[..., n, :] = o_own.flatten(2, 3)[:, :, lead:lead + T]
    lse[..., n] = lse_own.flatten(2, 3)[:, :, lead:lead + T]

    # earlier blocks: for each (batch, head, block), the queries that picked it
    for b in range(B):
        for h in range(H):
            query, slot = picked_ok[b, h].nonzero(as_tuple=True)
            chosen = picked[b, h, query, slot]
            order = chosen.argsort()
            query, slot, chosen = query[order], slot[order], chosen[order]
            blocks, counts = torch.unique_consecutive(chosen, return_counts=True)
            queries = q[b, h, query].split(counts.tolist())
            parts = [attend_with_lse(qs, k_blocks[b, h // group, j], v_blocks[b, h // group, j], None, scale)
                     for qs, j in zip(queries, blocks.tolist())]
            if parts:
                outputs[b, h, query, slot] = torch.cat([o for o, _ in parts])
                lse[b, h, query, slot] = torch.cat([l for _, l in parts])
    return merge_partial_attention(outputs, lse)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, pos: int, scale: float) -> Tensor:
    """Each query at position p attends to the keys in (p - window, p], computed per chunk of `window`
    queries on the 2 window - 1 keys that chunk can see, not on all S: T (2 window) work instead of
    T S. Shapes as block_sparse_attention (k, v may have fewer heads)."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    out = []
    for t0 in range(0, T, window):
        first, end = pos + t0, pos + min(T, t0 + window)  # the chunk's query positions [first, end)
        lo = max(0, first - window + 1)
        q_pos = torch.arange(first, end, device=q.device)[:, None]
        k_pos = torch.arange(lo, end, device=q.device)[None, :]
        keys, values = (x[:, :, lo:end].repeat_interleave(group, dim=1) for x in (k, v))
        out.append(masked_attention(q[:, :, t0:t0 + window], keys, values,
                                    (k_pos <= q_pos) & (k_pos > q_pos - window), scale))
    return torch.cat(out, dim=2)


class MoBA(GroupedQueryAttention):
    """Mixture of Block Attention (Lu et al. 2025): the keys are cut into blocks of `moba_block_size`;
    each query head scores every earlier block by q . mean(K_block) and attends to the top-k blocks
    only, where its own (current) block is always one of the k, causal inside it. Same projections
    and cache as GQA. From SPARSE_MIN_KEYS keys on, the attention is computed on the chosen blocks
    alone (block_sparse_attention); below that, or with `sparse = False`, as a mask over all keys,
    the reference the tests compare with."""

    sparse = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.block, self.top_k = cfg.moba_block_size, cfg.moba_top_k

    def forward(self, x: Tensor, cache: dict | None = None, pos: int = 0, key_mask: Tensor | None = None) -> Tensor:
        no_padding(key_mask, "MoBA")
        q, k, v = self.project_qkv(x, cache, pos)
        B, H, T, _ = q.shape
        S = k.shape[2]
        q_block = block_index(torch.arange(pos, pos + T, device=x.device), self.block)  # (T,)
        k_block = block_index(torch.arange(S, device=x.device), self.block)  # (S,)
        n_blocks = int(k_block[-1]) + 1
        # gate: s_i = <q, mean-pooled keys of block i> (MoBA Eq. 5), only for blocks before the query's
        complete = S // self.block
        block_sum = k[:, :, :complete * self.block].unflatten(2, (complete, self.block)).sum(3)
        if complete < n_blocks:  # the last block is still filling
            block_sum = torch.cat([block_sum, k[:, :, complete * self.block:].sum(2, keepdim=True)], dim=2)
        block_keys = block_sum / torch.bincount(k_block, minlength=n_blocks).to(k.dtype)[:, None]
        gate = q @ self.expand_kv(block_keys).transpose(-2, -1)  # (B, H, T, n_blocks)
        past = torch.arange(n_blocks, device=x.device)[None, :] < q_block[:, None]  # (T, n_blocks)
        gate = gate.masked_fill(~past, float("-inf"))
        n_past = min(self.top_k - 1, n_blocks)  # the current block takes one of the k slots
        picked = gate.topk(n_past, dim=-1).indices  # (B, H, T, n_past); may pick -inf entries when
        picked_ok = past.expand(B, H, T, n_blocks).gather(-1, picked)  # fewer past blocks exist than slots
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.sparse and S >= SPARSE_MIN_KEYS:
            return self.merge_heads(block_sparse_attention(q, k, v, picked, picked_ok, self.block, pos, scale))
        chosen = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, picked, picked_ok)
        # token mask: key in a chosen past block, or in the query's own block and not in its future
        key_in_chosen = chosen.gather(-1, k_block.expand(B, H, T, S))
        own_block = (k_block[None, :] == q_block[:, None]) & causal_mask(T, pos, x.device)
        y = masked_attention(q, self.expand_kv(k), self.expand_kv(v), key_in_chosen | own_block, scale)
        return self.merge_heads(y)


# ------------------------------------------------------------------------------------------ NSA

NSA_BRANCHES = ("cmp", "slc", "win")


class NativeSparseAttention(_CachedAttention):
    """Native Sparse Attention (Yuan et al. 2025), Eq. 5: o_t = sum_c g_t^c Attn(q_t, K_t^c, V_t^c)
    over three branches, each with its own keys/values, gates g = sigmoid(W_g x) per head:

    - cmp: every complete block of `nsa_block_size` keys is compressed to one key/value by a learned
      map phi (here one linear layer over the block plus an intra-block position embedding;
      block length = stride); a query sees the compressed tokens of earlier blocks (Eq. 7).
    - slc: the compressed branch's attention probabilities, summed over the heads of a GQA group,
      rank the earlier blocks (Eqs. 8-9); the top `nsa_top_k` blocks plus the query's own block
      (causal inside it) are attended at full resolution (Eqs. 10-12).
    - win: a sliding window over the last `nsa_window` tokens.

    Cache per token: raw K and V of the three branches; the compressed tokens are recomputed from
    the cached raw cmp keys/values (a production kernel would cache them too: 1/l extra).

    From SPARSE_MIN_KEYS keys on, the selection and window branches are computed on their keys alone
    (block_sparse_attention, sliding_window_attention); below that, or with `sparse = False`, as masks
    over all keys, the reference the tests compare with. The compressed branch is dense over S / l
    compressed tokens, as in the paper."""

    sparse = True

    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = hd = cfg.n_embd // cfg.n_head
        self.block, self.top_k, self.window = cfg.nsa_block_size, cfg.nsa_top_k, cfg.nsa_window
        self.wq = nn.Linear(cfg.n_embd, self.n_head * hd, bias=False)
        kv_dim = self.n_kv_head * hd
        self.wk = nn.ModuleDict({b: nn.Linear(cfg.n_embd, kv_dim, bias=False) for b in NSA_BRANCHES})
        self.wv = nn.ModuleDict({b: nn.Linear(cfg.n_embd, kv_dim, bias=False) for b in NSA_BRANCHES})
        self.block_pos = nn.Parameter(torch.zeros(self.block, hd))  # intra-block position encoding
        self.compress_k = nn.Linear(self.block * hd, hd, bias=False)  # phi for keys
        self.compress_v = nn.Linear(self.block * hd, hd, bias=False)  # phi for values
        self.gate = nn.Linear(cfg.n_embd, self.n_head * len(NSA_BRANCHES))
        self.wo = nn.Linear(self.n_head * hd, cfg.n_embd, bias=False)
        self.rope = Rotary(hd, cfg.block_size, cfg.rope_theta)

    def cache_shapes(self):
        kv = (self.n_kv_head, self.head_dim)
        return {f"{kind}_{b}": kv for b in NSA_BRANCHES for kind in ("k", "v")}

    def cache_bytes_per_token(self) -> int:
        return len(NSA_BRANCHES) * 2 * self.n_kv_head * self.head_dim * self.element_size()

    def compress(self, x: Tensor, phi: nn.Linear) -> Tensor:
        """(B, h, S, d) -> (B, h, S // l, d): one token per complete block, phi(block + positions)."""
        B, h, S, d = x.shape
        n = S // self.block
        blocks = x[:, :, :n * self.block].reshape(B, h, n, self.block, d) + self.block_pos
        return phi(blocks.flatten(-2))

    def forward(self, x: Tensor, cache: dict | None = None, pos: int = 0, key_mask: Tensor | None = None) -> Tensor:
        no_padding(key_mask, "NSA")
        B, T, _ = x.shape
        H, hd, group = self.n_head, self.head_dim, self.n_head // self.n_kv_head
        q = self.rope(self.wq(x).view(B, T, H, hd).transpose(1, 2), pos)
        kv = {}
        for b in NSA_BRANCHES:
            kv[f"k_{b}"] = self.rope(self.wk[b](x).view(B, T, self.n_kv_head, hd).transpose(1, 2), pos)
            kv[f"v_{b}"] = self.wv[b](x).view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if cache is not None:
            kv = write_cache(cache, pos, **kv)
        S = pos + T
        scale = 1.0 / math.sqrt(hd)
        q_pos = torch.arange(pos, S, device=x.device)
        k_pos = torch.arange(S, device=x.device)
        q_block, k_block = block_index(q_pos, self.block), block_index(k_pos, self.block)
        causal = causal_mask(T, pos, x.device)

        # compressed branch: attend to the compressed tokens of strictly earlier blocks
        k_cmp = self.compress(kv["k_cmp"], self.compress_k).repeat_interleave(group, dim=1)
        v_cmp = self.compress(kv["v_cmp"], self.compress_v).repeat_interleave(group, dim=1)
        n_cmp = k_cmp.shape[2]
        earlier = torch.arange(n_cmp, device=x.device)[None, :] < q_block[:, None]  # (T, n_cmp)
        p_cmp = masked_softmax((q @ k_cmp.transpose(-2, -1)) * scale, earlier)  # (B, H, T, n_cmp)
        o_cmp = p_cmp @ v_cmp

        # selection branch: rank earlier blocks by p_cmp summed over each GQA group (shared choice)
        importance = p_cmp.view(B, self.n_kv_head, group, T, n_cmp).sum(2)
        importance = importance.masked_fill(~earlier, float("-inf"))
        n_pick = min(self.top_k, n_cmp)
        picked = importance.topk(n_pick, dim=-1).indices.repeat_interleave(group, dim=1)  # (B, H, T, n_pick)
        picked_ok = earlier.expand(B, H, T, n_cmp).gather(-1, picked)  # -inf picks: fewer earlier blocks
        if self.sparse and S >= SPARSE_MIN_KEYS:
            o_slc = block_sparse_attention(q, kv["k_slc"], kv["v_slc"], picked, picked_ok, self.block, pos, scale)
            o_win = sliding_window_attention(q, kv["k_win"], kv["v_win"], self.window, pos, scale)
        else:
            n_blocks = int(k_block[-1]) + 1  # the last block may still be incomplete (never "earlier")
            chosen = torch.zeros(B, H, T, n_blocks, dtype=torch.bool, device=x.device).scatter_(-1, picked, picked_ok)
            key_chosen = chosen.gather(-1, k_block.expand(B, H, T, S))
            own_block = (k_block[None, :] == q_block[:, None]) & causal
            o_slc = masked_attention(q, kv["k_slc"].repeat_interleave(group, dim=1),
                                     kv["v_slc"].repeat_interleave(group, dim=1), key_chosen | own_block, scale)
            # sliding-window branch: the last `window` tokens
            in_window = causal & (k_pos[None, :] > q_pos[:, None] - self.window)
            o_win = masked_attention(q, kv["k_win"].repeat_interleave(group, dim=1),
                                     kv["v_win"].repeat_interleave(group, dim=1), in_window, scale)

        g = torch.sigmoid(self.gate(x)).view(B, T, H, len(NSA_BRANCHES)).permute(0, 2, 1, 3)
        y = g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win  # NSA Eq. 5
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))


# ------------------------------------------------------------------------------------- factory

def build_attention(cfg) -> _CachedAttention:
    variants = {"gqa": GroupedQueryAttention, "mla": MultiHeadLatentAttention, "moba": MoBA,
                "nsa": NativeSparseAttention}
    return variants[cfg.attention](cfg)
