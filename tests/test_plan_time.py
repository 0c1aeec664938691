"""Planning by predicted time (``make_plan(cost_model=...)``): dense heads at their own rate and the
mixed-call overhead, checked against brute force and against the tile-entry planner."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from dbsp.plan import CostModel, Plan, choose_degrees, dense_heads, make_plan, summarize_work, tile_work

# A slow "GPU" (TFLOPS ~1e-3 of an H200) so that a tiny mask's compute is milliseconds and the
# mixed-call overhead is comparable to it, as at Wan2.1-14B 720p on the real cost model; fast links.
MODEL = CostModel(
    block_tflops=((0.0, 0.436), (1.0, 0.436)),
    fine_tflops=((0.0, 0.4), (1.0, 0.4)),
    call_overhead_us=0.0,
    comm_latency_us=0.0,
    nvlink_gbps=1e6,
    internode_gbps=1e6,
    gpus_per_node=8,
    dense_tflops=0.6285,
    mixed_overhead_us=100.0,
    mixed_gather_us=250.0,
)
D = 128


def work_with_dense(heads, nb, *, seed, n_dense, block=64, partial=0):
    """Block-mask work ``(1, H, NB, NB)``: ``n_dense`` random heads fully selected, the others random
    densities; with ``partial`` the last block holds only that many tokens."""
    g = torch.Generator().manual_seed(seed)
    dens = torch.empty(heads).uniform_(0.05, 0.9, generator=g)
    tiles = torch.rand(1, heads, nb, nb, generator=g) < dens[None, :, None, None]
    tiles[:, torch.randperm(heads, generator=g)[:n_dense]] = True
    tok = torch.full((nb,), block)
    if partial:
        tok[-1] = partial
    return tiles.to(torch.int64) * (tok[:, None] * tok[None, :]), int(tok.sum())


def compute_times(work, plan, model):
    """Independent oracle of the model's per-step compute ``C[k, i, t]`` (seconds), straight from its
    documented formula, head by head: sparse entries at the curve's rate, dense heads' at
    ``dense_tflops``, ``call_overhead`` per non-empty call plus ``mixed_overhead`` where the call's
    group holds both kinds (and ``mixed_gather`` more where its dense heads are not consecutive).
    With ``dense_sms``, a call's dense entries take whole waves: its dense heads times the 128-token
    tiles of its query blocks, rounded up to a multiple of ``dense_sms``, over that count."""
    a = work.sum(0).numpy()
    H, S = a.shape[0], int(plan.seq_len)
    dense = {h for h in range(H) if a[h].sum() == S * S}
    sparse = [h for h in range(H) if h not in dense]
    density = sum(a[h].sum() for h in sparse) / (len(sparse) * S * S)
    rate = model.tflops(density=density, fine_grained=False) * 1e12
    U, R = plan.ulysses, plan.ring
    C = np.zeros((U, R, R))
    for k in range(U):
        group = plan.head_group(k)
        mixed = 0 < len(dense & set(group)) < len(group)
        at = [i for i, h in enumerate(group) if h in dense]
        apart = mixed and at[-1] - at[0] != len(at) - 1  # dense heads not consecutive in the group
        for i in range(R):
            for t in range(R):
                j = (i + t) % R
                rows, cols = list(plan.q_blocks[k][i]), list(plan.kv_blocks[k][j])
                entries = [a[h][np.ix_(rows, cols)].sum() for h in group]
                if sum(entries) == 0:
                    continue
                waves = 1.0
                if model.dense_sms is not None and at:
                    q_tokens = sum(min(64, S - 64 * b) for b in rows)  # 64-token blocks, the last one partial
                    n = len(at) * math.ceil(q_tokens / 128)
                    waves = math.ceil(n / model.dense_sms) * model.dense_sms / n
                sec = sum(e * 4 * D / (model.dense_tflops * 1e12 / waves if h in dense else rate) for h, e in zip(group, entries))
                C[k, i, t] = sec + 1e-6 * (model.call_overhead_us + (model.mixed_overhead_us if mixed else 0.0)
                                           + (model.mixed_gather_us if apart else 0.0))
    return C


def ring_seconds(C):
    """The slowest group's ring time of per-step compute (no transfers: the links are fast)."""
    return float(C.max(1).sum(1).max())


CASES = [  # (U, R, H, NB, dense heads, seed, partial last block)
    (2, 1, 6, 6, 2, 0, 0),
    (4, 1, 16, 8, 5, 1, 0),
    (2, 2, 8, 8, 3, 2, 16),
    (4, 2, 16, 12, 6, 3, 0),
    (2, 4, 8, 16, 3, 4, 40),
    (1, 4, 6, 12, 2, 5, 0),
]


