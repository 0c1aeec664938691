"""Property-based fuzzing of ``sp_attention`` on 2 and 4 gloo processes against one process.

Process start-up dominates a distributed test, so each world size starts its processes once (a
module-scoped pool) and hypothesis sends every drawn case to the live processes. Each rank builds
the same global q, k, v, mask and plan from the case's seed, runs ``sp_attention`` on its shard and
compares with ``sparse_attention(backend="reference")`` on the global tensors, forward and (for
some cases) backward; it also re-runs the call (bit-identical results) and reports its plan's
fingerprint (identical on every rank). Shrinking is off: a failure may leave the process group
unusable, so the failing case is reported as drawn.
"""

import datetime
import os
import queue
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import Phase, given
from hypothesis import strategies as st

from dbsp import sparse_attention
from dbsp._procs import join_or_kill
from dbsp.dist import SPGroups, sp_attention
from dbsp.dist.groups import factorisations
from dbsp.dist.layout import home_blocks, shard_sizes
from dbsp.plan import Plan, make_plan
from harness import max_abs_err
from test_fuzz import ROW_KINDS, build_mask, divisors, fuzz_settings

COLLECTIVE_TIMEOUT = 30.0  # seconds a rank waits for a peer inside one case
CASE_TIMEOUT = 120.0  # seconds the test waits for all ranks to report one case
TOL = {"float64": 1e-10, "float32": 5e-5}  # fp32: rounding of partial outputs and of the LSE merge


# ---------------------------------------------------------------------------------- the pool


