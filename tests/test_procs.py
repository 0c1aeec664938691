"""dbsp._procs.join_or_kill: processes that exit are joined untouched; stuck ones are killed and reaped."""

import signal
import time

import torch.multiprocessing as mp

from dbsp._procs import join_or_kill


def test_join_or_kill_joins_finished_and_kills_stuck_processes():
    ctx = mp.get_context("spawn")
    quick = ctx.Process(target=time.sleep, args=(0.0,), daemon=True)
    stuck = ctx.Process(target=time.sleep, args=(3600.0,), daemon=True)
    for p in (quick, stuck):
        p.start()
    start = time.monotonic()
    join_or_kill([quick, stuck], grace=3.0)
    assert time.monotonic() - start < 30.0  # the stuck one costs its grace, not its hour
    assert not quick.is_alive() and quick.exitcode == 0
    assert not stuck.is_alive() and stuck.exitcode == -signal.SIGKILL
