"""Pipeline parallelism: the GPipe and 1F1B schedules, their bubble in schedule slots, and a stage's
part of one training step on real ranks (point-to-point send/recv of activations and gradients).

The model's layers are cut into p stages, one per rank; the batch into m micro-batches. Stage s runs
F_i (forward of micro-batch i) once stage s - 1 has sent it F_i's output, and B_i (backward) once
stage s + 1 has sent it the gradient of that output. With every F taking t_f and every B t_b on every
stage, each stage is busy m (t_f + t_b) out of a step of (m + p - 1)(t_f + t_b), so

    bubble = idle / total = (p - 1) / (m + p - 1)        (Huang et al. 2019, GPipe; Narayanan et al. 2021)

for GPipe (all forwards, then all backwards) and for 1F1B alike (PipeDream-Flush: after p - s - 1
warm-up forwards, stage s alternates one forward and one backward). What 1F1B changes is memory:
a stage keeps a micro-batch's activations from its F to its B, and 1F1B holds at most p of them where
GPipe holds all m.

`schedule` is the one source of each stage's order of work: the slot simulation (`simulate`) and the
ranks (`run_stage_step`) both read it. Messages between two ranks arrive in the order they were sent,
so a sender and a receiver that disagree about the order exchange the wrong micro-batches' tensors.
"""
from __future__ import annotations

import time
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Schedule = Literal["gpipe", "1f1b"]
SCHEDULES: tuple[Schedule, ...] = ("gpipe", "1f1b")


def bubble_formula(p: int, m: int) -> Fraction:
    """The idle share of a pipeline step with p equal stages and m micro-batches."""
    return Fraction(p - 1, m + p - 1)


def schedule(kind: Schedule, stage: int, p: int, m: int) -> list[tuple[str, int]]:
    """Stage `stage`'s work for one step, in order: ("F", i) and ("B", i) for micro-batches i < m."""
    if kind == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warmup = min(p - stage - 1, m)        # forwards in flight before the first backward reaches this stage
    ops = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):           # steady state: one forward, one backward
        ops += [("F", warmup + i), ("B", i)]
    return ops + [("B", i) for i in range(m - warmup, m)]      # cool-down: the backwards still owed


def simulate(kind: Schedule, p: int, m: int, t_f: int = 1, t_b: int = 2) -> dict:
    """Run the schedule on an ideal clock: each op starts when its stage is free and its input exists
    (F_i on stage s after F_i on s - 1; B_i after B_i on s + 1, or after F_i on the last stage).
    Returns each op's (start, end) per stage, the step's length in slots, the bubble as an exact
    fraction, and the most micro-batches any stage holds between their F and B."""
    ops = [schedule(kind, s, p, m) for s in range(p)]
    done: dict[tuple[int, str, int], int] = {}          # (stage, op, micro-batch) -> end slot
    slots: list[list[tuple[str, int, int, int]]] = [[] for _ in range(p)]
    cursor, free = [0] * p, [0] * p
    while any(cursor[s] < len(ops[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if cursor[s] == len(ops[s]):
                continue
            op, i = ops[s][cursor[s]]
            needs = ((s - 1, "F", i) if s > 0 else None) if op == "F" else \
                    ((s + 1, "B", i) if s < p - 1 else (s, "F", i))
            if needs is not None and needs not in done:
                continue
            start = max(free[s], done.get(needs, 0))
            end = start + (t_f if op == "F" else t_b)
            done[(s, op, i)] = free[s] = end
            slots[s].append((op, i, start, end))
            cursor[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{kind} schedule deadlocks at p={p}, m={m}")
    makespan = max(free)
    busy = sum(end - start for stage in slots for _, _, start, end in stage)
    return {"slots": slots, "makespan": makespan, "bubble": 1 - Fraction(busy, p * makespan),
            "peak_in_flight": max(peak_in_flight(stage_ops) for stage_ops in ops)}


def peak_in_flight(ops: list[tuple[str, int]]) -> int:
    """The most micro-batches whose forward has run and backward has not, along one stage's order."""
    held = peak = 0
    for op, _ in ops:
        held += 1 if op == "F" else -1
        peak = max(peak, held)
    return peak


# --- one stage of a real pipeline ---------------------------------------------------------------------
class Stage(nn.Module):
    """A run of consecutive blocks of the model (each called as block(x, None, 0): no KV cache)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, None, 0)
        return x


def micro_batch_loss(output: Tensor, target: Tensor, m: int) -> Tensor:
    """The batch loss is the mean squared error over the whole batch: each of the m equal micro-batches
    contributes its own mean / m, so the gradients summed over the micro-batches are the batch's."""
    return F.mse_loss(output, target) / m


def run_stage_step(stage: Stage, rank: int, p: int, m: int, kind: Schedule, inputs: list[Tensor] | None,
                   targets: list[Tensor] | None, shape: tuple[int, ...]) -> dict:
    """This rank's part of one pipeline step: `schedule`'s ops in order, activations received from
    rank - 1 and sent to rank + 1, gradients the other way. Stage 0 reads `inputs`, the last stage
    `targets` (m micro-batches each, of `shape`). Sends are non-blocking (isend): a blocking send of F_i's output
    could wait for a receiver that is itself blocked sending a gradient back, and 1F1B has such pairs.
    Returns the compute intervals (perf_counter seconds), the peak number of micro-batches held, and
    on the last stage the outputs."""
    first, last = rank == 0, rank == p - 1
    in_flight: dict[int, tuple[Tensor, Tensor]] = {}
    pending, events, outputs, peak = [], [], {}, 0
    for op, i in schedule(kind, rank, p, m):
        if op == "F":
            x = inputs[i] if first else _receive(shape, rank - 1)
            x.requires_grad_()            # every stage computes its input's gradient: equal-cost stages
            start = time.perf_counter()
            y = stage(x)
            held = micro_batch_loss(y, targets[i], m) if last else y
            events.append(("F", i, start, time.perf_counter()))
            if last:
                outputs[i] = y.detach()
            else:
                pending.append(torch.distributed.isend(y.detach(), rank + 1))
            in_flight[i] = (x, held)
            peak = max(peak, len(in_flight))
        else:
            x, held = in_flight.pop(i)
            grad = None if last else _receive(shape, rank + 1)
            start = time.perf_counter()
            held.backward(grad)
            events.append(("B", i, start, time.perf_counter()))
            if not first:
                pending.append(torch.distributed.isend(x.grad, rank - 1))
    for work in pending:
        work.wait()
    return {"events": events, "peak_in_flight": peak, "outputs": [outputs[i] for i in sorted(outputs)]}


def _receive(shape: tuple[int, ...], src: int) -> Tensor:
    buffer = torch.empty(shape)
    torch.distributed.recv(buffer, src)
    return buffer
