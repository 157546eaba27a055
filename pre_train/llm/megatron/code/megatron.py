"""Megatron-LM on real processes: tensor parallelism, sequence parallelism and pipeline schedules, each
checked against one process computing the same model whole.

Tensor parallelism (Shoeybi et al. 2019, Sec. 3). A linear layer Y = X A splits two ways over t ranks:

    column-parallel   A = [A_1 ... A_t] (output columns)   Y_i = X A_i           each rank holds Y's slice i
    row-parallel      B = [B_1; ...; B_t] (input rows)     Z = sum_i Y_i B_i     partial sums, added up

A column-parallel layer followed by a row-parallel one needs no communication in between: the MLP
Z = GeLU(X A) B runs as Z = g( GeLU(f(X) A_i) B_i ), with the conjugate operators

    f   forward: identity        backward: all-reduce   (every A_i contributes to dL/dX)
    g   forward: all-reduce      backward: identity     (the sum is replicated; so is its gradient)

so one all-reduce per MLP forward and one backward. Attention splits the same way by heads: q, k, v
are column-parallel (rank i computes heads i), the output projection W_o row-parallel. A Llama block
(core/nn/model.Block: RMSNorm, GQA attention with RoPE, SwiGLU) then costs 2 all-reduces of the
(b, s, h) activations in the forward pass and 2 in the backward; the norms and residuals are
replicated: every rank computes them whole.

Sequence parallelism (Korthikanti et al. 2022, Sec. 4.2.2) shards those replicated regions along the
sequence instead: g becomes a reduce-scatter (each rank keeps s/t positions of the sum) and f an
all-gather (the attention and the MLP need every position), with conjugate backwards

    f-bar   forward: all-gather      backward: reduce-scatter
    g-bar   forward: reduce-scatter  backward: all-gather

A ring all-reduce moves 2 (t-1)/t of the tensor per rank, an all-gather or a reduce-scatter (t-1)/t
of the whole tensor, so the traffic is the same, and the activations the norms keep for backward
shrink by t. The norms' weights then see s/t positions per rank: their gradients are all-reduced.

Pipeline parallelism (code/pipeline.py): the layers split into p stages, the batch into m
micro-batches; GPipe and 1F1B schedules, bubble (p - 1)/(m + p - 1).

Every distributed claim runs on `world_size` real processes (core/distributed.run_on_ranks: torchrun's
ranks, or spawned gloo ranks on the CPU), once per run; the parent process builds the dense models,
computes the single-process references and compares.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from core.config import Length, Range, Seed
from core.distributed import run_on_ranks, world
from core.nn.loss import linear_cross_entropy
from core.nn.model import Block, ModelConfig, Transformer
from core.nn.norm import RMSNorm

from .pipeline import SCHEDULES, Stage, bubble_formula, run_stage_step, simulate


@dataclass
class Config:
    world_size: Annotated[int, Range(ge=2, le=8)] = 2
    """ranks: the tensor-parallel size t and the pipeline depth p (one process each, one thread each)"""
    # --- tensor and sequence parallelism: a small Llama (core/nn/model.py)
    n_embd: Annotated[int, Range(ge=8, le=1024)] = 64
    """model width h"""
    n_head: Annotated[int, Range(ge=1, le=64)] = 4
    """query heads (a multiple of world_size: whole heads per rank)"""
    n_kv_head: Annotated[int, Range(ge=1, le=64)] = 2
    """key/value heads (GQA; a multiple of world_size, dividing n_head)"""
    ffn_hidden: Annotated[int, Range(ge=2, le=8192)] = 172
    """SwiGLU hidden width (a multiple of world_size)"""
    n_layer: Annotated[int, Range(ge=1, le=16)] = 2
    """blocks of the trained model"""
    vocab_size: Annotated[int, Range(ge=8, le=4096)] = 64
    """tokens of the synthetic task"""
    seq_len: Annotated[int, Range(ge=2, le=1024)] = 32
    """sequence length s (a multiple of world_size: sequence parallelism shards it)"""
    batch_size: Annotated[int, Range(ge=1, le=256)] = 8
    """sequences per batch b"""
    train_steps: Annotated[int, Range(ge=1, le=2000)] = 40
    """Adam steps of the dense, tensor-parallel and sequence-parallel models on the same batches"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """Adam learning rate"""
    max_step: Annotated[int, Range(ge=1, le=64)] = 4
    """the synthetic task's sequences count up by a step in 1..max_step (mod vocab_size)"""
    # --- pipeline parallelism: stages of equal Llama blocks, timed
    pipe_width: Annotated[int, Range(ge=8, le=2048)] = 256
    """width of the pipelined blocks (wide enough that compute, not messages, fills each op)"""
    pipe_layers_per_stage: Annotated[int, Range(ge=1, le=16)] = 2
    """blocks per stage (every stage the same: the formula assumes equal-cost stages)"""
    pipe_seq_len: Annotated[int, Range(ge=2, le=1024)] = 64
    """sequence length of the pipelined batch"""
    micro_batch_size: Annotated[int, Range(ge=1, le=256)] = 8
    """sequences per micro-batch (fixed: a batch of m micro-batches holds m times as many)"""
    micro_batches: Annotated[tuple[int, ...], Range(ge=1, le=64), Length(1, 8)] = (1, 2, 4, 8, 16)
    """the m compared with (p - 1)/(m + p - 1); the largest is also checked for outputs and gradients"""
    timed_steps: Annotated[int, Range(ge=1, le=50)] = 5
    """timed pipeline steps per schedule and m (the median step is reported), after one warm-up step"""
    bubble_tolerance: Annotated[float, Range(gt=0, le=1)] = 0.15
    """largest |measured - formula| bubble accepted. A shared CPU adds idle time whenever a rank waits for a
    core; the toy takes 1 (any): its ops of a few ms time the machine's load more than the schedule"""
    timeout_s: Annotated[float, Range(ge=10, le=3600)] = 900
    """the ranks are stopped after this long"""
    seed: Seed = 0
    """seeds the dense models, the probe inputs and the batches"""

    def problems(self) -> list[str]:
        t = self.world_size
        sizes = {"n_head": self.n_head, "n_kv_head": self.n_kv_head, "ffn_hidden": self.ffn_hidden,
                 "seq_len": self.seq_len, "4 n_embd (the GeLU MLP's hidden width)": 4 * self.n_embd}
        found = [f"{name}={value} is not a multiple of world_size={t}" for name, value in sizes.items() if value % t]
        if self.n_head % self.n_kv_head:
            found.append(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            found.append(f"n_embd={self.n_embd} / n_head={self.n_head} must be an even head size (RoPE)")
        if self.pipe_width % PIPE_HEADS or (self.pipe_width // PIPE_HEADS) % 2:
            found.append(f"pipe_width={self.pipe_width} must be {PIPE_HEADS} heads of an even size")
        return found


PIPE_HEADS = 4
"""attention heads of the pipelined blocks"""
SEQ = 1
"""the sequence dimension of (b, s, h) activations: what sequence parallelism shards"""
SCHEDULE_GRID = {"p": range(1, 9), "m": range(1, 33), "t_b": (1, 2, 3)}
"""stages, micro-batches and backward/forward cost ratios over which the slot simulation must give the formula"""


# --- the tensor-parallel group and its collectives ----------------------------------------------------
class Comm:
    """The tensor-parallel group as one rank sees it, with a ledger of every collective it runs: the
    bytes of the tensor passed and the bytes a ring algorithm sends per rank for it."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
        self.ledger: list[dict] = []

    def run(self, op: str, x: Tensor, phase: str) -> Tensor:
        t = self.size
        if op == "identity":
            return x
        if op == "split":                    # this rank's s/t positions; no message
            return x.chunk(t, SEQ)[self.rank].contiguous()
        if op == "all_reduce":               # ring: reduce-scatter + all-gather, 2 (t-1)/t of the tensor
            out = x.clone()
            dist.all_reduce(out)
            self._record(op, phase, x, 2 * (t - 1))
        elif op == "all_gather":             # ring: (t-1)/t of the gathered tensor
            parts = [torch.empty_like(x) for _ in range(t)]
            dist.all_gather(parts, x.contiguous())
            out = torch.cat(parts, SEQ)
            self._record(op, phase, out, t - 1)
        elif op == "reduce_scatter":         # ring: (t-1)/t of the tensor being reduced
            out = torch.empty_like(x.chunk(t, SEQ)[0])
            dist.reduce_scatter(out, [c.contiguous() for c in x.chunk(t, SEQ)])
            self._record(op, phase, x, t - 1)
        else:
            raise ValueError(f"unknown collective {op!r}")
        return out

    def _record(self, op: str, phase: str, full: Tensor, ring_parts: int) -> None:
        size = full.numel() * full.element_size()
        self.ledger.append({"op": op, "phase": phase, "bytes": size, "ring_bytes": size * ring_parts // self.size})


class Conjugate(torch.autograd.Function):
    """One operator of a conjugate pair: `forward_op` on the activation, `backward_op` on its gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, comm: Comm, forward_op: str, backward_op: str) -> Tensor:
        ctx.comm, ctx.backward_op = comm, backward_op
        return comm.run(forward_op, x, "forward")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.comm.run(ctx.backward_op, grad, "backward"), None, None, None


F_COPY = ("identity", "all_reduce")                 # f: into a tensor-parallel region
G_REDUCE = ("all_reduce", "identity")               # g: out of it
F_GATHER = ("all_gather", "reduce_scatter")         # f-bar: into it from sequence shards
G_SCATTER = ("reduce_scatter", "all_gather")        # g-bar: out of it into sequence shards
SPLIT_SEQUENCE = ("split", "all_gather")            # replicated -> sequence shards (after the embedding)
GATHER_SEQUENCE = ("all_gather", "split")           # sequence shards -> replicated (before the LM head)


def conjugate(x: Tensor, comm: Comm, pair: tuple[str, str]) -> Tensor:
    return Conjugate.apply(x, comm, *pair)


# --- the parallel layers ---------------------------------------------------------------------------------
def column_shard(parts: list[Tensor], rank: int, t: int) -> Tensor:
    """This rank's output rows of each fused part, concatenated: [q_i; k_i; v_i] or [gate_i; up_i].
    Each part splits on its own, so rank i holds whole heads of q, of k and of v (Megatron's layout)."""
    return torch.cat([part.chunk(t, 0)[rank] for part in parts]).detach().clone()


def row_shard(weight: Tensor, rank: int, t: int) -> Tensor:
    """This rank's input columns of a row-parallel weight (out, in)."""
    return weight.chunk(t, 1)[rank].detach().clone()


class ShardedLinear(nn.Module):
    """This rank's shard of a linear layer's weight (and bias), and the conjugate pair at its edge: the
    operator on the input of a column-parallel layer, on the output of a row-parallel one."""

    def __init__(self, weight: Tensor, bias: Tensor | None, comm: Comm, pair: tuple[str, str]):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.comm, self.pair = comm, pair


class ColumnParallelLinear(ShardedLinear):
    """Y_i = X A_i + b_i with this rank's rows of the (out, in) weight. X enters through f (or, sequence
    parallel, through f-bar: the all-gather of the sequence shards)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, comm: Comm, sequence_parallel: bool):
        super().__init__(weight, bias, comm, F_GATHER if sequence_parallel else F_COPY)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(conjugate(x, self.comm, self.pair), self.weight, self.bias)


class RowParallelLinear(ShardedLinear):
    """Z = g(Y_i B_i) + b: the partial products summed by g (or reduce-scattered by g-bar), then the
    bias, once. Added before the sum, every rank's copy of b would be summed: t b."""

    def __init__(self, weight: Tensor, bias: Tensor | None, comm: Comm, sequence_parallel: bool):
        super().__init__(weight, bias, comm, G_SCATTER if sequence_parallel else G_REDUCE)

    def forward(self, y: Tensor) -> Tensor:
        z = conjugate(F.linear(y, self.weight), self.comm, self.pair)
        return z if self.bias is None else z + self.bias          # the bias once, after the sum


class ParallelGeluMLP(nn.Module):
    """Megatron's MLP (Shoeybi et al. 2019, Fig. 3a): Z = g( GeLU(f(X) A_i + a_i) B_i ) + b."""

    def __init__(self, dense: nn.Sequential, comm: Comm):
        super().__init__()
        up, _, down = dense
        r, t = comm.rank, comm.size
        self.up = ColumnParallelLinear(column_shard([up.weight], r, t), column_shard([up.bias], r, t), comm, False)
        self.down = RowParallelLinear(row_shard(down.weight, r, t), down.bias.detach().clone(), comm, False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class ParallelAttention(nn.Module):
    """core/nn/attention.GroupedQueryAttention split by heads: rank i computes query heads i and the
    key/value heads they read (n_head / t and n_kv_head / t of them: a GQA group never straddles
    two ranks), with one fused column-parallel [q_i; k_i; v_i] and a row-parallel W_o."""

    def __init__(self, dense: nn.Module, comm: Comm, sequence_parallel: bool):
        super().__init__()
        r, t = comm.rank, comm.size
        self.n_head, self.n_kv_head, self.head_dim = dense.n_head // t, dense.n_kv_head // t, dense.head_dim
        qkv = column_shard([dense.wq.weight, dense.wk.weight, dense.wv.weight], r, t)
        self.qkv = ColumnParallelLinear(qkv, None, comm, sequence_parallel)
        self.wo = RowParallelLinear(row_shard(dense.wo.weight, r, t), None, comm, sequence_parallel)
        self.rope = copy.deepcopy(dense.rope)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(x)                                     # (b, s, heads_i * d): the full sequence
        B, T, _ = qkv.shape
        H, H_kv = self.n_head, self.n_kv_head
        qkv = qkv.view(B, T, H + 2 * H_kv, self.head_dim).transpose(1, 2)
        qk, v = qkv.split([H + H_kv, H_kv], dim=1)
        q, k = self.rope(qk, 0).split([H, H_kv], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != H_kv)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.head_dim))


