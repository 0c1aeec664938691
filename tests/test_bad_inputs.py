"""The validation audit: one test per kind of bad input, each with the exact error users get.

``CASES`` is the table of docs/reliability.md ("Bad inputs"): the kind, the call, the exception
type and the message pattern. ``test_the_docs_table_lists_every_kind`` keeps the two in step.
Distributed kinds (inputs that differ across ranks, degrees against the world size) need
processes and live in tests/test_faults.py; the table lists them too.
"""

import builtins
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from dbsp import SparseMask, reference_attention, sparse_attention
from dbsp.plan import CostModel, Plan, PlanCache, choose_degrees, imbalance_ratio, make_plan, tile_work

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"


def qkv(b=1, sq=40, skv=40, h=2, d=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, s, h, d, generator=gen, dtype=dtype) for s in (sq, skv, skv))


def full(b=1, h=2, sq=40, skv=40, q_block=16, kv_tile=4):
    return SparseMask.full(b, h, sq, skv, q_block=q_block, kv_tile=kv_tile)


def csr(offsets, indices, *, q_block=4, kv_tile=4, sq=8, skv=12):
    """``SparseMask(...)`` from plain lists: one batch, one head unless offsets say otherwise."""
    return lambda: SparseMask(torch.tensor(offsets), torch.tensor(indices), q_block, kv_tile, sq, skv)


def attend(*, backend="auto", q=None, k=None, v=None, mask=None, **kw):
    dq, dk, dv = qkv()
    return lambda: sparse_attention(
        dq if q is None else q, dk if k is None else k, dv if v is None else v,
        full() if mask is None else mask, backend=backend, **kw,
    )


def work(h=4, nb=6, q_block=8):
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, q_block * q_block, (1, h, nb, nb), generator=gen, dtype=torch.int32)


def plan_mask(h=4, s=48, q_block=8, sq=None):
    return SparseMask.full(1, h, s if sq is None else sq, s, q_block=q_block)


def hide_module(monkeypatch, *names):
    """Make ``import name`` fail as if the package were not installed."""
    for name in list(sys.modules):
        if name in names or any(name.startswith(n + ".") for n in names):
            monkeypatch.delitem(sys.modules, name)
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name in names or any(name.startswith(n + ".") for n in names):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


@dataclass(frozen=True)
class Case:
    kind: str  # the row of the docs table
    call: str  # the call as the table shows it
    run: Callable[[], object]
    error: type
    match: str


# ---------------------------------------------------------------------------------- the table

