"""GPU-only: the kernel at benchmark shapes in bf16/fp16, under the 2x-torch-error rule.

Run on the GPU machine: ``python -m pytest -q tests/test_kernels_gpu.py``. Skips without CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

from dbsp import SparseMask, reference_attention, sparse_attention
from harness import assert_lowp_close, max_abs_err, random_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _torch_lowp(q, k, v, mask):
    """PyTorch's own low-precision SDPA under the same mask, one head at a time (memory)."""
    outs = []
    for h in range(q.shape[2]):
        sub = mask.select_heads([h])
        tok = sub.to_dense().repeat_interleave(sub.q_block, 2)[:, :, : sub.seq_len_q]
        tok = tok.repeat_interleave(sub.kv_tile, 3)[..., : sub.seq_len_kv]
        empty = ~tok.any(-1, keepdim=True)
        o = F.scaled_dot_product_attention(
            q[:, :, h : h + 1].transpose(1, 2), k[:, :, h : h + 1].transpose(1, 2), v[:, :, h : h + 1].transpose(1, 2),
            attn_mask=tok | empty,
        )
        outs.append(o.masked_fill(empty, 0).transpose(1, 2))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_block, kv_tile", [(128, 128), (64, 64), (64, 16), (64, 1)])
@pytest.mark.parametrize("seq", [32760, 7777])
def test_benchmark_shapes_low_precision(dtype, q_block, kv_tile, seq):
    B, H, D = 1, 2, 128
    q, k, v = (torch.randn(B, seq, H, D, device="cuda") for _ in range(3))
    mask = random_mask(B, H, seq, seq, q_block=q_block, kv_tile=kv_tile, density=0.3, device="cuda")
    oracle, oracle_lse = reference_attention(q.double(), k.double(), v.double(), mask)
    lq, lk, lv = (x.to(dtype) for x in (q, k, v))
    out, lse = sparse_attention(lq, lk, lv, mask, return_lse=True)
    assert_lowp_close(out, oracle, _torch_lowp(lq, lk, lv, mask), atol=1e-3)
    assert max_abs_err(lse, oracle_lse) < 2e-2
    assert torch.equal(torch.isinf(lse), torch.isinf(oracle_lse))


def test_fp32_exact_path_and_auto_dense_dispatch():
    B, S, H, D = 2, 3001, 4, 64
    q, k, v = (torch.randn(B, S, H, D, device="cuda") for _ in range(3))
    tiles = torch.rand(B, H, -(-S // 64), S, device="cuda") < 0.2
    tiles[:, 1] = True  # head 1 is fully dense: auto sends it to SDPA
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=1, seq_len_q=S, seq_len_kv=S)
    ref, _ = reference_attention(q, k, v, mask)
    assert max_abs_err(sparse_attention(q, k, v, mask, backend="triton"), ref) < 1e-4
    assert max_abs_err(sparse_attention(q, k, v, mask), ref) < 1e-3
    full = SparseMask.full(B, H, S, S, q_block=64, device="cuda")
    dense = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert max_abs_err(sparse_attention(q, k, v, full), dense) < 1e-3


@pytest.mark.parametrize("dense_heads", [(0,), (1, 2), (0, 3)], ids=["first", "consecutive", "apart"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_dense_heads_with_lse_match_reference(dtype, dense_heads):
    B, S, H, D = 2, 4097, 4, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda") for _ in range(3))
    tiles = torch.rand(B, H, -(-S // 64), S, device="cuda") < 0.3
    tiles[:, list(dense_heads)] = True  # dense heads: cuDNN (with lse); the others: the kernel
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=1, seq_len_q=S, seq_len_kv=S)
    lq, lk, lv = (x.to(dtype) for x in (q, k, v))
    for m in (mask, SparseMask.full(B, H, S, S, q_block=64, device="cuda")):
        ref, ref_lse = reference_attention(q, k, v, m)
        out, lse = sparse_attention(lq, lk, lv, m, return_lse=True)
        kernel_out, kernel_lse = sparse_attention(lq, lk, lv, m, return_lse=True, backend="triton")
        assert max_abs_err(lse, ref_lse) < 5e-3
        assert max_abs_err(out, ref) <= 2 * max_abs_err(kernel_out, ref) + 1e-3
        assert torch.equal(sparse_attention(lq, lk, lv, m), out)  # without lse: the same heads, the same path
        # float32 partial outputs (the ring's path): dense and sparse heads both come back in float32.
        out32, lse32 = sparse_attention(lq, lk, lv, m, return_lse=True, out_dtype=torch.float32)
        assert out32.dtype == torch.float32 and torch.equal(lse32, lse)
        assert torch.equal(out32.to(dtype), out)


def test_large_batch_head_int64_addressing():
    # B * S * H * D > 2**31 elements: offsets must be computed in int64.
    B, S, H, D = 2, 70000, 128, 128
    q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    tiles = torch.zeros(B, H, -(-S // 128), -(-S // 128), dtype=torch.bool, device="cuda")
    tiles[-1, -1, -1, -1] = True  # only the last query block of the last head of the last batch
    mask = SparseMask.from_dense(tiles, q_block=128, kv_tile=128, seq_len_q=S, seq_len_kv=S)
    out, lse = sparse_attention(q, q, q, mask, return_lse=True)
    rows = slice((S // 128) * 128, S)
    sub = q[-1:, rows, -1:].float()
    ref = F.scaled_dot_product_attention(*(sub.transpose(1, 2),) * 3).transpose(1, 2)
    assert max_abs_err(out[-1:, rows, -1:], ref) < 2e-2
    assert bool(torch.isinf(lse[0]).all())
