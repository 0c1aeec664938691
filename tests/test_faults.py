"""Distributed faults and determinism.

* Inputs that disagree across ranks (shapes, plans, masks, degrees): every rank raises the same
  clear error before any data moves, and the process group stays usable afterwards.
* One rank failing: before the call (its process exits), inside the Ulysses all-to-all, or inside
  the ring (its process stays alive, so only a timeout can free the others): every other rank
  raises within a few seconds of the collective timeout instead of hanging.
* No process group: what each entry point says.
* Determinism: same inputs give bit-identical outputs on CPU (reference, Triton interpreter, the
  parallel runtime) and identical plans and fingerprints on every rank.
"""

import hashlib
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from dbsp import SparseMask, reference_attention, sparse_attention
from dbsp.dist import SPGroups, all_to_all, predict_mask_sharded, ring_pass, sp_attention
from dbsp.dist.layout import shard_sizes
from dbsp.plan import Plan, PlanCache, choose_degrees, make_plan
from harness import max_abs_err, random_mask, run_distributed

FAULT_TIMEOUT = 3.0  # the collective timeout of the fault runs, seconds
FAIL_FAST = 15.0  # a healthy rank must raise within this many seconds of a peer's fault


def _shard(x, rank, world, dim=1):
    sizes = shard_sizes(x.shape[dim], world)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _inputs(seed=0, B=1, S=40, H=4, D=16, M=8, N=2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=gen, dtype=dtype) for _ in range(3))
    torch.manual_seed(seed)
    return q, k, v, random_mask(B, H, S, S, q_block=M, kv_tile=N, density=0.4)


def _attempt(fn) -> str:
    try:
        fn()
    except Exception as exc:  # the message every rank reports back to the test
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- mismatches


def _mismatches(rank, world):
    """Inputs that differ across the 2 ranks, or are wrong on every rank; then a good call."""
    groups = SPGroups.init(ulysses=1, ring=2)
    heads_groups = SPGroups.init(ulysses=2, ring=1)
    q, k, v, mask = _inputs()
    qs, ks, vs = (_shard(x, rank, world) for x in (q, k, v))
    out = {}

    def call(*args, g=groups, **kw):
        return lambda: sp_attention(*args, groups=g, **kw)

    # Sizes that disagree across ranks.
    q8, k8, v8 = (x[..., :8] for x in (qs, ks, vs))
    out["head_dim"] = _attempt(call(*((q8, k8, v8) if rank else (qs, ks, vs)), mask))
    q2, k2, v2, mask2 = _inputs(B=2)
    out["batch"] = _attempt(call(*(_shard(x, rank, world) for x in (q2, k2, v2)), mask2) if rank else call(qs, ks, vs, mask))
    # The same sizes and nnz, different tiles: only the mask digest tells them apart.
    dense = mask.to_dense()
    moved = dense.clone()
    row = int(torch.nonzero(dense[0, 0].any(-1) & ~dense[0, 0].all(-1))[0])
    on, off = int(torch.nonzero(dense[0, 0, row])[0]), int(torch.nonzero(~dense[0, 0, row])[0])
    moved[0, 0, row, on], moved[0, 0, row, off] = False, True
    other = SparseMask.from_dense(moved, q_block=8, kv_tile=2, seq_len_q=40, seq_len_kv=40)
    assert other.nnz == mask.nnz
    out["mask contents"] = _attempt(call(qs, ks, vs, other if rank else mask))
    # Plans that differ across ranks, or do not fit the call.
    plan = make_plan(mask, ulysses=1, ring=2, reward=0.0)
    out["plan on one rank"] = _attempt(call(qs, ks, vs, mask, plan=plan if rank else None))
    out["plan for another world"] = _attempt(call(qs, ks, vs, mask, plan=Plan.identity(ulysses=2, ring=2, heads=4, q_block=8, seq_len=40)))
    out["plan for another mask"] = _attempt(call(qs, ks, vs, mask, plan=Plan.identity(ulysses=1, ring=2, heads=4, q_block=8, seq_len=48)))
    # Degrees against heads and world.
    q3, k3, v3, mask3 = _inputs(H=3)
    out["ulysses vs heads"] = _attempt(call(*(_shard(x, rank, world) for x in (q3, k3, v3)), mask3, g=heads_groups))
    out["degrees vs world"] = _attempt(lambda: SPGroups.init(ulysses=2, ring=2))
    # One rank's own input is bad: it raises its own error, the other names it.
    out["bad dtype on one rank"] = _attempt(call(*((qs.long(), ks, vs) if rank else (qs, ks, vs)), mask))
    out["groups of another type"] = _attempt(lambda: sp_attention(qs, ks, vs, mask, groups=dist.group.WORLD))
    # The group still works, and two identical calls give identical bits.
    first = sp_attention(qs, ks, vs, mask, groups=groups, plan=plan)
    second = sp_attention(qs, ks, vs, mask, groups=groups, plan=plan)
    ref = reference_attention(q, k, v, mask)[0]
    out["good call error"] = max_abs_err(first, _shard(ref, rank, world))
    out["good call repeatable"] = torch.equal(first, second)
    return out


