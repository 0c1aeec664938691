"""``sp_attention``: hybrid Ulysses x Ring sparse attention that applies a db-SP Plan.

Data flow on global rank ``r`` (ring index ``i = r // U``, head group ``k = r % U``)::

    q, k, v    (B, S_r, H, D)        contiguous shard r of the sequence (torch.tensor_split sizes)
      | head_perm, all-to-all over the Ulysses group (U ranks)
      v
    chunk i    (C_i, B, H/U, D)      the Ulysses group's tokens, heads of group k
      | block exchange, all-to-all over the ring group (skipped when it moves nothing)
      v
    blocks     q: q_blocks[k][i], k/v: kv_blocks[k][i]   (whole blocks, ascending)
      | R ring steps: step t computes against the K/V blocks of ring rank (i + t) mod R,
      | skipping steps whose sub-mask selects nothing; LSE merge
      v
    out        same way back: inverse exchange, all-to-all, inverse head_perm -> (B, S_r, H, D)

Without a plan, heads are split in order and every ring rank holds its *home* blocks
``{b : b * R // NB == i}``: exactly the identity plan, so both paths give identical results.
"""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from .._checks import check_mask_matches, check_scale
from ..attention import available_backends
from ..mask import SparseMask
from ..plan import Plan
from .comm import all_to_all
from .groups import SPGroups
from .layout import RankLayout, TokenExchange, rank_layout
from .ring import RingSpec, ring_loop
from .ulysses import heads_to_seq, seq_to_heads


def sp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: SparseMask,
    *,
    groups: SPGroups,
    plan=None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    verify: bool = True,
):
    """Sparse self-attention over ``P = U x R`` ranks, Ulysses x Ring, balanced by an optional Plan.

    Every rank passes its contiguous shard of the sequence and the same global mask; every rank
    gets back its shard of the output, equal (within floating-point rounding) to
    ``sparse_attention`` on the gathered tensors.

    Args:
        q, k, v: ``(B, S_r, H, D)``, this rank's shard: rank ``r`` holds tokens
            ``torch.tensor_split(range(S), P)[r]`` (the first ``S % P`` ranks get one more).
        mask: the global ``SparseMask`` (``batch B, heads H, S x S``), identical on every rank and
            on q's device. Any ``q_block`` / ``kv_tile``; S need not be a multiple of anything.
        groups: the :class:`SPGroups` of ``U x R`` (``U = groups.ulysses``, ``R = groups.ring``).
        plan: a ``dbsp.plan.Plan`` for this mask's sizes and these degrees (identical on every
            rank, checked), or None for the unbalanced layout (heads in order, home blocks).
            Default: None.
        scale: softmax scale. Default: ``1 / sqrt(D)``.
        return_lse: also return the ``(B, H, S_r)`` log-sum-exp, float32 (float64 for float64
            inputs). Default: False.
        backend: local attention backend, as in :func:`dbsp.sparse_attention`. Default: ``"auto"``.
        verify: before any data moves, all-gather a few integers per rank (shapes, dtype, mask sizes,
            plan fingerprint, scale) and raise the same clear error on every rank if they disagree
            or any rank's inputs are invalid; a digest of the mask's CSR catches masks that differ
            in content at equal sizes. Costs one pass over the mask's indices, one small all-gather
            and a device-to-host copy; turn it off only when the caller guarantees identical
            inputs. Default: True.

    Returns:
        ``out`` ``(B, S_r, H, D)`` in q's dtype, or ``(out, lse)``. Rows that select no key get
        ``out = 0`` and ``lse = -inf``. Differentiable when the local backend is (the ring
        backward recomputes each step).

    Raises:
        ValueError / TypeError: on every rank, naming the argument, the rank and the sizes, when
            inputs are invalid or differ across ranks (including a plan fingerprint mismatch).

    Example (4 ranks, U = R = 2, S = 1000 so shards of 250 tokens)::

        >>> groups = SPGroups.init(ulysses=2, ring=2)
        >>> plan = make_plan(mask, ulysses=2, ring=2)             # same on every rank
        >>> out = sp_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask, groups=groups, plan=plan)
    """
    if verify:
        _verify(q, k, v, mask, groups, plan, scale, backend, return_lse)
    else:
        _check_local(q, k, v, mask, groups, plan, scale, backend)
    layout = _layout_for(q, mask, groups, plan)
    spec = RingSpec(
        masks=tuple(layout.local_masks(mask)),
        kv_lens=layout.kv_lens,
        ring_rank=layout.ring_rank,
        group=groups.ring_group,
        send_to=groups.ring_peer(layout.ring_rank - 1),
        recv_from=groups.ring_peer(layout.ring_rank + 1),
        scale=check_scale(scale),
        backend=backend,
        need_lse=return_lse,
        # gloo's point-to-point waits need the limit passed in; NCCL's watchdog enforces it without a host block.
        timeout=groups.timeout if groups.device_type == "cpu" else None,
    )
    qt, kt, vt = (x.transpose(0, 1) for x in (q, k, v))  # (B, S_r, H, D) -> (S_r, B, H, D) views
    # (S_r, B, H, D) -> (C_i, B, H_k, D): one all-to-all for q, k and v together.
    qc, kc, vc = _to_heads([qt, kt, vt], layout, groups)
    # (C_i, B, H_k, D) -> block layout: (Lq, B, H_k, D) and (L_kv, B, H_k, D)
    (qb,) = _exchange([qc], layout.q_exchange, groups.ring_group)
    kb, vb = _exchange([kc, vc], layout.kv_exchange, groups.ring_group)
    out, lse = ring_loop(qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), spec)
    # (B, Lq, H_k, D) -> (Lq, B, H_k, D) -> chunk -> (S_r, B, H, D) -> (B, S_r, H, D)
    out = _from_blocks(out.transpose(0, 1), layout, groups).transpose(0, 1).contiguous()
    assert out.shape == q.shape
    if not return_lse:
        return out
    # (B, H_k, Lq) -> (Lq, B, H_k) -> ... -> (S_r, B, H) -> (B, H, S_r)
    lse = _from_blocks(lse.permute(2, 0, 1), layout, groups).permute(1, 2, 0).contiguous()
    return out, lse


