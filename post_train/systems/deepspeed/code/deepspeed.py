"""ZeRO stages 1, 2 and 3 (Rajbhandari, Rasley, Ruwase & He 2020) written on torch.distributed
collectives, run on real processes and checked against torch's DistributedDataParallel, a
single-process run, and torch's own sharded engines (ZeroRedundancyOptimizer, FSDP2).

Data parallelism on N ranks: every rank holds the whole model, runs its slice of the global batch, and
the gradients are averaged (all-reduce) so that every rank takes the same optimizer step. Every rank
therefore holds all the model states: Psi parameters, Psi gradients and Adam's 2 Psi moments. ZeRO
removes the redundancy by sharding them (paper, Sec. 5):
    stage 1  P_os      a rank keeps Adam's m and v for its 1/N shard of the parameters only
    stage 2  P_os+g    ... and only the gradient of its shard (a reduce-scatter instead of the all-reduce)
    stage 3  P_os+g+p  ... and only its shard of the parameters: a layer's parameters are all-gathered
                       just before its forward and again before its backward, and freed after each
The formulas (per-rank bytes, communication per step) are in core/memory.py, shared with scripts/memcalc.py.

The implementation follows DeepSpeed's layout:
- `FlatUnit`: parameters copied into one flat fp32 buffer, padded with zeros to a multiple of N; the
  model's parameters become views into it, and rank r owns the contiguous shard [r S, (r+1) S), S =
  padded / N. Stages 1-2 flatten the whole model into one unit; stage 3 keeps one unit per piece it
  gathers: the root (embedding, final norm and the tied LM head, used first and last) and each block.
- Stage 1 step: copy the gradients into the flat gradient buffer, all-reduce, divide by N; AdamW on the
  own shard; all-gather the parameters (in place: every rank's views see the new values).
- Stage 2 step: flatten the gradients, reduce-scatter (a sum) into the own gradient shard, divide by N,
  free the full gradient and every .grad; AdamW; all-gather.
- Stage 3: hooks on the model (`attach_stage3_hooks`). Before a unit's forward its buffer is gathered;
  after it, the buffer is freed (its storage resized to 0, FSDP's trick: the parameter views stay
  valid and hold no memory); when the gradient of a block's output arrives, the block is gathered again
  for its backward; once every parameter of a unit has its gradient, the gradient is reduce-scattered
  into the unit's shard and the buffer freed. AdamW updates the shards; nothing is gathered after it.
- Clipping needs the norm of the whole gradient: at stages 2-3 a rank sums the squares of its shard and
  one all-reduce adds them up (the padding is zero and adds nothing).
- AdamW is written out on the flat shards: the update of torch.optim.AdamW, one step count for all shards.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.config import Range, Seed
from core.distributed import run_on_ranks, world
from core.memory import (
    ModelStates, collective_bytes, padded_numel, paper_model_states, storage_bytes, zero3_peak_param_bytes,
    zero_comm_bytes, zero_model_states,
)
from core.nn.model import ModelConfig, Transformer

STAGES = (1, 2, 3)
METHODS = ("ddp", "stage1", "stage2", "stage3", "zero_optimizer", "fsdp2")
"""what every rank trains, in this order, from the same initial weights on the same data"""
BY_STAGE = ("ddp", "stage1", "stage2", "stage3")
"""the methods of ZeRO stages 0 (plain data parallelism: torch's DDP) to 3, which the formulas describe"""
LAYOUT_WORLD_SIZES = tuple(range(2, 9))
"""world sizes at which the ranks' shards are built in one process and their bytes compared with the
formula: where N does not divide the parameter count, the padding shows"""
SUCCESSORS = 4
"""the synthetic source: each token is followed by one of this many tokens, fixed per token"""
ELEMENT_BYTES = 4
"""fp32 training: 4-byte weights and gradients, Adam's m and v 8 bytes (K = 8)"""


@dataclass
class Config:
    world_size: Annotated[int, Range(ge=2, le=8)] = 2
    """data-parallel ranks (processes of one gloo group; torchrun's when launched by it)"""
    steps: Annotated[int, Range(ge=1, le=500)] = 20
    """optimizer steps every method takes"""
    batch_per_rank: Annotated[int, Range(ge=1, le=256)] = 8
    """sequences per rank per step; the global batch is world_size times this"""
    seq_len: Annotated[int, Range(ge=2, le=1024)] = 64
    """tokens per sequence (also the model's block_size)"""
    vocab_size: Annotated[int, Range(ge=8, le=65_536)] = 512
    """token ids of the synthetic source and the model"""
    n_layer: Annotated[int, Range(ge=1, le=32)] = 4
    """transformer blocks (stage 3 gathers each as one unit)"""
    n_embd: Annotated[int, Range(ge=8, le=2048)] = 128
    """model width"""
    n_head: Annotated[int, Range(ge=1, le=64)] = 4
    """query heads"""
    n_kv_head: Annotated[int, Range(ge=1, le=64)] = 4
    """key/value heads (= n_head: MHA)"""
    ffn_hidden: Annotated[int, Range(ge=1, le=8192)] = 344
    """SwiGLU hidden width"""
    tie_embeddings: bool = True
    """share the embedding with the LM head (both live in stage 3's root unit)"""
    lr: Annotated[float, Range(gt=0, le=1)] = 3e-3
    """AdamW learning rate (constant: the comparison needs no schedule)"""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW beta1"""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW beta2"""
    eps: Annotated[float, Range(gt=0, le=1)] = 1e-8
    """AdamW epsilon"""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.1
    """decoupled weight decay, on every parameter: one flat buffer is one parameter group (DeepSpeed
    keeps one flat buffer per group to exempt norms and embeddings)"""
    max_grad_norm: Annotated[float, Range(gt=0, le=1e6)] = 1.0
    """clip the global gradient norm to this (its norm needs all shards at stages 2-3)"""
    timeout_s: Annotated[float, Range(ge=10, le=7200)] = 900.0
    """the ranks are stopped, and the run fails, after this many seconds"""
    seed: Seed = 0
    """seeds the initial weights (shared by every method) and the synthetic data"""

    def problems(self) -> list[str]:
        try:
            model_config(self)
        except ValueError as exc:
            return [str(exc)]
        return []


def model_config(cfg: Config) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab_size, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, ffn_hidden=cfg.ffn_hidden,
                       tie_embeddings=cfg.tie_embeddings)


