"""megatron: the f/g operators by hand, column- and row-parallel layers, the parallel MLP, attention and
block (tensor and sequence parallel) against the dense modules, the communication and activation
counts, training curves, the pipeline against one process, and the schedules' bubble and memory in
exact slot arithmetic. All distributed work runs in one spawn of 2 gloo ranks (module fixture);
each test asserts its own part. The toy preset's checks and determinism are covered in
tests/test_modules.py."""
from __future__ import annotations

import traceback
from fractions import Fraction

import pytest
import torch
from torch import nn

from core.distributed import run_on_ranks
from core.nn.norm import RMSNorm
from pre_train.llm.megatron.code.megatron import (
    F_COPY, F_GATHER, G_REDUCE, G_SCATTER, ColumnParallelLinear, Comm, Config, ParallelAttention, ParallelSwiGLU,
    RowParallelLinear, build_dense, column_shard, compare_probe, conjugate, gather_block_grads,
    gather_mlp_grads, ledger_summary, pipeline_reference, probe, rank_main, row_shard, saved_bytes, train,
)
from pre_train.llm.megatron.code.pipeline import SCHEDULES, bubble_formula, schedule, simulate

WORLD = 2
TINY = Config(world_size=WORLD, n_embd=16, n_head=4, n_kv_head=2, ffn_hidden=24, n_layer=1, vocab_size=16, seq_len=8,
              batch_size=2, train_steps=3, pipe_width=16, pipe_layers_per_stage=1, pipe_seq_len=8, micro_batch_size=2,
              micro_batches=(1, 3), timed_steps=1)
"""small enough for seconds; m = 3 > p = 2 so that GPipe and 1F1B hold different numbers of micro-batches"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _guarded(fn, *args):
    """A part's result, or its traceback: one broken part fails its own test, not the others'."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - returned to the test that asserts on this part
        return traceback.format_exc()


def _operators(comm: Comm) -> dict:
    """Each conjugate pair on x_r = (r + 1) [1, 2, 3, 4] with upstream gradient (r + 1) [1, 1, 1, 1] (or its shard)."""
    r, out = comm.rank, {}
    for name, pair in (("f", F_COPY), ("g", G_REDUCE), ("f_bar", F_GATHER), ("g_bar", G_SCATTER)):
        x = ((r + 1) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).unsqueeze(-1).requires_grad_()   # (1, s=4, h=1)
        y = conjugate(x, comm, pair)
        y.backward((r + 1) * torch.ones_like(y))
        out[name] = {"forward": y.detach().flatten(), "backward": x.grad.flatten()}
    return out