CASES = [
    # Attention inputs: sparse_attention and reference_attention share the checks.
    Case("q is not a tensor", "sparse_attention([[1.0]], k, v, mask)",
         attend(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    Case("wrong number of dims", "sparse_attention(q[0], k, v, mask)",
         attend(q=qkv()[0][0]), ValueError, r"q must have 4 dims \(B, S, H, D\), got 3 dims with shape \(40, 2, 16\)"),
    Case("integer dtype", "sparse_attention(q.long(), k, v, mask)",
         attend(q=qkv()[0].long()), TypeError, r"q must be a floating tensor \(float16, bfloat16, float32 or float64\), got torch.int64"),
    Case("mixed dtypes", "sparse_attention(q, k.double(), v.double(), mask)",
         attend(k=qkv()[1].double(), v=qkv()[2].double()), TypeError, r"k has dtype torch.float64 but q has torch.float32"),
    Case("k and v shapes differ", "sparse_attention(q, k, v[:, :39], mask)",
         attend(v=qkv()[2][:, :39]), ValueError, r"k and v must have the same shape \(B, Skv, H, D\), got k \(1, 40, 2, 16\) and v \(1, 39, 2, 16\)"),
    Case("q and k/v disagree on batch, heads or head dim", "sparse_attention(q, k[..., :8], v[..., :8], mask)",
         attend(k=qkv()[1][..., :8], v=qkv()[2][..., :8]), ValueError, r"q \(B, Sq, H, D\) = \(1, 40, 2, 16\) and k/v .* = \(1, 40, 2, 8\) must agree on batch, heads and head dim"),
    Case("empty sequence", "sparse_attention(q[:, :0], k, v, mask)",
         attend(q=qkv()[0][:, :0]), ValueError, r"empty attention input: q \(1, 0, 2, 16\)"),
    Case("tensors on different devices", "sparse_attention(q, k.to('meta'), v, mask)",
         attend(k=qkv()[1].to("meta")), ValueError, r"k is on meta but q is on cpu; move all three to one device"),
    Case("mask on another device", "sparse_attention(q, k, v, mask.to('meta'))",
         attend(mask=full().to("meta")), ValueError, r"mask is on meta but q is on cpu; use mask.to\(q.device\)"),
    Case("mask for another batch or head count", "sparse_attention(q, k, v, SparseMask.full(1, 3, 40, 40))",
         attend(mask=full(h=3)), ValueError, r"mask is for batch=1, heads=3 but q has batch=1, heads=2"),
    Case("mask for other sequence lengths", "sparse_attention(q, k, v, SparseMask.full(1, 2, 41, 40))",
         attend(mask=full(sq=41)), ValueError, r"mask is for seq_len_q=41, seq_len_kv=40 but q has Sq=40 and k has Skv=40"),
    Case("mask is not a SparseMask", "sparse_attention(q, k, v, torch.ones(1, 2, 40, 40, dtype=bool))",
         attend(mask=torch.ones(1, 2, 40, 40, dtype=torch.bool)), TypeError, r"mask must be a dbsp.SparseMask, got Tensor"),
    Case("scale not positive and finite", "sparse_attention(q, k, v, mask, scale=math.nan)",
         attend(scale=math.nan), ValueError, r"scale must be a finite positive number, got nan"),
    Case("scale of the wrong type", "sparse_attention(q, k, v, mask, scale='0.1')",
         attend(scale="0.1"), TypeError, r"scale must be a float or None, got str"),
    Case("out_dtype not a floating dtype", "sparse_attention(q, k, v, mask, out_dtype=torch.int32)",
         attend(out_dtype=torch.int32), TypeError, r"out_dtype must be None or one of .*, got torch.int32"),
    Case("unknown backend", "sparse_attention(q, k, v, mask, backend='cudnn')",
         attend(backend="cudnn"), ValueError, r"unknown backend 'cudnn'; known backends: 'auto', 'reference', 'triton'"),
    Case("float64 on the Triton backend", "sparse_attention(q64, k64, v64, mask, backend='triton')",
         attend(backend="triton", q=qkv(dtype=torch.float64)[0], k=qkv(dtype=torch.float64)[1], v=qkv(dtype=torch.float64)[2]),
         TypeError, r"the triton backend supports float16, bfloat16 and float32; got float64 \(use backend='reference'\)"),
    Case("q_block the Triton kernel cannot tile", "sparse_attention(q, k, v, SparseMask.full(1, 2, 40, 40, q_block=12), backend='triton')",
         attend(backend="triton", mask=full(q_block=12, kv_tile=4)), ValueError, r"the triton backend needs q_block to be a power of two >= 16, got 12"),
    # SparseMask: the constructor validates the CSR; from_dense, full, select_heads their arguments.
    Case("offsets not integer", "SparseMask(torch.tensor([[[0., 1., 2.]]]), indices, 4, 4, 8, 12)",
         csr([[[0.0, 1.0, 2.0]]], [0, 1]), TypeError, r"offsets must be an integer tensor, got torch.float32"),
    Case("indices not integer", "SparseMask(offsets, torch.tensor([0., 1.]), 4, 4, 8, 12)",
         csr([[[0, 1, 2]]], [0.0, 1.0]), TypeError, r"indices must be an integer tensor, got torch.float32"),
    Case("offsets of the wrong shape", "SparseMask(torch.tensor([[[0, 1]]]), indices, 4, 4, 8, 12)",
         csr([[[0, 1]]], [0]), ValueError, r"offsets must have shape \(B, H, Mq \+ 1\) with Mq = ceil\(seq_len_q / q_block\) = ceil\(8 / 4\) = 2; got \(1, 1, 2\)"),
    Case("offsets not starting at 0", "SparseMask(torch.tensor([[[1, 1, 2]]]), ...)",
         csr([[[1, 1, 2]]], [0, 1]), ValueError, r"offsets\[0, 0, 0\] must be 0, got 1"),
    Case("offsets decreasing", "SparseMask(torch.tensor([[[0, 2, 1]]]), ...)",
         csr([[[0, 2, 1]]], [0]), ValueError, r"offsets must be non-decreasing along the query-block axis"),
    Case("last offset is not nnz", "SparseMask(torch.tensor([[[0, 1, 3]]]), torch.tensor([0, 1]), ...)",
         csr([[[0, 1, 3]]], [0, 1]), ValueError, r"offsets\[-1, -1, -1\] must equal len\(indices\) = 2, got 3"),
    Case("offsets of (b, h) rows do not chain", "SparseMask(torch.tensor([[[0, 1, 1], [2, 2, 2]]]), torch.tensor([0, 1]), ...)",
         csr([[[0, 1, 1], [2, 2, 2]]], [0, 1]), ValueError, r"offsets must chain"),
    Case("index out of range", "SparseMask(offsets, torch.tensor([0, 3]), 4, 4, 8, 12)",
         csr([[[0, 1, 2]]], [0, 3]), ValueError, r"indices must lie in \[0, ceil\(seq_len_kv / kv_tile\)\) = \[0, 3\) for seq_len_kv=12, kv_tile=4; got min 0, max 3"),
    Case("negative index", "SparseMask(offsets, torch.tensor([-1, 0]), ...)",
         csr([[[0, 1, 2]]], [-1, 0]), ValueError, r"indices must lie in \[0, .* got min -1, max 0"),
    Case("index beyond int32", "SparseMask(offsets, torch.tensor([-(2**32) + 1, 0]), ...)  # would wrap to 1",
         csr([[[0, 1, 2]]], [-(2**32) + 1, 0]), ValueError, r"indices must fit in int32, got min -4294967295, max 0"),
    Case("indices unsorted in a row", "SparseMask(torch.tensor([[[0, 2, 2]]]), torch.tensor([2, 0]), ...)",
         csr([[[0, 2, 2]]], [2, 0]), ValueError, r"indices must be sorted and unique within each \(batch, head, query block\); position 1 holds 0 after 2 \(unsorted\)"),
    Case("indices duplicated in a row", "SparseMask(torch.tensor([[[0, 2, 2]]]), torch.tensor([1, 1]), ...)",
         csr([[[0, 2, 2]]], [1, 1]), ValueError, r"position 1 holds 1 after 1 \(duplicated\)"),
    Case("offsets and indices on different devices", "SparseMask(offsets, indices.to('meta'), ...)",
         lambda: SparseMask(torch.tensor([[[0, 1, 1]]]), torch.tensor([0], dtype=torch.int32).to("meta"), 4, 4, 8, 12),
         ValueError, r"offsets is on cpu but indices is on meta"),
    Case("kv_tile larger than q_block", "SparseMask.full(1, 1, 8, 8, q_block=4, kv_tile=8)",
         lambda: SparseMask.full(1, 1, 8, 8, q_block=4, kv_tile=8), ValueError, r"kv_tile must be <= q_block .* got kv_tile=8 > q_block=4"),
    Case("kv_tile not dividing q_block", "SparseMask.full(1, 1, 8, 8, q_block=6, kv_tile=4)",
         lambda: SparseMask.full(1, 1, 8, 8, q_block=6, kv_tile=4), ValueError, r"kv_tile must divide q_block .* got q_block=6, kv_tile=4 \(q_block % kv_tile = 2\)"),
    Case("block size not an int", "SparseMask.full(1, 1, 8, 8, q_block=4.0)",
         lambda: SparseMask.full(1, 1, 8, 8, q_block=4.0), TypeError, r"q_block must be an int >= 1, got float 4.0"),
    Case("sequence length below 1", "SparseMask.full(1, 1, 0, 8)",
         lambda: SparseMask.full(1, 1, 0, 8), ValueError, r"seq_len_q must be >= 1, got 0"),
    Case("dense picture of the wrong shape", "SparseMask.from_dense(torch.ones(1, 1, 3, 3, dtype=bool), q_block=4, kv_tile=4, seq_len_q=8, seq_len_kv=8)",
         lambda: SparseMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), q_block=4, kv_tile=4, seq_len_q=8, seq_len_kv=8),
         ValueError, r"dense must have shape .* = \(B, H, 2, 2\) for seq_len_q=8, q_block=4, seq_len_kv=8, kv_tile=4; got \(1, 1, 3, 3\)"),
    Case("dense picture not 0/1", "SparseMask.from_dense(2 * torch.ones(1, 1, 2, 2, dtype=int), ...)",
         lambda: SparseMask.from_dense(2 * torch.ones(1, 1, 2, 2, dtype=torch.int64), q_block=4, kv_tile=4, seq_len_q=8, seq_len_kv=8),
         ValueError, r"dense must hold only 0/1 \(or be a bool tensor\)"),
    Case("granularity of a mask from a trusted producer", "dbsp.integrations.diffusers.random_mask(1, 1, 8, density=0.5, q_block=3, kv_tile=2)",
         lambda: __import__("dbsp.integrations.diffusers", fromlist=["random_mask"]).random_mask(1, 1, 8, density=0.5, q_block=3, kv_tile=2),
         ValueError, r"kv_tile must divide q_block so key tiles never straddle a key block, got q_block=3, kv_tile=2"),
    Case("head ids out of range", "mask.select_heads([0, 2])  # 2 heads",
         lambda: full().select_heads([0, 2]), ValueError, r"heads must lie in \[0, 2\), got \[0, 2\]"),
    Case("Flex block size not a multiple of q_block", "mask.to_flex_block_mask(block_size=24)  # q_block 16",
         lambda: full().to_flex_block_mask(block_size=24), ValueError, r"block_size must be a multiple of q_block=16, got 24"),
    # The planner.
    Case("ulysses does not divide the heads", "make_plan(mask, ulysses=3, ring=2)  # 4 heads",
         lambda: make_plan(plan_mask(), ulysses=3, ring=2), ValueError, r"ulysses=3 must divide heads=4 \(heads % ulysses = 1\); pass uneven_heads=True"),
    Case("more Ulysses ranks than heads", "make_plan(mask, ulysses=8, ring=1, uneven_heads=True)  # 4 heads",
         lambda: make_plan(plan_mask(), ulysses=8, ring=1, uneven_heads=True), ValueError, r"ulysses=8 exceeds heads=4"),
    Case("more ring ranks than blocks", "make_plan(mask, ulysses=1, ring=8)  # 6 blocks",
         lambda: make_plan(plan_mask(), ulysses=1, ring=8), ValueError, r"ring=8 exceeds the number of blocks 6"),
    Case("degrees do not multiply to the world", "make_plan(mask, ulysses=2, ring=2, world=8)",
         lambda: make_plan(plan_mask(), ulysses=2, ring=2, world=8), ValueError, r"ulysses \* ring must equal world: 2 \* 2 = 4 != world=8"),
    Case("cross-attention mask to the planner", "make_plan(SparseMask.full(1, 4, 40, 48), ulysses=2, ring=2)",
         lambda: make_plan(plan_mask(sq=40), ulysses=2, ring=2), ValueError, r"planning needs self-attention masks; got seq_len_q=40, seq_len_kv=48"),
    Case("work tensor without its geometry", "make_plan(work, ulysses=2, ring=2)",
         lambda: make_plan(work(), ulysses=2, ring=2), TypeError, r"a work tensor needs q_block= and seq_len="),
    Case("work tensor of the wrong shape", "make_plan(work, ulysses=2, ring=2, q_block=8, seq_len=40)  # NB 6 vs 5",
         lambda: make_plan(work(), ulysses=2, ring=2, q_block=8, seq_len=40), ValueError, r"work must have shape \(B, H, NB, NB\) with NB = .* = 5; got \(1, 4, 6, 6\)"),
    Case("floating work tensor", "make_plan(work.float(), ...)",
         lambda: make_plan(work().float(), ulysses=2, ring=2, q_block=8, seq_len=48), TypeError, r"work must be an integer tensor"),
    Case("negative work", "make_plan(-work, ...)",
         lambda: make_plan(-work() - 1, ulysses=2, ring=2, q_block=8, seq_len=48), ValueError, r"work must hold non-negative counts"),
    Case("reward negative or NaN", "make_plan(mask, ulysses=2, ring=2, reward=math.nan)",
         lambda: make_plan(plan_mask(), ulysses=2, ring=2, reward=math.nan), ValueError, r"reward must be >= 0 \(R_b\), got nan"),
    Case("plan head order not a permutation", "Plan(..., head_perm=(0, 0, 1, 2), ...)",
         lambda: Plan(ulysses=1, ring=1, heads=4, q_block=8, seq_len=48, head_perm=(0, 0, 1, 2), head_offsets=(0, 4),
                      q_blocks=((tuple(range(6)),),), kv_blocks=((tuple(range(6)),),)),
         ValueError, r"head_perm must be a permutation of range\(heads=4\)"),
    Case("plan block lists not a partition", "Plan(..., q_blocks=(((0, 1, 2), (2, 3, 4)),), ...)",
         lambda: Plan(ulysses=1, ring=2, heads=4, q_block=8, seq_len=48, head_perm=(0, 1, 2, 3), head_offsets=(0, 4),
                      q_blocks=(((0, 1, 2), (2, 3, 4)),), kv_blocks=(((0, 1, 2), (3, 4, 5)),)),
         ValueError, r"q_blocks\[0\] must partition the block ids 0..5"),
    Case("plan built for another mask", "tile_work(mask_with_6_heads, plan_for_4_heads)",
         lambda: tile_work(plan_mask(h=6), make_plan(plan_mask(), ulysses=2, ring=2)), ValueError,
         r"work is for heads=6, num_blocks=6 .* but the plan is for heads=4, num_blocks=6"),
    Case("plan built for other degrees", "imbalance_ratio(mask, ulysses=4, ring=1, plan=plan_2x2)",
         lambda: imbalance_ratio(plan_mask(), ulysses=4, ring=1, plan=make_plan(plan_mask(), ulysses=2, ring=2)), ValueError,
         r"plan is for ulysses=2, ring=2, not ulysses=4, ring=1"),
    Case("no factorisation of the world fits", "choose_degrees(mask, world=16, heads=3)  # 6 blocks",
         lambda: choose_degrees(plan_mask(h=3), world=16, heads=3), ValueError,
         r"no \(ulysses, ring\) with ulysses \* ring = world=16, ulysses dividing heads=3 and ring <= num_blocks=6"),
    Case("plan cache without degrees", "PlanCache().get(0, mask)",
         lambda: PlanCache().get(0, plan_mask()), TypeError, r"PlanCache.get needs ulysses= and ring=, or world="),
    Case("cost model curve out of range", "CostModel(block_tflops=[(1.5, 300)], ...)",
         lambda: CostModel(block_tflops=[(1.5, 300.0)], fine_tflops=[(1.0, 300.0)], call_overhead_us=5.0,
                           comm_latency_us=5.0, nvlink_gbps=300.0, internode_gbps=25.0, gpus_per_node=8),
         ValueError, r"block_tflops needs at least one \[density, tflops\] pair with 0 <= density <= 1"),
    # Mask prediction (dbsp.predict, through its public function).
    Case("top_p outside (0, 1]", "predict_mask(q, k, top_p=0.0)",
         lambda: __import__("dbsp.predict", fromlist=["predict_mask"]).predict_mask(*qkv()[:2], q_block=16, kv_tile=16, top_p=0.0),
         ValueError, r"top_p must lie in \(0, 1\], got 0.0"),
    # The ring's in-place merge (dbsp.dist.merge_attention_).
    Case("merge parts of different shapes", "merge_attention_(out, lse, out_b[:, :-1], lse_b)",
         lambda: merge_into_parts(cut=True), ValueError,
         r"merge_attention_ needs out and out_b of one shape \(B, L, H, D\) and lse, lse_b of \(B, H, L\); got \(1, 40, 2, 16\), "
         r"\(1, 2, 40\), \(1, 39, 2, 16\), \(1, 2, 40\)"),
    Case("merge into a running result that cannot hold it", "merge_attention_(out.bfloat16(), lse, out_b, lse_b)",
         lambda: merge_into_parts(running=torch.bfloat16), TypeError,
         r"merge_attention_ writes into out and lse, which must be torch.float32 to hold the merge of torch.bfloat16 and "
         r"torch.float32 parts; got out torch.bfloat16, lse torch.float32"),
    Case("merge parts on different devices", "merge_attention_(out, lse, out_b.to('meta'), lse_b)",
         lambda: merge_into_parts(meta=True), ValueError, r"merge_attention_ needs all four tensors on one device"),
]


