"""Compiled inner loops of the planner (numba), with the same results as the numpy code in
:mod:`dbsp.plan.balance` and :mod:`dbsp.plan.degrees`.

The planner's hot loops -- the biased greedy over a ring's blocks, the block refinement's swap
search, LPT and the head-swap rounds, and the end of the degree choice's moved-units bound
(:func:`dbsp.plan.degrees._moved_bound_ms`) -- are sequential or run on arrays of a few hundred
entries, where numpy's per-call overhead, not arithmetic, sets their time. Compiled with numba
they run several times faster (a degree choice at Wan2.1-14B 720p: 4.1 -> 2.9 ms on a 2-core
CPU; ``benchmarks/compare_planners.py``). Numba is
optional (``pip install "dbsp[fast]"``): without it, or with ``DBSP_NUMBA=0`` in the environment
when :mod:`dbsp.plan` is imported, the planner runs its numpy code. Both give bit-identical
plans: every quantity the loops compare is an int64 (tile entries) or a float64 computed by the
same operations in the same order, and ties break the same way (``tests/test_plan_jit.py`` checks
this against the numpy code).

Numba is imported at the first plan or :class:`~dbsp.plan.PlanCache`, not with :mod:`dbsp` (about
1 s); each loop is compiled at its first call (about 5 s in all) and kept in numba's on-disk cache
(``cache=True``; next to this file, or where ``NUMBA_CACHE_DIR`` says), from which later processes
load it in a fraction of a second. :func:`warm_up` (which a ``PlanCache`` calls when built) does
all of that ahead of time.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import numpy as np

ENABLED = (os.environ.get("DBSP_NUMBA", "1").strip().lower() not in {"0", "false", "no", "off"}
           and importlib.util.find_spec("numba") is not None)
"""Whether the planner uses the compiled loops: numba is installed and ``DBSP_NUMBA`` is not
``0``. Set to False (the numpy path) if numba fails to import."""


def _greedy_loop(weights, home, order, room, load, reward):  # pragma: no cover - compiled
    """The biased greedy's loop (:func:`dbsp.plan.balance._biased_greedy`, which documents the
    rule) over blocks ``order``; ``room`` and ``load`` are updated in place. Returns the owners
    of ``order``'s blocks, in that order."""
    R = room.shape[0]
    out = np.empty(order.shape[0], dtype=np.int64)
    for n in range(order.shape[0]):
        b = order[n]
        w = weights[b]
        h = home[b]
        if room[h] > 0 and w == 0:
            g = h
        else:
            g = -1
            for i in range(R):
                if room[i] > 0 and (g < 0 or load[i] < load[g]):
                    g = i
            if room[h] > 0 and load[h] - reward * w <= load[g]:
                g = h
        out[n] = g
        room[g] -= 1
        load[g] += w
    return out


def _rest(D, t, e1, e2):  # pragma: no cover - compiled
    """``max D[i, t]`` over ranks ``i`` other than ``e1`` and ``e2``; -1 where none is left."""
    best = -1
    for i in range(D.shape[0]):
        if i != e1 and i != e2 and D[i, t] > best:
            best = D[i, t]
    return best


def _sides(owner, rank, sums, partners, mov):  # pragma: no cover - compiled
    """``(mine, others)``: the movable blocks (``mov``) that ``owner`` puts on ``rank``, and those
    on the ``partners`` ranks of least ``sums`` (ties: lower rank; ``rank`` counted last, as
    ``np.argsort(np.where(ii == rank, BIG, sums), kind="stable")[:partners]``), by block id."""
    R, NB = sums.shape[0], owner.shape[0]
    key = sums.copy()
    key[rank] = np.iinfo(np.int64).max
    light = np.zeros(R, dtype=np.bool_)
    for i in np.argsort(key, kind="mergesort")[: min(partners, R)]:
        light[i] = True
    mine = np.empty(NB, dtype=np.int64)
    others = np.empty(NB, dtype=np.int64)
    nm, no = 0, 0
    for r in range(NB):
        if mov[r]:
            if owner[r] == rank:
                mine[nm] = r
                nm += 1
            if light[owner[r]]:
                others[no] = r
                no += 1
    return mine[:nm], others[:no]