def _layout_for(q: torch.Tensor, mask: SparseMask, groups: SPGroups, plan) -> RankLayout:
    U, R, rank = groups.ulysses, groups.ring, groups.rank
    common = dict(seq_len=mask.seq_len_q, q_block=mask.q_block, heads=q.shape[2], ulysses=U, ring=R, rank=rank)
    if plan is None:
        return rank_layout(**common, device=q.device)
    k = rank % U
    return rank_layout(
        **common,
        head_perm=plan.head_perm,
        head_offsets=plan.head_offsets,
        q_blocks=plan.q_blocks[k],
        kv_blocks=plan.kv_blocks[k],
        device=q.device,
    )


def _to_heads(xs: list[torch.Tensor], layout: RankLayout, groups: SPGroups) -> list[torch.Tensor]:
    """Token-first shards ``(S_r, B, H, D)`` -> ``(C_i, B, H_k, D)`` each, with one all-to-all."""
    if layout.ulysses == 1:
        if layout.head_order is None:
            return xs
        return [x.index_select(2, layout.head_order) for x in xs]
    D = xs[0].shape[-1]
    packed = torch.cat(xs, dim=-1)  # (S_r, B, H, n * D)
    y = seq_to_heads(
        packed,
        group=groups.ulysses_group,
        shard_sizes=layout.ulysses_shards,
        head_offsets=layout.head_offsets,
        head_order=layout.head_order,
    )
    return list(torch.split(y, D, dim=-1))


def _exchange(xs: list[torch.Tensor], ex: TokenExchange, group) -> list[torch.Tensor]:
    """Chunk layout -> block layout along dim 0, all of ``xs`` in one all-to-all."""
    if ex.is_local:
        return xs
    D = xs[0].shape[-1]
    packed = xs[0] if len(xs) == 1 else torch.cat(xs, dim=-1)
    if ex.send_index is not None:
        packed = packed.index_select(0, ex.send_index)
    y = all_to_all(packed, group=group, input_split_sizes=ex.send_counts, output_split_sizes=ex.recv_counts)
    return list(torch.split(y, D, dim=-1))


