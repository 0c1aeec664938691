"""Plan reuse: :class:`PlanCache` keeps plans across denoising steps while the mask's ``rho_s``
under them stays low, with an exact precomputed check per cached plan on summaries
(:class:`_Check`), optional incremental repairs of head-level plans (:func:`_repair`) and
optional decisions on a background thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from ..mask import SparseMask
from . import _jit
from .balance import DEFAULT_REWARD, _build_plan, _check_reward, _dense_first, _plan_from
from .core import Plan, WorkSummary, _Work, _as_work, _full_heads, _home, _onehot, _rho, _tile_work, _unit_owners
from .cost import CostModel
from .degrees import _candidates, choose_degrees


DEFAULT_REUSE_THRESHOLD = 1.05
"""P_s: keep a plan while the new mask's rho_s under it stays at or below this (balanced plans
land at 1.00-1.03, so this lets a mask drift by a few percent of imbalance before re-planning)."""


# ---------------------------------------------------------------------------------------- reuse


_INCREMENTAL_TARGET = 1.01
"""An incremental re-plan (:func:`_repair`) is kept when its rho_s reaches this (``make_plan``'s
default ``refine_target``, where full plans land); above it :class:`PlanCache` plans afresh."""


class _Check:
    """The reuse check of one cached plan on summaries: its exact ``rho_s`` on a new summary.

    Under a fixed plan the tile matrix is a linear function of the summary, so everything that
    depends only on the plan is built once here: the head groups' index arrays, and the units'
    one-hot owner matrices ``(R, NU)`` / ``(NU, R)`` (their products with a group's pooled work
    reduce it to ``(R, R)`` tiles; float64 products of integers below 2^53 are exact). A check
    then reads the summary once: ``R = 1`` needs only the per-head totals (preset by
    :func:`summarize_work`), so it is ``O(H)``; longer rings sum each group's pooled work (one
    pass over ``(H, NU, NU)``) and do two small products per group. The result equals
    ``imbalance_ratio(summary, ..., plan=plan)`` exactly (same integer tiles, same formula).
    """

    def __init__(self, plan: Plan, s: WorkSummary) -> None:
        U, R = plan.ulysses, plan.ring
        self.U, self.R, self.heads, self.bounds = U, R, s.heads, s.unit_bounds
        self.units = (s.num_blocks, s.ring, s.coarse)  # these determine the unit bounds
        perm = np.asarray(plan.head_perm, dtype=np.int64)
        off = plan.head_offsets
        self.perm, self.starts = perm, np.asarray(off[:-1], dtype=np.int64)
        if R > 1:
            self.groups = [perm[off[k] : off[k + 1]] for k in range(U)]
            self.largest = max(len(g) for g in self.groups)
            q_owner, kv_owner = _unit_owners(s, plan)  # ValueError if the plan splits a unit
            self.oq = np.stack([_onehot(q_owner[k], R).T for k in range(U)])  # (U, R, NU)
            self.okv = np.stack([_onehot(kv_owner[k], R) for k in range(U)])  # (U, NU, R)
            i = np.arange(R)
            self.flat = (i[:, None] * R + (i[:, None] + i[None, :]) % R).reshape(-1)  # as in _steps

    def _same_units(self, s: WorkSummary) -> None:
        """Raise ``ValueError`` unless ``s`` has the unit bounds and head count of the build."""
        # Equal (NB, ring, coarse) give equal bounds: the NU + 1 of them are compared only otherwise.
        if s.heads != self.heads or ((s.num_blocks, s.ring, s.coarse) != self.units and s.unit_bounds != self.bounds):
            raise ValueError("the summary's units or heads differ from those the check was built for")

    def tiles(self, s: WorkSummary) -> np.ndarray:
        """``(U, R, R)`` int64: the plan's tile matrix on summary ``s`` (same units as at build)."""
        self._same_units(s)
        return self._tiles(s)

    def _tiles(self, s: WorkSummary) -> np.ndarray:
        U, R = self.U, self.R
        if R == 1:
            return np.add.reduceat(s._head_totals[self.perm], self.starts).reshape(U, 1, 1)
        a = s._cells
        dt = np.int32 if a.dtype == np.int32 and self.largest * s._cell_bound < 2**31 else np.int64
        acc = np.empty((U,) + a.shape[1:], dtype=dt)  # the groups' summed pooled work
        for k, g in enumerate(self.groups):
            if len(g) == a.shape[0]:  # one group of every head: preset where the summary was built
                acc[k] = s._all_heads
            else:  # in place: no gather of the group's heads
                np.copyto(acc[k], a[g[0]])
                for h in g[1:]:
                    np.add(acc[k], a[h], out=acc[k])
        return np.matmul(self.oq, np.matmul(acc.astype(np.float64), self.okv)).astype(np.int64)

    def rho(self, s: WorkSummary, *, same_units: bool = False) -> float:
        """Exact ``rho_s`` of summary ``s`` under the plan (the formula of :func:`_rho`).

        ``same_units=True``: the caller knows that ``s`` has the units and heads of the build
        (:class:`PlanCache` checks only summaries of the request its plan was cached for), so
        they are not compared again.
        """
        if not same_units:
            self._same_units(s)
        W = self._tiles(s)
        if self.R > 1:
            return self.rho_of(W)
        # R = 1, the per-step check of head-level plans: the groups' loads as Python ints (exact),
        # without numpy reductions over the (U, 1, 1) tiles.
        return _head_rho(W.ravel().tolist())

    def rho_of(self, W: np.ndarray) -> float:
        """``rho_s`` of ``(U, R, R)`` tiles ``W``, computed as :func:`_rho` does."""
        total = int(W.sum())
        if total == 0:
            return 1.0
        U, R = self.U, self.R
        if R == 1:
            return int(W.max()) * U * R / total
        D = W.reshape(U, R * R)[:, self.flat].reshape(U, R, R)
        return int(D.max(1).sum(1).max()) * U * R / total