def _top(weight, candidates):  # pragma: no cover - compiled
    """Positions of the ``candidates`` largest ``weight`` (ties: lower position)."""
    return np.argsort(-weight, kind="mergesort")[:candidates]


def _best_swap(side, owner, own, sums, D, arg, Y, Z, cols, meet, rest, home, mov, candidates, partners):  # pragma: no cover - compiled
    """One side of :func:`_refine_loop`'s round: ``(new T, homes, x, o)`` of the best swap of one
    of rank ``own``'s ``candidates`` heaviest movable blocks ``x`` with a block ``o`` of the
    ``partners`` lightest ranks (first minimum of ``3 T - homes`` in ``(x, o)`` order; ``x = -1``:
    none). ``side`` 0: query blocks, ``own`` a ring rank; 1: key blocks, ``own`` a key rank.

    Block ``x`` on rank (or key rank) ``r`` adds ``F(x, r, t)`` to one entry of step ``t``: for
    query blocks ``Y[x, cols[r, t]]`` to rank ``r``'s, for key blocks ``Z[meet[r, t], x]`` to that
    of the rank meeting ``r`` (``row(r, t)``). A swap changes the two entries of ``own`` and of
    ``o``'s rank at every step; the others keep their largest, ``rest``."""
    R = D.shape[0]
    mine, others = _sides(owner, own, sums, partners, mov)
    weight = np.zeros(mine.shape[0], dtype=np.int64)  # x's work where own sets the step's maximum
    for t in range(R):
        r1 = own if side == 0 else meet[own, t]
        if arg[t] == r1:
            for n in range(mine.shape[0]):
                weight[n] += Y[mine[n], cols[own, t]] if side == 0 else Z[r1, mine[n]]
    xs = mine[_top(weight, candidates)]
    if xs.shape[0] == 0 or others.shape[0] == 0:
        return 0, 0, -1, -1
    for r2 in range(R):  # rest[r2, t]: the largest entry at step t but own's and r2's
        for t in range(R):
            rest[r2, t] = _rest(D, t, own if side == 0 else meet[own, t], r2 if side == 0 else meet[r2, t])
    sT, sh, sx, so = 0, 0, -1, -1
    for xi in range(xs.shape[0]):
        x = xs[xi]
        for oi in range(others.shape[0]):
            o = others[oi]
            r2 = owner[o]
            new = 0
            for t in range(R):
                if side == 0:
                    c1, c2 = cols[own, t], cols[r2, t]
                    v = D[own, t] - Y[x, c1] + Y[o, c1]
                    v2 = D[r2, t] + Y[x, c2] - Y[o, c2]
                else:
                    p, q = meet[own, t], meet[r2, t]
                    v = D[p, t] - Z[p, x] + Z[p, o]
                    v2 = D[q, t] + Z[q, x] - Z[q, o]
                if v2 > v:
                    v = v2
                if rest[r2, t] > v:
                    v = rest[r2, t]
                new += v
            homes = np.int64(home[x] == r2) + np.int64(home[o] == own)
            if sx < 0 or new * 3 - homes < sT * 3 - sh:
                sT, sh, sx, so = new, homes, x, o
    return sT, sh, sx, so


