"""The Triton forward kernel as a ``torch.library`` custom op, so ``torch.compile`` graphs keep it whole."""

from __future__ import annotations

import torch

from .. import _alloc
from .sparse_fwd import sparse_fwd


@torch.library.custom_op("dbsp::sparse_attention_fwd", mutates_args=())
def sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offsets: torch.Tensor,
    indices: torch.Tensor,
    order: torch.Tensor,
    q_block: int,
    kv_tile: int,
    seq_len_kv: int,
    scale: float,
    out_fp32: bool = False,
    nnz: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Sq, H, D), lse (B, H, Sq) float32)`` of attention under a CSR mask; see sparse_fwd.
    ``out`` is in ``q.dtype``, or float32 with ``out_fp32`` (the kernel rounds once, on store).
    Only the rows ``order`` lists are computed (the others stay as allocated); ``nnz`` is the tile
    count of those rows (the autotuner's density key; -1: all of the mask's)."""
    B, Sq, H, _ = q.shape
    out = _alloc.empty(q.shape, dtype=torch.float32 if out_fp32 else q.dtype, device=q.device)
    lse = _alloc.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    return sparse_fwd(
        q, k, v, offsets, indices, order,
        q_block=q_block, kv_tile=kv_tile, seq_len_kv=seq_len_kv, scale=scale, out=out, lse=lse,
        nnz=None if nnz < 0 else nnz,
    )


@sparse_attention_fwd.register_fake
def _(q, k, v, offsets, indices, order, q_block, kv_tile, seq_len_kv, scale, out_fp32=False, nnz=-1):
    B, Sq, H, _ = q.shape
    return q.new_empty(q.shape, dtype=torch.float32 if out_fp32 else q.dtype), q.new_empty((B, H, Sq), dtype=torch.float32)