def merge_into_parts(*, cut=False, running=torch.float32, meta=False):
    from dbsp.dist import merge_attention_

    out, out_b = (torch.zeros(1, 40, 2, 16) for _ in range(2))
    lse, lse_b = torch.zeros(1, 2, 40), torch.zeros(1, 2, 40)
    out_b = out_b[:, :-1] if cut else out_b.to("meta") if meta else out_b
    return merge_attention_(out.to(running), lse, out_b, lse_b)

KINDS = [c.kind for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=KINDS)
def test_bad_input_gets_a_clear_error(case):
    with pytest.raises(case.error, match=case.match):
        case.run()


def test_reference_attention_has_the_same_checks():
    """reference_attention shares sparse_attention's boundary (the same helpers), spot-checked."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask is for batch=1, heads=3 but q has batch=1, heads=2"):
        reference_attention(q, k, v, full(h=3))
    with pytest.raises(TypeError, match=r"scale must be a float or None, got str"):
        reference_attention(q, k, v, full(), scale="0.1")


# ---------------------------------------------------------------------------------- kinds that need a set-up


def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    import dbsp.kernels.sparse_fwd as kernel

    monkeypatch.setattr(kernel, "is_interpreted", lambda: False)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"the triton backend needs CUDA tensors \(q is on cpu\); on CPU use backend='reference'"):
        sparse_attention(q, k, v, full(), backend="triton")


def test_gradient_through_the_triton_kernel():
    """The kernel is forward-only: backward raises torch's error, never a silent zero gradient."""
    q, k, v = (x.requires_grad_() for x in qkv())
    out = sparse_attention(q, k, v, full(), backend="triton")
    with pytest.raises(RuntimeError, match=r"no autograd formula was registered"):
        out.sum().backward()