# --- data ------------------------------------------------------------------------------------------
def make_batches(cfg: Config) -> Tensor:
    """(steps, world_size * batch_per_rank, seq_len + 1) token ids of a first-order Markov source: each
    token is followed by one of SUCCESSORS tokens fixed for it, uniformly (so the loss can fall from
    ln V towards ln SUCCESSORS)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    successors = torch.randint(0, cfg.vocab_size, (cfg.vocab_size, SUCCESSORS), generator=gen)
    shape = (cfg.steps, cfg.world_size * cfg.batch_per_rank)
    tokens = [torch.randint(0, cfg.vocab_size, shape, generator=gen)]
    for _ in range(cfg.seq_len):
        tokens.append(successors[tokens[-1], torch.randint(0, SUCCESSORS, shape, generator=gen)])
    return torch.stack(tokens, dim=-1)


def rank_slice(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's share of the global batch: consecutive rows, equal counts (so the mean of the ranks'
    mean losses is the global batch's mean loss)."""
    per_rank = batch.shape[0] // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


# --- AdamW on flat shards ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamW:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    max_grad_norm: float

    def torch_optimizer(self, params) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                                 weight_decay=self.weight_decay, foreach=False)

    def update(self, param: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int) -> None:
        """One AdamW step in place, torch.optim.AdamW's arithmetic (Loshchilov & Hutter 2019, Alg. 2):
            theta <- theta (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
            theta <- theta - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)"""
        param.mul_(1 - self.lr * self.weight_decay)
        m.lerp_(grad, 1 - self.beta1)
        v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1 ** step)
        # ** 0.5 as torch writes it (math.sqrt may round the last bit apart)
        denom = (v.sqrt() / (1 - self.beta2 ** step) ** 0.5).add_(self.eps)
        param.addcdiv_(m, denom, value=-step_size)

    def clip_coefficient(self, norm: Tensor) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)


def adamw_of(cfg: Config) -> AdamW:
    return AdamW(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm)


