"""``sparse_attention``: dbsp's public attention entry point and its backend dispatch table.

Backends compute the same function and differ only in speed:

* ``"reference"``: exact pure PyTorch (``reference_attention``); any device.
* ``"triton"``: the Triton gather kernel (``dbsp/kernels``); CUDA, or CPU under ``TRITON_INTERPRET=1``.

``backend="auto"`` picks ``"triton"`` on CUDA and ``"reference"`` elsewhere (logged once at INFO),
and sends a fully dense mask, or the fully dense heads of a mask, to dense SDPA (cuDNN first; with
``return_lse``, cuDNN's attention op that also returns the lse), which computes the same attention
faster.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_mask_matches, check_out_dtype, check_qkv, check_scale
from .mask import SparseMask, _known_full_heads
from .reference import reference_attention

log = logging.getLogger("dbsp")

_BACKENDS = ("reference", "triton")
_logged: set[str] = set()


@dataclass
class _Schedule:
    """What the kernel path derives from a mask once: launch order and the dense-head split."""

    order: torch.Tensor  # (B * H * Mq,) int32: heaviest query blocks of each head first
    n_dense: int  # heads whose every query block selects every key tile
    dense: torch.Tensor | None = None  # (n_dense,) head ids, when 0 < n_dense < H
    dense_range: tuple[int, int] | None = None  # (first, end) when those ids are consecutive
    sparse_order: torch.Tensor | None = None  # ``order`` without the dense heads' rows
    sparse_nnz: int = 0  # selected tiles of the other heads


_schedules: "weakref.WeakKeyDictionary[SparseMask, _Schedule]" = weakref.WeakKeyDictionary()


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``sparse_attention(backend=...)`` besides ``"auto"``."""
    return _BACKENDS


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _auto_backend(q: torch.Tensor) -> str:
    if q.device.type == "cuda":
        if _triton_importable():
            return "triton"
        _log_once("sparse_attention: Triton is not installed, so CUDA inputs use the (slow, exact) reference backend")
        return "reference"
    _log_once(f"sparse_attention: inputs on {q.device.type}, using the exact reference backend (the kernel needs CUDA)")
    return "reference"


def _schedule(mask: SparseMask) -> _Schedule:
    """The mask's launch schedule, computed once per mask object; it reads the device once (which
    heads are full), or not at all where the mask's producer recorded them."""
    cached = _schedules.get(mask)
    if cached is None:
        counts = mask.row_counts()  # (B, H, Mq)
        B, H, mq = counts.shape
        within = torch.argsort(counts, dim=-1, descending=True, stable=True)
        order = (within + torch.arange(B * H, device=counts.device).reshape(B, H, 1) * mq).reshape(-1)
        full = _known_full_heads(mask)
        if full is None:
            flags = (counts == mask.num_kv_tiles).all(dim=2).all(dim=0).tolist()  # (H,)
            full = tuple(h for h in range(H) if flags[h])
        cached = _Schedule(order.to(torch.int32), len(full))
        if 0 < cached.n_dense < H:
            cached.dense = _on_device(full, counts.device)
            if full == tuple(range(full[0], full[-1] + 1)):
                cached.dense_range = (full[0], full[-1] + 1)
            # Head (b, h)'s rows fill positions [(b * H + h) * Mq, ... + Mq) of ``order``.
            sparse = _on_device(sorted(set(range(H)) - set(full)), counts.device)
            cached.sparse_order = cached.order.view(B, H, mq).index_select(1, sparse).reshape(-1)
            cached.sparse_nnz = mask.nnz - B * cached.n_dense * mq * mask.num_kv_tiles
        _schedules[mask] = cached
    return cached


