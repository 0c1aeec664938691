"""The parallel runtime on 2 and 4 gloo processes, against single-process ``sparse_attention``.

Every rank builds the same global q/k/v and mask from one seed, runs the parallel attention on its
shard and compares with ``sparse_attention`` on the gathered (global) tensors. Many cases share one
spawn (process start-up dominates), and each case reports its errors back to the test process.
"""

import re

import pytest
import torch
import torch.distributed as dist

from dbsp import SparseMask, sparse_attention
from dbsp.dist import SPGroups, all_to_all, ring_attention, sp_attention, ulysses_attention
from dbsp.dist.groups import factorisations
from dbsp.dist.layout import home_blocks, shard_sizes
from dbsp.plan import Plan, make_plan
from harness import max_abs_err, random_mask, run_distributed

TOL = 2e-5  # fp32: per-step rounding of partial outputs and of the merge, outputs of size ~1


def _partition(nb, R, gen):
    """A random valid block layout: every ring rank keeps its home block count, ids sorted."""
    counts = [len(b) for b in home_blocks(nb, R)]
    ids = torch.randperm(nb, generator=gen).tolist()
    out, start = [], 0
    for c in counts:
        out.append(tuple(sorted(ids[start : start + c])))
        start += c
    return tuple(out)


def make_test_plan(kind, *, U, R, H, M, S, seed=0, mask=None):
    """``identity``: the unplanned layout as a Plan; ``random``: a random head order (head groups of
    H // U or H // U + 1 heads) and random block lists per group; ``planner``: make_plan with R_b = 0."""
    if kind == "identity":
        return Plan.identity(ulysses=U, ring=R, heads=H, q_block=M, seq_len=S)
    if kind == "planner":
        return make_plan(mask, ulysses=U, ring=R, reward=0.0, uneven_heads=H % U != 0)
    nb = -(-S // M)
    gen = torch.Generator().manual_seed(seed)
    counts = [H // U + (k < H % U) for k in range(U)]
    offsets = tuple(sum(counts[:k]) for k in range(U + 1))
    return Plan(
        ulysses=U, ring=R, heads=H, q_block=M, seq_len=S,
        head_perm=tuple(torch.randperm(H, generator=gen).tolist()), head_offsets=offsets,
        q_blocks=tuple(_partition(nb, R, gen) for _ in range(U)),
        kv_blocks=tuple(_partition(nb, R, gen) for _ in range(U)),
    )


def _shard(x, rank, world):
    sizes = shard_sizes(x.shape[1], world)
    lo = sum(sizes[:rank])
    return x[:, lo : lo + sizes[rank]]


def _make(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, S, H, D = case["B"], case["S"], case["H"], case["D"]
    dtype = case.get("dtype", torch.float32)
    q, k, v = (torch.randn(B, S, H, D, generator=gen, dtype=dtype) for _ in range(3))
    torch.manual_seed(case["seed"])
    if case.get("full"):
        mask = SparseMask.full(B, H, S, S, q_block=case["M"], kv_tile=case["N"])
    else:
        mask = random_mask(B, H, S, S, q_block=case["M"], kv_tile=case["N"], density=case.get("density", 0.3))
        if case.get("empty_head"):
            dense = mask.to_dense()
            dense[:, -1] = False
            mask = SparseMask.from_dense(dense, q_block=case["M"], kv_tile=case["N"], seq_len_q=S, seq_len_kv=S)
    return q, k, v, mask


def _run_cases(rank, world, cases, groups):
    results = []
    for case in cases:
        U, R = case["U"], case["R"]
        g = groups[(U, R)]
        q, k, v, mask = _make(case)
        plan = None
        if case["plan"] != "none":
            plan = make_test_plan(case["plan"], U=U, R=R, H=case["H"], M=case["M"], S=case["S"], seed=case["seed"], mask=mask)
        qs, ks, vs = (_shard(x, rank, world).clone().requires_grad_(case.get("grad", False)) for x in (q, k, v))
        fn = case.get("fn", "sp")
        if fn == "ulysses":
            out, lse = ulysses_attention(qs, ks, vs, mask, groups=g, return_lse=True)
        elif fn == "ring":
            out, lse = ring_attention(qs, ks, vs, mask, groups=g, return_lse=True)
        else:
            out, lse = sp_attention(qs, ks, vs, mask, groups=g, plan=plan, return_lse=True)
        # Without the lse (R = 1 may take the no-lse path), and without the cross-rank check.
        out_only = sp_attention(qs, ks, vs, mask, groups=g, plan=plan, verify=False)
        qg, kg, vg = (x.clone().requires_grad_(case.get("grad", False)) for x in (q, k, v))
        ref_out, ref_lse = sparse_attention(qg, kg, vg, mask, return_lse=True)
        row = {
            "name": case["name"],
            "out": max_abs_err(out.detach(), _shard(ref_out.detach(), rank, world)),
            "out_only": max_abs_err(out_only.detach(), _shard(ref_out.detach(), rank, world)),
            "lse": max_abs_err(lse.detach(), _shard(ref_lse.detach().transpose(1, 2), rank, world).transpose(1, 2)),
            "nan": bool(torch.isnan(out).any() or torch.isnan(lse).any()),
            "shape": tuple(out.shape) == tuple(qs.shape) and tuple(lse.shape) == (q.shape[0], q.shape[2], qs.shape[1]),
        }
        if case.get("grad"):
            gen = torch.Generator().manual_seed(1000 + case["seed"])
            w_out = torch.randn(ref_out.shape, generator=gen)
            w_lse = torch.randn(ref_lse.shape, generator=gen)
            finite = torch.isfinite(ref_lse)
            loss_ref = (ref_out * w_out).sum() + torch.where(finite, ref_lse, 0.0).mul(w_lse).sum()
            loss_ref.backward()
            w_lse_s = _shard(w_lse.transpose(1, 2), rank, world).transpose(1, 2)
            loss = (out * _shard(w_out, rank, world)).sum() + torch.where(torch.isfinite(lse), lse, 0.0).mul(w_lse_s).sum()
            loss.backward()
            row["grad"] = max(max_abs_err(a.grad, _shard(b.grad, rank, world)) for a, b in ((qs, qg), (ks, kg), (vs, vg)))
            # The output-only path has its own backward (no lse saved when R = 1).
            q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (qs, ks, vs))
            qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
            (sp_attention(q2, k2, v2, mask, groups=g, plan=plan) * _shard(w_out, rank, world)).sum().backward()
            (sparse_attention(qr, kr, vr, mask) * w_out).sum().backward()
            row["grad_out_only"] = max(max_abs_err(a.grad, _shard(b.grad, rank, world)) for a, b in ((q2, qr), (k2, kr), (v2, vr)))
        if case.get("compare_unplanned"):
            plain = sp_attention(qs, ks, vs, mask, groups=g, return_lse=True)
            row["identical_to_unplanned"] = torch.equal(plain[0], out) and torch.equal(plain[1], lse)
        results.append(row)
    return results


def _cases(world):
    degrees = {2: [(2, 1), (1, 2)], 4: [(4, 1), (1, 4), (2, 2)]}[world]
    cases, seed = [], 0
    for U, R in degrees:
        for S in (97, 128):
            for M, N in ((16, 16), (16, 4), (8, 1)):
                for plan in ("none", "identity", "random", "planner"):
                    seed += 1
                    cases.append(dict(name=f"U{U}R{R} S{S} {M}x{N} plan={plan}", U=U, R=R, S=S, M=M, N=N, B=1, H=4, D=8,
                                      plan=plan, seed=seed, compare_unplanned=plan == "identity"))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} batch 2, uneven heads", U=U, R=R, S=61, M=8, N=2, B=2, H=U + 1 if U > 1 else 3,
                          D=4, plan="random", seed=seed))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} uneven heads, planner", U=U, R=R, S=70, M=8, N=8, B=1, H=2 * U + 1, D=4,
                          plan="planner", seed=seed))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} full mask", U=U, R=R, S=50, M=16, N=16, B=1, H=4, D=8, plan="none", seed=seed, full=True))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} empty head", U=U, R=R, S=75, M=16, N=8, B=1, H=4, D=8, plan="random",
                          seed=seed, empty_head=True))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} grad", U=U, R=R, S=45, M=8, N=2, B=1, H=4, D=8, plan="random", seed=seed, grad=True))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} grad unplanned", U=U, R=R, S=45, M=8, N=8, B=1, H=4, D=8, plan="none", seed=seed, grad=True))
        seed += 1
        cases.append(dict(name=f"U{U}R{R} float64", U=U, R=R, S=40, M=8, N=4, B=1, H=4, D=8, plan="random", seed=seed,
                          dtype=torch.float64))
        fn = "ulysses" if R == 1 else "ring" if U == 1 else None
        if fn:
            seed += 1
            cases.append(dict(name=f"U{U}R{R} {fn}_attention", U=U, R=R, S=33, M=8, N=1, B=1, H=4, D=8, plan="none", seed=seed, fn=fn))
    if world == 4:  # fewer tokens than ranks: some shards and some ring ranks are empty
        for U, R in ((1, 4), (2, 2)):
            seed += 1
            cases.append(dict(name=f"U{U}R{R} S3", U=U, R=R, S=3, M=2, N=1, B=1, H=4, D=8, plan="none", seed=seed, grad=True))
    return cases