class ParallelSwiGLU(nn.Module):
    """core/nn/moe.SwiGLU split by hidden units: [gate_i; up_i] column-parallel (one fused layer, so one f),
    the down projection row-parallel."""

    def __init__(self, dense: nn.Module, comm: Comm, sequence_parallel: bool):
        super().__init__()
        r, t = comm.rank, comm.size
        self.gate_up = ColumnParallelLinear(column_shard([dense.w1.weight, dense.w3.weight], r, t), None, comm,
                                            sequence_parallel)
        self.down = RowParallelLinear(row_shard(dense.w2.weight, r, t), None, comm, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ParallelBlock(nn.Module):
    """core/nn/model.Block with parallel attention and MLP; the norms and residuals replicated (tensor
    parallel) or on this rank's s/t positions (sequence parallel)."""

    def __init__(self, dense: Block, comm: Comm, sequence_parallel: bool):
        super().__init__()
        self.attn_norm, self.ffn_norm = copy.deepcopy(dense.attn_norm), copy.deepcopy(dense.ffn_norm)
        self.attn = ParallelAttention(dense.attn, comm, sequence_parallel)
        self.ffn = ParallelSwiGLU(dense.ffn, comm, sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class ParallelTransformer(nn.Module):
    """core/nn/model.Transformer (untied head) with parallel blocks. The embedding and the LM head stay
    replicated; under sequence parallelism the embedding's output is split along the sequence and the
    final norm's output gathered again for the head."""

    def __init__(self, dense: Transformer, comm: Comm, sequence_parallel: bool):
        super().__init__()
        self.comm, self.sequence_parallel = comm, sequence_parallel
        self.tok_emb, self.norm = copy.deepcopy(dense.tok_emb), copy.deepcopy(dense.norm)
        self.lm_head = copy.deepcopy(dense.lm_head)
        self.blocks = nn.ModuleList(ParallelBlock(b, comm, sequence_parallel) for b in dense.blocks)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.sequence_parallel:
            x = conjugate(x, self.comm, SPLIT_SEQUENCE)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.sequence_parallel:
            x = conjugate(x, self.comm, GATHER_SEQUENCE)
        return linear_cross_entropy(x, self.lm_head.weight, targets)


def sync_sequence_parallel_grads(model: nn.Module, comm: Comm) -> None:
    """Under sequence parallelism each rank's norm saw s/t positions: its weight's gradient is a partial
    sum over the sequence, summed here (the replicated weights then take the same step everywhere)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.grad = comm.run("all_reduce", module.weight.grad, "grad_sync")


# --- measurements on a rank ----------------------------------------------------------------------------------
def saved_bytes(model: nn.Module, run) -> dict[str, int]:
    """Bytes of the activations autograd keeps for backward while `run()` builds the graph: all of them,
    and those kept inside the RMSNorms (the region tensor parallelism leaves replicated). Parameters are
    not activations and are left out; a tensor saved twice counts once."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[str, set] = {"total": set(), "norms": set()}
    sizes = {"total": 0, "norms": 0}
    inside = [0]

    def pack(tensor: Tensor) -> Tensor:
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())
        if tensor.data_ptr() not in params:
            for region in ("total", "norms") if inside[0] else ("total",):
                if key not in seen[region]:
                    seen[region].add(key)
                    sizes[region] += tensor.numel() * tensor.element_size()
        return tensor

    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    handles = [h for m in norms for h in (m.register_forward_pre_hook(lambda *_: inside.__setitem__(0, 1)),
                                          m.register_forward_hook(lambda *_: inside.__setitem__(0, 0)))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = run()
    finally:
        for h in handles:
            h.remove()
    return {**sizes, "out": out}


def local_grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def probe(model: nn.Module, x: Tensor, grad_out: Tensor, comm: Comm, sync: bool = False) -> dict[str, Any]:
    """One forward and backward of `model` on x with upstream gradient grad_out: the output, the input's
    and every parameter's gradient, the collectives of each pass, and the saved activation bytes."""
    comm.ledger.clear()
    x = x.clone().requires_grad_()
    saved = saved_bytes(model, lambda: model(x))
    saved["out"].backward(grad_out)
    if sync:
        sync_sequence_parallel_grads(model, comm)
    return {"out": saved["out"].detach(), "grad_in": x.grad, "grads": local_grads(model), "ledger": list(comm.ledger),
            "saved_total": saved["total"], "saved_norms": saved["norms"]}


# --- the synthetic language task ------------------------------------------------------------------------------
def make_batch(cfg: Config, step: int) -> tuple[Tensor, Tensor]:
    """Sequences that count up from a random start by a random step in 1..max_step, mod vocab_size: the
    next token is the last one plus the step, which attention reads off the previous two."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    start = torch.randint(0, cfg.vocab_size, (cfg.batch_size, 1), generator=gen)
    stride = torch.randint(1, cfg.max_step + 1, (cfg.batch_size, 1), generator=gen)
    tokens = (start + stride * torch.arange(cfg.seq_len + 1)) % cfg.vocab_size
    return tokens[:, :-1], tokens[:, 1:]


def train(model: nn.Module, cfg: Config, loss_of, after_backward=lambda: None) -> list[float]:
    """Adam on the same batches for every model; the loss of each step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.train_steps):
        idx, targets = make_batch(cfg, step)
        loss = loss_of(idx, targets)
        opt.zero_grad()
        loss.backward()
        after_backward()
        opt.step()
        losses.append(loss.item())
    return losses


def model_config(cfg: Config) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab_size, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, ffn_hidden=cfg.ffn_hidden, tie_embeddings=False)