# --- counted collectives ------------------------------------------------------------------------------
class Comm:
    """The collectives the ZeRO engine calls, each counted: the bytes this rank sends in a ring
    implementation (core/memory.collective_bytes), from the tensors passed in."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.sent = 0.0

    def count(self, op: str, tensor: Tensor) -> None:
        self.sent += collective_bytes(op, tensor.numel() * tensor.element_size(), self.world_size)

    def all_reduce(self, tensor: Tensor) -> None:
        dist.all_reduce(tensor)
        self.count("all_reduce", tensor)

    def reduce_scatter(self, out: Tensor, full: Tensor) -> None:
        dist.reduce_scatter_single(out, full)
        self.count("reduce_scatter", full)

    def all_gather(self, full: Tensor, shard: Tensor) -> None:
        dist.all_gather_single(full, shard)
        self.count("all_gather", full)


# --- ZeRO ---------------------------------------------------------------------------------------------
class FlatUnit:
    """Parameters as one flat fp32 buffer padded to a multiple of world_size, the parameters views into
    it; this rank owns the contiguous shard [start, start + shard_numel)."""

    def __init__(self, params: list[nn.Parameter], names: list[str], world_size: int, rank: int):
        self.params, self.names = params, names
        self.numel = sum(p.numel() for p in params)
        self.padded = padded_numel(self.numel, world_size)
        self.shard_numel = self.padded // world_size
        self.start = rank * self.shard_numel
        self.full = self.flatten([p.detach() for p in params])
        offset = 0
        for p in params:
            p.data = self.full[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.gathered = True
        self.grads_ready = 0
        # set by Zero, by stage: the own parameter shard (a view of `full`, or stage 3's own copy), Adam's m
        # and v for it, and the gradient buffer (stage 1: the whole flat gradient; stages 2-3: the shard)
        self.shard = self.m = self.v = self.grad = torch.empty(0)

    def flatten(self, tensors: list[Tensor], out: Tensor | None = None) -> Tensor:
        """The tensors laid out as the parameters are, the padding zero."""
        flat = torch.zeros(self.padded) if out is None else out.zero_()
        offset = 0
        for t in tensors:
            flat[offset:offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        return flat

    def own(self, flat: Tensor) -> Tensor:
        """This rank's shard of a flat buffer (a view)."""
        return flat[self.start:self.start + self.shard_numel]


class Zero:
    """ZeRO stage 1, 2 or 3 over a model whose parameters it takes over. Per training step:
    `loss.backward()` (stage 3: its hooks gather, free and reduce-scatter during the forward and
    backward), `reduce_gradients()`, then `update()`. Built without a Comm (no process group), it only
    lays out the shards: the byte counts of any rank at any world size, in one process."""

    def __init__(self, model: Transformer, stage: int, world_size: int, rank: int, adamw: AdamW,
                 comm: Comm | None = None):
        self.model, self.stage, self.world_size, self.adamw, self.comm = model, stage, world_size, adamw, comm
        names = {id(p): name for name, p in model.named_parameters()}
        groups = [list(model.parameters())] if stage < 3 else stage3_units(model)
        self.units = [FlatUnit(g, [names[id(p)] for p in g], world_size, rank) for g in groups]
        for unit in self.units:
            unit.shard = unit.own(unit.full) if stage < 3 else unit.own(unit.full).clone()
            unit.m, unit.v = torch.zeros(unit.shard_numel), torch.zeros(unit.shard_numel)
            # stage 1 reduces the whole gradient (a persistent flat buffer); stages 2-3 keep their shard only
            unit.grad = torch.zeros(unit.padded if stage == 1 else unit.shard_numel)
            if stage == 3:
                self.free(unit)
        self.step_count = 0
        self.peak_param_bytes = self.state_bytes().params
        """the most parameter bytes this rank held at once: stage 3's shards plus the units gathered"""
        if stage == 3:
            attach_stage3_hooks(self)

    # --- stage 3's gather and free
    def gather(self, unit: FlatUnit) -> None:
        if unit.gathered:
            return
        unit.full.untyped_storage().resize_(unit.padded * ELEMENT_BYTES)
        self.comm.all_gather(unit.full, unit.shard)
        unit.gathered = True
        self.peak_param_bytes = max(self.peak_param_bytes, self.state_bytes().params)

    def free(self, unit: FlatUnit) -> None:
        unit.full.untyped_storage().resize_(0)
        unit.gathered = False

    def unit_gradient_ready(self, unit: FlatUnit) -> None:
        """Stage 3, called as each parameter's gradient is accumulated: when the unit's last one is in,
        reduce-scatter the unit's gradient and free its parameters until the next forward."""
        unit.grads_ready += 1
        if unit.grads_ready == len(unit.params):
            unit.grads_ready = 0
            self.reduce_scatter(unit)
            self.free(unit)

    # --- the step
    def reduce_scatter(self, unit: FlatUnit) -> None:
        """Stages 2-3: the unit's gradient summed over ranks into this rank's shard, then the mean."""
        self.comm.reduce_scatter(unit.grad, unit.flatten([p.grad for p in unit.params]))
        unit.grad.div_(self.world_size)  # the sum over the ranks -> their mean, DDP's gradient
        for p in unit.params:
            p.grad = None  # the full gradient is freed: only the shard stays

    def reduce_gradients(self) -> None:
        """After backward: stage 1 all-reduces the whole flat gradient, stage 2 reduce-scatters it
        (stage 3 did it unit by unit during the backward)."""
        if self.stage == 3:
            return
        (unit,) = self.units
        if self.stage == 1:
            unit.flatten([p.grad for p in unit.params], out=unit.grad)
            for p in unit.params:
                p.grad = None
            self.comm.all_reduce(unit.grad)
            unit.grad.div_(self.world_size)
        else:
            self.reduce_scatter(unit)

    def grad_shards(self) -> list[Tensor]:
        """The averaged gradient of this rank's shard of each unit."""
        return [unit.own(unit.grad) if self.stage == 1 else unit.grad for unit in self.units]

    def grad_norm(self) -> Tensor:
        """The norm of the whole averaged gradient: stage 1 holds all of it; stages 2-3 add up the
        squared norms of the ranks' shards."""
        if self.stage == 1:
            return self.units[0].grad.square().sum().sqrt()  # (Tensor.norm sums less accurately: 5e-6 off)
        squares = torch.stack([g.square().sum() for g in self.grad_shards()]).sum()
        self.comm.all_reduce(squares)
        return squares.sqrt()

    def update(self) -> float:
        """Clip, AdamW on the own shards, and (stages 1-2) all-gather the parameters; the norm before clipping."""
        norm = self.grad_norm()
        coefficient = self.adamw.clip_coefficient(norm)
        self.step_count += 1
        for unit, grad in zip(self.units, self.grad_shards()):
            grad.mul_(coefficient)
            self.adamw.update(unit.shard, grad, unit.m, unit.v, self.step_count)
            if self.stage < 3:
                self.comm.all_gather(unit.full, unit.shard)
        return float(norm)

    def state_bytes(self) -> ModelStates:
        """What this rank holds, measured from the tensors: the parameters (views of a freed stage-3
        buffer hold nothing), gradients (any .grad left and the engine's buffers), Adam's m and v."""
        params = [p for u in self.units for p in u.params] + [u.shard for u in self.units]
        grads = [p.grad for u in self.units for p in u.params] + [u.grad for u in self.units]
        return ModelStates(storage_bytes(params), storage_bytes(grads),
                           storage_bytes([t for u in self.units for t in (u.m, u.v)]))

    def full_parameters(self) -> dict[str, Tensor]:
        """Every parameter's current value (stage 3 gathers each unit for the copy and frees it again)."""
        out = {}
        for unit in self.units:
            was_gathered = unit.gathered
            self.gather(unit)
            out.update({name: p.detach().clone() for name, p in zip(unit.names, unit.params)})
            if self.stage == 3 and not was_gathered:
                self.free(unit)
        return out


