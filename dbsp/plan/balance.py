"""The planner, :func:`make_plan`: head- and block-level balancing of one ``(U, R)``.

The planner reads the work tensor twice:

1. pass 1, statistics: per-head query-block and key-block marginals ``(H, NB)`` and, for rings
   up to 16, every head's tiles under the contiguous layout ``(H, R, R)``;
2. head level: longest-processing-time greedy over per-head totals with equal head counts, then
   pairwise swaps while they lower the heaviest group;
3. block level, per head group (pass 2: the group's summed work ``(NB, NB)``): db-SP's biased
   greedy over the group's marginals with reward ``R_b`` (a block stays on its home ring rank
   unless another rank is lighter by more than ``R_b`` times its weight), the contiguous layout
   and a round-robin deal are scored on the exact ring time; the cheapest good-enough one is
   refined by swapping query or key blocks on the exact objective. Every ring rank keeps its
   block count, so tensor shapes never change;
4. the result is never worse than the unplanned layout: of {unplanned, heads balanced only,
   heads and blocks balanced} the lowest ``rho_s`` wins, ties to fewer moved blocks.

With a cost model (``make_plan(cost_model=...)``, and always inside
:func:`~dbsp.plan.choose_degrees`) the planner balances predicted *time* rather than tile entries:
fully dense heads run on dense SDPA, faster per entry, so each head's work is weighed by its rate
(integers, so the arithmetic stays exact), and a head group mixing dense and sparse heads is
charged the mixed-call overhead. The candidates of both weightings are scored by
:meth:`CostModel.predict`; the least predicted time wins. ``rho_s`` (``imbalance_ratio``,
``Plan.imbalance``) keeps its tile-entry meaning; the time-based ratio of the same formula is
``Prediction.compute_imbalance``.

The sequential loops (the biased greedy, the block refinement's swap search, LPT and the head
swaps) run compiled where numba is installed (:mod:`dbsp.plan._jit`), with bit-identical results.
"""

from __future__ import annotations

import heapq
import math
import threading
from functools import lru_cache
from itertools import accumulate, chain
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from ..mask import SparseMask
from . import _jit
from .core import (Plan, WorkSummary, _Stats, _Work, _as_work, _check_aligned, _check_degrees, _check_ring, _full_heads,
                   _group_sum, _group_tuples, _head_counts, _home, _home_tuples, _reduce_cols, _reduce_rows, _ring_time,
                   _stats, _step_index, _steps, _sum_groups, _summary_group_sum, _summary_home_tiles)
from .cost import CostModel, _Rates, _predictor, _rates_of


DEFAULT_REWARD = 2.0
"""R_b used by db-SP's experiments (``papers/db-SP.md`` section 4)."""


def _check_reward(reward: object) -> float:
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise TypeError(f"reward must be a float >= 0 (R_b; math.inf keeps every block home), got {type(reward).__name__}")
    if not reward >= 0:  # also rejects NaN
        raise ValueError(f"reward must be >= 0 (R_b), got {reward}")
    return float(reward)


# ---------------------------------------------------------------------------------------- balancing


def _balance_heads(totals: list[int], counts: list[int], refine: bool) -> list[list[int]]:
    """:func:`_lpt_heads`, remembered within one degree choice (:func:`_remembered`): its bound
    and its plans balance the same totals."""
    return _remembered(("lpt", tuple(int(t) for t in totals), tuple(counts), bool(refine)),
                       lambda: _lpt_heads(totals, counts, refine))


_MEMO = threading.local()
"""``memo``: the head groups computed so far in this thread's running degree choice, or None."""


def _remembered(key: tuple, compute) -> list[list[int]]:
    """``compute()`` (head groups), looked up by ``key`` while a degree choice runs on this thread
    (:func:`_score`); outside one, computed afresh (a memo across calls would make repeated
    re-plans of one mask look cheaper than re-plans of new masks)."""
    memo = getattr(_MEMO, "memo", None)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = tuple(tuple(g) for g in compute())
    return [list(g) for g in memo[key]]


def _lpt_heads(totals: list[int], counts: list[int], refine: bool) -> list[list[int]]:
    """Head groups with the given counts and balanced total work.

    Longest processing time first: heads by decreasing work (ties: lower id) go to the least
    loaded group that still has room (ties: lower group). Then, with ``refine``, swap a head of
    the heaviest group with a lighter head of another group while that lowers the heaviest group
    and keeps the pair below its old load (each swap strictly improves the sorted load vector,
    so this terminates).
    """
    U = len(counts)
    lpt = _jit.loop("lpt")
    if lpt is not None:  # the same greedy and swaps, compiled
        G = lpt(np.asarray(totals, dtype=np.int64), np.asarray(counts, dtype=np.int64), 4 * len(totals) * U if refine and U > 1 else 0)
        return [sorted(G[k, :c].tolist()) for k, c in enumerate(counts)]
    groups: list[list[int]] = [[] for _ in range(U)]
    load = [0] * U
    open_ = [j for j in range(U) if counts[j] > 0]  # groups with room, in index order
    for h in sorted(range(len(totals)), key=lambda h: (-totals[h], h)):
        k = min(open_, key=load.__getitem__)  # the least loaded group with room, lowest index on ties
        groups[k].append(h)
        load[k] += totals[h]
        if len(groups[k]) == counts[k]:
            open_.remove(k)
    if refine and U > 1:
        groups = _swap_refine(np.asarray(totals, dtype=np.int64), groups, load, 4 * len(totals) * U)
    return [sorted(g) for g in groups]


def _swap_refine(tot: np.ndarray, groups: list[list[int]], load: list[int], rounds: int) -> list[list[int]]:
    """:func:`_lpt_heads`' swaps on ``(U, n)`` arrays (every group's heads in their list order,
    padded), at most ``rounds`` of them.

    Each round takes the heaviest group ``a`` (lowest index on ties) and scores every swap of a
    head ``x`` of ``a`` with a head ``y`` of another group ``b`` at once: the pair's new maximum
    ``max(load[a] - d, load[b] + d)``, ``d = tot[x] - tot[y] > 0``, allowed below ``load[a]``. The
    strictly smallest wins, ties to (``b``, position of ``x``, position of ``y``) -- the first
    minimum of the scores laid out as ``(b, x, y)``. The swapped heads take each other's places.
    """
    U = len(groups)
    sizes = [len(g) for g in groups]
    n = max(sizes)
    G = np.zeros((U, n), dtype=np.int64)
    TG = np.full((U, n), tot.max(), dtype=np.int64)  # tot[G], padded with a total no head exceeds
    for k, g in enumerate(groups):
        G[k, : sizes[k]] = g
        TG[k, : sizes[k]] = tot[g]
    lv = np.asarray(load, dtype=np.int64)
    for _ in range(rounds):
        a = int(lv.argmax())  # heaviest group, lowest index on ties
        la = lv[a]
        na = sizes[a]
        d = TG[a, :na][None, :, None] - TG[:, None, :]  # (U, X, n): d[b, x, y] = tot[x] - tot[y]
        # Allowed: la - d < la (so d > 0) and lv[b] + d < la; group a (lv[b] = la) and padding
        # (d <= 0) never pass.
        new = np.maximum(la - d, lv[:, None, None] + d)
        best = int(new.argmin())
        if new.flat[best] >= la:
            break
        b, rest = divmod(best, na * n)
        xi, yi = divmod(rest, n)
        x, y = int(G[a, xi]), int(G[b, yi])
        G[a, xi], G[b, yi] = y, x
        TG[a, xi], TG[b, yi] = tot[y], tot[x]
        shift = int(tot[x]) - int(tot[y])
        lv[a] -= shift
        lv[b] += shift
    return [G[k, : sizes[k]].tolist() for k in range(U)]


