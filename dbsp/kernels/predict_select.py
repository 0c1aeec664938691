"""Triton passes of ``dbsp.predict``'s per-key threshold search (private; see predict.py).

Every kernel scores a tile of ``BM`` pooled queries (query blocks of one head) against the keys
of one *group* (``GK`` consecutive keys, ``GK / N`` tiles of ``N`` keys) at a time with one
``tl.dot``, turns key scores into tile log-masses (log-sum-exp over each tile's keys), and never
writes a score to memory::

    stats       per (query block, group): max tile log-mass, sum of exp(log-mass - max)
    thresholds  per query block, from the stats in registers: lse, the bracket (two sorts) and the
                candidate thresholds
    candidates  per (query block, program chunk): mass (and, for budgets, count) of tiles >= each threshold
    counts      the candidates kernel without the mass (no exp): the min_keep / max_keep search
    emit        per (query block, group): a bit word of kept tiles and its popcount
    words       (FUSED_EMIT, no budgets, groups of <= 8 tiles) instead of emit: the last
                candidates pass also stores each tile's code (how many thresholds it reaches,
                4 bits); per query block, the pick from the chunk masses, then the bit words and
                popcounts from the codes
    head rows   per head: row counts, their running sum, the dense_above round-up decision
    row starts  per row: its CSR offsets and every group's output offset (no torch operations
                between emit and expand: on a slow host each would keep the GPU waiting)
    expand      bit words + output offsets -> sorted int32 tile ids (the CSR indices); rows of heads
                rounded up to full (dense_above) are written whole from a row flag

A program's chunk of groups is skipped when none of its groups can hold a tile above the smallest
threshold of any query block of the program (their pass-1 maxima are below it; ``SKIP_CHUNKS``),
which is exact: the skip test has a margin, so it never drops a group that the comparison itself
would keep. The test sits outside the group loop, so Triton pipelines the loop's key loads.
Grid: ``(query-block tiles, B * H, group chunks)``, query-block tiles fastest so that programs
reading one key chunk run together (the key chunk stays in L2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..predict import _dense_limit

# Pooled query rows per program and groups per program on GPU; the interpreter runs the same
# kernels with the same values (they only change speed).
BLOCK_M = 64
GROUPS_PER_PROG = 8
# Most pass-1 groups per row that the thresholds kernel sorts in registers (262,144 keys at 64 per group).
BRACKET_MAX_GROUPS = 4096
# Bits per expand program: on an H100 (64x1, 3.1M words of 64 tiles) 8 words per program took
# 0.34 ms, 64 words 1.54 ms; for 64x16 (4 tiles a word) 64 words 0.034 ms, 8 words 0.24 ms.
EXPAND_BITS = 512
# Warps per expand program: at 512 bits, 2 warps took 0.324 ms against 0.378 ms with Triton's
# default 4 (H100, 64x1, the fastest of 19 equal variants in benchmarks/sweep_expand.py).
EXPAND_WARPS = 2
# Rows per step of the head-rows kernel (a program per head).
HEAD_ROWS_BLOCK = 256
# Tiles x thresholds per row up to which the counts kernel compares all pairs at once (a
# (BLOCK_M, tiles, thresholds) block in registers); above it, one threshold at a time.
COUNT_3D_PAIRS = 128
# Skip margin in log-mass: a group is skipped only if its pass-1 max is below the threshold by
# more than this, so float differences between passes can never drop a kept tile.
SKIP_MARGIN = 1e-3
# SKIP_CHUNKS: the candidates, counts and emit passes skip a program's chunk of GROUPS_PER_PROG
# groups when none can hold a kept tile (one test outside the group loop; a test per group, around
# each group's key load, kept Triton from pipelining the loads: H100, 64x1, one call 2.64 -> 2.22 ms).
# It changes speed only, never a result; read at call time for sweeps and tests.
SKIP_CHUNKS = True
# Software-pipeline stages of the candidates and emit passes' key loads (H100: 2 beat 1, 3 and 4).
PASS_STAGES = 2
# FUSED_EMIT: without a budget search, the last candidates pass also stores every scored tile's
# code (how many of the row's thresholds its log-mass reaches, 4 bits), and a light kernel a
# program per row picks the threshold and writes the bit words from the codes: one pass over the
# keys (the emit kernel's) fewer, the same mask. Used for groups of at most FUSED_MAX_TILES tiles:
# on an H100 (Wan2.1-1.3B 480p) 64x16 per key (4 tiles a group) took 1.95-2.03 ms a call fused
# against 2.25 separate, but 64x1 (64 tiles) 3.02-3.08 against 2.20: packing 64 codes a group
# slowed its candidates pass from 0.41 to 1.27 ms, and the words kernel took 0.28 ms there.
# Both read at call time, for sweeps and tests.
FUSED_EMIT = True
FUSED_MAX_TILES = 8
# Groups per step of the words kernel (its program loops over the row's groups). H100, 64x16 per
# key: 32 groups 1.954-1.962 ms a call, 16 groups 2.029-2.030 (benchmarks/sweep_predict_flags.py).
WORDS_GROUPS = 32


@triton.jit
def _group_logmass(q, k_base, g, Skv, scale, s_ks, offs_k, offs_d, d_ok,
                   BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, IEEE: tl.constexpr):
    """``(BM, GK // N)`` tile log-masses of group ``g`` (``-inf`` for tiles past the sequence)."""
    keys = g * GK + offs_k
    kvalid = keys < Skv
    k = tl.load(k_base + keys[:, None].to(tl.int64) * s_ks + offs_d[None, :],
                mask=kvalid[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(kvalid[None, :], s * scale, float("-inf"))
    if N == 1:
        return s
    s3 = tl.reshape(s, (BM, GK // N, N))
    mx = tl.max(s3, axis=2)
    empty = mx == float("-inf")  # tiles wholly past the sequence
    safe = tl.where(empty, 0.0, mx)
    total = tl.sum(tl.exp(s3 - safe[:, :, None]), axis=2)
    return tl.where(empty, float("-inf"), safe + tl.log(tl.where(empty, 1.0, total)))


@triton.jit
def _load_q(QBAR, bh, rows, rvalid, mq, offs_d, d_ok, D: tl.constexpr):
    ptr = QBAR + (bh * mq + rows)[:, None].to(tl.int64) * D + offs_d[None, :]
    return tl.load(ptr, mask=rvalid[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _program_tile(QBAR, K, mq, H, s_kb, s_kh, BM: tl.constexpr, GK: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The program's query rows, their validity and int64 global rows, the head-dim offsets and
    mask, the group's key offsets, the pooled query tile (in the key dtype) and the head's keys."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    rows = pid_m * BM + tl.arange(0, BM)
    rvalid = rows < mq
    grow = (bh * mq + rows).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_k = tl.arange(0, GK)
    q = _load_q(QBAR, bh, rows, rvalid, mq, offs_d, d_ok, D).to(K.dtype.element_ty)
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    return rows, rvalid, grow, offs_d, d_ok, offs_k, q, k_base


@triton.jit
def _stats_kernel(QBAR, K, GMAX, GSUM, mq, H, Skv, ng, scale, s_kb, s_ks, s_kh,
                  BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                  BLOCK_D: tl.constexpr, GPP: tl.constexpr, IEEE: tl.constexpr):
    pid_g = tl.program_id(2)
    rows, rvalid, grow, offs_d, d_ok, offs_k, q, k_base = _program_tile(QBAR, K, mq, H, s_kb, s_kh, BM, GK, D, BLOCK_D)
    out_row = grow * ng
    for gi in range(GPP):
        g = pid_g * GPP + gi
        t = _group_logmass(q, k_base, g, Skv, scale, s_ks, offs_k, offs_d, d_ok, BM, GK, N, IEEE)
        gmax = tl.max(t, axis=1)
        safe = tl.where(gmax == float("-inf"), 0.0, gmax)
        gsum = tl.sum(tl.exp(t - safe[:, None]), axis=1)
        ok = rvalid & (g < ng)
        tl.store(GMAX + out_row + g, gmax, mask=ok)
        tl.store(GSUM + out_row + g, gsum, mask=ok)


@triton.jit
def _chunk_needed(GMAX, grow, rvalid, pid_g, ng, floor, GPP: tl.constexpr):
    """Whether any row of the program has a group of chunk ``pid_g`` whose pass-1 max reaches
    ``floor (BM,)`` (the chunk-level skip test: one branch outside the group loop, which Triton
    can then pipeline)."""
    gc = pid_g * GPP + tl.arange(0, GPP)
    gm = tl.load(GMAX + grow[:, None] * ng + gc[None, :], mask=rvalid[:, None] & (gc[None, :] < ng),
                 other=float("-inf"))
    return tl.max(tl.max((gm >= floor[:, None]).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _store_codes(CODES, code, grow, ok, g, ng, BM: tl.constexpr, GT: tl.constexpr):
    """Store the ``(BM, GT)`` tile codes (each < 16) of group ``g``, 8 to an int32, low bits first:
    ``CODES[(row * ng + g) * CW + w]``, ``CW = max(1, GT // 8)``."""
    CPW: tl.constexpr = 8 if GT >= 8 else GT  # codes per int32
    CW: tl.constexpr = GT // CPW
    jl = tl.arange(0, GT)
    packed = code << (4 * (jl % CPW))[None, :]
    words = tl.sum(tl.reshape(packed, (BM, CW, CPW)), axis=2)  # disjoint bit fields: the sum is an or
    w = tl.arange(0, CW)
    tl.store(CODES + (grow * ng + g)[:, None] * CW + w[None, :], words, mask=ok[:, None])


@triton.jit
def _threshold_group(q, k_base, g, Skv, scale, s_ks, offs_k, offs_d, d_ok, lse, THETA, grow, rvalid, cols, th, acc_m,
                     acc_c, CODES, ng, BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, T: tl.constexpr,
                     IEEE: tl.constexpr, WITH_MASS: tl.constexpr, COUNT: tl.constexpr, WIDE: tl.constexpr,
                     CODE: tl.constexpr):
    """Group ``g``'s tile masses (``WITH_MASS``) and counts (``COUNT``) at each row's ``T``
    thresholds, added to the accumulators; with ``CODE``, each tile's code (how many of the
    thresholds it reaches) is stored in 4 bits (:func:`_store_codes`)."""
    t = _group_logmass(q, k_base, g, Skv, scale, s_ks, offs_k, offs_d, d_ok, BM, GK, N, IEEE)
    if WITH_MASS or WIDE:
        # One threshold at a time keeps the compare in registers.
        if WITH_MASS:
            p = tl.exp(t - lse[:, None])
        if CODE:
            code = tl.zeros((BM, GK // N), dtype=tl.int32)
        for i in tl.static_range(T):
            th_i = tl.load(THETA + grow * T + i, mask=rvalid, other=float("inf"))
            sel = t >= th_i[:, None]
            if WITH_MASS:
                m_i = tl.sum(tl.where(sel, p, 0.0), axis=1)
                acc_m += tl.where(cols[None, :] == i, m_i[:, None], 0.0)
            if COUNT:
                c_i = tl.sum(sel.to(tl.int32), axis=1)
                acc_c += tl.where(cols[None, :] == i, c_i[:, None], 0)
            if CODE:
                code += sel.to(tl.int32)
        if CODE:
            _store_codes(CODES, code, grow, rvalid & (g < ng), g, ng, BM, GK // N)
    else:
        # Counts alone with few tiles per group (wide kv tiles): every (tile, threshold) pair at once.
        acc_c += tl.sum((t[:, :, None] >= th[:, None, :]).to(tl.int32), axis=1)
    return acc_m, acc_c


@triton.jit
def _candidates_kernel(QBAR, K, GMAX, LSE, THETA, MASS, CNT, CODES, mq, H, Skv, ng, nchunk, scale,
                       s_kb, s_ks, s_kh, margin,
                       BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, GPP: tl.constexpr, T: tl.constexpr, T_P: tl.constexpr,
                       IEEE: tl.constexpr, WITH_MASS: tl.constexpr, COUNT: tl.constexpr, WIDE: tl.constexpr,
                       SKIP: tl.constexpr, CODE: tl.constexpr = False):
    """Per (query-block row, program chunk): the mass (``WITH_MASS``) and count (``COUNT``) of
    tiles at or above each of the row's ``T`` thresholds. Without the mass it is the budget
    search's counts pass (no exp); ``LSE`` and ``MASS`` are then not touched. With ``CODE`` (and
    the mass) it also stores every scored tile's code for :func:`_words_kernel`; skipped chunks
    store none."""
    pid_g = tl.program_id(2)
    rows, rvalid, grow, offs_d, d_ok, offs_k, q, k_base = _program_tile(QBAR, K, mq, H, s_kb, s_kh, BM, GK, D, BLOCK_D)
    cols = tl.arange(0, T_P)
    lse = rows  # unused without the mass
    if WITH_MASS:
        lse = tl.load(LSE + grow, mask=rvalid, other=0.0)
    # The smallest threshold of each row (candidates ascend); invalid rows never need a group. Rows
    # that need no budget search have thresholds of +inf, so a program of such rows skips every
    # chunk (with SKIP).
    lowest = tl.load(THETA + grow * T, mask=rvalid, other=float("inf"))
    th = lowest
    if not (WITH_MASS or WIDE):
        th = tl.load(THETA + grow[:, None] * T + cols[None, :], mask=rvalid[:, None] & (cols[None, :] < T),
                     other=float("inf"))
    acc_m = tl.zeros((BM, T_P), dtype=tl.float32)
    acc_c = tl.zeros((BM, T_P), dtype=tl.int32)
    need = True
    if SKIP:
        need = _chunk_needed(GMAX, grow, rvalid, pid_g, ng, lowest - margin, GPP)
    if need:
        for gi in range(GPP):
            acc_m, acc_c = _threshold_group(q, k_base, pid_g * GPP + gi, Skv, scale, s_ks, offs_k, offs_d, d_ok, lse,
                                            THETA, grow, rvalid, cols, th, acc_m, acc_c, CODES, ng, BM, GK, N, T, IEEE,
                                            WITH_MASS, COUNT, WIDE, CODE)
    out = (grow * nchunk + pid_g)[:, None] * T + cols[None, :]
    ok = rvalid[:, None] & (cols[None, :] < T)
    if WITH_MASS:
        tl.store(MASS + out, acc_m, mask=ok)
    if COUNT:
        tl.store(CNT + out, acc_c, mask=ok)


@triton.jit
def _bit_word(keep, jl, GT: tl.constexpr):
    """``(BM,)`` int64 words of the ``(BM, GT)`` keep flags (bit ``j`` = tile ``j``) and their
    ``(BM,)`` int32 popcounts. The words are built from 32-bit halves: int32 shifts and sums are
    cheaper than int64 ones (H100, 64x1: emit + expand 0.85 -> 0.78 ms)."""
    cnt = tl.sum(keep.to(tl.int32), axis=1)
    bits = keep.to(tl.int32) << (jl[None, :] % 32)
    if GT > 32:
        halves = tl.sum(tl.reshape(bits, (bits.shape[0], GT // 32, 32)), axis=2)
        lo, hi = tl.split(tl.reshape(halves, (bits.shape[0], 2)))  # GT == 64 (a word holds <= 64)
        word = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
    else:
        word = tl.sum(bits, axis=1).to(tl.int64) & 0xFFFFFFFF
    return word, cnt


@triton.jit
def _forced_tiles(i, j, Sq, Skv, M, TXT, N: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """Whether tile ``j`` of query block ``i`` is forced (broadcast shapes): a diagonal tile (keys
    at the block's own positions), a text key tile, or any tile of a block holding text queries."""
    forced = (i < 0) | (j < 0)  # False, in the broadcast shape (the text test is a run-time branch)
    if KEEP_DIAG:
        forced = forced | ((j * N < (i + 1) * M) & ((j + 1) * N > i * M))
    if TXT > 0:
        forced = forced | ((j + 1) * N > Skv - TXT) | ((i + 1) * M > Sq - TXT)
    return forced


@triton.jit
def _emit_group(q, k_base, g, Skv, Sq, scale, s_ks, offs_k, offs_d, d_ok, theta, rows, rvalid, grow, jl, nt, ng, M,
                TXT, WORDS, COUNTS, BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, GT: tl.constexpr,
                KEEP_DIAG: tl.constexpr, IEEE: tl.constexpr):
    """Group ``g``'s bit word and count per row (kept: log-mass >= theta, or forced), stored;
    returns the counts."""
    t = _group_logmass(q, k_base, g, Skv, scale, s_ks, offs_k, offs_d, d_ok, BM, GK, N, IEEE)
    j = g * GT + jl  # global tile ids of the group
    keep = (t >= theta[:, None]) | _forced_tiles(rows[:, None], j[None, :], Sq, Skv, M, TXT, N, KEEP_DIAG)
    keep = keep & (j[None, :] < nt) & rvalid[:, None]
    word, cnt = _bit_word(keep, jl, GT)
    ok = rvalid & (g < ng)
    tl.store(WORDS + grow * ng + g, word, mask=ok)
    tl.store(COUNTS + grow * ng + g, cnt, mask=ok)
    return cnt


@triton.jit
def _forced_in(k0, k1, i0, Sq, Skv, M, TXT, BM: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """Whether keys ``[k0, k1)`` may hold a forced tile of the program's query blocks
    ``[i0, i0 + BM)``: a diagonal one, a text key, or any key of a text query row."""
    forced = k0 < 0  # False, as a tensor (the text test below is a run-time branch)
    if KEEP_DIAG:
        forced = (k0 < (i0 + BM) * M) & (k1 > i0 * M)
    if TXT > 0:
        forced = forced | (k1 > Skv - TXT) | ((i0 + BM) * M > Sq - TXT)
    return forced


@triton.jit
def _emit_kernel(QBAR, K, GMAX, THETA_ROW, WORDS, COUNTS, ROW_KEPT, mq, H, Sq, Skv, ng, nt, scale,
                 s_kb, s_ks, s_kh, margin, M, TXT,
                 BM: tl.constexpr, GK: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, GPP: tl.constexpr, KEEP_DIAG: tl.constexpr, IEEE: tl.constexpr,
                 SKIP: tl.constexpr):
    pid_g = tl.program_id(2)
    rows, rvalid, grow, offs_d, d_ok, offs_k, q, k_base = _program_tile(QBAR, K, mq, H, s_kb, s_kh, BM, GK, D, BLOCK_D)
    GT: tl.constexpr = GK // N
    jl = tl.arange(0, GT)
    theta = tl.load(THETA_ROW + grow, mask=rvalid, other=float("inf"))
    i0 = tl.program_id(0) * BM
    kept = tl.zeros((BM,), dtype=tl.int32)
    need = True
    if SKIP:
        need = _chunk_needed(GMAX, grow, rvalid, pid_g, ng, theta - margin, GPP)
        # Forced tiles (diagonal, text keys, text query rows) may sit in any chunk.
        need = need | _forced_in(pid_g * GPP * GK, (pid_g + 1) * GPP * GK, i0, Sq, Skv, M, TXT, BM, KEEP_DIAG)
    if need:
        for gi in range(GPP):
            kept += _emit_group(q, k_base, pid_g * GPP + gi, Skv, Sq, scale, s_ks, offs_k, offs_d, d_ok, theta, rows,
                                rvalid, grow, jl, nt, ng, M, TXT, WORDS, COUNTS, BM, GK, N, GT, KEEP_DIAG, IEEE)
    # Row totals for the offsets (integer atomics: the same sums in any order).
    tl.atomic_add(ROW_KEPT + grow, kept, mask=rvalid & (kept > 0))


@triton.jit
def _words_kernel(MASS, THETA, GMAX, CODES, WORDS, COUNTS, ROW_KEPT, mq, Sq, Skv, ng, nt, nchunk, top_p, margin, M, TXT,
                  T: tl.constexpr, T_P: tl.constexpr, N: tl.constexpr, GT: tl.constexpr, GW: tl.constexpr,
                  CB: tl.constexpr, KEEP_DIAG: tl.constexpr):
    """Per row (a program each), after the candidates kernel stored the tile codes: the row's kept
    mass at each threshold (its chunks' sums), the pick (the largest threshold whose mass reaches
    ``top_p``, else the first: ``predict._select``), and then, as the emit kernel would write them
    at the picked threshold, every group's bit word and count and the row's total. A tile is kept
    when its code exceeds the pick (its log-mass reaches the picked threshold) or it is forced.
    Groups whose pass-1 max is below the picked threshold (by the skip margin) hold no kept tile,
    and their codes are not read: those of chunks the candidates kernel skipped were never written."""
    r = tl.program_id(0).to(tl.int64)
    i = r % mq
    cols = tl.arange(0, T_P)
    mass = tl.zeros((T_P,), dtype=tl.float32)
    for c0 in range(0, nchunk, CB):
        c = c0 + tl.arange(0, CB)
        m = tl.load(MASS + (r * nchunk + c)[:, None] * T + cols[None, :],
                    mask=(c[:, None] < nchunk) & (cols[None, :] < T), other=0.0)
        mass += tl.sum(m, axis=0)
    pick = tl.max(tl.where((mass >= top_p) & (cols < T), cols, 0), axis=0)
    floor = tl.load(THETA + r * T + pick) - margin
    CPW: tl.constexpr = 8 if GT >= 8 else GT
    CW: tl.constexpr = GT // CPW
    jl = tl.arange(0, GT)
    total = tl.full((), 0, dtype=tl.int32)
    for g0 in range(0, ng, GW):
        g = g0 + tl.arange(0, GW)
        gin = g < ng
        scored = tl.load(GMAX + r * ng + g, mask=gin, other=float("-inf")) >= floor
        cw = tl.load(CODES + (r * ng + g)[:, None] * CW + (jl // CPW)[None, :], mask=scored[:, None], other=0)
        code = (cw >> (4 * (jl % CPW))[None, :]) & 15
        j = g[:, None] * GT + jl[None, :]
        keep = ((code > pick) | _forced_tiles(i, j, Sq, Skv, M, TXT, N, KEEP_DIAG)) & (j < nt)
        word, cnt = _bit_word(keep, jl, GT)
        tl.store(WORDS + r * ng + g, word, mask=gin)
        tl.store(COUNTS + r * ng + g, cnt, mask=gin)
        total += tl.sum(tl.where(gin, cnt, 0), axis=0)
    tl.store(ROW_KEPT + r, total)


@triton.jit
def _sorted_desc(x, idx, NGP: tl.constexpr):
    """``x`` (``>= 0``, ``(NGP,)``) sorted descending, ties towards lower ``idx``, and the order
    (positions of the sorted elements in ``x``): one int64 sort of (float bits, reversed index)."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)  # order-preserving for floats >= 0
    key = tl.sort((bits << 32) | (NGP - 1 - idx).to(tl.int64), descending=True)
    order = (NGP - 1 - (key & 0xFFFFFFFF)).to(tl.int32)
    return (key >> 32).to(tl.int32).to(tl.float32, bitcast=True), order


@triton.jit
def _thresholds_kernel(GMAX, GSUM, NG_KEYS, LSE, THETA, ng, top_p, nudge, T: tl.constexpr, NGP: tl.constexpr):
    """Per row ``predict._thresholds``: lse, the bracket of ``predict._bracket`` (same bounds) and
    ``T`` thresholds, all in registers."""
    r = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, NGP)
    ok = idx < ng
    gmax = tl.load(GMAX + r * ng + idx, mask=ok, other=float("-inf"))
    gsum = tl.load(GSUM + r * ng + idx, mask=ok, other=0.0)
    top = tl.max(gmax, 0)
    lse = top + tl.log(tl.sum(tl.where(ok, gsum * tl.exp(gmax - top), 0.0), 0))
    n_g = tl.load(NG_KEYS + idx, mask=ok, other=1.0)
    m = tl.where(ok, tl.exp(gmax - lse), 0.0)  # max tile mass per group
    P = m * gsum  # group mass
    # Upper bound: the groups by max tile mass, until their mass reaches top_p.
    ms, om = _sorted_desc(m, idx, NGP)
    cum_p = tl.cumsum(tl.gather(P, om, 0), 0)
    i_hi = tl.minimum(tl.sum((cum_p < top_p).to(tl.int32), 0), ng - 1)
    tau_hi = tl.sum(tl.where(idx == i_hi, ms, 0.0), 0)
    # Lower bound (a): every group whose max tile clears tau contributes at least that tile.
    j = tl.sum((tl.cumsum(ms, 0) < top_p).to(tl.int32), 0)
    tau_a = tl.where(j < ng, tl.sum(tl.where(idx == tl.minimum(j, ng - 1), ms, 0.0), 0), 0.0)
    # Lower bound (b): sum_g (P_g - n_g tau)_+ = top_p, segment by segment of the sorted P_g / n_g.
    bs, ob = _sorted_desc(tl.where(ok, P / n_g, 0.0), idx, NGP)
    A = tl.cumsum(tl.gather(P, ob, 0), 0)
    Nn = tl.cumsum(tl.where(ok, tl.gather(n_g, ob, 0), 0.0), 0)
    tau_i = (A - top_p) / tl.where(Nn > 0, Nn, 1.0)
    nxt = tl.where(idx + 1 < ng, tl.gather(bs, tl.minimum(idx + 1, NGP - 1), 0), 0.0)
    fits = ok & (tau_i >= 0) & (tau_i <= bs * (1 + 1e-6)) & (tau_i >= nxt * (1 - 1e-6))
    tau_b = tl.max(tl.where(fits, tau_i, 0.0), 0)
    tau_lo = tl.maximum(tau_a, tau_b)
    tau_hi = tl.maximum(tau_hi, tau_lo)
    # Bracket ends in log-mass, nudged down (see predict._thresholds), and T thresholds between.
    lo = tl.log(tl.maximum(tau_lo, 1e-38)) + lse - nudge
    hi = tl.maximum(tl.log(tl.maximum(tau_hi, 1e-38)) + lse - nudge, lo)
    cols = tl.arange(0, T)
    tl.store(THETA + r * T + cols, lo + (hi - lo) * (cols.to(tl.float32) / (T - 1)))
    tl.store(LSE + r, lse)


@triton.jit
def _head_rows_kernel(WORDS, ROW_KEPT, PREFIX, HEAD_TILES, HEAD_DENSE, HOST, mq, ng, nt, N, short, last_word,
                      last_bit, M, Sq, limit, ROUND: tl.constexpr, RB: tl.constexpr):
    """Per head (a program each): the running sum of its rows' kept tiles (``ROW_KEPT``, which the
    emit kernel summed over each row's groups), the head's tile total, whether it is rounded up to full
    (``ROUND``: its score entries, ``sum(keys x query rows)``, reach ``limit``; see
    :func:`_dense_limit`) and whether it keeps every tile (``HOST[1 + head]``)."""
    h = tl.program_id(0).to(tl.int64)
    run = tl.full((), 0, dtype=tl.int64)
    entries = tl.full((), 0, dtype=tl.int64)
    fewest = tl.full((), nt, dtype=tl.int64)
    for r0 in range(0, mq, RB):
        r = r0 + tl.arange(0, RB)
        ok = r < mq
        row = h * mq + r
        kept = tl.load(ROW_KEPT + row, mask=ok, other=0).to(tl.int64)
        tl.store(PREFIX + row, run + tl.cumsum(kept, 0) - kept, mask=ok)
        run += tl.sum(kept, 0)
        fewest = tl.minimum(fewest, tl.min(tl.where(ok, kept, nt), 0))
        if ROUND:
            tail = (tl.load(WORDS + row * ng + last_word, mask=ok, other=0) >> last_bit) & 1
            q_rows = tl.where(r == mq - 1, Sq - (mq - 1) * M, M).to(tl.int64)
            entries += tl.sum(tl.where(ok, (kept * N - tail * short) * q_rows, 0), 0)
    dense = entries < 0  # False
    if ROUND:
        dense = entries >= limit
    tl.store(HEAD_TILES + h, tl.where(dense, tl.full((), mq, tl.int64) * nt, run))  # int64: mq * nt may pass 2**31
    tl.store(HEAD_DENSE + h, dense.to(tl.int8))
    tl.store(HOST + 1 + h, (dense | (fewest == nt)).to(tl.int64))


@triton.jit
def _row_starts_kernel(COUNTS, ROW_KEPT, PREFIX, HEAD_TILES, HEAD_DENSE, STARTS, FULL, OFFS, FINAL, HOST, BH, mq, ng, nt,
                       gs, BHP: tl.constexpr, CB: tl.constexpr):
    """Per row (a program each): its offset in the indices (the heads before it, then its head's
    rows before it), every group's output offset (``STARTS``, for the expand kernel), its chained
    CSR offsets ``OFFS (BH, mq + 1)``, its final count and full-row flag (rounded heads keep every
    tile), and the total tile count (``HOST[0]``, by the last row)."""
    r = tl.program_id(0).to(tl.int64)
    h = r // mq
    i = r % mq
    heads = tl.arange(0, BHP)
    before = tl.load(HEAD_TILES + heads, mask=heads < h, other=0)
    base = tl.sum(before, 0)
    dense = tl.load(HEAD_DENSE + h) != 0
    start = base + tl.where(dense, i * nt, tl.load(PREFIX + r))
    kept = tl.where(dense, nt, tl.load(ROW_KEPT + r).to(tl.int64))
    tl.store(FINAL + r, kept)
    tl.store(FULL + r, dense.to(tl.int8))
    tl.store(OFFS + h * (mq + 1) + i, start)
    if i == mq - 1:
        tl.store(OFFS + h * (mq + 1) + mq, start + kept)
    if r == BH * mq - 1:
        tl.store(HOST, start + kept)
    cols = tl.arange(0, CB)
    run = start
    for c0 in range(0, ng, CB):
        c = c0 + cols
        inside = c < ng
        cnt = tl.load(COUNTS + r * ng + c, mask=inside, other=0).to(tl.int64)
        cnt = tl.where(dense, tl.minimum(gs, nt - c * gs), cnt)  # a rounded row keeps every tile of the group
        cnt = tl.where(inside, cnt, 0)
        tl.store(STARTS + r * ng + c, run + tl.cumsum(cnt, 0) - cnt, mask=inside)
        run += tl.sum(cnt, 0)


@triton.jit
def _expand_words(WORDS, STARTS, FULL, n_words, ng, BW: tl.constexpr, GT: tl.constexpr):
    """The program's ``BW`` words: validity, bits, output offsets, full-row flags, the bit
    positions ``(GT,)`` and the tile id of every bit ``(BW, GT)``."""
    w = tl.program_id(0) * BW + tl.arange(0, BW)
    ok = w < n_words
    word = tl.load(WORDS + w, mask=ok, other=0)
    start = tl.load(STARTS + w, mask=ok, other=0)
    full = tl.load(FULL + w // ng, mask=ok, other=0) != 0
    jl = tl.arange(0, GT)
    return ok, word, start, full, jl, (w % ng)[:, None] * GT + jl[None, :]


@triton.jit
def _expand_kernel(WORDS, STARTS, FULL, OUT, n_words, ng, nt, BW: tl.constexpr, GT: tl.constexpr):
    """Bit words -> sorted tile ids from each word's output offset ``STARTS``; a word of a row
    flagged in ``FULL`` stands for every tile of its group (the dense-head round-up)."""
    ok, word, start, full, jl, tile = _expand_words(WORDS, STARTS, FULL, n_words, ng, BW, GT)
    half = tl.where(jl[None, :] < 32, word[:, None].to(tl.int32), (word >> 32)[:, None].to(tl.int32))  # int32 shifts
    bits = (half >> (jl[None, :] % 32)) & 1
    bits = tl.where(full[:, None], (tile < nt).to(tl.int32), bits)
    pos = start[:, None] + tl.cumsum(bits, axis=1) - 1
    tl.store(OUT + pos, tile.to(tl.int32), mask=(bits > 0) & ok[:, None])


def is_interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_stats_kernel, triton.runtime.JITFunction)


def supports(group_keys: int, N: int, D: int) -> bool:
    """Whether the kernels handle groups of ``group_keys`` keys, tiles of ``N`` keys and head dim
    ``D`` (``tl.dot`` needs power-of-two extents >= 16; a word holds at most 64 tiles)."""
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    return pow2(N) and pow2(group_keys) and group_keys >= 16 and group_keys // N <= 64 and 16 <= D <= 256


class TritonPasses:
    """The per-key passes of ``dbsp.predict`` on Triton; same interface as ``_TorchPasses``.

    Args:
        qbar: ``(B*H, Mq, D)`` float32 pooled queries (contiguous).
        k: ``(B, Skv, H, D)`` keys (any strides with a unit last stride).
        heads: H.
        N: keys per tile; scale: score scale.
        group_tiles: tiles per group (``dbsp.predict.group_tiles``).
    """

    def __init__(self, qbar, k, heads, N, scale, *, group_tiles: int, block_m: int | None = None,
                 groups_per_prog: int | None = None):
        if k.stride(-1) != 1:
            k = k.contiguous()
        self.qbar = qbar.contiguous()
        self.k, self.H, self.N, self.scale = k, heads, N, float(scale)
        self.BH, self.mq, self.D = qbar.shape
        self.Skv = k.shape[1]
        self.nt = -(-self.Skv // N)
        self.gs = group_tiles
        self.GK = group_tiles * N
        self.ng = -(-self.nt // self.gs)
        # Read the module settings at call time so benchmarks can sweep them.
        self.BM = BLOCK_M if block_m is None else block_m
        self.GPP = GROUPS_PER_PROG if groups_per_prog is None else groups_per_prog
        if self.GPP < 1 or self.GPP & (self.GPP - 1):
            raise ValueError(f"groups per program must be a power of two, got {self.GPP}")  # the chunk skip test
        self.nchunk = -(-self.ng // self.GPP)
        self.BLOCK_D = max(16, triton.next_power_of_2(self.D))
        self.IEEE = k.dtype == torch.float32 or k.dtype == torch.float64
        if k.dtype == torch.float64:  # tl.dot has no fp64 path; score in fp32
            self.k = k.float()
        self._gmax = None

    def _grid(self):
        return (triton.cdiv(self.mq, self.BM), self.BH, self.nchunk)

    def _common(self):
        k = self.k
        return dict(BM=self.BM, GK=self.GK, N=self.N, D=self.D, BLOCK_D=self.BLOCK_D, GPP=self.GPP, IEEE=self.IEEE), (
            k.stride(0), k.stride(1), k.stride(2))

    def stats(self, gs: int, ng: int):
        """Pass 1 (as ``_TorchPasses.stats``): per group the max tile log-mass and the sum of
        exp(log-mass - max), ``(R, ng)`` each."""
        assert (gs, ng) == (self.gs, self.ng), "group layout must match the kernels'"
        R = self.BH * self.mq
        gmax = torch.empty(R, ng, device=self.k.device, dtype=torch.float32)
        gsum = torch.empty_like(gmax)
        meta, (sb, ss, sh) = self._common()
        _stats_kernel[self._grid()](self.qbar, self.k, gmax, gsum, self.mq, self.H, self.Skv, ng, self.scale,
                                    sb, ss, sh, **meta)
        self._gmax = gmax
        return gmax, gsum

    def thresholds(self, gmax: torch.Tensor, gsum: torch.Tensor, n_g: torch.Tensor, top_p: float, T: int):
        """``predict._thresholds`` in one kernel (a program per row, its groups in registers; rows
        of more than ``BRACKET_MAX_GROUPS`` groups, or ``T`` not a power of two, run it in torch)."""
        from .. import predict

        R, ng = gmax.shape
        if ng > BRACKET_MAX_GROUPS or T & (T - 1):
            return predict._thresholds(gmax, gsum, n_g, top_p, T)
        lse = torch.empty(R, device=gmax.device, dtype=torch.float32)
        theta = torch.empty(R, T, device=gmax.device, dtype=torch.float32)
        _thresholds_kernel[(R,)](gmax.contiguous(), gsum.contiguous(), n_g.float().contiguous(), lse, theta, ng,
                                 float(top_p), predict._NUDGE, T=T, NGP=max(16, triton.next_power_of_2(ng)))
        return lse, theta

    def candidates(self, lse: torch.Tensor, theta: torch.Tensor, count: bool = True):
        """Pass 2 (as ``_TorchPasses.candidates``): mass ``(R, T)`` and, with ``count`` (else None),
        count ``(R, T)`` of tiles with log-mass >= ``theta``."""
        R, T = theta.shape
        mass = torch.empty(R, self.nchunk, T, device=theta.device, dtype=torch.float32)
        cnt = torch.empty(R, self.nchunk, T, device=theta.device, dtype=torch.int32) if count else mass
        meta, (sb, ss, sh) = self._common()
        _candidates_kernel[self._grid()](
            self.qbar, self.k, self._gmax, lse.contiguous(), theta.float().contiguous(), mass, cnt, cnt,
            self.mq, self.H, self.Skv, self.ng, self.nchunk, self.scale, sb, ss, sh, SKIP_MARGIN,
            T=T, T_P=triton.next_power_of_2(T), WITH_MASS=True, COUNT=count, WIDE=True, SKIP=SKIP_CHUNKS,
            num_stages=PASS_STAGES, **meta)
        return mass.sum(dim=1), cnt.sum(dim=1).to(torch.int64) if count else None

    def counts(self, theta: torch.Tensor) -> torch.Tensor:
        """``(R, T)`` int64 count of tiles with log-mass >= each threshold of ``theta (R, T)``
        (``+inf`` rows cost nothing where their whole program has them)."""
        R, T = theta.shape
        cnt = torch.empty(R, self.nchunk, T, device=theta.device, dtype=torch.int32)
        meta, (sb, ss, sh) = self._common()
        T_P = triton.next_power_of_2(T)
        theta = theta.float().contiguous()
        _candidates_kernel[self._grid()](
            self.qbar, self.k, self._gmax, theta, theta, theta, cnt, cnt, self.mq, self.H, self.Skv, self.ng,
            self.nchunk, self.scale, sb, ss, sh, SKIP_MARGIN, T=T, T_P=T_P, WITH_MASS=False, COUNT=True,
            WIDE=self.gs * T_P > COUNT_3D_PAIRS, SKIP=SKIP_CHUNKS, num_stages=PASS_STAGES, **meta)
        return cnt.sum(dim=1, dtype=torch.int64)

    def fuses(self, T: int) -> bool:
        """Whether :meth:`select_emit` stands for the last candidates pass, the pick and the emit
        pass: ``FUSED_EMIT`` on, groups of at most ``FUSED_MAX_TILES`` tiles, and a tile's code,
        ``0..T``, fits in 4 bits."""
        return FUSED_EMIT and self.gs <= FUSED_MAX_TILES and T <= 15

    def select_emit(self, lse: torch.Tensor, theta: torch.Tensor, top_p: float, forced,
                    dense_above: float | None = None, fill: int | None = None):
        """:meth:`candidates` at ``theta (R, T)``, ``predict._select``'s pick, and :meth:`emit` at
        the picked thresholds, with one pass over the keys: the candidates kernel stores each
        tile's code, and the words kernel picks and writes the bit words from the codes. Same
        result as :meth:`emit`; ``fill`` (tests only) poisons the code buffer before the pass."""
        return self._expand(*self._select_words(lse, theta, top_p, forced, fill)[:3], forced, dense_above)

    def _select_words(self, lse, theta, top_p, forced, fill=None):
        """:meth:`select_emit`'s two kernels: ``words``, ``counts``, ``row_kept`` as
        :meth:`_emit_words` gives them, and the code buffer (entries of chunks that the candidates
        kernel skipped keep ``fill``)."""
        R, T = theta.shape
        if not self.fuses(T):
            raise ValueError(f"select_emit needs FUSED_EMIT, groups of at most FUSED_MAX_TILES={FUSED_MAX_TILES} "
                             f"tiles and at most 15 thresholds; got {self.gs} tiles a group, {T} thresholds")
        dev = theta.device
        mass = torch.empty(R, self.nchunk, T, device=dev, dtype=torch.float32)
        CW = max(1, self.gs // 8)
        codes = torch.empty(R * self.ng * CW, device=dev, dtype=torch.int32)
        if fill is not None:
            codes.fill_(fill)
        theta = theta.float().contiguous()
        meta, (sb, ss, sh) = self._common()
        _candidates_kernel[self._grid()](
            self.qbar, self.k, self._gmax, lse.contiguous(), theta, mass, mass, codes,
            self.mq, self.H, self.Skv, self.ng, self.nchunk, self.scale, sb, ss, sh, SKIP_MARGIN,
            T=T, T_P=triton.next_power_of_2(T), WITH_MASS=True, COUNT=False, WIDE=True, SKIP=SKIP_CHUNKS, CODE=True,
            num_stages=PASS_STAGES, **meta)
        words = torch.empty(R * self.ng, device=dev, dtype=torch.int64)
        counts = torch.empty(R * self.ng, device=dev, dtype=torch.int32)
        row_kept = torch.empty(R, device=dev, dtype=torch.int32)
        _words_kernel[(R,)](
            mass, theta, self._gmax, codes, words, counts, row_kept, self.mq, forced.seq_len_q, self.Skv, self.ng,
            self.nt, self.nchunk, float(top_p), SKIP_MARGIN, forced.q_block, forced.text_tokens,
            T=T, T_P=triton.next_power_of_2(T), N=self.N, GT=self.gs, GW=WORDS_GROUPS,
            CB=min(64, max(16, triton.next_power_of_2(self.nchunk))), KEEP_DIAG=forced.keep_diagonal)
        return words, counts, row_kept, codes

    def emit(self, theta_row: torch.Tensor, forced, dense_above: float | None = None):
        """Kept tiles per row, their sorted ids, per head whether it is full (every tile of every
        row: a list of ``B * H`` bools, read with the tile count in one device read), and the
        chained row offsets ``(1, B * H, Mq + 1)``; with ``dense_above``, heads whose density
        exceeds it come back full (as ``predict._round_up_dense_heads`` does, on the device)."""
        return self._expand(*self._emit_words(theta_row, forced), forced, dense_above)

    def _emit_words(self, theta_row: torch.Tensor, forced, fill: int = 0):
        """The emit kernel's outputs: ``words`` and ``counts`` ``(R * ng,)`` per (row, group) and
        ``row_kept (R,)``. Groups the kernel skips keep ``fill``; anything but 0 is for tests
        (the expand kernel reads skipped groups as empty)."""
        R = self.BH * self.mq
        words = torch.full((R * self.ng,), fill, device=theta_row.device, dtype=torch.int64)
        counts = torch.full((R * self.ng,), fill, device=theta_row.device, dtype=torch.int32)
        row_kept = torch.zeros(R, device=theta_row.device, dtype=torch.int32)
        meta, (sb, ss, sh) = self._common()
        _emit_kernel[self._grid()](
            self.qbar, self.k, self._gmax, theta_row.float().contiguous(), words, counts, row_kept,
            self.mq, self.H, forced.seq_len_q, self.Skv, self.ng, self.nt, self.scale, sb, ss, sh,
            SKIP_MARGIN, forced.q_block, forced.text_tokens, KEEP_DIAG=forced.keep_diagonal, SKIP=SKIP_CHUNKS,
            num_stages=PASS_STAGES, **meta)
        return words, counts, row_kept

    def _expand(self, words, counts, row_kept, forced, dense_above):
        """:meth:`emit`'s result from the bit words and group counts: two small kernels for the row
        counts, the dense-head round-up and every offset (a handful of launches: on a slow host,
        each torch operation here would cost the GPU tens of microseconds of waiting), one
        device read, then the expand kernel."""
        R, BH, mq, ng, nt, gs, N, dev = self.BH * self.mq, self.BH, self.mq, self.ng, self.nt, self.gs, self.N, words.device
        i64 = dict(device=dev, dtype=torch.int64)
        prefix, final = torch.empty(R, **i64), torch.empty(R, **i64)
        starts = torch.empty(R * ng, **i64)
        offsets = torch.empty(1, BH, mq + 1, **i64)
        head_tiles, host = torch.empty(BH, **i64), torch.empty(1 + BH, **i64)
        head_dense, full_rows = torch.empty(BH, device=dev, dtype=torch.int8), torch.empty(R, device=dev, dtype=torch.int8)
        last = nt - 1  # the partial last tile holds only Skv - (nt - 1) * N keys
        CB = min(1024, max(16, triton.next_power_of_2(ng)))
        _head_rows_kernel[(BH,)](
            words, row_kept, prefix, head_tiles, head_dense, host, mq, ng, nt, N, nt * N - self.Skv, last // gs,
            last % gs, forced.q_block, forced.seq_len_q, _dense_limit(dense_above, forced.seq_len_q * self.Skv),
            ROUND=dense_above is not None, RB=HEAD_ROWS_BLOCK)
        _row_starts_kernel[(R,)](counts, row_kept, prefix, head_tiles, head_dense, starts, full_rows, offsets, final, host,
                                 BH, mq, ng, nt, gs, BHP=max(16, triton.next_power_of_2(BH)), CB=CB)
        host = host.tolist()  # the one device read: the tile total and which heads are full
        out = torch.empty(host[0], device=dev, dtype=torch.int32)
        BW = max(1, EXPAND_BITS // gs)
        _expand_kernel[(triton.cdiv(R * ng, BW),)](words, starts, full_rows, out, R * ng, ng, nt, BW=BW, GT=gs,
                                                   num_warps=EXPAND_WARPS)
        return final, out, [bool(x) for x in host[1:]], offsets