def _refine_loop(A, Y, Z, W, qo, ko, home, mov, goal, max_swaps, candidates, partners):  # pragma: no cover - compiled
    """:func:`dbsp.plan.balance._refine`'s swap search (which documents it) on its prepared
    ``Y``, ``Z`` and ``W`` (int64), updating ``qo``, ``ko``, ``W``, ``Y`` and ``Z`` in place."""
    R = W.shape[0]
    D = np.empty((R, R), dtype=np.int64)
    arg = np.empty(R, dtype=np.int64)
    excess = np.empty(R, dtype=np.float64)
    rest = np.empty((R, R), dtype=np.int64)
    cols = np.empty((R, R), dtype=np.int64)  # cols[i, t]: the key rank rank i meets at step t
    meet = np.empty((R, R), dtype=np.int64)  # meet[j, t]: the rank that meets key rank j at step t
    for i in range(R):
        for t in range(R):
            cols[i, t] = (i + t) % R
            meet[i, t] = (i - t + R) % R
    for _ in range(max_swaps):
        T = 0
        for t in range(R):
            m = 0
            for i in range(R):
                D[i, t] = W[i, cols[i, t]]
            for i in range(1, R):
                if D[i, t] > D[m, t]:
                    m = i
            arg[t] = m
            T += D[m, t]
        if T <= goal:
            break
        for t in range(R):
            s = 0.0
            for i in range(R):
                s += np.float64(D[i, t])
            excess[t] = np.float64(D[arg[t], t]) - s / R

        # Query side: rank a's heavy query blocks against the blocks of the lightest ranks;
        # key side: key rank j's heavy key blocks against those of the lightest key ranks.
        acc = np.zeros(R, dtype=np.float64)
        for t in range(R):
            acc[arg[t]] += excess[t]
        a = int(np.argmax(acc))
        sT, sh, sx, so = _best_swap(0, qo, a, W.sum(1), D, arg, Y, Z, cols, meet, rest, home, mov, candidates, partners)
        have = sx >= 0
        bT, bh, bk, bx, bo = sT, -sh, 0, sx, so
        acc[:] = 0.0
        for t in range(R):
            acc[cols[arg[t], t]] += excess[t]
        j = int(np.argmax(acc))
        sT, sh, sx, so = _best_swap(1, ko, j, W.sum(0), D, arg, Y, Z, cols, meet, rest, home, mov, candidates, partners)
        if sx >= 0 and (not have or (sT, -sh, 1, sx, so) < (bT, bh, bk, bx, bo)):
            bT, bh, bk, bx, bo = sT, -sh, 1, sx, so
            have = True

        if not have or bT >= T:
            break
        if bk == 0:  # query block bx: rank a -> b, bo: b -> a
            a, b = qo[bx], qo[bo]
            _move(W, Y, Z, A, bx, bo, a, b)
            qo[bx], qo[bo] = b, a
        else:  # key block bx: key rank j -> j2, bo: j2 -> j (the same on the transposes)
            j, j2 = ko[bx], ko[bo]
            _move(W.T, Z.T, Y.T, A.T, bx, bo, j, j2)
            ko[bx], ko[bo] = j2, j


def _move(W, S, P, A, x, o, a, b):  # pragma: no cover - compiled
    """Query block ``x`` moves from rank ``a`` to ``b`` and ``o`` from ``b`` to ``a``: rows ``a``
    and ``b`` of ``W`` change by rows ``x``, ``o`` of ``S`` (the blocks' work per key rank), those
    of ``P`` (per rank, per block) by rows of ``A``. A key-block swap is this on the transposes."""
    for c in range(W.shape[1]):
        d = S[o, c] - S[x, c]
        W[a, c] += d
        W[b, c] -= d
    for c in range(A.shape[1]):
        d = A[o, c] - A[x, c]
        P[a, c] += d
        P[b, c] -= d


def _swap_loop(G, TG, lv, sizes, tot, rounds):  # pragma: no cover - compiled
    """:func:`dbsp.plan.balance._swap_refine`'s rounds (which document the rule) on its padded
    ``(U, n)`` arrays, updated in place."""
    U, n = G.shape
    for _ in range(rounds):
        a = int(np.argmax(lv))
        la = lv[a]
        na = sizes[a]
        best, bb, bx, by = 0, -1, -1, -1
        for b in range(U):  # the first minimum in (b, x, y) order
            for x in range(na):
                for y in range(n):
                    d = TG[a, x] - TG[b, y]
                    new = max(la - d, lv[b] + d)
                    if bb < 0 or new < best:
                        best, bb, bx, by = new, b, x, y
        if best >= la:
            break
        x, y = G[a, bx], G[bb, by]
        G[a, bx], G[bb, by] = y, x
        TG[a, bx], TG[bb, by] = tot[y], tot[x]
        shift = tot[x] - tot[y]
        lv[a] -= shift
        lv[bb] += shift


