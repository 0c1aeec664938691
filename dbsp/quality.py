"""How good is a mask? Attention-mass recall, output error vs dense, and the exact tile masses.

Every metric compares sparse attention under a ``SparseMask`` with dense attention on the same
inputs, computed by :func:`dbsp.reference_attention` (exact, fp32 inside, chunked over query
blocks, so nothing of size S x S per head is held at once):

* **recall**: the fraction of each query's softmax mass that falls on the selected keys,
  ``exp(lse_masked - lse_dense)`` per query row, averaged over rows. 1.0 for a full mask.
* **relative L2 error**: ``||out_sparse - out_dense||_2 / ||out_dense||_2`` over all elements
  (or per head).
* **cosine similarity**: of the flattened outputs (or per head).

:func:`tile_attention_mass` gives the exact attention mass per (query block, key tile), averaged
over the block's rows: the input of the oracle mask (``dbsp.predict.oracle_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_block_sizes, check_mask_matches, check_qkv, check_scale, check_tensor
from .mask import SparseMask
from .reference import reference_attention

# Score elements held at once by tile_attention_mass (about 64 MB of fp32).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class MaskQuality:
    """Quality of one mask against dense attention on the same q, k, v.

    Attributes:
        density: fraction of score entries computed (``mask.density()``).
        recall: mean over query rows of the attention mass on selected keys.
        rel_l2: ``||out - dense|| / ||dense||`` over the whole output.
        cosine: cosine similarity of the flattened outputs.
        per_head_density, per_head_recall, per_head_rel_l2, per_head_cosine: ``(B, H)`` float64.
    """

    density: float
    recall: float
    rel_l2: float
    cosine: float
    per_head_density: torch.Tensor
    per_head_recall: torch.Tensor
    per_head_rel_l2: torch.Tensor
    per_head_cosine: torch.Tensor

    def __repr__(self) -> str:
        return (
            f"MaskQuality(density={self.density:.4f}, recall={self.recall:.4f}, "
            f"rel_l2={self.rel_l2:.4f}, cosine={self.cosine:.5f})"
        )


def _check_pair(out: torch.Tensor, ref: torch.Tensor) -> None:
    check_tensor("out", out)
    check_tensor("ref", ref)
    if out.shape != ref.shape or out.dim() != 4:
        raise ValueError(f"out and ref must both be (B, S, H, D) of one shape, got {tuple(out.shape)} and {tuple(ref.shape)}")


def relative_l2_error(out: torch.Tensor, ref: torch.Tensor, *, per_head: bool = False) -> float | torch.Tensor:
    """``||out - ref||_2 / ||ref||_2`` in float64.

    Args:
        out, ref: ``(B, S, H, D)`` outputs (any float dtype).
        per_head: return a ``(B, H)`` tensor (norms over S and D) instead of one float.
            Default: False.
    """
    _check_pair(out, ref)
    o, r = out.double(), ref.double()
    if per_head:
        return (o - r).pow(2).sum(dim=(1, 3)).sqrt() / r.pow(2).sum(dim=(1, 3)).sqrt().clamp_min(1e-300)
    return float((o - r).norm() / r.norm().clamp_min(1e-300))


def cosine_similarity(out: torch.Tensor, ref: torch.Tensor, *, per_head: bool = False) -> float | torch.Tensor:
    """Cosine similarity of the flattened outputs, in float64.

    Args:
        out, ref: ``(B, S, H, D)``.
        per_head: return ``(B, H)`` (over S and D per head). Default: False.
    """
    _check_pair(out, ref)
    o, r = out.double(), ref.double()
    if per_head:
        dot = (o * r).sum(dim=(1, 3))
        return dot / (o.pow(2).sum(dim=(1, 3)).sqrt() * r.pow(2).sum(dim=(1, 3)).sqrt()).clamp_min(1e-300)
    return float((o * r).sum() / (o.norm() * r.norm()).clamp_min(1e-300))


def _recall_from_lse(lse_mask: torch.Tensor, lse_dense: torch.Tensor, per_head: bool) -> float | torch.Tensor:
    row = torch.exp(lse_mask.double() - lse_dense.double())  # (B, H, S); exp(-inf) = 0 for empty rows
    return row.mean(dim=2) if per_head else float(row.mean())


def attention_recall(
    q: torch.Tensor, k: torch.Tensor, mask: SparseMask, *, scale: float | None = None, per_head: bool = False
) -> float | torch.Tensor:
    """Mean fraction of each query's attention mass that ``mask`` keeps.

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Skv, H, D)``.
        mask: ``SparseMask`` for these shapes.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        per_head: return ``(B, H)`` float64 instead of one float. Default: False.

    Example::

        >>> q, k = torch.randn(1, 100, 2, 16), torch.randn(1, 100, 2, 16)
        >>> attention_recall(q, k, SparseMask.full(1, 2, 100, 100, q_block=32))
        1.0
    """
    check_qkv(q, k, k)
    _, lse_m = reference_attention(q, k, k, mask, scale=scale)
    full = SparseMask.full(mask.batch, mask.heads, mask.seq_len_q, mask.seq_len_kv, q_block=mask.q_block, device=q.device)
    _, lse_d = reference_attention(q, k, k, full, scale=scale)
    return _recall_from_lse(lse_m, lse_d, per_head)


def evaluate_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SparseMask,
    *,
    scale: float | None = None,
    dense: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MaskQuality:
    """All quality metrics of ``mask`` at once (one sparse and, unless given, one dense pass).

    Args:
        q, k, v: ``(B, S, H, D)`` inputs.
        mask: the mask to judge.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        dense: ``(out, lse)`` of dense attention on the same inputs, e.g. from
            :func:`dense_attention`, to reuse across many masks. Default: computed here.

    Returns:
        A :class:`MaskQuality`.
    """
    B, Sq, Skv, H, D = check_qkv(q, k, v)
    check_mask_matches(mask, B, Sq, Skv, H, q.device)
    if dense is None:
        dense = dense_attention(q, k, v, scale=scale)
    out_d, lse_d = dense
    out_m, lse_m = reference_attention(q, k, v, mask, scale=scale)
    ph_rel = relative_l2_error(out_m, out_d, per_head=True)
    ph_cos = cosine_similarity(out_m, out_d, per_head=True)
    ph_rec = _recall_from_lse(lse_m, lse_d, True)
    return MaskQuality(
        density=mask.density(),
        recall=_recall_from_lse(lse_m, lse_d, False),
        rel_l2=relative_l2_error(out_m, out_d),
        cosine=cosine_similarity(out_m, out_d),
        per_head_density=mask.density(per_head=True).cpu(),
        per_head_recall=ph_rec.cpu(),
        per_head_rel_l2=ph_rel.cpu(),
        per_head_cosine=ph_cos.cpu(),
    )


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dense attention ``(out (B, S, H, D), lse (B, H, S))`` through the reference path."""
    B, Sq, Skv, H, D = check_qkv(q, k, v)
    full = SparseMask.full(B, H, Sq, Skv, q_block=64, device=q.device)
    return reference_attention(q, k, v, full, scale=scale)