def stage3_units(model: Transformer) -> list[list[nn.Parameter]]:
    """The root (every parameter outside the blocks: the embedding, the final norm, the LM head, tied
    or not), then each block's parameters."""
    in_blocks = {id(p) for p in model.blocks.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return [root] + [list(block.parameters()) for block in model.blocks]


def attach_stage3_hooks(zero: Zero) -> None:
    """Gather the root at the start of the forward (it is freed after the backward); gather a block
    before its forward and free it after; gather it again when its output's gradient arrives, i.e.
    before its backward; reduce-scatter and free a unit once all its parameters have their gradients."""
    root, *blocks = zero.units
    zero.model.register_forward_pre_hook(lambda module, args: zero.gather(root))
    for block, unit in zip(zero.model.blocks, blocks):
        block.register_forward_pre_hook(lambda module, args, unit=unit: zero.gather(unit))
        block.register_forward_hook(partial(_after_block_forward, zero, unit))
    for unit in zero.units:
        for p in unit.params:
            p.register_post_accumulate_grad_hook(lambda p, unit=unit: zero.unit_gradient_ready(unit))


def _after_block_forward(zero: Zero, unit: FlatUnit, module: nn.Module, args: Any, output: Tensor) -> None:
    zero.free(unit)
    if output.requires_grad:
        output.register_hook(lambda grad: zero.gather(unit))


# --- the methods, on each rank ----------------------------------------------------------------------
@dataclass
class Report:
    """One method's run on one rank."""
    method: str
    losses: list[float] = field(default_factory=list)
    """this rank's mean loss at each step"""
    grad_norms: list[float] = field(default_factory=list)
    """norm of the averaged gradient before clipping, each step"""
    max_grad_diff: float = 0.0
    """largest |averaged gradient - DDP's| over this rank's shard and the steps (the ZeRO stages)"""
    state_bytes: ModelStates | None = None
    comm_bytes_per_step: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    peak_param_bytes: int = 0
    max_param_diff_vs_ddp: float = 0.0
    final: dict[str, Any] | None = None
    """the parameters after the last step (returned by rank 0 only, for the single-process comparison)"""


@dataclass
class Job:
    cfg: Config
    init: dict[str, Tensor]
    batches: Tensor


def fresh_model(job: Job) -> Transformer:
    model = Transformer(model_config(job.cfg))
    model.load_state_dict(job.init)
    return model


def train_with_torch(report: Report, step_model: nn.Module, model: nn.Module, opt: torch.optim.Optimizer,
                     batches: Tensor, max_grad_norm: float, after_backward=None, state_of=None) -> Report:
    """The training loop of torch's engines: forward through `step_model` (the DDP wrapper, or the model
    FSDP2 sharded), clip_grad_norm_, opt.step(); the bytes the rank holds at the end of each step (the
    optimizer state from `state_of`, default `opt`)."""
    def full(t: Tensor) -> Tensor:
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2's DTensors
    for batch in batches:
        t0 = time.perf_counter()
        loss = step_model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        if after_backward is not None:
            after_backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        report.step_seconds.append(time.perf_counter() - t0)
        report.losses.append(loss.item())
        report.grad_norms.append(float(full(norm)))
        report.state_bytes = torch_state_bytes(model, state_of or opt)
        opt.zero_grad(set_to_none=False)
    report.final = {name: full(p).detach().clone() for name, p in model.named_parameters()}
    return report


def torch_state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> ModelStates:
    """Bytes of a torch-trained model's parameters, gradients and optimizer state on this rank (the
    local shards of DTensors). torch's AdamW keeps a float32 step count per parameter tensor beside m, v."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    params = [local(p) for p in model.parameters()]
    grads = [local(p.grad) if p.grad is not None else None for p in model.parameters()]
    states = [local(v) for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]
    return ModelStates(storage_bytes(params), storage_bytes(grads), storage_bytes(states))


def train_ddp(job: Job, batches: Tensor, grads_per_step: list[dict[str, Tensor]]) -> Report:
    """torch's DistributedDataParallel (gradients as views of its all-reduce buckets) with torch's AdamW
    and clip_grad_norm_: the reference every sharded method must equal. Records the averaged gradient
    of each step in `grads_per_step`, and counts the bytes its all-reduce hook is handed."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    comm = Comm(job.cfg.world_size)
    model = fresh_model(job)
    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)

    def counted_allreduce(state: Comm, bucket):
        state.count("all_reduce", bucket.buffer())
        return default_hooks.allreduce_hook(None, bucket)  # divides by N, then all-reduces (a sum)

    ddp.register_comm_hook(comm, counted_allreduce)
    adamw = adamw_of(job.cfg)
    report = train_with_torch(
        Report("ddp"), ddp, model, adamw.torch_optimizer(model.parameters()), batches, adamw.max_grad_norm,
        after_backward=lambda: grads_per_step.append({n: p.grad.clone() for n, p in model.named_parameters()}))
    report.comm_bytes_per_step = comm.sent / len(batches)
    report.peak_param_bytes = report.state_bytes.params
    return report


