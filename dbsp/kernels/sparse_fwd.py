"""One Triton forward kernel for block-sparse and fine-grained (M x N, N >= 1) attention masks.

Each program owns ``BLOCK_M`` query rows of one (batch, head, query block) and walks that block's
selected key tiles as one *packed* key list: list position ``r`` is key
``indices[start + r // N] * N + r % N``. Keys are consumed ``BLOCK_N`` at a time:

* ``N >= BLOCK_N`` (block masks, and any tile at least one chunk wide): a chunk lies inside one tile,
  so its keys are contiguous rows and the load is a plain strided tile load.
* ``N < BLOCK_N`` (fine-grained): a chunk packs ``BLOCK_N / N`` tiles, so the load *gathers* rows
  through the index list into a dense on-chip tile (the FG-Attn idea). With ``num_stages >= 2``
  Triton pipelines these loads (cp.async on Hopper), overlapping the next chunk's gather with the
  current chunk's matrix products.

Picture, N = 1, BLOCK_N = 4, one query block selecting keys 3, 4, 9, 17, 18, 30::

    indices  [3, 4, 9, 17 | 18, 30]       chunk 0 gathers K rows 3, 4, 9, 17
    chunk 1  [18, 30, -, -]               the tail chunk is masked (scores -inf)

Only the last tile of a sequence can be partial, and indices are sorted, so the valid keys of a
row are exactly its first ``n_keys`` list positions: the main loop runs unmasked and only one tail
chunk is masked. Online softmax runs in the exp2 domain in fp32. Rows that select nothing get
out = 0 and lse = -inf.

Programs run in an order given by ``ORDER`` (heaviest query blocks of each head first), so long
rows start early and short rows fill the tail.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_chunk(
    q, acc, m_i, l_i, k_ptrs, v_ptrs, valid, qk_scale,
    MASKED: tl.constexpr, D_MASK: tl.constexpr, d_ok, IEEE: tl.constexpr,
):
    """One BLOCK_N chunk of keys: scores, online-softmax update, P @ V."""
    if MASKED:
        kv_ok = valid[:, None]
        if D_MASK:
            kv_ok = kv_ok & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
    elif D_MASK:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE, OFFSETS, INDICES, ORDER,
    qk_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    H, SEQ_Q, NUM_QB, NUM_KV_TILES, KV_PAD,
    Q_BLOCK: tl.constexpr, KV_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    SUB: tl.constexpr = Q_BLOCK // BLOCK_M
    CONTIG: tl.constexpr = KV_TILE >= BLOCK_N
    D_MASK: tl.constexpr = BLOCK_D != HEAD_DIM

    i_pid = tl.program_id(0)
    i_item = tl.load(ORDER + i_pid // SUB).to(tl.int64)  # flat (b * H + h) * NUM_QB + qb
    i_sub = i_pid % SUB
    i_bh = i_item // NUM_QB
    i_qb = i_item % NUM_QB
    i_b = i_bh // H
    i_h = i_bh % H

    o_row = i_bh * (NUM_QB + 1) + i_qb
    start = tl.load(OFFSETS + o_row)
    n_tiles = tl.load(OFFSETS + o_row + 1) - start
    last_tile = tl.load(INDICES + start + n_tiles - 1, mask=n_tiles > 0, other=0)
    # Only the sequence's last tile can be partial, and it sorts last in its row.
    is_last = ((n_tiles > 0) & (last_tile == NUM_KV_TILES - 1)).to(tl.int64)
    n_keys = n_tiles * KV_TILE - is_last * KV_PAD

    o_m = i_qb * Q_BLOCK + i_sub * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_q = o_m < SEQ_Q
    d_ok = o_d < HEAD_DIM
    p_q = Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None].to(tl.int64) * stride_qs + o_d[None, :] * stride_qd
    if D_MASK:
        q = tl.load(p_q, mask=m_q[:, None] & d_ok[None, :], other=0.0)
    else:
        q = tl.load(p_q, mask=m_q[:, None], other=0.0)

    base_k = K + i_b * stride_kb + i_h * stride_kh + o_d[None, :] * stride_kd
    base_v = V + i_b * stride_vb + i_h * stride_vh + o_d[None, :] * stride_vd
    p_idx = INDICES + start

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    o_n = tl.arange(0, BLOCK_N)

    n_full = n_keys // BLOCK_N
    for j in range(0, n_full):
        r0 = j * BLOCK_N
        if CONTIG:
            tile = tl.load(p_idx + r0 // KV_TILE).to(tl.int64)
            keys = tile * KV_TILE + (r0 % KV_TILE) + o_n
        else:
            r = r0 + o_n
            keys = tl.load(p_idx + r // KV_TILE).to(tl.int64) * KV_TILE + r % KV_TILE
        acc, m_i, l_i = _attend_chunk(
            q, acc, m_i, l_i,
            base_k + keys[:, None] * stride_ks, base_v + keys[:, None] * stride_vs,
            o_n < BLOCK_N, qk_scale, False, D_MASK, d_ok, IEEE,
        )
    if n_full * BLOCK_N < n_keys:
        r = n_full * BLOCK_N + o_n
        valid = r < n_keys
        keys = tl.load(p_idx + r // KV_TILE, mask=valid, other=0).to(tl.int64) * KV_TILE + r % KV_TILE
        acc, m_i, l_i = _attend_chunk(
            q, acc, m_i, l_i,
            base_k + keys[:, None] * stride_ks, base_v + keys[:, None] * stride_vs,
            valid, qk_scale, True, D_MASK, d_ok, IEEE,
        )

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m[:, None].to(tl.int64) * stride_os + o_d[None, :] * stride_od
    if D_MASK:
        tl.store(p_o, out.to(O.dtype.element_ty), mask=m_q[:, None] & d_ok[None, :])
    else:
        tl.store(p_o, out.to(O.dtype.element_ty), mask=m_q[:, None])
    tl.store(LSE + i_bh * SEQ_Q + o_m, lse, mask=m_q)


# Configurations the GPU autotuner chooses from (pruned to BLOCK_M dividing the mask's q_block).
# BLOCK_N 128 with BLOCK_M 128 and 3 stages needs ~224 KB of shared memory at D = 128: dropped.
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 8, 3),
        (128, 64, 8, 2),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 8, 3),
        (64, 32, 4, 4),
    ]
]

# The one configuration the CPU interpreter runs (autotuning does not work there).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}


def _prune(configs, named_args, **kwargs):
    q_block = named_args["Q_BLOCK"] if "Q_BLOCK" in named_args else kwargs["Q_BLOCK"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= q_block and q_block % c.kwargs["BLOCK_M"] == 0]
    if not kept:
        raise ValueError(f"no kernel configuration fits q_block={q_block}")
    return kept


_tuned = None


def _tuned_kernel():
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(
            CONFIGS,
            key=["Q_BLOCK", "KV_TILE", "HEAD_DIM", "IEEE"],
            prune_configs_by={"early_config_prune": _prune},
        )(_sparse_fwd_kernel)
    return _tuned


def is_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_sparse_fwd_kernel, triton.runtime.JITFunction)


def check_supported(q: torch.Tensor, q_block: int) -> None:
    """Raise a clear error for inputs the kernel cannot run; the caller decides what to do."""
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"the triton backend needs CUDA tensors (q is on {q.device}); on CPU use backend='reference' "
            f"or 'auto', or set TRITON_INTERPRET=1 before importing dbsp to run the kernel in Triton's interpreter"
        )
    if q_block < 16 or q_block & (q_block - 1):
        raise ValueError(f"the triton backend needs q_block to be a power of two >= 16, got {q_block}")


def sparse_fwd(q, k, v, offsets, indices, order, *, q_block, kv_tile, seq_len_kv, scale, config=None, out=None, lse=None):
    """Launch the kernel. Shapes as in ``dbsp.sparse_attention``; returns ``(out, lse)``.

    Args:
        q, k, v: ``(B, Sq, H, D)`` / ``(B, Skv, H, D)``, any strides, fp16/bf16/fp32.
        offsets, indices: the mask's CSR (``(B, H, Mq + 1)`` int64, ``(nnz,)`` int32).
        order: ``(B * H * Mq,)`` int32 flat (b, h, query block) ids in launch order.
        q_block, kv_tile, seq_len_kv: mask geometry. scale: softmax scale.
        config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` to bypass the autotuner
            (benchmarks sweep configurations this way). Default: autotuned on GPU, the fixed
            ``INTERPRETER_CONFIG`` in the interpreter.
        out, lse: preallocated outputs. Default: allocated here.
    """
    B, Sq, H, D = q.shape
    nqb = -(-Sq // q_block)
    nkt = -(-seq_len_kv // kv_tile)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    args = (
        q, k, v, out, lse, offsets, indices, order,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Sq, nqb, nkt, nkt * kv_tile - seq_len_kv,
    )
    meta = dict(Q_BLOCK=q_block, KV_TILE=kv_tile, HEAD_DIM=D, BLOCK_D=block_d, IEEE=q.dtype == torch.float32)
    n_items = order.numel()
    if is_interpreted() or config is not None:
        cfg = dict(INTERPRETER_CONFIG if config is None else config)
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], q_block)
        grid = (n_items * (q_block // cfg["BLOCK_M"]),)
        _sparse_fwd_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda m: (n_items * (q_block // m["BLOCK_M"]),)  # noqa: E731
        _tuned_kernel()[grid](*args, **meta)
    return out, lse