def _lpt_loop(tot, counts, rounds):  # pragma: no cover - compiled
    """:func:`dbsp.plan.balance._lpt_heads` (which documents the rule): LPT, then ``rounds`` of
    :func:`_swap_loop`. Returns ``(U, n)`` every group's heads in their list order, padded."""
    U = counts.shape[0]
    n = max(1, counts.max())
    G = np.zeros((U, n), dtype=np.int64)
    TG = np.full((U, n), tot.max(), dtype=np.int64)  # padding: a total no head exceeds
    load = np.zeros(U, dtype=np.int64)
    fill = np.zeros(U, dtype=np.int64)
    for h in np.argsort(-tot, kind="mergesort"):  # by decreasing work, ties: lower id
        k = -1
        for j in range(U):  # the least loaded group with room, lowest index on ties
            if fill[j] < counts[j] and (k < 0 or load[j] < load[k]):
                k = j
        G[k, fill[k]] = h
        TG[k, fill[k]] = tot[h]
        fill[k] += 1
        load[k] += tot[h]
    _swap_loop(G, TG, load, fill, tot, rounds)
    return G


def _timed_swap_loop(G, TG, DG, real, load, nds, sizes, cnt, tot, dn, penalty, rounds):  # pragma: no cover - compiled
    """:func:`dbsp.plan.balance._timed_swap_refine`'s rounds (which document the rule) on its
    padded ``(U, n)`` arrays, updated in place."""
    U, n = G.shape
    c = np.empty(U, dtype=np.int64)
    for _ in range(rounds):
        for k in range(U):
            c[k] = load[k] + (penalty if 0 < nds[k] < cnt[k] else 0)
        a = int(np.argmax(c))
        na = sizes[a]
        best, bb, bx, by = 0, -1, -1, -1
        for b in range(U):  # the first minimum in (b, x, y) order among allowed swaps
            if b == a:
                continue
            for x in range(na):
                for y in range(n):
                    if not real[b, y]:
                        continue
                    d = TG[a, x] - TG[b, y]
                    dd = DG[a, x] - DG[b, y]
                    da, db = nds[a] - dd, nds[b] + dd
                    new = max(load[a] - d + (penalty if 0 < da < cnt[a] else 0), load[b] + d + (penalty if 0 < db < cnt[b] else 0))
                    if new < c[a] and (bb < 0 or new < best):
                        best, bb, bx, by = new, b, x, y
        if bb < 0:
            break
        x, y = G[a, bx], G[bb, by]
        G[a, bx], G[bb, by] = y, x
        TG[a, bx], TG[bb, by] = tot[y], tot[x]
        DG[a, bx], DG[bb, by] = dn[y], dn[x]
        shift, dshift = tot[x] - tot[y], dn[x] - dn[y]
        load[a] -= shift
        load[bb] += shift
        nds[a] -= dshift
        nds[bb] += dshift


def _moved_loop(x0, x1, mean, heads_k, coarse, lat, block_ms):  # pragma: no cover - compiled
    """The end of :func:`dbsp.plan.degrees._moved_bound_ms` (which documents the bound): the least
    total over ring times ``T`` (the mean and every entry of ``x0``, ``x1`` not below it) of
    ``T + 2 lat + blocks(T) block_ms``, where a rank must send ``count(left > T)`` units.

    ``x0``, ``x1``: ``(U, R, n + 1)`` what each rank keeps after sending its ``0..n`` heaviest
    units (query and key side); every row is non-increasing, so the count is the length of the
    row's prefix above ``T`` and shrinks as ``T`` grows: one sweep over the sorted ring times
    instead of a count per time."""
    U, R = x0.shape[0], x0.shape[1]
    r0, r1 = x0.ravel(), x1.ravel()
    cands = np.empty(1 + r0.shape[0] + r1.shape[0])
    cands[0] = mean
    nc = 1
    for r in (r0, r1):
        for v in r:
            if v >= mean:
                cands[nc] = v
                nc += 1
    cands = np.sort(cands[:nc])
    p0 = np.full((U, R), x0.shape[2], dtype=np.int64)  # entries above the current time, per row
    p1 = np.full((U, R), x1.shape[2], dtype=np.int64)
    hmin = heads_k.min()
    best = np.inf
    for c in range(nc):
        T = cands[c]
        Tp = T * (1 + 1e-12)  # the slack keeps the bound below
        feasible = True
        worst = 0.0
        for k in range(U):
            m0, m1 = 0, 0
            for i in range(R):
                while p0[k, i] > 0 and x0[k, i, p0[k, i] - 1] <= Tp:
                    p0[k, i] -= 1
                while p1[k, i] > 0 and x1[k, i, p1[k, i] - 1] <= Tp:
                    p1[k, i] -= 1
                if p0[k, i] == x0.shape[2] or p1[k, i] == x1.shape[2]:
                    feasible = False  # even sending every movable unit leaves this rank above T
                m0, m1 = max(m0, p0[k, i]), max(m1, p1[k, i])
            worst = max(worst, (m0 + m1) * heads_k[k])
        if feasible:
            total = T + 2 * lat + max(worst, hmin) * coarse * block_ms
            if total < best:
                best = total
    return best