def train_zero(job: Job, batches: Tensor, stage: int, rank: int, ddp_grads: list[dict[str, Tensor]]) -> Report:
    """Our ZeRO stage `stage`; each step's reduced gradient shards are compared with DDP's gradient."""
    comm = Comm(job.cfg.world_size)
    model = fresh_model(job)
    zero = Zero(model, stage, job.cfg.world_size, rank, adamw_of(job.cfg), comm)
    report = Report(f"stage{stage}")
    for batch, reference in zip(batches, ddp_grads):
        t0 = time.perf_counter()
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        zero.reduce_gradients()
        ours_vs_ddp = [(g - unit.own(unit.flatten([reference[n] for n in unit.names]))).abs().max()
                       for unit, g in zip(zero.units, zero.grad_shards())]
        report.grad_norms.append(zero.update())
        report.step_seconds.append(time.perf_counter() - t0)
        report.losses.append(loss.item())
        report.max_grad_diff = max(report.max_grad_diff, float(torch.stack(ours_vs_ddp).max()))
        report.state_bytes = zero.state_bytes()
    report.comm_bytes_per_step = comm.sent / len(batches)
    report.peak_param_bytes = zero.peak_param_bytes
    report.final = zero.full_parameters()
    return report


def train_zero_redundancy_optimizer(job: Job, batches: Tensor) -> Report:
    """torch's ZeroRedundancyOptimizer (stage 1: whole parameters assigned to ranks, greedily by size)
    over DDP's averaged gradients."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = fresh_model(job)
    adamw = adamw_of(job.cfg)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=adamw.lr,
                                  betas=(adamw.beta1, adamw.beta2), eps=adamw.eps,
                                  weight_decay=adamw.weight_decay, foreach=False)
    return train_with_torch(Report("zero_optimizer"), DistributedDataParallel(model), model, opt, batches,
                            adamw.max_grad_norm, state_of=opt.optim)


def train_fsdp2(job: Job, batches: Tensor) -> Report:
    """torch's FSDP2 (`fully_shard`: each block, then the root), with torch's AdamW on the sharded
    DTensor parameters; it runs on CPU over gloo in torch 2.13."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = fresh_model(job)
    mesh = init_device_mesh("cpu", (job.cfg.world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    adamw = adamw_of(job.cfg)
    return train_with_torch(Report("fsdp2"), model, model, adamw.torch_optimizer(model.parameters()), batches,
                            adamw.max_grad_norm)


def max_abs_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def relative_distance(a: dict[str, Tensor], b: dict[str, Tensor], start: dict[str, Tensor]) -> float:
    """||a - b|| / ||a - start|| over all parameters: how far apart two runs ended, relative to how far
    training moved them. A max |difference| is ruled by the few weights whose gradient is near 0, where
    Adam divides a rounding difference by a tiny sqrt(v)."""
    def flat(d):
        return torch.cat([d[name].reshape(-1) for name in a])
    return float((flat(a) - flat(b)).norm() / (flat(a) - flat(start)).norm())


def rank_main(rank: int, world_size: int, job: Job) -> list[dict[str, Report]] | None:
    """Every method on this rank's slice of each global batch; then every rank's reports gathered
    (rank 0's with the final parameters). Returns them on rank 0, and on every rank under torchrun
    (where each rank computes the metrics); a spawned rank other than 0 returns None."""
    if dist.get_backend() != "gloo":
        raise RuntimeError(f"this module's ranks run on the CPU over gloo; the process group uses "
                           f"{dist.get_backend()} (torchrun on a CUDA machine: run it without torchrun)")
    batches = torch.stack([rank_slice(b, rank, world_size) for b in job.batches])
    ddp_grads: list[dict[str, Tensor]] = []
    reports = {"ddp": train_ddp(job, batches, ddp_grads)}
    for stage in STAGES:
        reports[f"stage{stage}"] = train_zero(job, batches, stage, rank, ddp_grads)
    reports["zero_optimizer"] = train_zero_redundancy_optimizer(job, batches)
    reports["fsdp2"] = train_fsdp2(job, batches)
    for report in reports.values():
        report.max_param_diff_vs_ddp = max_abs_diff(report.final, reports["ddp"].final)
    for report in reports.values():
        # rank 0's travel as numpy arrays: core.distributed's queue would share a tensor's memory with the
        # parent through a file descriptor, which the rank closes when it exits
        report.final = {k: v.numpy() for k, v in report.final.items()} if rank == 0 else None
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, reports)
    return everyone if rank == 0 or world()[1] > 1 else None


# --- the single-process reference, in the parent -------------------------------------------------------
def train_single_process(job: Job) -> tuple[dict[str, Tensor], list[float]]:
    """One process, the whole global batch each step, torch's AdamW and clip_grad_norm_: what data
    parallelism must reproduce. Returns the final parameters and the losses."""
    model = fresh_model(job)
    adamw = adamw_of(job.cfg)
    opt = adamw.torch_optimizer(model.parameters())
    losses = []
    for batch in job.batches:
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), adamw.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {name: p.detach().clone() for name, p in model.named_parameters()}, losses