def _block_tokens(num_blocks: int, q_block: int, seq_len: int) -> np.ndarray:
    """``(NB,)`` int64 tokens of every block (the last one may be partial)."""
    tok = np.full(num_blocks, q_block, dtype=np.int64)
    tok[-1] = seq_len - (num_blocks - 1) * q_block
    return tok


def _mixed_groups(groups: list[list[int]], dense: np.ndarray) -> int:
    return sum(0 < int(dense[g].sum()) < len(g) for g in groups)


def _dense_first(groups: list[list[int]], dense: np.ndarray | None) -> list[list[int]]:
    """Each group's heads with its dense heads first (ids ascending within each kind).

    The order inside a group changes no work, but the runtime reads a rank's dense heads as one
    strided view when they are consecutive and gathers them otherwise (``attention``'s mixed
    calls; :class:`CostModel` charges the two cases apart)."""
    ids = set() if dense is None else set(np.flatnonzero(dense).tolist())
    if not ids:
        return groups
    return [sorted(g, key=lambda h: (h not in ids, h)) if not ids.isdisjoint(g) else sorted(g) for g in groups]


def _balance_heads_timed(totals: list[int], dense: np.ndarray, counts: list[int], refine: bool, penalty: int) -> list[list[int]]:
    """:func:`_lpt_heads_timed`, remembered within one degree choice (as :func:`_balance_heads`)."""
    key = ("timed", tuple(int(t) for t in totals), tuple(bool(d) for d in np.asarray(dense)), tuple(counts), bool(refine), int(penalty))
    return _remembered(key, lambda: _lpt_heads_timed(totals, dense, counts, refine, penalty))


def _lpt_heads_timed(totals: list[int], dense: np.ndarray, counts: list[int], refine: bool, penalty: int) -> list[list[int]]:
    """:func:`_balance_heads` on weighted totals where a group holding both dense and sparse heads
    also costs ``penalty`` (its mixed calls): groups of one kind are preferred where that does not
    cost balance.

    Two starts: LPT as in :func:`_balance_heads` (refined there), and LPT that puts each head in
    the group whose cost after placing it is least (a dense head joins dense heads when that is
    no dearer). With ``refine`` both are improved by swaps on the cost with the penalty; the start
    with the lower maximum cost wins (ties: fewer mixed groups, then the first start).
    """
    if penalty <= 0:
        return _balance_heads(totals, counts, refine)
    U = len(counts)
    tot = np.asarray(totals, dtype=np.int64)
    dn = np.asarray(dense, dtype=np.int64)
    cnt = np.asarray(counts, dtype=np.int64)

    ints, flags = tot.tolist(), dn.tolist()

    def costs(groups):
        return [sum(ints[h] for h in g) + penalty * (0 < sum(flags[h] for h in g) < len(g)) for g in groups]

    plain = _balance_heads(totals, counts, refine)
    groups: list[list[int]] = [[] for _ in range(U)]
    load, nd = [0] * U, [0] * U
    for h in sorted(range(len(totals)), key=lambda h: (-totals[h], h)):
        t, f = totals[h], flags[h]
        k, least = -1, 0
        for j in range(U):  # the group whose cost with h in it (mixed: both kinds so far) is least, lowest on ties
            if len(groups[j]) < counts[j]:
                after = load[j] + t + (penalty if 0 < nd[j] + f < len(groups[j]) + 1 else 0)
                if k < 0 or after < least:
                    k, least = j, after
        groups[k].append(h)
        load[k] += t
        nd[k] += f
    starts = [[list(g) for g in plain], groups]
    if refine and U > 1:
        starts = [_timed_swap_refine(tot, dn, cnt, g, penalty, 4 * len(totals) * U) for g in starts]
    best = min(range(2), key=lambda n: (max(costs(starts[n])), _mixed_groups(starts[n], dense), n))
    return [sorted(g) for g in starts[best]]


def _timed_swap_refine(tot: np.ndarray, dn: np.ndarray, cnt: np.ndarray, groups: list[list[int]], penalty: int,
                       rounds: int) -> list[list[int]]:
    """:func:`_lpt_heads_timed`' swaps, at most ``rounds`` of them, on ``(U, n)`` arrays (every
    group's heads in their list order, padded) as :func:`_swap_refine` does, on the cost with the
    mixed-call ``penalty``.

    Each round takes the costliest group ``a`` (lowest index on ties) and scores every swap of a
    head ``x`` of ``a`` with a head ``y`` of another group ``b`` at once: the pair's new larger
    cost (loads and dense-head counts after the swap). The strictly smallest below ``a``'s cost
    wins, ties to (``b``, position of ``x``, position of ``y``); the swapped heads take each
    other's places. ``tot``/``dn``: ``(H,)`` int64 work and dense flags; ``cnt``: ``(U,)`` heads
    per group.
    """
    U = len(groups)
    sizes = [len(g) for g in groups]
    n = max(sizes)
    G = np.zeros((U, n), dtype=np.int64)
    real = np.zeros((U, n), dtype=bool)
    for k, g in enumerate(groups):
        G[k, : sizes[k]] = g
        real[k, : sizes[k]] = True
    TG, DG = np.where(real, tot[G], 0), np.where(real, dn[G], 0)  # padding weighs nothing
    load, nds = TG.sum(1), DG.sum(1)  # kept up to date by each swap (group sizes never change)
    swap = _jit.loop("timed_swap")
    if swap is not None:  # the same rounds, compiled
        swap(G, TG, DG, real, load, nds, np.asarray(sizes, dtype=np.int64), cnt, tot, dn, int(penalty), rounds)
        return [G[k, : sizes[k]].tolist() for k in range(U)]
    others = ~np.eye(U, dtype=bool)[:, :, None, None] & real[None, :, None, :]  # (a, b, 1, y): real heads of other groups
    big = np.iinfo(np.int64).max
    for _ in range(rounds):
        c = load + penalty * ((nds > 0) & (nds < cnt))
        a = int(c.argmax())  # costliest group, lowest index on ties
        na = sizes[a]
        d = TG[a, :na][None, :, None] - TG[:, None, :]  # (U, X, n): d[b, x, y] = tot[x] - tot[y]
        dd = DG[a, :na][None, :, None] - DG[:, None, :]
        da, db = nds[a] - dd, nds[:, None, None] + dd  # dense heads of a and b after the swap
        new = np.maximum(load[a] - d + penalty * ((da > 0) & (da < cnt[a])),
                         load[:, None, None] + d + penalty * ((db > 0) & (db < cnt[:, None, None])))
        ok = (new < c[a]) & others[a]
        if not ok.any():
            break
        best = int(np.where(ok, new, big).argmin())  # first minimum in (b, x, y) order
        b, rest = divmod(best, na * n)
        xi, yi = divmod(rest, n)
        x, y = int(G[a, xi]), int(G[b, yi])
        G[a, xi], G[b, yi] = y, x
        TG[a, xi], TG[b, yi] = tot[y], tot[x]
        DG[a, xi], DG[b, yi] = dn[y], dn[x]
        shift, dshift = int(tot[x]) - int(tot[y]), int(dn[x]) - int(dn[y])
        load[a] -= shift
        load[b] += shift
        nds[a] -= dshift
        nds[b] += dshift
    return [G[k, : sizes[k]].tolist() for k in range(U)]