def _on_device(ids, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 tensor on ``device``, copied without waiting for the device's queue."""
    return torch.tensor(list(ids), dtype=torch.int64).to(device, non_blocking=True)


def _triton(q, k, v, mask: SparseMask, scale: float, out_dtype: torch.dtype, order: torch.Tensor | None = None,
            nnz: int = -1):
    """The kernel on ``order``'s rows (default: every row, heaviest first); ``nnz``: the tiles those
    rows select, for the autotuner's density key (default: all of the mask's)."""
    try:
        from .kernels.op import sparse_attention_fwd
        from .kernels.sparse_fwd import check_supported
    except ImportError as exc:
        raise ImportError(
            "backend='triton' needs Triton: pip install 'dbsp[triton]' (CUDA builds of torch ship it); "
            f"or use backend='auto' or 'reference' ({exc})"
        ) from exc

    check_supported(q, mask.q_block)
    order = _schedule(mask).order if order is None else order
    return sparse_attention_fwd(
        q, k, v, mask.offsets, mask.indices, order, mask.q_block, mask.kv_tile, mask.seq_len_kv, scale,
        out_dtype == torch.float32 and q.dtype != torch.float32, nnz,
    )


def _dense_sdpa(q, k, v, scale: float) -> torch.Tensor:
    """Dense SDPA in the (B, S, H, D) layout, preferring cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        ctx = sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.7 has no priority order; let SDPA choose among all of them
        ctx = sdpa_kernel(order)
    with ctx:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _dense_sdpa_lse(q, k, v, scale: float):
    """Dense attention and its lse through cuDNN, or None where cuDNN cannot run it (speed-only fallback)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return None
    B, Sq, H, _ = q.shape
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale
        )
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        _log_once(f"sparse_attention: cuDNN attention with lse unavailable ({type(e).__name__}); dense heads use the kernel")
        return None
    return res[0].transpose(1, 2), res[1].reshape(B, H, Sq).float()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    out_dtype: torch.dtype | None = None,
):
    """Attention of ``q`` over the keys that ``mask`` selects.

    Args:
        q: ``(B, Sq, H, D)`` queries (float16, bfloat16, float32; float64 on the reference backend).
        k: ``(B, Skv, H, D)`` keys, same dtype and device as ``q``.
        v: ``(B, Skv, H, D)`` values.
        mask: ``SparseMask`` for this batch, head count and sequence lengths, on ``q``'s device.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        return_lse: also return the ``(B, H, Sq)`` log-sum-exp (natural log; float32, float64 for
            float64 inputs), which partial results are merged with. Default: False.
        backend: ``"auto"`` or one of :func:`available_backends`. Default: ``"auto"``.
        out_dtype: dtype of ``out``: ``q.dtype`` or float32 (the reference backend also takes the
            other floating dtypes). float32 keeps a partial result unrounded until it is merged
            with others (the ring does this); heads that ``"auto"`` sends to dense SDPA are
            computed in ``q.dtype`` and then converted. Default: ``q.dtype``.

    Returns:
        ``out`` ``(B, Sq, H, D)`` in ``out_dtype``, or ``(out, lse)`` with ``return_lse=True``.
        Query rows that select no key get 0 (and lse = -inf).

    Example::

        >>> q = k = v = torch.randn(1, 200, 4, 64)
        >>> mask = SparseMask.full(1, 4, 200, 200, q_block=64, kv_tile=16)
        >>> out = sparse_attention(q, k, v, mask)
    """
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known backends: 'auto', " + ", ".join(map(repr, _BACKENDS)))
    B, Sq, Skv, H, D = check_qkv(q, k, v)
    check_mask_matches(mask, B, Sq, Skv, H, q.device)
    scale = check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out_dtype = check_out_dtype(out_dtype, q)
    name = _auto_backend(q) if backend == "auto" else backend
    if name == "reference":
        out, lse = reference_attention(q, k, v, mask, scale=scale, out_dtype=out_dtype)
        return (out, lse) if return_lse else out
    if q.dtype == torch.float64:
        raise TypeError("the triton backend supports float16, bfloat16 and float32; got float64 (use backend='reference')")
    if out_dtype not in (q.dtype, torch.float32):
        raise TypeError(f"the triton backend writes out in q.dtype ({q.dtype}) or float32, got out_dtype={out_dtype}")
    if backend == "auto":
        plan = _schedule(mask)
        if plan.n_dense:
            res = _split_dense_heads(q, k, v, mask, scale, plan, return_lse, out_dtype)
            if res is not None:
                return res
    out, lse = _triton(q, k, v, mask, scale, out_dtype)
    return (out, lse) if return_lse else out


def _split_dense_heads(q, k, v, mask: SparseMask, scale: float, plan: _Schedule, return_lse: bool, out_dtype):
    """Fully dense heads through SDPA (cuDNN), the others through the kernel; None if SDPA cannot.

    The kernel runs in place on the full q, k, v: its launch order lists only the sparse heads'
    rows, and it writes their rows of the full-size output; the dense heads' rows are then filled
    from SDPA, which reads its heads as a strided view where they are consecutive (a copy where
    they are not). No copy of the sparse heads' inputs or outputs is made.
    """
    H = q.shape[2]

    def dense(qd, kd, vd):
        if not return_lse:
            return _dense_sdpa(qd, kd, vd, scale), None
        return _dense_sdpa_lse(qd, kd, vd, scale) or (None, None)

    if plan.n_dense == H:
        out, lse = dense(q, k, v)
        if out is None:
            return None
        out = out.to(out_dtype)
        return (out, lse) if return_lse else out
    d = slice(*plan.dense_range) if plan.dense_range is not None else plan.dense
    dense_out, dense_lse = dense(q[:, :, d], k[:, :, d], v[:, :, d])
    if dense_out is None:
        return None
    out, lse = _triton(q, k, v, mask, scale, out_dtype, order=plan.sparse_order, nnz=plan.sparse_nnz)
    out[:, :, d] = dense_out.to(out_dtype)
    if not return_lse:
        return out
    lse[:, d] = dense_lse
    return out, lse