# Plans of the tile-entry planner (no cost model) of CASES (tensor and, where R > 1, summary),
# recorded with the planner before time weighting existed (commit 5a55b41), when each group
# listed its heads in ascending order (now dense heads come first: compared through natural()).
OLD_FINGERPRINTS = {
    (0, "work"): "5524583f47048a03",
    (1, "work"): "8e3f1e8caf622e3d",
    (2, "work"): "f08ffe0b6a01a91a",
    (2, "summary"): "1a61839185de80fe",
    (3, "work"): "d1201294d05240af",
    (3, "summary"): "3ed45a748279b27f",
    (4, "work"): "e9bfcc7fb24ab0f6",
    (4, "summary"): "6ffc9401f5dba2b7",
    (5, "work"): "96840de72a06b816",
    (5, "summary"): "7ae5b9a119b37970",
}


def natural(plan: Plan) -> Plan:
    """``plan`` with each group's heads in ascending order (same work)."""
    perm = tuple(h for k in range(plan.ulysses) for h in sorted(plan.head_group(k)))
    return Plan(**{**plan._layout(), "head_perm": perm})


@pytest.mark.parametrize("n", range(len(CASES)))
def test_without_a_cost_model_plans_are_those_of_the_tile_planner(n):
    U, R, H, nb, nd, seed, partial = CASES[n]
    work, S = work_with_dense(H, nb, seed=seed, n_dense=nd, partial=partial)
    kw = dict(ulysses=U, ring=R, q_block=64, seq_len=S)
    assert natural(make_plan(work, **kw)).fingerprint() == OLD_FINGERPRINTS[n, "work"]
    assert natural(make_plan(work, **kw, cost_model=None)).fingerprint() == OLD_FINGERPRINTS[n, "work"]
    if R > 1:
        s = summarize_work(work, q_block=64, seq_len=S, ring=R, coarse=2)
        assert natural(make_plan(s, ulysses=U, ring=R)).fingerprint() == OLD_FINGERPRINTS[n, "summary"]


@pytest.mark.parametrize("sms", [None, 3])
@pytest.mark.parametrize("n", range(len(CASES)))
def test_time_plan_is_never_slower_than_the_tile_plan_and_keeps_true_tiles(n, sms):
    """Also with dense SDPA's waves (3 SMs: a call of 2 or 4 query tiles takes 1.5x its work)."""
    model = dataclasses.replace(MODEL, dense_sms=sms)
    U, R, H, nb, nd, seed, partial = CASES[n]
    work, S = work_with_dense(H, nb, seed=seed, n_dense=nd, partial=partial)
    dense = dense_heads(work, q_block=64, seq_len=S)
    assert len(dense) == nd
    kw = dict(ulysses=U, ring=R, q_block=64, seq_len=S)
    inputs = [work] + ([summarize_work(work, q_block=64, seq_len=S, ring=R, coarse=2)] if R > 1 else [])
    for x in inputs:
        tiles, timed = make_plan(x, **kw), make_plan(x, **kw, cost_model=model, head_dim=D)
        timed.validate()
        assert torch.equal(timed.tile_work, tile_work(work, timed))  # tile_work stays the true tile entries
        pt = model.predict(tiles, head_dim=D, dense_heads=dense)
        pw = model.predict(timed, head_dim=D, dense_heads=dense)
        assert pw.total_ms <= pt.total_ms * (1 + 1e-12)
        assert pw.imbalance == pytest.approx(timed.imbalance())  # the tile rho_s is unchanged in meaning
        # The model's own time rho_s is that of the independent per-step oracle.
        C = compute_times(work, timed, model)
        assert pw.compute_imbalance == pytest.approx(ring_seconds(C) * U * R / C.sum(), rel=1e-9)


