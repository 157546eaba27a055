"""The shared transformer (core/nn/model.py): norms, sampling filters, tying, parameter count, KV-cache
decoding for every named architecture, generation and the Hugging Face export."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import core.nn.loss as loss_module
from core.nn import attention
from core.nn.loss import linear_cross_entropy
from core.nn.model import NAMED_CONFIGS, Transformer, export_hf, top_k_filter, top_p_filter
from core.nn.moe import _GatedSiLU
from core.nn.norm import RMSNorm
from test_attention import reference_gqa, tiny


def random_model(arch: str, seed: int = 0, **overrides) -> Transformer:
    """float64 model with weights large enough that attention patterns are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(tiny(arch, **overrides)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def tokens(B: int, T: int, vocab: int = 37, seed: int = 3):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_rmsnorm_by_hand():
    norm = RMSNorm(2, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    rms = math.sqrt((3.0 ** 2 + 4.0 ** 2) / 2 + 1e-5)  # sqrt(12.5 + eps)
    out = norm(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[3.0 / rms, 2 * 4.0 / rms]], dtype=torch.float64))



def test_rmsnorm_backward_against_autograd_of_the_formula():
    """The hand-written backward: numerical Jacobian (gradcheck) and autograd through the formula."""
    torch.manual_seed(0)
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    g = torch.randn(2, 3, 6, dtype=torch.float64)
    ours = torch.autograd.grad(norm(x), [x, norm.weight], g)
    formula = norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    reference = torch.autograd.grad(formula, [x, norm.weight], g)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gated_silu_backward_against_autograd_of_the_formula():
    """SwiGLU's hand-written backward (one [dg | du] buffer) equals autograd through silu(g) * u."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GatedSiLU.apply, (x,))
    g = torch.randn(2, 3, 4, dtype=torch.float64)
    gate, up = x.chunk(2, dim=-1)
    ours, = torch.autograd.grad(_GatedSiLU.apply(x), x, g)
    reference, = torch.autograd.grad(F.silu(gate) * up, x, g)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_linear_cross_entropy_equals_the_loss_of_the_logits(monkeypatch, dtype):
    """The chunked loss fused with the LM head: the loss and both gradients equal F.cross_entropy of
    the full logits, over several chunks with a ragged last one, scaled by an upstream gradient."""
    monkeypatch.setattr(loss_module, "CHUNK_NUMBERS", 50 * 64)  # 64 rows per chunk: 300 rows = 4 full + 1
    torch.manual_seed(0)
    hidden = torch.randn(3, 100, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 50, (3, 100))
    ours = linear_cross_entropy(hidden, weight, targets)
    ours_grads = torch.autograd.grad(3.0 * ours, [hidden, weight])
    reference = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten())
    reference_grads = torch.autograd.grad(3.0 * reference, [hidden, weight])
    tol = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ours, reference, **tol)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), reference.detach(), **tol)


def test_model_with_targets_returns_the_loss_of_its_logits():
    """model(idx, targets=y) is the mean cross-entropy of model(idx), gradients included (tied head)."""
    model = random_model("llama")
    idx, y = tokens(2, 9), tokens(2, 9, seed=4)
    fused = model(idx, targets=y)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    plain = F.cross_entropy(model(idx).flatten(0, 1), y.flatten())
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0]])
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [[inf, 5.0, inf, inf, 4.0]]
    assert top_k_filter(logits, 10).tolist() == logits.tolist()


def test_top_p_filter_keeps_the_smallest_nucleus():
    logits = torch.tensor([[0.05, 0.5, 0.3, 0.15]]).log()
    # sorted: 0.5, 0.3 (cumulative 0.8), 0.15 (0.95), 0.05 (1.0); keep until the cumulative reaches p
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[True, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[True, False, False, True]]
    assert torch.isinf(top_p_filter(logits, 0.85)).tolist() == [[True, False, False, False]]
    assert torch.isinf(top_p_filter(logits, 0.01)).tolist() == [[True, False, True, True]]  # top token stays
    assert not torch.isinf(top_p_filter(logits, 1.0)).any()


def test_weight_tying_shares_one_tensor():
    tied = Transformer(tiny())
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = Transformer(tiny(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 37 * 32


@pytest.mark.parametrize("arch,tie", [("llama", True), ("gqa", False), ("mqa", True)])
def test_parameter_count_closed_form(arch, tie):
    cfg = tiny(arch, tie_embeddings=tie)
    V, C, L, H, Hkv, F_ = cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden
    hd = C // H
    attention = C * H * hd + 2 * C * Hkv * hd + H * hd * C  # W_q, W_k, W_v, W_o
    per_layer = attention + 3 * C * F_ + 2 * C  # SwiGLU's 3 matrices, 2 RMSNorm gains
    expected = V * C * (1 if tie else 2) + L * per_layer + C  # + final norm
    assert Transformer(cfg).num_params() == expected


@pytest.mark.parametrize("arch", list(NAMED_CONFIGS) + ["mla_naive_decode"])
def test_cached_decoding_equals_full_recomputation(arch):
    model = random_model("mla", mla_absorb=False) if arch == "mla_naive_decode" else random_model(arch)
    T = 19  # several MoBA / NSA blocks of 4, the last one incomplete
    idx = tokens(2, T)
    full = model(idx)
    caches = model.init_cache(batch=2, max_len=T)
    prefill = model(idx[:, :5], caches, pos=0)  # a 5-token prompt, then one token at a time
    torch.testing.assert_close(prefill, full[:, :5], rtol=0, atol=1e-9)
    for t in range(5, T):
        step = model(idx[:, t:t + 1], caches, pos=t)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-9, msg=f"position {t}")


def test_greedy_generate_with_cache_equals_greedy_loop_without_cache():
    model = random_model("gqa")
    prompt = tokens(2, 4)
    out = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    seq = prompt
    for _ in range(8):  # recompute everything from scratch at every step
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_with_a_generator_and_respects_top_k():
    model = random_model("mla")
    prompt = tokens(3, 3)
    a = model.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = model.generate(prompt, 10, temperature=0.0)
    assert torch.equal(a, greedy)  # top-1 sampling is greedy decoding
    b1 = model.generate(prompt, 10, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b2 = model.generate(prompt, 10, temperature=1.5, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(b1, b2)


def test_moe_aux_loss_is_summed_over_layers():
    model = random_model("moe")
    model(tokens(2, 8))
    per_layer = [b.ffn.aux_loss for b in model.blocks]
    torch.testing.assert_close(model.aux_loss, sum(per_layer))
    dense = random_model("llama")
    dense(tokens(2, 8))
    assert dense.aux_loss.item() == 0.0


def test_positions_beyond_block_size_are_refused():
    model = random_model("llama")
    with pytest.raises(ValueError, match="block_size"):
        model(tokens(1, 49))


# ---------------------------------------------------------------------------------- export

def hf_reference_forward(tensors: dict, config: dict, idx):
    """LlamaForCausalLM's forward written from the exported names and config.json alone."""
    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"])

    x = tensors["model.embed_tokens.weight"][idx]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, tensors[p + "input_layernorm.weight"])
        x = x + reference_gqa(h, *(tensors[p + f"self_attn.{n}_proj.weight"] for n in "qkvo"),
                              config["num_attention_heads"], config["num_key_value_heads"],
                              config["rope_theta"])
        h = rms(x, tensors[p + "post_attention_layernorm.weight"])
        gate, up = h @ tensors[p + "mlp.gate_proj.weight"].T, h @ tensors[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ tensors[p + "mlp.down_proj.weight"].T
    lm_head = tensors["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
    return rms(x, tensors["model.norm.weight"]) @ lm_head.T


@pytest.mark.parametrize("arch,tie", [("llama", True), ("gqa", False)])
def test_export_matches_an_independent_llama_forward(tmp_path, arch, tie):
    """The whole model against a forward pass rebuilt from the exported files only."""
    from safetensors.torch import load_file

    model = random_model(arch, tie_embeddings=tie)
    export_hf(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == model.cfg.n_kv_head
    assert ("lm_head.weight" in tensors) == (not tie)
    idx = tokens(2, 7)
    torch.testing.assert_close(hf_reference_forward(tensors, config, idx), model(idx), rtol=0, atol=1e-9)


def test_export_refuses_non_llama_architectures(tmp_path):
    with pytest.raises(ValueError, match="Llama architecture"):
        export_hf(random_model("mla"), tmp_path)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_transformers_loads_the_export_with_the_same_logits(tmp_path, tied):
    transformers = pytest.importorskip("transformers")
    model = random_model("gqa", tie_embeddings=tied).float()
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    idx = tokens(2, 11)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


CAUSAL_VARIANTS = [(arch, {}) for arch in NAMED_CONFIGS] + [
    ("mla", {"mla_absorb": False}), ("mla", {"q_lora_rank": 8}), ("llama", {"tie_embeddings": False}),
    ("moe", {"moe_renormalize": False}), ("moe", {"n_shared_experts": 1}), ("mqa", {"n_kv_head": 1}),
]


@pytest.mark.parametrize("arch,options", CAUSAL_VARIANTS, ids=[f"{a}-{o}" for a, o in CAUSAL_VARIANTS])
def test_no_logit_depends_on_a_later_token(arch, options):
    """Change every token from position t on: the logits before t must not move, for every
    architecture with every option (fp64, weights large enough for peaked attention and routing)."""
    model = random_model(arch, **options)
    T = 19
    idx = tokens(2, T)
    with torch.no_grad():
        full = model(idx)
        for t in (1, 4, 9, 16):
            changed = idx.clone()
            changed[:, t:] = (idx[:, t:] + 1 + torch.arange(T - t)) % 37
            other = model(changed)
            torch.testing.assert_close(other[:, :t], full[:, :t], rtol=0, atol=1e-10, msg=f"cut at {t}")
            assert not torch.allclose(other[:, t], full[:, t]), "the change itself must show"


@pytest.mark.parametrize("arch", ["moba", "nsa"])
def test_the_sparse_paths_do_not_depend_on_a_later_token_either(arch, monkeypatch):
    """At these few tokens MoBA and NSA take their dense-mask path (SPARSE_MIN_KEYS); force the
    block-sparse and window computations and hold them to the same cut."""
    monkeypatch.setattr(attention, "SPARSE_MIN_KEYS", 0)
    test_no_logit_depends_on_a_later_token(arch, {})
