"""Communication primitives of the parallel attentions: autograd all-to-all, ring pass, LSE merge.

Every collective here returns new tensors (nothing is written in place into an input), and every
asynchronous handle is waited on by the code that created it, right before the data is used.
:func:`merge_attention_` is the one in-place function: it updates a running result the caller owns.
"""

from __future__ import annotations

import datetime
from typing import Sequence

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """All-to-all along dim 0 with explicit splits; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, group, output_split_sizes, input_split_sizes):
        ctx.group = group
        ctx.splits = (output_split_sizes, input_split_sizes)
        return _all_to_all(x, group, output_split_sizes, input_split_sizes)

    @staticmethod
    def backward(ctx, grad):
        output_split_sizes, input_split_sizes = ctx.splits
        return _all_to_all(grad.contiguous(), ctx.group, input_split_sizes, output_split_sizes), None, None, None


def _all_to_all(x: torch.Tensor, group, output_split_sizes: list[int], input_split_sizes: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes, group=group
    )
    return out


def all_to_all(
    x: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    input_split_sizes: Sequence[int],
    output_split_sizes: Sequence[int],
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0, even or uneven splits.

    Rank ``a`` sends rows ``x[sum(in[:b]) : sum(in[:b + 1])]`` to group rank ``b``; the output is
    the pieces received from group ranks ``0, 1, ...`` concatenated in that order. The backward
    pass is the same exchange with the two split lists swapped.

    Args:
        x: ``(N, ...)`` tensor with ``N == sum(input_split_sizes)``.
        group: the process group (a group of size 1 returns ``x`` unchanged).
        input_split_sizes: rows sent to each group rank (length = group size).
        output_split_sizes: rows received from each group rank (length = group size).

    Returns:
        ``(sum(output_split_sizes), ...)``, a new tensor.

    Example (2 ranks, splits ``in = [1, 2]`` on rank 0 and ``[3, 1]`` on rank 1)::

        rank 0: x = [a0 | a1 a1]      -> out = [a0 | b0 b0 b0]     (out splits [1, 3])
        rank 1: x = [b0 b0 b0 | b1]   -> out = [a1 a1 | b1]        (out splits [2, 1])
    """
    size = dist.get_world_size(group)
    input_split_sizes, output_split_sizes = list(map(int, input_split_sizes)), list(map(int, output_split_sizes))
    if len(input_split_sizes) != size or len(output_split_sizes) != size:
        raise ValueError(
            f"all_to_all needs one split per rank of the group (size {size}); got "
            f"{len(input_split_sizes)} input and {len(output_split_sizes)} output splits"
        )
    if sum(input_split_sizes) != x.shape[0]:
        raise ValueError(
            f"input_split_sizes {input_split_sizes} sum to {sum(input_split_sizes)}, but x has {x.shape[0]} rows"
        )
    if size == 1:
        return x
    return _AllToAll.apply(x, group, output_split_sizes, input_split_sizes)


class PendingPass:
    """Tensors in flight around the ring; :meth:`wait` returns them once they have arrived."""

    def __init__(self, works, received: list[torch.Tensor], timeout: datetime.timedelta | None = None):
        self._works = works
        self._received = received
        self._timeout = timeout

    def wait(self) -> list[torch.Tensor]:
        """The received tensors; raises ``RuntimeError`` if the transfer does not finish within the timeout."""
        for work in self._works:
            if self._timeout is None:
                work.wait()
            else:
                work.wait(self._timeout)
        self._works = []
        return self._received