def tile_attention_mass(
    q: torch.Tensor, k: torch.Tensor, *, q_block: int, kv_tile: int, scale: float | None = None
) -> torch.Tensor:
    """Exact attention mass of every (query block, key tile), averaged over the block's queries.

    ``mass[b, h, i, j] = mean over query rows r of block i of sum over keys c of tile j of
    softmax(q_r . k / sqrt(D))[c]``; every row of the result sums to 1. Computed in float32,
    chunked over query blocks (never S x S per head at once), so it is feasible on CPU only at
    small sizes (it costs one dense attention).

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Skv, H, D)``.
        q_block, kv_tile: the mask granularity (``kv_tile`` divides ``q_block``).
        scale: softmax scale. Default: ``1 / sqrt(D)``.

    Returns:
        ``(B, H, ceil(Sq / q_block), ceil(Skv / kv_tile))`` float32.
    """
    B, Sq, Skv, H, D = check_qkv(q, k, k)
    check_block_sizes(q_block, kv_tile)
    scale = check_scale(scale)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mq, nt = -(-Sq // q_block), -(-Skv // kv_tile)
    kt = k.permute(0, 2, 3, 1).float()  # (B, Skv, H, D) -> (B, H, D, Skv)
    out = torch.empty(B, H, mq, nt, dtype=torch.float32, device=q.device)
    per_chunk = max(1, _CHUNK_ELEMENTS // (B * H * q_block * Skv))
    for i0 in range(0, mq, per_chunk):
        i1 = min(mq, i0 + per_chunk)
        r0, r1 = i0 * q_block, min(Sq, i1 * q_block)
        qc = q[:, r0:r1].permute(0, 2, 1, 3).float()  # (B, rows, H, D) -> (B, H, rows, D)
        p = torch.softmax(torch.matmul(qc, kt) * scale, dim=-1)  # (B, H, rows, Skv)
        pad_r = (i1 - i0) * q_block - (r1 - r0)
        pad_k = nt * kv_tile - Skv
        p = torch.nn.functional.pad(p, (0, pad_k, 0, pad_r))
        block = p.reshape(B, H, i1 - i0, q_block, nt, kv_tile).sum(dim=(3, 5))
        rows = torch.full((i1 - i0,), float(q_block), device=q.device)
        rows[-1] = float(q_block - pad_r)
        out[:, :, i0:i1] = block / rows[:, None]
    return out
