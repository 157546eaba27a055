"""The shared training pieces (core/nn/training.py, core/data/corpus.py, core/nn/model.py): AdamW parameter
groups, the learning-rate schedule, the unigram baseline, FLOPs per token, scaled configs and the
safetensors save/load round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.artifacts import UserError
from core.data.corpus import unigram_entropy
from core.nn.model import NAMED_CONFIGS, Transformer, load_model, save_model, scaled_config
from core.nn.training import adamw_groups, cosine_lr

SMALL = dict(vocab_size=64, block_size=32, n_layer=2, n_embd=32, n_head=4)


def test_unigram_entropy_of_hand_made_tokens():
    assert unigram_entropy(np.array([0, 0, 1, 1]), 8) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([0, 1, 2, 3]), 4) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([5, 5, 5]), 8) == pytest.approx(0.0)
    p = np.array([3, 1]) / 4
    assert unigram_entropy(np.array([0, 0, 0, 1]), 2) == pytest.approx(-(p * np.log(p)).sum())


def test_learning_rate_warms_up_then_decays_to_the_floor():
    lrs = [cosine_lr(s, 1.0, 4, 20) for s in range(20)]  # the 20 steps of a 20-step run
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the peak at the last warmup step
    assert lrs.count(max(lrs)) == 1, "the peak is used by one step, not held for two"
    assert lrs[11] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway from step 3 to step 19: cos(pi/2) = 0
    assert lrs[19] == pytest.approx(0.1, abs=1e-12), "the last step uses the floor"
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert cosine_lr(25, 1.0, 4, 20, min_ratio=0.0) == pytest.approx(0.0)  # stays at the floor
    no_warmup = [cosine_lr(s, 1.0, 0, 10) for s in range(10)]
    assert no_warmup[0] == 1.0 and no_warmup[9] == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("tied", [True, False])
def test_adamw_groups_decay_matrices_only(tied):
    model = Transformer(scaled_config("llama", **SMALL, tie_embeddings=tied))
    decay, no_decay = adamw_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # a tied tensor is named once
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert not decayed & kept
    assert decayed | kept == set(names.values())
    assert "tok_emb.weight" in kept and all("norm" not in n for n in decayed)
    assert all(n.endswith("weight") and "norm" not in n for n in decayed)
    assert ("lm_head.weight" in decayed) is (not tied)  # untied: the head is an ordinary matrix
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.num_params()



def test_adamw_groups_do_not_decay_position_tables():
    """NSA's intra-block position table is 2-D but a learned embedding, not a linear layer's weight."""
    model = Transformer(scaled_config("nsa", **SMALL))
    decay, no_decay = adamw_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("block_pos") for p in no_decay["params"])
    assert not any(names[id(p)].endswith("block_pos") for p in decay["params"])
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])

def test_flops_per_token_is_6n_plus_attention_by_hand():
    cfg = scaled_config("llama", **SMALL)
    d, f, V, L, T, H = cfg.n_embd, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layer, cfg.block_size, cfg.n_head
    matmul_weights = L * (4 * d * d + 3 * d * f) + V * d  # q, k, v, o; SwiGLU w1, w2, w3; LM head
    attention = 6 * L * T * H * (2 * d // H)              # QK^T and AV, forward + backward
    assert Transformer(cfg).flops_per_token() == 6 * matmul_weights + attention


def test_moe_flops_count_only_the_active_experts():
    dense = Transformer(scaled_config("llama", **SMALL))
    moe_cfg = scaled_config("moe", **SMALL)
    moe = Transformer(moe_cfg)
    d, f = moe_cfg.n_embd, moe_cfg.moe_hidden
    # each layer swaps one SwiGLU (3 d f) for a router (d E) and top_k experts of 3 d f each
    extra = moe_cfg.n_layer * (d * moe_cfg.n_experts + (moe_cfg.moe_top_k - 1) * 3 * d * f)
    assert moe.flops_per_token() - dense.flops_per_token() == 6 * extra
    assert moe.num_params() > dense.num_params() * 2, "MoE parameters grow with the expert count"


@pytest.mark.parametrize("arch", sorted(NAMED_CONFIGS))
def test_scaled_configs_keep_each_arch_and_build(arch):
    cfg = scaled_config(arch, **SMALL)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.block_size) == (32, 2, 4, 32)
    assert cfg.attention == NAMED_CONFIGS[arch].attention and cfg.ffn == NAMED_CONFIGS[arch].ffn
    assert cfg.n_kv_head == {"gqa": 2, "mqa": 1}.get(arch, 4)
    logits = Transformer(cfg)(torch.randint(0, 64, (2, 32)))
    assert logits.shape == (2, 32, 64) and torch.isfinite(logits).all()


def test_save_and_load_round_trip_keeps_the_tie_and_the_logits(tmp_path):
    torch.manual_seed(0)
    model = Transformer(scaled_config("gqa", **SMALL))
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg and loaded.lm_head.weight is loaded.tok_emb.weight
    x = torch.randint(0, 64, (1, 16))
    assert torch.equal(loaded(x), model(x))


def test_a_corrupt_weights_file_is_named(tmp_path):
    save_model(Transformer(scaled_config("llama", **SMALL)), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model_config.json").write_text("{")
    with pytest.raises(UserError, match="model_config.json"):
        load_model(tmp_path)
