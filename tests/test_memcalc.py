"""core/memory.py and scripts/memcalc.py against bytes measured on core/nn/model.py's Transformer: the
parameter count, the KV cache (the formula, the model's own cache_bytes_per_token and the tensors of
init_cache), the activations (every tensor autograd saves, with and without checkpointing), the ZeRO
shards the deepspeed module allocates, the ZeRO paper's published numbers, and the CLI's exit status."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from core.memory import (
    PRESETS, ModelShape, activation_bytes, kv_cache_bytes_per_token, paper_comm_bytes, paper_model_states,
    storage_bytes, training_model_states,
)
from core.nn.model import ModelConfig, Transformer, named_config
from core.paths import ROOT
from post_train.systems.deepspeed.code.deepspeed import AdamW, Zero
from scripts import memcalc

SMALL = dict(vocab_size=96, block_size=32, n_layer=2, n_embd=32, n_head=4, ffn_hidden=40)
CONFIGS = {"mha": ModelConfig(**SMALL, n_kv_head=4), "gqa": ModelConfig(**SMALL, n_kv_head=2),
           "mqa": ModelConfig(**SMALL, n_kv_head=1, tie_embeddings=False)}


def shape_of(cfg: ModelConfig) -> ModelShape:
    return ModelShape(vocab=cfg.vocab_size, d_model=cfg.n_embd, layers=cfg.n_layer, heads=cfg.n_head,
                      kv_heads=cfg.n_kv_head, ffn=cfg.ffn_hidden, tied=cfg.tie_embeddings)


@pytest.mark.parametrize("name", CONFIGS)
def test_the_parameter_count_is_the_models(name):
    cfg = CONFIGS[name]
    assert shape_of(cfg).param_count() == Transformer(cfg).num_params()


def test_the_presets_have_their_published_sizes():
    expected = {"llama-7b": 6_738_415_616, "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
                "mistral-7b": 7_241_732_096}   # the sizes the model cards state, to the parameter
    assert {name: PRESETS[name].param_count() for name in expected} == expected


@pytest.mark.parametrize("arch", ["llama", "gqa", "mqa", "mla"])
def test_kv_cache_bytes_per_token_equal_the_model_and_its_cache_tensors(arch):
    cfg = named_config(arch, block_size=24)
    model = Transformer(cfg)
    shape = ModelShape(vocab=cfg.vocab_size, d_model=cfg.n_embd, layers=cfg.n_layer, heads=cfg.n_head,
                       kv_heads=cfg.n_kv_head, ffn=cfg.ffn_hidden, attention="mla" if arch == "mla" else "gqa",
                       kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim)
    batch, length = 3, 24
    cache_tensors = [t for layer in model.init_cache(batch, length) for t in layer.values()]
    assert kv_cache_bytes_per_token(shape, 4) == model.cache_bytes_per_token() == \
        storage_bytes(cache_tensors) // (batch * length)


def saved_bytes(model: Transformer, idx: torch.Tensor) -> int:
    """Bytes of every tensor autograd saves in the forward (the parameters excluded: they are held
    anyway), each storage once: what the backward keeps alive."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets=idx)
    return storage_bytes(saved)


class Checkpointed(torch.nn.Module):
    """A block run under (reentrant) activation checkpointing: the forward runs without keeping
    anything but the block's input, the backward runs it again."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    @property
    def ffn(self):  # the model reads each block's ffn (its MoE loss)
        return self.block.ffn

    def forward(self, x, cache, pos, key_mask=None):
        return checkpoint(self.block, x, cache, pos, key_mask, use_reentrant=True)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_activation_bytes_equal_the_saved_tensors(name, checkpointing):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(cfg)
    if checkpointing:
        model.blocks = torch.nn.ModuleList(Checkpointed(b) for b in model.blocks)
    batch, seq = 3, 16
    idx = torch.randint(0, cfg.vocab_size, (batch, seq))
    assert saved_bytes(model, idx) == activation_bytes(shape_of(cfg), batch, seq, 4, checkpointing).kept


@pytest.mark.parametrize("name", CONFIGS)
def test_activation_bytes_in_bf16_within_one_percent(name):
    """A pure-bf16 model: the norms' fp32 copies are in the formula; a few small casts are not (1 KiB here)."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    idx = torch.randint(0, cfg.vocab_size, (3, 16))
    assert saved_bytes(model, idx) == pytest.approx(activation_bytes(shape_of(cfg), 3, 16, 2).kept, rel=0.01)


