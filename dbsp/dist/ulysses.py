"""Ulysses (head-parallel) sequence parallelism: all-to-all from sequence shards to head groups and back.

Tensors here are *token-first*, ``(tokens, B, heads, ...)``, so that the pieces of an all-to-all
along tokens are contiguous and the pieces received from consecutive ranks concatenate into one
contiguous token range without a copy.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from .comm import all_to_all
from .groups import SPGroups, check_one_degree


def seq_to_heads(
    x: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    shard_sizes: Sequence[int],
    head_offsets: Sequence[int],
    head_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """All-to-all over a Ulysses group: every rank's tokens for all heads -> all tokens for its heads.

    Args:
        x: ``(S_k, B, H, ...)`` token-first, this rank's shard (heads already in the plan's order).
        group: the Ulysses group (U ranks).
        shard_sizes: token counts ``S_0 .. S_{U-1}`` of the group's ranks, in group order.
        head_offsets: ``(U + 1)`` head boundaries: group rank ``j`` gets heads
            ``head_offsets[j]:head_offsets[j + 1]`` (equal groups unless a plan says otherwise).
        head_order: ``(H,)`` int64 head permutation applied first (``x.index_select(2, head_order)``,
            folded into the send copy), or None for the natural order. Default: None.

    Returns:
        ``(sum(shard_sizes), B, H_k, ...)``: the group's whole token range (its shards in group
        order) for this rank's ``H_k`` heads.

    Picture (U = 2, H = 4; rank 0 holds tokens a, rank 1 tokens b)::

        rank 0: a[h0 h1 h2 h3]   ->   rank 0: a[h0 h1] b[h0 h1]
        rank 1: b[h0 h1 h2 h3]   ->   rank 1: a[h2 h3] b[h2 h3]
    """
    U = len(shard_sizes)
    if U == 1:
        return x if head_order is None else x.index_select(2, head_order)
    me = dist.get_rank(group)
    if x.shape[0] != shard_sizes[me]:
        raise ValueError(f"x has {x.shape[0]} tokens but shard_sizes[{me}] = {shard_sizes[me]}")
    unit = math.prod(x.shape[1:2]) * math.prod(x.shape[3:])  # elements per (token, head)
    h = [head_offsets[j + 1] - head_offsets[j] for j in range(U)]
    # (S_k, B, H, ...) -> pieces (S_k, B, H_j, ...) flattened back to back, one per destination j.
    if head_order is None:
        pieces = [x[:, :, head_offsets[j] : head_offsets[j + 1]] for j in range(U)]
    else:
        pieces = [x.index_select(2, head_order[head_offsets[j] : head_offsets[j + 1]]) for j in range(U)]
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv = all_to_all(
        send,
        group=group,
        input_split_sizes=[shard_sizes[me] * h[j] * unit for j in range(U)],
        output_split_sizes=[shard_sizes[j] * h[me] * unit for j in range(U)],
    )
    # The received pieces are (S_j, B, H_me, ...) for j = 0 .. U-1 in order: one token range.
    return recv.reshape(sum(shard_sizes), x.shape[1], h[me], *x.shape[3:])


def heads_to_seq(
    y: torch.Tensor, *, group: dist.ProcessGroup, shard_sizes: Sequence[int], head_offsets: Sequence[int]
) -> torch.Tensor:
    """The inverse of :func:`seq_to_heads`: ``(sum(shard_sizes), B, H_k, ...)`` -> ``(S_k, B, H, ...)``."""
    U = len(shard_sizes)
    if U == 1:
        return y
    me = dist.get_rank(group)
    rest = tuple(y.shape[3:])
    unit = y.shape[1] * math.prod(rest)  # elements per (token, head)
    h = [head_offsets[j + 1] - head_offsets[j] for j in range(U)]
    # Pieces for destination j are the contiguous token rows of its shard: y is already in order.
    recv = all_to_all(
        y.reshape(-1),
        group=group,
        input_split_sizes=[shard_sizes[j] * h[me] * unit for j in range(U)],
        output_split_sizes=[shard_sizes[me] * h[j] * unit for j in range(U)],
    )
    pieces = torch.split(recv, [shard_sizes[me] * h[j] * unit for j in range(U)])
    B = y.shape[1]
    return torch.cat([p.reshape(shard_sizes[me], B, h[j], *rest) for j, p in enumerate(pieces)], dim=2)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    *,
    groups: SPGroups,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    verify: bool = True,
):
    """Sparse attention with Ulysses parallelism only (``groups.ring == 1``).

    Each rank sends every other rank the heads it will own, computes ``sparse_attention`` over
    the whole sequence for its ``H / U`` heads, and sends the output back. This is
    :func:`dbsp.dist.sp_attention` without a plan, restricted to ``R = 1``.

    Args:
        q, k, v: ``(B, S_r, H, D)``, this rank's contiguous sequence shard; shard sizes follow
            ``torch.tensor_split(range(S), P)``.
        mask: the global ``SparseMask`` (``B, H, S x S``), identical on every rank, on q's device.
        groups: an :class:`SPGroups` with ``ring == 1``; ``H`` must be divisible by ``ulysses``.
        scale, return_lse, backend: as in :func:`dbsp.sparse_attention`.
        verify: check shapes, dtypes and mask sizes across ranks first (one small all-gather).
            Default: True.

    Returns:
        ``out`` ``(B, S_r, H, D)`` or ``(out, lse)`` with lse ``(B, H, S_r)`` float32 (float64 for float64 inputs).

    Example::

        >>> groups = SPGroups.init(ulysses=4, ring=1)
        >>> out = ulysses_attention(q_shard, k_shard, v_shard, mask, groups=groups)
    """
    from .usp import sp_attention

    check_one_degree(groups, "ulysses_attention", unit="ring")
    return sp_attention(
        q, k, v, mask, groups=groups, scale=scale, return_lse=return_lse, backend=backend, verify=verify
    )
