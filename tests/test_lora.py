"""LoRA / QLoRA (core/nn/lora.py): the identities a correct adapter keeps (equal to the base at init,
merged = unmerged, only adapters train), NF4 against uniform int4, double quantisation's bytes and
error, and adapter files that round-trip or are refused."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import CorruptArtifact, UserError
from core.nn.lora import (ADAPTER_NAMES, ATTENTION_TARGETS, INT4_CODE, NF4_CODE, LoRALinear, NF4Linear, add_lora,
                          load_adapter, lora_layers, lora_state_dict, merge_lora, quantize_int4, quantize_nf4,
                          save_adapter, trainable_share)
from core.nn.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=37, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=64)


def base_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def tokens(seed: int = 1, B: int = 4, T: int = 12) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model: nn.Module, steps: int = 5) -> None:
    """A few Adam steps of next-token loss on random tokens: enough to make every B non-zero."""
    torch.manual_seed(2)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        idx = tokens(seed=10 + step)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def lora_model(seed: int = 0, **kwargs) -> Transformer:
    torch.manual_seed(seed + 100)
    return add_lora(base_model(seed), **{"r": 4, "alpha": 8.0, **kwargs})


def test_lora_model_equals_its_base_bit_exactly_at_init():
    base = base_model()
    model = add_lora(copy.deepcopy(base), r=4, alpha=8.0, dropout=0.1).train()  # dropout on: B = 0 anyway
    idx = tokens()
    assert torch.equal(model(idx), base(idx))
    layer = model.blocks[0].attn.wq
    assert isinstance(layer, LoRALinear) and torch.count_nonzero(layer.lora_B) == 0


def test_lora_a_has_the_reference_init():
    # loralib's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from the same stream
    base = nn.Linear(32, 16, bias=False)
    torch.manual_seed(5)
    layer = LoRALinear(base, r=4, alpha=8.0)
    torch.manual_seed(5)
    expected = torch.empty(4, 32).uniform_(-1 / math.sqrt(32), 1 / math.sqrt(32))
    torch.testing.assert_close(layer.lora_A.detach(), expected)
    assert layer.scaling == 2.0


def test_only_adapters_train_and_the_share_is_the_hand_count():
    base_params = base_model().num_params()
    # tied embedding 37*32 = 1184; per layer two norms 64, wq 32*32, wk and wv 32*16, wo 32*32,
    # w1 w3 32*64, w2 64*32; final norm 32
    assert base_params == 1184 + 2 * (64 + 1024 + 512 + 512 + 1024 + 3 * 2048) + 32 == 19776
    model = lora_model()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.rpartition(".")[2] in ADAPTER_NAMES for name in trainable)
    # r (in + out) per adapted matrix, r = 4: wq 4*64, wk wv 4*48, wo 4*64, w1 w3 w2 4*96
    adapter = 2 * (256 + 192 + 192 + 256 + 3 * 384)
    assert sum(model.get_parameter(name).numel() for name in trainable) == adapter == 4096
    assert trainable_share(model) == adapter / (base_params + adapter)
    # QLoRA: same adapters, an NF4 weight counted by its number of values
    assert trainable_share(lora_model(quantize=True)) == adapter / (base_params + adapter)
    # attention only
    assert trainable_share(lora_model(targets=ATTENTION_TARGETS)) == 1792 / (base_params + 1792)


def test_targets_are_the_model_attribute_names():
    model = lora_model()
    assert {name.rpartition(".")[2] for name in lora_layers(model)} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    assert not isinstance(model.lm_head, LoRALinear) and model.lm_head.weight is model.tok_emb.weight
    # MLA has no wk / wv (its keys and values come from wkv_down, wk_up, wv_up); MoE experts are adapted,
    # the router is not
    torch.manual_seed(0)
    moe = dataclasses.replace(CFG, attention="mla", ffn="moe", n_experts=2, moe_top_k=1, moe_hidden=16,
                              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    names = set(lora_layers(add_lora(Transformer(moe), r=2, alpha=2.0)))
    assert {"blocks.0.attn.wq", "blocks.0.attn.wo", "blocks.0.ffn.experts.1.w2"} <= names
    assert not any(name.endswith(("router", "wk_up", "wkv_down")) for name in names)
    with pytest.raises(ValueError, match="q_proj"):
        add_lora(base_model(), r=4, alpha=8.0, targets=("q_proj",))  # Hugging Face names are not ours


def test_merged_weights_give_the_adapter_logits_and_unmerge_restores_w():
    model = lora_model(dropout=0.1)
    train_steps(model)
    layers = lora_layers(model).values()
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in layers)
    idx = tokens()
    with torch.no_grad():
        adapter_logits = model(idx)
        before = [layer.base.weight.clone() for layer in layers]
        for layer in layers:
            layer.merge()
        torch.testing.assert_close(model(idx), adapter_logits, atol=1e-5, rtol=0)
        merged = [layer.base.weight.clone() for layer in layers]
        for layer in layers:
            layer.unmerge()
        eps = torch.finfo(torch.float32).eps
        for w0, w1, layer in zip(before, merged, layers):
            # (W + dW) - dW: exact up to the rounding of W + dW and of the difference
            assert ((layer.base.weight - w0).abs() <= eps / 2 * (w1.abs() + w0.abs())).all()
            assert not torch.equal(w1, w0)
        torch.testing.assert_close(model(idx), adapter_logits, atol=1e-6, rtol=0)

        plain = merge_lora(model)  # back to the architecture's own nn.Linear layers
        assert not lora_layers(plain)
        torch.testing.assert_close(plain(idx), adapter_logits, atol=1e-5, rtol=0)
        fresh = Transformer(CFG).eval()
        fresh.load_state_dict(plain.state_dict())  # strict: same names and shapes as the base
        assert torch.equal(fresh(idx), plain(idx))


def test_nf4_reconstruction_error_is_below_uniform_int4():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    nf4 = ((quantize_nf4(w).dequantize() - w) ** 2).mean().item()
    int4 = ((quantize_int4(w).dequantize() - w) ** 2).mean().item()
    # measured: NF4 0.00845 (double-quantised scales), uniform int4 0.01151 (fp32 scales), blocks of 64
    assert nf4 < 0.0086 and int4 > 0.0114
    assert nf4 < 0.75 * int4


def test_every_code_value_round_trips_exactly():
    # four blocks of 64, each the 16 levels 4 times scaled by a power of two (so w / absmax is exact)
    scales = torch.tensor([1.0, 0.5, 4.0, 2.0 ** -6])
    w = (NF4_CODE.repeat(4)[None, :] * scales[:, None]).reshape(16, 16)
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(q.dequantize(), w)
    low, high = q.codes & 15, q.codes >> 4  # two indices per byte, the first value in the low nibble
    assert torch.equal(torch.stack([low, high], 1).flatten().long(), torch.arange(16).repeat(16))
    # equal scales survive double quantisation exactly (mean shift 0); a zero block stays 0
    same = NF4_CODE.repeat(8).reshape(8, 16) * 0.5
    assert torch.equal(quantize_nf4(same).dequantize(), same)
    assert torch.equal(quantize_nf4(torch.zeros(3, 64)).dequantize(), torch.zeros(3, 64))
    ints = (INT4_CODE.repeat(5)[:64][None, :] * scales[:, None]).reshape(4, 64)
    ints[:, -1] = scales  # each block holds +-1 * scale: absmax = scale
    assert torch.equal(quantize_int4(ints).dequantize(), ints)


def test_double_quantisation_is_small_error_and_4_127_bits():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    q = quantize_nf4(w)
    absmax = w.reshape(-1, 64).abs().amax(1)  # the blocks: 64 consecutive values of the flat tensor
    rel = (q.absmax.dequantize() - absmax).abs() / absmax
    assert rel.max() < 0.006  # measured 0.39% at most, 0.13% on average
    # measured from the tensors: 65536 / 2 code bytes + 1024 int8 scales + 4 fp32 steps + 1 fp32 mean
    assert q.nbytes == 32768 + 1024 + 4 * 4 + 4
    assert 4.127 < q.bits_per_param < 4.2  # 4.1274; the paper's 4.127 plus the mean and the partial block
    plain = quantize_nf4(w, double_quant=False)
    assert plain.nbytes == 32768 + 1024 * 4 and plain.bits_per_param == 4.5
    assert 4 * w.numel() / q.nbytes > 7.7  # vs fp32


def test_qlora_forward_is_the_dequantised_linear_plus_the_adapter():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = LoRALinear(NF4Linear(linear), r=4, alpha=8.0)
    x = torch.randn(3, 5, 64)
    w = quantize_nf4(linear.weight).dequantize()
    assert torch.equal(layer(x), F.linear(x, w, linear.bias))
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), F.linear(x, w + layer.delta_weight(), linear.bias), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="NF4"):
        layer.merge()


def test_qlora_model_trains_only_adapters_and_merges():
    model = lora_model(quantize=True)
    assert all(isinstance(layer.base, NF4Linear) for layer in lora_layers(model).values())
    assert {b.dtype for name, b in model.named_buffers() if name.endswith(".codes")} == {torch.uint8}
    train_steps(model)
    assert all(p.grad is None for name, p in model.named_parameters() if name.rpartition(".")[2] not in ADAPTER_NAMES)
    idx = tokens()
    with torch.no_grad():
        logits = model(idx)
        torch.testing.assert_close(merge_lora(model)(idx), logits, atol=1e-5, rtol=0)


def test_adapter_round_trips_bit_exactly(tmp_path):
    model = lora_model()
    train_steps(model)
    path = save_adapter(model, tmp_path / "adapter.safetensors")
    from safetensors.torch import load_file
    assert load_file(str(path)).keys() == lora_state_dict(model).keys()  # the adapter alone
    other = lora_model(seed=0)  # the same base, another adapter init
    other.blocks[0].attn.wq.lora_A.data.add_(1.0)
    load_adapter(other, path)
    for name, t in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[name], t)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(other(idx), model(idx))


def test_a_mismatched_adapter_is_refused_naming_the_file(tmp_path):
    path = save_adapter(lora_model(), tmp_path / "r4.safetensors")
    with pytest.raises(UserError, match=r"r4\.safetensors.*lora_A is \(4, 32\), the model's \(2, 32\)"):
        load_adapter(lora_model(r=2), path)
    with pytest.raises(UserError, match=r"r4\.safetensors.*unexpected blocks\.0\.ffn\.w1\.lora_A"):
        load_adapter(lora_model(targets=ATTENTION_TARGETS), path)
    with pytest.raises(UserError, match=r"r4\.safetensors.*lora_alpha"):
        load_adapter(lora_model(alpha=16.0), path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptArtifact, match="junk.safetensors"):
        load_adapter(lora_model(), junk)
    with pytest.raises(CorruptArtifact, match="absent.safetensors"):
        load_adapter(lora_model(), tmp_path / "absent.safetensors")
