"""Small validation helpers used at dbsp's public boundaries.

Every helper raises ``ValueError`` or ``TypeError`` with a message that names the argument
and quotes the sizes it saw, so a user can fix the call without reading dbsp's source.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an ``int`` >= 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_block_sizes(q_block: object, kv_tile: object) -> tuple[int, int]:
    """Validate the (M, N) granularity of a mask: ``1 <= kv_tile <= q_block``, N divides M."""
    check_positive_int("q_block", q_block)
    check_positive_int("kv_tile", kv_tile)
    if kv_tile > q_block:
        raise ValueError(
            f"kv_tile must be <= q_block (a key tile is at most one query block wide), "
            f"got kv_tile={kv_tile} > q_block={q_block}"
        )
    if q_block % kv_tile != 0:
        raise ValueError(
            f"kv_tile must divide q_block so key tiles never straddle a key block, "
            f"got q_block={q_block}, kv_tile={kv_tile} (q_block % kv_tile = {q_block % kv_tile})"
        )
    return q_block, kv_tile


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Raise ``TypeError`` unless ``value`` is a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    """Validate attention inputs in the public layout ``(B, S, H, D)``.

    ``q`` is ``(B, Sq, H, D)``; ``k`` and ``v`` are ``(B, Skv, H, D)``. All share dtype (a floating
    type) and device. ``v=None`` checks queries and keys only (mask prediction).
    Returns ``(B, Sq, Skv, H, D)``.
    """
    others = (("k", k),) if v is None else (("k", k), ("v", v))
    for name, t in (("q", q),) + others:
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, S, H, D), got {t.dim()} dims with shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
    for name, t in others:
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; move {'both' if v is None else 'all three'} to one device"
            )
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has {q.dtype}; {'q and k' if v is None else 'q, k and v'} must share a dtype"
            )
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, Skv, H, D), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, Sq, H, D = q.shape
    Bk, Skv, Hk, Dk = k.shape
    if (Bk, Hk, Dk) != (B, H, D):
        raise ValueError(
            f"q (B, Sq, H, D) = {tuple(q.shape)} and {'k' if v is None else 'k/v'} (B, Skv, H, D) = {tuple(k.shape)} "
            f"must agree on batch, heads and head dim"
        )
    if Sq == 0 or Skv == 0 or D == 0 or B == 0 or H == 0:
        raise ValueError(f"empty attention input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return B, Sq, Skv, H, D


def check_mask_matches(mask, B: int, Sq: int, Skv: int, H: int, device: torch.device) -> None:
    """Check that a ``SparseMask`` describes attention of this batch, head count and lengths."""
    from .mask import SparseMask

    if not isinstance(mask, SparseMask):
        raise TypeError(f"mask must be a dbsp.SparseMask, got {type(mask).__name__}")
    if (mask.batch, mask.heads) != (B, H):
        raise ValueError(
            f"mask is for batch={mask.batch}, heads={mask.heads} but q has batch={B}, heads={H}"
        )
    if (mask.seq_len_q, mask.seq_len_kv) != (Sq, Skv):
        raise ValueError(
            f"mask is for seq_len_q={mask.seq_len_q}, seq_len_kv={mask.seq_len_kv} but q has "
            f"Sq={Sq} and k has Skv={Skv}"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but q is on {device}; use mask.to(q.device)")


def check_scale(scale: object) -> float | None:
    """Validate the softmax scale: ``None`` or a finite positive number."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return float(scale)


_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_out_dtype(out_dtype: object, q: torch.Tensor) -> torch.dtype:
    """``out_dtype`` of an attention call: None means ``q.dtype``; else one of the floating dtypes."""
    if out_dtype is None:
        return q.dtype
    if not isinstance(out_dtype, torch.dtype) or out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {', '.join(map(str, _OUT_DTYPES))}, got {out_dtype!r}")
    return out_dtype