def test_triton_not_installed(monkeypatch):
    hide_module(monkeypatch, "triton")
    for name in ("dbsp.kernels.op", "dbsp.kernels.sparse_fwd"):  # imported lazily: forget them for this test
        monkeypatch.delitem(sys.modules, name, raising=False)
    q, k, v = qkv()
    with pytest.raises(ImportError, match=r"backend='triton' needs Triton: pip install 'dbsp\[triton\]'"):
        sparse_attention(q, k, v, full(), backend="triton")
    assert sparse_attention(q, k, v, full()).shape == q.shape  # "auto" does not need it on CPU


def test_diffusers_not_installed(monkeypatch):
    from dbsp.integrations import diffusers as integration

    hide_module(monkeypatch, "diffusers")
    with pytest.raises(ImportError, match=r"needs diffusers >= 0.36: pip install 'dbsp\[diffusers\]'"):
        integration.apply(torch.nn.Linear(2, 2))


def test_unsupported_model_in_the_integration():
    pytest.importorskip("diffusers")
    from dbsp.integrations.diffusers import apply

    with pytest.raises(TypeError, match=r"apply supports WanTransformer3DModel and CogVideoXTransformer3DModel .* got Linear"):
        apply(torch.nn.Linear(2, 2))


def test_matplotlib_not_installed(monkeypatch, tmp_path):
    from dbsp.simulate import SimRow, plot

    hide_module(monkeypatch, "matplotlib")
    rows = [SimRow(8, "dbsp", 2, 4, 1.0, 1.0, 0)]
    with pytest.raises(ImportError, match=r"plotting the simulation needs matplotlib: pip install 'dbsp\[plot\]'"):
        plot(rows, tmp_path / "simulate.png", title="t")