def _biased_greedy(weights: np.ndarray, home: np.ndarray, caps: list[int], reward: float, movable: np.ndarray | None = None) -> np.ndarray:
    """db-SP's biased greedy: ``(NB,)`` owning ring rank of every block.

    Blocks by decreasing weight (ties: lower id). Each goes to the least loaded ring rank with room
    (ties: lower rank), unless its home has room and ``load[home] - reward * w <= that load``: a
    block stays home unless another rank is lighter by more than ``reward`` times its weight.
    ``reward = 0`` is plain greedy (home wins ties); ``reward = inf`` keeps every block home, as do
    zero-weight blocks (moving them costs traffic and cannot help balance). ``caps[i]`` blocks end
    on rank ``i``. With ``movable`` (bool ``(NB,)``), the other blocks stay home and count towards
    their home's load from the start, and ``caps`` counts movable blocks only.
    """
    R = len(caps)
    owner = home.copy()
    load = [0] * R
    if movable is not None:
        for g, w in zip(home[~movable].tolist(), weights[~movable].tolist()):
            load[g] += w
    cnt = [0] * R
    order = np.argsort(-weights, kind="stable")
    if movable is not None:
        order = order[movable[order]]
    scan = _jit.loop("greedy")
    if scan is not None:  # the same scan, compiled (any ring size)
        kind = np.float64 if weights.dtype.kind == "f" else np.int64
        owner[order] = scan(_jit.writable(weights, kind), _jit.writable(home), order, np.asarray(caps, dtype=np.int64),
                            np.asarray(load, dtype=kind), float(reward))
        return owner
    out = []
    if R <= _GREEDY_SCAN_MAX_RING:
        # Few ranks: a scan beats a heap with its outdated entries. ``open_load`` is the load of
        # ranks with room and +inf for full ones, so its first minimum is the least loaded rank
        # with room, lowest index on ties.
        open_load = [load[g] if caps[g] > 0 else math.inf for g in range(R)]
        room = list(caps)  # blocks each rank still takes
        append = out.append
        for w, h in zip(weights[order].tolist(), home[order].tolist()):
            if room[h] and w == 0:  # zero-weight blocks stay home
                g = h
            else:
                low = min(open_load)
                g = open_load.index(low)
                if room[h] and load[h] - reward * w <= low:
                    g = h
            append(g)
            room[g] -= 1
            load[g] += w
            open_load[g] = load[g] if room[g] else math.inf
    else:
        heap = [(load[g], g) for g in range(R)]  # (load, rank) of ranks with room; outdated entries are skipped
        heapq.heapify(heap)
        for w, h in zip(weights[order].tolist(), home[order].tolist()):
            while heap[0][0] != load[heap[0][1]] or cnt[heap[0][1]] >= caps[heap[0][1]]:
                heapq.heappop(heap)
            lmin, g = heap[0]  # least loaded rank with room, lowest index on ties
            if cnt[h] < caps[h] and (w == 0 or load[h] - reward * w <= lmin):
                g = h
            out.append(g)
            cnt[g] += 1
            if w:
                load[g] += w
                heapq.heappush(heap, (load[g], g))
    owner[order] = out
    return owner


_GREEDY_SCAN_MAX_RING = 16
"""The biased greedy scans the open ranks up to this ring size and keeps a heap above it."""


_REFINE_MAX_RING = 32
"""Block refinement runs for rings up to this size: its candidate scan costs O(NB * R) per swap,
and longer rings hold only a few blocks per rank."""


_REFINE_MAX_SWAPS = 32
"""At most this many refinement swaps per head group (each costs ~1 ms at NB = 1182, R = 8)."""


_LOCAL_MIN_GAIN = 0.02
"""A local layout is chosen only where the cost model predicts it at least this much faster than
the fastest other candidate (about the model's median error, 2.5%). Without the margin it won by
0.3-4% on steps of the drifting synthetic run of ``compare_planners.py`` and moved 460-610
blocks: the degree choice then flips between steps, and plan reuse, cheap for blocks at home,
costs a pass over the summary per step (planning 1.0% -> 8% of the run's attention)."""


def _pick(plans: list[Plan], key) -> Plan:
    """The plan of least ``key`` (a tuple led by the predicted total ms), where a local layout
    (:func:`_local_blocks`) must also beat the best other plan by ``_LOCAL_MIN_GAIN``."""
    best = min(plans, key=key)
    if best.__dict__.get("_local"):
        others = [p for p in plans if not p.__dict__.get("_local")]
        alt = min(others, key=key) if others else best
        if key(best)[0] > (1.0 - _LOCAL_MIN_GAIN) * key(alt)[0]:
            return alt
    return best


def _as_local(plan: Plan) -> Plan:
    """Mark ``plan`` as a local layout (for :func:`_pick`)."""
    plan.__dict__["_local"] = True
    return plan


_LOCAL_SWAPS = 64
"""Swaps of the local block layout (:func:`_local_blocks`) per head group: at Wan2.1-14B 720p
(NB = 1182) with regional skew, 64 swaps from the contiguous layout reach a ring time within 2% of
the mean at U1R8 and U2R4, 128 gain less than 0.1% more (cost model)."""

_BIG = np.iinfo(np.int64).max


def _rest_of(D: np.ndarray, e1: np.ndarray, rank_at: np.ndarray) -> np.ndarray:
    """Per candidate and step, the largest ``D[i, t]`` over ranks ``i`` other than ``e1[t]`` and
    ``rank_at[c, t]``: ``(C, R)`` (``rank_at`` may broadcast), ``-1`` where no rank is left
    (``D >= 0``). From each step's two largest values once, not a masked maximum per candidate."""
    t = np.arange(D.shape[1])
    masked = D.copy()
    masked[e1, t] = -1
    first = masked.argmax(0)
    top = masked[first, t]
    masked[first, t] = -1
    return np.where(rank_at == first, masked.max(0), top)


def _among(owner: np.ndarray, ranks: np.ndarray, R: int) -> np.ndarray:
    """``np.isin(owner, ranks)`` for owners in ``[0, R)``, by a lookup table (a few times faster)."""
    table = np.zeros(R, dtype=bool)
    table[ranks] = True
    return table[owner]


