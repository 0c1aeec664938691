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
def _softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One chunk of BLOCK_N keys (``k``, ``v``: (BLOCK_N, BLOCK_D)): scores, online softmax, P @ V."""
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
def _load_rows(ptrs, valid, d_ok, MASKED: tl.constexpr, D_MASK: tl.constexpr):
    """Load (BLOCK_N, BLOCK_D) rows through a pointer tile (a gather when the rows are scattered)."""
    if MASKED:
        ok = valid[:, None]
        if D_MASK:
            ok = ok & d_ok[None, :]
        return tl.load(ptrs, mask=ok, other=0.0)
    elif D_MASK:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _sparse_fwd_kernel(
    Q, K, V, O, LSE, OFFSETS, INDICES, ORDER, DESC_K, DESC_V,
    qk_scale,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    H, SEQ_Q, NUM_QB, NUM_KV_TILES, KV_PAD, DENSITY_BUCKET,
    Q_BLOCK: tl.constexpr, KV_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    PREFETCH: tl.constexpr = False, OFF32: tl.constexpr = False,
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
    # Gather path options (both off by default): PREFETCH loads the next chunk's key ids one
    # iteration ahead, so the gather's addresses never wait on the index load; OFF32 computes
    # row offsets in int32 (the launcher sets it only when every offset fits).
    if PREFETCH:
        nxt = (tl.load(p_idx + o_n // KV_TILE, mask=o_n < n_full * BLOCK_N, other=0) * KV_TILE + o_n % KV_TILE).to(tl.int32)
    for j in tl.range(0, n_full, warp_specialize=WARP_SPEC):
        r0 = j * BLOCK_N
        if CONTIG and USE_TMA:
            # A contiguous chunk through the tensor-memory accelerator: one coordinate, no pointers.
            # TMA coordinates are int32.
            key0 = (tl.load(p_idx + r0 // KV_TILE) * KV_TILE + (r0 % KV_TILE)).to(tl.int32)
            k = DESC_K.load([i_b.to(tl.int32), key0, i_h.to(tl.int32), 0]).reshape(BLOCK_N, BLOCK_D)
            v = DESC_V.load([i_b.to(tl.int32), key0, i_h.to(tl.int32), 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            if CONTIG:
                keys = tl.load(p_idx + r0 // KV_TILE).to(tl.int64) * KV_TILE + (r0 % KV_TILE) + o_n
            elif PREFETCH:
                keys = nxt
                r = r0 + BLOCK_N + o_n
                nxt = (tl.load(p_idx + r // KV_TILE, mask=r < n_full * BLOCK_N, other=0) * KV_TILE + r % KV_TILE).to(tl.int32)
                if not OFF32:
                    keys = keys.to(tl.int64)
            else:
                r = r0 + o_n
                if OFF32:
                    keys = tl.load(p_idx + r // KV_TILE) * KV_TILE + r % KV_TILE
                else:
                    keys = tl.load(p_idx + r // KV_TILE).to(tl.int64) * KV_TILE + r % KV_TILE
            k = _load_rows(base_k + keys[:, None] * stride_ks, o_n, d_ok, False, D_MASK)
            v = _load_rows(base_v + keys[:, None] * stride_vs, o_n, d_ok, False, D_MASK)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, o_n, qk_scale, False, IEEE)
    if n_full * BLOCK_N < n_keys:
        r = n_full * BLOCK_N + o_n
        valid = r < n_keys
        keys = tl.load(p_idx + r // KV_TILE, mask=valid, other=0).to(tl.int64) * KV_TILE + r % KV_TILE
        k = _load_rows(base_k + keys[:, None] * stride_ks, valid, d_ok, True, D_MASK)
        v = _load_rows(base_v + keys[:, None] * stride_vs, valid, d_ok, True, D_MASK)
        acc, m_i, l_i = _softmax_step(q, k, v, acc, m_i, l_i, valid, qk_scale, True, IEEE)

    # Only a row that selects no key has l_i == 0; NaN (from NaN/inf inputs) must reach out and lse.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    p_o = O + i_b * stride_ob + i_h * stride_oh + o_m[:, None].to(tl.int64) * stride_os + o_d[None, :] * stride_od
    if D_MASK:
        tl.store(p_o, out.to(O.dtype.element_ty), mask=m_q[:, None] & d_ok[None, :])
    else:
        tl.store(p_o, out.to(O.dtype.element_ty), mask=m_q[:, None])
    tl.store(LSE + i_bh * SEQ_Q + o_m, lse, mask=m_q)


# Configurations the GPU autotuner chooses from, by the sweeps of benchmarks/bench_kernels.py --sweep
# on H100 (bf16, D = 128, S = 32760, H = 12):
# * 128-row query blocks: 128 x 128 tiles, 8 warps, TMA for contiguous tiles. 2 stages were best at
#   density 0.3 (4.27 ms vs 4.51 with 3), 3 stages at density 1.0 (14.9 ms vs 16.3), so both stay
#   and the autotuner keys on a density bucket. BLOCK_N 64 was 8-30% slower; TMA beat pointer loads
#   by 15% at density 0.3.
# * 64-row query blocks: 64 x 64 tiles, 4 warps, 3 stages; TMA for 64 x 64 block masks (+8%). With
#   BLOCK_M 64, BLOCK_N 128 was 25-45% slower and 8 warps 30% slower: dropped. Warp specialization
#   (tl.range(warp_specialize=True)) changed nothing on H100: not used.
# * 16- and 32-row query blocks (small tests): 32/64-wide key chunks.
# The prune keeps only BLOCK_M = min(q_block, 128), the largest tile a program may own (a program
# never spans two key lists), and TMA configurations only where the chunk is contiguous.
# * Gather (fine-grained) configurations also come with the PREFETCH and OFF32 load options
#   (benchmarks/sweep_gather.py); the prune drops those variants for contiguous chunks.
_GATHER_FLAGS = [(False, False), (True, False), (False, True), (True, True)]
CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": tma, "WARP_SPEC": False, "PREFETCH": pf, "OFF32": o32},
                  num_warps=w, num_stages=s)
    for bm, bn, w, s, tma in [
        (128, 128, 8, 2, True),
        (128, 128, 8, 3, True),
        (128, 128, 8, 2, False),
        (128, 64, 8, 3, False),
        (64, 64, 4, 3, True),
        (64, 64, 4, 3, False),
        (32, 64, 4, 3, False),
        (32, 32, 4, 3, False),
        (16, 32, 4, 3, False),
        (16, 64, 4, 3, False),
    ]
    for pf, o32 in (_GATHER_FLAGS if not tma and bm >= 64 else _GATHER_FLAGS[:1])
]

# The one configuration the CPU interpreter runs (autotuning does not work there).
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "USE_TMA": False, "WARP_SPEC": False, "PREFETCH": False, "OFF32": False}


def _prune(configs, named_args, **kwargs):
    q_block, kv_tile = (named_args[n] if n in named_args else kwargs[n] for n in ("Q_BLOCK", "KV_TILE"))
    tma_ok = named_args["DESC_K"] is not named_args["K"]  # the launcher passes descriptors when TMA can work
    bm = min(q_block, 128)
    off32_ok = _offsets_fit_int32(named_args["NUM_KV_TILES"] * kv_tile, named_args["stride_ks"], named_args["stride_vs"])
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_M"] == bm and not (c.kwargs["USE_TMA"] and (not tma_ok or kv_tile < c.kwargs["BLOCK_N"]))
        and (off32_ok or not c.kwargs["OFF32"])
        and not (kv_tile >= c.kwargs["BLOCK_N"] and (c.kwargs["PREFETCH"] or c.kwargs["OFF32"]))
    ]
    if not kept:
        raise ValueError(f"no kernel configuration fits q_block={q_block}")
    return kept


def _offsets_fit_int32(keys: int, stride_ks: int, stride_vs: int) -> bool:
    """Whether every gathered row offset (key id x sequence stride, for K and V) fits in int32."""
    return all(keys * abs(stride) < 2**31 for stride in (stride_ks, stride_vs))


def _set_block_shapes(nargs):
    """Autotuner pre-hook: TMA descriptors take the block shape of the configuration being run."""
    for name in ("DESC_K", "DESC_V"):
        desc = nargs[name]
        if hasattr(desc, "block_shape"):
            desc.block_shape = [1, nargs["BLOCK_N"], 1, nargs["BLOCK_D"]]


for _c in CONFIGS:
    _c.pre_hook = _set_block_shapes

_tuned = None


def _tuned_kernel():
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(
            CONFIGS,
            key=["Q_BLOCK", "KV_TILE", "HEAD_DIM", "IEEE", "DENSITY_BUCKET"],
            prune_configs_by={"early_config_prune": _prune},
        )(_sparse_fwd_kernel)
    return _tuned


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int, block_d: int):
    """TMA descriptors over (B, S, H, D) K and V, or None where TMA cannot address them."""
    if block_d != k.shape[-1]:
        return None
    if not is_interpreted() and (k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9):
        return None  # TMA needs Hopper or newer; the interpreter emulates it (tests use that)
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = []
    for t in (k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return None
        descs.append(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, block_n, 1, block_d]))
    return descs


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


def density_bucket(nnz: int, tiles: int) -> int:
    """0 for tile density >= 1/2, 1 for >= 1/4, 2 for >= 1/8, else 3: the autotuner's density key."""
    if nnz <= 0:
        return 3
    return min(3, int(math.floor(math.log2(tiles / nnz))))


