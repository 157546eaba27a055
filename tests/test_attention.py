"""Attention variants of core/nn/attention.py against independent references, in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.nn import attention
from core.nn.attention import (GroupedQueryAttention, MoBA, MultiHeadLatentAttention, NativeSparseAttention, apply_rope,
                               block_sparse_attention, masked_attention, rope_cos_sin, sliding_window_attention,
                               tensor_bytes)
from core.nn.fused import fused_linear
from core.nn.lora import LoRALinear
from core.nn.model import NAMED_CONFIGS, Transformer, named_config


@pytest.fixture(autouse=True)
def sparse_paths_at_test_sizes(monkeypatch):
    """The tests' few tokens are far below SPARSE_MIN_KEYS: take MoBA's and NSA's sparse paths anyway."""
    monkeypatch.setattr(attention, "SPARSE_MIN_KEYS", 0)

# tiny sizes shared by the model tests: 2 layers, width 32, 4 heads of 8, blocks of 4 tokens
TINY = dict(vocab_size=37, block_size=48, n_layer=2, n_head=4, n_embd=32, ffn_hidden=24,
            kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
            moba_block_size=4, moba_top_k=2, nsa_block_size=4, nsa_top_k=1, nsa_window=6,
            n_experts=4, moe_top_k=2, moe_hidden=16)


def tiny(arch: str = "llama", **overrides):
    """The named config at tiny size (n_kv_head stays the arch's own: 4, gqa 2, mqa 1)."""
    return named_config(arch, **{**TINY, **overrides})


def attention_module(cls, cfg, seed=0):
    torch.manual_seed(seed)
    module = cls(cfg).double()
    for p in module.parameters():  # random weights big enough that attention is far from uniform
        torch.nn.init.normal_(p, std=0.3)
    return module


def random_x(T: int, C: int = 32, B: int = 2, seed: int = 1):
    return torch.randn(B, T, C, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- references

def reference_rope(x, theta):
    """RoPE as a complex rotation of the pairs (x_i, x_{i+d/2}): z_i * e^{i m theta_i}."""
    T, d = x.shape[-2], x.shape[-1]
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None, :]
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def reference_gqa(x, wq, wk, wv, wo, n_head, n_kv_head, theta):
    """Head by head: query head h reads key/value head h // (n_head / n_kv_head); causal SDPA."""
    B, T, C = x.shape
    hd = C // n_head
    q = reference_rope((x @ wq.T).view(B, T, n_head, hd).transpose(1, 2), theta)
    k = reference_rope((x @ wk.T).view(B, T, n_kv_head, hd).transpose(1, 2), theta)
    v = (x @ wv.T).view(B, T, n_kv_head, hd).transpose(1, 2)
    heads = []
    for h in range(n_head):
        g = h // (n_head // n_kv_head)
        heads.append(F.scaled_dot_product_attention(q[:, h], k[:, g], v[:, g], is_causal=True))
    return torch.cat(heads, dim=-1) @ wo.T


# ---------------------------------------------------------------------------------- RoPE

def test_rope_matches_complex_rotation():
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(8, 10, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, 10000.0), rtol=0, atol=1e-12)


def test_rope_score_depends_only_on_position_difference():
    d, L = 16, 40
    cos, sin = rope_cos_sin(d, L, 10000.0)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rq = apply_rope(q.expand(L, d), cos, sin)  # the same vector placed at every position
    rk = apply_rope(k.expand(L, d), cos, sin)
    for delta in (0, 3, 11):
        dots = torch.stack([rq[m] @ rk[m - delta] for m in range(delta, L)])
        torch.testing.assert_close(dots, dots[0].expand_as(dots), rtol=0, atol=1e-10)
    assert not torch.allclose(rq[5] @ rk[2], rq[5] @ rk[4])  # it does depend on the difference
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(L))  # a rotation keeps the norm