_LOCK = threading.Lock()
_ORDER = ("_rest", "_sides", "_top", "_best_swap", "_move", "_swap_loop", "_greedy_loop", "_refine_loop", "_timed_swap_loop", "_lpt_loop",
          "_moved_loop")
"""Every function above, compiled in place in this order: callees before their callers."""
_LOOPS = {"greedy": "_greedy_loop", "refine": "_refine_loop", "lpt": "_lpt_loop", "timed_swap": "_timed_swap_loop",
          "moved": "_moved_loop"}
_compiled: dict | None = None
_warm = False  # every loop compiled for the signatures the planner uses


def loop(name: str):
    """The compiled loop ``name`` (``greedy``, ``refine``, ``lpt``, ``timed_swap`` or ``moved``), or None
    where :data:`ENABLED` is False. Imports numba and wraps the loops at the first call."""
    global _compiled, ENABLED
    if _compiled is None:
        if not ENABLED:
            return None
        with _LOCK:
            if _compiled is None and ENABLED:
                try:
                    import numba
                except Exception as err:  # a broken install: same plans, the numpy path
                    warnings.warn(f"dbsp.plan: numba failed to import ({err!r}); planning without it (same plans, slower)",
                                  RuntimeWarning, stacklevel=3)
                    ENABLED = False
                    return None
                g = globals()
                for fn in _ORDER:
                    g[fn] = numba.njit(cache=True, nogil=True)(g[fn])
                _compiled = {k: g[v] for k, v in _LOOPS.items()}
    return None if _compiled is None else _compiled[name]


def writable(a: np.ndarray, dtype=np.int64) -> np.ndarray:
    """``a`` as a writable C-contiguous array of ``dtype`` (a copy only where it is not one):
    numba compiles a loop apart for read-only arrays, which :func:`warm_up` does not cover."""
    if a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous:
        return a
    return np.array(a, dtype=dtype, order="C")


def warm_up() -> bool:
    """Import numba and compile (or load from its cache) every loop now rather than at the
    first plan; at once where that is done. Returns :data:`ENABLED`."""
    global _warm
    if _warm or not ENABLED or loop("greedy") is None:
        return _warm
    w = np.array([3, 1, 0, 2], dtype=np.int64)
    home = np.array([0, 0, 1, 1], dtype=np.int64)
    loop("greedy")(w, home, np.argsort(-w, kind="stable"), np.array([2, 2], dtype=np.int64), np.zeros(2, dtype=np.int64), 2.0)
    A = np.arange(16, dtype=np.int64).reshape(4, 4)
    loop("refine")(A, np.zeros((4, 2), dtype=np.int64), np.zeros((2, 4), dtype=np.int64), np.zeros((2, 2), dtype=np.int64),
                   home.copy(), home.copy(), home, np.ones(4, dtype=np.bool_), 0.0, 0, 8, 2)
    G = np.array([[0, 1], [2, 3]], dtype=np.int64)
    sizes = np.array([2, 2], dtype=np.int64)
    loop("timed_swap")(G.copy(), w[G], w[G] * 0, G >= 0, w[G].sum(1), sizes * 0, sizes, sizes, w, w * 0, 1, 0)
    loop("lpt")(w, sizes, 1)
    x = np.zeros((1, 2, 3))
    loop("moved")(x, x, 0.0, np.ones(1), 8, 0.0, 1.0)
    _warm = True
    return True