def pipe_config(cfg: Config) -> ModelConfig:
    return ModelConfig(block_size=cfg.pipe_seq_len, n_layer=cfg.world_size * cfg.pipe_layers_per_stage,
                       n_head=PIPE_HEADS, n_kv_head=PIPE_HEADS, n_embd=cfg.pipe_width,
                       ffn_hidden=round(8 / 3 * cfg.pipe_width))


def gelu_mlp(h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))


def pipeline_batch(cfg: Config, m: int, step: int) -> tuple[list[Tensor], list[Tensor]]:
    """m micro-batches of inputs and regression targets for one pipeline step."""
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1000 * m + step)
    shape = (cfg.micro_batch_size, cfg.pipe_seq_len, cfg.pipe_width)
    return [torch.randn(shape, generator=gen) for _ in range(m)], [torch.randn(shape, generator=gen) for _ in range(m)]


# --- what every rank runs ------------------------------------------------------------------------------------
@dataclass
class Job:
    """What the parent hands each rank: the config, the dense weights and the probe inputs."""
    cfg: Config
    mlp_state: dict
    block_state: dict
    model_state: dict
    pipe_states: list[dict]
    x: Tensor
    grad_out: Tensor


@dataclass
class Dense:
    """The single-process models and probe inputs every comparison starts from, built from the seed."""
    mlp: nn.Sequential
    block: Block
    model: Transformer
    pipe_blocks: list[Block]
    x: Tensor
    grad_out: Tensor

    def job(self, cfg: Config) -> Job:
        return Job(cfg, self.mlp.state_dict(), self.block.state_dict(), self.model.state_dict(),
                   [b.state_dict() for b in self.pipe_blocks], self.x, self.grad_out)


