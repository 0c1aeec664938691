"""The degree choice: :func:`choose_degrees` picks ``(U, R)`` by the cost model's predicted time.

:func:`score_degrees` plans and scores every factorisation ``U * R`` of the world size. Lower
bounds on a candidate's time (:func:`_lower_bound_ms`, on a summary the tighter
:func:`_summary_bound_ms` and :func:`_moved_bound_ms`) let the choice skip candidates that cannot
win and stop a candidate's block balancing once the blocks it moves make it lose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int
from ..mask import SparseMask
from . import _jit
from .balance import (DEFAULT_REWARD, _MEMO, _Pruned, _balance_heads, _balance_heads_timed, _check_reward, _head_totals,
                      _layouts, _moved, _pick, _ring_key)
from .core import (Plan, WorkSummary, _Stats, _Work, _as_work, _cdiv, _full_heads, _head_counts, _home, _stats, _steps,
                   _sum_groups, _summary_home_tiles, _unit_chunks, _unit_starts, _work_per_head)
from .cost import CostModel, Prediction, _predictor, _rates_of


# ---------------------------------------------------------------------------------------- degree choice


@dataclass(frozen=True)
class DegreeChoice:
    """One scored ``(ulysses, ring)`` candidate: its plan and the cost model's prediction."""

    ulysses: int
    ring: int
    plan: Plan
    prediction: Prediction