def _from_blocks(y: torch.Tensor, layout: RankLayout, groups: SPGroups) -> torch.Tensor:
    """Token-first ``(Lq, B, H_k, ...)`` in the block layout -> ``(S_r, B, H, ...)`` in the natural head order."""
    ex = layout.q_exchange
    if not ex.is_local:
        y = all_to_all(y, group=groups.ring_group, input_split_sizes=ex.recv_counts, output_split_sizes=ex.send_counts)
        if ex.restore_index is not None:
            y = y.index_select(0, ex.restore_index)
    y = heads_to_seq(y, group=groups.ulysses_group, shard_sizes=layout.ulysses_shards, head_offsets=layout.head_offsets)
    if layout.head_restore is not None:
        y = y.index_select(2, layout.head_restore)
    return y


def _check_plan(plan, *, groups: SPGroups, mask: SparseMask, heads: int) -> None:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a dbsp.plan.Plan or None, got {type(plan).__name__}")
    want = {
        "ulysses": groups.ulysses,
        "ring": groups.ring,
        "heads": heads,
        "q_block": mask.q_block,
        "seq_len": mask.seq_len_q,
    }
    bad = [f"{name}={getattr(plan, name)} (call has {v})" for name, v in want.items() if getattr(plan, name) != v]
    if bad:
        raise ValueError(
            "plan does not match this call: " + ", ".join(bad) + "; build the plan for this mask's q_block and "
            "seq_len, the q/k/v head count and the groups' (ulysses, ring)"
        )


