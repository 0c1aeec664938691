"""Triton kernels of ``dbsp.predict``'s pooled paths (private; see predict.py).

The PyTorch version of the pooled-key predictor issues about a hundred small operations per call
(softmax, sort, cumsum, gathers, forced tiles, nonzero, dense-head rounding, offsets); at video
shapes their launches cost more than the arithmetic. Here one call is::

    pool    (x2)  block means of q and k, float32, laid out (B, H, blocks, D); with the stored
                  means of an earlier call, also the squared change per (batch, head), so a
                  MaskPredictor reuse check is two launches and one host read
    bmm           pooled query x pooled key dot products per head (torch, chunked over heads)
    select        per query block, in registers: tile log-masses, softmax, the top_p cut by
                  bisection on the masses' float bits (no sort), the min/max budgets, ties towards
                  lower tile ids, the forced tiles -> a keep byte per tile, the tile count of the
                  row, and its tiles and kept score entries added to its head's totals
    offsets       per head: rounded up to full from every head's totals, then its rows' offsets
                  (starting after all earlier heads' tiles) and whether it is full; one host read
                  of the last offset and the full flags sizes the indices (and tells
                  sparse_attention which heads are dense, so it need not read them)
    emit          keep bytes (or a full row for a rounded-up head) -> sorted int32 tile ids

The selection is the same rule as ``predict._exact_top_p`` (softmax, stable descending order,
smallest prefix whose cumulative mass reaches top_p, clamped to the budgets); the masses are
summed in a different order, so a row whose mass crosses top_p within float rounding may keep one
tile more or less than the PyTorch path. (An in-register sort of each row did the same in 0.47 ms
for 64x16 masks at Wan2.1-1.3B 480p on an H100; the bisection takes 0.16 ms.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Largest tile count per query block the select kernel holds in registers.
MAX_TILES = 4096
# Tokens per load of the pooling kernel. Its programs are small, so few warps win. On an H100 at
# Wan2.1-1.3B 480p (`benchmarks/sweep_select.py`): keys in 16-token blocks took 0.042 ms with 1
# warp, 0.057 with 2, 0.125 with 4 and 0.237 with 8; queries in 64-token blocks, loaded at once,
# 0.043 ms with 2 warps against 0.071 in two 32-token loads with 4. A kernel reading several heads
# of a token at once, in fewer programs, was slower (0.13 ms for q at 64-token blocks).
_POOL_TOKENS = 64


def _pool_warps(elements: int) -> int:
    return 1 if elements <= 2048 else 2 if elements <= 8192 else 4


@triton.jit
def _pool_kernel(X, OUT, OLD, ACC, S, H, nb, block, s_xb, s_xs, s_xh, s_xd,
                 HAS_OLD: tl.constexpr, TB: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start = blk * block
    n = tl.minimum(block, S - start)
    offs_d = tl.arange(0, DP)
    d_ok = offs_d < D
    offs_t = tl.arange(0, TB)
    base = X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + offs_d[None, :].to(tl.int64) * s_xd
    acc = tl.zeros((DP,), tl.float32)
    for t0 in range(0, block, TB):
        t = t0 + offs_t
        ok = t < n
        x = tl.load(base + (start + t)[:, None].to(tl.int64) * s_xs, mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    mean = acc / n.to(tl.float32)
    dst = (bh.to(tl.int64) * nb + blk) * D + offs_d
    tl.store(OUT + dst, mean, mask=d_ok)
    if HAS_OLD:
        old = tl.load(OLD + dst, mask=d_ok, other=0.0)
        diff = mean - old
        tl.atomic_add(ACC + 2 * bh, tl.sum(diff * diff, axis=0))
        tl.atomic_add(ACC + 2 * bh + 1, tl.sum(old * old, axis=0))


@triton.jit
def _largest_bits(bits, w, goal):
    """The largest ``x`` in ``[0, bits of 1.0]`` such that the weights ``w`` of the entries with
    ``bits >= x`` sum to at least ``goal`` (so ``x`` is the bit pattern of an entry), or 0 if all
    of them together fall short. ``bits`` are the int32 patterns of floats in ``[0, 1]`` (ordered
    as the floats are); ``w`` is 0 where an entry must not count. Bisection: 30 masked sums."""
    lo = 0
    hi = 0x3F800001  # one past the bits of 1.0
    for _ in range(30):
        mid = lo + (hi - lo) // 2
        if tl.sum(tl.where(bits >= mid, w, 0.0), axis=0) >= goal:
            lo = mid
        else:
            hi = mid
    return lo


@triton.jit
def _select_kernel(DOTS, KEEP, COUNT, TOTALS, BH, row0, mq, nt, Sq, Skv, scale, log_n, log_last, top_p, lo, hi, M,
                   N, text, DIAG: tl.constexpr, NTP: tl.constexpr):
    r = tl.program_id(0)  # row of this chunk
    row = row0 + r  # global row: head * mq + query block
    qb = row % mq
    j = tl.arange(0, NTP)
    valid = j < nt
    # Tile log-mass: pooled score plus log(keys in tile) (the last tile may be partial).
    x = tl.load(DOTS + r.to(tl.int64) * nt + j, mask=valid, other=float("-inf")) * scale
    x += tl.where(j == nt - 1, log_last, log_n)
    e = tl.where(valid, tl.exp(x - tl.max(x, axis=0)), 0.0)
    p = e / tl.sum(e, axis=0)
    # The value v where the descending cumulative mass reaches top_p is the largest one whose
    # entries at or above it hold >= top_p (bisection on the float bits, no sort); the ties at
    # v enter one by one, as they would in sorted order.
    bits = p.to(tl.int32, bitcast=True)
    v_bits = _largest_bits(bits, p, top_p)
    above = valid & (bits > v_bits)
    tied = valid & (bits == v_bits)
    mass_above = tl.sum(tl.where(above, p, 0.0), axis=0)
    v = v_bits.to(tl.float32, bitcast=True)  # the tied entries' mass
    n_tied = tl.sum(tied.to(tl.int32), axis=0)
    need = tl.ceil((top_p - mass_above) / tl.where(v > 0, v, 1.0)).to(tl.int32)
    reached = tl.sum(p, axis=0) >= top_p
    n_keep = tl.where(reached, tl.sum(above.to(tl.int32), axis=0) + tl.minimum(tl.maximum(need, 1), n_tied), nt)
    budget = tl.maximum(tl.minimum(tl.minimum(n_keep, nt), hi), lo)
    if budget != n_keep:
        # Budgets moved the cut: the budget-th largest value by a count bisection instead.
        # (A row that rounding left short of top_p keeps every tile: v_bits is 0 there.)
        v_bits = _largest_bits(bits, valid.to(tl.float32), budget.to(tl.float32))
        above = valid & (bits > v_bits)
        tied = valid & (bits == v_bits)
    n_keep = budget
    # Of the tiles tied at the threshold keep the lowest ids, as a stable sort would.
    keep = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= n_keep - tl.sum(above.to(tl.int32), axis=0)))
    if DIAG:
        keep |= (j * N < (qb + 1) * M) & ((j + 1) * N > qb * M)
    if text > 0:
        keep |= ((j + 1) * N > Skv - text) | ((qb + 1) * M > Sq - text)
    keep &= valid
    tl.store(KEEP + row.to(tl.int64) * nt + j, keep.to(tl.int8), mask=valid)
    count = tl.sum(keep.to(tl.int32), axis=0)
    # Score entries of the row: kept keys (the partial last tile holds only Skv - (nt - 1) * N of
    # its N keys) times the block's queries (the last block may be partial); summed per head.
    short = tl.sum(tl.where(keep & (j == nt - 1), nt * N - Skv, 0), axis=0)
    queries = tl.minimum(M, Sq - qb * M)
    tl.store(COUNT + row, count)
    tl.atomic_add(TOTALS + row // mq, count.to(tl.int64))
    tl.atomic_add(TOTALS + BH + row // mq, (count.to(tl.int64) * N - short) * queries)


@triton.jit
def _offsets_kernel(COUNT, TOTALS, OFFS, DENSE, HOST, BH, mq, nt, limit, ROUND: tl.constexpr, BHP: tl.constexpr,
                    RB: tl.constexpr):
    # One program per head: round heads up to full from every head's totals, start this head
    # after the tiles of all heads before it, and write its rows' offsets (a running cumsum).
    # HOST gets what the host reads: the tile total (from the last head) and every head's full flag.
    bh = tl.program_id(0)
    h = tl.arange(0, BHP)
    ok = h < BH
    tiles = tl.load(TOTALS + h, mask=ok, other=0)
    if ROUND:
        full = ok & (tl.load(TOTALS + BH + h, mask=ok, other=0) > limit)
        tiles = tl.where(full, mq * nt, tiles)
        mine = tl.sum(tl.where(h == bh, full.to(tl.int32), 0), axis=0) != 0
    else:
        mine = bh < 0
    start = tl.sum(tl.where(h < bh, tiles, 0), axis=0).to(tl.int64)
    base = OFFS + bh.to(tl.int64) * (mq + 1)
    tl.store(base, start)
    full_rows = 0
    for i0 in range(0, mq, RB):
        i = i0 + tl.arange(0, RB)
        c = tl.load(COUNT + bh.to(tl.int64) * mq + i, mask=i < mq, other=0).to(tl.int64)
        c = tl.where(mine & (i < mq), nt, c)
        tl.store(base + 1 + i, start + tl.cumsum(c, 0), mask=i < mq)
        start += tl.sum(c, axis=0)
        full_rows += tl.sum((c == nt).to(tl.int32), axis=0)
    # Full: rounded up, or every row keeps every tile anyway (emit writes the same ids for both).
    tl.store(DENSE + bh, (full_rows == mq).to(tl.int8))
    tl.store(HOST + 1 + bh, (full_rows == mq).to(tl.int64))
    if bh == BH - 1:
        tl.store(HOST, start)


@triton.jit
def _emit_kernel(KEEP, OFFS, DENSE, OUT, mq, nt, NTP: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, NTP)
    valid = j < nt
    keep = tl.load(KEEP + row.to(tl.int64) * nt + j, mask=valid, other=0) != 0
    keep = tl.where(tl.load(DENSE + row // mq) != 0, valid, keep)
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    # Offsets are (heads, mq + 1): row i of head h starts at h * (mq + 1) + i.
    tl.store(OUT + tl.load(OFFS + row + row // mq) + pos, j, mask=keep)


def _warps(ntp: int) -> int:
    # H100, 64x16 masks (2048 tiles a row): select 0.156 ms with 4 warps, 0.176 with 8, 0.178 with 2.
    return 4 if ntp <= 2048 else 8


def pool(x: torch.Tensor, block: int, old: torch.Tensor | None = None, acc: torch.Tensor | None = None) -> torch.Tensor:
    """Block means of ``x (B, S, H, D)`` as ``(B, H, ceil(S / block), D)`` float32 (a partial last
    block is averaged over its real tokens).

    With ``old`` (an earlier result of the same shape), adds ``sum((mean - old) ** 2)`` and
    ``sum(old ** 2)`` of every (batch, head) to ``acc[bh, 0]`` and ``acc[bh, 1]`` (float32,
    ``(B * H, 2)``, zeroed by the caller).
    """
    B, S, H, D = x.shape
    nb = -(-S // block)
    out = torch.empty(B, H, nb, D, dtype=torch.float32, device=x.device)
    has_old = old is not None
    TB, DP = min(_POOL_TOKENS, triton.next_power_of_2(block)), triton.next_power_of_2(D)
    _pool_kernel[(nb, B * H)](
        x, out, old if has_old else out, acc if has_old else out, S, H, nb, block, *x.stride(),
        HAS_OLD=has_old, TB=TB, D=D, DP=DP, num_warps=_pool_warps(TB * DP),
    )
    return out


def select(dots: torch.Tensor, row0: int, keep: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor, *,
           mq: int, Sq: int, Skv: int, scale: float, top_p: float, lo: int, hi: int, M: int, N: int, diagonal: bool,
           text: int) -> None:
    """Run the select kernel on the pooled dot products ``dots (rows, nt)`` (rows ``row0 ..`` of
    the whole grid), writing ``keep[row0 + r]`` (int8 per tile) and ``counts`` (int32 tiles) per
    row, and adding each row's tiles to ``totals[0, head]`` and its kept score entries to
    ``totals[1, head]`` (``totals``: int64 ``(2, heads)``, zeroed by the caller)."""
    rows, nt = dots.shape
    ntp = max(16, triton.next_power_of_2(nt))
    _select_kernel[(rows,)](
        dots, keep, counts, totals, totals.shape[1], row0, mq, nt, Sq, Skv, float(scale), math.log(N),
        math.log(Skv - (nt - 1) * N), float(top_p), lo, hi, M, N, text, DIAG=diagonal, NTP=ntp, num_warps=_warps(ntp),
    )


def offsets(counts: torch.Tensor, totals: torch.Tensor, *, mq: int, nt: int, limit: int | None) -> tuple:
    """CSR offsets from the select kernel's outputs, in one launch.

    Heads whose kept score entries (``totals[1]``) exceed ``limit`` are rounded up to full
    (``limit=None``: none are). Returns ``offsets`` (int64 ``(heads, mq + 1)``, each head starting
    where the one before it ends), ``full`` (int8 ``(heads,)``, 1 for a head that keeps every
    tile of every row: rounded up, or so selected) and ``host`` (int64 ``(1 + heads,)``: the tile
    total, then ``full``; what the caller reads, with no further device operation).
    """
    heads = totals.shape[1]
    out = torch.empty(heads, mq + 1, dtype=torch.int64, device=counts.device)
    full = torch.empty(heads, dtype=torch.int8, device=counts.device)
    host = torch.empty(1 + heads, dtype=torch.int64, device=counts.device)
    _offsets_kernel[(heads,)](
        counts, totals, out, full, host, heads, mq, nt, 0 if limit is None else limit, ROUND=limit is not None,
        BHP=max(16, triton.next_power_of_2(heads)), RB=min(1024, max(16, triton.next_power_of_2(mq))),
    )
    return out, full, host


def emit(keep: torch.Tensor, offsets: torch.Tensor, full: torch.Tensor, total: int, *, mq: int) -> torch.Tensor:
    """Sorted int32 tile ids of every row: the kept tiles, or all of them in rounded-up heads
    (``offsets`` and ``full`` as :func:`offsets` returns them; ``total`` = the last offset)."""
    rows, nt = keep.shape
    out = torch.empty(total, dtype=torch.int32, device=keep.device)
    if total:
        ntp = max(16, triton.next_power_of_2(nt))
        _emit_kernel[(rows,)](keep, offsets, full, out, mq, nt, NTP=ntp, num_warps=_warps(ntp))
    return out