# --- formulas beside the measurements ----------------------------------------------------------------
def unit_numels(model: Transformer) -> list[int]:
    """Elements of stage 3's units (root first); stages 0-2 use their sum."""
    return [sum(p.numel() for p in unit) for unit in stage3_units(model)]


def formula_states(model: Transformer, stage: int, world_size: int) -> ModelStates:
    """The exact per-rank bytes (core/memory.zero_model_states, fp32 Adam). Stage 0 is torch's DDP with
    torch's AdamW, which adds a 4-byte step count per parameter tensor to m and v."""
    states = zero_model_states(unit_numels(model), world_size, stage)
    if stage == 0:
        step_counts = 4 * len(list(model.parameters()))
        states = ModelStates(states.params, states.grads, states.optimizer + step_counts)
    return states


def layout_mismatches(cfg: Config) -> tuple[int, int, list[dict]]:
    """Build the shards of the first and the last rank (which holds the padding) at every world size in
    LAYOUT_WORLD_SIZES, in this process (no collectives: only the layout), and compare the bytes they
    allocate with the formula. Returns (mismatches, comparisons, rows)."""
    rows, mismatches = [], 0
    for n in LAYOUT_WORLD_SIZES:
        for rank in sorted({0, n - 1}):
            for stage in STAGES:
                torch.manual_seed(0)
                model = Transformer(model_config(cfg))
                expected = formula_states(model, stage, n)
                measured = Zero(model, stage, n, rank, adamw_of(cfg)).state_bytes()
                wrong = [k for k in ("params", "grads", "optimizer") if getattr(measured, k) != getattr(expected, k)]
                mismatches += len(wrong)
                rows.append({"world_size": n, "rank": rank, "stage": stage,
                             "padding": padded_numel(sum(unit_numels(model)), n) - sum(unit_numels(model)),
                             "params": measured.params, "params_formula": expected.params,
                             "grads": measured.grads, "grads_formula": expected.grads,
                             "optimizer": measured.optimizer, "optimizer_formula": expected.optimizer})
    return mismatches, 3 * len(rows), rows