def test_inputs_that_disagree_raise_the_same_error_on_every_rank():
    results = run_distributed(_mismatches, 2, timeout=180)
    expected = {
        "head_dim": r"ValueError: sp_attention inputs differ across ranks in head_dim: rank 0: 16, rank 1: 8",
        "batch": r"ValueError: sp_attention inputs differ across ranks in batch: rank 0: 1, rank 1: 2",
        "mask contents": r"ValueError: sp_attention inputs differ across ranks in mask contents: rank 0: same as rank 0, rank 1: differs",
        "plan on one rank": r"ValueError: every rank must run the same Plan, but the plan fingerprints differ across ranks: rank 0: none, rank 1: [0-9a-f]{16}",
        "plan for another world": r"ValueError: plan does not match this call: ulysses=2 \(call has 1\)",
        "plan for another mask": r"ValueError: plan does not match this call: seq_len=48 \(call has 40\)",
        "ulysses vs heads": r"ValueError: heads must be divisible by ulysses without a plan: H=3, ulysses=2",
        "degrees vs world": r"ValueError: ulysses x ring must equal the world size: ulysses=2 x ring=2 = 4, but the world has 2 ranks",
        "groups of another type": r"TypeError: groups must be a dbsp.dist.SPGroups, got ProcessGroup",
    }
    for rank, out in enumerate(results):
        for name, pattern in expected.items():
            assert re.search(pattern, out[name]), (rank, name, out[name])
        assert out["good call error"] < 2e-5 and out["good call repeatable"], (rank, out)
    assert re.search(r"TypeError: q, k and v must share one floating dtype .* got torch.int64", results[1]["bad dtype on one rank"])
    assert re.search(r"ValueError: sp_attention: rank\(s\) \[1\] rejected their inputs", results[0]["bad dtype on one rank"])


# ---------------------------------------------------------------------------------- one rank fails


def _marker(tmp, rank):
    return os.path.join(tmp, f"rank{rank}.done")


def _wait_for_others(tmp, world, me, limit=60.0):
    """Keep the faulty rank alive (not in any collective) until every other rank has reported."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not all(os.path.exists(_marker(tmp, r)) for r in range(world) if r != me):
        time.sleep(0.1)


def _fault_run(rank, world, tmp, where, ulysses):
    """Rank ``world - 1`` fails at ``where`` and stays alive; the others report what they saw and when."""
    import dbsp.dist.ring as ring_mod
    import dbsp.dist.usp as usp_mod

    groups = SPGroups.init(ulysses=ulysses, ring=world // ulysses)
    assert groups.timeout.total_seconds() == FAULT_TIMEOUT  # inherited from init_process_group
    # Tiny messages: gloo then completes the sends at once and the healthy ranks wait in receives,
    # the waits that only the groups' own timeouts bound.
    q, k, v, mask = _inputs(S=12, H=2, D=2, M=2, N=1)
    qs, ks, vs = (_shard(x, rank, world) for x in (q, k, v))
    faulty = rank == world - 1
    if faulty:
        def boom(*args, **kwargs):
            raise RuntimeError(f"injected fault in {where}")

        def receive_then_fail(tensors, recv_shapes, *, group, send_to, recv_from, timeout=None):
            # Post the receives, so the peer's sends complete and only its receive is left waiting.
            received = [t.new_empty(tuple(shape)) for t, shape in zip(tensors, recv_shapes)]
            dist.batch_isend_irecv([dist.P2POp(dist.irecv, r, recv_from, group) for r in received])
            boom()

        if where == "ulysses all-to-all":
            usp_mod._to_heads = boom
        else:
            ring_mod.ring_pass = receive_then_fail
    start = time.monotonic()
    message = _attempt(lambda: sp_attention(qs, ks, vs, mask, groups=groups))
    elapsed = time.monotonic() - start
    if faulty:
        _wait_for_others(tmp, world, rank)
    else:
        open(_marker(tmp, rank), "w").close()
    return message, elapsed


@pytest.mark.parametrize("where", ["ring pass", "ulysses all-to-all"])
def test_a_rank_failing_inside_a_collective_fails_the_others_fast(tmp_path, where):
    """4 ranks, U = R = 2, so both the Ulysses and the ring groups are DeviceMesh sub-groups. The
    faulty rank stays alive, so only the groups' timeouts can free the others; torch gives mesh
    sub-groups its 30-minute default, and SPGroups.init now sets init_process_group's timeout."""
    world = 4
    start = time.monotonic()
    results = run_distributed(_fault_run, world, str(tmp_path), where, 2, timeout=120, collective_timeout=FAULT_TIMEOUT)
    assert results[-1][0] == f"RuntimeError: injected fault in {where}"
    for rank, (message, elapsed) in enumerate(results[:-1]):
        assert message.startswith("RuntimeError:"), (rank, message)
        assert elapsed < FAIL_FAST, f"rank {rank} needed {elapsed:.1f} s to notice the fault: {message}"
    assert time.monotonic() - start < 100