def ring_pass(
    tensors: Sequence[torch.Tensor],
    recv_shapes: Sequence[Sequence[int]],
    *,
    group: dist.ProcessGroup,
    send_to: int,
    recv_from: int,
    timeout: datetime.timedelta | None = None,
) -> PendingPass:
    """Start sending ``tensors`` to global rank ``send_to`` and receiving as many from ``recv_from``.

    The ring attentions call it with ``send_to`` = ring rank ``i - 1`` and ``recv_from`` = ring
    rank ``i + 1`` (the contract's direction: at ring step ``t`` ring rank ``i`` holds the chunk that
    ring rank ``(i + t) mod R`` held at step 0). The operations are issued together with
    ``batch_isend_irecv`` and return at once, so the caller computes on the current chunk while the
    next one travels, and calls :meth:`PendingPass.wait` right before it needs it.

    Args:
        tensors: tensors to send (read, never modified).
        recv_shapes: the shape of each tensor to receive (the sender's shapes; they may differ from
            this rank's when chunks have different lengths). dtypes and device follow ``tensors``.
        group: the ring process group.
        send_to, recv_from: global ranks of the two neighbours.
        timeout: how long :meth:`PendingPass.wait` waits before raising. Without it a gloo wait
            uses the limit the group had when it was *created* (30 minutes for DeviceMesh
            sub-groups, even after their timeout is changed); NCCL's watchdog applies the group's
            timeout by itself, and a host-side limit there would block the host on every step.
            Default: None (the backend's own limit).

    Returns:
        A :class:`PendingPass`; its ``wait()`` returns the received tensors (new tensors).
    """
    if len(recv_shapes) != len(tensors):
        raise ValueError(f"ring_pass got {len(tensors)} tensors to send but {len(recv_shapes)} receive shapes")
    received = [t.new_empty(tuple(shape)) for t, shape in zip(tensors, recv_shapes)]
    ops = [dist.P2POp(dist.isend, t.contiguous(), send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in received]
    return PendingPass(dist.batch_isend_irecv(ops), received, timeout)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets into the attention over their union.

    With ``w_a = exp(lse_a - lse)`` and ``w_b = exp(lse_b - lse)``, ``lse = log(e^lse_a + e^lse_b)``::

        out = w_a * out_a + w_b * out_b

    which is exact because each partial ``out`` is already normalised by its own ``exp(lse)``.
    A row that selects no key in a part has ``lse = -inf`` there and weight 0 (its ``out`` is
    ignored); a row that selects no key in either part gets ``out = 0`` and ``lse = -inf``, never NaN.

    Args:
        out_a, out_b: ``(B, L, H, D)`` partial outputs.
        lse_a, lse_b: ``(B, H, L)`` their log-sum-exp (natural log).

    Returns:
        ``(out, lse)``: ``(B, L, H, D)`` float32 (float64 if an input is float64) and ``(B, H, L)``.
    """
    dtype = torch.promote_types(torch.promote_types(out_a.dtype, out_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # rows empty in both parts: any finite shift
    ea, eb = torch.exp(lse_a - m), torch.exp(lse_b - m)  # in [0, 1]; the larger one is 1 unless both are 0
    total = ea + eb
    lse = m + torch.log(total)  # log(0) = -inf for rows empty in both parts
    inv = torch.where(total > 0, 1.0 / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(total))
    wa = (ea * inv).transpose(1, 2).unsqueeze(-1)  # (B, H, L) -> (B, L, H, 1)
    wb = (eb * inv).transpose(1, 2).unsqueeze(-1)
    # An empty part may hold anything in out (e.g. an uninitialised buffer): zero it, never 0 * NaN.
    out = torch.where(wa > 0, out_a.to(dtype) * wa, 0.0) + torch.where(wb > 0, out_b.to(dtype) * wb, 0.0)
    return out, lse


def merge_attention_(
    out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the partial attention ``(out_b, lse_b)`` into the running ``(out, lse)`` in place.

    The result is :func:`merge_attention`'s (same formula, same handling of empty rows), written
    into ``out`` and ``lse``. On a CUDA device with Triton, float32 ``out`` and ``lse`` are updated
    by one kernel that reads ``out`` and ``out_b`` once and writes ``out`` once
    (:mod:`dbsp.kernels.merge`; it agrees with :func:`merge_attention` to float32 rounding). The
    ring merges each step this way. Elsewhere the out-of-place result is copied back.

    Args:
        out: ``(B, L, H, D)`` running output, float32 or float64, written in place.
        lse: ``(B, H, L)`` its log-sum-exp, ``out``'s dtype, written in place.
        out_b, lse_b: the part to add (any floating dtype that ``out``'s holds exactly).

    Returns:
        ``(out, lse)``, the same tensors.
    """
    B, L, H, D = out.shape
    if out_b.shape != out.shape or lse.shape != (B, H, L) or lse_b.shape != (B, H, L):
        raise ValueError(f"merge_attention_ needs out and out_b of one shape (B, L, H, D) and lse, lse_b of (B, H, L); "
                         f"got {tuple(out.shape)}, {tuple(lse.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)}")
    dtype = torch.promote_types(torch.promote_types(out.dtype, out_b.dtype), torch.float32)
    if out.dtype != dtype or lse.dtype != dtype:
        raise TypeError(f"merge_attention_ writes into out and lse, which must be {dtype} to hold the merge of "
                        f"{out.dtype} and {out_b.dtype} parts; got out {out.dtype}, lse {lse.dtype}")
    if len({t.device for t in (out, lse, out_b, lse_b)}) != 1:
        raise ValueError("merge_attention_ needs all four tensors on one device")
    kernel = _triton_merge() if out.is_cuda and dtype == torch.float32 and lse_b.dtype == torch.float32 else None
    if kernel is not None:
        kernel(out, lse, out_b, lse_b)
        return out, lse
    merged, merged_lse = merge_attention(out, lse, out_b, lse_b)
    out.copy_(merged)
    lse.copy_(merged_lse)
    return out, lse


def _triton_merge():
    """:func:`dbsp.kernels.merge.merge_into`, or None without Triton."""
    try:
        from ..kernels.merge import merge_into
    except ImportError:
        return None
    return merge_into