def build_dense(cfg: Config) -> Dense:
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg)
    mlp, block, model = gelu_mlp(cfg.n_embd), Block(mcfg), Transformer(mcfg)
    pipe_blocks = [Block(pipe_config(cfg)) for _ in range(cfg.world_size * cfg.pipe_layers_per_stage)]
    shape = (cfg.batch_size, cfg.seq_len, cfg.n_embd)
    x, grad_out = torch.randn(shape), torch.randn(shape) / (cfg.batch_size * cfg.seq_len)   # the gradient of a mean
    return Dense(mlp, block, model, pipe_blocks, x, grad_out)


def rank_main(rank: int, world_size: int, job: Job) -> list[dict]:
    """Every distributed measurement of a run, on this rank; each rank returns every rank's results
    (under torchrun the caller sees only its own return value)."""
    if dist.get_backend() != "gloo":
        raise RuntimeError("the ranks compute on the CPU and need the gloo backend; NCCL wants one GPU per rank "
                           "and CUDA tensors (launch without torchrun, or on CPU-only ranks)")
    cfg, comm = job.cfg, Comm(rank, world_size)
    mcfg = model_config(cfg)
    dense_block = Block(mcfg)
    dense_block.load_state_dict(job.block_state)
    dense_mlp = gelu_mlp(cfg.n_embd)
    dense_mlp.load_state_dict(job.mlp_state)
    x_shard, grad_shard = (t.chunk(world_size, SEQ)[rank].contiguous() for t in (job.x, job.grad_out))
    result = {
        "mlp": probe(ParallelGeluMLP(dense_mlp, comm), job.x, job.grad_out, comm),
        "tp": probe(ParallelBlock(dense_block, comm, False), job.x, job.grad_out, comm),
        "sp": probe(ParallelBlock(dense_block, comm, True), x_shard, grad_shard, comm, sync=True),
        "train": {},
    }
    for mode, sequence_parallel in (("tp", False), ("sp", True)):
        dense = Transformer(mcfg)
        dense.load_state_dict(job.model_state)
        model = ParallelTransformer(dense, comm, sequence_parallel)
        sync = (lambda: sync_sequence_parallel_grads(model, comm)) if sequence_parallel else (lambda: None)
        result["train"][mode] = train(model, cfg, model, sync)
    result["pipeline"] = run_pipeline(rank, world_size, cfg, job.pipe_states)
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, result)
    return gathered


