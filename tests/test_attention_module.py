"""Values of the attention-variants module (pre_train/llm/attention): cache sizes against hand-computed
closed forms, the per-arch configs, and one toy run."""
from __future__ import annotations


import pytest
import torch

from conftest import read_metrics
from core.nn.model import Transformer
from pre_train.llm.attention.code.attention import ARCHS, Config, measured_cache_bytes_per_token, model_config
from pre_train.llm.attention.module import MODULE

TOY: Config = MODULE.presets["toy"]
FP32 = 4


def test_every_arch_has_the_same_width_and_depth_and_its_kv_heads():
    cfgs = {arch: model_config(arch, TOY, vocab_size=64) for arch in ARCHS}
    assert {(c.n_embd, c.n_layer, c.n_head, c.block_size) for c in cfgs.values()} == {
        (TOY.n_embd, TOY.n_layer, TOY.n_head, TOY.block_size)}
    assert cfgs["llama"].n_kv_head == TOY.n_head and cfgs["mqa"].n_kv_head == 1
    assert cfgs["gqa"].n_kv_head == TOY.gqa_kv_heads
    assert [cfgs[a].attention for a in ARCHS] == ["gqa", "gqa", "gqa", "mla", "moba", "nsa"]


@pytest.mark.parametrize("arch", ARCHS)
def test_allocated_cache_matches_a_hand_computed_formula(arch):
    cfg = model_config(arch, TOY, vocab_size=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    head_dim = cfg.n_embd // cfg.n_head
    per_layer = {  # elements per token and layer, written out independently of core/nn/attention.py
        "llama": 2 * cfg.n_head * head_dim,
        "gqa": 2 * TOY.gqa_kv_heads * head_dim,
        "mqa": 2 * head_dim,
        "mla": TOY.kv_lora_rank + head_dim // 2,  # latent c_kv + the shared RoPE key
        "moba": 2 * cfg.n_head * head_dim,
        "nsa": 3 * 2 * cfg.n_head * head_dim,  # K and V for each of the cmp, slc, win branches
    }[arch]
    expected = per_layer * FP32 * cfg.n_layer
    assert measured_cache_bytes_per_token(model, 7) == expected
    assert model.cache_bytes_per_token() == expected


def test_toy_run_reports_the_closed_forms_and_its_artifacts(run_module):
    result = run_module("attention", "toy")
    assert result.passed
    m = read_metrics(result)
    head_dim = TOY.n_embd // TOY.n_head
    assert m["cache_bytes_llama"] == 2 * TOY.n_head * head_dim * FP32 * TOY.n_layer
    assert m["cache_bytes_llama"] / m["cache_bytes_mqa"] == TOY.n_head
    assert m["mla_cache_from_config"] == (TOY.kv_lora_rank + head_dim // 2) * FP32 * TOY.n_layer
    assert m["params_mqa"] < m["params_gqa"] < m["params_llama"], "fewer kv heads, smaller W_K and W_V"
    assert m["params_moba"] == m["params_llama"], "MoBA adds no parameters: the gate is parameter-free"
    table = (result.out_dir / "table.md").read_text()
    assert all(label in table for label in ("MHA", "GQA", "MQA", "MLA", "MoBA", "NSA"))
    for plot in ("cache_bytes.png", "val_loss.png", "decode_speed.png"):
        assert (result.out_dir / plot).stat().st_size > 0
