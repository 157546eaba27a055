"""The torchrun process group, as far as the platform needs it: which rank this process is, whether it
is the one that writes artifacts, joining the group and waiting for the others. Data-parallel
training loops take these from here; the run context uses them to let rank 0 alone write.
"""
from __future__ import annotations

import os

import torch


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