def _raise_before_the_call(rank, world):
    q, k, v, mask = _inputs()
    groups = SPGroups.init(ulysses=1, ring=world)
    if rank == 1:
        raise ValueError("user code on rank 1 failed before sp_attention")
    sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=groups)


def test_a_rank_that_raises_and_exits_fails_the_others_fast():
    """The usual torchrun case: an exception ends the faulty process; its peers see the closed
    connection (or the timeout) at their next collective and raise, naming gloo's reason."""
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        run_distributed(_raise_before_the_call, 2, timeout=120, collective_timeout=FAULT_TIMEOUT)
    report = str(info.value)
    assert "2 of 2 ranks failed" in report and "user code on rank 1 failed" in report
    rank0 = report.split("--- rank 0 ---")[1].split("--- rank 1 ---")[0]
    assert re.search(r"RuntimeError: .*(Connection closed by peer|Connection reset by peer|Timed out)", rank0), rank0
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------------- no process group


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists in this process")
def test_without_a_process_group():
    """Single-process calls need none; every distributed entry point says what is missing."""
    q, k, v, mask = _inputs()
    assert sparse_attention(q, k, v, mask).shape == q.shape
    with pytest.raises(RuntimeError, match=r"SPGroups.init needs torch.distributed to be initialised first"):
        SPGroups.init(ulysses=1, ring=1)
    with pytest.raises(RuntimeError, match=r"SPGroups.all_degrees needs torch.distributed to be initialised first"):
        SPGroups.all_degrees()
    with pytest.raises(TypeError, match=r"groups must be a dbsp.dist.SPGroups, got NoneType"):
        sp_attention(q, k, v, mask, groups=None)
    with pytest.raises(TypeError, match=r"groups must be a dbsp.dist.SPGroups, got NoneType"):
        predict_mask_sharded(q, k, groups=None)
    with pytest.raises(ValueError, match=r"Default process group has not been initialized"):
        all_to_all(q, group=None, input_split_sizes=[1], output_split_sizes=[1])
    with pytest.raises(ValueError, match=r"Default process group has not been initialized"):
        ring_pass([q], [q.shape], group=None, send_to=0, recv_from=0)


# ---------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_reference_is_bitwise_deterministic(dtype):
    q, k, v, mask = _inputs(S=97, M=16, N=4, dtype=dtype)
    twin = SparseMask.from_dense(mask.to_dense(), q_block=16, kv_tile=4, seq_len_q=97, seq_len_kv=97)
    a = sparse_attention(q, k, v, mask, return_lse=True)
    b = sparse_attention(q.clone(), k.clone(), v.clone(), twin, return_lse=True)
    c = reference_attention(q, k, v, mask)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_triton_interpreter_is_bitwise_deterministic():
    q, k, v, mask = _inputs(S=50, M=16, N=1)
    runs = [sparse_attention(q, k, v, mask, return_lse=True, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_mask_prediction_and_planning_are_deterministic():
    from dbsp.predict import predict_mask

    q, k, _, _ = _inputs(S=96, H=4)
    masks = [predict_mask(q, k, q_block=8, kv_tile=2, top_p=0.8) for _ in range(2)]
    assert torch.equal(masks[0].offsets, masks[1].offsets) and torch.equal(masks[0].indices, masks[1].indices)
    plans = [make_plan(masks[i], ulysses=2, ring=3) for i in range(2)]
    assert plans[0] == plans[1] and plans[0].fingerprint() == plans[1].fingerprint()


def _plans_on_every_rank(rank, world, fingerprints):
    """Every rank predicts, plans, chooses degrees and runs from the same inputs; returns digests."""
    q, k, v, mask = _inputs(S=64, H=4, M=8, N=1)
    plan = make_plan(mask, ulysses=2, ring=2, reward=0.0)
    u, r, chosen = choose_degrees(mask, world=world, heads=4)
    cache = PlanCache()
    cached = cache.get(0, mask, world=world)
    groups = SPGroups.init(ulysses=2, ring=2)
    out, lse = sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=groups, plan=plan, return_lse=True)
    again = sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=groups, plan=plan)
    local = [plan.fingerprint(), chosen.fingerprint(), cached.fingerprint(), f"{u}x{r}"]
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    return {
        "local": local,
        "all": gathered,
        "matches parent": local[0] == fingerprints[0],
        "repeatable": torch.equal(out, again),
        "ref digest": _digest(reference_attention(q, k, v, mask)[0]),
    }


def test_identical_plans_and_outputs_on_every_rank():
    q, k, v, mask = _inputs(S=64, H=4, M=8, N=1)
    parent = [make_plan(mask, ulysses=2, ring=2, reward=0.0).fingerprint()]
    results = run_distributed(_plans_on_every_rank, 4, parent, timeout=180)
    for r in results:
        assert r["all"] == [results[0]["local"]] * 4  # every rank holds every other rank's plans
        assert r["matches parent"] and r["repeatable"]
        assert r["ref digest"] == results[0]["ref digest"]  # the same bits on every process
