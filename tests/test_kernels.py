"""The Triton kernel (interpreter on CPU, native on CUDA) against reference_attention."""

import math

import pytest
import torch

from dbsp import SparseMask, reference_attention, sparse_attention
from harness import build_for_hopper, max_abs_err, random_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(q, k, v, mask, *, atol=2e-5):
    out, lse = sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    ref, ref_lse = reference_attention(q, k, v, mask)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert lse.dtype == torch.float32 and out.dtype == q.dtype
    assert max_abs_err(out, ref) < atol, max_abs_err(out, ref)
    assert max_abs_err(lse, ref_lse) < atol, max_abs_err(lse, ref_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    return out, lse


@pytest.mark.parametrize(
    "sq, skv, q_block, kv_tile, d",
    [
        (1, 1, 16, 1, 16),
        (63, 63, 16, 2, 32),
        (97, 97, 32, 16, 16),
        (200, 97, 32, 1, 32),
        (97, 200, 16, 16, 64),
        (200, 200, 64, 64, 16),
        (63, 200, 32, 32, 24),  # head dim that is not a power of two
    ],
)
def test_kernel_matches_reference_fp32(sq, skv, q_block, kv_tile, d):
    B, H = 2, 2
    q = torch.randn(B, sq, H, d, device=DEVICE)
    k, v = torch.randn(B, skv, H, d, device=DEVICE), torch.randn(B, skv, H, d, device=DEVICE)
    mask = random_mask(B, H, sq, skv, q_block=q_block, kv_tile=kv_tile, density=0.4, device=DEVICE)
    _check(q, k, v, mask)


def test_empty_full_and_single_key_rows():
    B, H, S, D, M = 1, 3, 100, 16, 32
    tiles = torch.zeros(B, H, 4, S, dtype=torch.bool)
    tiles[0, 0] = True  # head 0: every key for every query block
    tiles[0, 1, 2, 57] = True  # head 1: one key for one block, the rest empty
    tiles[0, 2, 3, -1] = True  # head 2: only the very last key
    mask = SparseMask.from_dense(tiles, q_block=M, kv_tile=1, seq_len_q=S, seq_len_kv=S).to(DEVICE)
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE) for _ in range(3))
    out, lse = _check(q, k, v, mask)
    assert bool((out[0, :64, 1] == 0).all()) and bool((lse[0, 1, :64] == float("-inf")).all())
    assert torch.allclose(out[0, 64:96, 1], v[0, 57, 1].expand(32, D))


def test_partial_last_tile_and_strided_inputs():
    # Skv = 70 with kv_tile 16: the last tile holds 6 keys. Inputs are non-contiguous views.
    B, H, D = 1, 2, 32
    base = torch.randn(B, 90, H, 2 * D, device=DEVICE)
    q, k, v = base[:, :50, :, :D], base[:, 10:80, :, D:], base[:, 20:90, :, :D]
    tiles = torch.rand(B, H, 4, 5) < 0.5
    tiles[..., -1] = True
    mask = SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=50, seq_len_kv=70).to(DEVICE)
    _check(q, k, v, mask)


BF16_BROKEN_IN_INTERPRETER = pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton 3.6's interpreter computes bf16 tl.dot on raw bits (checked); bf16 runs on GPU"
)


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_BROKEN_IN_INTERPRETER)])
def test_low_precision_within_twice_torch_error(dtype):
    from harness import assert_lowp_close, sdpa_oracle, token_mask
    import torch.nn.functional as F

    B, S, H, D = 1, 97, 2, 32
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE) for _ in range(3))
    mask = random_mask(B, H, S, S, q_block=32, kv_tile=4, density=0.5, empty_rows=False, device=DEVICE)
    oracle, _ = sdpa_oracle(q, k, v, mask)
    lq, lk, lv = (x.to(dtype) for x in (q, k, v))
    out = sparse_attention(lq, lk, lv, mask, backend="triton")
    torch_lowp = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (lq, lk, lv)), attn_mask=token_mask(mask)
    ).transpose(1, 2)
    assert_lowp_close(out, oracle, torch_lowp, atol=1e-3)