def _dense_linear() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A dense nn.Linear(8, 6) with a bias, an input and an upstream gradient: the same in every process."""
    torch.manual_seed(1)
    return nn.Linear(8, 6), torch.randn(5, 8), torch.randn(5, 6)


def _linear(comm: Comm) -> dict:
    """The dense layer split column-parallel (rank r: outputs r) and row-parallel (rank r: inputs r)."""
    r, t = comm.rank, comm.size
    dense, x, grad = _dense_linear()
    column = ColumnParallelLinear(column_shard([dense.weight], r, t), column_shard([dense.bias], r, t), comm, False)
    row = RowParallelLinear(row_shard(dense.weight, r, t), dense.bias.detach().clone(), comm, False)
    out = {}
    for name, layer, inp, upstream in (("column", column, x, grad.chunk(t, -1)[r]),
                                       ("row", row, x.chunk(t, -1)[r], grad)):
        inp = inp.clone().requires_grad_()
        y = layer(inp)
        y.backward(upstream)
        out[name] = {"out": y.detach(), "grad_in": inp.grad, "weight": layer.weight.grad, "bias": layer.bias.grad}
    return out


def _layers(comm: Comm) -> dict:
    """Attention and SwiGLU alone, tensor parallel, from the TINY dense block."""
    dense = build_dense(TINY)
    return {"attention": probe(ParallelAttention(dense.block.attn, comm, False), dense.x, dense.grad_out, comm),
            "swiglu": probe(ParallelSwiGLU(dense.block.ffn, comm, False), dense.x, dense.grad_out, comm)}


def _all_parts(rank: int, world_size: int, _) -> dict:
    comm = Comm(rank, world_size)
    parts = {"operators": _guarded(_operators, comm), "linear": _guarded(_linear, comm),
             "layers": _guarded(_layers, comm), "main": _guarded(rank_main, rank, world_size, build_dense(TINY).job(TINY))}
    return parts


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_on_ranks(_all_parts, WORLD, None, timeout_s=240)


def part(ranks: list[dict], name: str) -> list:
    values = [r[name] for r in ranks]
    for v in values:
        assert not isinstance(v, str), f"the ranks' {name} part raised:\n{v}"
    return values


def test_f_and_g_operators_by_hand(ranks):
    """x_r = (r + 1) [1, 2, 3, 4] on rank r, upstream gradient (r + 1) everywhere; 2 ranks sum to 3."""
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for r, ops in enumerate(part(ranks, "operators")):
        assert torch.equal(ops["f"]["forward"], (r + 1) * base)                    # f: identity forward
        assert torch.equal(ops["f"]["backward"], torch.full((4,), 3.0))           # ...all-reduce backward: 1 + 2
        assert torch.equal(ops["g"]["forward"], 3 * base)                         # g: all-reduce forward
        assert torch.equal(ops["g"]["backward"], torch.full((4,), r + 1.0))       # ...identity backward
        assert torch.equal(ops["f_bar"]["forward"], torch.cat([base, 2 * base]))  # all-gather along the sequence
        assert torch.equal(ops["f_bar"]["backward"], torch.full((4,), 3.0))       # reduce-scatter: the sum, my half
        assert torch.equal(ops["g_bar"]["forward"], (3 * base).chunk(2)[r])       # reduce-scatter: the sum, my half
        assert torch.equal(ops["g_bar"]["backward"], torch.tensor([1.0, 1.0, 2.0, 2.0]))   # all-gather of the halves


def _dense_linear_reference() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    dense, x, grad = _dense_linear()
    x.requires_grad_()
    y = dense(x)
    y.backward(grad)
    return dense, x, y.detach()


def test_column_parallel_linear_equals_dense(ranks):
    dense, x, y = _dense_linear_reference()
    for r, got in enumerate(part(ranks, "linear")):
        column = got["column"]
        assert torch.allclose(column["out"], y.chunk(WORLD, -1)[r], atol=1e-6)       # this rank's output columns
        assert torch.allclose(column["grad_in"], x.grad, atol=1e-6)                  # f summed every rank's share
        assert torch.allclose(column["weight"], dense.weight.grad.chunk(WORLD, 0)[r], atol=1e-6)
        assert torch.allclose(column["bias"], dense.bias.grad.chunk(WORLD)[r], atol=1e-6)


def test_row_parallel_linear_equals_dense(ranks):
    dense, x, y = _dense_linear_reference()
    for r, got in enumerate(part(ranks, "linear")):
        row = got["row"]
        assert torch.allclose(row["out"], y, atol=1e-6)                               # the whole sum, bias once
        assert torch.allclose(row["grad_in"], x.grad.chunk(WORLD, -1)[r], atol=1e-6)
        assert torch.allclose(row["weight"], dense.weight.grad.chunk(WORLD, 1)[r], atol=1e-6)
        assert torch.allclose(row["bias"], dense.bias.grad, atol=1e-6)               # replicated: the whole gradient


def _alone(ranks: list[dict], name: str, dense_forward) -> dict[str, float]:
    """Attention or SwiGLU alone: every rank's output and input gradient against the dense module's."""
    dense = build_dense(TINY)
    x = dense.x.clone().requires_grad_()
    out = dense_forward(dense.block, x)
    out.backward(dense.grad_out)
    got = [p[name] for p in part(ranks, "layers")]
    return {"out": max(float((g["out"] - out.detach()).abs().max()) for g in got),
            "grad_in": max(float((g["grad_in"] - x.grad).abs().max()) for g in got)}


def _in_block(ranks: list[dict], key: str) -> dict[str, float]:
    dense = build_dense(TINY)
    got = [r[key] for r in part(ranks, "main")[0]]
    if key == "mlp":
        return compare_probe(got, dense.mlp, dense.mlp, dense.x, dense.grad_out, gather_mlp_grads(got), sharded=False)
    return compare_probe(got, dense.block, lambda inp: dense.block(inp, None, 0), dense.x, dense.grad_out,
                         gather_block_grads(got, dense.block), sharded=key == "sp")


LAYERS = {
    "attention": lambda ranks: _alone(ranks, "attention", lambda block, x: block.attn(x, None, 0)),
    "swiglu": lambda ranks: _alone(ranks, "swiglu", lambda block, x: block.ffn(x)),
    "gelu_mlp": lambda ranks: _in_block(ranks, "mlp"),
    "block": lambda ranks: _in_block(ranks, "tp"),
    "sp_block": lambda ranks: _in_block(ranks, "sp"),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_parallel_layers_equal_dense(ranks, layer):
    errors = LAYERS[layer](ranks)
    assert max(errors.values()) < 1e-5, errors


def test_communication_per_block_matches_the_ring_formulas(ranks):
    b, s, h = TINY.batch_size, TINY.seq_len, TINY.n_embd
    activation = b * s * h * 4                        # one (b, s, h) float32 tensor
    for rank in part(ranks, "main")[0]:
        tp, sp = ledger_summary(rank["tp"]["ledger"]), ledger_summary(rank["sp"]["ledger"])
        assert (tp["all_reduce_forward"], tp["all_reduce_backward"]) == (2, 2)
        assert tp["all_gather_forward"] + tp["reduce_scatter_forward"] == 0
        assert (sp["all_gather_forward"], sp["reduce_scatter_forward"]) == (2, 2)
        assert (sp["all_gather_backward"], sp["reduce_scatter_backward"]) == (2, 2)
        assert {e["bytes"] for e in rank["tp"]["ledger"]} == {activation}
        assert {e["bytes"] for e in rank["sp"]["ledger"] if e["phase"] != "grad_sync"} == {activation}
        # ring: all-reduce 2 (t-1)/t, all-gather and reduce-scatter (t-1)/t of the tensor; t = 2
        assert tp["ring_bytes"] == sp["ring_bytes"] == 4 * activation
        assert sum(e["phase"] == "grad_sync" for e in rank["sp"]["ledger"]) == 2     # the block's two norm weights


def test_saved_bytes_counts_what_backward_keeps():
    norm, x = RMSNorm(16), torch.randn(2, 8, 16, requires_grad=True)
    kept = saved_bytes(norm, lambda: norm(x))
    assert kept["norms"] == kept["total"] == (2 * 8 * 16 + 2 * 8) * 4          # x and 1/rms per position, not g
    linear = nn.Linear(16, 4, bias=False)
    kept = saved_bytes(linear, lambda: linear(x))
    assert (kept["norms"], kept["total"]) == (0, 2 * 8 * 16 * 4)               # the input; the weight is no activation


def test_sequence_parallel_norms_keep_a_t_th_of_the_activations(ranks):
    b, s, h = TINY.batch_size, TINY.seq_len, TINY.n_embd
    replicated = 2 * (b * s * h + b * s) * 4          # two norms: input and 1/rms of every position
    for rank in part(ranks, "main")[0]:
        assert rank["tp"]["saved_norms"] == replicated
        assert rank["sp"]["saved_norms"] == replicated // WORLD


def test_parallel_training_curves_equal_the_dense_one(ranks):
    model = build_dense(TINY).model
    dense = train(model, TINY, lambda idx, targets: model(idx, targets=targets))
    assert dense[-1] != dense[0]
    for rank in part(ranks, "main")[0]:
        for mode in ("tp", "sp"):
            assert rank["train"][mode] == pytest.approx(dense, abs=1e-5), mode


@pytest.mark.parametrize("kind", SCHEDULES)
def test_pipeline_equals_single_process(ranks, kind):
    m = max(TINY.micro_batches)
    out, grads = pipeline_reference(TINY, build_dense(TINY).pipe_blocks, m)
    main = part(ranks, "main")[0]
    got_out = torch.cat(main[-1]["pipeline"]["checked"][kind]["outputs"])
    got_grads = [g for rank in main for g in rank["pipeline"]["checked"][kind]["grads"].values()]
    assert torch.allclose(got_out, out, atol=1e-6)
    assert len(got_grads) == len(grads)
    for got, want in zip(got_grads, grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_1f1b_holds_at_most_p_micro_batches_gpipe_all_m(ranks):
    m = max(TINY.micro_batches)
    held = {kind: max(s["peak_in_flight"] for rank in part(ranks, "main")[0] for s in rank["pipeline"]["steps"]
                      if s["schedule"] == kind and s["m"] == m) for kind in SCHEDULES}
    assert held == {"gpipe": m, "1f1b": WORLD}                   # measured on the ranks, m = 3 > p = 2
    for p in (1, 2, 3, 5):
        for m in (1, 2, 4, 9):
            assert simulate("gpipe", p, m)["peak_in_flight"] == m
            assert simulate("1f1b", p, m)["peak_in_flight"] == min(m, p)


@pytest.mark.parametrize("p,m", [(2, 1), (2, 4), (3, 5), (4, 8), (8, 3)])
def test_schedule_table_bubble_equals_the_formula(p, m):
    expected = Fraction(p - 1, m + p - 1)                        # GPipe, Huang et al. 2019
    assert bubble_formula(p, m) == expected
    for kind in SCHEDULES:
        for t_b in (1, 2):
            table = simulate(kind, p, m, t_f=1, t_b=t_b)
            assert table["bubble"] == expected, (kind, t_b)
            assert table["makespan"] == (m + p - 1) * (1 + t_b)


def test_neighbouring_stages_agree_on_the_order_of_messages():
    for kind in SCHEDULES:
        for p in range(1, 6):
            for m in range(1, 7):
                stages = [schedule(kind, s, p, m) for s in range(p)]
                for ops in stages:
                    assert sorted(ops) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
                    assert all(ops.index(("F", i)) < ops.index(("B", i)) for i in range(m))
                for s in range(p - 1):                          # activations go s -> s+1, gradients s+1 -> s, in order
                    assert [i for op, i in stages[s] if op == "F"] == [i for op, i in stages[s + 1] if op == "F"]
                    assert [i for op, i in stages[s] if op == "B"] == [i for op, i in stages[s + 1] if op == "B"]
