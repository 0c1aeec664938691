"""db-SP planner: rho_s against a brute-force definition, plan invariants, balancing quality,
reuse, the cost model, degree choice, determinism across processes and the ``plan`` command."""

import argparse
import itertools
import json
import math
from importlib import resources

import numpy as np
import pytest
import torch

from dbsp import SparseMask
from dbsp import plan_cli
from dbsp.plan import (
    CostModel,
    Plan,
    PlanCache,
    choose_degrees,
    imbalance_ratio,
    make_plan,
    WorkSummary,
    score_degrees,
    summarize_work,
    tile_work,
)
from dbsp.plan.balance import _biased_greedy
from dbsp.plan.core import _home, _pool_mask
from dbsp.simulate import KINDS, synthetic_tiles, synthetic_work
from harness import run_distributed

FACTORISATIONS_8 = [(8, 1), (4, 2), (2, 4), (1, 8)]


def random_work(heads, nb, *, seed, block=64, dense_range=(0.03, 0.9)):
    """Block-mask work ``(1, H, NB, NB)`` whose heads have very different densities."""
    g = torch.Generator().manual_seed(seed)
    dens = torch.empty(heads).uniform_(*dense_range, generator=g)
    tiles = torch.rand(1, heads, nb, nb, generator=g) < dens[None, :, None, None]
    return tiles.to(torch.int32) * block * block


# ---------------------------------------------------------------------------- brute-force oracles


def brute_tiles(work, plan):
    """``W[k, i, j]`` by explicit loops over the plan's head and block lists."""
    a = work.sum(0).to(torch.int64)
    out = torch.zeros(plan.ulysses, plan.ring, plan.ring, dtype=torch.int64)
    for k in range(plan.ulysses):
        for h in plan.head_group(k):
            for i, rows in enumerate(plan.q_blocks[k]):
                for j, cols in enumerate(plan.kv_blocks[k]):
                    out[k, i, j] += int(a[h][list(rows)][:, list(cols)].sum())
    return out


def brute_rho(work, plan):
    """rho_s straight from the definition: the ring, step by step."""
    W = brute_tiles(work, plan)
    U, R = plan.ulysses, plan.ring
    T = [sum(max(int(W[k, i, (i + t) % R]) for i in range(R)) for t in range(R)) for k in range(U)]
    total = int(W.sum())
    return max(T) / (total / (U * R)) if total else 1.0


