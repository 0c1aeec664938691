"""Mask prediction from sequence shards: every rank ends with the same global SparseMask.

``predict_mask`` works per head (pooled queries of a head against that head's keys), so the
distributed version splits the *heads* over all ``P`` ranks instead of the sequence::

    q, k   (B, S_r, H, D) shards   -- all-to-all over all P ranks -->   (B, S, H_r, D): all tokens, H/P heads
    predict_mask on H_r heads (1/P of the single-GPU work, identical arithmetic per head)
    all-gather of the per-head CSR (row counts, then key-tile indices) --> the global mask on every rank

The result equals ``predict_mask`` on the gathered tensors, for block and fine-grained masks alike
(no approximation of the per-key scoring), and is bit-identical on every rank because each head is
predicted exactly once and then copied. Traffic: one all-to-all of q and k (like one Ulysses
step) plus the mask itself, which every rank must hold anyway.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from ..mask import SparseMask, _offsets_from_counts, _segments
from ..predict import PredictConfig, predict_mask
from .groups import SPGroups
from .layout import shard_sizes
from .ulysses import seq_to_heads

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def predict_mask_sharded(q: torch.Tensor, k: torch.Tensor, *, groups: SPGroups, **options) -> SparseMask:
    """``dbsp.predict.predict_mask`` on sequence-sharded q and k: the same global mask on every rank.

    Args:
        q, k: ``(B, S_r, H, D)``, this rank's contiguous shard (``torch.tensor_split`` sizes over
            all ``P`` ranks of ``groups``), as for :func:`dbsp.dist.sp_attention`.
        groups: the :class:`SPGroups`; all of its ``P`` ranks take part (heads are split P ways,
            ``H / P`` each or one more for the first ``H % P`` ranks; ranks beyond H idle).
        **options: keyword options of :func:`dbsp.predict.predict_mask` (``q_block``, ``kv_tile``,
            ``top_p``, ...), identical on every rank (checked).

    Returns:
        The global ``SparseMask`` (``B, H, S x S``) on q's device, identical on every rank and
        equal to ``predict_mask`` on the gathered q and k.

    Raises:
        ValueError / TypeError: on every rank, when shards, dtypes or options disagree across
            ranks or a rank's inputs are invalid.

    Example::

        >>> mask = predict_mask_sharded(q_shard, k_shard, groups=groups, q_block=64, kv_tile=1, top_p=0.9)
        >>> out = sp_attention(q_shard, k_shard, v_shard, mask, groups=groups)
    """
    S, H = _agree(q, k, groups, options)
    P, rank = groups.world_size, groups.rank
    B, D = q.shape[0], q.shape[3]
    counts = [H // P + (j < H % P) for j in range(P)]
    offsets = [sum(counts[:j]) for j in range(P + 1)]
    # (S_r, B, H, 2D) -> (S, B, H_r, 2D): all tokens of this rank's heads, q and k in one exchange.
    packed = torch.cat([q, k], dim=-1).transpose(0, 1)
    mine = seq_to_heads(packed, group=groups.world_group, shard_sizes=shard_sizes(S, P), head_offsets=offsets)
    q_mine, k_mine = (x.transpose(0, 1) for x in torch.split(mine, D, dim=-1))  # (B, S, H_r, D)

    cfg = PredictConfig(**options)
    nq = -(-S // cfg.q_block)
    if counts[rank]:
        local = predict_mask(q_mine, k_mine, **options)
        row_counts, indices = local.row_counts().reshape(-1), local.indices
    else:  # more ranks than heads: this one predicts nothing
        row_counts = torch.zeros(0, dtype=torch.int64, device=q.device)
        indices = torch.zeros(0, dtype=torch.int32, device=q.device)

    # Row counts of every rank: B * H_j * Mq each, padded to one size for the all-gather.
    sizes = [B * c * nq for c in counts]
    all_counts = _all_gather_padded(row_counts, sizes, groups)
    nnz = [int(c.sum()) for c in all_counts]
    all_indices = _all_gather_padded(indices, nnz, groups)

    # Reassemble in (batch, head, row) order: for each batch b, the heads of rank 0, 1, ... .
    per_bh = [c.reshape(B, counts[j], nq) for j, c in enumerate(all_counts)]
    row_counts = torch.cat(per_bh, dim=1)  # (B, H, Mq)
    flat = torch.cat(all_indices)
    rank_start = torch.tensor([0] + nnz, device=q.device).cumsum(0)[:-1]  # where rank j's entries begin
    batch_nnz = torch.stack([c.sum(dim=(1, 2)) for c in per_bh], dim=1)  # (B, P): entries of (b, j)
    within = torch.cumsum(batch_nnz, dim=0) - batch_nnz  # offset of batch b inside rank j's entries
    start = (rank_start[None, :] + within).reshape(-1)  # segments in (b, j) order
    order = _segments(start, start + batch_nnz.reshape(-1))
    offsets_csr = _offsets_from_counts(row_counts.reshape(-1), B, H, nq)
    return SparseMask._unchecked(
        offsets_csr, flat[order], q_block=cfg.q_block, kv_tile=cfg.kv_tile, seq_len_q=S, seq_len_kv=S
    )


def _all_gather_padded(x: torch.Tensor, sizes: list[int], groups: SPGroups) -> list[torch.Tensor]:
    """All-gather 1-D tensors of known, possibly different, sizes (padded to the largest)."""
    longest = max(sizes) if sizes else 0
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded, group=groups.world_group)
    return [o[:n] for o, n in zip(out, sizes)]


def _options_hash(options: dict) -> int:
    text = repr(sorted((key, repr(value)) for key, value in options.items()))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def _agree(q, k, groups: SPGroups, options: dict) -> tuple[int, int]:
    """Local checks, then one all-gather: returns (S, H); raises the same error on every rank."""
    if not isinstance(groups, SPGroups):
        raise TypeError(f"groups must be a dbsp.dist.SPGroups, got {type(groups).__name__}")
    error = None
    try:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{name} must have 4 dims (B, S_r, H, D), got shape {tuple(t.shape)}")
        if q.shape != k.shape:
            raise ValueError(
                f"q and k shards must have one shape (B, S_r, H, D), got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        if q.dtype not in _DTYPES or k.dtype != q.dtype:
            raise TypeError(f"q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
        if k.device != q.device:
            raise ValueError(f"k is on {k.device} but q is on {q.device}")
        PredictConfig(**options)  # unknown or invalid options raise here, on the rank that has them
        B, S_r, H, D = q.shape
        row = [1, B, S_r, H, D, _DTYPES.index(q.dtype), _options_hash(options)]
    except (ValueError, TypeError) as exc:
        error = exc
        row = [0] * 7
    device = q.device if error is None else groups.device()
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(groups.world_size)]
    dist.all_gather(table, mine, group=groups.world_group)
    rows = torch.stack(table).cpu().tolist()
    if error is not None:
        raise error
    failed = [r for r, x in enumerate(rows) if x[0] == 0]
    if failed:
        raise ValueError(f"predict_mask_sharded: rank(s) {failed} rejected their inputs (their own error says why)")
    for j, name in ((1, "batch"), (3, "heads"), (4, "head_dim"), (5, "dtype"), (6, "predict_mask options")):
        values = [x[j] for x in rows]
        if len(set(values)) > 1:
            shown = [str(_DTYPES[v]) for v in values] if name == "dtype" else values
            if name == "predict_mask options":
                shown = ["differs" if v != values[0] else "same as rank 0" for v in values]
            raise ValueError(
                f"predict_mask_sharded inputs differ across ranks in {name}: "
                + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown))
            )
    S = sum(x[2] for x in rows)
    expected = shard_sizes(S, groups.world_size)
    got = tuple(x[2] for x in rows)
    if got != expected:
        raise ValueError(
            f"predict_mask_sharded: shard sizes {list(got)} are not the torch.tensor_split sizes "
            f"{list(expected)} of S={S} over P={groups.world_size} ranks"
        )
    return S, rows[0][3]