def run_pipeline(rank: int, p: int, cfg: Config, pipe_states: list[dict]) -> dict:
    """This rank's stage of the pipelined blocks, stepped under each schedule and m: one warm-up step,
    then `timed_steps` timed ones, each started together (a barrier). Returns the compute intervals of
    every step, and for the largest m the first timed step's outputs (last stage) and gradients."""
    pcfg = pipe_config(cfg)
    k = cfg.pipe_layers_per_stage
    blocks = []
    for state in pipe_states[rank * k:(rank + 1) * k]:
        blocks.append(Block(pcfg))
        blocks[-1].load_state_dict(state)
    stage = Stage(blocks)
    shape = (cfg.micro_batch_size, cfg.pipe_seq_len, cfg.pipe_width)
    m_max = max(cfg.micro_batches)
    steps, checked = [], {}
    for kind in SCHEDULES:
        for m in cfg.micro_batches:
            for step in range(cfg.timed_steps + 1):
                inputs, targets = pipeline_batch(cfg, m, step)
                stage.zero_grad(set_to_none=True)
                dist.barrier()
                start = time.perf_counter()
                out = run_stage_step(stage, rank, p, m, kind, inputs, targets, shape)
                end = time.perf_counter()
                if step == 0:
                    continue                      # warm-up: first use of this batch shape
                steps.append({"schedule": kind, "m": m, "step": step, "start": start, "end": end,
                              "events": out["events"], "peak_in_flight": out["peak_in_flight"]})
                if m == m_max and step == 1:
                    checked[kind] = {"outputs": out["outputs"], "grads": local_grads(stage)}
    return {"steps": steps, "checked": checked}


