"""The ring's log-sum-exp merge in one pass (Triton): a partial attention added into a running one.

After each ring step, the step's partial result ``(o, l)`` joins the running ``(out, lse)``
(:func:`dbsp.dist.merge_attention` has the formula and its edge cases). The PyTorch expression of
that formula makes about ten passes over the ``(B, L, H, D)`` float32 output (one temporary per
operation); this kernel reads ``out`` and ``o`` once and writes ``out`` once, in place, with the
same weights, the same zeroing of parts that select nothing, and the same order of the final sum.
Its ``exp``/``log`` may differ from PyTorch's in the last bits, so results agree to float32
rounding, not bit for bit.

One program merges ``BLOCK_R`` rows, a row being the ``D`` values of one (batch, token, head); any
strides work, since a ring step's output can be a transposed view (dense heads from cuDNN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TINY = torch.finfo(torch.float32).tiny
BLOCK_ROWS = 16
"""Rows per program (not yet tuned on a GPU: ``benchmarks/bench_merge.py`` sweeps it)."""


@triton.jit
def _merge_kernel(
    out_ptr, lse_ptr, o_ptr, l_ptr,
    rows, L, H, D,
    so_b, so_l, so_h, so_d,
    sp_b, sp_l, sp_h, sp_d,
    sa_b, sa_h, sa_l,
    sb_b, sb_h, sb_l,
    TINY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < rows
    h = r % H
    t = r // H
    tok = t % L
    b = t // L
    a_at = lse_ptr + b * sa_b + h * sa_h + tok * sa_l
    la = tl.load(a_at, mask=live, other=float("-inf"))
    lb = tl.load(l_ptr + b * sb_b + h * sb_h + tok * sb_l, mask=live, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows empty in both parts: any finite shift
    ea = tl.exp(la - m)
    eb = tl.exp(lb - m)
    total = ea + eb
    inv = tl.where(total > 0, 1.0 / tl.maximum(total, TINY), 0.0)
    wa = ea * inv
    wb = eb * inv
    d = tl.arange(0, BLOCK_D)
    cols = live[:, None] & (d < D)[None, :]
    out_at = out_ptr + (b * so_b + tok * so_l + h * so_h)[:, None] + d[None, :] * so_d
    o_at = o_ptr + (b * sp_b + tok * sp_l + h * sp_h)[:, None] + d[None, :] * sp_d
    # A part of weight 0 is never read: whatever it holds (NaN in an unwritten buffer) gives 0.
    xa = tl.load(out_at, mask=cols & (wa > 0)[:, None], other=0.0)
    xb = tl.load(o_at, mask=cols & (wb > 0)[:, None], other=0.0).to(tl.float32)
    tl.store(out_at, xa * wa[:, None] + xb * wb[:, None], mask=cols)
    tl.store(a_at, m + tl.log(total), mask=live)


def merge_into(out: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, l: torch.Tensor, *, block_rows: int | None = None) -> None:
    """Merge ``(o, l)`` into ``(out, lse)`` in place (module docstring).

    ``out`` ``(B, L, H, D)`` and ``lse`` ``(B, H, L)`` are float32 and writable; ``o`` has the
    same shape in any floating dtype, ``l`` the lse's shape. The caller checks shapes and devices
    (:func:`dbsp.dist.merge_attention_` does). ``block_rows``: rows per program, a power of two
    (default :data:`BLOCK_ROWS`).
    """
    B, L, H, D = out.shape
    rows = B * L * H
    if rows == 0:
        return
    block_rows = BLOCK_ROWS if block_rows is None else block_rows
    block_d = triton.next_power_of_2(D)
    grid = (triton.cdiv(rows, block_rows),)
    _merge_kernel[grid](
        out, lse, o, l, rows, L, H, D,
        *out.stride(), *o.stride(), *lse.stride(), *l.stride(),
        TINY=_TINY, BLOCK_R=block_rows, BLOCK_D=block_d,
    )
