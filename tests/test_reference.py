"""reference_attention against torch SDPA (float64) with the equivalent boolean mask."""

import pytest
import torch
import torch.nn.functional as F

import dbsp.reference
from dbsp import SparseMask, reference_attention, sparse_attention
from harness import assert_lowp_close, max_abs_err, random_mask, sdpa_oracle, token_mask

SHAPES = [  # (Sq, Skv, D, q_block)
    (1, 1, 32, 16),
    (97, 97, 64, 32),
    (200, 97, 128, 64),
    (97, 200, 32, 16),
    (1025, 1025, 64, 64),
    (1, 200, 64, 64),
    (200, 1, 32, 16),
]


@pytest.mark.parametrize("sq, skv, d, q_block", SHAPES)
@pytest.mark.parametrize("tile", ["1", "16", "q_block"])
def test_reference_equals_sdpa_fp64(sq, skv, d, q_block, tile):
    kv_tile = {"1": 1, "16": min(16, q_block), "q_block": q_block}[tile]
    B, H = 2, 3
    q = torch.randn(B, sq, H, d, dtype=torch.float64)
    k, v = torch.randn(B, skv, H, d, dtype=torch.float64), torch.randn(B, skv, H, d, dtype=torch.float64)
    mask = random_mask(B, H, sq, skv, q_block=q_block, kv_tile=kv_tile, density=0.35)
    out, lse = reference_attention(q, k, v, mask)
    ref_out, ref_lse = sdpa_oracle(q, k, v, mask)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (B, sq, H, d) and lse.shape == (B, H, sq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert max_abs_err(out, ref_out) < 1e-10
    assert max_abs_err(lse, ref_lse) < 1e-10
    empty = ~token_mask(mask).any(-1)  # (B, H, Sq)
    assert bool((lse[empty] == float("-inf")).all())
    assert bool((out.transpose(1, 2)[empty] == 0).all())


def test_rows_with_no_key_give_zero_and_minus_inf():
    B, H, S, D = 1, 2, 100, 16
    dense = torch.zeros(B, H, 4, 100, dtype=torch.bool)
    dense[0, 1, 2, 5] = True  # a single key for one query block of one head
    mask = SparseMask.from_dense(dense, q_block=32, kv_tile=1, seq_len_q=S, seq_len_kv=S)
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    out, lse = reference_attention(q, k, v, mask)
    assert torch.isfinite(out).all()
    assert bool((lse[0, 0] == float("-inf")).all()) and bool((out[0, :, 0] == 0).all())
    # A single key: softmax weight 1, out = v[key], lse = the one scaled score.
    rows = slice(64, 96)
    assert torch.allclose(out[0, rows, 1], v[0, 5, 1].expand(32, D))
    assert torch.allclose(lse[0, 1, rows], (q[0, rows, 1] @ k[0, 5, 1]) / D**0.5, atol=1e-6)


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v = (torch.randn(2, 300, 2, 32, dtype=torch.float64) for _ in range(3))
    mask = random_mask(2, 2, 300, 300, q_block=32, kv_tile=4, density=0.3)
    whole = reference_attention(q, k, v, mask)
    monkeypatch.setattr(dbsp.reference, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    chunked = reference_attention(q, k, v, mask)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_scale_argument():
    q, k, v = (torch.randn(1, 50, 2, 16, dtype=torch.float64) for _ in range(3))
    mask = random_mask(1, 2, 50, 50, q_block=16, kv_tile=16, density=0.6, empty_rows=False)
    out, lse = reference_attention(q, k, v, mask, scale=0.3)
    ref_out, ref_lse = sdpa_oracle(q, k, v, mask, scale=0.3)
    assert max_abs_err(out, ref_out) < 1e-10 and max_abs_err(lse, ref_lse) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    B, S, H, D = 1, 257, 2, 64
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    mask = random_mask(B, H, S, S, q_block=64, kv_tile=16, density=0.5, empty_rows=False)
    oracle, _ = sdpa_oracle(q, k, v, mask)
    lq, lk, lv = (x.to(dtype) for x in (q, k, v))
    out, lse = reference_attention(lq, lk, lv, mask)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch_lowp = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (lq, lk, lv)), attn_mask=token_mask(mask)
    ).transpose(1, 2)
    assert_lowp_close(out, oracle, torch_lowp)


def test_sparse_attention_reference_backend_and_lse_flag():
    q, k, v = (torch.randn(1, 70, 2, 16) for _ in range(3))
    mask = random_mask(1, 2, 70, 70, q_block=16, kv_tile=2, density=0.5)
    out = sparse_attention(q, k, v, mask, backend="reference")
    out2, lse = sparse_attention(q, k, v, mask, return_lse=True)
    ref_out, ref_lse = reference_attention(q, k, v, mask)
    assert torch.equal(out, ref_out) and torch.equal(out2, ref_out) and torch.equal(lse, ref_lse)


def test_out_dtype_float32_is_the_unrounded_result():
    """bf16 inputs, out_dtype=float32: the exact fp32 result (what the ring merges), which rounds
    to the default bf16 output; through sparse_attention too."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=gen).to(torch.bfloat16) for _ in range(3))
    mask = random_mask(1, 2, 70, 70, q_block=16, kv_tile=4, density=0.4)
    out16, lse16 = reference_attention(q, k, v, mask)
    out32, lse32 = reference_attention(q, k, v, mask, out_dtype=torch.float32)
    exact, _ = reference_attention(q.float(), k.float(), v.float(), mask)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert torch.equal(out32, exact) and torch.equal(lse32, lse16)
    assert torch.equal(out32.to(torch.bfloat16), out16)
    via = sparse_attention(q, k, v, mask, out_dtype=torch.float32)
    assert torch.equal(via, out32)
