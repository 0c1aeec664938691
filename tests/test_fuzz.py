"""Property-based fuzzing (hypothesis) of the attention paths, the mask type and the planner.

Every property compares against an independent oracle: torch SDPA in float64 with the equivalent
token mask (``harness.sdpa_oracle``), ``reference_attention``, or a brute-force recomputation.
Example counts are given for the bounded CI profile and scale with the loaded hypothesis profile
(``--fuzz-long`` or ``DBSP_FUZZ_LONG=1`` runs 20x as many; see docs/reliability.md).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbsp import SparseMask, reference_attention, sparse_attention
from dbsp.dist import merge_attention, merge_attention_
from dbsp.dist.layout import block_token_ids, sub_masks
from dbsp.plan import PlanCache, Plan, choose_degrees, imbalance_ratio, make_plan, tile_work
from harness import assert_lowp_close, max_abs_err, sdpa_oracle, token_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fuzz_settings(ci: int, **kwargs) -> settings:
    """``ci`` examples under the CI profile (max_examples 100), scaled for the others (long: 20x)."""
    return settings(max_examples=max(1, ci * settings.default.max_examples // 100), **kwargs)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------- strategies

ROW_KINDS = ("random", "empty", "full", "single key", "last tile")


@st.composite
def attention_cases(draw, *, q_blocks, max_s, max_b=2, max_h=3, head_dims=(1, 3, 8, 16, 32), dtypes=("float64",)):
    """Sizes, granularity, dtype and a seed; :func:`build` turns them into q, k, v and a mask."""
    q_block = draw(st.sampled_from(q_blocks))
    sq = draw(st.integers(1, max_s))
    return {
        "B": draw(st.integers(1, max_b)),
        "H": draw(st.integers(1, max_h)),
        "Sq": sq,
        "Skv": draw(st.one_of(st.just(sq), st.integers(1, max_s))),  # self- and cross-attention
        "D": draw(st.sampled_from(head_dims)),
        "q_block": q_block,
        "kv_tile": draw(st.sampled_from(divisors(q_block))),
        "density": draw(st.floats(0.0, 1.0)),
        "row_kinds": draw(st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=3, unique=True)),
        "dtype": draw(st.sampled_from(dtypes)),
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        "strided": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def build_mask(case, gen: torch.Generator) -> SparseMask:
    """A mask whose query blocks each follow one of ``case["row_kinds"]`` (empty rows, full rows,
    rows with one key tile, rows with only the partial last tile, random rows at ``density``)."""
    B, H, M, N = case["B"], case["H"], case["q_block"], case["kv_tile"]
    mq, nt = -(-case["Sq"] // M), -(-case["Skv"] // N)
    tiles = torch.rand(B, H, mq, nt, generator=gen) < case["density"]
    kinds = [ROW_KINDS.index(k) for k in case["row_kinds"]]
    pick = torch.tensor(kinds)[torch.randint(len(kinds), (B, H, mq), generator=gen)]
    single = torch.zeros(B, H, mq, nt, dtype=torch.bool)
    single.scatter_(3, torch.randint(nt, (B, H, mq, 1), generator=gen), True)
    last = torch.zeros(B, H, mq, nt, dtype=torch.bool)
    last[..., -1] = True
    for kind, rows in ((1, torch.zeros_like(tiles)), (2, torch.ones_like(tiles)), (3, single), (4, last)):
        tiles = torch.where((pick == kind)[..., None], rows, tiles)
    return SparseMask.from_dense(tiles, q_block=M, kv_tile=N, seq_len_q=case["Sq"], seq_len_kv=case["Skv"])


def _tensor(shape, dtype, gen, strided):
    """``(B, S, H, D)`` random values; with ``strided`` a non-contiguous view (heads-major storage,
    every other channel), as a slice of a fused projection or a transposed layout gives."""
    B, S, H, D = shape
    if not strided:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    base = torch.randn(B, H, S, 2 * D, generator=gen, dtype=torch.float64).to(dtype)
    return base[..., ::2].transpose(1, 2)


def build(case):
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, D, dtype = case["B"], case["H"], case["D"], DTYPES[case["dtype"]]
    q = _tensor((B, case["Sq"], H, D), dtype, gen, case["strided"])
    k = _tensor((B, case["Skv"], H, D), dtype, gen, case["strided"])
    v = _tensor((B, case["Skv"], H, D), dtype, gen, False)
    return q, k, v, build_mask(case, gen)


def _empty_rows(mask) -> torch.Tensor:
    """``(B, H, Sq)`` bool: query rows that select no key."""
    return ~token_mask(mask).any(-1)


def _check_empty_rows(out, lse, mask):
    empty = _empty_rows(mask)
    assert bool((out.transpose(1, 2)[empty] == 0).all()), "a row that selects nothing must return 0"
    assert bool((lse[empty] == float("-inf")).all()), "a row that selects nothing must have lse = -inf"
    assert not bool(torch.isinf(lse[~empty]).any()), "a row that selects keys must have a finite lse"


# ---------------------------------------------------------------------------------- attention


@fuzz_settings(100)
@given(case=attention_cases(q_blocks=(1, 2, 3, 4, 5, 8, 16, 32, 64), max_s=150, dtypes=("float64", "float32")))
def test_reference_matches_sdpa_oracle(case):
    """reference_attention equals torch SDPA with the token mask; "auto" on CPU is the reference, bit for bit."""
    q, k, v, mask = build(case)
    out, lse = reference_attention(q, k, v, mask, scale=case["scale"])
    oracle, oracle_lse = sdpa_oracle(q, k, v, mask, scale=case["scale"])
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == (case["B"], case["H"], case["Sq"])
    if q.dtype == torch.float64:
        assert max_abs_err(out, oracle) < 1e-10 and max_abs_err(lse, oracle_lse) < 1e-10
    else:
        torch_fp32, _ = sdpa_oracle(q, k, v, mask, scale=case["scale"], dtype=torch.float32)
        assert_lowp_close(out, oracle, torch_fp32, atol=1e-6)
        assert max_abs_err(lse, oracle_lse) < 1e-4
    _check_empty_rows(out, lse, mask)
    for backend in ("auto", "reference"):
        got, got_lse = sparse_attention(q, k, v, mask, scale=case["scale"], return_lse=True, backend=backend)
        if DEVICE == "cpu" or backend == "reference":
            assert torch.equal(got, out) and torch.equal(got_lse, lse), backend


@fuzz_settings(30)
@given(case=attention_cases(q_blocks=(2, 8, 16, 32), max_s=100, max_h=2, head_dims=(8, 16), dtypes=("float16", "bfloat16")))
def test_reference_low_precision_within_twice_torch_error(case):
    """fp16/bf16 inputs: the reference's error against the fp64 oracle is at most 2x torch SDPA's own."""
    q, k, v, mask = build(case)
    out = sparse_attention(q, k, v, mask, scale=case["scale"])
    oracle, _ = sdpa_oracle(q, k, v, mask, scale=case["scale"])
    torch_lowp, _ = sdpa_oracle(q, k, v, mask, scale=case["scale"], dtype=q.dtype)
    assert out.dtype == q.dtype
    assert_lowp_close(out, oracle, torch_lowp, atol=1e-3)


@fuzz_settings(30)
@given(case=attention_cases(q_blocks=(16, 32, 64), max_s=70, max_h=2, head_dims=(16, 32), dtypes=("float32", "float16")))
def test_triton_kernel_matches_reference(case):
    """The Triton kernel (the interpreter on CPU) against reference_attention: every kv_tile from 1
    to q_block, Sq != Skv, partial tiles, empty / full / single-key rows, strided inputs.

    bf16 is left out on CPU: Triton 3.6's interpreter computes bf16 ``tl.dot`` wrongly (see
    tests/test_kernels.py); the GPU run covers it.
    """
    q, k, v, mask = build(case)
    q, k, v, mask = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE)
    out, lse = sparse_attention(q, k, v, mask, scale=case["scale"], return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, mask, scale=case["scale"])
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    _check_empty_rows(out.cpu(), lse.cpu(), mask.to("cpu"))
    if q.dtype == torch.float32:
        assert max_abs_err(out, ref) < 2e-5 and max_abs_err(lse, ref_lse) < 2e-5
    else:
        oracle, oracle_lse = sdpa_oracle(q, k, v, mask, scale=case["scale"])
        torch_lowp, _ = sdpa_oracle(q, k, v, mask, scale=case["scale"], dtype=q.dtype)
        assert_lowp_close(out, oracle, torch_lowp, atol=1e-3)
        # fp16 products with fp32 accumulation: the lse is off by at most a few fp16 ulps of a score.
        assert max_abs_err(lse, oracle_lse) < 1e-2


# ---------------------------------------------------------------------------------- non-finite inputs


def _poison(q, k, v, gen, where):
    """Copies of q, k, v with a few NaN/inf entries; returns them and the poisoned positions."""
    q, k, v = q.clone(), k.clone(), v.clone()
    spots = {"q": [], "k": [], "v": []}
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        name = where[int(torch.randint(len(where), (1,), generator=gen))]
        t = {"q": q, "k": k, "v": v}[name]
        pos = tuple(int(torch.randint(n, (1,), generator=gen)) for n in t.shape)
        value = (float("nan"), float("inf"), float("-inf"))[int(torch.randint(3, (1,), generator=gen))]
        t[pos] = value
        spots[name].append((pos, value))
    return q, k, v, spots


def _policy_check(q, k, v, mask, backend, seed, *, check_lse=True, exact=False):
    """The NaN/inf policy: rows (and channels) that do not read a poisoned value equal the clean
    run (bit for bit with ``exact``; else up to rounding, because CPU BLAS may round the scores of
    other keys differently once one key holds NaN); rows that read a NaN return NaN there."""
    gen = torch.Generator().manual_seed(seed)
    clean, clean_lse = sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
    pq, pk, pv, spots = _poison(q, k, v, gen, ("q", "k", "v"))
    out, lse = sparse_attention(pq, pk, pv, mask, return_lse=True, backend=backend)
    tok = token_mask(mask.to("cpu"))  # (B, H, Sq, Skv)
    B, Sq, H, D = q.shape
    touched = torch.zeros(B, Sq, H, D, dtype=torch.bool)  # output entries that read a poisoned value
    nan_out = torch.zeros(B, Sq, H, D, dtype=torch.bool)  # ... and must be NaN
    row_nan = torch.zeros(B, H, Sq, dtype=torch.bool)  # lse entries that must be NaN
    selects = tok.any(-1)  # (B, H, Sq)
    for (b, i, h, _), value in spots["q"]:  # a query value reaches its own row only, if it selects anything
        if selects[b, h, i]:
            touched[b, i, h] = True
            if math.isnan(value):
                nan_out[b, i, h] = row_nan[b, h, i] = True
    for (b, j, h, _), value in spots["k"]:  # a key value reaches the rows that select that key
        rows = tok[b, h, :, j]
        touched[b, rows, h] = True
        if math.isnan(value):
            nan_out[b, rows, h] = True
            row_nan[b, h, rows] = True
    for (b, j, h, d), value in spots["v"]:  # a value reaches channel d of the rows that select it
        rows = tok[b, h, :, j]
        touched[b, rows, h, d] = True
        if math.isnan(value):
            nan_out[b, rows, h, d] = True
    out, lse, clean, clean_lse = out.cpu(), lse.cpu(), clean.cpu(), clean_lse.cpu()
    tol = 0.0 if exact else (1e-12 if q.dtype == torch.float64 else 1e-5)

    def same(a, b):
        return torch.equal(a, b) if exact else max_abs_err(a, b) <= tol and torch.equal(torch.isfinite(a), torch.isfinite(b))

    assert same(out[~touched], clean[~touched]), "a poisoned value reached a row that does not select it"
    assert bool(torch.isnan(out[nan_out]).all()), "NaN in a selected input must propagate to the output"
    if check_lse:
        lse_touched = touched.any(-1).transpose(1, 2)
        assert same(lse[~lse_touched], clean_lse[~lse_touched])
        assert bool(torch.isnan(lse[row_nan]).all()), "NaN in a selected query or key must propagate to the lse"


@fuzz_settings(40)
@given(case=attention_cases(q_blocks=(1, 4, 16, 32), max_s=80, max_h=2, head_dims=(4, 16), dtypes=("float64", "float32")))
def test_nan_inf_policy_reference(case):
    """Reference/auto backend: non-finite values reach exactly the rows that read them."""
    q, k, v, mask = build(case)
    _policy_check(q, k, v, mask, "auto", case["seed"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN through the interpreter's numpy
@fuzz_settings(10)
@given(case=attention_cases(q_blocks=(16, 32), max_s=48, max_h=2, head_dims=(16,), dtypes=("float32",)))
def test_nan_inf_policy_triton_output(case):
    """Triton kernel: the kernel reads only selected keys, so the output obeys the policy."""
    q, k, v, mask = build(case)
    _policy_check(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), "triton", case["seed"], check_lse=False, exact=True)


def test_triton_lse_propagates_nan():
    B, S, H, D = 1, 32, 1, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(DEVICE) for _ in range(3))
    k[0, 5, 0, 2] = float("nan")  # a key every row selects
    mask = SparseMask.full(B, H, S, S, q_block=16, kv_tile=4).to(DEVICE)
    out, lse = sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    assert bool(torch.isnan(out).all())
    assert bool(torch.isnan(lse).all())


# ---------------------------------------------------------------------------------- masks


@fuzz_settings(80)
@given(case=attention_cases(q_blocks=(1, 3, 4, 16, 32), max_s=140, max_b=2, max_h=4))
def test_mask_conversions_round_trip(case):
    """from_dense / to_dense / the CSR constructor / select_heads / to() agree with the tile picture."""
    gen = torch.Generator().manual_seed(case["seed"])
    mask = build_mask(case, gen)
    dense = mask.to_dense()
    again = SparseMask(mask.offsets.clone(), mask.indices.clone(), mask.q_block, mask.kv_tile, mask.seq_len_q, mask.seq_len_kv)
    assert torch.equal(again.to_dense(), dense)
    rebuilt = SparseMask.from_dense(dense, q_block=mask.q_block, kv_tile=mask.kv_tile, seq_len_q=mask.seq_len_q, seq_len_kv=mask.seq_len_kv)
    assert torch.equal(rebuilt.offsets, mask.offsets) and torch.equal(rebuilt.indices, mask.indices)
    assert torch.equal(mask.row_counts(), dense.sum(-1))
    assert torch.equal(mask.to("cpu").to_dense(), dense)
    perm = torch.randperm(case["H"], generator=gen)[: int(torch.randint(1, case["H"] + 1, (1,), generator=gen))]
    picked = mask.select_heads(perm)
    assert torch.equal(picked.to_dense(), dense[:, perm])
    assert torch.equal(picked.work(), mask.work()[:, perm])
    picked.validate()
    tok = token_mask(mask)
    assert mask.density() == pytest.approx(tok.double().mean().item(), abs=1e-12)


CORRUPTIONS = ("unsorted", "duplicate", "index too large", "negative index", "offsets decrease",
               "last offset", "first offset", "chain")


@fuzz_settings(60)
@given(case=attention_cases(q_blocks=(2, 4, 8), max_s=60, max_b=2, max_h=3), kind=st.sampled_from(CORRUPTIONS))
def test_corrupted_csr_is_always_rejected(case, kind):
    """A CSR that breaks an invariant never becomes a SparseMask: ValueError, never silent acceptance."""
    case = {**case, "density": 1.0, "row_kinds": ["full"]}  # every row holds every tile: room to corrupt
    mask = build_mask(case, torch.Generator().manual_seed(case["seed"]))
    off, idx = mask.offsets.clone(), mask.indices.clone()
    nt, rows = mask.num_kv_tiles, off.reshape(-1, off.shape[-1])
    if kind in ("unsorted", "duplicate") and nt < 2:
        kind = "index too large"
    if kind == "chain" and rows.shape[0] < 2:
        kind = "first offset"
    if kind == "unsorted":
        idx[0], idx[1] = idx[1].clone(), idx[0].clone()
    elif kind == "duplicate":
        idx[1] = idx[0]
    elif kind == "index too large":
        idx[-1] = nt
    elif kind == "negative index":
        idx[0] = -1
    elif kind == "offsets decrease":
        rows[0, 1] = rows[0, 2] + 1 if rows.shape[1] > 2 else -1
    elif kind == "last offset":
        rows[-1, -1] += 1
    elif kind == "first offset":
        rows[0, 0] = 1
    else:
        rows[1, 0] += 1
    with pytest.raises(ValueError):
        SparseMask(rows.reshape(off.shape), idx, mask.q_block, mask.kv_tile, mask.seq_len_q, mask.seq_len_kv)


@fuzz_settings(60)
@given(case=attention_cases(q_blocks=(1, 4, 16), max_s=120, max_b=2, max_h=3), parts=st.integers(1, 4))
def test_sub_masks_are_the_token_picture_of_their_blocks(case, parts):
    """dbsp.dist.layout.sub_masks (what each ring step computes) cuts the global token picture exactly."""
    case = {**case, "Skv": case["Sq"]}
    gen = torch.Generator().manual_seed(case["seed"])
    mask = build_mask(case, gen)
    S, M, nb = mask.seq_len_q, mask.q_block, mask.num_q_blocks
    q_blocks = sorted(torch.randperm(nb, generator=gen)[: int(torch.randint(1, nb + 1, (1,), generator=gen))].tolist())
    owner = torch.randint(parts, (nb,), generator=gen)
    groups = [sorted(torch.nonzero(owner == g).flatten().tolist()) for g in range(parts)]
    tok = token_mask(mask)
    rows = block_token_ids(q_blocks, S, M)
    for g, sub in zip(groups, sub_masks(mask, q_blocks, groups)):
        expected = tok[:, :, rows][..., block_token_ids(g, S, M)]
        if sub is None:
            assert not bool(expected.any())
        else:
            sub.validate()
            assert torch.equal(token_mask(sub), expected)


@fuzz_settings(60)
@given(case=attention_cases(q_blocks=(1, 4, 16), max_s=100, max_h=2, head_dims=(4, 16)))
def test_merge_attention_of_disjoint_parts_is_exact(case):
    """Attention over two disjoint key sets, merged by log-sum-exp, equals attention over their union."""
    q, k, v, mask = build(case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    dense = mask.to_dense()
    side = torch.rand(dense.shape, generator=gen) < 0.5
    sizes = dict(q_block=mask.q_block, kv_tile=mask.kv_tile, seq_len_q=mask.seq_len_q, seq_len_kv=mask.seq_len_kv)
    a = SparseMask.from_dense(dense & side, **sizes)
    b = SparseMask.from_dense(dense & ~side, **sizes)
    out_a, lse_a = reference_attention(q, k, v, a)
    out_b, lse_b = reference_attention(q, k, v, b)
    out_a = torch.where(torch.isinf(lse_a).transpose(1, 2)[..., None], float("nan"), out_a)  # empty parts: garbage ignored
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = reference_attention(q, k, v, mask)
    assert max_abs_err(out, ref) < 1e-12 and max_abs_err(lse, ref_lse) < 1e-12
    assert not bool(torch.isnan(out).any())
    # In place, the same bits; the one-pass kernel on float32 parts, the same to float32 rounding.
    running = (out_a.clone(), lse_a.to(out_a.dtype).clone())
    got = merge_attention_(*running, out_b, lse_b)
    assert got[0] is running[0] and got[1] is running[1]
    assert torch.equal(running[0], out) and torch.equal(running[1], lse)
    from dbsp.kernels.merge import merge_into

    f32 = out_a.float(), lse_a.float(), out_b.float(), lse_b.float()
    want, want_lse = merge_attention(*f32)
    merge_into(*f32)
    assert max_abs_err(f32[0], want) < 1e-5 and torch.equal(torch.isneginf(f32[1]), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert max_abs_err(f32[1][finite], want_lse[finite]) < 1e-5


# ---------------------------------------------------------------------------------- planner


@st.composite
def plan_cases(draw):
    H = draw(st.integers(1, 8))
    divs = divisors(H)
    uneven = draw(st.booleans())
    U = draw(st.integers(1, H)) if uneven else draw(st.sampled_from(divs))
    q_block = draw(st.sampled_from((4, 8, 16)))
    S = draw(st.integers(q_block, 24 * q_block))
    nb = -(-S // q_block)
    return {
        "H": H, "U": U, "R": draw(st.integers(1, min(nb, 6))), "S": S, "q_block": q_block,
        "kv_tile": draw(st.sampled_from(divisors(q_block))), "uneven": uneven and H % U != 0,
        "density": draw(st.floats(0.0, 1.0)), "skew": draw(st.floats(0.0, 1.0)),
        "reward": draw(st.sampled_from((0.0, 0.5, 2.0, math.inf))), "B": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _skewed_mask(case):
    """Heads and query blocks of very different density, so balancing has work to do."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, S, M, N = case["B"], case["H"], case["S"], case["q_block"], case["kv_tile"]
    mq, nt = -(-S // M), -(-S // N)
    head_rate = torch.rand(1, H, 1, 1, generator=gen) ** (1 + 4 * case["skew"])
    row_rate = torch.rand(1, 1, mq, 1, generator=gen) ** (1 + 4 * case["skew"])
    tiles = torch.rand(B, H, mq, nt, generator=gen) < case["density"] * head_rate * row_rate
    return SparseMask.from_dense(tiles, q_block=M, kv_tile=N, seq_len_q=S, seq_len_kv=S)


def _brute_tiles(work: torch.Tensor, plan: Plan) -> torch.Tensor:
    """W[k, i, j] straight from the definition: heads of group k, q blocks of i, kv blocks of j."""
    w = work.to(torch.int64).sum(0)  # (H, NB, NB)
    U, R = plan.ulysses, plan.ring
    out = torch.zeros(U, R, R, dtype=torch.int64)
    for k in range(U):
        heads = list(plan.head_group(k))
        for i in range(R):
            for j in range(R):
                qb, kb = list(plan.q_blocks[k][i]), list(plan.kv_blocks[k][j])
                out[k, i, j] = w[heads][:, qb][:, :, kb].sum()
    return out


def _brute_rho(W: torch.Tensor) -> float:
    U, R, _ = W.shape
    total = int(W.sum())
    if total == 0:
        return 1.0
    times = [sum(max(int(W[k, i, (i + t) % R]) for i in range(R)) for t in range(R)) for k in range(U)]
    return max(times) * U * R / total


@fuzz_settings(80)
@given(case=plan_cases())
def test_planner_invariants(case):
    """make_plan: a valid partition with exact tile work, rho_s >= 1, never worse than the unplanned
    layout, deterministic, and stable through a plain-list round trip."""
    mask = _skewed_mask(case)
    U, R = case["U"], case["R"]
    plan = make_plan(mask, ulysses=U, ring=R, reward=case["reward"], uneven_heads=case["uneven"], world=U * R)
    layout = {f: getattr(plan, f) for f in ("ulysses", "ring", "heads", "q_block", "seq_len")}
    as_lists = Plan(**layout, head_perm=list(plan.head_perm), head_offsets=list(plan.head_offsets),
                    q_blocks=[[list(b) for b in g] for g in plan.q_blocks],
                    kv_blocks=[[list(b) for b in g] for g in plan.kv_blocks])  # validates every invariant
    assert as_lists == plan and as_lists.fingerprint() == plan.fingerprint()
    work = mask.work()
    W = _brute_tiles(work, plan)
    assert torch.equal(plan.tile_work, W) and torch.equal(tile_work(mask, plan), W)
    assert int(W.sum()) == int(work.to(torch.int64).sum())
    rho = plan.imbalance()
    assert rho == pytest.approx(_brute_rho(W), rel=1e-12) and rho >= 1.0 - 1e-12
    if not case["uneven"]:
        assert rho <= imbalance_ratio(mask, ulysses=U, ring=R) * (1 + 1e-12)
    if case["reward"] == math.inf:
        assert plan.moved_blocks("q") == plan.moved_blocks("kv") == 0
    again = make_plan(mask, ulysses=U, ring=R, reward=case["reward"], uneven_heads=case["uneven"])
    assert again.fingerprint() == plan.fingerprint() and torch.equal(again.tile_work, plan.tile_work)


@fuzz_settings(30)
@given(case=plan_cases(), world=st.sampled_from((1, 2, 3, 4, 6, 8)))
def test_degree_choice_and_plan_cache(case, world):
    """choose_degrees returns a valid factorisation of the world; PlanCache returns the very same plan
    for the same mask and a plan for the new degrees when they change."""
    mask = _skewed_mask(case)
    H, nb = case["H"], mask.num_q_blocks
    allowed = [(u, world // u) for u in divisors(world) if H % u == 0 and world // u <= nb]
    if not allowed:
        with pytest.raises(ValueError, match="no \\(ulysses, ring\\)"):
            choose_degrees(mask, world=world, heads=H)
        return
    u, r, plan = choose_degrees(mask, world=world, heads=H)
    assert (u, r) in allowed and (plan.ulysses, plan.ring) == (u, r)
    assert torch.equal(plan.tile_work, _brute_tiles(mask.work(), plan))
    cache = PlanCache()
    first = cache.get("layer", mask, ulysses=u, ring=r)
    assert cache.get("layer", mask, ulysses=u, ring=r) is first and (cache.hits, cache.misses) == (1, 1)


@fuzz_settings(20)
@given(heads=st.integers(1, 3), seq_len=st.integers(1, 400), q_block=st.sampled_from((16, 32)),
       frames=st.integers(1, 6), seed=st.integers(0, 1000), step=st.integers(0, 30))
def test_synthetic_work_equals_the_mask_work(heads, seq_len, q_block, frames, seed, step):
    """dbsp.simulate.synthetic_work (built without a mask) equals SparseMask.work() of its tiles."""
    from dbsp.simulate import synthetic_tiles, synthetic_work

    kw = dict(heads=heads, seq_len=seq_len, q_block=q_block, frames=frames, seed=seed, step=step)
    tiles = synthetic_tiles(**kw)
    mask = SparseMask.from_dense(tiles, q_block=q_block, kv_tile=q_block, seq_len_q=seq_len, seq_len_kv=seq_len)
    assert torch.equal(synthetic_work(**kw), mask.work())


# ---------------------------------------------------------------------------------- mask prediction


@fuzz_settings(30)
@given(case=attention_cases(q_blocks=(4, 8, 16), max_s=90, max_h=2, head_dims=(8, 16), dtypes=("float32",)),
       top_p=st.floats(0.05, 1.0), keep_diagonal=st.booleans(),
       budget=st.sampled_from([{}, {"max_keep": 2}, {"min_keep": 3}, {"min_keep": 2, "max_keep": 4}]))
def test_predicted_masks_are_valid(case, top_p, keep_diagonal, budget):
    """dbsp.predict.predict_mask (through its public function) always returns a valid mask of the right
    sizes; top_p = 1 keeps everything; keep_diagonal keeps the tiles at each block's own positions;
    without forced tiles every query block keeps between min_keep and max_keep tiles."""
    from dbsp.predict import predict_mask

    q, k, _, _ = build(case)
    M, N = case["q_block"], case["kv_tile"]
    mask = predict_mask(q, k, q_block=M, kv_tile=N, top_p=top_p, keep_diagonal=keep_diagonal, dense_above=None, **budget)
    SparseMask(mask.offsets, mask.indices, M, N, case["Sq"], case["Skv"])  # every CSR invariant
    assert (mask.batch, mask.heads, mask.seq_len_q, mask.seq_len_kv) == (case["B"], case["H"], case["Sq"], case["Skv"])
    counts = mask.row_counts()
    assert int(counts.min()) >= min(max(1, budget.get("min_keep", 1)), mask.num_kv_tiles)
    if not keep_diagonal and top_p < 1.0:  # top_p = 1 returns the full mask whatever the budget
        assert int(counts.max()) <= budget.get("max_keep", mask.num_kv_tiles)
    if top_p >= 1.0:
        assert mask.density() == 1.0
    if keep_diagonal:
        tok = token_mask(mask)
        n = min(case["Sq"], case["Skv"])
        diagonal = tok[:, :, torch.arange(n), torch.arange(n)]
        assert bool(diagonal.all())