def _refine(
    A: np.ndarray,
    Af: np.ndarray,
    q_owner: np.ndarray,
    kv_owner: np.ndarray,
    home: np.ndarray,
    R: int,
    *,
    target: float,
    max_swaps: int,
    candidates: int = 8,
    partners: int = 2,
    movable: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local search on one head group's exact ring time ``T = sum_t max_i W[i, (i + t) % R]``.

    ``A`` is the group's ``(NB, NB)`` work (``Af`` the same as float64). The search keeps ``Y =
    A`` summed over each ring rank's key blocks ``(NB, R)`` and ``Z = A`` summed over each rank's
    query blocks ``(R, NB)``, so a swap's effect on ``W`` is exact: moving query block ``r`` from
    rank ``a`` to ``b`` moves ``Y[r]`` from row ``a`` of ``W`` to row ``b``; moving key block
    ``c`` from ``j`` to ``j'`` moves ``Z[:, c]`` from column ``j`` to ``j'``. Each round finds the
    rank (query side) and the key rank (key side) that stand most above the step means where
    they set a step's maximum, takes their ``candidates`` blocks that weigh most on those steps,
    scores the swap of each with every block of the ``partners`` lightest other ranks at once,
    and applies the single best strict improvement (ties: the swap that brings more blocks
    home). Swaps keep every rank's block count. Stops at ``T <= target * sum(W) / R``, after
    ``max_swaps`` swaps, or when no swap helps. With ``movable`` (bool ``(NB,)``) only those
    blocks are swapped (summary units of equal size, so block counts stay).

    Returns:
        ``(q_owner, kv_owner, W)``: new owners ``(NB,)`` and the exact ``(R, R)`` tile matrix.
    """
    qo, ko = q_owner.copy(), kv_owner.copy()
    Y = _reduce_cols(Af, ko, R)
    Z = _reduce_rows(Af, qo, R)
    W = _reduce_rows(Y, qo, R)
    goal = target * int(W.sum()) / R
    mov = np.ones(qo.shape[0], dtype=bool) if movable is None else movable
    search = _jit.loop("refine")
    if search is not None:  # the same search, compiled
        search(_jit.writable(A), Y, Z, W, qo, ko, _jit.writable(home), _jit.writable(mov, bool), float(goal), max_swaps, candidates, partners)
        return qo, ko, W
    ii = np.arange(R)
    cols = (ii[:, None] + ii[None, :]) % R  # cols[i, t] = (i + t) % R: the key rank rank i meets at step t
    meet = (ii[:, None] - ii[None, :]) % R  # meet[j, t] = the rank that meets key rank j at step t
    flat = _step_index(R)
    for _ in range(max_swaps):
        D = W.reshape(-1)[flat].reshape(R, R)  # (R, R): D[i, t] = rank i's work at ring step t
        peak = D.max(0)
        T = int(peak.sum())
        if T <= goal:
            break
        arg = D.argmax(0)
        excess = peak - np.add.reduce(D, 0, dtype=np.float64) / R  # (D.mean(0), without its checks)
        best = []  # (new T, -homes, kind, x, o)

        # Query side: swap one of rank a's heavy query blocks with any other rank's block.
        a = int(np.bincount(arg, weights=excess, minlength=R).argmax())
        light = np.argsort(np.where(ii == a, _BIG, W.sum(1)), kind="stable")[:partners]
        mine, others = np.nonzero((qo == a) & mov)[0], np.nonzero(_among(qo, light, R) & mov)[0]
        weight = Y[mine][:, cols[a, arg == a]].sum(1)
        xs = mine[np.argsort(-weight, kind="stable")[:candidates]]
        bs = qo[others]
        cb = cols[bs]  # (O, R): the key rank that rank b meets at step t
        new_a = D[a] - Y[xs][:, None, cols[a]] + Y[others][None, :, cols[a]]  # (X, O, R)
        new_b = D[bs][None] + Y[xs][:, cb] - Y[others[:, None], cb][None]
        rest = _rest_of(D, np.full(R, a), bs[:, None])
        new_T = np.maximum(np.maximum(new_a, new_b), rest[None]).sum(-1)
        homes = (home[xs][:, None] == bs[None, :]).astype(np.int64) + (home[others] == a)[None, :]
        if new_T.size:
            xi, oi = divmod(int(np.argmin(new_T * 3 - homes)), len(others))
            best.append((int(new_T[xi, oi]), -int(homes[xi, oi]), 0, int(xs[xi]), int(others[oi])))

        # Key side: swap one of key rank j's heavy key blocks with any other key rank's block.
        j = int(np.bincount((arg + ii) % R, weights=excess, minlength=R).argmax())
        light = np.argsort(np.where(ii == j, _BIG, W.sum(0)), kind="stable")[:partners]
        mine, others = np.nonzero((ko == j) & mov)[0], np.nonzero(_among(ko, light, R) & mov)[0]
        steps = np.nonzero((arg + ii) % R == j)[0]
        weight = Z[meet[j, steps]][:, mine].sum(0)
        xs = mine[np.argsort(-weight, kind="stable")[:candidates]]
        js = ko[others]
        p = meet[j]  # (R,): rank meeting key rank j at step t
        q = meet[js]  # (O, R): rank meeting key rank j' at step t
        new_p = D[p, ii] - Z[p][:, xs].T[:, None, :] + Z[p][:, others].T[None]  # (X, O, R)
        new_q = (D[q, ii[None, :]] - Z[q, others[:, None]])[None] + Z[q[None], xs[:, None, None]]
        rest = _rest_of(D, p, q)
        new_T = np.maximum(np.maximum(new_p, new_q), rest[None]).sum(-1)
        homes = (home[xs][:, None] == js[None, :]).astype(np.int64) + (home[others] == j)[None, :]
        if new_T.size:
            xi, oi = divmod(int(np.argmin(new_T * 3 - homes)), len(others))
            best.append((int(new_T[xi, oi]), -int(homes[xi, oi]), 1, int(xs[xi]), int(others[oi])))

        if not best:
            break
        new, _, kind, x, o = min(best)
        if new >= T:
            break
        if kind == 0:  # query block x: a -> b, o: b -> a
            a, b = int(qo[x]), int(qo[o])
            W[a] += Y[o] - Y[x]
            W[b] += Y[x] - Y[o]
            Z[a] += A[o] - A[x]
            Z[b] += A[x] - A[o]
            qo[x], qo[o] = b, a
        else:  # key block x: j -> j2, o: j2 -> j
            j, j2 = int(ko[x]), int(ko[o])
            W[:, j] += Z[:, o] - Z[:, x]
            W[:, j2] += Z[:, x] - Z[:, o]
            Y[:, j] += A[:, o] - A[:, x]
            Y[:, j2] += A[:, x] - A[:, o]
            ko[x], ko[o] = j2, j
    return qo, ko, W


def _round_robin(caps: list[int]) -> np.ndarray:
    """Blocks dealt in order to ring ranks 0, 1, ..., R - 1, 0, ... (skipping full ranks): the
    layout that balances masks whose work depends mostly on ``r - c`` (local windows, bands).
    A new array each call; the deal is remembered per ``caps`` (every plan of a mask repeats it)."""
    return _deal(tuple(caps)).copy()


@lru_cache(maxsize=64)
def _deal(caps: tuple[int, ...]) -> np.ndarray:
    """:func:`_round_robin`'s deal, built once per ``caps``."""
    R, nb = len(caps), sum(caps)
    owner = np.empty(nb, dtype=np.int64)
    cnt, g = [0] * R, 0
    for b in range(nb):
        while cnt[g] >= caps[g]:
            g = (g + 1) % R
        owner[b] = g
        cnt[g] += 1
        g = (g + 1) % R
    return owner


def _balance_blocks(
    group_sum,
    rows: np.ndarray | None,
    cols: np.ndarray | None,
    home_W: np.ndarray,
    home: np.ndarray,
    caps: list[int],
    reward: float,
    refine: bool,
    target: float,
    movable: np.ndarray | None = None,
    early=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block layout of one head group: ``(q_owner, kv_owner, W)``.

    ``rows``/``cols`` are the group's ``(NB,)`` marginals (``None``: from ``group_sum()``),
    ``home_W`` its tiles with every block at home, and ``group_sum()`` returns its ``(NB, NB)``
    work (pass 2, only read when needed). The "blocks" may be summary units: then only the
    ``movable`` ones (all of equal size) move and ``caps`` counts movable units per rank.
    If the contiguous layout is within ``target`` of the mean (or ``reward`` is infinite) it is
    kept. Otherwise marginal balancing, which ignores where the work sits inside ``W``, is not
    trusted blindly: the biased greedy, the contiguous layout and the round-robin deal are scored
    on the exact ring time; among those within ``target`` of the mean the one that moves fewest
    blocks wins, else the fastest; then :func:`_refine`.
    """
    R = len(caps)
    goal = target * int(home_W.sum()) / R
    if reward == math.inf or _ring_time(home_W) <= goal:
        return home, home, home_W
    A = group_sum()
    Af = A.astype(np.float64)
    rows = A.sum(1) if rows is None else rows
    cols = A.sum(0) if cols is None else cols
    if movable is None:
        rr = _round_robin(caps)
    else:
        rr = home.copy()
        rr[movable] = _round_robin(caps)
    starts = [(home, home, home_W)]
    for qo, ko in ((_biased_greedy(rows, home, caps, reward, movable), _biased_greedy(cols, home, caps, reward, movable)), (rr, rr)):
        starts.append((qo, ko, _reduce_rows(_reduce_cols(Af, ko, R), qo, R)))
    scored = [(_ring_time(Wk), int((qo != home).sum() + (ko != home).sum()), n) for n, (qo, ko, Wk) in enumerate(starts)]
    good = [s for s in scored if s[0] <= goal]
    _, _, n = min(good, key=lambda s: (s[1], s[0], s[2])) if good else min(scored)
    qo, ko, Wk = starts[n]
    if refine and R <= _REFINE_MAX_RING and _ring_time(Wk) > goal:
        if early is not None:
            early(qo, ko, _REFINE_MAX_SWAPS)
        qo, ko, Wk = _refine(A, Af, qo, ko, home, R, target=target, max_swaps=_REFINE_MAX_SWAPS, movable=movable)
    return qo, ko, Wk


def _local_blocks(group_sum, groups: list[list[int]], heads_only: np.ndarray, home: np.ndarray, R: int, target: float,
                  movable: np.ndarray | None = None, swaps: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The local block layout: ``(q_owner, kv_owner, W)`` ``(U, NB)``, ``(U, NB)``, ``(U, R, R)``,
    or None where it moves nothing.

    Each head group's blocks start at home and :func:`_refine` swaps at most ``swaps`` pairs
    (``_LOCAL_SWAPS`` blocks' worth: summaries pass ``_LOCAL_SWAPS // coarse`` swaps of units) on
    the exact ring time. The balancing of :func:`_balance_blocks` starts from the
    greedy deal, which can move most blocks: where the imbalance is a smooth drift along the
    sequence that deal costs more exchange than it saves (1.4 ms of exchange for 1.3 ms of ring
    time at U1R8 on Wan2.1-14B 720p), while a few dozen swaps of the heaviest blocks take most
    of the gain. This layout is one more candidate for the cost model to weigh (its exchange is
    counted), never chosen on ring time alone, and only by ``_LOCAL_MIN_GAIN`` (:func:`_pick`):
    where even perfect balance (every group's ring time down to the largest group mean, in the
    units of ``heads_only``) would save less than that share of the ring time, nothing is built.
    """
    swaps = _LOCAL_SWAPS if swaps is None else swaps
    U = len(groups)
    rings = np.array([_ring_time(heads_only[k]) for k in range(U)], dtype=np.float64)
    means = heads_only.reshape(U, -1).sum(1) / R
    if rings.max() - means.max() < _LOCAL_MIN_GAIN * rings.max():
        return None  # even perfect balance (ring time = the largest group mean) saves under the margin
    q_owner, kv_owner, W = np.tile(home, (U, 1)), np.tile(home, (U, 1)), heads_only.copy()
    for k, g in enumerate(groups):
        if rings[k] <= target * int(heads_only[k].sum()) / R:
            continue
        A = group_sum(g)
        q_owner[k], kv_owner[k], W[k] = _refine(A, A.astype(np.float64), home, home, home, R, target=target,
                                                max_swaps=swaps, movable=movable)
    if (q_owner == home).all() and (kv_owner == home).all():
        return None
    return q_owner, kv_owner, W


def make_plan(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    ulysses: int,
    ring: int,
    reward: float = DEFAULT_REWARD,
    q_block: int | None = None,
    seq_len: int | None = None,
    balance_heads: bool = True,
    balance_blocks: bool = True,
    per_group_blocks: bool = True,
    uneven_heads: bool = False,
    refine: bool = True,
    refine_target: float = 1.01,
    world: int | None = None,
    cost_model: "CostModel | None" = None,
    head_dim: int = 128,
    element_bytes: int = 2,
    local_blocks: bool = False,
) -> Plan:
    """The db-SP plan of a mask on ``ulysses x ring`` ranks (module docstring for the algorithm).

    The block step on a picture: R = 2, one head group, 4 query blocks of weights
    ``[8, 6, 1, 1]``; blocks 0, 1 live on ring rank 0 and blocks 2, 3 on rank 1::

        contiguous:   rank 0 = {0, 1} -> 14    rank 1 = {2, 3} -> 2
        R_b = 0:      0 -> r0 (8); 1 -> r1, lighter (6); 2 stays home, a tie (7); 3 -> r0, home full
                      rank 0 = {0, 3} -> 9     rank 1 = {1, 2} -> 7     2 blocks moved
        R_b = 2:      1 stays home: rank 1 is lighter by 8, not by more than 2 x 6 = 12
                      rank 0 = {0, 1} -> 14    rank 1 = {2, 3} -> 2     nothing moved

    Balancing marginals ignores where the work sits inside the ``W`` matrix (the greedy can
    make a local-window mask worse), so per head group the greedy, the contiguous layout and a
    round-robin deal are scored on the exact ring time; the cheapest good-enough one (or else the
    best) is refined by block swaps on the exact objective. Finally the plan is never worse than
    the unplanned layout: if balancing heads only, or nothing, gives an equal or lower
    ``rho_s``, that layout is returned (it moves fewer blocks).

    Args:
        mask_or_work: a ``SparseMask`` (self-attention) or its ``work()`` tensor
            ``(B, H, NB, NB)``; summed over the batch. Or a :class:`WorkSummary`
            (:func:`summarize_work`): the plan then moves whole units of ``coarse`` blocks, and
            its ``tile_work`` and ``imbalance()`` are still exact for the full work; ``ring`` must
            divide the summary's ``ring``.
        ulysses: U, must divide the head count (see ``uneven_heads``).
        ring: R, at most the number of blocks.
        reward: R_b >= 0, the home bonus of the biased greedy; ``0`` is plain greedy (best
            marginal balance, moves most blocks), ``math.inf`` keeps every block home. It shapes
            the greedy only: the exact-objective stages (round-robin start, swaps) may move
            other blocks when that is what balances (never with ``math.inf``), and
            :func:`choose_degrees` weighs every move against its exchange time. Default: 2.0 (db-SP).
        q_block, seq_len: required with a work tensor; taken from a mask.
        balance_heads: head-level LPT (else heads stay contiguous). Default: True.
        balance_blocks: block-level balancing (else blocks stay contiguous). Default: True.
        per_group_blocks: a block plan per Ulysses head group, from that group's own statistics
            (db-SP's code shares one plan over all heads; with False the greedy's shared plan is
            used as is, without refinement). Default: True.
        uneven_heads: allow ``H % U != 0``: ranks get ``H // U`` or ``H // U + 1`` heads, balanced
            by work. Needs runtime support for uneven all-to-all splits. Default: False.
        refine: head swaps after LPT, and block swaps on the exact objective (rings up to 32)
            after the block greedy. Default: True.
        refine_target: a group's block layout is good enough once its ring time is within
            this factor of its mean rank work: the start that moves fewest blocks among those
            that reach it is kept, and refinement stops there. Default: 1.01.
        world: the number of ranks, checked against ``ulysses * ring``. Default: not checked.
        cost_model: balance predicted *time* instead of tile entries. Fully dense heads run on
            dense SDPA at ``dense_tflops``, faster per entry than the sparse kernel, so the
            planner weighs each head's work by its rate (dense heads by ``sparse rate / dense
            rate``, in integers) and, at the head level, charges a group that mixes dense and
            sparse heads its ``mixed_overhead_us`` per call (groups of one kind are preferred
            where balance allows). The candidates of both weightings (time and tile entries) are
            then scored by :meth:`CostModel.predict` and the least predicted time wins (ties:
            fewer moved blocks), so the plan is never slower, by the model, than the tile-based
            one. Planning costs up to twice as much where the mask has dense heads. ``None``:
            tile entries, the rule above. Default: None.
        head_dim, element_bytes: for the cost model (its per-entry time and communicated bytes).
            Defaults: 128, 2.
        local_blocks: with a cost model, one more candidate: the local block layout, at most
            ``_LOCAL_SWAPS`` (64) swaps per head group from the contiguous layout on the exact ring
            time (:func:`_local_blocks`); it must be predicted at least ``_LOCAL_MIN_GAIN`` (2%)
            faster than every other candidate. It pays where the ranks' frame ranges differ in
            work (``make_workload(region_skew=...)``): at Wan2.1-14B 720p, 8 emulated ranks, the
            degree choice with it was 1.131x the best unbalanced configuration against 1.119x
            without, side by side on one H100 (README). Off by default: it costs 1-3 ms per degree choice on this CPU, about
            half as much again as the planning of a 50-step run (1.0% -> 1.5% of its attention).
            Default: False.

    Returns:
        A :class:`Plan` with ``tile_work`` filled, so ``plan.imbalance()`` is its rho_s (tile
        entries, also with a cost model; the predicted time's ratio is
        ``cost_model.predict(plan, ...).compute_imbalance``).

    Example::

        >>> plan = make_plan(mask, ulysses=2, ring=4)                    # doctest: +SKIP
        >>> imbalance_ratio(mask, ulysses=2, ring=4), plan.imbalance()
        (1.36, 1.007)
    """
    _check_degrees(ulysses, ring, world)
    reward = _check_reward(reward)
    if isinstance(refine_target, bool) or not isinstance(refine_target, (int, float)) or not refine_target >= 1.0:
        raise ValueError(f"refine_target must be a number >= 1.0, got {refine_target!r}")
    if cost_model is not None:
        if not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a dbsp CostModel or None, got {type(cost_model).__name__}")
        check_positive_int("head_dim", head_dim)
        check_positive_int("element_bytes", element_bytes)
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    return _plan_from(w, ulysses=ulysses, ring=ring, reward=reward, balance_heads=balance_heads,
                      balance_blocks=balance_blocks, per_group_blocks=per_group_blocks, uneven_heads=uneven_heads,
                      refine=refine, refine_target=refine_target, cost_model=cost_model, head_dim=head_dim,
                      element_bytes=element_bytes, local=bool(local_blocks) and cost_model is not None)


def _plan_from(w: _Work, *, ulysses: int, ring: int, cost_model: "CostModel | None" = None, head_dim: int = 128,
               element_bytes: int = 2, local: bool = False, **options: Any) -> Plan:
    """The planner's choice among :func:`_layouts`: the lowest ring time, ties to fewer moves. With a
    cost model, among the candidates of both weightings (:func:`_timed_layouts`): the least
    predicted time, ties to fewer moves, then to the tile-weighted candidate."""
    if cost_model is None:
        return min(_layouts(w, ulysses=ulysses, ring=ring, **options), key=_ring_key)
    layouts, dense = _timed_layouts(w, ulysses=ulysses, ring=ring, cost_model=cost_model, head_dim=head_dim, local=local,
                                    **options)
    predict = _predictor(cost_model, w, head_dim=head_dim, element_bytes=element_bytes, dense=dense)
    return _pick(layouts, lambda p: (predict(p).total_ms, _moved(p)))


def _head_totals(w: "_Work | WorkSummary", st: _Stats | None) -> np.ndarray:
    """``(H,)`` int64 work per head: a summary's, or from pass-1 statistics."""
    return w._head_totals if isinstance(w, WorkSummary) else st.rows.sum(1)


def _timed_layouts(w: "_Work | WorkSummary", *, ulysses: int, ring: int, cost_model: "CostModel", head_dim: int,
                   stats: _Stats | None = None, local: bool = False, **options: Any) -> tuple[list[Plan], tuple[int, ...]]:
    """``(candidates, dense heads)``: :func:`_layouts` on tile entries, then, where time and tiles
    differ (:func:`_rates_of`), on time-weighted work; pass 1 is shared. With ``local``, the local
    block layout of the last weighting too."""
    if not isinstance(w, WorkSummary) and stats is None:
        stats = _stats(w, ring)
    totals = _head_totals(w, stats)
    dense = tuple(int(h) for h in np.nonzero(_full_heads(w, totals))[0])
    rates = _rates_of(cost_model, w, totals, head_dim, ulysses=ulysses, ring=ring)
    # The local layout once: on time-weighted work where time and tile entries differ, else on tiles.
    layouts = _layouts(w, ulysses=ulysses, ring=ring, stats=stats, local=local and rates is None, **options)
    if rates is not None:
        layouts += _layouts(w, ulysses=ulysses, ring=ring, stats=stats, rates=rates, local=local, **options)
    return layouts, dense


def _home_tiles(w: _Work, st: _Stats, groups: list[list[int]], ring: int, sums: dict | None = None) -> np.ndarray:
    """``(U, R, R)``: the groups' tile matrices with every block at home. From pass 1 for short
    rings; else one pass over the groups' heads (``sums`` caches group sums by head tuple)."""
    if st.home_tiles is not None:
        return _sum_groups(st.home_tiles, groups)
    home = _home(w.num_blocks, ring)
    out = []
    for g in groups:
        A = sums[tuple(g)] if sums is not None and tuple(g) in sums else _group_sum(w, g)
        out.append(_reduce_rows(_reduce_cols(A, home, ring), home, ring))
    return np.stack(out)


def _layouts(
    w: _Work,
    *,
    ulysses: int,
    ring: int,
    reward: float = DEFAULT_REWARD,
    balance_heads: bool = True,
    balance_blocks: bool = True,
    per_group_blocks: bool = True,
    uneven_heads: bool = False,
    refine: bool = True,
    refine_target: float = 1.01,
    stats: _Stats | None = None,
    rates: _Rates | None = None,
    prune_for=None,
    local: bool = False,
) -> list[Plan]:
    """The candidate plans, fewest moved blocks first: the unplanned layout (contiguous heads,
    blocks at home), balanced heads with blocks at home, and (with ``balance_blocks``) balanced
    heads and blocks. Each carries its exact ``tile_work``. Two passes over the work.

    With ``rates`` the balancing runs on time-weighted work (:class:`_Rates`), heads with the
    mixed-call cost (:func:`_balance_heads_timed`); ``tile_work`` stays the true tile work.

    ``prune_for`` (summaries only; a degree choice): group set -> :func:`_prune_moves`' test,
    which stops the block balancing once this group set's moved plan cannot win: that plan is
    then left out, or, where no other plan of the candidate can win either, :class:`_Pruned` is
    raised.

    ``local`` (for callers that score candidates with the cost model): also the local block
    layout (:func:`_local_blocks`), which moves few blocks, last (not with ``reward=math.inf``,
    which keeps every block home, nor without ``refine``)."""
    if isinstance(w, WorkSummary):
        prune = None if prune_for is None else prune_for(1 if rates is None else 2)
        return _summary_layouts(w, ulysses=ulysses, ring=ring, reward=reward, balance_heads=balance_heads,
                                balance_blocks=balance_blocks, per_group_blocks=per_group_blocks,
                                uneven_heads=uneven_heads, refine=refine, refine_target=refine_target, rates=rates,
                                prune=prune, local=local)
    if prune_for is not None:
        raise TypeError("prune_for is for summaries only")
    H, nb, U, R = w.heads, w.num_blocks, ulysses, ring
    counts = _head_counts(H, U, uneven_heads)
    _check_ring(R, nb)
    st = _stats(w, R) if stats is None else stats  # pass 1
    if rates is not None:
        st = rates.stats(st)
    off = np.cumsum([0] + counts).tolist()
    contiguous = [list(range(off[k], off[k + 1])) for k in range(U)]
    if not balance_heads:
        groups = contiguous
    elif rates is not None:
        groups = _balance_heads_timed(st.rows.sum(1).tolist(), rates.dense, counts, refine, R * R * rates.mixed)
    else:
        groups = _balance_heads(st.rows.sum(1).tolist(), counts, refine)
    if groups == contiguous:  # (always at U = 1): one layout, not two equal ones
        groups = contiguous
    home = _home(nb, R)
    caps = np.bincount(home, minlength=R).tolist()
    sums: dict[tuple[int, ...], np.ndarray] = {}  # pass 2: each head group's summed work, once
    tokens = _block_tokens(nb, w.q_block, w.seq_len)

    def group_sum(g: list[int]) -> np.ndarray:
        if tuple(g) not in sums:
            A = _group_sum(w, g)
            sums[tuple(g)] = A if rates is None else rates.group(A, g, tokens)
        return sums[tuple(g)]

    def true(W: np.ndarray, groups: list[list[int]], q_owner: np.ndarray, kv_owner: np.ndarray) -> np.ndarray:
        return W if rates is None else rates.unweigh(W, groups, q_owner, kv_owner, tokens)

    if st.home_tiles is None:  # long rings: contiguous-layout tiles come from the group sums
        for g in groups + contiguous:
            group_sum(g)
    homes = np.tile(home, (U, 1))
    heads_only = _home_tiles(w, st, groups, R, sums)
    unplanned = heads_only if groups is contiguous else _home_tiles(w, st, contiguous, R, sums)
    common = dict(ulysses=U, ring=R, heads=H, q_block=w.q_block, seq_len=w.seq_len, counts=counts)
    out = [_build_plan(groups=contiguous, q_owner=homes, kv_owner=homes, tile_work=true(unplanned, contiguous, homes, homes), **common)]
    ordered = _dense_first(groups, rates.dense if rates is not None else _full_heads(w, st.rows.sum(1)))
    if groups is not contiguous or ordered != contiguous:  # (the contiguous groups, dense heads first)
        out.append(_build_plan(groups=ordered, q_owner=homes, kv_owner=homes, tile_work=true(heads_only, groups, homes, homes), **common))
    if balance_blocks and R > 1:
        q_owner, kv_owner, W = homes.copy(), homes.copy(), heads_only.copy()
        if per_group_blocks:
            for k, g in enumerate(groups):
                q_owner[k], kv_owner[k], W[k] = _balance_blocks(
                    lambda g=g: group_sum(g), st.rows[g].sum(0), st.cols[g].sum(0), heads_only[k], home, caps, reward, refine, refine_target
                )
        else:
            q_owner[:] = _biased_greedy(st.rows.sum(0), home, caps, reward)
            kv_owner[:] = _biased_greedy(st.cols.sum(0), home, caps, reward)
            for k, g in enumerate(groups):
                W[k] = _reduce_rows(_reduce_cols(group_sum(g), kv_owner[k], R), q_owner[k], R)
        if (q_owner != homes).any() or (kv_owner != homes).any():
            out.append(_build_plan(groups=ordered, q_owner=q_owner, kv_owner=kv_owner, tile_work=true(W, groups, q_owner, kv_owner),
                                   **common))
    if local and balance_blocks and refine and reward != math.inf and 1 < R <= _REFINE_MAX_RING:
        found = _local_blocks(group_sum, groups, heads_only, home, R, refine_target)
        if found is not None:
            q_owner, kv_owner, W = found
            out.append(_as_local(_build_plan(groups=ordered, q_owner=q_owner, kv_owner=kv_owner,
                                             tile_work=true(W, groups, q_owner, kv_owner), **common)))
    return out


def _summary_layouts(
    s: WorkSummary,
    *,
    ulysses: int,
    ring: int,
    reward: float,
    balance_heads: bool,
    balance_blocks: bool,
    per_group_blocks: bool,
    uneven_heads: bool,
    refine: bool,
    refine_target: float,
    rates: _Rates | None = None,
    prune=None,
    local: bool = False,
) -> list[Plan]:
    """:func:`_layouts` from a summary: the same candidates, blocks moved in whole units.

    Units play the role of blocks (``A`` is a group's ``(NU, NU)`` pooled work, exact), except
    that only full units (``coarse`` blocks) move, so every ring rank keeps its block count; the
    owners are expanded to blocks at the end. One pass over ``pooled`` gives every head's tiles
    under the contiguous layout; a head group's sum is read only where its blocks need balancing.
    """
    H, nb, U, R = s.heads, s.num_blocks, ulysses, ring
    counts = _head_counts(H, U, uneven_heads)
    _check_ring(R, nb)
    _check_aligned(s, R)
    starts, sizes = s._starts, np.diff(s._starts)
    home = _home(nb, R)[starts[:-1]]  # (NU,): home ring rank of every unit
    movable = sizes == s.coarse
    caps = np.bincount(home[movable], minlength=R).tolist()
    head_tiles = _summary_home_tiles(s, R)  # (H, R, R), shared by the candidates of a degree choice
    tokens = np.add.reduceat(_block_tokens(nb, s.q_block, s.seq_len), starts[:-1])  # (NU,) tokens per unit
    if rates is not None:
        head_tiles = head_tiles * rates.weights[:, None, None]
    off = np.cumsum([0] + counts).tolist()
    contiguous = [list(range(off[k], off[k + 1])) for k in range(U)]
    if not balance_heads:
        groups = contiguous
    elif rates is not None:
        groups = _balance_heads_timed(head_tiles.sum((1, 2)).tolist(), rates.dense, counts, refine, R * R * rates.mixed)
    else:
        groups = _balance_heads(head_tiles.sum((1, 2)).tolist(), counts, refine)
    if groups == contiguous:  # (always at U = 1): one layout, not two equal ones
        groups = contiguous

    sums: dict[tuple[int, ...], np.ndarray] = {}  # each head group's (weighted) pooled work, once

    def group_sum(g: list[int]) -> np.ndarray:
        if tuple(g) not in sums:
            A = _summary_group_sum(s, g)
            sums[tuple(g)] = A if rates is None else rates.group(A, g, tokens)
        return sums[tuple(g)]

    def true(W: np.ndarray, groups: list[list[int]], q_owner: np.ndarray, kv_owner: np.ndarray) -> np.ndarray:
        return W if rates is None else rates.unweigh(W, groups, q_owner, kv_owner, tokens)
    heads_only = _sum_groups(head_tiles, groups)
    unplanned = heads_only if groups is contiguous else _sum_groups(head_tiles, contiguous)
    homes = np.tile(_home(nb, R), (U, 1))
    unit_homes = np.tile(home, (U, 1))
    common = dict(ulysses=U, ring=R, heads=H, q_block=s.q_block, seq_len=s.seq_len, counts=counts)
    ordered = _dense_first(groups, _full_heads(s, s._head_totals))
    moved = None  # the balanced block layout's plan; balanced first, so that a pruned candidate builds no plan

    def exchanged(g: list[int], owners, swaps: int = 0) -> int:
        """Group ``g``'s ``2 (q + kv) x heads`` (the cost model's exchanged blocks), or a bound on
        it after ``swaps`` swaps of :func:`_refine` (:func:`_fewest_sent`)."""
        sent = [np.bincount(home[o != home], weights=sizes[o != home], minlength=R) for o in owners]
        if not swaps:
            return 2 * len(g) * int(sum(x.max() for x in sent))
        return 2 * len(g) * _fewest_sent(sent[0], sent[1], swaps, s.coarse)

    local_plan = None  # the local layout (few moves): built first, as the balancing may stop the candidate
    if (local and balance_blocks and refine and reward != math.inf and 1 < R <= _REFINE_MAX_RING
            and (prune is None or not prune[0](2 * min(map(len, groups)) * s.coarse))):  # (one moved unit must not lose)
        found = _local_blocks(group_sum, groups, heads_only, home, R, refine_target, movable, max(1, _LOCAL_SWAPS // s.coarse))
        if found is not None:
            lq, lk, lw = found
            local_sent = max(exchanged(g, (lq[k], lk[k])) for k, g in enumerate(groups))
            if prune is None or not prune[0](local_sent):  # else it must lose: the same test as the balancing's
                local_plan = _as_local(_build_plan(groups=ordered, q_owner=np.repeat(lq, sizes, axis=1),
                                                   kv_owner=np.repeat(lk, sizes, axis=1), tile_work=true(lw, groups, lq, lk),
                                                   **common))
    try:
        if balance_blocks and R > 1:
            q_owner, kv_owner, W = np.tile(home, (U, 1)), np.tile(home, (U, 1)), heads_only.copy()
            if per_group_blocks:
                sent = 0  # the cost model's exchanged blocks so far: max over groups of 2 (q + kv) x heads

                def check(g: list[int], qo: np.ndarray, ko: np.ndarray, swaps: int) -> None:
                    """Stop before refining when even the fewest blocks it could leave moved lose."""
                    bound = max(sent, exchanged(g, (qo, ko), swaps))
                    if bound and prune[0](bound):
                        raise _Pruned

                for k, g in enumerate(groups):
                    early = None if prune is None else (lambda qo, ko, swaps, g=g: check(g, qo, ko, swaps))
                    q_owner[k], kv_owner[k], W[k] = _balance_blocks(
                        lambda g=g: group_sum(g), None, None, heads_only[k], home, caps, reward, refine, refine_target, movable,
                        early
                    )
                    if prune is not None:
                        sent = max(sent, exchanged(g, (q_owner[k], kv_owner[k])))
                        if sent and prune[0](sent):
                            raise _Pruned
            else:
                total = s._all_heads if rates is None else group_sum(list(range(H)))
                q_owner[:] = _biased_greedy(total.sum(1), home, caps, reward, movable)
                kv_owner[:] = _biased_greedy(total.sum(0), home, caps, reward, movable)
                for k, g in enumerate(groups):
                    W[k] = _reduce_rows(_reduce_cols(group_sum(g), kv_owner[k], R), q_owner[k], R)
            if (q_owner != home).any() or (kv_owner != home).any():
                q_blocks, kv_blocks = np.repeat(q_owner, sizes, axis=1), np.repeat(kv_owner, sizes, axis=1)
                moved = _build_plan(groups=ordered, q_owner=q_blocks, kv_owner=kv_blocks, tile_work=true(W, groups, q_owner, kv_owner),
                                    **common)
    except _Pruned:
        if prune[1] and local_plan is None:  # every plan of the candidate loses: stop it
            raise
        moved = None  # only this group set's moved plan loses; its other layouts still compete
    out = [_build_plan(groups=contiguous, q_owner=homes, kv_owner=homes, tile_work=true(unplanned, contiguous, unit_homes, unit_homes),
                       **common)]
    if groups is not contiguous or ordered != contiguous:  # (the contiguous groups, dense heads first)
        out.append(_build_plan(groups=ordered, q_owner=homes, kv_owner=homes, tile_work=true(heads_only, groups, unit_homes, unit_homes),
                               **common))
    return out + [p for p in (moved, local_plan) if p is not None]


def _build_plan(*, ulysses, ring, heads, q_block, seq_len, groups, counts, q_owner, kv_owner, tile_work) -> Plan:
    """A Plan from the planner's arrays, skipping re-validation (the planner builds valid layouts)."""
    memo: dict[bytes, tuple[tuple[int, ...], ...]] = {}
    q_owner, kv_owner = np.array(q_owner, dtype=np.int64), np.array(kv_owner, dtype=np.int64)  # (U, NB) each, owned here
    nb = q_owner.shape[1]
    home = _home(nb, ring)

    def tuples(owner: np.ndarray) -> tuple[tuple[int, ...], ...]:  # groups often share a layout
        key = owner.tobytes()
        if key not in memo:
            memo[key] = _home_tuples(nb, ring) if np.array_equal(owner, home) else _group_tuples(owner, ring)
        return memo[key]

    def layout(owners: np.ndarray) -> tuple[tuple[tuple[int, ...], ...], ...]:
        if ring == 1:  # one ring rank holds every block
            return (_home_tuples(nb, 1),) * ulysses
        if bool((owners == owners[:1]).all()):  # one layout for every group
            return (tuples(owners[0]),) * ulysses
        return tuple(tuples(owners[k]) for k in range(ulysses))

    plan = Plan(
        ulysses=ulysses,
        ring=ring,
        heads=heads,
        q_block=q_block,
        seq_len=seq_len,
        head_perm=tuple(map(int, chain.from_iterable(groups))),
        head_offsets=tuple(accumulate(map(int, counts), initial=0)),
        q_blocks=layout(q_owner),
        kv_blocks=layout(kv_owner),
        tile_work=None if tile_work is None else torch.from_numpy(np.ascontiguousarray(tile_work, dtype=np.int64)),
        _checked=False,
    )
    # Seed the cached owner arrays that Plan would otherwise rebuild from the tuples.
    plan.__dict__["_owners"] = (q_owner, kv_owner)
    return plan


def _fewest_sent(q_sent: np.ndarray, kv_sent: np.ndarray, swaps: int, unit: int) -> int:
    """A lower bound on ``max(q_sent) + max(kv_sent)`` (blocks each ring rank sends away, per
    side) after at most ``swaps`` swaps of :func:`_refine`, each on one side.

    A swap trades two units of ``unit`` blocks, so it changes the sent counts of at most two
    ranks (the units' homes) by at most one unit each. After ``s`` swaps on a side, a rank has
    lost at most ``s`` units and all ranks together at most ``2 s``, so the side's largest count
    is at least ``max(c) - s unit`` and at least the level ``M`` with ``sum(max(0, c_i - M)) =
    2 s unit``, which is ``max_k (sum of the k largest c_i - 2 s unit) / k``. The bound is the
    least sum of both sides' bounds over the splits of ``swaps``. Example: sides ``(8, 8)`` and
    ``(5, 0)``, units of 1, one swap: ``7 + 5`` or ``8 + 4``, so 12.
    """
    levels = []
    lost = unit * np.arange(swaps + 1, dtype=np.float64)  # (S,) units of blocks one rank can lose
    for c in (q_sent, kv_sent):
        c = np.sort(np.asarray(c, dtype=np.float64))[::-1]  # (R,)
        k = np.arange(1, len(c) + 1)
        water = ((np.cumsum(c)[None, :] - 2 * lost[:, None]) / k).max(1)  # (S,)
        levels.append(np.maximum(np.maximum(water, c[0] - lost), 0.0))
    return int(math.ceil((levels[0] + levels[1][::-1]).min() - 1e-9))


class _Pruned(Exception):
    """A degree candidate's planning stopped early: every plan it could score is slower than the best so far."""


def _moved(plan: Plan) -> int:
    """Moved query and key blocks of ``plan`` (counted once per plan: candidates are compared repeatedly)."""
    memo = plan.__dict__
    if "_moved_memo" not in memo:
        home = _home(plan.num_blocks, plan.ring)
        memo["_moved_memo"] = sum(int(np.count_nonzero(owner != home)) for owner in plan._owners)
    return memo["_moved_memo"]


def _ring_key(plan: Plan) -> tuple[int, int]:
    """Order plans by their slowest group's ring time, then by moved blocks."""
    if plan.ring == 1:  # one step, no block moves
        return int(plan.tile_work.numpy().max()), 0
    return int(_steps(plan.tile_work.numpy()).max(-2).sum(1).max()), _moved(plan)