# --- plots --------------------------------------------------------------------------------------------
def plot_memory(measured: dict[str, ModelStates], formula: dict[str, ModelStates], paper: dict[str, ModelStates],
                psi: int, world_size: int):
    import matplotlib.pyplot as plt  # here, not on top: every rank imports this file and draws nothing
    labels = list(measured)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    colours = {"params": "tab:blue", "grads": "tab:orange", "optimizer": "tab:green"}
    x = np.arange(len(labels))
    for offset, source, hatch, tag in ((-0.28, measured, "", "measured"), (0.0, formula, "//", "formula (fp32, K=8)"),
                                       (0.28, paper, "..", "paper, mixed precision (K=12)")):
        bottom = np.zeros(len(labels))
        for kind, colour in colours.items():
            values = np.array([getattr(source[m], kind) / 2**20 if m in source else np.nan for m in labels])
            ax.bar(x + offset, np.nan_to_num(values), 0.26, bottom=bottom, color=colour, hatch=hatch,
                   edgecolor="black", linewidth=0.4, label=f"{kind}, {tag}")
            bottom += np.nan_to_num(values)
    ax.set_xticks(x, labels)
    ax.set(ylabel="MiB per rank", title=f"model states per rank, Psi = {psi:,} parameters, N = {world_size}")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    fig.tight_layout()
    return fig