def test_safetensors_not_installed(monkeypatch, tmp_path):
    from dbsp.capture import load_capture

    hide_module(monkeypatch, "safetensors")
    (tmp_path / "cap.safetensors").write_bytes(b"")
    with pytest.raises(ImportError, match=r"needs `pip install safetensors`"):
        load_capture(tmp_path / "cap.safetensors")


# ---------------------------------------------------------------------------------- accepted inputs


def test_strided_inputs_are_accepted_and_exact():
    """Non-contiguous q, k, v (slices of fused projections, transposed layouts) need no copy."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1, 2, 50, 64, generator=gen)  # heads-major storage
    q, k, v = (base[..., i * 16 : (i + 1) * 16].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    mask = full(sq=50, skv=50, q_block=16, kv_tile=1)
    for backend in ("reference", "triton"):
        got = sparse_attention(q, k, v, mask, backend=backend)
        ref = sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, backend=backend)
        assert torch.allclose(got, ref, atol=1e-6, rtol=0), backend


def test_strided_mask_csr_is_accepted_and_exact():
    """Bug found by this audit: a SparseMask built from non-contiguous offsets/indices views made
    the Triton kernel read the wrong entries (max error 2.1). The constructor now copies them."""
    gen = torch.Generator().manual_seed(6)
    tiles = torch.rand(1, 2, 3, 48, generator=gen) < 0.4
    m = SparseMask.from_dense(tiles, q_block=16, kv_tile=1, seq_len_q=48, seq_len_kv=48)
    wide_off = torch.zeros(*m.offsets.shape, 2, dtype=torch.int64)
    wide_off[..., 0] = m.offsets
    wide_idx = torch.zeros(m.nnz, 2, dtype=torch.int32)
    wide_idx[:, 0] = m.indices
    strided = SparseMask(wide_off[..., 0], wide_idx[:, 0], 16, 1, 48, 48)
    q, k, v = qkv(sq=48, skv=48)
    ref = reference_attention(q, k, v, m)[0]
    assert torch.allclose(sparse_attention(q, k, v, strided, backend="triton"), ref, atol=2e-5, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN through the Triton interpreter's numpy
def test_nan_and_inf_inputs_follow_the_documented_policy():
    """Not checked (no device sync on the hot path); they reach exactly the rows that read them.

    Bug found by this audit: the reference backend multiplied the zero weights of unselected
    keys with their values, so one inf/NaN value in a key nobody selected turned whole rows NaN.
    """
    q, k, v = qkv(sq=32, skv=32, h=1)
    tiles = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    tiles[0, 0, 0, 0] = True  # queries 0..15 read keys 0..15
    tiles[0, 0, 1, :] = True  # queries 16..31 read every key
    mask = SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=32, seq_len_kv=32)
    v = v.clone()
    v[0, 20, 0, 3] = math.inf
    q = q.clone()
    q[0, 31, 0, 0] = math.nan
    for backend in ("reference", "triton"):
        out = sparse_attention(q, k, v, mask, backend=backend)
        assert bool(torch.isfinite(out[0, :16]).all()), backend  # never read key 20
        assert not bool(torch.isfinite(out[0, 16:31, 0, 3]).any()), backend  # read inf in channel 3
        assert bool(torch.isfinite(out[0, 16:31, 0, :3]).all()), backend  # ... and only there
        assert bool(torch.isnan(out[0, 31]).all()), backend  # NaN query


# ---------------------------------------------------------------------------------- the docs table


def test_the_docs_table_lists_every_kind():
    """docs/reliability.md has one row per kind above, with the same exception type."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and line.startswith("|"):
            rows[cells[0]] = cells[2]
    for case in CASES:
        assert case.kind in rows, f"docs/reliability.md lacks a row for {case.kind!r}"
        assert re.search(rf"\b{case.error.__name__}\b", rows[case.kind]), (case.kind, rows[case.kind])
    assert len(CASES) >= 30