def _serve(rank, world, init_method, inbox, outbox):
    """One rank: join the group, build every SPGroups of the world once, then run cases until None."""
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
        )
        groups = SPGroups.all_degrees()
        outbox.put((rank, True, "ready"))
    except BaseException:
        outbox.put((rank, False, traceback.format_exc()))
        return
    try:
        while True:
            case = inbox.get()
            if case is None:
                break
            try:
                outbox.put((rank, True, _run_case(rank, world, case, groups)))
            except BaseException:
                outbox.put((rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Pool:
    """``world`` live gloo processes that run one case at a time; every wait is bounded."""

    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self._tmp = tempfile.TemporaryDirectory()
        init_method = f"file://{os.path.join(self._tmp.name, 'rendezvous')}"
        self._inbox = [ctx.Queue() for _ in range(world)]
        self._outbox = ctx.Queue()
        self._procs = [
            ctx.Process(target=_serve, args=(r, world, init_method, self._inbox[r], self._outbox), daemon=True)
            for r in range(world)
        ]
        for p in self._procs:
            p.start()
        self.broken = None
        self._collect(CASE_TIMEOUT, "start-up")

    def _collect(self, timeout: float, what: str) -> list:
        values, errors = {}, {}
        deadline = time.monotonic() + timeout
        while len(values) + len(errors) < self.world:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values and r not in errors]
            if left <= 0 or dead:
                self.broken = f"{what}: ranks {sorted(set(range(self.world)) - set(values) - set(errors))} did not report " \
                              f"within {timeout:.0f} s (dead: {dead})"
                raise AssertionError(self.broken + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
            try:
                rank, ok, value = self._outbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            (values if ok else errors)[rank] = value
        if errors:
            self.broken = f"{what} failed on ranks {sorted(errors)}"  # a failed collective may leave the group unusable
            raise AssertionError(self.broken + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
        return [values[r] for r in range(self.world)]

    def run(self, case: dict) -> list:
        if self.broken:
            raise AssertionError(f"the {self.world}-process pool is unusable after an earlier failure: {self.broken}")
        for box in self._inbox:
            box.put(case)
        return self._collect(CASE_TIMEOUT, f"case {case}")

    def close(self) -> None:
        for box in self._inbox:
            box.put(None)
        join_or_kill(self._procs, grace=10.0)
        self._tmp.cleanup()


@pytest.fixture(scope="module")
def pool2():
    pool = _Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = _Pool(4)
    yield pool
    pool.close()


# ---------------------------------------------------------------------------------- one case


def _random_plan(case, gen):
    """A random valid Plan: random head order (H // U or H // U + 1 heads per group), random
    block lists per group with every ring rank keeping its home block count."""
    U, R, H, M, S = case["U"], case["R"], case["H"], case["q_block"], case["S"]
    nb = -(-S // M)
    counts = [len(b) for b in home_blocks(nb, R)]

    def partition():
        ids, out, start = torch.randperm(nb, generator=gen).tolist(), [], 0
        for c in counts:
            out.append(tuple(sorted(ids[start : start + c])))
            start += c
        return tuple(out)

    heads = [H // U + (k < H % U) for k in range(U)]
    return Plan(
        ulysses=U, ring=R, heads=H, q_block=M, seq_len=S,
        head_perm=tuple(torch.randperm(H, generator=gen).tolist()),
        head_offsets=tuple(sum(heads[:k]) for k in range(U + 1)),
        q_blocks=tuple(partition() for _ in range(U)),
        kv_blocks=tuple(partition() for _ in range(U)),
    )


def _shard(x, rank, world, dim=1):
    sizes = shard_sizes(x.shape[dim], world)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _run_case(rank, world, case, groups):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    B, S, H, D = case["B"], case["S"], case["H"], case["D"]
    q, k, v = (torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    mask = build_mask({**case, "Sq": S, "Skv": S}, gen)
    plan = None
    if case["plan"] == "identity":
        plan = Plan.identity(ulysses=case["U"], ring=case["R"], heads=H, q_block=case["q_block"], seq_len=S)
    elif case["plan"] == "planner":
        plan = make_plan(mask, ulysses=case["U"], ring=case["R"], reward=case["reward"], uneven_heads=H % case["U"] != 0)
    elif case["plan"] == "random":
        plan = _random_plan(case, gen)
    g = groups[(case["U"], case["R"])]
    grad = case["grad"]
    shards = [_shard(x, rank, world).detach().clone().requires_grad_(grad) for x in (q, k, v)]
    kw = dict(groups=g, plan=plan, scale=case["scale"], backend=case["backend"])
    res = sp_attention(*shards, mask, return_lse=case["return_lse"], **kw)
    out, lse = res if case["return_lse"] else (res, None)
    full = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
    ref, ref_lse = sparse_attention(*full, mask, scale=case["scale"], return_lse=True, backend="reference")
    report = {
        "shape": tuple(out.shape) == tuple(shards[0].shape) and out.dtype == dtype,
        "out": max_abs_err(out.detach(), _shard(ref.detach(), rank, world)),
        "nan": bool(torch.isnan(out).any()),
        "fingerprint": None if plan is None else plan.fingerprint(),
    }
    if lse is not None:
        report["lse"] = max_abs_err(lse, _shard(ref_lse.detach(), rank, world, dim=2))
        report["lse_shape"] = tuple(lse.shape) == (B, H, shards[0].shape[1])
    again = sp_attention(*(x.detach() for x in shards), mask, return_lse=case["return_lse"], **kw)
    again = again[0] if case["return_lse"] else again
    report["deterministic"] = torch.equal(again, out.detach())
    if grad:
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(case["seed"] + 1), dtype=torch.float64).to(dtype)
        (ref * w).sum().backward()
        (out * _shard(w, rank, world)).sum().backward()
        report["grad"] = max(max_abs_err(a.grad, _shard(b.grad, rank, world)) for a, b in zip(shards, full))
    return report


# ---------------------------------------------------------------------------------- strategies


@st.composite
def dist_cases(draw, world):
    U, R = draw(st.sampled_from(factorisations(world)))
    plan = draw(st.sampled_from(("none", "identity", "planner", "random")))
    uneven = plan in ("planner", "random") and draw(st.booleans())
    H = draw(st.integers(U, 2 * U + 1)) if uneven else U * draw(st.integers(1, 2))
    backend = draw(st.sampled_from(("reference",) * 5 + ("triton",)))
    if backend == "triton":
        q_block, max_s, dtype = 16, 64, "float32"
    else:
        q_block, max_s, dtype = draw(st.sampled_from((1, 2, 4, 8, 16))), 120, draw(st.sampled_from(("float32", "float64")))
    # A plan needs every ring rank to own a block; without one, ranks may own none (S < R * q_block).
    min_s = 1 if plan == "none" else (R - 1) * q_block + 1
    return {
        "U": U, "R": R, "H": H, "B": draw(st.integers(1, 2)), "D": draw(st.sampled_from((4, 8, 16))),
        "S": draw(st.integers(min_s, max(min_s, max_s))), "q_block": q_block,
        "kv_tile": draw(st.sampled_from(divisors(q_block))), "density": draw(st.floats(0.0, 1.0)),
        "row_kinds": draw(st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=3, unique=True)),
        "plan": plan, "reward": draw(st.sampled_from((0.0, 2.0))), "dtype": dtype, "backend": backend,
        "scale": draw(st.one_of(st.none(), st.floats(0.1, 1.0))), "return_lse": draw(st.booleans()),
        "grad": backend == "reference" and draw(st.integers(0, 3)) == 0,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _check(reports, case):
    tol = TOL[case["dtype"]]
    for rank, r in enumerate(reports):
        where = f"rank {rank}, case {case}"
        assert r["shape"], where
        assert not r["nan"], where
        assert r["out"] <= tol, (r["out"], where)
        if case["return_lse"]:
            assert r["lse_shape"] and r["lse"] <= tol, (r["lse"], where)
        if case["grad"]:
            assert r["grad"] <= 10 * tol, (r["grad"], where)
        assert r["deterministic"], f"a second identical call gave different bits: {where}"
    assert len({r["fingerprint"] for r in reports}) == 1, f"ranks hold different plans: {[r['fingerprint'] for r in reports]}"


NO_SHRINK = (Phase.explicit, Phase.generate)


@fuzz_settings(50, phases=NO_SHRINK)
@given(case=dist_cases(2))
def test_sp_attention_on_2_processes_matches_one(pool2, case):
    _check(pool2.run(case), case)


@fuzz_settings(50, phases=NO_SHRINK)
@given(case=dist_cases(4))
def test_sp_attention_on_4_processes_matches_one(pool4, case):
    _check(pool4.run(case), case)