def test_checkpointing_keeps_one_input_per_block_and_recomputes_one_block_at_a_time():
    shape = PRESETS["llama-7b"]
    plain, ckpt = activation_bytes(shape, 1, 4096, 2), activation_bytes(shape, 1, 4096, 2, checkpointing=True)
    assert ckpt.kept < plain.kept / 10 and ckpt.kept < ckpt.peak < plain.peak


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_memcalc_fp32_model_states_equal_the_shards_the_deepspeed_module_allocates(stage):
    """With N dividing Psi there is no padding, and the paper's formula is exact."""
    cfg = CONFIGS["gqa"]
    psi = Transformer(cfg).num_params()
    assert psi % 2 == 0
    for rank in (0, 1):
        measured = Zero(Transformer(cfg), stage, 2, rank, AdamW(1e-3, 0.9, 0.95, 1e-8, 0.0, 1.0)).state_bytes()
        assert measured == training_model_states(psi, "fp32", stage, dp=2)


def test_the_zero_papers_figure_1():
    """Rajbhandari et al. 2020, Fig. 1: Psi = 7.5B, N = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device."""
    per_device = [paper_model_states(7.5e9, 64, stage).total / 1e9 for stage in range(4)]
    assert [round(x, 1) for x in per_device] == [120.0, 31.4, 16.6, 1.9]


def test_the_papers_communication_volumes():
    """Sec. 7: data parallelism and stages 1-2 move 2 Psi per step, stage 3 3 Psi ((N-1)/N -> 1 for large N)."""
    n = 1024
    assert [round(paper_comm_bytes(s, 1.0, n), 2) for s in range(4)] == [2.0, 2.0, 2.0, 3.0]


def run_memcalc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/memcalc.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_cli_reports_a_preset_as_json():
    proc = run_memcalc("--preset", "llama-7b", "--zero", "3", "--dp", "8", "--seq", "1024", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["params"] == 6_738_415_616
    assert out["model_states"]["stage3"]["total"] == pytest.approx(16 * 6_738_415_616 / 8)
    assert out["kv_cache"]["bytes_per_token"] == 2 * 32 * 4096 * 2                # 2 L d bytes (bf16, MHA)
    assert out["activations"]["kept"] == activation_bytes(PRESETS["llama-7b"], 1, 1024, 2).kept


@pytest.mark.parametrize("args,message", [
    (["--zero", "5"], "invalid choice"),
    (["--preset", "llama-7b", "--heads", "3"], "does not divide"),
    (["--preset", "llama-7b", "--kv-heads", "5"], "does not divide"),
    (["--layers", "2"], "incomplete shape"),
    (["--params", "-3"], "at least 1"),
    (["--params", "nan"], "finite"),
    (["--preset", "llama-7b", "--seq", "0"], "at least 1"),
    ([], "give a --preset"),
    (["--preset", "gpt-9"], "invalid choice"),
], ids=["zero-stage", "heads", "kv-heads", "incomplete", "negative", "nan", "seq", "nothing", "preset"])
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert memcalc.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_the_model_states_shrink_as_the_paper_says():
    by_stage = [training_model_states(1e9, "bf16", s, dp=8) for s in range(4)]
    assert [s.total / 1e9 for s in by_stage] == pytest.approx([16, 4 + 12 / 8, 2 + 14 / 8, 16 / 8])
    fp32 = dataclasses.astuple(training_model_states(1e9, "fp32", 0, dp=1))
    assert fp32 == (4e9, 4e9, 8e9)   # fp32 Adam: no master copy, K = 8
