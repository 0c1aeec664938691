"""The planner's vectorised inner loops against plain-Python transcriptions of their documented rules.

Head swaps (LPT refinement and PlanCache repairs), the rest-of-step maximum of block refinement, the
block tuples of a plan and its exchange counts: each is checked on random inputs with many ties
(small integer totals), where only the exact tie-breaking order gives the same answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from dbsp.plan import Plan
from dbsp.plan.balance import _lpt_heads, _rest_of
from dbsp.plan.cache import _swap_heads
from dbsp.plan.core import _group_tuples, _home


def ref_lpt_heads(totals, counts, refine):
    """LPT then swaps, one pair at a time: the heaviest group ``a`` (lowest index on ties); among
    swaps of ``x`` in ``a`` with ``y`` in ``b != a`` with ``d = tot[x] - tot[y] > 0`` and new pair
    maximum below ``load[a]``, the smallest maximum, ties to (b, position of x, position of y)."""
    U = len(counts)
    groups, load = [[] for _ in range(U)], [0] * U
    for h in sorted(range(len(totals)), key=lambda h: (-totals[h], h)):
        k = min((j for j in range(U) if len(groups[j]) < counts[j]), key=lambda j: (load[j], j))
        groups[k].append(h)
        load[k] += totals[h]
    if refine and U > 1:
        for _ in range(4 * len(totals) * U):
            a = min(range(U), key=lambda k: (-load[k], k))
            best = None
            for b in range(U):
                if b == a:
                    continue
                for xi, x in enumerate(groups[a]):
                    for yi, y in enumerate(groups[b]):
                        d = totals[x] - totals[y]
                        new = max(load[a] - d, load[b] + d)
                        if d > 0 and new < load[a] and (best is None or new < best[0]):
                            best = (new, b, xi, yi)
            if best is None:
                break
            _, b, xi, yi = best
            x, y = groups[a][xi], groups[b][yi]
            groups[a][xi], groups[b][yi] = y, x
            load[a] += totals[y] - totals[x]
            load[b] += totals[x] - totals[y]
    return [sorted(g) for g in groups]


def ref_swap_heads(totals, groups):
    """:func:`_swap_heads`' rule with groups kept as sorted id lists: ties to (b, y, x) by id."""
    groups = [sorted(g) for g in groups]
    U, H = len(groups), len(totals)
    if U == 1:
        return groups
    load = [sum(totals[h] for h in g) for g in groups]
    for _ in range(4 * H * U):
        a = min(range(U), key=lambda k: (-load[k], k))
        best = None
        for b in range(U):
            if b == a:
                continue
            for y in groups[b]:
                for x in groups[a]:
                    d = totals[x] - totals[y]
                    new = max(load[a] - d, load[b] + d)
                    if d > 0 and new < load[a] and (best is None or new < best[0]):
                        best = (new, b, x, y)
        if best is None:
            break
        _, b, x, y = best
        groups[a] = sorted(set(groups[a]) - {x} | {y})
        groups[b] = sorted(set(groups[b]) - {y} | {x})
        load[a] += totals[y] - totals[x]
        load[b] += totals[x] - totals[y]
    return groups


def random_heads(rng):
    H = int(rng.integers(1, 25))
    U = int(rng.integers(1, min(H, 8) + 1))
    counts = [H // U + (k < H % U) for k in range(U)]
    hi = int(rng.choice([3, 12, 10**9]))  # small ranges: many ties
    return [int(t) for t in rng.integers(0, hi + 1, H)], counts


@pytest.mark.parametrize("seed", range(12))
def test_lpt_heads_equals_the_one_swap_at_a_time_rule(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        totals, counts = random_heads(rng)
        for refine in (False, True):
            assert _lpt_heads(totals, counts, refine) == ref_lpt_heads(totals, counts, refine)


@pytest.mark.parametrize("seed", range(12))
def test_swap_heads_equals_the_one_swap_at_a_time_rule(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        totals, counts = random_heads(rng)
        perm = rng.permutation(len(totals)).tolist()
        off = np.cumsum([0] + counts)
        groups = [perm[off[k] : off[k + 1]] for k in range(len(counts))]
        assert _swap_heads(np.asarray(totals, dtype=np.int64), groups) == ref_swap_heads(totals, groups)


@pytest.mark.parametrize("R", [1, 2, 3, 5, 8])
def test_rest_of_skips_the_two_excluded_ranks(R):
    """Oracle: a loop over ranks. Per candidate ``c`` and step ``t``, the largest ``D[i, t]`` over
    ranks other than ``e1[t]`` and ``rank_at[of[c], t]`` (-1 where none is left), with ties,
    repeated partners, excluded ranks that coincide, and a second rank constant over the steps
    (broadcast, as the query side passes it)."""
    rng = np.random.default_rng(R)
    for _ in range(30):
        D = rng.integers(0, 4, (R, R)).astype(np.int64)  # ties
        e1 = rng.integers(0, R, R)
        rank_at = rng.integers(0, R, (R, R))
        partners = np.unique(rng.integers(0, R, int(rng.integers(1, 3))))
        of = rng.choice(partners, int(rng.integers(1, 6)))
        out = _rest_of(D, e1, rank_at[of])
        assert out.shape == (len(of), R)
        for c in range(len(of)):
            for t in range(R):
                left = [int(D[i, t]) for i in range(R) if i != e1[t] and i != rank_at[of[c], t]]
                assert out[c, t] == (max(left) if left else -1)
        out = _rest_of(D, e1, of[:, None])
        for c in range(len(of)):
            for t in range(R):
                left = [int(D[i, t]) for i in range(R) if i != e1[t] and i != of[c]]
                assert out[c, t] == (max(left) if left else -1)


@pytest.mark.parametrize("R", [1, 2, 4, 7])
def test_block_tuples_and_exchange_counts_by_counting(R):
    rng = np.random.default_rng(R)
    nb = int(rng.integers(R, 40))
    home = _home(nb, R)
    for shuffle in (False, True):
        owner = home.copy()
        if shuffle:  # the owners of a balanced plan: any permutation keeps every rank's count
            owner = owner[rng.permutation(nb)]
        tuples = _group_tuples(owner, R)
        assert tuples == tuple(tuple(b for b in range(nb) if owner[b] == i) for i in range(R))
        plan = Plan(ulysses=1, ring=R, heads=2, q_block=64, seq_len=64 * nb, head_perm=(0, 1), head_offsets=(0, 2),
                    q_blocks=(tuples,), kv_blocks=(_group_tuples(home, R),))
        counts = np.zeros((R, R), dtype=np.int64)
        for b in range(nb):
            counts[home[b], owner[b]] += 1
        assert np.array_equal(plan.exchange_counts("q")[0].numpy(), counts)
        assert np.array_equal(plan.exchange_counts("kv")[0].numpy(), np.diag(np.bincount(home, minlength=R)))
        assert plan.moved_blocks("q") == int((owner != home).sum()) and plan.moved_blocks("kv") == 0
