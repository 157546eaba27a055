"""core/distributed.run_on_ranks: real processes, a real gloo group, failures reported and cleaned up."""
from __future__ import annotations

import time

import pytest
import torch

from core.distributed import RankFailed, run_on_ranks


def _sum_of_ranks(rank: int, world_size: int, scale: float) -> tuple[int, torch.Tensor]:
    x = torch.tensor([float(rank + 1)])
    torch.distributed.all_reduce(x)
    return rank, x * scale  # a tensor comes back from a rank that has exited


def _fail_on_rank_one(rank: int, world_size: int, _) -> int:
    if rank == 1:
        raise ValueError("planted failure")
    return rank


def _hang(rank: int, world_size: int, _) -> None:
    time.sleep(60)


def test_every_rank_joins_one_group_and_returns_its_result():
    (r0, x0), (r1, x1) = run_on_ranks(_sum_of_ranks, 2, 10.0)
    assert (r0, r1) == (0, 1) and x0.tolist() == x1.tolist() == [30.0]   # (1 + 2) * 10 on both ranks


def test_a_failing_rank_is_named_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 failed.*ValueError: planted failure"):
        run_on_ranks(_fail_on_rank_one, 2, timeout_s=60)


def test_ranks_that_outlive_the_timeout_are_stopped():
    import multiprocessing

    start = time.monotonic()
    with pytest.raises(RankFailed, match="still running after"):
        run_on_ranks(_hang, 2, timeout_s=3)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()