def test_time_plan_keeps_heads_of_one_kind_together_where_that_costs_no_balance():
    """Two dense heads, two sparse heads with 11/16 of a dense head's entries: by time (dense heads
    run 0.694 as long per entry) all four heads cost about the same. The tile planner pairs each
    dense head with a sparse one (equal tiles), so both groups make mixed calls; the time planner
    groups the dense heads together and the sparse ones together: no mixed-call overhead."""
    S, nb = 1024, 16
    full = torch.full((1, 1, nb, nb), 64 * 64, dtype=torch.int64)
    sparse = full.clone()
    sparse[..., 11:] = 0
    work = torch.cat([full, sparse, full, sparse], 1)
    dense = dense_heads(work, q_block=64, seq_len=S)
    assert dense == (0, 2)
    kw = dict(ulysses=2, ring=1, q_block=64, seq_len=S)
    tiles, timed = make_plan(work, **kw), make_plan(work, **kw, cost_model=MODEL, head_dim=D)
    assert sorted(map(sorted, (tiles.head_group(0), tiles.head_group(1)))) == [[0, 1], [2, 3]]
    assert sorted(map(sorted, (timed.head_group(0), timed.head_group(1)))) == [[0, 2], [1, 3]]
    pt = MODEL.predict(tiles, head_dim=D, dense_heads=dense)
    pw = MODEL.predict(timed, head_dim=D, dense_heads=dense)
    assert pw.total_ms < pt.total_ms
    assert ring_seconds(compute_times(work, timed, MODEL)) < ring_seconds(compute_times(work, tiles, MODEL))


def _partitions(heads, size):
    if not heads:
        yield []
        return
    for others in itertools.combinations(heads[1:], size - 1):
        g = (heads[0],) + others
        for p in _partitions([h for h in heads if h not in g], size):
            yield [g] + p


