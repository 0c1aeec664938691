"""The planner's compiled loops (``dbsp.plan._jit``, numba) against its numpy code.

Oracle: the numpy implementation of the same rule (``dbsp.plan.balance``, ``.degrees``), run in the same
process with the compiled loops switched off. Every output must be identical (owners, groups,
tile matrices, plan fingerprints), on inputs drawn with many ties, zero weights and unmovable
blocks, where a different tie rule or summation order would show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from dbsp.plan import _jit, choose_degrees, make_plan, score_degrees  # noqa: E402
from dbsp.plan.balance import _biased_greedy, _lpt_heads, _lpt_heads_timed, _refine  # noqa: E402
from dbsp.plan.core import _reduce_cols, _reduce_rows  # noqa: E402

from test_plan import _random_model_and_summary  # noqa: E402

pytestmark = pytest.mark.skipif(not _jit.ENABLED, reason="compiled loops disabled (DBSP_NUMBA=0)")


def both(fn, monkeypatch):
    """``(compiled, numpy)``: ``fn()`` with the compiled loops, then with them off."""
    compiled = fn()
    with monkeypatch.context() as m:
        m.setattr(_jit, "loop", lambda name: None)
        plain = fn()
    return compiled, plain


def test_the_compiled_loops_are_the_ones_that_run():
    """Guards the tests below: with numba installed, the planner's calls reach compiled code."""
    assert _jit.warm_up()
    for name in ("greedy", "refine", "lpt", "timed_swap", "moved"):
        assert hasattr(_jit.loop(name), "py_func"), name


def test_a_numba_that_fails_to_import_warns_and_leaves_the_numpy_path(monkeypatch):
    """A broken numba install: one RuntimeWarning, then the planner's numpy code (same plans)."""
    import sys

    monkeypatch.setattr(_jit, "_compiled", None)
    monkeypatch.setattr(_jit, "_warm", False)
    monkeypatch.setattr(_jit, "ENABLED", True)
    monkeypatch.setitem(sys.modules, "numba", None)  # "import numba" raises ImportError
    with pytest.warns(RuntimeWarning, match="numba failed to import"):
        assert _jit.loop("greedy") is None
    assert not _jit.ENABLED and _jit.loop("refine") is None and not _jit.warm_up()
    plan = make_plan(torch.full((1, 4, 8, 8), 64), ulysses=2, ring=2, q_block=8, seq_len=64)
    plan.validate()


def test_plan_cache_compiles_the_loops_when_built(monkeypatch):
    """A PlanCache warms the compiled loops up in its constructor, not at its first get."""
    from dbsp.plan import PlanCache

    calls = []
    monkeypatch.setattr(_jit, "warm_up", lambda: calls.append(1) or True)
    PlanCache()
    assert calls == [1]


