"""Exact attention restricted to a SparseMask, in plain PyTorch: the oracle for every fast path.

The computation is chunked over query blocks, so its peak memory is O(rows_per_chunk x Skv) per
head instead of O(Sq x Skv); it never materialises a token-level mask for the whole problem.
"""

from __future__ import annotations

import math

import torch

from . import _alloc
from ._checks import check_mask_matches, check_out_dtype, check_qkv, check_scale
from .mask import SparseMask

# Scores held at once per chunk (elements); about 64 MB of fp32 scores plus the bool mask.
_CHUNK_ELEMENTS = 1 << 24


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SparseMask,
    *,
    scale: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the keys that ``mask`` selects, computed exactly.

    Args:
        q: ``(B, Sq, H, D)`` queries (float16, bfloat16, float32 or float64).
        k: ``(B, Skv, H, D)`` keys, same dtype and device as ``q``.
        v: ``(B, Skv, H, D)`` values.
        mask: a ``SparseMask`` with ``batch == B``, ``heads == H``, ``seq_len_q == Sq`` and
            ``seq_len_kv == Skv``, on ``q``'s device.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        out_dtype: dtype of ``out`` (a floating dtype); float32 keeps partial results unrounded
            for merging. Default: ``q.dtype``.

    Returns:
        ``(out, lse)``: ``out`` is ``(B, Sq, H, D)`` in ``out_dtype``; ``lse`` is ``(B, H, Sq)``, the
        natural-log sum of exp of the scaled selected scores, float32 (float64 for float64
        inputs). Arithmetic runs in float32 (float64 for float64 inputs). A query row that
        selects no key gets ``out = 0`` and ``lse = -inf``, never NaN.

    Non-finite inputs are not checked (see ``docs/reliability.md``): a row's result depends only on
    its own query and the key/value rows it selects, so NaN/inf elsewhere never reaches it, and
    NaN in its query or in a selected key or value makes its output NaN, as in torch SDPA.

    Example::

        >>> q = k = v = torch.randn(1, 100, 2, 16)
        >>> mask = SparseMask.full(1, 2, 100, 100, q_block=32)
        >>> out, lse = reference_attention(q, k, v, mask)   # equals dense SDPA
    """
    B, Sq, Skv, H, D = check_qkv(q, k, v)
    check_mask_matches(mask, B, Sq, Skv, H, q.device)
    scale = check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out_dtype = check_out_dtype(out_dtype, q)
    work_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    M, N = mask.q_block, mask.kv_tile
    mq, nt = mask.num_q_blocks, mask.num_kv_tiles
    out = _alloc.empty((B, Sq, H, D), dtype=out_dtype, device=q.device)
    lse = _alloc.empty((B, H, Sq), dtype=work_dtype, device=q.device)

    kt = k.permute(0, 2, 3, 1).to(work_dtype)  # (B, Skv, H, D) -> (B, H, D, Skv)
    vt = v.permute(0, 2, 1, 3).to(work_dtype)  # (B, Skv, H, D) -> (B, H, Skv, D)
    # P @ V multiplies the zero weights of unselected keys too, and 0 * inf = NaN: a non-finite
    # value at a key a row does not select would leak into that row. Where v has any, they are
    # zeroed for the product and re-injected as NaN only into the rows (and channels) that select them.
    bad_v = None
    if not bool(torch.isfinite(vt).all()):
        bad_v = ~torch.isfinite(vt)
        vt = vt.masked_fill(bad_v, 0.0)
    counts = mask.row_counts()  # (B, H, Mq)
    blocks_per_chunk = max(1, _CHUNK_ELEMENTS // (B * H * M * Skv))
    for qb0 in range(0, mq, blocks_per_chunk):
        qb1 = min(mq, qb0 + blocks_per_chunk)
        r0, r1 = qb0 * M, min(Sq, qb1 * M)
        c = qb1 - qb0

        # Tile picture of this chunk: entries of rows (b, h, qb0..qb1) are contiguous per (b, h).
        tiles = torch.zeros(B * H * c, nt, dtype=torch.bool, device=q.device)
        start = mask.offsets[:, :, qb0].reshape(-1)
        stop = mask.offsets[:, :, qb1].reshape(-1)
        lengths = stop - start
        if int(lengths.sum()):
            seg = torch.repeat_interleave(torch.arange(B * H, device=q.device), lengths)
            pos = torch.arange(int(lengths.sum()), device=q.device) - (torch.cumsum(lengths, 0) - lengths)[seg]
            entries = mask.indices[pos + start[seg]].to(torch.int64)
            rows = torch.repeat_interleave(torch.arange(B * H * c, device=q.device), counts[:, :, qb0:qb1].reshape(-1))
            tiles[rows, entries] = True
        # (B*H*c, nt) tiles -> (B, H, rows, Skv) token mask
        keys = tiles.repeat_interleave(N, dim=1)[:, :Skv].reshape(B, H, c, 1, Skv)
        allowed = keys.expand(B, H, c, M, Skv).reshape(B, H, c * M, Skv)[:, :, : r1 - r0]

        qc = q[:, r0:r1].permute(0, 2, 1, 3).to(work_dtype)  # (B, rows, H, D) -> (B, H, rows, D)
        s = torch.matmul(qc, kt) * scale  # (B, H, rows, Skv)
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # -inf where a row selects nothing
        safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        p = torch.exp(s - safe[..., None])  # masked entries: exp(-inf) = 0
        o = torch.matmul(p, vt)  # (B, H, rows, D)
        if bad_v is not None:
            hits = torch.matmul(allowed.to(work_dtype), bad_v.to(work_dtype))  # selected non-finite values per channel
            o = o.masked_fill(hits > 0, float("nan"))
        out[:, r0:r1] = o.permute(0, 2, 1, 3).to(out_dtype)
        lse[:, :, r0:r1] = row_lse
    return out, lse