def _everything(rank, world, cases):
    """One spawn per world size: groups for every factorisation, then every check that needs them."""
    groups = SPGroups.all_degrees()
    out = {"groups": _groups_and_all_to_all(rank, world, groups), "cases": _run_cases(rank, world, cases, groups)}
    if world == 2:
        out["errors"] = _errors(rank, world, groups)
    return out


@pytest.fixture(scope="module")
def spawned():
    """``spawned(world)``: the per-rank results of one ``_everything`` run, started once per module."""
    runs = {}

    def get(world):
        if world not in runs:
            runs[world] = run_distributed(_everything, world, _cases(world), timeout=300)
        return runs[world]

    return get


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_attention_equals_single_process(world, spawned):
    for rank, res in enumerate(spawned(world)):
        rows = res["cases"]
        for row in rows:
            where = f"rank {rank}, {row['name']}"
            assert row["shape"], where
            assert not row["nan"], where
            tol = 1e-12 if "float64" in row["name"] else TOL
            assert row["out"] <= tol, f"{where}: out error {row['out']:.2e}"
            assert row["out_only"] <= tol, f"{where}: out (no lse) error {row['out_only']:.2e}"
            assert row["lse"] <= tol, f"{where}: lse error {row['lse']:.2e}"
            if "grad" in row:
                assert row["grad"] <= 1e-4, f"{where}: gradient error {row['grad']:.2e}"
                assert row["grad_out_only"] <= 1e-4, f"{where}: gradient error (out only) {row['grad_out_only']:.2e}"
            if "identical_to_unplanned" in row:
                assert row["identical_to_unplanned"], f"{where}: identity plan differs from the unplanned path"


