"""deepspeed: the flat padded shards (round trip, layout bytes at any world size), AdamW written out
against torch's, and one run of every method on 2 real gloo ranks (spawned once for the whole file):
each ZeRO stage ends where DDP ends, with DDP's gradients and clipping norm, holds exactly the bytes
of the formula and sends exactly the closed-form volume; DDP equals one process on the whole batch.
The toy preset's checks and determinism are covered in tests/test_modules.py."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from core.distributed import run_on_ranks
from core.memory import padded_numel, zero3_peak_param_bytes, zero_comm_bytes, zero_model_states
from core.nn.model import Transformer
from post_train.systems.deepspeed.code.deepspeed import (
    STAGES, AdamW, Config, FlatUnit, Job, Zero, adamw_of, formula_states, layout_mismatches, make_batches,
    max_abs_diff, model_config, rank_main, relative_distance, train_single_process, unit_numels,
)

CFG = Config(world_size=2, steps=3, batch_per_rank=2, seq_len=16, vocab_size=64, n_layer=2, n_embd=32, n_head=4,
             n_kv_head=4, ffn_hidden=40, max_grad_norm=0.05, timeout_s=240)
"""tiny, with a clipping norm low enough that every step clips (the norm's all-reduce matters)"""
EQUAL = 1e-6


def initial_model(cfg: Config = CFG) -> Transformer:
    torch.manual_seed(cfg.seed)
    return Transformer(model_config(cfg))


@pytest.fixture(scope="module")
def ranks():
    """(the job, the single-process result, every rank's reports) of one 2-rank run."""
    model = initial_model()
    job = Job(CFG, {k: v.clone() for k, v in model.state_dict().items()}, make_batches(CFG))
    single, _ = train_single_process(job)
    reports = next(r for r in run_on_ranks(rank_main, CFG.world_size, job, timeout_s=CFG.timeout_s) if r is not None)
    return job, single, reports


def test_flat_unit_round_trip_with_padding():
    """At N = 3 the 18 080 parameters pad to 18 081: the ranks' shards, concatenated, are the parameters
    in order and one zero; every parameter is a view of the flat buffer with its own value."""
    world_size = 3
    reference = [p.detach().clone() for p in initial_model().parameters()]
    shards = []
    for rank in range(world_size):
        params = list(initial_model().parameters())
        unit = FlatUnit(params, [str(i) for i in range(len(params))], world_size, rank)
        assert unit.numel == 18_080 and unit.padded == 18_081 and unit.shard_numel == 6027
        assert all(torch.equal(p, r) and p.untyped_storage().data_ptr() == unit.full.untyped_storage().data_ptr()
                   for p, r in zip(params, reference))
        shards.append(unit.own(unit.full).clone())
    flat = torch.cat(shards)
    assert torch.equal(flat[:18_080], torch.cat([r.reshape(-1) for r in reference]))
    assert flat[18_080:].tolist() == [0.0]


def test_shard_layout_bytes_equal_the_formula_at_every_world_size():
    """First and last rank (the one holding the padding), stages 1-3, N = 2..8: parameters, gradient buffers and
    Adam states as allocated, against core/memory.zero_model_states."""
    wrong, compared, rows = layout_mismatches(CFG)
    assert compared == 126 and wrong == 0
    padded = {row["world_size"]: row["padding"] for row in rows}
    assert padded == {n: padded_numel(18_080, n) - 18_080 for n in range(2, 9)} and padded[3] == 1 and padded[6] == 4
    # at N = 3 the optimizer shard holds ceil(18 080 / 3) = 6027 elements: 8 bytes each
    assert zero_model_states([18_080], 3, 1).optimizer == 8 * 6027


def test_adamw_written_out_equals_torchs():
    torch.manual_seed(0)
    adamw = AdamW(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
    ours = torch.randn(50)
    theirs = torch.nn.Parameter(ours.clone())
    opt = adamw.torch_optimizer([theirs])
    m, v = torch.zeros(50), torch.zeros(50)
    for step in range(1, 6):
        grad = torch.randn(50)
        adamw.update(ours, grad, m, v, step)
        theirs.grad = grad.clone()
        opt.step()
    assert torch.equal(ours, theirs.detach())


@pytest.mark.parametrize("method", ["stage1", "stage2", "stage3", "zero_optimizer", "fsdp2"])
def test_each_method_equals_ddp_after_the_steps(ranks, method):
    job, _, reports = ranks
    ddp = reports[0]["ddp"]
    assert max_abs_diff({k: torch.from_numpy(v) for k, v in ddp.final.items()}, job.init) > 1e-3  # the steps moved the weights
    for rank_reports in reports:
        assert rank_reports[method].max_param_diff_vs_ddp < EQUAL
        assert rank_reports[method].losses == pytest.approx(rank_reports["ddp"].losses, abs=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_reduced_gradients_and_the_clipping_norm_equal_ddps(ranks, stage):
    _, _, reports = ranks
    for rank_reports in reports:
        ours, ddp = rank_reports[f"stage{stage}"], rank_reports["ddp"]
        assert ours.max_grad_diff < EQUAL
        assert ours.grad_norms == pytest.approx(ddp.grad_norms, rel=1e-5)
        assert min(ddp.grad_norms) > CFG.max_grad_norm   # every step clipped


def test_ddp_equals_one_process_on_the_whole_batch(ranks):
    """The ranks trained on different halves of the global batch, and together they took the steps one process
    takes on all of it."""
    job, single, reports = ranks
    ddp = {k: torch.from_numpy(v) for k, v in reports[0]["ddp"].final.items()}
    assert relative_distance(ddp, single, job.init) < 1e-3 and max_abs_diff(ddp, single) < 1e-4
    assert abs(reports[0]["ddp"].losses[0] - reports[1]["ddp"].losses[0]) > 1e-3


@pytest.mark.parametrize("stage", [0, *STAGES])
def test_per_rank_bytes_equal_the_formula(ranks, stage):
    _, _, reports = ranks
    model = initial_model()
    expected = formula_states(model, stage, 2)
    method = f"stage{stage}" if stage else "ddp"
    assert [r[method].state_bytes for r in reports] == [expected, expected]
    if stage == 3:
        assert [r[method].peak_param_bytes for r in reports] == [zero3_peak_param_bytes(unit_numels(model), 2)] * 2


def test_stage2_frees_the_full_gradient_and_stage3_the_full_parameters(ranks):
    _, _, reports = ranks
    full = 4 * 18_080
    by = {m: reports[0][m].state_bytes for m in ("ddp", "stage1", "stage2", "stage3")}
    assert [by[m].grads for m in by] == [full, full, full // 2, full // 2]
    assert [by[m].params for m in by] == [full, full, full, full // 2]
    assert [by[m].optimizer for m in by] == [2 * full + 4 * 20, full, full, full]   # DDP: + torch's 20 step counts


@pytest.mark.parametrize("stage", [0, *STAGES])
def test_bytes_sent_per_step_equal_the_closed_form(ranks, stage):
    _, _, reports = ranks
    expected = zero_comm_bytes(stage, unit_numels(initial_model()), 2)
    assert [r[f"stage{stage}" if stage else "ddp"].comm_bytes_per_step for r in reports] == [expected, expected]


def test_the_config_refuses_a_model_that_cannot_be_built():
    assert Config(n_embd=30, n_head=4).problems() and not dataclasses.replace(CFG).problems()
    assert adamw_of(CFG).clip_coefficient(torch.tensor(0.1)) == pytest.approx(0.05 / (0.1 + 1e-6))