def _head_rho(loads: list[int]) -> float:
    """``rho_s`` of a head-level plan (``R = 1``) from its groups' loads: the heaviest load times
    ``U`` over the total, as :func:`_rho` computes it (``1.0`` when there is no work)."""
    total = sum(loads)
    return 1.0 if total == 0 else max(loads) * len(loads) / total


def _swap_heads(totals: np.ndarray, groups: list[list[int]]) -> list[list[int]]:
    """Head groups repaired from ``groups`` by pairwise swaps (every group keeps its head count).

    While a head ``x`` of the heaviest group ``a`` (ties: lowest ``a``) and a lighter head ``y`` of
    another group can swap so that both groups end below ``a``'s old load, apply the swap with
    the lowest new pair maximum (ties: the first in the order (``y``'s group, ``y``, ``x``)). Each
    swap lowers the sorted load vector, so this terminates; the heaviest load never rises.
    Deterministic (integer arithmetic, fixed tie-breaking). Returns every group's heads ascending.
    """
    if len(groups) == 1:
        return [sorted(groups[0])]
    rows = [sorted(int(h) for h in g) for g in groups]
    _swap_rows(np.asarray(totals, dtype=np.int64).tolist(), rows)
    return rows


def _swap_rows(tot: list[int], rows: list[list[int]]) -> list[int]:
    """:func:`_swap_heads` in place on ``rows`` (ascending head ids, kept so) with the per-head
    totals ``tot`` as Python ints; returns the groups' final loads.

    Plain Python: a round visits the other groups from the lightest and stops at the first whose
    best possible pair maximum, ``la - (la - lb) // 2``, is above the best swap found (a heavier
    group's bound is no lower); for each ``y`` it scans ``a``'s heads from the heaviest, skipping
    those at least the gap heavier and stopping at the first no heavier than ``y``. At the sizes
    it runs at (``H = 40``, ``U = 8``) a repair takes a few hundred such steps, less than numpy's
    per-call overhead on ``(U, H / U, H / U)`` arrays every round.
    """
    H, U = len(tot), len(rows)
    load = [sum([tot[h] for h in g]) for g in rows]
    for _ in range(4 * H * U):
        la = max(load)
        a = load.index(la)  # the heaviest group, lowest index on ties
        xs = sorted([(tot[x], x) for x in rows[a]], reverse=True)  # a's heads, heaviest first
        # The best swap so far as (new pair maximum, b, y, x); every real swap has a maximum below la.
        best, bb, by, bx = la, U, H, H
        for lb, b in sorted(zip(load, range(U))):
            gap = la - lb  # a swap moving d = tot[x] - tot[y] needs 0 < d < gap (both end below la)
            if gap < 2 or la - gap // 2 > best:
                break  # max(la - d, lb + d) >= la - gap // 2, and the remaining groups are no lighter
            for y in rows[b]:
                ty = tot[y]
                hi = ty + gap
                for tx, x in xs:
                    if tx >= hi:
                        continue
                    if tx <= ty:
                        break
                    d = tx - ty
                    new = la - d if d + d <= gap else lb + d
                    if new < best or (new == best and (b, y, x) < (bb, by, bx)):
                        best, bb, by, bx = new, b, y, x
        if best == la:
            break
        d = tot[bx] - tot[by]
        rows[a].remove(bx)
        rows[a].append(by)
        rows[a].sort()
        rows[bb].remove(by)
        rows[bb].append(bx)
        rows[bb].sort()
        load[a] -= d
        load[bb] += d
    return load


