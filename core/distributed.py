"""The torchrun process group, as far as the platform needs it: which rank this process is, whether it
is the one that writes artifacts, joining the group and waiting for the others. Data-parallel
training loops take these from here; the run context uses them to let rank 0 alone write.
run_on_ranks runs a function on several ranks: torchrun's, or processes it spawns and cleans up
(the distributed-training modules check their sharded results against one process this way).
"""
from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, TypeVar

import torch
import torch.multiprocessing as mp

R = TypeVar("R")


def world() -> tuple[int, int]:
    """(rank, world_size) from the variables torchrun sets; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes artifacts, checkpoints and the run index."""
    return world()[0] == 0


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl with one GPU per rank) if there is one."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=size)
    return rank, size


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank of run_on_ranks raised, died or ran out of time; the message names which and why."""


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, arg: Any, results: Any) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores: one thread each, no oversubscription
    try:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world_size)
        # pickled here, by value: the queue alone would pass tensors as shared memory, which a rank that
        # has exited can no longer hand over
        results.put((rank, True, pickle.dumps(fn(rank, world_size, arg))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it with the rank's name
        results.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_on_ranks(fn: Callable[[int, int, Any], R], world_size: int, arg: Any = None,
                 timeout_s: float = 300.0) -> list[R]:
    """fn(rank, world_size, arg) on world_size ranks of one process group; each rank's return value.

    Under torchrun with world_size ranks this process is one of them: the group is joined and fn runs
    here (every rank gets only its own result, in a list of one). Otherwise world_size fresh processes
    are spawned on a free port (gloo: the collectives run on the CPU), and they are killed on a failure
    or after timeout_s, so no stray rank outlives the call. fn and arg must be picklable (a function
    defined at a module's top level)."""
    rank, size = world()
    if size > 1:
        if size != world_size:
            raise RankFailed(f"torchrun started {size} ranks; this run needs {world_size}")
        init_distributed()
        return [fn(rank, size, arg)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, arg, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            try:
                r, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise RankFailed(f"ranks {sorted(set(range(world_size)) - set(out))} still running after "
                                     f"{timeout_s:.0f} s: stopped") from None
                continue
            if not ok:
                raise RankFailed(f"rank {r} failed:\n{value}")
            out[r] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