def test_rope_backward_is_the_inverse_rotation():
    """The hand-written backward against autograd's numerical Jacobian (float64)."""
    cos, sin = rope_cos_sin(8, 6, 10000.0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


# ------------------------------------------------------------------------------- fused projections

def test_fused_linear_equals_the_separate_projections_and_their_gradients():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, n, bias=False).double() for n in (16, 8, 8)]
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    fused = fused_linear(x, *layers)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    torch.testing.assert_close(fused, separate, rtol=0, atol=1e-12)
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, [x, *(l.weight for l in layers)], g)
    grads_separate = torch.autograd.grad(separate, [x, *(l.weight for l in layers)], g)
    for a, b in zip(grads_fused, grads_separate):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fused_linear_runs_wrapped_layers_through_their_own_forward():
    """A LoRA-wrapped projection is not an nn.Linear: its adapter must still be applied."""
    torch.manual_seed(0)
    q, k = torch.nn.Linear(8, 8, bias=False).double(), torch.nn.Linear(8, 4, bias=False).double()
    wrapped = LoRALinear(k, r=2, alpha=4).double()
    torch.nn.init.normal_(wrapped.lora_B, std=1.0)  # a non-zero update
    x = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(fused_linear(x, q, wrapped), torch.cat([q(x), wrapped(x)], -1), rtol=0, atol=0)
    assert not torch.allclose(wrapped(x), k(x))

# ------------------------------------------------------------------------------ MHA / GQA

@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_matches_head_by_head_reference(n_kv_head):
    """n_kv_head = n_head is MHA; the reference is written independently (complex RoPE, per-head loop)."""
    cfg = tiny(n_kv_head=n_kv_head)
    attn = attention_module(GroupedQueryAttention, cfg)
    x = random_x(10)
    expected = reference_gqa(x, attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.wo.weight,
                             cfg.n_head, n_kv_head, cfg.rope_theta)
    torch.testing.assert_close(attn(x, None, 0), expected, rtol=0, atol=1e-10)
    _, k, v = attn.project_qkv(x, None, 0)
    assert k.shape[1] == v.shape[1] == n_kv_head, "K/V stay at the kv heads: no copy per query head"


# ----------------------------------------------------------------------------------- MLA

@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_mla_absorbed_path_equals_naive_path(q_lora_rank):
    cfg = tiny("mla", q_lora_rank=q_lora_rank)
    mla = attention_module(MultiHeadLatentAttention, cfg)
    x = random_x(12)
    naive = mla(x, None, 0)  # no cache: the naive path
    # decoding the last 4 tokens after a prefill of 8 takes the absorbed path
    calls = []
    mla._absorbed = lambda *args, fn=mla._absorbed: calls.append(1) or fn(*args)
    cache = mla.init_cache(2, 12)
    mla(x[:, :8], cache, 0)
    assert not calls, "the prefill (nothing cached yet) expands its latents once: naive"
    decoded = torch.cat([mla(x[:, t:t + 1], cache, t) for t in range(8, 12)], dim=1)
    assert len(calls) == 4, "each decode step attends to the cached latents directly"
    torch.testing.assert_close(decoded, naive[:, 8:], rtol=0, atol=1e-10)
    mla.absorb = False  # the reference: re-expand the cache at every step
    cache = mla.init_cache(2, 12)
    mla(x[:, :8], cache, 0)
    torch.testing.assert_close(mla(x[:, 8:], cache, 8), naive[:, 8:], rtol=0, atol=1e-10)
    assert len(calls) == 4