def _candidates(world: int, heads: int, num_blocks: int, uneven_heads: bool) -> list[tuple[int, int]]:
    out = []
    for u in range(1, world + 1):
        if world % u == 0 and u <= heads and (uneven_heads or heads % u == 0) and world // u <= num_blocks:
            out.append((u, world // u))
    if not out:
        raise ValueError(
            f"no (ulysses, ring) with ulysses * ring = world={world}, ulysses dividing heads={heads}"
            f"{' (or uneven)' if uneven_heads else ''} and ring <= num_blocks={num_blocks}"
        )
    return out


def score_degrees(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    world: int,
    heads: int | None = None,
    cost_model: CostModel | None = None,
    balance: bool = True,
    reward: float = DEFAULT_REWARD,
    uneven_heads: bool = False,
    head_dim: int = 128,
    element_bytes: int = 2,
    q_block: int | None = None,
    seq_len: int | None = None,
    local_blocks: bool = False,
) -> list[DegreeChoice]:
    """Plan and score every factorisation ``world = ulysses * ring`` that the head count allows.

    Candidates: every divisor ``U`` of ``world`` with ``U <= heads`` and ``heads % U == 0`` (any
    ``U <= heads`` with ``uneven_heads``), ``R = world / U <= num_blocks``. With ``balance``,
    each candidate keeps the faster (by the cost model) of the full plan and the plan that
    balances heads only, so blocks move only where the exchange pays for itself.

    Args:
        mask_or_work: a ``SparseMask``, its ``work()`` tensor (then ``q_block``/``seq_len``) or a
            :class:`WorkSummary` (whose ``ring`` every candidate ring degree must divide).
        world: P, the number of ranks.
        heads: H, checked against the mask when given. Default: the mask's.
        cost_model: Default: :meth:`CostModel.default`.
        balance: plan with :func:`make_plan` (else the unbalanced identity layout). Default: True.
        reward, uneven_heads, local_blocks: as in :func:`make_plan`.
        head_dim, element_bytes: as in :meth:`CostModel.predict`.

    Returns:
        One :class:`DegreeChoice` per candidate, by increasing ``ulysses``.
    """
    return _scored(mask_or_work, world=world, heads=heads, cost_model=cost_model, balance=balance, reward=reward,
                   uneven_heads=uneven_heads, head_dim=head_dim, element_bytes=element_bytes, q_block=q_block,
                   seq_len=seq_len, prune=False, local_blocks=local_blocks)


def _scored(mask_or_work, *, world, heads=None, cost_model=None, balance=True, reward=DEFAULT_REWARD, uneven_heads=False,
            head_dim=128, element_bytes=2, q_block=None, seq_len=None, prune: bool,
            local_blocks: bool = False) -> list[DegreeChoice]:
    """:func:`score_degrees`' argument checks, then :func:`_score`."""
    check_positive_int("world", world)
    cost_model = CostModel.default() if cost_model is None else cost_model
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a dbsp CostModel or None, got {type(cost_model).__name__}")
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    if heads is not None and check_positive_int("heads", heads) != w.heads:
        raise ValueError(f"heads={heads} but the mask has {w.heads} heads")
    return _score(w, world, cost_model, balance=balance, reward=_check_reward(reward), uneven_heads=uneven_heads,
                  head_dim=head_dim, element_bytes=element_bytes, prune=prune, local=bool(local_blocks))


def _score(w: "_Work | WorkSummary", world: int, cost_model: CostModel, *, balance: bool, reward: float,
           uneven_heads: bool, head_dim: int, element_bytes: int, prune: bool,
           local: bool = False) -> list[DegreeChoice]:
    """:func:`score_degrees` on checked arguments. With ``prune``, candidates are planned ``R = 1``
    first (a head balancing only: cheap, and a time to beat), then in order of
    :func:`_lower_bound_ms`, and those whose bound exceeds the best predicted time found so far
    are skipped (they cannot win), so the result holds the best candidate but not every one. On a
    summary, once a time is found, each later candidate with ``R > 1`` is first held to the tighter
    :func:`_summary_bound_ms`, then planned with :func:`_prune_moves`, which stops a block
    balancing as soon as the blocks it moves make its plan slower than the best (that plan is
    left out; the candidate stops where none of its other plans can win). (``R = 1`` candidates
    are planned without it: their plan is only a head balancing, hardly dearer than the bound.)"""
    outer = getattr(_MEMO, "memo", None)
    _MEMO.memo = {} if outer is None else outer
    try:
        return _score_now(w, world, cost_model, balance=balance, reward=reward, uneven_heads=uneven_heads,
                          head_dim=head_dim, element_bytes=element_bytes, prune=prune, local=local)
    finally:
        _MEMO.memo = outer


def _score_now(w: "_Work | WorkSummary", world: int, cost_model: CostModel, *, balance: bool, reward: float,
               uneven_heads: bool, head_dim: int, element_bytes: int, prune: bool,
           local: bool = False) -> list[DegreeChoice]:
    """:func:`_score` with the head-group memo in place."""
    predict = _predictor(cost_model, w, head_dim=head_dim, element_bytes=element_bytes)
    pairs = _candidates(world, w.heads, w.num_blocks, uneven_heads and balance)
    tight = dict(reward=reward, uneven_heads=uneven_heads, balance=balance, head_dim=head_dim, element_bytes=element_bytes)
    bounds = {}
    summary = prune and isinstance(w, WorkSummary)
    if prune:
        totals = _work_per_head(w)
        bounds = {p: _lower_bound_ms(cost_model, w, totals, *p, head_dim=head_dim, element_bytes=element_bytes) for p in pairs}
        pairs = sorted(pairs, key=lambda p: (p[1] > 1, bounds[p], -p[0]))  # R = 1 first: cheap, a time to beat
    out: list[DegreeChoice] = []
    best = math.inf
    for u, r in pairs:
        limit = best * (1 + 1e-9)
        if prune and bounds[u, r] > limit:
            continue
        prune_for = None
        if summary and best < math.inf and r > 1:
            # The summary bounds cost about a head balancing each, so they are computed only where
            # there is a time to beat, and not for R = 1, whose plan is hardly dearer than its bound.
            parts: dict = {}
            if _summary_bound_ms(cost_model, w, u, r, moves=False, parts=parts, **tight) > limit:
                continue
            if "tighten" in parts:  # sorting every rank's units: only for candidates still in the race
                if parts["tighten"]() > limit:
                    continue
                prune_for = lambda n, p=parts, limit=limit: _prune_moves(p, n, limit)  # noqa: E731
        try:
            plain, balanced = _score_pair(w, u, r, predict, reward=reward, uneven_heads=uneven_heads, balance=balance,
                                          cost=(cost_model, head_dim), prune_for=prune_for, local=local)
        except _Pruned:  # its block balancing showed that it cannot win
            continue
        choice = balanced if balance else plain
        best = min(best, choice.prediction.total_ms)
        out.append(choice)
    return sorted(out, key=lambda c: c.ulysses)


def _prune_moves(parts: dict, n: int, limit: float):
    """For the block balancing of group set ``n`` (1: balanced heads, 2: time-balanced) of one
    candidate, from its :func:`_summary_bound_ms` ``parts``: ``(test, whole)``, or None.

    ``test(sent)`` is True once a plan that already exchanges ``sent`` blocks (the cost model's
    count, ``2 (q + kv) x heads`` of the busiest group so far) must be slower than ``limit``: the
    set's moved plan is then dropped, which cannot change the pick. ``whole`` is True where no
    other plan of the candidate (blocks at home, or the other sets' moves) can beat ``limit``
    either, so the whole candidate stops (:class:`_Pruned`)."""
    if n >= len(parts["moved"]):
        return None
    base = parts["a2a"] + parts["ring"][n] + 2 * parts["lat"]
    whole = parts["home"] > limit and all(b > limit for i, b in enumerate(parts["moved"]) if i != n)
    return (lambda sent: base + sent * parts["block_ms"] > limit), whole


def _lower_bound_ms(cost: CostModel, w: "_Work | WorkSummary", totals: np.ndarray, u: int, r: int, *, head_dim: int,
                    element_bytes: int) -> float:
    """A lower bound on ``cost.predict(plan).total_ms`` over every plan of ``w`` on ``(u, r)``.

    Every term of :meth:`CostModel.predict` that a plan can change is bounded below by what no
    plan avoids: the all-to-all (fixed by ``u, r``), no block exchange, and a ring time of at
    least the mean rank compute (the total work at its rates over ``u * r`` ranks, call overheads
    dropped) and at least ``r - 1`` transfers of the smallest possible largest key chunk.
    """
    H, S, B = w.heads, w.seq_len, w.batch
    full = B * S * S
    dense = _full_heads(w, totals) if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    n_dense = int(dense.sum())
    total, dense_total = float(totals.sum()), float(totals[dense].sum()) if n_dense else 0.0
    density = (total - dense_total) / max(1, (H - n_dense) * full)
    fine = w.kv_tile is not None and w.kv_tile < w.q_block
    rate = cost.tflops(density=density, fine_grained=fine) * 1e12
    seconds = (total - dense_total) * 4.0 * head_dim / rate
    if n_dense:
        seconds += dense_total * 4.0 * head_dim / (cost.dense_tflops * 1e12)
    ring_ms = 1e3 * seconds / (u * r)
    lat = cost.comm_latency_us * 1e-6
    token_bytes = B * head_dim * element_bytes
    if r > 1:
        kv_tokens = _cdiv(w.num_blocks, r) * w.q_block  # the largest chunk holds at least this many blocks
        p2p = lat + 2 * kv_tokens * _cdiv(H, u) * token_bytes / cost._bandwidth(r, u * r)
        ring_ms = max(ring_ms, 1e3 * (r - 1) * p2p)
    a2a_ms = 0.0
    if u > 1:
        shard = _cdiv(S, u * r) * H * token_bytes
        a2a_ms = 1e3 * (2 * lat + 4 * shard * (u - 1) / u / cost._bandwidth(u, u))
    return a2a_ms + ring_ms


def _entry_ms(cost: CostModel, w: "_Work | WorkSummary", totals: np.ndarray, head_dim: int) -> np.ndarray:
    """``(H,)`` float64: the least predicted milliseconds per tile entry of each head, as
    :meth:`CostModel.predict` rates them (dense heads at ``dense_tflops`` when modelled, without
    the unaligned-key and wave factors, which are >= 1; the others at the sparse curve's rate for their
    density, which no plan changes)."""
    H, full = w.heads, w.batch * w.seq_len * w.seq_len
    dense = _full_heads(w, totals) if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    n_dense = int(dense.sum())
    density = float(totals[~dense].sum()) / max(1, (H - n_dense) * full)
    fine = w.kv_tile is not None and w.kv_tile < w.q_block
    out = np.full(H, 1e3 * 4.0 * head_dim / (cost.tflops(density=density, fine_grained=fine) * 1e12))
    if n_dense:
        out[dense] = 1e3 * 4.0 * head_dim / (cost.dense_tflops * 1e12)
    return out


def _summary_bound_ms(cost: CostModel, s: WorkSummary, u: int, r: int, *, reward: float, uneven_heads: bool, balance: bool,
                      head_dim: int, element_bytes: int, groups: list[list[int]] | None = None, parts: dict | None = None,
                      moves: bool = True) -> float:
    """A lower bound on the predicted time of the plan :func:`_score_pair` scores for ``(u, r)``
    on summary ``s``, tighter than :func:`_lower_bound_ms` because it knows the planner's head
    groups (cheap: per-head totals) and the summary's home tiles and unit marginals.

    The scored plan is the fastest of plans that keep the contiguous, the balanced or (with
    dense heads) the time-balanced head groups (:func:`_layouts`), with blocks at home or moved in
    whole units. Per head group set, with every tile's time taken at its heads' least rate
    (:func:`_entry_ms`, plus the mixed-call cost of groups holding dense and sparse heads, whose
    every tile is non-empty; with ``dense_sms``, dense heads' entries times their group's wave
    factor, :meth:`CostModel.dense_waves`):

    * blocks at home: the cost model's ring time of those tiles (exact but for the unaligned-key
      factor), each rank's wave factor on its home chunk;
    * blocks moved: the exchange's latency plus, for a ring time ``T``, the exchange of the fewest
      units every rank must send away so that no rank computes more than ``T`` (rank ``(k, i)``
      computes its query units' rows, ``sum_t`` of its step times, and its key units' columns,
      which ring time bounds from below; sending a unit away lowers a rank's load by at most
      that unit's work), minimised over ``T`` from the largest group mean upwards; a group's
      wave factor is its least over its ranks, on their block counts with and without the
      partial last block.

    A ring time is at least each rank's row and column load, and the exchange is set by the
    largest count of units a rank sends, so the bound holds for every plan with those groups
    whose ranks keep their block counts (as the planner's do). ``groups``: bound only the plans
    with these head groups that move units (for tests). ``parts``: filled with what
    :func:`_prune_moves` needs (the bound at home, and per group set of :func:`_layouts` --
    contiguous, balanced, time-balanced -- the bound with moves and its ring-time part).
    ``moves=False``: the cheaper bound that counts one moved unit for plans that move (no
    sorting of units); ``parts["tighten"]()`` then returns the full bound (and updates ``parts``).
    """
    H, S, B, nb, R = s.heads, s.seq_len, s.batch, s.num_blocks, r
    if s.ring % R:
        return 0.0  # home tiles only for ring degrees whose chunks nest in the summary's
    totals = np.asarray(s._head_totals, dtype=np.int64)
    ms = _entry_ms(cost, s, totals, head_dim)
    dense = totals == B * S * S if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    counts = _head_counts(H, u, uneven_heads)
    off = np.cumsum([0] + counts).tolist()
    sets = [([list(range(off[k], off[k + 1])) for k in range(u)], False)]  # (groups, may move blocks)
    if groups is not None:
        sets = [(groups, True)]
    elif balance:
        sets.append((_balance_heads(totals.tolist(), counts, True), True))
        rates = _rates_of(cost, s, totals, head_dim, ulysses=u, ring=R)
        if rates is not None:
            sets.append((_balance_heads_timed((totals * rates.weights).tolist(), rates.dense, counts, True, R * R * rates.mixed), True))
    lat = cost.comm_latency_us * 1e-3
    token_bytes = B * head_dim * element_bytes
    a2a = 0.0
    if u > 1:
        a2a = 1e3 * (2 * cost.comm_latency_us * 1e-6 + 4 * _cdiv(S, u * R) * H * token_bytes * (u - 1) / u / cost._bandwidth(u, u))
    home_work = _summary_home_tiles(s, R)  # (H, R, R) entries per head, blocks at home
    tiles = home_work * ms[:, None, None]  # (H, R, R) ms
    call = cost.call_overhead_us * 1e-3  # per non-empty tile
    waves = cost.dense_sms is not None and bool(dense.any())
    if waves:  # dense heads' tiles take whole waves (CostModel.dense_sms): their own factor per group and rank
        dense_tiles = tiles * dense[:, None, None]
        tiles = tiles - dense_tiles
    bw = cost._bandwidth(R, u * R)
    mixed = cost.mixed_overhead_us * 1e-3 if cost.dense_tflops is not None and dense.any() else 0.0
    home = math.inf
    moved, ring = [math.inf] * len(sets), [0.0] * len(sets)
    mixes, p2ps, group_mss = [None] * len(sets), [None] * len(sets), [None] * len(sets)
    block_ms = 2 * s.q_block * token_bytes / bw * 1e3
    for n, (gs, may_move) in enumerate(sets):
        heads_k = np.array([len(g) for g in gs], dtype=np.float64)
        n_dense = np.array([int(dense[g].sum()) for g in gs])
        # (U,) per call: groups holding dense and sparse heads
        mix = mixes[n] = np.where((n_dense > 0) & (n_dense < heads_k), mixed, 0.0)
        C = _sum_groups(tiles, gs) + mix[:, None, None]  # (U, R, R)
        if call:
            C = C + call * (_sum_groups(home_work, gs) > 0)
        group_ms = np.broadcast_to(ms, (len(gs), H))  # (U, H) least ms per entry of each group's heads
        if waves:
            at_home, least = _wave_bounds(cost, s, R, n_dense)
            C = C + at_home[:, :, None] * _sum_groups(dense_tiles, gs)
            group_ms = ms * np.where(dense, least[:, None], 1.0)
        if R == 1:
            home = min(home, a2a + float(C.max()))
            continue
        p2p = p2ps[n] = lat + 1e3 * 2 * _cdiv(nb, R) * s.q_block * heads_k * token_bytes / bw  # (U,)
        steps = _steps(C).max(1)  # (U, R)
        if groups is None:
            home = min(home, a2a + float((np.maximum(steps[:, :-1], p2p[:, None]).sum(1) + steps[:, -1]).max()))
        if may_move and reward != math.inf:
            bound, ring[n] = _moved_bound_ms(s, gs, group_ms, mix, R, p2p, block_ms, lat, moves)
            moved[n] = a2a + bound
        group_mss[n] = group_ms

    def tighten() -> float:
        """The bound again with ``moves=True``, reusing this call's groups and tiles."""
        for n, (gs, may_move) in enumerate(sets):
            if R > 1 and may_move and reward != math.inf:
                bound, ring[n] = _moved_bound_ms(s, gs, group_mss[n], mixes[n], R, p2ps[n], block_ms, lat, True)
                moved[n] = a2a + bound
        return min([home] + moved)

    if parts is not None:
        parts.update(home=home, moved=moved, ring=ring, a2a=a2a, lat=lat, block_ms=block_ms / 2, tighten=tighten)
    return min([home] + moved)


def _wave_bounds(cost: CostModel, s: WorkSummary, R: int, n_dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``((U, R) wave factors of each group's dense heads with blocks at home, (U,) each group's
    least factor over the layouts that keep every rank's block count)``
    (:meth:`CostModel.dense_waves`; ``n_dense``: ``(U,)`` dense heads per group). Such a layout may
    hand the partial last block to any rank, so each rank's chunk is its blocks in tokens, with or
    without the tokens that block lacks."""
    full = np.bincount(_home(s.num_blocks, R), minlength=R) * s.q_block  # (R,) tokens of whole blocks per rank
    short = s.num_blocks * s.q_block - s.seq_len  # tokens the partial last block lacks
    at_home = cost._waves_of(n_dense, full - short * (np.arange(R) == R - 1), s.batch)  # the last rank holds it
    least = np.minimum(cost._waves_of(n_dense, full, s.batch), cost._waves_of(n_dense, full - short, s.batch)).min(1)
    return at_home, least


def _moved_bound_ms(s: WorkSummary, groups: list[list[int]], ms: np.ndarray, mix: np.ndarray, R: int, p2p: np.ndarray,
                    block_ms: float, lat: float, moves: bool = True) -> tuple[float, float]:
    """:func:`_summary_bound_ms`' bound on exchange + ring time of plans with ``groups`` that move
    units, and its bound on their ring time alone. ``ms``: ``(U, H)`` per entry of each group's heads; ``mix``: ``(U,)``
    per call; ``block_ms``: the exchange time of one block of one head (both ways). ``moves=False``:
    one unit moved, the ring time at its bound (no sorting)."""
    U, H = len(groups), s.heads
    idx, chunk = _movable_units(s, R)  # (R, n) movable units of each home chunk (NU: none), (R + 1,)
    weigh = np.zeros((U, H))
    for k, g in enumerate(groups):
        weigh[k, g] = ms[k, g]
    heads_k = weigh.astype(bool).sum(1).astype(np.float64)
    per_group = weigh @ s._head_totals.astype(np.float64)  # (U,) ms of each group's work
    mean = max(float(per_group[k]) / R + R * mix[k] for k in range(U))
    mean = max(mean, float(((R - 1) * p2p).max()))
    if not moves:
        return mean + 2 * lat + heads_k.min() * s.coarse * block_ms, mean
    lefts = []
    for marg in s._unit_marginals:  # query units' rows, key units' columns
        load = np.concatenate([weigh @ marg.astype(np.float64), np.zeros((U, 1))], 1)  # (U, NU + 1) ms per unit
        start = np.add.reduceat(load[:, :-1], chunk[:-1], axis=1) + R * mix[:, None]  # (U, R) loads at home
        sent = np.cumsum(-np.sort(-load[:, idx], axis=2), axis=2)  # (U, R, n): the n heaviest units sent away
        lefts.append(start[:, :, None] - np.concatenate([np.zeros((U, R, 1)), sent], 2))  # (U, R, n + 1)
    # A plan's ring time T is at least every rank's load, so rank (k, i) sent at least
    # count(left > T) units; T ranges over the group mean and the loads where a count drops.
    sweep = _jit.loop("moved")
    if sweep is not None:  # the same bound, compiled
        return sweep(lefts[0], lefts[1], mean, heads_k, s.coarse, lat, block_ms), mean
    cands = np.concatenate([[mean]] + [x.reshape(-1) for x in lefts])
    cands = cands[cands >= mean]  # (repeated values only repeat a total: no need to sort them out)
    need = np.zeros((len(cands), U))
    feasible = np.ones(len(cands), dtype=bool)
    for x in lefts:
        over = x[None] > cands[:, None, None, None] * (1 + 1e-12)  # (C, U, R, n + 1); slack keeps the bound below
        feasible &= ~over[..., -1].any((1, 2))
        need += over.sum(3).max(2)
    blocks = np.maximum((need * heads_k).max(1), heads_k.min()) * s.coarse  # at least one unit moves
    total = cands + 2 * lat + blocks * block_ms
    return (float(total[feasible].min()) if feasible.any() else math.inf), mean


def _movable_units(s: WorkSummary, ring: int) -> tuple[np.ndarray, np.ndarray]:
    """``((R, n) movable units of each home chunk of ``ring``, padded with ``NU``; (R + 1,)
    chunk starts in units)``: :func:`_unit_layout` of the summary's geometry."""
    return _unit_layout(s.num_blocks, s.ring, s.coarse, ring)


@lru_cache(maxsize=64)
def _unit_layout(num_blocks: int, summary_ring: int, coarse: int, ring: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_movable_units` of a geometry, remembered (read-only): every step's summary of a run
    has the same units."""
    starts = _unit_starts(num_blocks, summary_ring, coarse)
    movable = np.diff(starts) == coarse
    chunk = _unit_chunks(num_blocks, summary_ring, coarse, ring)
    per = [np.nonzero(movable[chunk[i] : chunk[i + 1]])[0] + chunk[i] for i in range(ring)]
    n = max(len(p) for p in per)
    idx = np.full((ring, n), len(starts) - 1, dtype=np.int64)
    for i, p in enumerate(per):
        idx[i, : len(p)] = p
    idx.flags.writeable = False
    return idx, chunk


def _score_pair(w: _Work, u: int, r: int, predict, *, reward: float, uneven_heads: bool, balance: bool, stats: _Stats | None = None,
                cost: "tuple[CostModel, int] | None" = None, prune_for=None, local: bool = False):
    """``(unbalanced, balanced)`` DegreeChoices of one ``(U, R)`` from one set of passes.

    The unbalanced one exists where ``U`` divides the heads. The balanced one (with ``balance``)
    is the faster, by the cost model, of the planner's choice and the layouts that move no blocks
    (with ``local``, also the local layout that moves few, :func:`_local_blocks`, by its margin),
    so blocks move only where the exchange pays for itself. With ``cost`` (the cost
    model and head_dim) and a mask where time and tile entries differ (dense heads), the
    time-weighted candidates (:func:`_timed_layouts`) compete too. ``prune_for``: as in
    :func:`_layouts` (then :class:`_Pruned` may be raised).
    """
    if not balance:
        plan = _layouts(w, ulysses=u, ring=r, balance_heads=False, balance_blocks=False, stats=stats)[0]
        return DegreeChoice(u, r, plan, predict(plan)), None
    memo: dict[int, Prediction] = {}  # plan id -> prediction: the contiguous layout is scored twice
    predict = lambda p, f=predict: memo[id(p)] if id(p) in memo else memo.setdefault(id(p), f(p))  # noqa: E731
    rates = None
    if cost is not None:
        if not isinstance(w, WorkSummary) and stats is None:
            stats = _stats(w, r)
        rates = _rates_of(cost[0], w, _head_totals(w, stats), cost[1], ulysses=u, ring=r)
    # The local layout once: on time-weighted work where time and tile entries differ, else on tiles.
    layouts = _layouts(w, ulysses=u, ring=r, reward=reward, uneven_heads=uneven_heads, stats=stats, prune_for=prune_for,
                       local=local and rates is None)
    plain = DegreeChoice(u, r, layouts[0], predict(layouts[0])) if w.heads % u == 0 else None
    chosen = min(layouts, key=_ring_key)
    options = [chosen] + [p for p in layouts if p is not chosen and (_moved(p) == 0 or p.__dict__.get("_local"))]
    if rates is not None:
        options += _layouts(w, ulysses=u, ring=r, reward=reward, uneven_heads=uneven_heads, stats=stats, rates=rates,
                            prune_for=prune_for, local=local)
    order = {id(p): n for n, p in enumerate(options)}
    plan = _pick(options, lambda p: (predict(p).total_ms, predict(p).imbalance, order[id(p)]))
    return plain, DegreeChoice(u, r, plan, predict(plan))


def choose_degrees(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    world: int,
    heads: int,
    cost_model: CostModel | None = None,
    **options: Any,
) -> tuple[int, int, Plan]:
    """The fastest ``(ulysses, ring)`` for this mask on ``world`` ranks, and its plan.

    Scores the allowed factorisations as :func:`score_degrees` does (same keyword options) and
    returns the one with the least predicted time (ties: the larger ``ulysses``, fewer ring steps).
    Candidates are planned ``ring = 1`` first, then in order of a lower bound on their predicted
    time (the all-to-all, and the mean rank compute or the ring transfers, whichever is larger);
    those whose bound exceeds the best time found are not planned, since they cannot win. From a :class:`WorkSummary` the
    bound also knows the planner's head groups, the home tiles and, for plans that move blocks,
    the units every rank must send away to reach a ring time (:func:`_summary_bound_ms`), and a
    candidate's block balancing stops as soon as the blocks it has moved make it slower than the
    best; the pick and its plan are those of the full scoring.
    Run it per layer and step, or let :class:`PlanCache` decide when to re-run it.

    Example::

        >>> u, r, plan = choose_degrees(mask, world=8, heads=40)     # doctest: +SKIP
        >>> (u, r), plan.imbalance()
        ((4, 2), 1.004)

    Returns:
        ``(ulysses, ring, plan)``.
    """
    scored = _scored(mask_or_work, world=world, heads=heads, cost_model=cost_model, prune=True, **options)
    best = min(scored, key=lambda c: (c.prediction.total_ms, -c.ulysses))
    return best.ulysses, best.ring, best.plan