def sparse_fwd(q, k, v, offsets, indices, order, *, q_block, kv_tile, seq_len_kv, scale, config=None, out=None, lse=None,
               nnz=None):
    """Launch the kernel. Shapes as in ``dbsp.sparse_attention``; returns ``(out, lse)``.

    Args:
        q, k, v: ``(B, Sq, H, D)`` / ``(B, Skv, H, D)``, any strides, fp16/bf16/fp32.
        offsets, indices: the mask's CSR (``(B, H, Mq + 1)`` int64, ``(nnz,)`` int32).
        order: ``(B * H * Mq,)`` int32 flat (b, h, query block) ids in launch order.
        q_block, kv_tile, seq_len_kv: mask geometry. scale: softmax scale.
        config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "USE_TMA", "WARP_SPEC"}`` to bypass the autotuner
            (benchmarks sweep configurations this way). Default: autotuned on GPU, the fixed
            ``INTERPRETER_CONFIG`` in the interpreter.
        out, lse: preallocated outputs. Default: allocated here.
        nnz: tiles selected by the rows ``order`` lists (the autotuner's density key). Default:
            ``indices.numel()`` (every row listed).
    """
    B, Sq, H, D = q.shape
    nqb = -(-Sq // q_block)
    nkt = -(-seq_len_kv // kv_tile)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    cfg = None
    if is_interpreted() or config is not None:
        cfg = dict(INTERPRETER_CONFIG)
        cfg.update(config or {})
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], q_block)
    descs = _descriptors(k, v, cfg["BLOCK_N"] if cfg else 128, block_d)
    if cfg is not None and descs is None:
        cfg["USE_TMA"] = False
    desc_k, desc_v = descs if descs is not None else (k, v)
    args = (
        q, k, v, out, lse, offsets, indices, order, desc_k, desc_v,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Sq, nqb, nkt, nkt * kv_tile - seq_len_kv,
        density_bucket(indices.numel() if nnz is None else nnz, order.numel() * nkt),
    )
    meta = dict(Q_BLOCK=q_block, KV_TILE=kv_tile, HEAD_DIM=D, BLOCK_D=block_d, IEEE=q.dtype == torch.float32)
    n_items = order.numel()
    if cfg is not None:
        if cfg.get("OFF32") and not _offsets_fit_int32(nkt * kv_tile, k.stride(1), v.stride(1)):
            cfg["OFF32"] = False
        grid = (n_items * (q_block // cfg["BLOCK_M"]),)
        _sparse_fwd_kernel[grid](*args, **meta, **cfg)
    else:
        grid = lambda m: (n_items * (q_block // m["BLOCK_M"]),)  # noqa: E731
        _tuned_kernel()[grid](*args, **meta)
    return out, lse
