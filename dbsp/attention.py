"""``sparse_attention``: dbsp's public attention entry point and its backend dispatch table."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ._checks import check_mask_matches, check_qkv, check_scale
from .mask import SparseMask
from .reference import reference_attention

log = logging.getLogger("dbsp")

# name -> fn(q, k, v, mask, scale) -> (out, lse). Every backend computes the same function.
_BACKENDS: dict[str, Callable] = {
    "reference": lambda q, k, v, mask, scale: reference_attention(q, k, v, mask, scale=scale),
}


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``sparse_attention(backend=...)`` besides ``"auto"``."""
    return tuple(_BACKENDS)


def _auto_backend(q: torch.Tensor) -> str:
    return "reference"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of ``q`` over the keys that ``mask`` selects.

    Args:
        q: ``(B, Sq, H, D)`` queries.
        k: ``(B, Skv, H, D)`` keys, same dtype and device as ``q``.
        v: ``(B, Skv, H, D)`` values.
        mask: ``SparseMask`` for this batch, head count and sequence lengths.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        return_lse: also return the ``(B, H, Sq)`` float32 log-sum-exp (natural log), which
            partial results are merged with. Default: False.
        backend: ``"auto"`` or one of :func:`available_backends`. Every backend computes the
            same function; they differ only in speed. Default: ``"auto"``.

    Returns:
        ``out`` ``(B, Sq, H, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse=True``.
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
    name = _auto_backend(q) if backend == "auto" else backend
    out, lse = _BACKENDS[name](q, k, v, mask, scale)
    return (out, lse) if return_lse else out