def plot_losses(history: list[dict]):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for method in ("single_process", *METHODS):
        rows = [r for r in history if r["method"] == method]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=method,
                lw=3 if method == "single_process" else 1, alpha=0.6 if method == "single_process" else 1)
    ax.set(xlabel="step", ylabel="training loss (mean over ranks)", title="every method, the same losses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- the run ----------------------------------------------------------------------------------------
def run(cfg: Config, ctx) -> dict[str, float]:
    torch.manual_seed(cfg.seed)
    model = Transformer(model_config(cfg))
    init = {name: t.clone() for name, t in model.state_dict().items()}
    job = Job(cfg, init, make_batches(cfg))
    psi, n = model.num_params(), cfg.world_size

    t0 = time.perf_counter()
    single, single_losses = train_single_process(job)
    single_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    returned = run_on_ranks(rank_main, n, job, timeout_s=cfg.timeout_s)
    ranks_seconds = time.perf_counter() - t0
    per_rank: list[dict[str, Report]] = next(r for r in returned if r is not None)
    ctx.say(f"{n} ranks (gloo) trained DDP, ZeRO stages 1-3, ZeroRedundancyOptimizer and FSDP2 for {cfg.steps} "
            f"steps each on a {psi:,}-parameter Transformer in {ranks_seconds:.1f} s")

    # equality: every method against DDP (on every rank), DDP against one process on the whole batch
    diff = {m: max(r[m].max_param_diff_vs_ddp for r in per_rank) for m in METHODS}
    ddp_final = {name: torch.from_numpy(value) for name, value in per_rank[0]["ddp"].final.items()}
    max_param_diff_single = max_abs_diff(ddp_final, single)
    max_param_change = max_abs_diff(ddp_final, init)
    rel_diff_single = relative_distance(ddp_final, single, init)
    max_grad_diff = max(r[f"stage{s}"].max_grad_diff for r in per_rank for s in STAGES)
    grad_norm_rel_err = max(abs(a - b) / b for r in per_rank for s in STAGES
                            for a, b in zip(r[f"stage{s}"].grad_norms, r["ddp"].grad_norms))
    ctx.say(f"max |param - DDP's| after {cfg.steps} steps: " +
            ", ".join(f"{m} {diff[m]:.1e}" for m in METHODS if m != "ddp") +
            f"; DDP vs one process on the whole batch {max_param_diff_single:.1e} ({rel_diff_single:.1e} of the distance "
            f"trained; the steps moved the weights by up to {max_param_change:.3f}); reduced gradients vs DDP's "
            f"{max_grad_diff:.1e}")

    # history: the losses, averaged over ranks (equal shares of the global batch)
    for step in range(cfg.steps):
        ctx.log("history", method="single_process", step=step + 1, loss=single_losses[step], grad_norm=float("nan"))
        for m in METHODS:
            ctx.log("history", method=m, step=step + 1, loss=float(np.mean([r[m].losses[step] for r in per_rank])),
                    grad_norm=per_rank[0][m].grad_norms[step])

    # bytes per rank: measured from the tensors, beside the exact formula and the paper's
    measured = {m: per_rank[0][m].state_bytes for m in METHODS}
    formula = {m: formula_states(model, s, n) for s, m in enumerate(BY_STAGE)}
    paper = {m: paper_model_states(psi, n, s) for s, m in enumerate(BY_STAGE)}
    bytes_mismatches = 0
    for rank, reports in enumerate(per_rank):
        for m in METHODS:
            got, want = reports[m].state_bytes, formula.get(m)
            row = {"method": m, "rank": rank, "params": got.params, "grads": got.grads, "optimizer": got.optimizer}
            if want is not None:
                bytes_mismatches += sum(getattr(got, k) != getattr(want, k) for k in ("params", "grads", "optimizer"))
                row.update(params_formula=want.params, grads_formula=want.grads, optimizer_formula=want.optimizer)
            if m in paper:
                row.update(paper_mixed_precision_total=paper[m].total)
            ctx.log("memory", **row)
    layout_wrong, layout_compared, layout_rows = layout_mismatches(cfg)
    for row in layout_rows:
        ctx.log("layout", **row)
    ctx.say("bytes per rank, measured (formula): " + "; ".join(
        f"{m} params {measured[m].params:,} grads {measured[m].grads:,} optimizer {measured[m].optimizer:,}"
        f" ({formula[m].optimizer:,})" for m in BY_STAGE))
    ctx.say(f"{bytes_mismatches} of {3 * len(formula) * n} measured byte counts differ from the formula on the ranks, "
            f"{layout_wrong} of {layout_compared} in the layouts at N = 2..8 (padding included)")

    # communication per step and rank
    comm = {m: max(r[m].comm_bytes_per_step for r in per_rank) for m in BY_STAGE}
    comm_formula = {m: zero_comm_bytes(s, unit_numels(model), n) for s, m in enumerate(BY_STAGE)}
    comm_mismatches = sum(abs(r[m].comm_bytes_per_step - comm_formula[m]) > 1e-9 * comm_formula[m]
                          for r in per_rank for m in BY_STAGE)
    psi_unit = psi * ELEMENT_BYTES * (n - 1) / n
    for m in comm:
        ctx.log("comm", method=m, bytes_per_step=comm[m], formula=comm_formula[m], psi_units=comm[m] / psi_unit)
    ctx.say("communication per step and rank, in units of Psi (N-1)/N fp32 elements: " +
            ", ".join(f"{m} {comm[m] / psi_unit:.3f}" for m in comm))

    for m in METHODS:
        steps = per_rank[0][m].step_seconds
        ctx.measure(**{f"step_ms_{m}": 1000 * float(np.mean(steps[1:] if len(steps) > 1 else steps))})
    ctx.measure(ranks_seconds=ranks_seconds, single_process_seconds=single_seconds)

    ctx.save_figure(plot_memory(measured, formula, paper, psi, n), "memory.png")
    ctx.save_figure(plot_losses(ctx.tables["history"]), "loss.png")

    zero_opt = [r["zero_optimizer"].state_bytes.optimizer for r in per_rank]
    history = [r for r in ctx.tables["history"] if r["method"] == "ddp"]
    metrics = {
        "psi": psi,
        "padded_psi": padded_numel(psi, n),
        **{f"max_param_diff_{m}": diff[m] for m in METHODS if m != "ddp"},
        "max_param_diff_single": max_param_diff_single,
        "rel_diff_single": rel_diff_single,
        "max_param_change": max_param_change,
        "max_grad_diff": max_grad_diff,
        "grad_norm_rel_err": grad_norm_rel_err,
        "bytes_mismatches": bytes_mismatches + layout_wrong,
        "layout_comparisons": layout_compared,
        "comm_mismatches": comm_mismatches,
        "stage3_peak_param_bytes": max(r["stage3"].peak_param_bytes for r in per_rank),
        "stage3_peak_formula": zero3_peak_param_bytes(unit_numels(model), n),
        "zero_optimizer_state_min": min(zero_opt),
        "zero_optimizer_state_max": max(zero_opt),
        "fsdp2_param_bytes": measured["fsdp2"].params,
        "fsdp2_optimizer_bytes": measured["fsdp2"].optimizer,
        "initial_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
    }
    for s, m in enumerate(BY_STAGE):
        metrics.update({f"params_bytes_stage{s}": measured[m].params, f"grads_bytes_stage{s}": measured[m].grads,
                        f"optim_bytes_stage{s}": measured[m].optimizer,
                        f"optim_bytes_stage{s}_formula": formula[m].optimizer,
                        f"paper_bytes_stage{s}": paper[m].total,
                        f"comm_bytes_stage{s}": comm[m], f"comm_psi_stage{s}": comm[m] / psi_unit})
    return metrics