@pytest.mark.parametrize("seed", range(40))
def test_biased_greedy_matches_numpy(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    R = int(rng.choice([1, 2, 3, 5, 8, 17, 24]))
    nb = int(rng.integers(R, 6 * R + 2))
    kind = "float" if seed % 4 == 3 else "int"
    weights = rng.integers(0, 6, nb).astype(np.int64) ** 3  # ties and zeros
    if kind == "float":
        weights = weights * 0.37
    home = np.sort(rng.integers(0, R, nb))
    movable = rng.random(nb) < 0.7 if seed % 2 else None
    counted = home if movable is None else home[movable]
    caps = np.bincount(rng.permutation(counted), minlength=R).tolist()  # same block count per rank as at home
    reward = [0.0, 0.5, 2.0, math.inf][seed % 4]
    got, want = both(lambda: _biased_greedy(weights, home, caps, reward, movable), monkeypatch)
    np.testing.assert_array_equal(got, want)
    if movable is not None:
        np.testing.assert_array_equal(got[~movable], home[~movable])


@pytest.mark.parametrize("seed", range(40))
def test_block_refinement_matches_numpy(seed, monkeypatch):
    """Random group work with ties, random starting owners (every rank keeps its count), rings
    of 2 (where the lightest partners include the rank itself) to 9, with unmovable blocks."""
    rng = np.random.default_rng(seed)
    R = int(rng.choice([2, 3, 4, 8, 9]))
    nb = int(rng.integers(2 * R, 7 * R))
    A = (rng.integers(0, 4, (nb, nb)) * rng.integers(1, 50, (nb, 1))).astype(np.int64)
    home = np.sort(np.arange(nb) % R)
    qo, ko = rng.permutation(home), rng.permutation(home)
    movable = rng.random(nb) < 0.8 if seed % 3 == 0 else None
    if movable is not None:
        qo[~movable], ko[~movable] = home[~movable], home[~movable]
    target, swaps = [1.0, 1.001, 1.05][seed % 3], [1, 4, 32][seed % 3]

    def run():
        return _refine(A, A.astype(np.float64), qo, ko, home, R, target=target, max_swaps=swaps, movable=movable)

    (q1, k1, W1), (q2, k2, W2) = both(run, monkeypatch)
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(W1, W2)
    # and W is the exact tile matrix of the returned owners
    np.testing.assert_array_equal(W1, _reduce_rows(_reduce_cols(A, k1, R), q1, R))


@pytest.mark.parametrize("seed", range(30))
def test_head_swaps_match_numpy(seed, monkeypatch):
    """Plain and time-weighted head balancing (LPT, then swap rounds) with tied totals."""
    rng = np.random.default_rng(seed)
    H = int(rng.integers(3, 41))
    U = int(rng.choice([u for u in (2, 3, 4, 5, 8) if u < H]))
    counts = [H // U + (k < H % U) for k in range(U)]
    totals = (rng.integers(1, 12, H) * 100).tolist()
    got, want = both(lambda: _lpt_heads(totals, counts, True), monkeypatch)
    assert got == want
    dense = rng.random(H) < 0.3
    penalty = int(rng.integers(1, 400))
    got, want = both(lambda: _lpt_heads_timed(totals, dense, counts, True, penalty), monkeypatch)
    assert got == want


@pytest.mark.parametrize("seed", range(6))
def test_moved_bound_matches_numpy(seed, monkeypatch):
    """The degree choice's bound on plans that move units (its sweep over ring times), for the
    contiguous, balanced and random head groups of every ring degree, equal to the last bit."""
    from dbsp.plan.degrees import _entry_ms, _moved_bound_ms

    cost, summary = _random_model_and_summary(seed, dense=seed % 2 == 1)
    rng = np.random.default_rng(seed)
    ms = _entry_ms(cost, summary, np.asarray(summary._head_totals, dtype=np.int64), 128)
    for R in (2, 4, 8):
        U = 8 // R
        for groups in (np.arange(16).reshape(U, -1).tolist(), rng.permutation(16).reshape(U, -1).tolist()):
            mix = rng.random(U) * [0.0, 0.05][seed % 2]
            p2p = rng.random(U) * 0.2
            group_ms = ms * (1 + 0.1 * rng.random((U, ms.size)))  # per group (waves slow some groups' dense heads)
            for block_ms in (0.003, 1e-9):  # a nearly free exchange: the least feasible ring time sets the bound
                got, want = both(lambda: _moved_bound_ms(summary, groups, group_ms, mix, R, p2p, block_ms, 0.02), monkeypatch)
                assert got == want and math.isfinite(got[0])


@pytest.mark.parametrize("seed,dense", [(0, False), (1, False), (2, True), (3, True)])
def test_plans_and_degree_choices_match_numpy(seed, dense, monkeypatch):
    """End to end on 16-head synthetic summaries (with fully dense heads: time-weighted plans):
    every candidate of a full scoring, the degree choice and make_plan at every U x R."""
    cost, summary = _random_model_and_summary(seed, dense)

    def run():
        out = [(c.ulysses, c.ring, c.plan.fingerprint(), repr(c.prediction))
               for c in score_degrees(summary, world=8, cost_model=cost, head_dim=128)]
        u, r, plan = choose_degrees(summary, world=8, heads=16, cost_model=cost, head_dim=128)
        out.append((u, r, plan.fingerprint()))
        for u, r in ((8, 1), (4, 2), (2, 4), (1, 8)):
            out.append(make_plan(summary, ulysses=u, ring=r, cost_model=cost, head_dim=128).fingerprint())
            out.append(make_plan(summary, ulysses=u, ring=r, reward=0.0).fingerprint())
        return out

    got, want = both(run, monkeypatch)
    assert got == want