def _repair(s: WorkSummary, plan: Plan, *, target: float) -> "Plan | None":
    """An incremental re-plan of a head-level plan (``R = 1``) for the new summary ``s``, or None
    when it does not reach ``rho_s <= target`` (the caller then plans afresh).

    At ``R = 1`` a plan is only its head groups and ``rho_s`` is the heaviest group's share of
    the per-head totals, so the repair is :func:`_swap_heads` from the cached groups on the new
    totals (which :func:`summarize_work` presets): ``O(H)`` data, no pass over ``pooled``. Its
    ``rho_s`` under ``s`` is never above the cached plan's. It keeps every rank's head count and
    is a valid :class:`Plan`, but it is not the plan :func:`make_plan` would build from ``s``
    (LPT from scratch, then the same swaps); both are local optima of the same swap rule.
    Longer rings are not repaired: refining the cached block layouts after the heads move cost
    more than planning afresh on this repository's drifting workloads.

    The repair keeps the cached plan's block layout (at ``R = 1`` every group's one ring rank
    holds every block) and head counts; only ``head_perm`` and ``tile_work`` change. A repair
    that misses ``target`` is not built.
    """
    if plan.ring != 1:
        return None
    U, totals = plan.ulysses, s._head_totals
    perm, off = plan.head_perm, plan.head_offsets
    groups = [sorted(perm[off[k] : off[k + 1]]) for k in range(U)]
    loads = _swap_rows(totals.tolist(), groups)  # the groups' loads: the (U, 1, 1) tiles
    rho = _head_rho(loads)
    if rho > target:
        return None
    groups = _dense_first(groups, _full_heads(s, totals))
    W = torch.from_numpy(np.array(loads, dtype=np.int64).reshape(U, 1, 1))
    new = Plan(**{**plan._layout(), "head_perm": tuple(chain.from_iterable(groups)), "tile_work": W, "_checked": False})
    # As _build_plan does: seed the owner arrays that Plan would otherwise rebuild from the block
    # tuples (the cached plan's, where it has them: the same layout; read-only like every plan's),
    # and the rho_s of the tiles.
    owners = plan.__dict__.get("_owners")
    if owners is None:
        owner = np.zeros((U, plan.num_blocks), dtype=np.int64)  # every block at ring rank 0
        owners = (owner, owner)
    new.__dict__["_owners"] = owners
    new.__dict__["_imbalance_memo"] = rho
    return new


