"""The multi-process harness itself: gloo collectives on 2 and 4 processes, failures, time-outs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed


def _all_to_all_round_trip(rank, world):
    # Uneven splits: rank r sends (j + 1) rows to rank j, tagged with (sender, receiver).
    send_sizes = [j + 1 for j in range(world)]
    x = torch.cat([torch.full((j + 1, 3), float(100 * rank + j)) for j in range(world)])
    recv_sizes = [rank + 1] * world
    y = torch.empty(sum(recv_sizes), 3)
    dist.all_to_all_single(y, x, output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
    expected = torch.cat([torch.full((rank + 1, 3), float(100 * src + rank)) for src in range(world)])
    assert torch.equal(y, expected)
    back = torch.empty_like(x)
    dist.all_to_all_single(back, y, output_split_sizes=send_sizes, input_split_sizes=recv_sizes)
    assert torch.equal(back, x)
    return rank


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_round_trip(world):
    assert run_distributed(_all_to_all_round_trip, world) == list(range(world))


def _rank_one_raises(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # the others wait on rank 1, which never arrives
    return rank


def test_failure_on_one_rank_fails_the_run_fast():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 ---[\s\S]*rank one is broken on purpose"):
        run_distributed(_rank_one_raises, 2, timeout=60, collective_timeout=5)
    assert time.monotonic() - t0 < 45


def _rank_zero_hangs(rank, world):
    if rank == 0:
        time.sleep(3600)
    return rank


def test_hanging_rank_is_killed_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 of 2 ranks did not finish within 8 s"):
        run_distributed(_rank_zero_hangs, 2, timeout=8)
    assert time.monotonic() - t0 < 30


def _dies_without_report(rank, world):
    if rank == 1:
        os._exit(3)
    return rank


def test_process_that_dies_is_reported():
    with pytest.raises(RuntimeError, match=r"exited with code 3"):
        run_distributed(_dies_without_report, 2, timeout=30)