def optimum_rho(work, U, R):
    """The best rho_s over every plan the planner may return: equal head groups, and per group any
    query and key layout that keeps every ring rank's contiguous-layout block count."""
    a = work.sum(0).to(torch.int64).numpy()
    H, nb, _ = a.shape
    caps = np.bincount(_home(nb, R), minlength=R)
    layouts = [np.array(x) for x in itertools.product(range(R), repeat=nb) if (np.bincount(x, minlength=R) == caps).all()]

    def ring_time(A, q, k):
        W = [[A[np.ix_(q == i, k == j)].sum() for j in range(R)] for i in range(R)]
        return sum(max(W[i][(i + t) % R] for i in range(R)) for t in range(R))

    def partitions(rest):
        if not rest:
            yield []
            return
        for others in itertools.combinations(rest[1:], H // U - 1):
            g = (rest[0],) + others
            for p in partitions([h for h in rest if h not in g]):
                yield [g] + p

    best = min(
        max(min(ring_time(a[list(g)].sum(0), q, k) for q in layouts for k in layouts) for g in p)
        for p in partitions(list(range(H)))
    )
    return best * U * R / a.sum()


# ---------------------------------------------------------------------------- rho_s


def test_worked_example_of_the_docstring():
    w = torch.tensor([[[[6, 2], [1, 1]]]], dtype=torch.int32)
    assert imbalance_ratio(w, ulysses=1, ring=2, q_block=64, seq_len=128) == pytest.approx(1.6)


@pytest.mark.parametrize("U,R,H,S", [(1, 3, 2, 500), (2, 2, 4, 700), (3, 2, 6, 449), (2, 3, 4, 1025)])
def test_imbalance_and_tiles_match_the_definition(U, R, H, S):
    work = random_work(H, -(-S // 64), seed=U * 10 + R)
    plan = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=S)
    identity = Plan.identity(ulysses=U, ring=R, heads=H, q_block=64, seq_len=S)
    for p in (plan, identity):
        assert torch.equal(tile_work(work, p), brute_tiles(work, p))
        assert imbalance_ratio(work, ulysses=U, ring=R, plan=p) == pytest.approx(brute_rho(work, p), rel=1e-12)
    assert torch.equal(plan.tile_work, brute_tiles(work, plan))
    assert plan.imbalance() == pytest.approx(brute_rho(work, plan), rel=1e-12)
    assert imbalance_ratio(work, ulysses=U, ring=R, q_block=64, seq_len=S) == pytest.approx(brute_rho(work, identity))


def test_rho_is_at_least_one_and_one_on_uniform_work():
    uniform = torch.full((1, 8, 16, 16), 7, dtype=torch.int32)
    for U, R in FACTORISATIONS_8:
        assert imbalance_ratio(uniform, ulysses=U, ring=R, q_block=64, seq_len=1024) == 1.0
        rho = imbalance_ratio(random_work(8, 16, seed=U), ulysses=U, ring=R, q_block=64, seq_len=1024)
        assert rho >= 1.0
    assert imbalance_ratio(torch.zeros(1, 2, 4, 4, dtype=torch.int32), ulysses=2, ring=2, q_block=64, seq_len=256) == 1.0


def test_mask_and_its_work_give_the_same_answers():
    tiles = synthetic_tiles(heads=4, seq_len=1000, q_block=64, frames=4, seed=3)
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=64, seq_len_q=1000, seq_len_kv=1000)
    work = synthetic_work(heads=4, seq_len=1000, q_block=64, frames=4, seed=3)
    assert torch.equal(mask.work(), work)  # the generator's exact partial-block counts
    assert make_plan(mask, ulysses=2, ring=2) == make_plan(work, ulysses=2, ring=2, q_block=64, seq_len=1000)
    fine = SparseMask.from_dense(tiles.repeat_interleave(8, -1)[..., :125], q_block=64, kv_tile=8, seq_len_q=1000, seq_len_kv=1000)
    assert torch.equal(fine.work(), work)  # same keys at 64x8 granularity: same work
    assert imbalance_ratio(fine, ulysses=1, ring=4) == imbalance_ratio(mask, ulysses=1, ring=4)


# ---------------------------------------------------------------------------- plan invariants


@pytest.mark.parametrize("U,R,H,S", [(2, 4, 8, 4000), (4, 2, 12, 3001), (1, 8, 4, 2049), (8, 1, 16, 999), (3, 3, 9, 1300)])
def test_plans_are_valid_partitions_and_never_worse_than_naive(U, R, H, S):
    nb = -(-S // 64)
    for seed in range(3):
        work = random_work(H, nb, seed=seed)
        plan = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=S, world=U * R)
        plan.validate()
        Plan(**plan._layout())  # the validating constructor accepts it too
        assert sorted(plan.head_perm) == list(range(H))
        assert [plan.head_perm[j] for j in plan.inverse_head_perm] == list(range(H))
        assert [plan.inverse_head_perm[h] for h in plan.head_perm] == list(range(H))
        assert plan.heads_per_rank == (H // U,) * U
        counts = np.bincount(np.arange(nb) * R // nb, minlength=R).tolist()
        for groups in (plan.q_blocks, plan.kv_blocks):
            for group in groups:
                assert [len(b) for b in group] == counts  # every rank keeps its block count
                assert sorted(b for blocks in group for b in blocks) == list(range(nb))
        naive = imbalance_ratio(work, ulysses=U, ring=R, q_block=64, seq_len=S)
        assert 1.0 <= plan.imbalance() <= naive
        moved = [plan.moved_blocks(kind) for kind in ("q", "kv")]
        ex = [plan.exchange_counts(kind) for kind in ("q", "kv")]
        for m, c, sent in zip(moved, ex, plan._sent):
            assert int(c.sum()) == U * nb and int(c.sum()) - int(torch.diagonal(c, dim1=1, dim2=2).sum()) == m
            assert torch.equal(c.sum(2), c.sum(1))  # each rank sends as many blocks as it receives
            # the cost model's per-group count: the most blocks one ring rank sends away
            assert sent.tolist() == (c.sum(2) - torch.diagonal(c, dim1=1, dim2=2)).amax(1).tolist()


def test_identity_plan_and_validation_errors():
    p = Plan.identity(ulysses=2, ring=3, heads=4, q_block=64, seq_len=1000)
    assert p.head_perm == (0, 1, 2, 3) and p.head_offsets == (0, 2, 4) and p.num_blocks == 16
    assert p.q_blocks[0] == (tuple(range(0, 6)), tuple(range(6, 11)), tuple(range(11, 16)))
    assert [p.home(b) for b in (0, 5, 6, 15)] == [0, 0, 1, 2]
    assert p.moved_blocks("q") == p.moved_blocks("kv") == 0
    good = p._layout()
    with pytest.raises(ValueError, match="permutation of range"):
        Plan(**{**good, "head_perm": (0, 0, 1, 2)})
    with pytest.raises(ValueError, match="head_offsets must have length"):
        Plan(**{**good, "head_offsets": (0, 4)})
    with pytest.raises(ValueError, match=r"H//U and H//U \+ 1\); got counts \[1, 3\]"):
        Plan(**{**good, "head_offsets": (0, 1, 4)})
    with pytest.raises(ValueError, match=r"block count \[6, 5, 5\]"):
        Plan(**{**good, "q_blocks": (((0, 1, 2, 3, 4), (5, 6, 7, 8, 9, 10), tuple(range(11, 16))),) * 2})
    with pytest.raises(ValueError, match="partition the block ids"):
        Plan(**{**good, "kv_blocks": ((tuple(range(6)), tuple(range(5, 10)), tuple(range(11, 16))),) * 2})
    with pytest.raises(ValueError, match="sorted ascending"):
        Plan(**{**good, "q_blocks": (((1, 0, 2, 3, 4, 5), tuple(range(6, 11)), tuple(range(11, 16))),) * 2})
    with pytest.raises(ValueError, match="ulysses=2 groups"):
        Plan(**{**good, "q_blocks": good["q_blocks"][:1]})
    with pytest.raises(ValueError, match="no tile_work"):
        p.imbalance()
    # Uniform work, blocks 6/5/5: per group W = 2 * n_i * n_j, steps cost 72 + 60 + 60 = 192 against
    # a mean of 4 * 256 / 6.
    assert p.with_tile_work(torch.ones(1, 4, 16, 16, dtype=torch.int32)).imbalance() == pytest.approx(192 / (1024 / 6))
    lists = Plan(**{**good, "head_perm": [0, 1, 2, 3], "q_blocks": [[list(b) for b in g] for g in good["q_blocks"]]})
    assert lists == p and hash(lists) == hash(p)


def test_fingerprint_and_repr():
    work = random_work(8, 40, seed=1)
    a = make_plan(work, ulysses=2, ring=4, q_block=64, seq_len=2500)
    b = make_plan(work.clone(), ulysses=2, ring=4, q_block=64, seq_len=2500)
    assert a == b and a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    c = make_plan(work, ulysses=2, ring=4, q_block=64, seq_len=2500, reward=math.inf)
    assert c.fingerprint() != a.fingerprint() and c != a
    ident = Plan.identity(ulysses=2, ring=4, heads=8, q_block=64, seq_len=2500)
    assert c.q_blocks == ident.q_blocks and c.kv_blocks == ident.kv_blocks  # heads are still balanced
    assert Plan(**{**ident._layout(), "head_perm": c.head_perm}).fingerprint() == c.fingerprint()
    text = repr(a)
    assert text.startswith("Plan(U=2 x R=4, H=8 (4 per rank), S=2500, 40 blocks of 64, rho_s=") and a.fingerprint() in text
    table = a.table().splitlines()
    assert len(table) == 9 and table[0].split()[:3] == ["rank", "k", "i"]


# ---------------------------------------------------------------------------- balancing quality


@pytest.mark.parametrize("kinds", [KINDS, ("window",), ("hotspot",), ("sink", "dense"), ("temporal",)], ids=lambda k: "+".join(k) if len(k) < 5 else "mix")
def test_target_rho_at_most_1_05_on_every_factorisation_of_8(kinds):
    """Issue 6, target 1, at CI size (Wan's 40 heads, 250 blocks); benchmarks/bench_plan.py runs
    the full Wan2.1-14B size."""
    for seed in (0, 1):
        work = synthetic_work(heads=40, seq_len=16_000, frames=21, seed=seed, kinds=kinds)
        for U, R in FACTORISATIONS_8:
            plan = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=16_000)
            assert plan.imbalance() <= 1.05, (kinds, seed, U, R, plan.imbalance())


def test_within_four_thirds_of_the_brute_force_optimum_on_tiny_cases():
    """Exhaustive search over every equal-count head grouping and block layout (2-4 heads, 3-5
    blocks, U <= 2, R <= 3). The planner is a heuristic; over these 60 seeded cases it stays
    within 4/3 of the optimum (the classic LPT bound; measured worst 1.33, mean 1.01)."""
    rng = np.random.default_rng(0)
    ratios = []
    for case in range(60):
        H, nb = int(rng.choice([2, 4])), int(rng.integers(3, 6))
        U, R = int(rng.choice([1, 2])), int(rng.choice([1, 2, 3]))
        dens = rng.uniform(0.05, 0.95, H)
        values = 4096 if case % 2 else rng.integers(1, 4097, (H, nb, nb))
        a = ((rng.random((H, nb, nb)) < dens[:, None, None]) * values).astype(np.int32)
        if a.sum() == 0:
            continue
        work = torch.from_numpy(a)[None]
        plan = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=64 * nb)
        ratios.append(plan.imbalance() / optimum_rho(work, U, R))
    assert min(ratios) >= 1.0 - 1e-12  # nothing beats the optimum: the oracle is sound
    assert max(ratios) <= 4 / 3 + 1e-12 and float(np.mean(ratios)) <= 1.05


def test_head_level_lpt_with_swaps():
    # Ulysses only: rho_s is max group work / mean; 8 heads, 4 groups of 2.
    weights = [90, 80, 70, 60, 40, 30, 20, 10]
    work = torch.tensor(weights, dtype=torch.int32)[None, :, None, None].expand(1, 8, 1, 1).contiguous()
    plan = make_plan(work, ulysses=4, ring=1, q_block=64, seq_len=64)
    groups = sorted(sorted(weights[h] for h in plan.head_group(k)) for k in range(4))
    assert groups == [[10, 90], [20, 80], [30, 70], [40, 60]]  # every pair sums to 100: optimal
    assert plan.imbalance() == 1.0
    assert make_plan(work, ulysses=4, ring=1, q_block=64, seq_len=64, balance_heads=False).head_perm == tuple(range(8))


def test_uneven_heads():
    work = random_work(10, 24, seed=5)
    with pytest.raises(ValueError, match="must divide heads=10"):
        make_plan(work, ulysses=4, ring=2, q_block=64, seq_len=1536)
    plan = make_plan(work, ulysses=4, ring=2, q_block=64, seq_len=1536, uneven_heads=True)
    assert plan.heads_per_rank == (3, 3, 2, 2) and plan.head_offsets == (0, 3, 6, 8, 10)
    assert plan.imbalance() == pytest.approx(brute_rho(work, plan))
    one = Plan.identity(ulysses=1, ring=2, heads=10, q_block=64, seq_len=1536)
    contiguous = Plan(ulysses=4, ring=2, heads=10, q_block=64, seq_len=1536, head_perm=tuple(range(10)),
                      head_offsets=(0, 3, 6, 8, 10), q_blocks=one.q_blocks * 4, kv_blocks=one.kv_blocks * 4)
    assert plan.imbalance() <= brute_rho(work, contiguous)


def test_reward_zero_is_plain_greedy_and_infinity_keeps_blocks_home():
    rng = np.random.default_rng(1)
    for R, nb in ((2, 9), (3, 20), (8, 101)):
        home = _home(nb, R)
        caps = np.bincount(home, minlength=R).tolist()
        weights = rng.integers(0, 50, nb)
        # Plain greedy, written independently: heaviest first, least loaded rank with room,
        # ties to the block's home and then to the lowest rank.
        load, cnt, expected = [0] * R, [0] * R, np.empty(nb, dtype=np.int64)
        for b in sorted(range(nb), key=lambda b: (-weights[b], b)):
            open_ = [g for g in range(R) if cnt[g] < caps[g]]
            lo = min(load[g] for g in open_)
            g = home[b] if home[b] in open_ and (load[home[b]] == lo or weights[b] == 0) else min(g for g in open_ if load[g] == lo)
            expected[b] = g
            load[g] += weights[b]
            cnt[g] += 1
        assert np.array_equal(_biased_greedy(weights, home, caps, 0.0), expected)
        assert np.array_equal(_biased_greedy(weights, home, caps, math.inf), home)
        assert np.array_equal(_biased_greedy(weights, home, caps, 1e9), home)
        moved = [int((_biased_greedy(weights, home, caps, rb) != home).sum()) for rb in (0.0, 1.0, 2.0, 10.0)]
        assert moved[0] >= moved[-1]
    work = synthetic_work(heads=8, seq_len=6400, frames=5, seed=2)
    plan = make_plan(work, ulysses=2, ring=4, q_block=64, seq_len=6400, reward=math.inf)
    identity_blocks = Plan.identity(ulysses=2, ring=4, heads=8, q_block=64, seq_len=6400).q_blocks
    assert plan.q_blocks == plan.kv_blocks == identity_blocks and plan.moved_blocks("q") == 0


def test_per_group_blocks_and_shared_blocks():
    work = synthetic_work(heads=8, seq_len=8000, frames=6, seed=4)
    shared = make_plan(work, ulysses=2, ring=4, q_block=64, seq_len=8000, per_group_blocks=False, refine=False)
    if shared.moved_blocks("q"):
        assert shared.q_blocks[0] == shared.q_blocks[1] and shared.kv_blocks[0] == shared.kv_blocks[1]
    own = make_plan(work, ulysses=2, ring=4, q_block=64, seq_len=8000)
    assert own.imbalance() <= shared.imbalance()


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_get_clear_errors():
    work = random_work(8, 16, seed=0)
    kw = dict(q_block=64, seq_len=1024)
    with pytest.raises(ValueError, match=r"ulysses=3 must divide heads=8"):
        make_plan(work, ulysses=3, ring=2, **kw)
    with pytest.raises(ValueError, match=r"ulysses \* ring must equal world: 2 \* 2 = 4 != world=8"):
        make_plan(work, ulysses=2, ring=2, world=8, **kw)
    with pytest.raises(ValueError, match=r"ulysses \* ring must equal world"):
        imbalance_ratio(work, ulysses=4, ring=4, world=8, **kw)
    with pytest.raises(ValueError, match="ring=32 exceeds the number of blocks 16"):
        make_plan(work, ulysses=1, ring=32, **kw)
    with pytest.raises(ValueError, match="ulysses=16 exceeds heads=8"):
        make_plan(work, ulysses=16, ring=1, **kw)
    with pytest.raises(ValueError, match=r"\(B, H, NB, NB\) with NB = ceil\(seq_len / q_block\) = ceil\(1000 / 64\) = 16; got \(8, 16, 16\)"):
        make_plan(work[0], ulysses=2, ring=2, q_block=64, seq_len=1000)
    with pytest.raises(ValueError, match=r"ceil\(2000 / 64\) = 32; got \(1, 8, 16, 16\)"):
        make_plan(work, ulysses=2, ring=2, q_block=64, seq_len=2000)
    with pytest.raises(ValueError, match=r"got \(1, 8, 16, 15\)"):
        make_plan(work[..., :15], ulysses=2, ring=2, **kw)
    with pytest.raises(TypeError, match="integer tensor"):
        make_plan(work.float(), ulysses=2, ring=2, **kw)
    with pytest.raises(ValueError, match="non-negative"):
        make_plan(-work, ulysses=2, ring=2, **kw)
    with pytest.raises(TypeError, match="needs q_block= and seq_len="):
        make_plan(work, ulysses=2, ring=2)
    with pytest.raises(TypeError, match="SparseMask or a work tensor"):
        make_plan(work.numpy(), ulysses=2, ring=2, **kw)
    with pytest.raises(ValueError, match="reward must be >= 0"):
        make_plan(work, ulysses=2, ring=2, reward=-1.0, **kw)
    with pytest.raises(TypeError, match="ulysses must be an int"):
        make_plan(work, ulysses=2.0, ring=2, **kw)
    cross = SparseMask.full(1, 2, 100, 200, q_block=64)
    with pytest.raises(ValueError, match="self-attention"):
        make_plan(cross, ulysses=1, ring=2)
    mask = SparseMask.full(1, 8, 1024, 1024, q_block=64)
    with pytest.raises(ValueError, match="q_block=32 disagrees with the mask's q_block=64"):
        make_plan(mask, ulysses=2, ring=2, q_block=32)
    other = Plan.identity(ulysses=2, ring=2, heads=8, q_block=64, seq_len=2048)
    with pytest.raises(ValueError, match=r"ceil\(2048 / 64\) = 32; got \(1, 8, 16, 16\)"):
        tile_work(work, other)
    with pytest.raises(ValueError, match="work is for heads=8, .* but the plan is for heads=4"):
        tile_work(work, Plan.identity(ulysses=2, ring=2, heads=4, q_block=64, seq_len=1024))
    with pytest.raises(ValueError, match="plan is for ulysses=2, ring=2, not ulysses=1, ring=4"):
        imbalance_ratio(work, ulysses=1, ring=4, plan=other)


# ---------------------------------------------------------------------------- reuse


def test_plan_cache_reuses_while_the_mask_drifts_slowly():
    kw = dict(heads=8, seq_len=6400, frames=10, seed=7, kinds=("hotspot", "dense", "sink"))
    cache = PlanCache(threshold=1.05)
    plans = []
    for step in range(12):
        work = synthetic_work(step=step, drift=0.002, **kw)
        plans.append(cache.get("layer0", work, ulysses=2, ring=4, q_block=64, seq_len=6400))
        assert cache.last_imbalance == pytest.approx(imbalance_ratio(work, ulysses=2, ring=4, plan=plans[-1]))
        assert cache.last_imbalance <= 1.05
    assert cache.misses >= 1 and cache.hits >= 6 and cache.hits + cache.misses == 12
    assert plans[1] is plans[0]  # a hit returns the very same object
    # A different mask under the same key: the old plan is far off, so it re-plans.
    before = cache.misses
    other = synthetic_work(heads=8, seq_len=6400, frames=10, seed=8, kinds=("window",))
    fresh = cache.get("layer0", other, ulysses=2, ring=4, q_block=64, seq_len=6400)
    assert cache.misses == before + 1 and fresh.imbalance() == cache.last_imbalance
    # Other degrees or another key: a miss.
    cache.get("layer0", other, ulysses=4, ring=2, q_block=64, seq_len=6400)
    cache.get("layer1", other, ulysses=4, ring=2, q_block=64, seq_len=6400)
    assert cache.misses == before + 3 and len(cache) == 2
    # A plan that cannot reach P_s is kept while the mask does not get worse under it.
    strict = PlanCache(threshold=1.0)
    first = strict.get(0, other, ulysses=2, ring=4, q_block=64, seq_len=6400)
    assert first.imbalance() > 1.0 and strict.get(0, other.clone(), ulysses=2, ring=4, q_block=64, seq_len=6400) is first
    worse = other.clone()
    worse[0, first.head_group(0)[0], list(first.q_blocks[0][0])] *= 3  # pile work on one rank
    assert strict.get(0, worse, ulysses=2, ring=4, q_block=64, seq_len=6400) is not first
    assert (strict.hits, strict.misses) == (1, 2)
    cache.clear()
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def test_plan_cache_with_degree_choice_and_errors():
    work = synthetic_work(heads=8, seq_len=4096, frames=4, seed=1)
    cache = PlanCache()
    p1 = cache.get(0, work, world=8, q_block=64, seq_len=4096)
    p2 = cache.get(0, work, world=8, q_block=64, seq_len=4096)
    u, r, chosen = choose_degrees(work, world=8, heads=8, q_block=64, seq_len=4096)
    assert p1 is p2 and (p1.ulysses, p1.ring) == (u, r) and p1 == chosen and (cache.hits, cache.misses) == (1, 1)
    with pytest.raises(TypeError, match="ulysses= and ring=, or world="):
        cache.get(0, work, ulysses=2, q_block=64, seq_len=4096)
    with pytest.raises(TypeError, match="not both"):
        cache.get(0, work, ulysses=2, ring=4, world=8, q_block=64, seq_len=4096)
    with pytest.raises(ValueError, match="threshold must be a number >= 1.0"):
        PlanCache(threshold=0.9)


# ---------------------------------------------------------------------------- cost model


def model(**over):
    base = dict(block_tflops=[[0.0, 400.0], [1.0, 400.0]], fine_tflops=[[0.0, 300.0], [1.0, 300.0]], call_overhead_us=10.0,
                comm_latency_us=5.0, nvlink_gbps=100.0, internode_gbps=10.0, gpus_per_node=8)
    return CostModel(**{**base, **over})


def test_cost_model_json_round_trip_and_errors(tmp_path):
    default = CostModel.default()  # the shipped calibration: loads, and its curves are what the file says
    shipped = json.loads(resources.files("dbsp").joinpath("cost_model.json").read_text())
    for (d, t) in shipped["block_tflops"]:
        assert default.tflops(density=d, fine_grained=False) == pytest.approx(t)
    for (d, t) in shipped["fine_tflops"]:
        assert default.tflops(density=d, fine_grained=True) == pytest.approx(t)
    path = tmp_path / "cm.json"
    m = model(block_tflops=[[0.1, 200.0], [0.5, 400.0]], dense_tflops=600.0, mixed_overhead_us=900.0, dense_unaligned=1.1,
              dense_sms=132, merge_gbps=1200.0)
    m.to_json(path, device="test")
    assert CostModel.from_json(path) == m and json.loads(path.read_text())["device"] == "test"
    assert m.tflops(density=0.3, fine_grained=False) == pytest.approx(300.0)  # linear in between
    assert m.tflops(density=0.05, fine_grained=False) == 200.0 and m.tflops(density=0.9, fine_grained=False) == 400.0
    data = json.loads(path.read_text())
    del data["nvlink_gbps"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lacks \['nvlink_gbps'\]"):
        CostModel.from_json(path)
    with pytest.raises(ValueError, match="strictly increasing"):
        model(block_tflops=[[0.5, 1.0], [0.1, 2.0]])
    with pytest.raises(ValueError, match="nvlink_gbps must be > 0"):
        model(nvlink_gbps=0.0)


def test_cost_model_against_hand_formulas():
    m, D = model(), 128
    work = random_work(4, 8, seed=2)  # S = 512, 4 heads
    rate = 400e12
    entries = int(work.sum())
    one = make_plan(work, ulysses=1, ring=1, q_block=64, seq_len=512)
    pred = m.predict(one, head_dim=D)
    assert pred.total_ms == pytest.approx(1e3 * (10e-6 + 4 * D * entries / rate))
    assert pred.all_to_all_ms == pred.exchange_ms == 0.0
    # Ulysses: max group compute + the all-to-all of q, k, v, o (each rank sends 1/2 of its shard).
    uly = Plan.identity(ulysses=2, ring=1, heads=4, q_block=64, seq_len=512).with_tile_work(work)
    p = m.predict(uly, head_dim=D)
    groups = [int(work[0, 2 * k : 2 * k + 2].sum()) for k in range(2)]
    shard = 256 * 4 * D * 2
    assert p.all_to_all_ms == pytest.approx(1e3 * (2 * 5e-6 + 4 * shard * 0.5 / 100e9))
    assert p.ring_ms == pytest.approx(1e3 * (10e-6 + 4 * D * max(groups) / rate))
    # Ring: each step costs max(slowest tile, K/V transfer); the last step has no transfer.
    ring = Plan.identity(ulysses=1, ring=2, heads=4, q_block=64, seq_len=512).with_tile_work(work)
    W = ring.tile_work[0]
    comp = lambda x: 0.0 if x == 0 else 10e-6 + 4 * D * int(x) / rate  # noqa: E731
    p2p = 5e-6 + 2 * 256 * 4 * D * 2 / 100e9
    steps = [max(comp(W[0, 0]), comp(W[1, 1])), max(comp(W[0, 1]), comp(W[1, 0]))]
    assert m.predict(ring, head_dim=D).ring_ms == pytest.approx(1e3 * (max(steps[0], p2p) + steps[1]))
    assert m.predict(ring, head_dim=D).rank_compute_ms[0] == pytest.approx((1e3 * (comp(W[0, 0]) + comp(W[0, 1])), 1e3 * (comp(W[1, 1]) + comp(W[1, 0]))))
    # Past one node the ring runs at the inter-node bandwidth.
    big = Plan.identity(ulysses=1, ring=16, heads=4, q_block=64, seq_len=64 * 16)
    slow = model(call_overhead_us=0.0).predict(big.with_tile_work(torch.zeros(1, 4, 16, 16, dtype=torch.int32)), head_dim=D)
    assert slow.ring_ms == pytest.approx(1e3 * 15 * (5e-6 + 2 * 64 * 4 * D * 2 / 10e9))


def test_ring_merges_cost_their_bytes_after_each_ranks_first_step():
    """With merge_gbps, every ring step with work after the rank's first adds 4 B Lq H (3 D + 3)
    bytes at that speed to the rank's compute; without it (or at R = 1) merges cost nothing."""
    D, S, B = 128, 500, 2  # 8 blocks of 64, the last partial: ring chunks of 256 and 244 tokens
    work = torch.cat([random_work(4, 8, seed=6), random_work(4, 8, seed=7)])
    work[:, 0, :4, :4] = 0  # head 0 on ring rank 0: nothing at step 0 (its own chunk)
    plan = Plan.identity(ulysses=2, ring=2, heads=4, q_block=64, seq_len=S).with_tile_work(work)
    W = plan.tile_work
    assert W[0, 0, 0] > 0  # head 1 keeps group 0's rank 0 busy at step 0
    work[:, 1, :4, :4] = 0
    empty_first = Plan.identity(ulysses=2, ring=2, heads=4, q_block=64, seq_len=S).with_tile_work(work)
    assert empty_first.tile_work[0, 0, 0] == 0
    toks = [256, 244]
    for p in (plan, empty_first):
        base = model().predict(p, head_dim=D, batch=B)
        merged = model(merge_gbps=500.0).predict(p, head_dim=D, batch=B)
        W = p.tile_work
        for k in range(2):
            for i in range(2):
                steps = [int(W[k, i, (i + t) % 2]) > 0 for t in range(2)]
                merges = sum(steps[1:]) if steps[0] else max(0, sum(steps) - 1)
                heads = 2  # per rank
                want = base.rank_compute_ms[k][i] + 1e3 * merges * 4 * B * toks[i] * heads * (3 * D + 3) / 500e9
                assert merged.rank_compute_ms[k][i] == pytest.approx(want)
        assert merged.ring_ms > base.ring_ms
    one = make_plan(work, ulysses=2, ring=1, q_block=64, seq_len=S)
    assert model(merge_gbps=500.0).predict(one, head_dim=D, batch=B) == model().predict(one, head_dim=D, batch=B)
    with pytest.raises(ValueError, match="merge_gbps must be None or a finite number > 0"):
        model(merge_gbps=0.0)


def test_dense_heads_run_at_the_dense_rate():
    """With dense_tflops, a full head's entries of each tile cost 4 D / dense rate, the others the
    sparse rate, and a group holding both kinds pays mixed_overhead_us per call; dense_heads()
    finds the full heads from a mask, its work and its summary."""
    from dbsp.plan import dense_heads, summarize_work

    D, S = 128, 500  # 8 blocks of 64, the last one partial (52 tokens)
    tiles = random_work(4, 8, seed=4)[0] > 0
    tiles[1] = True  # head 1 selects everything
    mask = SparseMask.from_dense(tiles[None], q_block=64, kv_tile=64, seq_len_q=S, seq_len_kv=S)
    work = mask.work()
    assert dense_heads(mask) == dense_heads(work, q_block=64, seq_len=S) == (1,)
    assert dense_heads(summarize_work(mask, coarse=2, ring=2)) == (1,)
    m = model(dense_tflops=800.0, mixed_overhead_us=50.0)
    plan = Plan.identity(ulysses=2, ring=2, heads=4, q_block=64, seq_len=S).with_tile_work(work)
    pred = m.predict(plan, head_dim=D, dense_heads=(1,))
    W = plan.tile_work.double()
    # head group 0 = heads {0, 1}; ring rank 0 holds blocks 0-3 (256 tokens), rank 1 blocks 4-7 (244).
    toks = torch.tensor([256.0, 244.0])
    dense = torch.zeros_like(W)
    dense[0] = toks[:, None] * toks[None, :]
    sparse_density = float(W.sum() - dense.sum()) / (3 * S * S)
    rate = m.tflops(density=sparse_density, fine_grained=False) * 1e12
    secs = (W - dense) * 4 * D / rate + dense * 4 * D / 800e12
    for k in range(2):
        for i in range(2):
            mixed = 50e-6 if k == 0 else 0.0  # group 0 holds dense head 1 and sparse head 0
            want = sum(1e3 * (10e-6 + mixed + float(secs[k, i, j])) for j in range(2) if W[k, i, j] > 0)
            assert pred.rank_compute_ms[k][i] == pytest.approx(want)
    # Key chunk 1 (244 tokens) is not a multiple of 128: its dense entries cost dense_unaligned more.
    slow = model(dense_tflops=800.0, mixed_overhead_us=50.0, dense_unaligned=1.5)
    pred = slow.predict(plan, head_dim=D, dense_heads=(1,))
    secs = (W - dense) * 4 * D / rate + dense * torch.tensor([1.0, 1.5])[None, None, :] * 4 * D / 800e12
    for k in range(2):
        for i in range(2):
            mixed = 50e-6 if k == 0 else 0.0
            want = sum(1e3 * (10e-6 + mixed + float(secs[k, i, j])) for j in range(2) if W[k, i, j] > 0)
            assert pred.rank_compute_ms[k][i] == pytest.approx(want)
    with pytest.raises(ValueError, match="dense_unaligned must be a finite number >= 1"):
        model(dense_unaligned=0.9)
    # Waves: each rank's query chunk is 2 tiles of 128 tokens (256 and 244 tokens), so group 0's one
    # dense head makes 2 query tiles: on 3 SMs one wave of 3 tiles, 1.5x the work; on 2 SMs exactly one.
    assert model(dense_tflops=800.0, mixed_overhead_us=50.0, dense_sms=2).predict(plan, head_dim=D, dense_heads=(1,)) == \
        model(dense_tflops=800.0, mixed_overhead_us=50.0).predict(plan, head_dim=D, dense_heads=(1,))
    waved = model(dense_tflops=800.0, mixed_overhead_us=50.0, dense_sms=3).predict(plan, head_dim=D, dense_heads=(1,))
    secs = (W - dense) * 4 * D / rate + dense * 1.5 * 4 * D / 800e12
    for k in range(2):
        for i in range(2):
            mixed = 50e-6 if k == 0 else 0.0
            want = sum(1e3 * (10e-6 + mixed + float(secs[k, i, j])) for j in range(2) if W[k, i, j] > 0)
            assert waved.rank_compute_ms[k][i] == pytest.approx(want)
    # Two batch elements make 4 tiles: two waves of 3, 6 / 4 = 1.5x again; 4 SMs: one wave, no loss.
    assert model(dense_sms=3).dense_waves(np.array([0, 2, 4, 6, 7])).tolist() == pytest.approx([1.0, 1.5, 1.5, 1.0, 9 / 7])
    assert model(dense_sms=4).dense_waves(4) == 1.0 and model().dense_waves(5) == 1.0
    with pytest.raises(ValueError, match="dense_sms must be >= 1"):
        model(dense_sms=0)
    # Without dense_tflops (or without dense heads) the prediction is the single-rate one.
    assert model().predict(plan, head_dim=D, dense_heads=(1,)) == model().predict(plan, head_dim=D)
    with pytest.raises(ValueError, match="dense_heads must be head ids"):
        m.predict(plan, head_dim=D, dense_heads=(7,))


@pytest.mark.parametrize("ulysses,ring,uneven", [(1, 4, False), (2, 2, False), (3, 2, True), (2, 3, False)])
def test_plan_chunk_tokens_count_each_ranks_blocks_with_the_partial_last_one(ulysses, ring, uneven):
    """The cost model's token counts per (group, ring rank) chunk equal the lengths of the plan's
    block lists in tokens, the last (partial) block counted short wherever the plan moved it."""
    S, M = 1000, 64  # 16 blocks, the last of 40 tokens
    work = random_work(6, 16, seed=ulysses * 10 + ring, dense_range=(0.02, 0.95))
    plan = make_plan(work, ulysses=ulysses, ring=ring, q_block=M, seq_len=S, uneven_heads=uneven, reward=0.0)
    assert plan.moved_blocks("q") + plan.moved_blocks("kv") > 0  # the test needs blocks away from home

    def tokens(blocks):
        return sum(S - b * M if b == 15 else M for b in blocks)

    q, kv = plan._chunk_tokens
    for got, lists in ((q, plan.q_blocks), (kv, plan.kv_blocks)):
        assert got.dtype == np.int64 and got.tolist() == [[tokens(b) for b in group] for group in lists]
        assert (got.sum(1) == S).all()
    with pytest.raises(ValueError, match="dense_tflops must be None or a finite number > 0"):
        model(dense_tflops=0.0)
    with pytest.raises(ValueError, match="mixed_overhead_us must be a finite number >= 0"):
        model(mixed_overhead_us=-1.0)


def _dense_consecutive_everywhere(plan, dense):
    for k in range(plan.ulysses):
        at = [i for i, h in enumerate(plan.head_group(k)) if h in dense]
        assert not at or at[-1] - at[0] == len(at) - 1, (k, plan.head_group(k), dense)


def _dense_first_everywhere(plan, dense):
    for k in range(plan.ulysses):
        kinds = [h in dense for h in plan.head_group(k)]
        assert kinds == sorted(kinds, reverse=True), (k, plan.head_group(k), dense)


@pytest.mark.parametrize("U, R", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_plans_list_dense_heads_first_and_scattered_ones_pay_the_gather(U, R):
    """Every plan the planner builds other than the unplanned layout (from work or a summary, with
    or without a cost model, and PlanCache's head-swap repairs) lists each group's dense heads
    first, which changes no work; with a cost model that charges the gather, no plan with dense
    heads apart wins, at U = 1 either, nor in the degree choice; CostModel charges
    mixed_gather_us only to mixed calls whose dense heads are apart."""
    from dbsp.plan import dense_heads, summarize_work

    H, nb, S = 8, 8, 512
    work = random_work(H, nb, seed=11 + U + R, dense_range=(0.05, 0.6))
    for h in (1, 4, 6):  # dense heads spread over the contiguous groups
        work[0, h] = 64 * 64
    dense = set(dense_heads(work, q_block=64, seq_len=S))
    assert dense == {1, 4, 6}
    timed = model(dense_tflops=700.0, mixed_overhead_us=20.0, mixed_gather_us=300.0)
    summary = summarize_work(work, q_block=64, seq_len=S, coarse=1, ring=R)
    for src in (work, summary):
        for kw in (dict(), dict(cost_model=timed), dict(balance_heads=False), dict(balance_blocks=False),
                   dict(cost_model=timed, balance_heads=False), dict(cost_model=timed, balance_blocks=False)):
            plan = make_plan(src, ulysses=U, ring=R, q_block=64, seq_len=S, **kw)
            if plan.head_perm == tuple(range(H)) and plan.moved_blocks("q") + plan.moved_blocks("kv") == 0:
                # The unplanned layout ties with its dense-first twin by tile work; timed, it wins
                # only where it pays no gather (its dense heads happen to be consecutive).
                if "cost_model" in kw:
                    _dense_consecutive_everywhere(plan, dense)
                continue
            _dense_first_everywhere(plan, dense)
            # The same heads per group and blocks, in natural order, have the same tile work.
            natural = Plan(ulysses=U, ring=R, heads=H, q_block=64, seq_len=S,
                           head_perm=tuple(h for k in range(U) for h in sorted(plan.head_group(k))),
                           head_offsets=plan.head_offsets, q_blocks=plan.q_blocks, kv_blocks=plan.kv_blocks)
            assert torch.equal(tile_work(work, natural), plan.tile_work)
    _, _, picked = choose_degrees(summary if R > 1 else work, world=U * R, heads=H, q_block=64, seq_len=S, cost_model=timed)
    _dense_consecutive_everywhere(picked, dense)
    if R == 1:  # a repair after the dense heads move keeps the order
        cache = PlanCache(incremental=True, threshold=1.0)
        cache.get(0, summary, ulysses=U, ring=1)
        drift = work.clone()
        drift[0, 0] = 64 * 64
        drift[0, 1] //= 2
        moved = cache.get(0, summarize_work(drift, q_block=64, seq_len=S, coarse=1, ring=1), ulysses=U, ring=1)
        _dense_first_everywhere(moved, set(dense_heads(drift, q_block=64, seq_len=S)))
    # The gather term: one group holding sparse 0, dense 1, sparse 2, dense 3 (apart), then in the
    # planner's order (together); identical work and tiles, the first pays 300 us more per call.
    apart = Plan(ulysses=1, ring=R, heads=4, q_block=64, seq_len=S, head_perm=(0, 1, 2, 3), head_offsets=(0, 4),
                 q_blocks=Plan.identity(ulysses=1, ring=R, heads=4, q_block=64, seq_len=S).q_blocks,
                 kv_blocks=Plan.identity(ulysses=1, ring=R, heads=4, q_block=64, seq_len=S).kv_blocks)
    four = work[:, :4].clone()
    four[0, 3] = 64 * 64
    together = Plan(**{**apart._layout(), "head_perm": (1, 3, 0, 2)})
    a = timed.predict(apart.with_tile_work(four), dense_heads=(1, 3))
    t = timed.predict(together.with_tile_work(four), dense_heads=(1, 3))
    calls = int((apart.with_tile_work(four).tile_work[0, 0] > 0).sum())  # rank 0's non-empty ring steps
    assert a.rank_compute_ms[0][0] - t.rank_compute_ms[0][0] == pytest.approx(calls * 0.3)
    assert model(dense_tflops=700.0, mixed_overhead_us=20.0).predict(apart.with_tile_work(four), dense_heads=(1, 3)) == \
        model(dense_tflops=700.0, mixed_overhead_us=20.0).predict(together.with_tile_work(four), dense_heads=(1, 3))
    with pytest.raises(ValueError, match="mixed_gather_us must be a finite number >= 0"):
        model(mixed_gather_us=-1.0)


def test_choose_degrees_enumerates_what_the_heads_allow():
    work = synthetic_work(heads=12, seq_len=6000, frames=6, seed=3)
    kw = dict(world=8, q_block=64, seq_len=6000, cost_model=model())
    assert [(c.ulysses, c.ring) for c in score_degrees(work, **kw)] == [(1, 8), (2, 4), (4, 2)]
    assert [(c.ulysses, c.ring) for c in score_degrees(work, uneven_heads=True, **kw)] == [(1, 8), (2, 4), (4, 2), (8, 1)]
    scored = score_degrees(work, **kw)
    best = min(scored, key=lambda c: c.prediction.total_ms)
    u, r, plan = choose_degrees(work, heads=12, **kw)
    assert (u, r) == (best.ulysses, best.ring) and plan == best.plan
    plain = score_degrees(work, balance=False, **kw)
    for a, b in zip(scored, plain):  # balanced candidates include the unbalanced layout
        assert a.prediction.total_ms <= b.prediction.total_ms + 1e-12
        assert b.plan == Plan.identity(ulysses=b.ulysses, ring=b.ring, heads=12, q_block=64, seq_len=6000)
    with pytest.raises(ValueError, match="heads=10 but the mask has 12 heads"):
        choose_degrees(work, heads=10, **kw)
    with pytest.raises(ValueError, match="no \\(ulysses, ring\\)"):
        score_degrees(torch.ones(1, 12, 2, 2, dtype=torch.int32), world=16, q_block=64, seq_len=128)


@pytest.mark.parametrize("seed", range(6))
def test_degree_choice_pruning_bounds_every_plan_and_keeps_the_winner(seed):
    """The pruning bound is below the predicted time of every plan of every candidate (balanced,
    unbalanced, from the work and from a summary, with dense heads at their own rate), and
    choose_degrees (pruned) picks what the full scoring picks."""
    from dbsp.plan.core import _work_per_head, _as_work
    from dbsp.plan.degrees import _lower_bound_ms

    g = torch.Generator().manual_seed(seed)
    heads, nb = 8, 32
    work = random_work(heads, nb, seed=seed, dense_range=(0.02, 0.6))
    full = torch.rand(heads, generator=g) < 0.3  # some heads fully dense
    work[0, full] = 64 * 64
    fast = model(dense_tflops=700.0, mixed_overhead_us=float(torch.randint(0, 400, (1,), generator=g)),
                 nvlink_gbps=float(torch.randint(20, 400, (1,), generator=g)), dense_sms=(None, 3, 5)[seed % 3])
    S = nb * 64
    for src in (work, summarize_work(work, q_block=64, seq_len=S, ring=8)):
        w = _as_work(src, q_block=64, seq_len=S)
        kw = dict(world=8, q_block=64, seq_len=S, cost_model=fast)
        for balance in (True, False):
            for c in score_degrees(src, balance=balance, **kw):
                lb = _lower_bound_ms(fast, w, _work_per_head(w), c.ulysses, c.ring, head_dim=128, element_bytes=2)
                assert lb <= c.prediction.total_ms * (1 + 1e-9), (c.ulysses, c.ring, lb, c.prediction.total_ms)
        best = min(score_degrees(src, **kw), key=lambda c: (c.prediction.total_ms, -c.ulysses))
        u, r, plan = choose_degrees(src, heads=heads, **kw)
        assert (u, r) == (best.ulysses, best.ring) and plan == best.plan


def test_degree_choice_scores_the_ring_free_candidate_first(monkeypatch):
    """choose_degrees plans R = 1 first whatever the bounds' order (its plan is a head balancing
    only, and its time lets the summary bounds skip the others): the first candidate scored has
    R = 1, and the pick is the full scoring's."""
    from dbsp.plan import degrees

    work = synthetic_work(heads=8, seq_len=4096, frames=4, seed=3)
    work[0, :3] = 64 * 64  # three fully dense heads
    s = summarize_work(work, q_block=64, seq_len=4096, ring=8)
    cm = model(dense_tflops=700.0, mixed_overhead_us=50.0, dense_sms=5, nvlink_gbps=1000.0)
    seen, real = [], degrees._score_pair
    monkeypatch.setattr(degrees, "_score_pair", lambda w, u, r, *a, **k: seen.append((u, r)) or real(w, u, r, *a, **k))
    u, r, plan = choose_degrees(s, world=8, heads=8, cost_model=cm)
    assert seen[0][1] == 1 and len(set(seen)) == len(seen)
    monkeypatch.setattr(degrees, "_score_pair", real)
    best = min(score_degrees(s, world=8, cost_model=cm), key=lambda c: (c.prediction.total_ms, -c.ulysses))
    assert (u, r) == (best.ulysses, best.ring) and plan == best.plan


@pytest.mark.parametrize("seed", range(8))
def test_summary_bound_is_below_every_scored_candidate(seed):
    """The summary bound (head groups, home tiles, units every rank must send away) is below the
    predicted time of the plan every candidate scores (balanced or not, uneven heads, any home
    bonus, dense heads with and without a mixed-call cost), and choose_degrees (pruned with it)
    picks what the full scoring picks, plan and all; dense SDPA in waves of 3 or 7 query tiles or
    none."""
    from dbsp.plan.degrees import _summary_bound_ms

    g = torch.Generator().manual_seed(100 + seed)
    heads = (5, 6, 8, 12)[seed % 4]
    if seed % 2:
        nb = 48
        work = random_work(heads, nb, seed=seed, dense_range=(0.02, 0.7))
        work[0, torch.rand(heads, generator=g) < 0.3] = 64 * 64  # some heads fully dense
    else:
        work = synthetic_work(heads=heads, seq_len=3000 + 64 * seed, frames=5, seed=seed)
        nb = work.shape[-1]
    S = nb * 64 if seed % 2 else 3000 + 64 * seed
    tflops = float(torch.empty(1).uniform_(0.05, 5.0, generator=g))  # slow kernels: moving blocks can pay off
    cost = model(block_tflops=[[0.0, tflops], [1.0, 1.3 * tflops]], dense_tflops=tflops * float(torch.empty(1).uniform_(1.0, 2.0, generator=g)),
                 call_overhead_us=float(torch.randint(0, 2, (1,), generator=g)) * 10.0,
                 mixed_overhead_us=float(torch.randint(0, 300, (1,), generator=g)),
                 comm_latency_us=float(torch.randint(1, 60, (1,), generator=g)),
                 nvlink_gbps=float(torch.randint(5, 400, (1,), generator=g)), dense_sms=(3, None, 7)[seed % 3])
    for coarse in (1, 2):
        s = summarize_work(work, q_block=64, seq_len=S, ring=8, coarse=coarse)
        for balance, uneven, reward in ((True, False, 2.0), (True, True, 0.0), (False, False, 2.0), (True, False, math.inf)):
            kw = dict(world=8, cost_model=cost, balance=balance, uneven_heads=uneven, reward=reward)
            scored = score_degrees(s, **kw)
            for c in scored:
                lb = _summary_bound_ms(cost, s, c.ulysses, c.ring, reward=reward, uneven_heads=uneven, balance=balance,
                                       head_dim=128, element_bytes=2)
                assert lb <= c.prediction.total_ms * (1 + 1e-9), (coarse, balance, uneven, reward, c.ulysses, lb, c.prediction)
            best = min(scored, key=lambda c: (c.prediction.total_ms, -c.ulysses))
            u, r, plan = choose_degrees(s, heads=heads, **kw)
            assert (u, r) == (best.ulysses, best.ring) and plan == best.plan


@pytest.mark.parametrize("seed", range(6))
def test_summary_bound_holds_for_plans_that_move_few_units(seed):
    """Oracle: CostModel.predict on explicit plans. For head groups of any make-up and layouts
    that send a few units away (the heaviest of the busiest ranks, as a cheap balancer would, or
    random ones; every rank keeps its block count), the predicted time is never below the bound
    for plans with those groups that move units, and comes close to it (it is not vacuous). Dense
    SDPA runs in waves of 2 or 5 query tiles (even seeds) or without waves."""
    from dbsp.plan.balance import _build_plan
    from dbsp.plan.core import _head_counts, _home
    from dbsp.plan.cost import _predictor
    from dbsp.plan.degrees import _summary_bound_ms

    g = torch.Generator().manual_seed(200 + seed)
    rng = np.random.default_rng(seed)
    heads = (6, 8, 12)[seed % 3]
    work = synthetic_work(heads=heads, seq_len=6000, frames=5, seed=seed)
    work[0, torch.rand(heads, generator=g) < 0.2] = 64 * 64  # dense heads
    tflops = 10 ** float(torch.empty(1).uniform_(-1.0, 2.0, generator=g))  # compute from far above to near the exchange
    cost = model(block_tflops=[[0.0, tflops], [1.0, tflops]], dense_tflops=1.5 * tflops, call_overhead_us=0.0,
                 mixed_overhead_us=float(torch.randint(0, 300, (1,), generator=g)), comm_latency_us=20.0,
                 nvlink_gbps=float(torch.randint(1, 50, (1,), generator=g)), dense_sms=(2, None, 5, None)[seed % 4])
    s = summarize_work(work, q_block=64, seq_len=6000, ring=8, coarse=1 + seed % 2)
    predict = _predictor(cost, s, head_dim=128, element_bytes=2)
    sizes = np.diff(s._starts)
    rows, cols = s._unit_marginals
    closest = math.inf
    for U, R in ((1, 8), (2, 4), (4, 2)):
        home = _home(s.num_blocks, R)[s._starts[:-1]]
        for trial in range(6):
            perm = rng.permutation(heads)
            counts = _head_counts(heads, U, True)
            off = np.cumsum([0] + counts)
            groups = [sorted(perm[off[k] : off[k + 1]].tolist()) for k in range(U)]
            owners = []
            for marg in (rows, cols):
                owner = np.tile(home, (U, 1))
                for k, grp in enumerate(groups):
                    load = marg[grp].sum(0)
                    for _ in range(int(rng.integers(0, 4))):
                        per = np.bincount(owner[k], weights=load, minlength=R)
                        a, b = (int(per.argmax()), int(per.argmin())) if trial < 3 else tuple(rng.choice(R, 2, replace=False).tolist())
                        xs = np.nonzero((owner[k] == a) & (sizes == s.coarse))[0]
                        ys = np.nonzero((owner[k] == b) & (sizes == s.coarse))[0]
                        x = xs[np.argmax(load[xs])] if trial < 3 else rng.choice(xs)
                        y = ys[np.argmin(load[ys])] if trial < 3 else rng.choice(ys)
                        owner[k, x], owner[k, y] = b, a
                owners.append(np.repeat(owner, sizes, axis=1))
            if all((o == np.repeat(np.tile(home, (U, 1)), sizes, axis=1)).all() for o in owners):
                continue  # the bound is for plans that move units
            plan = _build_plan(ulysses=U, ring=R, heads=heads, q_block=64, seq_len=6000, groups=groups, counts=counts,
                               q_owner=owners[0], kv_owner=owners[1], tile_work=None).with_tile_work(s)
            plan.validate()
            pred = predict(plan).total_ms
            lb = _summary_bound_ms(cost, s, U, R, reward=2.0, uneven_heads=True, balance=True, head_dim=128,
                                   element_bytes=2, groups=groups)
            assert lb <= pred * (1 + 1e-9), (U, R, trial, lb, pred)
            closest = min(closest, pred / lb)
    assert closest < 1.1


@pytest.mark.parametrize("diag, expected", [((4000, 100, 100, 100), 3.15), ((1000, 1000, 1000, 1000), 2.5)])
def test_summary_bound_for_moved_units_by_hand(diag, expected):
    """The moved-unit bound on a case worked by hand: one head, R = 2, four blocks (units) with
    work only on the diagonal, 1 us per entry, no latency, 0.5 ms to exchange one block.

    Skewed ``(4000, 100 | 100, 100)`` us: mean rank load 2.15 ms; ring time 2.15 would need rank 0
    to send its 4 ms unit away on both the query and the key side (2 units, 1 ms): 3.15 ms; ring
    time 4.1 ms needs none but some unit moves (0.5 ms): 4.6 ms. The bound is the least, 3.15.
    Even ``(1000 x 4)``: nothing needs to move, so the mean plus one unit: 2.0 + 0.5 ms."""
    import dbsp.plan.degrees as P

    work = torch.zeros(1, 1, 4, 4, dtype=torch.int32)
    work[0, 0] = torch.diag(torch.tensor(diag, dtype=torch.int32))
    s = summarize_work(work, q_block=64, seq_len=256, ring=2, coarse=1)
    us_per_entry = model(block_tflops=[[0.0, 512e-6], [1.0, 512e-6]], call_overhead_us=0.0, comm_latency_us=0.0,
                         nvlink_gbps=32768 / 0.5e6)  # 4 * 128 flops at 512e-6 TFLOPS = 1 us; 32 KB in 0.5 ms
    lb = P._summary_bound_ms(us_per_entry, s, 1, 2, reward=2.0, uneven_heads=False, balance=True, head_dim=128,
                             element_bytes=2, groups=[[0]])
    assert lb == pytest.approx(expected, rel=1e-9)



def _random_model_and_summary(seed, dense: bool = False):
    """A cost model of random throughput and link speed, and a 16-head synthetic summary. With
    ``dense``, two heads are fully dense and the model costs dense heads apart (so a degree choice
    also balances time-weighted work: two moved plans per candidate)."""
    g = torch.Generator().manual_seed(seed + (100 if dense else 0))
    tflops = 10 ** float(torch.empty(1).uniform_(-0.5, 1.5, generator=g))
    timed = dict(dense_tflops=1.5 * tflops, mixed_overhead_us=30.0, mixed_gather_us=100.0) if dense else {}
    cost = model(block_tflops=[[0.0, tflops], [1.0, tflops]], call_overhead_us=0.0, comm_latency_us=20.0,
                 nvlink_gbps=float(torch.randint(5, 100, (1,), generator=g)), **timed)
    work = synthetic_work(heads=16, seq_len=12000, frames=9, seed=seed)
    if dense:
        tokens = torch.full((work.shape[-1],), 64, dtype=work.dtype)
        tokens[-1] = 12000 - 64 * (work.shape[-1] - 1)
        for h in (seed % 16, (seed + 5) % 16):
            work[:, h] = torch.outer(tokens, tokens)
    return cost, summarize_work(work, q_block=64, seq_len=12000)


@pytest.mark.parametrize("seed", range(12))
def test_time_weighted_head_groups_are_swap_optimal_and_no_worse_than_plain_lpt(seed):
    """Oracle: plain Python over every single swap. The time-weighted head balancing (work plus
    a penalty for each group mixing dense and sparse heads) returns groups of the given sizes
    whose largest cost no swap of a head of the costliest group with a head of another group
    lowers, and that cost no more than the plain balancing's groups do."""
    from dbsp.plan.balance import _balance_heads, _lpt_heads_timed

    rng = np.random.default_rng(seed)
    H = int(rng.integers(4, 17))
    U = int(rng.choice([u for u in (2, 3, 4) if u < H]))
    counts = [H // U + (k < H % U) for k in range(U)]
    totals = rng.integers(1, 1000, H).tolist()
    if seed % 3 == 0:
        totals = [totals[0]] * H  # all tied
    dense = rng.random(H) < 0.4
    penalty = int(rng.integers(0, 2000))

    def cost(g):
        n_dense = sum(bool(dense[h]) for h in g)
        return sum(totals[h] for h in g) + penalty * (0 < n_dense < len(g))

    groups = _lpt_heads_timed(totals, dense, counts, True, penalty)
    assert sorted(len(g) for g in groups) == sorted(counts) and sorted(h for g in groups for h in g) == list(range(H))
    costs = [cost(g) for g in groups]
    a = costs.index(max(costs))
    for b in range(U):
        for x in groups[a]:
            for y in groups[b] if b != a else []:
                ga = [h for h in groups[a] if h != x] + [y]
                gb = [h for h in groups[b] if h != y] + [x]
                assert max(cost(ga), cost(gb)) >= costs[a], (x, y)
    assert max(costs) <= max(cost(g) for g in _balance_heads(totals, counts, True))


def test_degree_choice_stops_losing_block_balancing_and_keeps_the_winner(monkeypatch):
    """choose_degrees on a summary stops a candidate's block balancing once its moved blocks make
    it lose (this happens here, both where the whole candidate stops and where only that moved
    plan is dropped), and still picks what the full scoring picks, plan and all."""
    import dbsp.plan.degrees as P

    tests, kinds = [], set()
    real = P._prune_moves

    def counting(parts, n, limit):
        res = real(parts, n, limit)
        if res is None:
            return None
        test, whole = res

        def counted(sent):
            tests.append(test(sent))
            if tests[-1]:
                kinds.add(whole)
            return tests[-1]

        return counted, whole

    monkeypatch.setattr(P, "_prune_moves", counting)
    for seed in range(16):
        cost, s = _random_model_and_summary(seed % 8, dense=seed >= 8)
        best = min(score_degrees(s, world=8, cost_model=cost), key=lambda c: (c.prediction.total_ms, -c.ulysses))
        u, r, plan = choose_degrees(s, world=8, heads=16, cost_model=cost)
        assert (u, r) == (best.ulysses, best.ring) and plan == best.plan and plan.fingerprint() == best.plan.fingerprint()
    assert any(tests), "no candidate's balancing was stopped: the early stop is not exercised"
    assert kinds == {True, False}, f"stops exercised: {kinds} (True: whole candidates, False: single moved plans)"


@pytest.mark.parametrize("seed", range(4))
def test_fewest_sent_bounds_what_refinement_leaves(seed):
    """Oracle: the real block refinement. From a moved start (round-robin or biased greedy) of a
    summary's head group, ``_refine`` with at most ``s`` swaps never leaves fewer sent blocks
    (largest per side, summed) than ``_fewest_sent`` allows for ``s`` swaps; with no swaps the
    bound is the start's exact count; it is often above ``count - s x unit`` (one unit a swap);
    and the hand example of its docstring holds."""
    from dbsp.plan.balance import _fewest_sent, _refine, _round_robin
    from dbsp.plan.core import _summary_group_sum

    assert _fewest_sent(np.array([8, 8]), np.array([0, 0]), 1, 1) == 7
    assert _fewest_sent(np.array([8, 8]), np.array([5, 0]), 1, 1) == 12  # the docstring's example
    assert _fewest_sent(np.array([9, 3]), np.array([8, 8]), 2, 1) == 15  # a rank loses at most one unit a swap
    rng = np.random.default_rng(seed)
    work = synthetic_work(heads=8, seq_len=9000, frames=7, seed=seed)
    s = summarize_work(work, q_block=64, seq_len=9000, ring=8, coarse=1 + seed % 3)
    sizes = np.diff(s._starts)
    movable = sizes == s.coarse
    tight = 0
    for R in (4, 8):
        home = _home(s.num_blocks, R)[s._starts[:-1]]
        caps = np.bincount(home[movable], minlength=R).tolist()
        g = sorted(rng.choice(8, 3, replace=False).tolist())
        A = _summary_group_sum(s, g)
        starts = [np.where(movable, 0, home), None]
        starts[0][movable] = _round_robin(caps)
        starts[1] = _biased_greedy(A.sum(1), home, caps, 0.0, movable)

        def sent(owner):
            return np.bincount(home[owner != home], weights=sizes[owner != home], minlength=R)

        for qo in starts:
            ko = starts[0] if qo is starts[1] else _biased_greedy(A.sum(0), home, caps, 0.0, movable)
            exact = int(sent(qo).max() + sent(ko).max())
            assert _fewest_sent(sent(qo), sent(ko), 0, s.coarse) == exact
            for swaps in (1, 3, 8, 32):
                q2, k2, _ = _refine(A, A.astype(np.float64), qo, ko, home, R, target=1.0, max_swaps=swaps, movable=movable)
                left = int(sent(q2).max() + sent(k2).max())
                bound = _fewest_sent(sent(qo), sent(ko), swaps, s.coarse)
                assert bound <= left, (R, swaps, bound, left)
                tight += bound > exact - swaps * s.coarse  # above the one-unit-per-swap bound it replaced
    assert tight > 0, "the bound is never above the simpler one: it is not exercised"


def test_early_stop_bound_is_below_every_moved_plan():
    """What the early stop relies on: a plan of a group set that moves blocks is predicted no
    faster than the all-to-all + the set's ring-time bound + the exchange of the blocks it moves
    (counted here from the plan's owners, by loops)."""
    import dbsp.plan.degrees as P

    seen = 0
    for seed in range(6):
        cost, s = _random_model_and_summary(seed)
        for c in score_degrees(s, world=8, cost_model=cost):
            plan = c.plan
            owners = [plan.block_owner(kind).numpy() for kind in ("q", "kv")]
            sent = 0
            for k in range(plan.ulysses):
                out = 0
                for owner in owners:
                    per_home = [0] * plan.ring
                    for b in range(plan.num_blocks):
                        if owner[k, b] != plan.home(b):
                            per_home[plan.home(b)] += 1
                    out += max(per_home)
                sent = max(sent, 2 * out * plan.heads_per_rank[k])
            if sent == 0:
                continue
            parts = {}
            P._summary_bound_ms(cost, s, c.ulysses, c.ring, reward=2.0, uneven_heads=False, balance=True, head_dim=128,
                                element_bytes=2, parts=parts)
            bound = parts["a2a"] + min(parts["ring"][1:]) + 2 * parts["lat"] + sent * parts["block_ms"]
            assert bound <= c.prediction.total_ms * (1 + 1e-9), (seed, c.ulysses, bound, c.prediction.total_ms)
            seen += 1
    assert seen > 0


def test_degree_choice_pruning_skips_hopeless_candidates(monkeypatch):
    """With slow links every ring candidate's transfers alone exceed Ulysses' time: only U8R1 is planned."""
    import dbsp.plan.degrees as P

    calls = []
    real = P._score_pair
    monkeypatch.setattr(P, "_score_pair", lambda w, u, r, *a, **k: calls.append((u, r)) or real(w, u, r, *a, **k))
    work = random_work(8, 32, seed=1)
    slow = model(nvlink_gbps=1.0)
    u, r, _ = choose_degrees(work, world=8, heads=8, q_block=64, seq_len=2048, cost_model=slow)
    assert (u, r) == (8, 1) and calls == [(8, 1)]
    calls.clear()
    score_degrees(work, world=8, q_block=64, seq_len=2048, cost_model=slow)
    assert sorted(calls) == [(1, 8), (2, 4), (4, 2), (8, 1)]


# ---------------------------------------------------------------------------- determinism


def _plan_in_process(rank, world):
    work = synthetic_work(heads=12, seq_len=9000, frames=7, seed=11)
    plans = [make_plan(work, ulysses=u, ring=r, q_block=64, seq_len=9000) for u, r in ((2, 4), (1, 8), (4, 2))]
    summary = summarize_work(work, q_block=64, seq_len=9000)
    plans += [make_plan(summary, ulysses=u, ring=r) for u, r in ((2, 4), (1, 8))]
    u, r, chosen = choose_degrees(work, world=8, heads=12, q_block=64, seq_len=9000)
    return [p.fingerprint() for p in plans] + [chosen.fingerprint(), f"{u}x{r}"], [p.imbalance() for p in plans]


def test_identical_plans_and_fingerprints_across_processes():
    here = _plan_in_process(0, 1)
    there = run_distributed(_plan_in_process, 2, timeout=180)
    assert there[0] == there[1] == here


# ---------------------------------------------------------------------------- the plan command


def test_plan_command_prints_before_and_after(tmp_path, capsys):
    tiles = synthetic_tiles(heads=8, seq_len=3000, frames=5, seed=9)
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=64, seq_len_q=3000, seq_len_kv=3000)
    path = tmp_path / "mask.pt"
    torch.save({f: getattr(mask, f) for f in ("offsets", "indices", "q_block", "kv_tile", "seq_len_q", "seq_len_kv")}, path)
    parser = argparse.ArgumentParser()
    plan_cli.add_cli_arguments(parser)
    assert plan_cli.run_cli(parser.parse_args(["--mask", str(path), "--ulysses", "2", "--ring", "4"])) == 0
    out = capsys.readouterr().out
    rho_before = imbalance_ratio(mask, ulysses=2, ring=4)
    rho_after = make_plan(mask, ulysses=2, ring=4).imbalance()
    assert f"before (contiguous heads and blocks): rho_s = {rho_before:.4f}" in out
    assert f"after (db-SP, R_b = 2): rho_s = {rho_after:.4f}" in out
    assert out.count("\n    7   1    3 ") == 2  # both tables list the last rank
    torch.save(mask.work(), path)
    args = parser.parse_args(["--mask", str(path), "--ulysses", "4", "--ring", "2", "--q-block", "64", "--seq-len", "3000"])
    assert plan_cli.run_cli(args) == 0
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="expected a work tensor"):
        plan_cli.run_cli(parser.parse_args(["--mask", str(path), "--ulysses", "2", "--ring", "4"]))


# ---------------------------------------------------------------------------- the device path


def _torch_work(work, q_block, seq_len):
    """The planner's input as the device path sees it (cells stay a torch tensor), on CPU."""
    from dbsp.plan.core import _as_work, _Work

    w = _as_work(work, q_block=q_block, seq_len=seq_len)
    return _Work(work[0] if work.shape[0] == 1 else work.sum(0, dtype=torch.int64), q_block, seq_len, None, work.shape[0], w.cell_max)


@pytest.mark.parametrize("U,R,B", [(2, 4, 1), (1, 3, 2), (4, 1, 1), (1, 20, 1)])
def test_device_code_path_matches_the_numpy_path(U, R, B):
    from dbsp.plan.balance import _plan_from
    from dbsp.plan.core import _as_work, _tile_work

    work = torch.cat([synthetic_work(heads=8, seq_len=2600, frames=4, seed=s) for s in range(B)])
    host = _as_work(work, q_block=64, seq_len=2600)
    dev = _torch_work(work, 64, 2600)
    a = _plan_from(host, ulysses=U, ring=R)
    b = _plan_from(dev, ulysses=U, ring=R)
    assert a == b and torch.equal(a.tile_work, b.tile_work)
    assert np.array_equal(_tile_work(dev, a), _tile_work(host, a)) and torch.equal(torch.from_numpy(_tile_work(host, a)), brute_tiles(work, a))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plans_from_gpu_work_equal_cpu_plans():
    work = synthetic_work(heads=40, seq_len=20_000, frames=21, seed=0)
    for U, R in FACTORISATIONS_8:
        cpu = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=20_000)
        gpu = make_plan(work.cuda(), ulysses=U, ring=R, q_block=64, seq_len=20_000)
        assert cpu == gpu and torch.equal(cpu.tile_work, gpu.tile_work)
        assert torch.equal(tile_work(work.cuda(), cpu), cpu.tile_work)


# ---------------------------------------------------------------------------- work summaries


def brute_pooled(work, starts):
    """``(H, NU, NU)`` by explicit sums of the work tensor over unit pairs."""
    a = work.sum(0).to(torch.int64)
    nu = len(starts) - 1
    out = torch.zeros(a.shape[0], nu, nu, dtype=torch.int64)
    for x in range(nu):
        for y in range(nu):
            out[:, x, y] = a[:, starts[x] : starts[x + 1], starts[y] : starts[y + 1]].sum((1, 2))
    return out


def unit_constant(plan, starts):
    """True when no query or key unit is split between ring ranks in any head group."""
    owners = torch.cat([plan.block_owner("q"), plan.block_owner("kv")])  # (2U, NB)
    return all(bool((owners[:, lo:hi] == owners[:, lo : lo + 1]).all()) for lo, hi in zip(starts, starts[1:]))


@pytest.mark.parametrize("S,ring,coarse,B", [(2600, 4, 3, 1), (3001, 8, 2, 2), (1000, 2, 1, 1), (4100, 3, 5, 1)])
def test_summary_of_a_mask_equals_summary_of_its_work_and_the_brute_sums(S, ring, coarse, B):
    tiles = torch.cat([synthetic_tiles(heads=4, seq_len=S, frames=4, seed=s) for s in range(B)])
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=64, seq_len_q=S, seq_len_kv=S)
    work = mask.work()
    a = summarize_work(mask, ring=ring, coarse=coarse)
    b = summarize_work(work, ring=ring, coarse=coarse, q_block=64, seq_len=S)
    c = summarize_work(_torch_work(work, 64, S), ring=ring, coarse=coarse)  # the device path, on CPU
    starts = list(a.unit_bounds)
    assert starts == list(b.unit_bounds) and starts[0] == 0 and starts[-1] == -(-S // 64)
    assert max(np.diff(starts)) == coarse and all(np.diff(starts) >= 1)
    expected = brute_pooled(work, starts)
    for s in (a, b, c):
        assert torch.equal(s.pooled.to(torch.int64), expected) and (s.heads, s.batch) == (4, B)
    # A GPU mask is pooled straight from its entries (_pool_mask); run that path here too.
    nb, nu = -(-S // 64), len(starts) - 1
    chunk = np.searchsorted(_home(nb, ring)[starts[:-1]], np.arange(ring + 1)).tolist()  # home chunks in units, by hand
    pooled, totals, extras = _pool_mask(mask, torch.from_numpy(np.repeat(np.arange(nu), np.diff(starts))), nu, chunk)
    assert torch.equal(pooled, expected) and np.array_equal(totals, a._head_totals)
    assert all(np.array_equal(x, y) for x, y in zip(extras, (*a._unit_marginals, a._ring_tiles, a._all_heads)))
    for s in (a, b, c):  # the presets equal what the summary would compute from its cells, read-only
        assert np.array_equal(s._all_heads, expected.sum(0).numpy()) and not s._all_heads.flags.writeable
        assert np.array_equal(s._all_heads, WorkSummary._all_heads.func(s))
    assert a.kv_tile == 64 and b.kv_tile is None and "WorkSummary(H=4" in repr(a)
    # A fine-grained mask summarises to its computed entries: 64x8 tiles, the same keys.
    fine = SparseMask.from_dense(tiles.repeat_interleave(8, -1)[..., : -(-S // 8)], q_block=64, kv_tile=8, seq_len_q=S, seq_len_kv=S)
    assert torch.equal(summarize_work(fine, ring=ring, coarse=coarse).pooled, a.pooled)


@pytest.mark.parametrize("U,R,H,S,coarse,ring", [(2, 4, 8, 4000, 3, 8), (4, 2, 12, 3001, 4, 8), (1, 8, 4, 5000, 2, 8),
                                                 (8, 1, 16, 999, 1, 8), (2, 2, 6, 2100, 5, 2), (1, 3, 4, 2500, 2, 6)])
def test_summary_tiles_and_rho_are_exact_and_its_plans_valid(U, R, H, S, coarse, ring):
    nb = -(-S // 64)
    for seed in range(2):
        work = random_work(H, nb, seed=seed)
        s = summarize_work(work, coarse=coarse, ring=ring, q_block=64, seq_len=S)
        identity = Plan.identity(ulysses=U, ring=R, heads=H, q_block=64, seq_len=S)
        assert torch.equal(tile_work(s, identity), brute_tiles(work, identity))
        naive = imbalance_ratio(s, ulysses=U, ring=R)
        assert naive == imbalance_ratio(work, ulysses=U, ring=R, q_block=64, seq_len=S)
        plan = make_plan(s, ulysses=U, ring=R, world=U * R)
        Plan(**plan._layout())  # the validating constructor accepts it
        assert unit_constant(plan, list(s.unit_bounds))
        assert torch.equal(plan.tile_work, brute_tiles(work, plan)) and torch.equal(tile_work(s, plan), plan.tile_work)
        assert plan.imbalance() == pytest.approx(brute_rho(work, plan), rel=1e-12)
        assert 1.0 <= plan.imbalance() <= naive  # never worse than unplanned, on the exact objective
        again = make_plan(summarize_work(work.clone(), coarse=coarse, ring=ring, q_block=64, seq_len=S), ulysses=U, ring=R)
        assert again == plan and again.fingerprint() == plan.fingerprint()


def test_summary_with_single_block_units_plans_like_the_work_tensor():
    work = synthetic_work(heads=8, seq_len=5000, frames=5, seed=2)
    s = summarize_work(work, coarse=1, q_block=64, seq_len=5000)
    for U, R in FACTORISATIONS_8[1:]:
        for kw in ({}, {"reward": 0.0}, {"per_group_blocks": False}):
            a = make_plan(s, ulysses=U, ring=R, **kw)
            b = make_plan(work, ulysses=U, ring=R, q_block=64, seq_len=5000, **kw)
            assert a == b and torch.equal(a.tile_work, b.tile_work)
    kw = dict(world=8, cost_model=model())
    assert choose_degrees(s, heads=8, **kw) == choose_degrees(work, heads=8, q_block=64, seq_len=5000, **kw)


@pytest.mark.parametrize("kinds", [KINDS, ("window",), ("hotspot",), ("sink", "dense"), ("temporal",)], ids=lambda k: "+".join(k) if len(k) < 5 else "mix")
def test_summary_plans_reach_target_rho_on_every_factorisation_of_8(kinds):
    """Target 1 from summaries (default coarse, 4 blocks per unit here), judged on the full work."""
    work = synthetic_work(heads=40, seq_len=40_000, frames=21, seed=0, kinds=kinds)
    s = summarize_work(work, q_block=64, seq_len=40_000)
    assert s.coarse == 4
    for U, R in FACTORISATIONS_8:
        plan = make_plan(s, ulysses=U, ring=R)
        exact = imbalance_ratio(work, ulysses=U, ring=R, plan=plan)
        assert exact == plan.imbalance() and exact <= 1.05, (kinds, U, R, exact)


def test_plan_cache_with_summaries_hits_and_misses_like_tensors():
    kw = dict(heads=8, seq_len=6400, frames=10, seed=7, kinds=("hotspot", "dense", "sink"))
    by_work, by_summary, by_units = PlanCache(), PlanCache(), PlanCache()
    for step in range(12):
        work = synthetic_work(step=step, drift=0.01, **kw)
        a = by_work.get(0, work, ulysses=2, ring=4, q_block=64, seq_len=6400)
        b = by_summary.get(0, summarize_work(work, coarse=1, q_block=64, seq_len=6400), ulysses=2, ring=4)
        assert a == b and by_work.last_imbalance == by_summary.last_imbalance
        s = summarize_work(work, coarse=3, q_block=64, seq_len=6400)
        c = by_units.get(0, s, ulysses=2, ring=4)
        assert by_units.last_imbalance == imbalance_ratio(work, ulysses=2, ring=4, plan=c)  # the check is exact
    assert (by_work.hits, by_work.misses) == (by_summary.hits, by_summary.misses)
    assert by_work.misses >= 2 and by_work.hits >= 6 and by_units.misses >= 2 and by_units.hits >= 6
    # Another kind of input, or other units, is a miss: the cached plan may split the new units.
    by_units.get(0, work, ulysses=2, ring=4, q_block=64, seq_len=6400)
    by_units.get(0, summarize_work(work, coarse=2, q_block=64, seq_len=6400), ulysses=2, ring=4)
    assert by_units.misses == 12 - by_units.hits + 2
    chooser = PlanCache(cost_model=model())
    p1 = chooser.get(1, s, world=8)
    assert chooser.get(1, s, world=8) is p1 and (chooser.hits, chooser.misses) == (1, 1)


def test_summary_bad_inputs_get_clear_errors():
    work = random_work(4, 20, seed=0)  # 20 blocks
    kw = dict(q_block=64, seq_len=1280)
    with pytest.raises(ValueError, match=r"coarse=3 is too large: the units must fit in the smallest home chunk of ring=8 \(2 blocks of num_blocks=20\); use coarse <= 2"):
        summarize_work(work, coarse=3, **kw)
    with pytest.raises(ValueError, match="coarse must be >= 1"):
        summarize_work(work, coarse=0, **kw)
    with pytest.raises(ValueError, match="ring=32 exceeds the number of blocks 20"):
        summarize_work(work, ring=32, **kw)
    with pytest.raises(TypeError, match="needs q_block= and seq_len="):
        summarize_work(work)
    with pytest.raises(ValueError, match=r"ceil\(2000 / 64\) = 32; got \(1, 4, 20, 20\)"):
        summarize_work(work, q_block=64, seq_len=2000)
    s = summarize_work(work, ring=4, coarse=2, **kw)
    with pytest.raises(TypeError, match="already a WorkSummary"):
        summarize_work(s)
    with pytest.raises(ValueError, match=r"ring=8 does not fit the summary: its home chunks start at blocks .* \(summary built for ring=4, coarse=2\)"):
        make_plan(s, ulysses=1, ring=8)
    with pytest.raises(ValueError, match="ring=7 does not fit the summary"):
        imbalance_ratio(s, ulysses=1, ring=7)  # chunks from blocks 0, 3, 6, ...; units from 0, 2, 4, 5, ...
    assert imbalance_ratio(s, ulysses=1, ring=3) == imbalance_ratio(work, ulysses=1, ring=3, **kw)  # 0, 7, 14 fit
    with pytest.raises(ValueError, match="seq_len=1300 disagrees with the summary's seq_len=1280"):
        make_plan(s, ulysses=2, ring=2, seq_len=1300)
    split = make_plan(work, ulysses=1, ring=4, reward=0.0, **kw)  # block-level moves split units
    assert not unit_constant(split, list(s.unit_bounds))
    with pytest.raises(ValueError, match="the plan splits a summary unit of 2 blocks"):
        tile_work(s, split)
    with pytest.raises(ValueError, match=r"work is for heads=4, .* but the plan is for heads=8"):
        tile_work(s, Plan.identity(ulysses=2, ring=2, heads=8, q_block=64, seq_len=1280))
    good = dict(q_block=64, seq_len=1280, coarse=2, ring=4)
    with pytest.raises(ValueError, match=r"pooled must have shape \(H, NU, NU\) with NU = 12 units .* got \(4, 11, 11\)"):
        WorkSummary(s.pooled[:, :11, :11], **good)
    with pytest.raises(TypeError, match="pooled must be an int32 or int64 tensor"):
        WorkSummary(s.pooled.float(), **good)
    with pytest.raises(ValueError, match="non-negative"):
        WorkSummary(-s.pooled - 1, **good)
    with pytest.raises(ValueError, match="coarse=6 is too large"):
        WorkSummary(s.pooled, **{**good, "coarse": 6})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_summaries_built_on_the_gpu_equal_cpu_summaries():
    """summarize_work pools where the input lives (index_add_ on CUDA): same numbers as on the CPU."""
    from dbsp.plan import summarize_work

    gen = torch.Generator().manual_seed(5)
    for kv_tile in (64, 1):
        dense = torch.rand(1, 6, 90, 5760 // kv_tile, generator=gen) < 0.3
        mask = SparseMask.from_dense(dense, q_block=64, kv_tile=kv_tile, seq_len_q=5760, seq_len_kv=5760)
        cpu = summarize_work(mask, coarse=4, ring=8)
        gpu = summarize_work(mask.to("cuda"), coarse=4, ring=8)
        assert torch.equal(torch.as_tensor(cpu.pooled), torch.as_tensor(gpu.pooled).cpu())
        work_gpu = summarize_work(mask.work().cuda(), coarse=4, ring=8, q_block=64, seq_len=5760)
        assert torch.equal(torch.as_tensor(cpu.pooled), torch.as_tensor(work_gpu.pooled).cpu())


@pytest.mark.parametrize("request_kw", [dict(ulysses=4, ring=2), dict(world=8)])
def test_deferred_plan_cache_makes_the_same_decisions_one_call_later(request_kw):
    """defer=True: call t returns what the synchronous cache returned at call t - 1 (the first call
    the unbalanced layout), with the same hit/miss decisions."""
    geom = dict(heads=40, seq_len=12_000, frames=21)
    sync, deferred = PlanCache(), PlanCache(defer=True)
    got_sync, got_deferred = [], []
    for step in range(12):
        work = synthetic_work(**geom, seed=1, step=3 * step)  # drifts fast enough to re-plan
        got_sync.append(sync.get("layer", work, q_block=64, seq_len=12_000, **request_kw))
        got_deferred.append(deferred.get("layer", work, q_block=64, seq_len=12_000, **request_kw))
    assert sync.misses > 1  # the drift forced re-plans
    first = got_deferred[0]
    U, R = (4, 2) if "ulysses" in request_kw else (8, 1)  # world=8: the largest Ulysses degree
    assert (first.ulysses, first.ring) == (U, R)
    assert first.fingerprint() == Plan.identity(ulysses=U, ring=R, heads=40, q_block=64, seq_len=12_000).fingerprint()
    assert [p.fingerprint() for p in got_deferred[1:]] == [p.fingerprint() for p in got_sync[:-1]]
    deferred.clear()  # waits for the last decision
    assert (deferred.hits, deferred.misses) == (0, 0) and len(deferred) == 0


def test_deferred_plan_cache_reports_background_errors_at_the_next_call():
    cache = PlanCache(defer=True)
    work = synthetic_work(heads=4, seq_len=4_000, frames=4, seed=0)
    kw = dict(ulysses=2, ring=2, q_block=64, seq_len=4_000)
    cache.get(0, work, **kw)

    def fails(*args):
        raise RuntimeError("planner failed in the background")

    cache._decide = fails
    cache.get(0, work, **kw)  # hands the (failing) decision to the background thread
    with pytest.raises(RuntimeError, match="planner failed in the background"):
        cache.get(0, work, **kw)  # the next call waits for it and re-raises its error
    with pytest.raises(TypeError, match="defer must be True or False"):
        PlanCache(defer=1)


# ---------------------------------------------------------------------------- fast reuse check, repairs

from dbsp.plan.cache import _Check, _head_rho, _repair, _swap_heads, _swap_rows  # noqa: E402


def random_unit_plan(summary, U, R, *, seed, uneven=False):
    """A random plan that moves whole units of ``summary``: heads shuffled into groups, and per
    group the movable (full) units' query and key owners shuffled among the ring ranks."""
    rng = np.random.default_rng(seed)
    H, nb = summary.heads, summary.num_blocks
    starts = np.asarray(summary.unit_bounds)
    sizes = np.diff(starts)
    home = _home(nb, R)[starts[:-1]]
    movable = np.nonzero(sizes == summary.coarse)[0]
    counts = [H // U + (k < H % U) for k in range(U)] if uneven else [H // U] * U
    perm = rng.permutation(H)
    owners = []
    for _ in range(2):
        per_group = []
        for _ in range(U):
            o = home.copy()
            o[movable] = rng.permutation(home[movable])
            per_group.append(np.repeat(o, sizes))
        owners.append(per_group)
    lists = [tuple(tuple(int(b) for b in np.nonzero(o == i)[0]) for i in range(R)) for o in owners[0]], \
            [tuple(tuple(int(b) for b in np.nonzero(o == i)[0]) for i in range(R)) for o in owners[1]]
    return Plan(ulysses=U, ring=R, heads=H, q_block=summary.q_block, seq_len=summary.seq_len,
                head_perm=tuple(int(h) for h in perm), head_offsets=tuple(int(x) for x in np.cumsum([0] + counts)),
                q_blocks=tuple(lists[0]), kv_blocks=tuple(lists[1]))


@pytest.mark.parametrize("seed", range(6))
def test_fast_check_equals_the_slow_check_exactly_on_random_summaries_and_plans(seed):
    """_Check (built once per plan) gives the very same tiles and rho_s as tile_work and
    imbalance_ratio on the dense work (the slow path) for summaries it was not built from."""
    rng = np.random.default_rng(seed)
    H, nb = int(rng.integers(3, 9)), int(rng.integers(24, 60))
    ring, coarse = [(8, 2), (4, 3), (2, 1), (8, 1), (4, 2), (2, 4)][seed]
    works = [random_work(H, nb, seed=100 * seed + t) for t in range(3)]
    kw = dict(q_block=64, seq_len=nb * 64 - int(rng.integers(0, 40)))
    summaries = [summarize_work(w, ring=ring, coarse=coarse, **kw) for w in works]
    degrees = [(U, R) for U in range(1, H + 1) for R in (1, 2, ring) if R <= ring and ring % R == 0]
    for n, (U, R) in enumerate(degrees):
        uneven = H % U != 0
        plans = [random_unit_plan(summaries[0], U, R, seed=seed * 100 + n, uneven=uneven)]
        if not uneven:
            plans.append(make_plan(summaries[0], ulysses=U, ring=R))
        for plan in plans:
            check = _Check(plan, summaries[0])
            for work, s in zip(works, summaries):
                assert torch.equal(torch.from_numpy(check.tiles(s)), brute_tiles(work, plan))
                slow = imbalance_ratio(work, ulysses=U, ring=R, plan=plan, **kw)
                assert check.rho(s) == slow == imbalance_ratio(s, ulysses=U, ring=R, plan=plan)
    other = summarize_work(works[0], ring=ring, coarse=max(1, coarse - 1) if coarse > 1 else 2, **kw)
    with pytest.raises(ValueError, match="units or heads differ"):
        _Check(make_plan(summaries[0], ulysses=1, ring=2), summaries[0]).tiles(other)


def test_fast_check_on_empty_work_and_int64_summaries():
    s = summarize_work(torch.zeros(1, 4, 16, 16, dtype=torch.int32), ring=4, coarse=2, q_block=64, seq_len=1024)
    plan = make_plan(s, ulysses=2, ring=4)
    assert _Check(plan, s).rho(s) == 1.0 == imbalance_ratio(s, ulysses=2, ring=4, plan=plan)
    big = random_work(4, 16, seed=3).to(torch.int64) * 2**20  # sums need int64
    s64 = summarize_work(big, ring=4, coarse=2, q_block=64, seq_len=1024)
    assert s64.pooled.dtype == torch.int64
    plan = random_unit_plan(s64, 2, 4, seed=1)
    assert _Check(plan, s64).rho(s64) == brute_rho(big, plan)


def swap_local_optimum(totals, groups):
    """True when no head of the heaviest group can swap with a lighter head of another group so
    that both end below the heaviest load (the stopping rule of _swap_heads, by brute force)."""
    load = [sum(totals[h] for h in g) for g in groups]
    a = max(range(len(groups)), key=lambda k: (load[k], -k))
    for b, g in enumerate(groups):
        for x in groups[a]:
            for y in g if b != a else []:
                d = totals[x] - totals[y]
                if d > 0 and max(load[a] - d, load[b] + d) < load[a]:
                    return False
    return True


@pytest.mark.parametrize("seed", range(20))
def test_swap_heads_keeps_counts_never_raises_the_peak_and_ends_at_a_local_optimum(seed):
    rng = np.random.default_rng(seed)
    H = int(rng.integers(2, 41))
    U = int(rng.integers(1, H + 1))
    counts = [H // U + (k < H % U) for k in range(U)]
    perm = rng.permutation(H).tolist()
    groups = [perm[sum(counts[:k]) : sum(counts[: k + 1])] for k in range(U)]
    totals = rng.integers(0, 10**9, H) * (rng.random(H) < 0.9)
    out = _swap_heads(totals, groups)
    assert sorted(len(g) for g in out) == sorted(counts) and [len(g) for g in out] == [len(g) for g in groups]
    assert sorted(h for g in out for h in g) == list(range(H)) and all(g == sorted(g) for g in out)
    peak = lambda gs: max(int(totals[g].sum()) for g in gs)  # noqa: E731
    assert peak(out) <= peak(groups)
    assert swap_local_optimum(totals.tolist(), out)
    assert _swap_heads(totals, groups) == out  # deterministic


def test_repair_gives_valid_plans_no_worse_than_the_cached_one():
    geom = dict(heads=40, seq_len=12_000, frames=21, seed=2)
    kw = dict(q_block=64, seq_len=12_000)
    first = summarize_work(synthetic_work(**geom, step=0), **kw)
    plan = make_plan(first, ulysses=8, ring=1)
    repaired = 0
    for step in (5, 15, 30):
        work = synthetic_work(**geom, step=step)
        s = summarize_work(work, **kw)
        old = imbalance_ratio(work, ulysses=8, ring=1, plan=plan, **kw)
        new = _repair(s, plan, target=old)  # any target at or above the old rho_s is reachable
        assert new is not None
        Plan(**new._layout()).validate()
        assert new.heads_per_rank == plan.heads_per_rank and (new.ulysses, new.ring) == (8, 1)
        exact = imbalance_ratio(work, ulysses=8, ring=1, plan=new, **kw)
        assert exact == new.imbalance() and exact <= old
        assert torch.equal(new.tile_work, brute_tiles(work, new))
        repaired += exact < old
        plan = new
    assert repaired >= 2
    assert _repair(s, plan, target=1.0) is None or _repair(s, plan, target=1.0).imbalance() == 1.0
    assert _repair(s, make_plan(s, ulysses=4, ring=2), target=2.0) is None  # rings > 1 are not repaired


def test_repair_equals_the_plan_built_from_its_groups_with_dense_heads_first():
    """A repaired plan (built from the cached layout, its rho_s and owner arrays seeded) is the
    plan _build_plan makes from the same swapped groups, ordered by _dense_first: same layout,
    tiles, rho_s and owners; a repair that misses the target is None."""
    from dbsp.plan.balance import _build_plan, _dense_first
    from dbsp.plan.core import _full_heads, _rho

    kw = dict(q_block=64, seq_len=4096)
    mixed = moved = 0
    for seed in range(4):
        work = synthetic_work(heads=12, seq_len=4096, frames=8, seed=seed, step=0).clone()
        work[0, seed] = 64 * 64  # one dense head: _dense_first moves it to the front of its group
        later = synthetic_work(heads=12, seq_len=4096, frames=8, seed=seed, step=20)
        later[0, seed] = 64 * 64
        s0, s1 = summarize_work(work, **kw), summarize_work(later, **kw)
        built = make_plan(s0, ulysses=4, ring=1)
        unseeded = Plan(**built._layout())  # validated: no owner arrays to share
        for plan in (built, unseeded):
            new = _repair(s1, plan, target=2.0)
            totals = s1._head_totals
            groups = _dense_first(_swap_heads(totals, [list(plan.head_group(k)) for k in range(4)]), _full_heads(s1, totals))
            owner = np.zeros((4, plan.num_blocks), dtype=np.int64)
            W = np.array([totals[g].sum() for g in groups], dtype=np.int64).reshape(4, 1, 1)
            ref = _build_plan(ulysses=4, ring=1, heads=12, q_block=64, seq_len=4096, groups=groups, counts=[3] * 4,
                              q_owner=owner, kv_owner=owner, tile_work=W)
            assert new == ref and new.fingerprint() == ref.fingerprint()
            assert torch.equal(new.tile_work, ref.tile_work) and new.tile_work.dtype == torch.int64
            assert new.imbalance() == _rho(ref.tile_work) == imbalance_ratio(later, ulysses=4, ring=1, plan=new, **kw)
            fresh = Plan(**new._layout())  # owners rebuilt from the block tuples
            assert all(np.array_equal(a, b) for a, b in zip(new._owners, fresh._owners))
            dense = _full_heads(s1, totals)
            assert dense[seed] and not dense.all()
            for k in range(4):  # dense heads first, ids ascending within each kind
                g = new.head_group(k)
                assert list(g) == sorted(g, key=lambda h: (not dense[h], h))
                mixed += 0 < dense[list(g)].sum() < len(g)
            moved += new.head_perm != plan.head_perm
            assert _repair(s1, plan, target=new.imbalance() - 1e-9) is None
    assert mixed >= 4 and moved >= 4  # reordered groups and real swaps were compared


def test_swap_rows_returns_the_loads_of_its_groups_and_the_rows_of_swap_heads():
    rng = np.random.default_rng(5)
    for _ in range(200):
        H = int(rng.integers(1, 30))
        U = int(rng.integers(1, min(H, 8) + 1))
        counts = [H // U + (k < H % U) for k in range(U)]
        totals = rng.integers(0, int(rng.choice([4, 10**10])), H)
        perm = rng.permutation(H).tolist()
        groups = [sorted(perm[sum(counts[:k]) : sum(counts[: k + 1])]) for k in range(U)]
        rows = [list(g) for g in groups]
        loads = _swap_rows(totals.tolist(), rows)
        assert rows == _swap_heads(totals, groups)
        assert loads == [int(totals[g].sum()) for g in rows]


def test_head_rho_and_the_r1_check_equal_the_tile_formula():
    from dbsp.plan.core import _rho

    rng = np.random.default_rng(7)
    for _ in range(100):
        U = int(rng.integers(1, 9))
        loads = rng.integers(0, int(rng.choice([3, 10**12])), U) * (rng.random() < 0.9)
        assert _head_rho(loads.tolist()) == _rho(loads.reshape(U, 1, 1).astype(np.int64))
    s0 = summarize_work(random_work(6, 32, seed=1), ring=4, coarse=2, q_block=64, seq_len=2048)
    s1 = summarize_work(random_work(6, 32, seed=2), ring=4, coarse=2, q_block=64, seq_len=2048)
    other = summarize_work(random_work(6, 32, seed=2), ring=4, coarse=4, q_block=64, seq_len=2048)
    for U, R in ((3, 1), (2, 4)):
        check = _Check(make_plan(s0, ulysses=U, ring=R), s0)
        assert check.rho(s1) == check.rho(s1, same_units=True) == imbalance_ratio(s1, ulysses=U, ring=R, plan=make_plan(s0, ulysses=U, ring=R))
        with pytest.raises(ValueError, match="units or heads differ"):
            check.rho(other)
    same_bounds = summarize_work(random_work(6, 32, seed=2), ring=2, coarse=2, q_block=64, seq_len=2048)
    assert same_bounds.unit_bounds == s0.unit_bounds  # other (ring, coarse), the same units: no error
    assert _Check(make_plan(s0, ulysses=3, ring=1), s0).rho(same_bounds) == imbalance_ratio(same_bounds, ulysses=3, ring=1, plan=make_plan(s0, ulysses=3, ring=1))


@pytest.mark.parametrize("degrees", [dict(ulysses=8, ring=1), dict(ulysses=2, ring=4), dict(world=8)])
def test_plan_cache_fast_check_makes_the_same_decisions_as_the_slow_check(degrees):
    geom = dict(heads=40, seq_len=12_000, frames=21, seed=1)
    fast, slow = PlanCache(), PlanCache(fast_check=False)
    for step in range(0, 36, 3):
        s = summarize_work(synthetic_work(**geom, step=step), q_block=64, seq_len=12_000)
        a, b = fast.get(0, s, **degrees), slow.get(0, s, **degrees)
        assert a.fingerprint() == b.fingerprint() and fast.last_imbalance == slow.last_imbalance
    assert (fast.hits, fast.misses) == (slow.hits, slow.misses) and fast.hits >= 2 and fast.misses >= 2
    assert fast.decide_cpu_ms > 0 and slow.decide_ms > 0


@pytest.mark.parametrize("degrees", [dict(ulysses=8, ring=1), dict(world=8), dict(ulysses=4, ring=2)])
def test_incremental_plan_cache_repairs_head_plans_and_keeps_them_exact(degrees):
    geom = dict(heads=40, seq_len=12_000, frames=21, seed=1)
    kw = dict(q_block=64, seq_len=12_000)
    cache, full = PlanCache(incremental=True), PlanCache()
    for step in range(0, 40, 2):
        work = synthetic_work(**geom, step=step)
        s = summarize_work(work, **kw)
        plan = cache.get(0, s, **degrees)
        full.get(0, s, **degrees)
        Plan(**plan._layout()).validate()
        exact = imbalance_ratio(work, ulysses=plan.ulysses, ring=plan.ring, plan=plan, **kw)
        assert cache.last_imbalance == exact <= 1.05
    if degrees.get("ring", 1) == 1:  # world=8 chooses U8R1 here
        assert cache.repairs >= 2 and cache.misses < full.misses + cache.repairs
    else:
        assert cache.repairs == 0 and (cache.hits, cache.misses) == (full.hits, full.misses)
    cache.clear()
    assert (cache.hits, cache.misses, cache.repairs, cache.decide_cpu_ms) == (0, 0, 0, 0.0)
    with pytest.raises(TypeError, match="incremental must be True or False"):
        PlanCache(incremental=1)
    with pytest.raises(TypeError, match="fast_check must be True or False"):
        PlanCache(fast_check="yes")


def test_deferred_incremental_plan_cache_makes_the_synchronous_decisions_one_call_later():
    geom = dict(heads=40, seq_len=12_000, frames=21, seed=1)
    sync, deferred = PlanCache(incremental=True), PlanCache(incremental=True, defer=True)
    got_sync, got_deferred = [], []
    for step in range(0, 36, 3):
        s = summarize_work(synthetic_work(**geom, step=step), q_block=64, seq_len=12_000)
        got_sync.append(sync.get(0, s, world=8))
        got_deferred.append(deferred.get(0, s, world=8))
    assert sync.repairs >= 1
    assert [p.fingerprint() for p in got_deferred[1:]] == [p.fingerprint() for p in got_sync[:-1]]
    deferred.clear()


def test_deferred_cache_checks_head_plans_on_the_callers_thread():
    """At R = 1 a deferred hit is decided in get (no background task); misses still go to the
    background and come back one call late."""
    geom = dict(heads=40, seq_len=12_000, frames=21, seed=1)
    s0 = summarize_work(synthetic_work(**geom, step=0), q_block=64, seq_len=12_000)
    s1 = summarize_work(synthetic_work(**geom, step=30), q_block=64, seq_len=12_000)
    cache = PlanCache(defer=True, incremental=True)
    unbalanced = cache.get(0, s0, ulysses=8, ring=1)
    assert unbalanced.fingerprint() == Plan.identity(ulysses=8, ring=1, heads=40, q_block=64, seq_len=12_000).fingerprint()
    assert torch.equal(unbalanced.tile_work, tile_work(s0, unbalanced))
    planned = cache.get(0, s0, ulysses=8, ring=1)  # the decision of the first call: a new plan
    assert planned == make_plan(s0, ulysses=8, ring=1)
    assert 0 not in cache._pending and (cache.hits, cache.misses) == (1, 1)  # this call's check: a hit, made here
    assert cache.get(0, s0, ulysses=8, ring=1) is planned and 0 not in cache._pending and cache.hits == 2
    rho = imbalance_ratio(s1, ulysses=8, ring=1, plan=planned)
    assert rho > 1.05 and cache.get(0, s1, ulysses=8, ring=1) is planned and 0 in cache._pending  # a miss: background
    repaired = cache.get(0, s1, ulysses=8, ring=1)
    assert repaired is not planned and cache.repairs == 1 and repaired.imbalance() <= 1.01
    assert (cache.hits, cache.misses) == (3, 2) and 0 not in cache._pending  # the repaired plan holds for s1
    cache.clear()


@pytest.mark.parametrize("seed", range(8))
def test_degree_choice_with_local_layouts_picks_what_the_full_scoring_picks(seed):
    """With ``local_blocks=True`` the pruned degree choice (bounds, stopped balancings) still picks
    the plan of the full scoring, and never a slower one than without local layouts."""
    cost, s = _random_model_and_summary(seed, dense=seed >= 4)
    scored = score_degrees(s, world=8, cost_model=cost, local_blocks=True)
    best = min(scored, key=lambda c: (c.prediction.total_ms, -c.ulysses))
    u, r, plan = choose_degrees(s, world=8, heads=16, cost_model=cost, local_blocks=True)
    assert (u, r) == (best.ulysses, best.ring) and plan.fingerprint() == best.plan.fingerprint()
    without = min(score_degrees(s, world=8, cost_model=cost), key=lambda c: (c.prediction.total_ms, -c.ulysses))
    assert best.prediction.total_ms <= without.prediction.total_ms * (1 + 1e-9)


def test_plan_cache_local_blocks_plans_as_choose_degrees_does():
    """``PlanCache(local_blocks=True)``: a miss with ``world=`` plans what ``choose_degrees(...,
    local_blocks=True)`` plans (here a local layout, which moves blocks), the default cache what
    the default choice plans; a non-bool flag is refused."""
    cost, s = _random_model_and_summary(0)
    want = choose_degrees(s, world=8, heads=16, cost_model=cost, local_blocks=True)[2]
    assert want.__dict__.get("_local")  # the case exercises a local layout
    got = PlanCache(cost_model=cost, local_blocks=True).get(0, s, world=8)
    assert got.fingerprint() == want.fingerprint()
    plain = PlanCache(cost_model=cost).get(0, s, world=8)
    assert plain.fingerprint() == choose_degrees(s, world=8, heads=16, cost_model=cost)[2].fingerprint() != want.fingerprint()
    with pytest.raises(TypeError, match="local_blocks"):
        PlanCache(local_blocks=1)


@pytest.mark.parametrize("seed", range(6))
def test_wave_bounds_hold_for_every_layout_that_keeps_block_counts(seed):
    """Oracle: CostModel.predict's wave factors of explicit plans (their chunks' token counts). The
    degree choice's per-group least wave factor is at most every rank's factor in any layout that
    keeps each rank's block count (random swaps, the partial last block included), and its home
    factors are those of the home layout."""
    from dbsp.plan.balance import _build_plan
    from dbsp.plan.core import _head_counts, _home
    from dbsp.plan.degrees import _wave_bounds

    rng = np.random.default_rng(seed)
    heads, S = 8, int(rng.integers(40, 60)) * 64 - int(rng.integers(1, 63))  # a partial last block
    work = random_work(heads, -(-S // 64), seed=seed)
    s = summarize_work(work, q_block=64, seq_len=S, ring=4, coarse=1)
    cost = model(dense_tflops=600.0, dense_sms=int(rng.integers(2, 6)))
    nb = s.num_blocks
    tight = groups_seen = 0
    for U, R in ((1, 4), (2, 2), (4, 1), (2, 4)):
        counts = _head_counts(heads, U, False)
        groups = np.arange(heads).reshape(U, -1).tolist()
        n_dense = rng.integers(0, heads // U + 1, U)
        at_home, least = _wave_bounds(cost, s, R, n_dense)
        home = np.tile(_home(nb, R), (U, 1))
        plan = _build_plan(ulysses=U, ring=R, heads=heads, q_block=64, seq_len=S, groups=groups, counts=counts,
                           q_owner=home, kv_owner=home, tile_work=None)
        assert np.array_equal(at_home, cost._waves_of(n_dense, plan._chunk_tokens[0], s.batch))
        lowest = at_home.min(1)
        for _ in range(40):
            owner = home.copy()
            for k in range(U):
                for _ in range(int(rng.integers(1, 4))):
                    x = nb - 1 if rng.random() < 0.5 else int(rng.integers(nb))  # often the partial block
                    y = int(rng.integers(nb))
                    owner[k, x], owner[k, y] = owner[k, y], owner[k, x]
            plan = _build_plan(ulysses=U, ring=R, heads=heads, q_block=64, seq_len=S, groups=groups, counts=counts,
                               q_owner=owner, kv_owner=owner, tile_work=None)
            plan.validate()
            got = cost._waves_of(n_dense, plan._chunk_tokens[0], s.batch)  # (U, R) as predict weighs them
            assert (got >= least[:, None] * (1 - 1e-12)).all(), (U, R, got, least)
            lowest = np.minimum(lowest, got.min(1))
        tight += int(np.isclose(lowest, least).sum())
        groups_seen += U
    assert tight >= groups_seen - 1  # the layouts tried reach the least factor of (nearly) every group