def test_mla_cache_is_latent_plus_rope_key_only():
    cfg = tiny("mla")
    mla = attention_module(MultiHeadLatentAttention, cfg)
    cache = mla.init_cache(batch=3, max_len=20)
    assert {name: tuple(t.shape) for name, t in cache.items()} == {
        "c_kv": (3, 20, cfg.kv_lora_rank), "k_rope": (3, 20, cfg.qk_rope_head_dim)}
    x = random_x(5, B=3)
    mla(x, cache, 0)
    # what is cached is the normalised latent and the rotated shared key, recomputable from x
    c_kv, k_rope = mla.wkv_down(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
    torch.testing.assert_close(cache["c_kv"][:, :5], mla.kv_norm(c_kv))
    torch.testing.assert_close(cache["k_rope"][:, :5], mla.rope(k_rope, 0))
    assert cache["c_kv"][:, 5:].abs().sum() == 0
    assert mla.cache_bytes_per_token() == tensor_bytes(cache) / (3 * 20)
    assert mla.cache_bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 8  # float64


# ---------------------------------------------------------------------------------- MoBA

@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_moba_with_top_k_covering_all_blocks_is_full_causal_attention(n_kv_head):
    """With 2 kv heads MoBA copies each one to its query heads itself (expand_kv), while the dense GQA
    reference lets scaled_dot_product_attention group them: the two must pair the same heads."""
    T = 14  # 4 blocks of 4, the last incomplete
    cfg = tiny("moba", moba_top_k=4, n_kv_head=n_kv_head)
    moba = attention_module(MoBA, cfg)
    dense = attention_module(GroupedQueryAttention, cfg)
    dense.load_state_dict(moba.state_dict())
    x = random_x(T)
    torch.testing.assert_close(moba(x, None, 0), dense(x, None, 0), rtol=0, atol=1e-10)
    moba.top_k = 2  # sparse: now queries in the 3rd and 4th block skip some earlier blocks
    sparse = moba(x, None, 0)
    torch.testing.assert_close(sparse[:, :8], dense(x, None, 0)[:, :8], rtol=0, atol=1e-10)
    assert not torch.allclose(sparse[:, 8:], dense(x, None, 0)[:, 8:])



def reference_moba(q, k, v, block, top_k):
    """MoBA written query by query and head by head from the paper: query head h reads kv head
    h // (H / H_kv); its gate scores every earlier block by q . mean(keys of the block), takes the
    top_k - 1 of them, and attends to those blocks and causally to its own."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            keys, values = k[b, h // group], v[b, h // group]
            for t in range(T):
                own = t // block
                earlier = list(range(own))
                gates = torch.stack([q[b, h, t] @ keys[j * block:(j + 1) * block].mean(0) for j in earlier]) if earlier else None
                picked = sorted(gates.topk(min(top_k - 1, len(earlier))).indices.tolist()) if earlier else []
                seen = [i for j in picked for i in range(j * block, (j + 1) * block)] + list(range(own * block, t + 1))
                probs = torch.softmax(keys[seen] @ q[b, h, t] / math.sqrt(d), 0)
                out[b, h, t] = probs @ values[seen]
    return out


@pytest.mark.parametrize("gather_max", [0, 1 << 30], ids=["grouped-by-block", "gathered-per-query"])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_moba_matches_a_query_by_query_reference(n_kv_head, gather_max, monkeypatch):
    """Sparse (gathered blocks) and dense-mask MoBA against the loop above, with real sparsity: 5
    blocks of 4, each query keeps 1 earlier block."""
    cfg = tiny("moba", moba_top_k=2, n_kv_head=n_kv_head)
    moba = attention_module(MoBA, cfg)
    x = random_x(19)
    q, k, v = moba.project_qkv(x, None, 0)
    expected = moba.merge_heads(reference_moba(q, k, v, cfg.moba_block_size, cfg.moba_top_k))
    monkeypatch.setattr(attention, "GATHER_MAX_NUMBERS", gather_max)
    torch.testing.assert_close(moba(x, None, 0), expected, rtol=0, atol=1e-10)
    moba.sparse = False
    torch.testing.assert_close(moba(x, None, 0), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("gather_max", [0, 1 << 30], ids=["grouped-by-block", "gathered-per-query"])
def test_block_sparse_and_window_attention_equal_their_masks(gather_max, monkeypatch):
    """The gathered computations against masked_attention over all keys, queries starting mid-sequence
    (pos > 0, as in decoding), kv heads shared by 2 query heads, an incomplete last block."""
    B, H, H_kv, T, pos, d, block, window = 2, 4, 2, 7, 6, 8, 3, 4
    S = pos + T
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, d, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, H_kv, S, d, dtype=torch.float64, generator=g) for _ in range(2))
    q_pos, k_pos = torch.arange(pos, S), torch.arange(S)
    causal = k_pos[None, :] <= q_pos[:, None]
    expand = lambda t: t.repeat_interleave(H // H_kv, dim=1)  # noqa: E731
    scale = 0.3
    in_window = causal & (k_pos[None, :] > q_pos[:, None] - window)
    torch.testing.assert_close(sliding_window_attention(q, k, v, window, pos, scale),
                               masked_attention(q, expand(k), expand(v), in_window, scale), rtol=0, atol=1e-12)
    # each query picks 2 different earlier blocks at random, the second slot empty where only one exists
    own = q_pos // block
    picks = []
    for o in own.tolist():
        first = torch.randint(0, max(o, 1), (B, H), generator=g)
        second = (first + 1 + torch.randint(0, max(o - 1, 1), (B, H), generator=g)) % max(o, 1)
        picks.append(torch.stack([first, second], dim=-1))
    picked = torch.stack(picks, dim=2)  # (B, H, T, 2)
    picked_ok = (own[None, None, :, None] > 0).expand(B, H, T, 2).clone()
    picked_ok[..., 1] &= own > 1
    chosen = torch.zeros(B, H, T, -(-S // block), dtype=torch.bool).scatter_(-1, picked, picked_ok)
    mask = chosen.gather(-1, (k_pos // block).expand(B, H, T, S)) | ((k_pos // block)[None, :] == own[:, None]) & causal
    monkeypatch.setattr(attention, "GATHER_MAX_NUMBERS", gather_max)
    for t in (q, k, v):
        t.requires_grad_(True)
    sparse = block_sparse_attention(q, k, v, picked, picked_ok, block, pos, scale)
    dense = masked_attention(q, expand(k), expand(v), mask, scale)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-12)
    g = torch.randn(dense.shape, dtype=torch.float64, generator=g)  # training backpropagates through it too
    for a, b in zip(torch.autograd.grad(sparse, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

def test_moba_gate_picks_the_block_with_the_largest_mean_key():
    """One head, keys constant per block: the query must attend its own block + the best block."""
    cfg = tiny("moba", n_head=1, n_kv_head=1, n_embd=8, moba_top_k=2, moba_block_size=2)
    moba = MoBA(cfg).double()
    hd = 8
    with torch.no_grad():  # identity projections, no RoPE, so q = k = v = x
        for w in (moba.wq, moba.wk, moba.wv, moba.wo):
            w.weight.copy_(torch.eye(hd))
    moba.rope.cos.fill_(1.0)
    moba.rope.sin.fill_(0.0)
    e = torch.eye(hd, dtype=torch.float64)
    # blocks: [e0,e0], [e1,e1], [e2,e2], query block [e1+e2*0.1, e1]: block 1 scores highest
    x = torch.stack([e[0], e[0], e[1], e[1], e[2], e[2], e[1] + 0.1 * e[2], e[1]])[None]
    out = moba(x, None, 0)[0, 7]
    # token 7 sees keys 2, 3 (block 1) and 6, 7 (its own block, causal): all values mix e1, e2 only
    keys = x[0, [2, 3, 6, 7]]
    expected = torch.softmax(keys @ x[0, 7] / math.sqrt(hd), 0) @ keys
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------- NSA

@pytest.mark.parametrize("gather_max", [0, 1 << 30], ids=["grouped-by-block", "gathered-per-query"])
def test_nsa_sparse_branches_equal_their_dense_masks(gather_max, monkeypatch):
    """Selection (1 of up to 4 earlier blocks + its own) and a window of 6 over 19 tokens, 2 kv heads,
    computed on their keys alone, against the same branches as masks over all keys; also decoding."""
    cfg = tiny("nsa", n_kv_head=2)
    nsa = attention_module(NativeSparseAttention, cfg)
    x = random_x(19)
    nsa.sparse = False
    dense = nsa(x, None, 0)
    nsa.sparse = True
    monkeypatch.setattr(attention, "GATHER_MAX_NUMBERS", gather_max)
    torch.testing.assert_close(nsa(x, None, 0), dense, rtol=0, atol=1e-10)
    cache = nsa.init_cache(2, 19)
    nsa(x[:, :11], cache, 0)
    torch.testing.assert_close(nsa(x[:, 11:], cache, 11), dense[:, 11:], rtol=0, atol=1e-10)


def test_nsa_reduces_to_full_attention_when_selection_covers_all_and_only_it_is_gated():
    cfg = tiny("nsa", nsa_top_k=8, n_kv_head=2)
    nsa = attention_module(NativeSparseAttention, cfg)
    with torch.no_grad():  # gate logits -inf / +inf / -inf: g_cmp = 0, g_slc = 1, g_win = 0 exactly
        nsa.gate.weight.zero_()
        nsa.gate.bias.copy_(torch.tensor([-math.inf, math.inf, -math.inf]).repeat(cfg.n_head))
    dense = attention_module(GroupedQueryAttention, cfg)
    with torch.no_grad():
        dense.wq.weight.copy_(nsa.wq.weight)
        dense.wk.weight.copy_(nsa.wk["slc"].weight)
        dense.wv.weight.copy_(nsa.wv["slc"].weight)
        dense.wo.weight.copy_(nsa.wo.weight)
    x = random_x(15)
    torch.testing.assert_close(nsa(x, None, 0), dense(x, None, 0), rtol=0, atol=1e-10)
    nsa.top_k = 1  # one earlier block only: queries from the 3rd block on lose some keys
    assert not torch.allclose(nsa(x, None, 0)[:, 8:], dense(x, None, 0)[:, 8:])


def test_nsa_sliding_window_branch_alone_is_local_attention():
    cfg = tiny("nsa", n_kv_head=4, nsa_window=3)
    nsa = attention_module(NativeSparseAttention, cfg)
    with torch.no_grad():
        nsa.gate.weight.zero_()
        nsa.gate.bias.copy_(torch.tensor([-math.inf, -math.inf, math.inf]).repeat(cfg.n_head))
    x = random_x(9, B=1)
    B, T, H, hd = 1, 9, cfg.n_head, 8
    q = nsa.rope(nsa.wq(x).view(B, T, H, hd).transpose(1, 2), 0)
    k = nsa.rope(nsa.wk["win"](x).view(B, T, H, hd).transpose(1, 2), 0)
    v = nsa.wv["win"](x).view(B, T, H, hd).transpose(1, 2)
    rows = []
    for t in range(T):  # query t sees keys t-2, t-1, t
        lo = max(0, t - 2)
        p = torch.softmax(q[:, :, t:t + 1] @ k[:, :, lo:t + 1].transpose(-2, -1) / math.sqrt(hd), -1)
        rows.append(p @ v[:, :, lo:t + 1])
    expected = nsa.wo(torch.cat(rows, dim=2).transpose(1, 2).reshape(B, T, H * hd))
    torch.testing.assert_close(nsa(x, None, 0), expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------- cache bytes

@pytest.mark.parametrize("arch", list(NAMED_CONFIGS))
def test_cache_bytes_per_token_equals_measured_cache_tensors(arch):
    model = Transformer(tiny(arch))
    caches = model.init_cache(batch=2, max_len=16)
    measured = sum(tensor_bytes(c) for c in caches) / (2 * 16)
    assert model.cache_bytes_per_token() == measured
    assert all(t.dtype == torch.float32 for c in caches for t in c.values())


def test_cache_ordering_mqa_gqa_mha_and_the_formulas():
    bytes_of = {arch: Transformer(tiny(arch)).cache_bytes_per_token() for arch in NAMED_CONFIGS}
    assert bytes_of["mqa"] < bytes_of["gqa"] < bytes_of["llama"]
    L, hd, fp32 = 2, 8, 4
    assert bytes_of["llama"] == L * 2 * 4 * hd * fp32  # 2 (K and V) * n_kv_head * head_dim
    assert bytes_of["gqa"] == L * 2 * 2 * hd * fp32
    assert bytes_of["mqa"] == L * 2 * 1 * hd * fp32
    assert bytes_of["mla"] == L * (TINY["kv_lora_rank"] + TINY["qk_rope_head_dim"]) * fp32
    assert bytes_of["moba"] == bytes_of["llama"]  # MoBA saves compute, not cache: all keys may be chosen
    assert bytes_of["nsa"] == 3 * bytes_of["llama"]  # K and V for each of its three branches
    assert bytes_of["moe"] == bytes_of["llama"] and bytes_of["deepseek_v2"] == bytes_of["mla"]