def _check_local(q, k, v, mask, groups, plan, scale, backend) -> None:
    """Everything one rank can check alone; raises ValueError/TypeError naming the argument."""
    if not isinstance(groups, SPGroups):
        raise TypeError(f"groups must be a dbsp.dist.SPGroups, got {type(groups).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, S_r, H, D), got {t.dim()} dims with shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"sp_attention is self-attention: q, k and v shards must have one shape (B, S_r, H, D), got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(
            f"q, k and v must share one floating dtype (float16, bfloat16, float32, float64), "
            f"got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, S_r, H, D = q.shape
    if min(B, H, D) == 0:
        raise ValueError(f"q has an empty batch, head or head-dim axis: {tuple(q.shape)}")
    if not isinstance(mask, SparseMask):
        raise TypeError(f"mask must be a dbsp.SparseMask, got {type(mask).__name__}")
    S = mask.seq_len_q
    if mask.seq_len_kv != S:
        raise ValueError(
            f"sp_attention is self-attention: mask must be square, got seq_len_q={S}, seq_len_kv={mask.seq_len_kv}"
        )
    check_mask_matches(mask, B, S, S, H, q.device)
    P = groups.world_size
    expected = S // P + (1 if groups.rank < S % P else 0)
    if S_r != expected:
        raise ValueError(
            f"rank {groups.rank} holds {S_r} tokens, but shard {groups.rank} of the mask's seq_len={S} over "
            f"P={P} ranks (torch.tensor_split sizes) has {expected}"
        )
    check_scale(scale)
    if backend != "auto" and backend not in available_backends():
        known = ", ".join(map(repr, available_backends()))
        raise ValueError(f"unknown backend {backend!r}; known backends: 'auto', {known}")
    if plan is None:
        if H % groups.ulysses:
            raise ValueError(
                f"heads must be divisible by ulysses without a plan: H={H}, ulysses={groups.ulysses} "
                f"(H % ulysses = {H % groups.ulysses})"
            )
    else:
        _check_plan(plan, groups=groups, mask=mask, heads=H)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Columns of the all-gathered table after the leading ok flag; "tokens" differs per rank by design.
_META = (
    "batch", "tokens", "heads", "head_dim", "dtype", "seq_len", "q_block", "kv_tile", "mask nnz",
    "plan", "plan_lo", "scale", "return_lse", "mask contents",
)


def _fingerprint_ints(plan) -> tuple[int, int]:
    if plan is None:
        return -1, -1
    fp = str(plan.fingerprint())
    digits = "".join(c for c in fp.lower() if c in "0123456789abcdef").ljust(30, "0")
    return int(digits[:15], 16), int(digits[15:30], 16)


def _meta(q, mask, plan, scale) -> list[int]:
    B, S_r, H, D = q.shape
    hi, lo = _fingerprint_ints(plan)
    scale_bits = -1 if scale is None else struct.unpack("<q", struct.pack("<d", float(scale)))[0]
    dtype = _DTYPES.index(q.dtype)
    return [B, S_r, H, D, dtype, mask.seq_len_q, mask.q_block, mask.kv_tile, mask.nnz, hi, lo, scale_bits]


def _mask_digest(mask: SparseMask) -> torch.Tensor:
    """An int64 device scalar that differs (almost surely) between masks of equal sizes and nnz.

    Position-weighted offsets pin every row's count; the index sum catches most changes of the
    selected tiles. One pass over ``indices`` on the device, no host sync (int64 wrap-around is
    the same on every rank).
    """
    off = mask.offsets.reshape(-1)
    weights = torch.arange(1, off.numel() + 1, dtype=torch.int64, device=off.device)
    return (off * weights).sum() + mask.indices.sum(dtype=torch.int64)


def _verify(q, k, v, mask, groups, plan, scale, backend, return_lse) -> None:
    """Check locally, then agree across all ranks; every rank raises the same error, none hangs.

    Each rank all-gathers ``[ok, batch, tokens, heads, head_dim, dtype, seq_len, q_block, kv_tile,
    nnz, plan fingerprint (2 ints), scale bits, return_lse, mask digest]`` (``return_lse`` changes the
    collectives a call makes, so ranks must agree on it too). A rank whose own checks failed raises its own
    error; the others raise a ValueError naming it. Then every rank compares the table and raises
    the same message on any disagreement. A peer that never arrives makes the all-gather fail
    after the process group's timeout.
    """
    if not isinstance(groups, SPGroups):
        raise TypeError(f"groups must be a dbsp.dist.SPGroups, got {type(groups).__name__}")
    error = None
    try:
        _check_local(q, k, v, mask, groups, plan, scale, backend)
        row = [1] + _meta(q, mask, plan, scale) + [int(bool(return_lse))]
    except (ValueError, TypeError) as exc:
        error = exc
        row = [0] * len(_META)
    device = q.device if isinstance(q, torch.Tensor) and error is None else groups.device()
    digest = _mask_digest(mask) if error is None else torch.zeros((), dtype=torch.int64, device=device)
    mine = torch.cat([torch.tensor(row, dtype=torch.int64, device=device), digest.reshape(1)])
    table = [torch.empty_like(mine) for _ in range(groups.world_size)]
    dist.all_gather(table, mine, group=groups.world_group)
    rows = torch.stack(table).cpu().tolist()
    failed = [r for r, x in enumerate(rows) if x[0] == 0]
    if error is not None:
        raise error
    if failed:
        raise ValueError(
            f"sp_attention: rank(s) {failed} rejected their inputs (their own error says why); "
            f"rank {groups.rank} stops too, before any data moves"
        )
    for j, name in enumerate(_META):
        if name in ("tokens", "plan_lo"):
            continue  # tokens differ per rank by design (each rank checked its own); plan_lo goes with plan
        values = [x[j + 1] for x in rows]
        if name == "plan":
            values = [(x[j + 1], x[j + 2]) for x in rows]
        if len(set(values)) > 1:
            if name == "plan":
                shown = ["none" if x[10] == -1 else f"{x[10]:015x}{x[11]:015x}"[:16] for x in rows]
                raise ValueError(
                    "every rank must run the same Plan, but the plan fingerprints differ across ranks: "
                    + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shown))
                    + "; build the plan from identical inputs on every rank or broadcast it from one"
                )
            if name == "dtype":
                values = [str(_DTYPES[x]) for x in values]
            if name == "scale":
                values = [None if x == -1 else struct.unpack("<d", struct.pack("<q", x))[0] for x in values]
            if name == "mask contents":  # equal sizes and nnz, different tiles: the digest itself means nothing
                values = ["same as rank 0" if x == values[0] else "differs" for x in values]
            raise ValueError(
                f"sp_attention inputs differ across ranks in {name}: "
                + ", ".join(f"rank {r}: {x}" for r, x in enumerate(values))
                + "; every rank must pass the same mask, head count, head dim, dtype, scale, plan and return_lse"
            )