@pytest.mark.parametrize("use_tma", [True, False])
def test_contiguous_tile_paths_with_fixed_config(use_tma):
    """Block tiles wider than BLOCK_N take the contiguous path (TMA descriptors or pointers)."""
    from dbsp.attention import _schedule
    from dbsp.kernels.sparse_fwd import sparse_fwd

    B, H, S, D = 1, 2, 150, 32  # S not a multiple of the tile: the last tile is partial
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE, dtype=torch.float16) for _ in range(3))
    mask = random_mask(B, H, S, S, q_block=64, kv_tile=64, density=0.6, device=DEVICE)
    config = dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2, USE_TMA=use_tma, WARP_SPEC=False)
    out, lse = sparse_fwd(q, k, v, mask.offsets, mask.indices, _schedule(mask).order, q_block=64, kv_tile=64,
                          seq_len_kv=S, scale=D**-0.5, config=config)
    ref, ref_lse = reference_attention(q.float(), k.float(), v.float(), mask)
    assert max_abs_err(out, ref) < 5e-3 and max_abs_err(lse, ref_lse) < 5e-3


def test_unsupported_inputs_raise():
    q = torch.randn(1, 20, 1, 16, device=DEVICE)
    mask = SparseMask.full(1, 1, 20, 20, q_block=12, kv_tile=4).to(DEVICE)
    with pytest.raises(ValueError, match=r"q_block to be a power of two >= 16, got 12"):
        sparse_attention(q, q, q, mask, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        sparse_attention(q.double(), q.double(), q.double(), SparseMask.full(1, 1, 20, 20, q_block=16).to(DEVICE), backend="triton")


def test_custom_op_under_torch_compile_matches_eager():
    from dbsp.kernels.op import sparse_attention_fwd  # noqa: F401  (registers torch.ops.dbsp)

    B, S, H, D = 1, 64, 2, 16
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE) for _ in range(3))
    mask = random_mask(B, H, S, S, q_block=16, kv_tile=4, density=0.5, device=DEVICE)

    def f(q, k, v):
        out = sparse_attention(q * 2.0, k, v, mask, backend="triton")
        return out.sin() + 1.0

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    assert max_abs_err(compiled, eager) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=BF16_BROKEN_IN_INTERPRETER)])
@pytest.mark.parametrize("kv_tile", [1, 16])
def test_float32_output_is_the_unrounded_kernel_result(dtype, kv_tile):
    """``out_dtype=float32``: the kernel stores its fp32 result, which rounds to its default output."""
    B, H, S, D = 1, 2, 90, 32
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE).to(dtype) for _ in range(3))
    mask = random_mask(B, H, S, S, q_block=16, kv_tile=kv_tile, density=0.4, device=DEVICE)
    low, lse = sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
    out32, lse32 = sparse_attention(q, k, v, mask, return_lse=True, backend="triton", out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and torch.equal(lse32, lse)
    assert torch.equal(out32.to(dtype), low)
    ref, _ = reference_attention(q, k, v, mask, out_dtype=torch.float32)
    assert max_abs_err(out32, ref) < 2e-3
    with pytest.raises(TypeError, match="triton backend writes out in q.dtype"):
        sparse_attention(q, k, v, mask, backend="triton", out_dtype=torch.float64)


CASES_TTIR = [(128, 1), (128, 16), (128, 128), (64, 1), (64, 64), (32, 4), (16, 16)]

_TTIR_SCRIPT = """
import sys
from dbsp.kernels import sparse_fwd as kmod

pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "OFFSETS": "*i64",
            "INDICES": "*i32", "ORDER": "*i32", "DESC_K": "*bf16", "DESC_V": "*bf16", "qk_scale": "fp32"}
built = 0
for q_block, kv_tile in CASES:
    # DESC_K is K: no TMA descriptors, so TMA configurations (which need descriptor arguments) are pruned.
    args = dict(DESC_K=None, K=None, NUM_KV_TILES=32760 // kv_tile, stride_ks=1536, stride_vs=1536)
    for c in kmod._prune(kmod.CONFIGS, args, Q_BLOCK=q_block, KV_TILE=kv_tile):
        const = dict(Q_BLOCK=q_block, KV_TILE=kv_tile, HEAD_DIM=128, BLOCK_D=128, IEEE=False, **c.kwargs)
        try:
            make_ir(kmod._sparse_fwd_kernel, pointers, const)
        except Exception as exc:
            sys.exit(f"q_block={q_block} kv_tile={kv_tile} {c.kwargs}: {exc}")
        built += 1
print(built)
"""


def test_every_autotuner_configuration_compiles_for_hopper():
    """The compiler front end accepts every configuration the autotuner may pick for sm_90 (the
    interpreter runs one configuration and checks no types: a type error would otherwise first
    surface on a GPU)."""
    out = build_for_hopper(f"CASES = {CASES_TTIR!r}\n" + _TTIR_SCRIPT)
    assert int(out.split()[-1]) >= len(CASES_TTIR) + 6  # gather cases carry their load variants


def test_off32_is_pruned_when_offsets_do_not_fit():
    from dbsp.kernels import sparse_fwd as kmod

    big = dict(DESC_K=object(), K=object(), NUM_KV_TILES=2**21, stride_ks=2**11, stride_vs=2**11)
    kept = kmod._prune(kmod.CONFIGS, big, Q_BLOCK=64, KV_TILE=1)
    assert kept and not any(c.kwargs["OFF32"] for c in kept)


def test_full_masks_record_their_full_heads_so_the_schedule_reads_nothing():
    from dbsp.attention import _schedule
    from dbsp.mask import _known_full_heads

    mask = SparseMask.full(2, 3, 150, 130, q_block=32, kv_tile=8)
    assert _known_full_heads(mask) == (0, 1, 2)
    assert bool((mask.row_counts() == mask.num_kv_tiles).all())  # what the record claims
    plan = _schedule(mask)
    assert plan.n_dense == 3 and plan.sparse_order is None


def test_moved_and_selected_masks_keep_a_true_full_head_record():
    """``.to()`` keeps the record, and ``select_heads`` maps it through the selection (reordered,
    repeated heads); the records must equal what the row counts say, and a mask without a
    record gives derived masks without one."""
    from dbsp.mask import _known_full_heads, _note_full_heads

    full = SparseMask.full(2, 3, 150, 130, q_block=32, kv_tile=8)
    sparse = SparseMask.from_dense(torch.rand(2, 1, 5, 17) < 0.4, q_block=32, kv_tile=8, seq_len_q=150, seq_len_kv=130)
    # Heads 0 and 2 full, head 1 sparse; the record is set as the predictor would set it.
    parts = [full.select_heads([0]), sparse, full.select_heads([2])]
    dense = torch.cat([p.to_dense() for p in parts], dim=1)
    mixed = _note_full_heads(SparseMask.from_dense(dense, q_block=32, kv_tile=8, seq_len_q=150, seq_len_kv=130), (0, 2))

    def truth(m):
        c = m.row_counts()
        return tuple(h for h in range(m.heads) if bool((c[:, h] == m.num_kv_tiles).all()))

    assert _known_full_heads(mixed) == truth(mixed) == (0, 2)
    for sel in ([2, 1, 0], [1], [2, 2, 1], torch.tensor([1, 0])):
        picked = mixed.select_heads(sel)
        assert _known_full_heads(picked) == truth(picked), sel
    moved = mixed.to(DEVICE).select_heads(torch.tensor([1, 2], device=DEVICE))
    assert moved.device.type == torch.device(DEVICE).type and _known_full_heads(moved) == truth(moved) == (1,)
    plain = SparseMask.from_dense(dense, q_block=32, kv_tile=8, seq_len_q=150, seq_len_kv=130)
    assert _known_full_heads(plain.to(DEVICE)) is None and _known_full_heads(plain.select_heads([0])) is None


@pytest.mark.parametrize("dense_heads", [(0,), (1, 2), (0, 2)], ids=["first", "consecutive", "apart"])
def test_mixed_dense_and_sparse_heads_run_in_place(dense_heads):
    """The dense/sparse head split (``backend="auto"`` on GPU): the kernel computes only the sparse
    heads' rows of the full output (in place, no head copies), SDPA the dense heads'; every row is
    written (outputs are NaN-poisoned) and equals the reference."""
    from dbsp.attention import _schedule, _split_dense_heads

    B, S, H, D = 2, 150, 3, 32
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(DEVICE) for _ in range(3))
    tiles = torch.rand(B, H, -(-S // 32), -(-S // 8), generator=g) < 0.4
    tiles[:, list(dense_heads)] = True
    mask = SparseMask.from_dense(tiles, q_block=32, kv_tile=8, seq_len_q=S, seq_len_kv=S).to(DEVICE)
    plan = _schedule(mask)
    assert plan.n_dense == len(dense_heads) and plan.sparse_order.numel() == B * (H - len(dense_heads)) * 5
    out = _split_dense_heads(q, k, v, mask, 1.0 / math.sqrt(D), plan, False, torch.float32)
    ref, _ = reference_attention(q, k, v, mask)
    assert max_abs_err(out, ref) < 1e-4