class PlanCache:
    """Plans kept across denoising steps, one per key (e.g. the layer index); re-plans on drift.

    ``get(key, mask, ...)`` evaluates the new mask under the cached plan (one tile pass) and keeps
    the plan (a *hit*) while ``rho_s <= threshold`` (db-SP's rule with P_s), or, when balancing
    could not get below ``threshold`` (few heads or blocks per rank), while ``rho_s`` stays within
    ``threshold - 1`` of what the plan had when it was built. Otherwise, or for a new key or
    other degrees, it plans afresh (a *miss*). With ``world=`` instead of ``ulysses=``/``ring=`` a miss re-runs
    :func:`choose_degrees`. A hit returns the very same ``Plan`` object, so runtime state keyed on
    it stays valid. Deterministic: ranks that feed identical masks make identical decisions.

    Masks, work tensors and :class:`WorkSummary` objects are all accepted. With summaries the
    check reads only the ``(H, NU, NU)`` pooled work (well under 1 ms at Wan2.1-14B 720p, against
    ~50 ms for a pass over the dense work), and its ``rho_s`` is exact: plans built from a summary
    move whole units, so the threshold means the same as with the full work tensor. A plan is
    reused only for inputs of the same kind (summaries of the same ``coarse`` and ``ring``, or
    masks and work tensors); switching kind is a miss. For summaries the check is precomputed per
    cached plan (``_Check``: head groups and unit one-hot owners built once), so a check at ``R = 1``
    reads only the per-head totals and one at ``R > 1`` one pass over ``pooled``; it gives the same
    ``rho_s`` as :func:`imbalance_ratio`, bit for bit.

    **Incremental re-plans** (``incremental=True``, summaries, ring degree 1): a miss first repairs
    the cached plan, whose only content at ``R = 1`` is its head groups, by pairwise head swaps on
    the new per-head totals (no pass over ``pooled``), and keeps the repair when its ``rho_s``
    reaches 1.01 (where full plans land); otherwise it plans afresh (``world=``: re-chooses the
    degrees). A repair's ``rho_s`` is never above the cached plan's on the new mask and it is a
    valid plan, but it is not the plan :func:`make_plan` would return, and with ``world=`` the
    degrees are re-chosen only when a repair fails. Longer rings always plan afresh (repairing
    their block layouts cost more than a new plan). Off by default: the plans then equal
    :func:`make_plan`'s (and :func:`choose_degrees`') on the mask of every miss.

    **Deferred decisions** (``defer=True``) take planning off the caller's thread: each ``get``
    returns the plan decided at the previous call for the key and hands this call's mask to one
    background thread, which checks it and re-plans (or re-chooses degrees) if needed; the next
    ``get`` for the key waits for that decision (usually long finished: it had a whole step of
    GPU work to run beside) and returns it. Every rank therefore switches plans at the same call,
    so ranks that feed identical masks still make identical decisions. The first call for a key
    (or after the degrees or input kind change) returns the unbalanced layout: the requested
    degrees, or with ``world=`` the largest Ulysses degree the heads allow. The plan in use lags
    the masks by one step, which the reuse rule already tolerates (masks drift slowly). The thread
    shares Python's GIL with the caller: its decisions still slow the caller's Python work (kernel
    launches) a little; on this repository's CPU benchmark the caller's share of planning fell from
    21% to 4% of the predicted attention time (``benchmarks/bench_plan.py``). Where the check is
    cheaper than the hand-off (a plan with ``R = 1`` and a summary: ``O(H)``), ``get`` makes it on
    the caller's thread and sends only misses to the background; the decisions are the same. With
    ``incremental=True`` as well the caller's share is 0.6% there (background: 1.2%, mostly the
    first degree choice of each layer; ``results/cpu/plan.log``).

    **Compiled loops**: where numba is installed (``dbsp[fast]``), the constructor compiles the
    planner's loops or loads them from numba's cache (:func:`dbsp.plan._jit.warm_up`: ~1 s, ~5 s
    once after an install), so that no ``get`` pays for it in the middle of a run.

    Args:
        threshold: P_s >= 1. Default: ``DEFAULT_REUSE_THRESHOLD`` (1.05).
        reward, uneven_heads: as in :func:`make_plan`.
        cost_model, head_dim, element_bytes: for ``world=`` (degree choice); a cost model given
            here also plans fixed degrees by predicted time (``make_plan(cost_model=...)``); the
            reuse check stays on the tile-entry rho_s. Default: None (``world=``: the default model).
        defer: decide in a background thread, one call late (above). Default: False.
        incremental: repair the cached plan on a miss before planning afresh (above; summaries
            only). Default: False.
        fast_check: check summaries with the precomputed check (above); ``False`` recomputes the
            tiles from scratch every time (the same ``rho_s``; for comparisons). Default: True.
        local_blocks: re-plans also weigh the local block layout (:func:`make_plan`'s
            ``local_blocks``; needs a cost model for fixed degrees, always used with ``world=``).
            Default: False.

    Attributes:
        hits, misses: counts of decisions since construction (or :meth:`clear`).
        repairs: the misses answered by an incremental repair (included in ``misses``).
        decide_ms: wall time spent deciding (checks and re-plans), on whichever thread.
        decide_cpu_ms: CPU time of the deciding thread over the same spans (``time.thread_time``;
            unlike ``decide_ms`` it does not count waiting for the CPU or the GIL).
        last_imbalance: rho_s of the mask of the latest decision under the plan it chose.

    Example::

        >>> cache = PlanCache(threshold=1.05)
        >>> for step in range(50):                                  # doctest: +SKIP
        ...     plan = cache.get(layer, masks[step], ulysses=2, ring=4)
        >>> cache.hits, cache.misses
        (47, 3)
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_REUSE_THRESHOLD,
        reward: float = DEFAULT_REWARD,
        uneven_heads: bool = False,
        cost_model: CostModel | None = None,
        head_dim: int = 128,
        element_bytes: int = 2,
        defer: bool = False,
        incremental: bool = False,
        fast_check: bool = True,
        local_blocks: bool = False,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 1.0:
            raise ValueError(f"threshold must be a number >= 1.0 (P_s), got {threshold!r}")
        if not isinstance(defer, bool):
            raise TypeError(f"defer must be True or False, got {defer!r}")
        for name, value in (("incremental", incremental), ("fast_check", fast_check), ("local_blocks", local_blocks)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.incremental, self.fast_check = incremental, fast_check
        self._checks: dict[Any, _Check] = {}  # key -> the precomputed check of its cached plan (summaries)
        self.threshold = float(threshold)
        self.defer = defer
        self._pending: dict[Any, Future] = {}  # key -> the background decision of the last call
        self.decide_ms = self.decide_cpu_ms = 0.0
        self._lock = threading.Lock()  # counters are updated from the caller's and the background thread
        self._worker: ThreadPoolExecutor | None = None
        self._options = {"reward": _check_reward(reward), "uneven_heads": bool(uneven_heads)}
        self._choice = {"cost_model": cost_model, "head_dim": head_dim, "element_bytes": element_bytes}
        self._local = local_blocks
        self._plans: dict[Any, tuple[tuple, Plan, float]] = {}  # key -> (request, plan, limit)
        self.hits = 0
        self.misses = 0
        self.repairs = 0
        self.last_imbalance = float("nan")
        _jit.warm_up()  # numba's import and compilation now, not at the first plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        """Forget every plan and reset the counts (after any pending deferred decision finishes)."""
        for fut in self._pending.values():
            fut.result()
        self._pending.clear()
        self._plans.clear()
        self._checks.clear()
        self.hits = self.misses = self.repairs = 0
        self.decide_ms = self.decide_cpu_ms = 0.0

    def get(
        self,
        key: Any,
        mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
        *,
        ulysses: int | None = None,
        ring: int | None = None,
        world: int | None = None,
        q_block: int | None = None,
        seq_len: int | None = None,
    ) -> Plan:
        """The plan for ``key`` and this mask: the cached one if it still balances, else a new one.

        Give either ``ulysses`` and ``ring``, or ``world`` (degrees chosen by the cost model).
        """
        if world is None:
            if ulysses is None or ring is None:
                raise TypeError("PlanCache.get needs ulysses= and ring=, or world=")
            check_positive_int("ulysses", ulysses)
            check_positive_int("ring", ring)
            request: tuple = ("degrees", ulysses, ring)
        else:
            if ulysses is not None or ring is not None:
                raise TypeError("PlanCache.get takes ulysses= and ring=, or world=, not both")
            request = ("world", check_positive_int("world", world))
        w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
        # Plans from summaries move whole units; they are kept for summaries of the same units only.
        source = ("summary", w.coarse, w.ring) if isinstance(w, WorkSummary) else ("work",)
        request += (w.heads, w.num_blocks, w.q_block, w.seq_len) + source
        if not self.defer:
            return self._decide(key, request, w, ulysses, ring, world)
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.result()  # the previous call's decision (re-raises its error, if any)
        cached = self._plans.get(key)
        plan = cached[1] if cached is not None and cached[0] == request else None
        if plan is None:
            plan = self._unbalanced(request, w)
        if plan is None:  # no unbalanced layout for these degrees (uneven heads): decide now
            return self._decide(key, request, w, ulysses, ring, world)
        if cached is not None and plan is cached[1] and self._cheap(plan, w):
            # The check of a head-level plan on a summary costs less than the hand-off: made here,
            # and only a miss goes to the background (the same decision, made from the same mask).
            t0, c0 = time.perf_counter(), time.thread_time()
            rho = self._check(key, plan, w)
            if rho <= cached[2]:
                with self._lock:
                    self.hits += 1
                    self.last_imbalance = rho
            with self._lock:
                self.decide_ms += 1e3 * (time.perf_counter() - t0)
                self.decide_cpu_ms += 1e3 * (time.thread_time() - c0)
            if rho <= cached[2]:
                return plan
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbsp-plan")
        self._pending[key] = self._worker.submit(self._decide, key, request, w, ulysses, ring, world)
        return plan

    def _cheap(self, plan: Plan, w: "_Work | WorkSummary") -> bool:
        """Whether the check of ``plan`` on ``w`` is ``O(H)``: a summary's head totals at ``R = 1``."""
        return plan.ring == 1 and self.fast_check and isinstance(w, WorkSummary)

    def _check(self, key, plan: Plan, w: "_Work | WorkSummary") -> float:
        """Exact rho_s of ``w`` under the cached ``plan`` of ``key`` (``w`` of the plan's request)."""
        if isinstance(w, WorkSummary) and self.fast_check:
            check = self._checks.get(key)
            if check is None:
                check = self._checks[key] = _Check(plan, w)
            # Every summary checked under one cached plan has its request's heads, NB, coarse and
            # ring, hence the units the check was built for.
            return check.rho(w, same_units=True)
        return _rho(torch.from_numpy(_tile_work(w, plan)))

    def _unbalanced(self, request: tuple, w: "_Work | WorkSummary") -> "Plan | None":
        """The contiguous layout for ``request`` (``world=``: the largest Ulysses degree), or None."""
        if request[0] == "degrees":
            u, r = request[1], request[2]
        else:
            try:
                u, r = max(_candidates(request[1], w.heads, w.num_blocks, False))
            except ValueError:
                return None
        if w.heads % u or r > w.num_blocks:
            return None
        # Plan.identity's layout, built without re-validating it (a few ms on the caller's thread).
        homes = np.tile(_home(w.num_blocks, r), (u, 1))
        contiguous = [list(range(k * (w.heads // u), (k + 1) * (w.heads // u))) for k in range(u)]
        layout = dict(ulysses=u, ring=r, heads=w.heads, q_block=w.q_block, seq_len=w.seq_len, counts=[w.heads // u] * u,
                      groups=contiguous, q_owner=homes, kv_owner=homes)
        base = _build_plan(**layout, tile_work=None)
        return _build_plan(**layout, tile_work=_tile_work(w, base))

    def _decide(self, key, request: tuple, w, ulysses, ring, world) -> Plan:
        """Check the cached plan on ``w`` and keep it, or plan afresh; record the decision."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._decide_now(key, request, w, ulysses, ring, world)
        finally:
            with self._lock:
                self.decide_ms += 1e3 * (time.perf_counter() - t0)
                self.decide_cpu_ms += 1e3 * (time.thread_time() - c0)

    def _decide_now(self, key, request: tuple, w, ulysses, ring, world) -> Plan:
        cached = self._plans.get(key)
        if cached is not None and cached[0] == request:
            rho = self._check(key, cached[1], w)
            if rho <= cached[2]:
                with self._lock:
                    self.hits += 1
                    self.last_imbalance = rho
                return cached[1]
            if self.incremental and isinstance(w, WorkSummary):
                plan = _repair(w, cached[1], target=_INCREMENTAL_TARGET)
                if plan is not None:
                    with self._lock:
                        self.misses += 1
                        self.repairs += 1
                    return self._keep(key, request, plan)
        with self._lock:
            self.misses += 1
        if world is None:
            timed = self._choice if self._choice["cost_model"] is not None else {}
            plan = _plan_from(w, ulysses=ulysses, ring=ring, **timed, **self._options, local=self._local and bool(timed))
        else:
            _, _, plan = choose_degrees(w, world=world, heads=w.heads, **self._choice, **self._options,
                                        local_blocks=self._local)
        return self._keep(key, request, plan)

    def _keep(self, key, request: tuple, plan: Plan) -> Plan:
        """Cache ``plan`` for ``key`` (its check is built at the next summary check)."""
        self.last_imbalance = plan.imbalance()
        rho = self.last_imbalance
        self._checks.pop(key, None)
        self._plans[key] = (request, plan, self.threshold if rho <= self.threshold else rho + self.threshold - 1.0)
        return plan