def _groups_and_all_to_all(rank, world, groups):
    out = {}
    for (U, R), g in groups.items():
        out[(U, R)] = (
            dist.get_process_group_ranks(g.ulysses_group),
            dist.get_process_group_ranks(g.ring_group),
            g.ring_rank,
            g.ulysses_rank,
        )
    try:
        SPGroups.init(ulysses=3, ring=world)
    except ValueError as exc:
        out["error"] = str(exc)
    # Uneven all-to-all with autograd: rank a sends (a + b + 1) rows of value 10 a + b to rank b.
    send = [rank + b + 1 for b in range(world)]
    recv = [a + rank + 1 for a in range(world)]
    x = torch.cat([torch.full((n, 2), 10.0 * rank + b) for b, n in enumerate(send)]).requires_grad_()
    y = all_to_all(x, group=dist.group.WORLD, input_split_sizes=send, output_split_sizes=recv)
    expected = torch.cat([torch.full((n, 2), 10.0 * a + rank) for a, n in enumerate(recv)])
    out["values"] = torch.equal(y, expected)
    weight = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) + 100 * rank
    (y * weight).sum().backward()
    # Row j of the piece rank a sent to rank b lands at offset sum(recv_b[:a]) + j on rank b.
    want = []
    for b in range(world):
        start = sum(a + b + 1 for a in range(rank))
        w_b = torch.arange(sum(a + b + 1 for a in range(world)) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * b
        want.append(w_b[start : start + rank + b + 1])
    out["grad"] = torch.equal(x.grad, torch.cat(want))
    out["ring_order"] = _ring_event_order(rank, world, groups[(1, world)])
    return out


def _ring_event_order(rank, world, g):
    """Record the ring loop's events: each step's transfer starts before its compute and is
    waited on after it (the overlap the design asks for)."""
    import dbsp.dist.ring as ring_mod

    events = []
    real_pass, real_attention = ring_mod.ring_pass, ring_mod.sparse_attention

    def logged_pass(*args, **kwargs):
        pending = real_pass(*args, **kwargs)
        events.append("send")
        real_wait = pending.wait

        def wait():
            events.append("wait")
            return real_wait()

        pending.wait = wait
        return pending

    def logged_attention(*args, **kwargs):
        events.append("compute")
        return real_attention(*args, **kwargs)

    ring_mod.ring_pass, ring_mod.sparse_attention = logged_pass, logged_attention
    try:
        q, k, v, mask = _make(dict(B=1, S=64, H=2, D=4, M=8, N=8, seed=5, full=True))
        sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=g)
    finally:
        ring_mod.ring_pass, ring_mod.sparse_attention = real_pass, real_attention
    return events