# --- comparisons in the parent -----------------------------------------------------------------------------------
def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def gather_block_grads(ranks: list[dict], dense: Block) -> dict[str, list[Tensor]]:
    """The ranks' gradients under the dense block's parameter names: shards put back together
    (column-parallel: rows, row-parallel: columns), replicated norms once per rank (each must equal the
    dense gradient: every rank takes the same step)."""
    t = len(ranks)
    g = [r["grads"] for r in ranks]

    def rows(name: str, parts: list[nn.Linear]) -> list[list[Tensor]]:
        sizes = [p.weight.shape[0] // t for p in parts]
        split = [grads[name].split(sizes) for grads in g]
        return [[torch.cat([s[j] for s in split])] for j in range(len(parts))]

    a, f = dense.attn, dense.ffn
    wq, wk, wv = rows("attn.qkv.weight", [a.wq, a.wk, a.wv])
    w1, w3 = rows("ffn.gate_up.weight", [f.w1, f.w3])
    return {"attn_norm.weight": [x["attn_norm.weight"] for x in g], "ffn_norm.weight": [x["ffn_norm.weight"] for x in g],
            "attn.wq.weight": wq, "attn.wk.weight": wk, "attn.wv.weight": wv,
            "attn.wo.weight": [torch.cat([x["attn.wo.weight"] for x in g], 1)],
            "ffn.w1.weight": w1, "ffn.w3.weight": w3, "ffn.w2.weight": [torch.cat([x["ffn.down.weight"] for x in g], 1)]}


def gather_mlp_grads(ranks: list[dict]) -> dict[str, list[Tensor]]:
    """The same for the GeLU MLP (nn.Sequential names); its output bias is replicated."""
    g = [r["grads"] for r in ranks]
    return {"0.weight": [torch.cat([x["up.weight"] for x in g])], "0.bias": [torch.cat([x["up.bias"] for x in g])],
            "2.weight": [torch.cat([x["down.weight"] for x in g], 1)], "2.bias": [x["down.bias"] for x in g]}


def compare_probe(ranks: list[dict], dense: nn.Module, dense_forward, x: Tensor, grad_out: Tensor,
                  gathered: dict[str, list[Tensor]], sharded: bool) -> dict[str, float]:
    """Run the dense module on the same input and upstream gradient; the largest difference of the
    output, of the input's gradient (every rank's, or the shards put together) and of every parameter's
    gradient (`gathered` from the ranks)."""
    x = x.clone().requires_grad_()
    out = dense_forward(x)
    dense.zero_grad(set_to_none=True)
    out.backward(grad_out)
    if sharded:
        outs, grads_in = [torch.cat([r["out"] for r in ranks], SEQ)], [torch.cat([r["grad_in"] for r in ranks], SEQ)]
    else:
        outs, grads_in = [r["out"] for r in ranks], [r["grad_in"] for r in ranks]
    dense_grads = dict(dense.named_parameters())
    return {"out": max(max_diff(o, out.detach()) for o in outs),
            "grad_in": max(max_diff(g, x.grad) for g in grads_in),
            "grads": max(max_diff(g, dense_grads[name].grad) for name, copies in gathered.items() for g in copies)}


def ledger_summary(ledger: list[dict]) -> dict[str, float]:
    counts = {f"{op}_{phase}": sum(1 for e in ledger if e["op"] == op and e["phase"] == phase)
              for op in ("all_reduce", "all_gather", "reduce_scatter") for phase in ("forward", "backward")}
    counts["ring_bytes"] = sum(e["ring_bytes"] for e in ledger if e["phase"] != "grad_sync")
    return counts


def pipeline_reference(cfg: Config, blocks: list[Block], m: int) -> tuple[Tensor, list[Tensor]]:
    """The single-process step: every block on the whole batch (the m micro-batches stacked), the mean
    squared error, its gradients."""
    inputs, targets = pipeline_batch(cfg, m, 1)
    x, target = torch.cat(inputs), torch.cat(targets)
    for b in blocks:
        b.zero_grad(set_to_none=True)
    out = x.requires_grad_()
    for b in blocks:
        out = b(out, None, 0)
    F.mse_loss(out, target).backward()
    return out.detach(), [p.grad for b in blocks for p in b.parameters()]


def measured_bubbles(steps_by_rank: list[list[dict]], p: int) -> list[dict]:
    """Per schedule and m: each timed step's bubble = 1 - (compute time summed over ranks) / (p x the
    step's wall time, from the first rank's start to the last rank's end), and the median over steps."""
    rows = []
    for i, first in enumerate(steps_by_rank[0]):
        same = [steps[i] for steps in steps_by_rank]
        start, end = min(s["start"] for s in same), max(s["end"] for s in same)
        busy = sum(e[3] - e[2] for s in same for e in s["events"])
        rows.append({"schedule": first["schedule"], "m": first["m"], "step": first["step"],
                     "bubble": 1 - busy / (p * (end - start)), "wall_s": end - start})
    summary = []
    for kind in SCHEDULES:
        for m in sorted({r["m"] for r in rows}):
            picked = [r for r in rows if r["schedule"] == kind and r["m"] == m]
            summary.append({"schedule": kind, "m": m, "formula": float(bubble_formula(p, m)),
                            "measured": statistics.median(r["bubble"] for r in picked),
                            "measured_min": min(r["bubble"] for r in picked),
                            "measured_max": max(r["bubble"] for r in picked),
                            "step_s": statistics.median(r["wall_s"] for r in picked)})
    return summary


def schedule_table_deviation() -> float:
    """The largest |simulated slot bubble - formula| over SCHEDULE_GRID, both schedules: exactly 0."""
    return max(abs(float(simulate(kind, p, m, 1, t_b)["bubble"] - bubble_formula(p, m)))
               for kind in SCHEDULES for p in SCHEDULE_GRID["p"] for m in SCHEDULE_GRID["m"] for t_b in SCHEDULE_GRID["t_b"])


# --- the run ---------------------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    t, p = cfg.world_size, cfg.world_size
    dense = build_dense(cfg)
    dense_mlp, dense_block, dense_model, x, grad_out = dense.mlp, dense.block, dense.model, dense.x, dense.grad_out
    ctx.say(f"{t} ranks ({'torchrun' if world()[1] > 1 else 'spawned, gloo on the CPU'}): tensor parallel, "
            f"sequence parallel, training, then {len(SCHEDULES)} pipeline schedules x m in {list(cfg.micro_batches)}")
    started = time.perf_counter()
    ranks = run_on_ranks(rank_main, t, dense.job(cfg), cfg.timeout_s)[0]
    ctx.measure(ranks_s=time.perf_counter() - started)

    # tensor and sequence parallelism against the dense modules
    block_forward = lambda inp: dense_block(inp, None, 0)  # noqa: E731
    mlp_ranks, tp_ranks, sp_ranks = ([r[key] for r in ranks] for key in ("mlp", "tp", "sp"))
    mlp = compare_probe(mlp_ranks, dense_mlp, dense_mlp, x, grad_out, gather_mlp_grads(mlp_ranks), sharded=False)
    tp = compare_probe(tp_ranks, dense_block, block_forward, x, grad_out, gather_block_grads(tp_ranks, dense_block),
                       sharded=False)
    sp = compare_probe(sp_ranks, dense_block, block_forward, x, grad_out, gather_block_grads(sp_ranks, dense_block),
                       sharded=True)
    for name, row in (("gelu_mlp", mlp), ("tp_block", tp), ("sp_block", sp)):
        ctx.log("equality", layer=name, **row)
        ctx.say(f"{name}: max |diff| vs dense on every rank: output {row['out']:.2e}, input grad "
                f"{row['grad_in']:.2e}, weight grads (gathered) {row['grads']:.2e}")

    # communication, counted on rank 0, against the closed form
    tp_comm, sp_comm = ledger_summary(ranks[0]["tp"]["ledger"]), ledger_summary(ranks[0]["sp"]["ledger"])
    activation_bytes = x.numel() * x.element_size()
    formula = 4 * 2 * (t - 1) * activation_bytes // t       # 2 all-reduces per pass, forward and backward
    for name, row in (("tensor parallel", tp_comm), ("sequence parallel", sp_comm)):
        ctx.log("communication", layout=name, formula_ring_bytes=formula, **row)
        ctx.say(f"{name}: per block forward+backward {row['all_reduce_forward']}+{row['all_reduce_backward']} all-reduces, "
                f"{row['all_gather_forward']}+{row['all_gather_backward']} all-gathers, "
                f"{row['reduce_scatter_forward']}+{row['reduce_scatter_backward']} reduce-scatters; "
                f"{row['ring_bytes']} bytes per rank on a ring (formula 4 x 2(t-1)/t x bsh x 4 = {formula})")

    # activations kept for backward: dense block in one process, and one rank of each layout
    dense_saved = saved_bytes(dense_block, lambda: dense_block(x.clone().requires_grad_(), None, 0))
    memory = [{"layout": "dense (1 process)", "saved_total": dense_saved["total"], "saved_norms": dense_saved["norms"]},
              {"layout": f"tensor parallel (t={t})", "saved_total": ranks[0]["tp"]["saved_total"],
               "saved_norms": ranks[0]["tp"]["saved_norms"]},
              {"layout": "+ sequence parallel", "saved_total": ranks[0]["sp"]["saved_total"],
               "saved_norms": ranks[0]["sp"]["saved_norms"]}]
    for row in memory:
        ctx.log("memory", **row)
    sp_norm_ratio = ranks[0]["tp"]["saved_norms"] / ranks[0]["sp"]["saved_norms"]
    ctx.say(f"activations kept by the norms per rank: {memory[1]['saved_norms']} bytes tensor parallel, "
            f"{memory[2]['saved_norms']} sequence parallel (ratio {sp_norm_ratio:g}, t = {t}); whole block "
            f"{memory[0]['saved_total']} dense, {memory[1]['saved_total']} TP, {memory[2]['saved_total']} SP")

    # training: the same Adam steps on the same batches
    dense_losses = train(dense_model, cfg, lambda idx, targets: dense_model(idx, targets=targets))
    loss_dev = max(abs(a - b) for r in ranks for mode in ("tp", "sp") for a, b in zip(r["train"][mode], dense_losses))
    for step, loss in enumerate(dense_losses):
        ctx.log("history", step=step + 1, dense=loss, tp=ranks[0]["train"]["tp"][step], sp=ranks[0]["train"]["sp"][step])
    ctx.say(f"training {cfg.train_steps} steps: dense loss {dense_losses[0]:.4f} -> {dense_losses[-1]:.4f}; "
            f"tensor/sequence parallel curves differ from it by at most {loss_dev:.2e}")

    # pipeline: outputs and gradients against one process, in-flight micro-batches, the bubble
    m_max = max(cfg.micro_batches)
    ref_out, ref_grads = pipeline_reference(cfg, dense.pipe_blocks, m_max)
    pipe_err = 0.0
    for kind in SCHEDULES:
        got_out = torch.cat(ranks[-1]["pipeline"]["checked"][kind]["outputs"])
        got_grads = [g for r in ranks for g in r["pipeline"]["checked"][kind]["grads"].values()]
        err = max([max_diff(got_out, ref_out)] + [max_diff(a, b) for a, b in zip(got_grads, ref_grads, strict=True)])
        pipe_err = max(pipe_err, err)
        ctx.say(f"pipeline {kind}, m={m_max}: output and gradients vs one process, max |diff| {err:.2e}")
    steps_by_rank = [r["pipeline"]["steps"] for r in ranks]
    in_flight = {kind: max(s["peak_in_flight"] for steps in steps_by_rank for s in steps
                           if s["schedule"] == kind and s["m"] == m_max) for kind in SCHEDULES}
    bubbles = measured_bubbles(steps_by_rank, p)
    for row in bubbles:
        ctx.log("bubble", **row)
        ctx.say(f"  {row['schedule']:5s} m={row['m']:2d}: bubble {row['measured']:.3f} measured "
                f"(steps {row['measured_min']:.3f}-{row['measured_max']:.3f}), formula {row['formula']:.3f}; "
                f"step {row['step_s'] * 1e3:.0f} ms")
    for rank, rank_steps in enumerate(steps_by_rank):
        for s in rank_steps:
            for op, i, start, end in s["events"]:
                ctx.log("timeline", rank=rank, schedule=s["schedule"], m=s["m"],
                        step=s["step"], op=op, micro_batch=i, start_ms=(start - s["start"]) * 1e3,
                        end_ms=(end - s["start"]) * 1e3)
    bubble_dev = max(abs(r["measured"] - r["formula"]) for r in bubbles)
    ctx.measure(**{f"bubble_{r['schedule']}_m{r['m']}": r["measured"] for r in bubbles}, bubble_max_dev=bubble_dev)
    table_dev = schedule_table_deviation()
    ctx.say(f"peak micro-batches held per stage at m={m_max}: gpipe {in_flight['gpipe']}, 1f1b {in_flight['1f1b']} "
            f"(p = {p}); slot simulation vs formula over {len(SCHEDULE_GRID['p']) * len(SCHEDULE_GRID['m'])} (p, m): "
            f"max |diff| {table_dev:g}; measured bubbles within {bubble_dev:.3f} of the formula "
            f"(tolerance {cfg.bubble_tolerance})")

    # imported here, not on top: every rank process imports this file, and matplotlib adds a second to each start
    from .plots import plot_bubbles, plot_memory, plot_timeline, plot_training

    ctx.save_figure(plot_timeline(steps_by_rank, m_max, bubbles), "pipeline_timeline.png")
    ctx.save_figure(plot_bubbles(bubbles, p), "bubble_vs_m.png")
    ctx.save_figure(plot_training(dense_losses, {m: ranks[0]["train"][m] for m in ("tp", "sp")}), "training.png")
    ctx.save_figure(plot_memory(memory), "activation_memory.png")
    return {
        "tensor_parallel": t,
        "gelu_mlp_max_err": max(mlp.values()),
        "tp_block_max_err": max(tp.values()),
        "sp_block_max_err": max(sp.values()),
        "tp_allreduces_forward": tp_comm["all_reduce_forward"],
        "tp_allreduces_backward": tp_comm["all_reduce_backward"],
        "tp_comm_bytes": tp_comm["ring_bytes"],
        "sp_comm_bytes": sp_comm["ring_bytes"],
        "comm_bytes_formula": formula,
        "sp_norm_activation_ratio": sp_norm_ratio,
        "tp_saved_bytes": memory[1]["saved_total"],
        "sp_saved_bytes": memory[2]["saved_total"],
        "dense_saved_bytes": memory[0]["saved_total"],
        "train_loss_first": dense_losses[0],
        "train_loss_last": dense_losses[-1],
        "train_loss_max_dev": loss_dev,
        "pipeline_max_err": pipe_err,
        "pipeline_stages": p,
        "micro_batches_max": m_max,
        "in_flight_gpipe": in_flight["gpipe"],
        "in_flight_1f1b": in_flight["1f1b"],
        "schedule_bubble_max_dev": table_dev,
        "bubble_within_tolerance": int(bubble_dev <= cfg.bubble_tolerance),
    }
