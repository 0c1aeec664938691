"""Child-process housekeeping for dbsp's multi-process runs (the demo; the tests use it too)."""

from __future__ import annotations

from typing import Iterable


def join_or_kill(procs: Iterable, *, grace: float = 5.0) -> None:
    """Join each process for up to ``grace`` seconds, then kill and reap any that is still alive.

    Meant for the ``finally`` block of a multi-process run: a rank stuck in a collective (its peer
    died, or the run timed out) never outlives the run that started it, and no zombie is left.

    Args:
        procs: started ``multiprocessing`` processes (anything with ``join``, ``is_alive``, ``kill``).
        grace: seconds to wait for each process to exit on its own. Default: 5.0.
    """
    for p in procs:
        p.join(timeout=grace)
        if p.is_alive():
            p.kill()
            p.join()