@pytest.mark.parametrize("seed", range(4))
def test_head_level_time_plan_is_the_brute_force_optimum(seed):
    """U = 2 or 3, R = 1: every partition of the heads into equal groups, timed by the oracle."""
    U = 2 if seed % 2 == 0 else 3
    H, nb = 6, 6
    work, S = work_with_dense(H, nb, seed=10 + seed, n_dense=2 + seed % 2)
    timed = make_plan(work, ulysses=U, ring=1, q_block=64, seq_len=S, cost_model=MODEL, head_dim=D)
    base = make_plan(work, ulysses=U, ring=1, q_block=64, seq_len=S)
    best = float("inf")
    for p in _partitions(list(range(H)), H // U):
        plan = Plan(ulysses=U, ring=1, heads=H, q_block=64, seq_len=S, head_perm=tuple(h for g in p for h in g),
                              head_offsets=tuple(range(0, H + 1, H // U)), q_blocks=base.q_blocks, kv_blocks=base.kv_blocks)
        best = min(best, ring_seconds(compute_times(work, plan, MODEL)))
    got = ring_seconds(compute_times(work, timed, MODEL))
    assert got == pytest.approx(best, rel=1e-9)
    tile_time = ring_seconds(compute_times(work, base, MODEL))
    assert got <= tile_time * (1 + 1e-12)


def test_choose_degrees_and_plan_cache_use_the_time_plan():
    from dbsp.plan import PlanCache

    work, S = work_with_dense(16, 12, seed=7, n_dense=6)
    dense = dense_heads(work, q_block=64, seq_len=S)
    u, r, plan = choose_degrees(work, world=8, heads=16, q_block=64, seq_len=S, cost_model=MODEL, head_dim=D)
    timed = make_plan(work, ulysses=u, ring=r, q_block=64, seq_len=S, cost_model=MODEL, head_dim=D)
    tiles = make_plan(work, ulysses=u, ring=r, q_block=64, seq_len=S)
    got = MODEL.predict(plan, head_dim=D, dense_heads=dense).total_ms
    assert got <= MODEL.predict(tiles, head_dim=D, dense_heads=dense).total_ms * (1 + 1e-12)
    assert got <= MODEL.predict(timed, head_dim=D, dense_heads=dense).total_ms * (1 + 1e-12)
    cache = PlanCache(cost_model=MODEL, head_dim=D)
    assert cache.get(0, work, ulysses=u, ring=r, q_block=64, seq_len=S).fingerprint() == timed.fingerprint()
    assert PlanCache().get(0, work, ulysses=u, ring=r, q_block=64, seq_len=S).fingerprint() == tiles.fingerprint()


def test_bad_cost_model_arguments():
    work, S = work_with_dense(4, 4, seed=0, n_dense=1)
    with pytest.raises(TypeError, match="cost_model"):
        make_plan(work, ulysses=2, ring=1, q_block=64, seq_len=S, cost_model="fast")
    with pytest.raises(ValueError, match="head_dim"):
        make_plan(work, ulysses=2, ring=1, q_block=64, seq_len=S, cost_model=MODEL, head_dim=0)


def heavy_block_work(seed: int, amp: float, *, heads: int = 8, nb: int = 1182) -> torch.Tensor:
    """Block work ``(1, H, NB, NB)`` int32 at Wan2.1-14B 720p's 1182 blocks: heavy query blocks
    (0.9 of the key blocks kept, against 0.3) are more frequent in some stretches of the sequence
    than in others (their share drifts smoothly by ``+-amp``), the block-level imbalance of the
    regional workload."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(nb, dtype=torch.float32)
    heavy = torch.rand(nb, generator=g) < 0.15 * (1 + amp * torch.sin(2 * np.pi * 1.5 * r / nb + 0.7))
    keep = torch.where(heavy, 0.9, 0.3)[None, :, None]
    return (torch.rand(heads, nb, nb, generator=g) < keep)[None].to(torch.int32) * 64 * 64


@pytest.mark.parametrize("seed", range(2))
def test_local_block_layout_moves_few_blocks_and_wins_where_the_exchange_is_dear(seed):
    """Oracle: the cost model's predictions of the layouts the planner had without the local one
    (every block at home; the tile planner's balanced layout, which moves ~40% of the blocks). On
    drifting heavy blocks at U1R8 with the default (H100-fitted) cost model on 150 GB/s links,
    ``make_plan`` with the model returns a layout that moves a few dozen blocks and is predicted
    faster than both by more than the 2% margin; its
    tile work is exact (``tile_work``), every ring rank keeps its block count, and with
    ``reward=inf`` (every block stays home) nothing moves. It is opt-in (``local_blocks=True``):
    by default the plan is one of the earlier two."""
    from dbsp.plan.balance import _LOCAL_SWAPS, _moved

    cost = dataclasses.replace(CostModel.default(), nvlink_gbps=150.0)  # a dearer exchange than NVLink's 279 GB/s
    work = heavy_block_work(seed, 0.8)
    kw = dict(ulysses=1, ring=8, q_block=64, seq_len=1182 * 64)
    total = lambda p: cost.predict(p, head_dim=D, batch=1, element_bytes=2, kv_tile=64).total_ms  # noqa: E731
    home = Plan.identity(heads=8, **kw).with_tile_work(work)
    tiles = make_plan(work, **kw)
    timed = make_plan(work, **kw, cost_model=cost, local_blocks=True)
    assert _moved(make_plan(work, **kw, cost_model=cost)) in (0, _moved(tiles))  # off by default
    assert 0 < _moved(timed) <= 2 * _LOCAL_SWAPS < _moved(tiles) / 3
    assert total(timed) < min(total(home), total(tiles)), (total(timed), total(home), total(tiles))
    assert timed.imbalance() < home.imbalance()
    assert torch.equal(timed.tile_work, tile_work(work, timed))
    for owners, at_home in ((timed.q_blocks[0], home.q_blocks[0]), (timed.kv_blocks[0], home.kv_blocks[0])):
        assert [len(x) for x in owners] == [len(x) for x in at_home]
    assert _moved(make_plan(work, **kw, cost_model=cost, reward=math.inf, local_blocks=True)) == 0
    u, r, chosen = choose_degrees(work, world=8, heads=8, cost_model=cost, head_dim=D, q_block=64, seq_len=1182 * 64,
                                  local_blocks=True)
    assert total(chosen) <= total(timed) * (1 + 1e-9)  # the degree choice weighs this U1R8 plan too


@pytest.mark.parametrize("U,R,sms,waves", [(2, 1, 2, 4 / 3), (2, 1, 3, 1.0), (1, 2, 5, 5 / 4), (2, 2, None, 1.0)])
def test_time_weights_carry_the_mean_wave_factor_of_an_even_split(U, R, sms, waves):
    """A dense head weighs ``sparse rate x waves / dense rate`` of a sparse one, where ``waves`` is the
    wave factor of the dense heads split evenly over the U groups, on query chunks of S / R tokens:
    2 dense heads, 6 blocks of 64 tokens: one head per group at U = 2 and R = 1 makes 3 tiles of 128
    (2 SMs: 4 / 3; 3 SMs: 1); both heads at R = 2 make 2 x 2 tiles (5 SMs: 5 / 4)."""
    from dbsp.plan.core import _as_work
    from dbsp.plan.cost import _rates_of

    work, S = work_with_dense(6, 6, seed=7, n_dense=2)
    w = _as_work(work, q_block=64, seq_len=S)
    rates = _rates_of(dataclasses.replace(MODEL, dense_sms=sms), w, work[0].sum((1, 2)).numpy(), D, ulysses=U, ring=R)
    assert rates.dense.sum() == 2
    assert rates.dense_w / rates.sparse == pytest.approx(0.436 * waves / 0.6285, abs=1 / 1024)