@pytest.mark.parametrize("world", [2, 4])
def test_groups_layout_and_autograd_all_to_all(world, spawned):
    for rank, res in enumerate(r["groups"] for r in spawned(world)):
        for (U, R), (uly, ring, i, k) in ((key, v) for key, v in res.items() if isinstance(key, tuple)):
            assert uly == [(rank // U) * U + j for j in range(U)]  # consecutive ranks
            assert ring == [j * U + rank % U for j in range(R)]  # strided ranks
            assert (i, k) == (rank // U, rank % U)
        assert f"ulysses=3 x ring={world} = {3 * world}" in res["error"] and f"{world} ranks" in res["error"]
        assert sorted(k for k in res if isinstance(k, tuple)) == sorted((u, world // u) for u in range(1, world + 1) if world % u == 0)
        assert res["values"] and res["grad"]
        # R steps: transfer t + 1 goes out before step t computes and is waited on right after it.
        assert res["ring_order"] == ["send", "compute", "wait"] * (world - 1) + ["compute"], res["ring_order"]


def _errors(rank, world, groups):
    g = groups[(1, 2)]
    case = dict(B=1, S=40, H=4, D=8, M=8, N=4, seed=3)
    q, k, v, mask = _make(case)
    qs, ks, vs = (_shard(x, rank, world) for x in (q, k, v))
    messages = {}

    def attempt(name, fn):
        try:
            fn()
            messages[name] = None
        except (ValueError, TypeError) as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"

    plan_a = make_test_plan("random", U=1, R=2, H=4, M=8, S=40, seed=1)
    plan_b = make_test_plan("random", U=1, R=2, H=4, M=8, S=40, seed=2)
    attempt("plan mismatch", lambda: sp_attention(qs, ks, vs, mask, groups=g, plan=plan_a if rank == 0 else plan_b))
    attempt("plan on one rank", lambda: sp_attention(qs, ks, vs, mask, groups=g, plan=plan_a if rank == 0 else None))
    bad = _shard(q, rank, world)[:, :-1] if rank == 1 else qs
    attempt("short shard", lambda: sp_attention(bad, bad, bad, mask, groups=g))
    attempt("dtype", lambda: sp_attention(*((x.double() for x in (qs, ks, vs)) if rank == 1 else (qs, ks, vs)), mask, groups=g))
    other = random_mask(1, 4, 40, 40, q_block=8, kv_tile=8) if rank == 1 else mask
    attempt("mask granularity", lambda: sp_attention(qs, ks, vs, other, groups=g))
    attempt("scale", lambda: sp_attention(qs, ks, vs, mask, groups=g, scale=0.5 if rank == 0 else 0.25))
    attempt("return_lse", lambda: sp_attention(qs, ks, vs, mask, groups=g, return_lse=rank == 0))
    attempt("not a tensor", lambda: sp_attention(qs.tolist() if rank == 0 else qs, ks, vs, mask, groups=g))
    wrong = make_test_plan("random", U=1, R=2, H=4, M=8, S=48)
    attempt("plan for another seq_len", lambda: sp_attention(qs, ks, vs, mask, groups=g, plan=wrong))
    g2 = groups[(2, 1)]
    q3, k3, v3 = (_shard(torch.randn(1, 40, 3, 8), rank, world) for _ in range(3))
    mask3 = SparseMask.full(1, 3, 40, 40, q_block=8)
    attempt("heads not divisible", lambda: sp_attention(q3, k3, v3, mask3, groups=g2))
    attempt("ring_attention with U > 1", lambda: ring_attention(qs, ks, vs, mask, groups=g2))
    attempt("plan of another type", lambda: sp_attention(qs, ks, vs, mask, groups=g, plan=object()))
    # After every failure the ranks are still in step: a correct call works.
    out = sp_attention(qs, ks, vs, mask, groups=g, plan=plan_a)
    messages["after"] = max_abs_err(out, _shard(sparse_attention(q, k, v, mask), rank, world))
    return messages


def test_errors_raise_on_every_rank_and_keep_ranks_in_step(spawned):
    r0, r1 = (r["errors"] for r in spawned(2))
    expect = {
        "plan mismatch": (r"ValueError: every rank must run the same Plan, but the plan fingerprints differ", None),
        "plan on one rank": (r"plan fingerprints differ across ranks: rank 0: [0-9a-f]+, rank 1: none", None),
        "short shard": (r"rank\(s\) \[1\] rejected their inputs", r"rank 1 holds 19 tokens, but shard 1 .* seq_len=40 .* has 20"),
        "dtype": (r"differ across ranks in dtype: rank 0: torch.float32, rank 1: torch.float64", None),
        "mask granularity": (r"differ across ranks in kv_tile: rank 0: 4, rank 1: 8", None),
        "scale": (r"differ across ranks in scale: rank 0: 0.5, rank 1: 0.25", None),
        "return_lse": (r"differ across ranks in return_lse: rank 0: 1, rank 1: 0", None),
        "not a tensor": (r"TypeError: q must be a torch.Tensor, got list", r"rank\(s\) \[0\] rejected"),
        "plan for another seq_len": (r"plan does not match this call: seq_len=48 \(call has 40\)", None),
        "heads not divisible": (r"H=3, ulysses=2", None),
        "ring_attention with U > 1": (r"ring_attention needs groups with ulysses == 1", None),
        "plan of another type": (r"TypeError: plan must be a dbsp.plan.Plan or None, got object", None),
    }
    for name, (pattern0, pattern1) in expect.items():
        for rank, msgs in ((0, r0), (1, r1)):
            pattern = pattern0 if rank == 0 or pattern1 is None else pattern1
            assert msgs[name] is not None, f"{name}: rank {rank} did not raise"
            assert re.search(pattern, msgs[name]), f"{name}: rank {rank} raised {msgs[name]!r}"
    assert r0["after"] <= TOL and r1["after"] <= TOL


def _one_rank_fails_before_the_call(rank, world):
    g = SPGroups.init(ulysses=2, ring=1)
    q, k, v, mask = _make(dict(B=1, S=20, H=2, D=4, M=4, N=4, seed=0))
    if rank == 1:
        raise RuntimeError("rank 1 failed before sp_attention")
    return sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=g).shape


def test_factorisations():
    assert factorisations(8, heads=12) == [(4, 2), (2, 4), (1, 8)]
    assert factorisations(4) == [(4, 1), (2, 2), (1, 4)]
    assert factorisations(6, heads=40) == [(2, 3), (1, 6)]


def test_groups_need_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        SPGroups.init(ulysses=1, ring=1)
    with pytest.raises(ValueError, match="ulysses must be >= 1, got 0"):
        SPGroups.init(ulysses=0, ring=2)


def test_a_rank_that_raises_fails_the_others_instead_of_hanging():
    with pytest.raises(RuntimeError, match=r"2 of 2 ranks failed[\s\S]*rank 0 ---[\s\S]*rank 1 ---[\s\S]*failed before sp_attention"):
        run_distributed(_one_rank_fails_before_the_call, 2, timeout=60, collective_timeout=5)
