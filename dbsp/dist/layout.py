"""Where every token and every mask tile lives in a sequence-parallel call; pure index arithmetic.

Three layouts appear in one call of :func:`dbsp.dist.sp_attention` (S tokens, blocks of M tokens,
``NB = ceil(S / M)`` blocks, ``P = U x R`` ranks):

1. **Shards** (input and output): rank ``r`` holds tokens ``torch.tensor_split(range(S), P)[r]``.
2. **Chunks** (after the Ulysses all-to-all): ring rank ``i`` holds the U shards of its Ulysses
   group, one contiguous token range that need not start or end on a block boundary.
3. **Blocks** (what the ring computes on): ring rank ``i`` of head group ``k`` holds whole blocks,
   its query blocks ``q_blocks[k][i]`` and key/value blocks ``kv_blocks[k][i]`` (sorted ids), in
   ascending order. Without a plan both are the *home* blocks ``{b : b * R // NB == i}``, which is
   exactly the identity plan. Only the globally last block may be partial, and it is always the
   last block of whichever rank holds it, so every local sub-problem is a valid ``SparseMask``.

Moving from chunks to blocks is one all-to-all inside the ring group (:func:`token_exchange`).
Picture, S = 10, M = 4 (blocks [0..3] [4..7] [8 9]), R = 2, chunks of 5 tokens::

    chunks:  ring 0 = 0 1 2 3 4       ring 1 = 5 6 7 8 9
    blocks:  ring 0 = 0 1 2 3 4 5 6 7 (blocks 0, 1)      ring 1 = 8 9 (block 2)
    ring 0 keeps 0..4 and receives 5 6 7; ring 1 sends 5 6 7 and keeps 8 9.

Because chunks are ascending token ranges and block lists are sorted, the tokens a rank receives,
concatenated in source order, are already in its block order: only the sender reorders.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from ..mask import SparseMask, _offsets_from_counts, _segments


class MeshPosition:
    """Mixin: a rank's ring and Ulysses indices, from the ``rank`` and ``ulysses`` of the class using it.

    Global rank ``r`` of a ``U x R`` layout has ring index ``i = r // U`` and Ulysses index
    ``k = r % U`` (the picture in :mod:`dbsp.dist.groups`). :class:`dbsp.dist.SPGroups` and
    :class:`RankLayout` both derive their indices here, so the two can never disagree.

    Example (U = 2): rank 3 has ``ring_rank == 1`` and ``ulysses_rank == 1``.
    """

    rank: int
    ulysses: int

    @property
    def ring_rank(self) -> int:
        """i = rank // U: this rank's position in its ring group (and its sequence chunk)."""
        return self.rank // self.ulysses

    @property
    def ulysses_rank(self) -> int:
        """k = rank % U: this rank's position in its Ulysses group (and its head group)."""
        return self.rank % self.ulysses


def shard_sizes(seq_len: int, parts: int) -> tuple[int, ...]:
    """Token counts of ``torch.tensor_split(range(seq_len), parts)``: the first ``seq_len % parts`` get one more.

    Example: ``shard_sizes(10, 4) == (3, 3, 2, 2)``.
    """
    base, extra = divmod(seq_len, parts)
    return tuple(base + (1 if r < extra else 0) for r in range(parts))


def home_blocks(num_blocks: int, ring: int) -> tuple[tuple[int, ...], ...]:
    """The unplanned block layout: ring rank ``i`` holds ``{b : b * ring // num_blocks == i}``.

    Example: ``home_blocks(5, 2) == ((0, 1, 2), (3, 4))``; with fewer blocks than ranks some
    ranks hold none: ``home_blocks(2, 4) == ((0,), (), (1,), ())``.
    """
    out: list[list[int]] = [[] for _ in range(ring)]
    for b in range(num_blocks):
        out[b * ring // num_blocks].append(b)
    return tuple(tuple(x) for x in out)


def block_tokens(blocks: Sequence[int], seq_len: int, q_block: int) -> int:
    """Number of tokens in ``blocks`` (the last block of the sequence may be partial)."""
    last = (seq_len - 1) // q_block
    return sum(min(q_block, seq_len - b * q_block) if b == last else q_block for b in blocks)


def block_token_ids(blocks: Sequence[int], seq_len: int, q_block: int) -> torch.Tensor:
    """``(tokens,)`` int64 CPU tensor: the token ids of ``blocks`` in order.

    Example: ``block_token_ids([2, 0], 10, 4) == tensor([8, 9, 0, 1, 2, 3])``.
    """
    b = torch.as_tensor(list(blocks), dtype=torch.int64)
    return _segments(b * q_block, torch.clamp((b + 1) * q_block, max=seq_len))


@dataclass(frozen=True, eq=False)
class TokenExchange:
    """One rank's part of the all-to-all from chunk layout to block layout (or back, reversed).

    Attributes:
        send_index: ``(chunk tokens,)`` int64 order in which this rank's chunk is sent (grouped by
            destination ring rank, ascending tokens within each), or None when it is ``arange``.
        restore_index: the inverse permutation (for the way back), or None.
        send_counts: tokens sent to each ring rank (length R).
        recv_counts: tokens received from each ring rank (length R).
        ring_rank: the rank this exchange belongs to.
        group_local: whether no ring rank moves any token (see :attr:`is_local`).
    """

    send_index: torch.Tensor | None
    restore_index: torch.Tensor | None
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]
    ring_rank: int
    group_local: bool

    @property
    def is_local(self) -> bool:
        """True when the exchange moves nothing on *any* ring rank, so every rank may skip it.

        This is a property of the whole group (a rank that sends nothing may still be a receiver,
        and all ranks must join the collective or none): the exchange matrix is diagonal, in which
        case every rank's send order is the identity too.
        """
        return self.group_local

    @property
    def moved_tokens(self) -> int:
        """Tokens this rank sends to other ring ranks."""
        return sum(self.send_counts) - self.send_counts[self.ring_rank]

    @property
    def received_tokens(self) -> int:
        """Tokens this rank receives from other ring ranks."""
        return sum(self.recv_counts) - self.recv_counts[self.ring_rank]


@lru_cache(maxsize=256)
def exchange_matrix(
    seq_len: int, q_block: int, chunk_sizes: tuple[int, ...], targets: tuple[tuple[int, ...], ...]
) -> torch.Tensor:
    """``(R, R)`` int64: tokens that ring rank ``j`` (chunk layout) sends to ring rank ``g`` (block layout).

    Args:
        seq_len: S.
        q_block: M.
        chunk_sizes: tokens of each ring rank's chunk (length R, summing to S).
        targets: sorted block ids of each ring rank in the block layout (length R, a partition of
            ``0 .. ceil(S / M) - 1``).
    """
    ring = len(chunk_sizes)
    owner = _block_owner(targets, -(-seq_len // q_block))
    token_dst = owner[torch.arange(seq_len) // q_block]
    token_src = torch.repeat_interleave(torch.arange(ring), torch.tensor(chunk_sizes))
    return torch.bincount(token_src * ring + token_dst, minlength=ring * ring).reshape(ring, ring)


def _block_owner(groups: tuple[tuple[int, ...], ...], num_blocks: int) -> torch.Tensor:
    """``(num_blocks,)`` int64: which group holds each block (checks that the groups partition them)."""
    owner = torch.full((num_blocks,), -1, dtype=torch.int64)
    for g, blocks in enumerate(groups):
        owner[torch.as_tensor(list(blocks), dtype=torch.int64)] = g
    if bool((owner < 0).any()):
        missing = torch.nonzero(owner < 0).flatten().tolist()
        raise ValueError(f"block lists must cover every block 0..{num_blocks - 1}; missing {missing[:8]}")
    return owner


@lru_cache(maxsize=256)
def token_exchange(
    seq_len: int,
    q_block: int,
    chunk_sizes: tuple[int, ...],
    targets: tuple[tuple[int, ...], ...],
    ring_rank: int,
) -> TokenExchange:
    """The exchange that moves ring rank ``ring_rank``'s chunk into the block layout ``targets``.

    Forward: ``sent = chunk.index_select(0, send_index)``, all-to-all with ``send_counts`` /
    ``recv_counts`` gives the rank's blocks in ascending order. Backward (outputs): all-to-all with
    the counts swapped, then ``index_select(0, restore_index)`` gives the chunk order again.

    Example (the module picture: S = 10, M = 4, chunks (5, 5), targets ((0, 1), (2,))): ring rank 1
    has send_counts (3, 2) and recv_counts (0, 2); ring rank 0 has (5, 0) and (5, 3).
    """
    matrix = exchange_matrix(seq_len, q_block, chunk_sizes, targets)
    start = sum(chunk_sizes[:ring_rank])
    owner = _block_owner(targets, -(-seq_len // q_block))
    dst = owner[torch.arange(start, start + chunk_sizes[ring_rank]) // q_block]
    order = torch.argsort(dst, stable=True)
    identity = bool((order == torch.arange(order.numel())).all())
    return TokenExchange(
        send_index=None if identity else order,
        restore_index=None if identity else torch.argsort(order),
        send_counts=tuple(int(x) for x in matrix[ring_rank]),
        recv_counts=tuple(int(x) for x in matrix[:, ring_rank]),
        ring_rank=ring_rank,
        group_local=bool((matrix == torch.diag(torch.diagonal(matrix))).all()),
    )


def sub_masks(
    mask: SparseMask, q_blocks: Sequence[int], kv_groups: Sequence[Sequence[int]]
) -> list[SparseMask | None]:
    """The local masks of one rank: its query blocks against each group of key blocks.

    Sub-mask ``g`` describes attention of the tokens of ``q_blocks`` (concatenated in order) over
    the tokens of ``kv_groups[g]`` (concatenated in order); its key tiles are re-indexed to that
    local key sequence. ``None`` marks a pair with no selected tile (or no tokens): nothing to
    compute. Vectorised: O(nnz of the selected rows), one pass per group, no loop over entries.

    Args:
        mask: the global mask (already restricted to this rank's heads), ``seq_len_q == seq_len_kv``.
        q_blocks: sorted query block ids.
        kv_groups: sorted key block ids of each group; together a partition of the key blocks.

    Returns:
        ``len(kv_groups)`` entries, each a ``SparseMask`` with ``q_block = mask.q_block``,
        ``kv_tile = mask.kv_tile``, ``seq_len_q = tokens of q_blocks`` and
        ``seq_len_kv = tokens of kv_groups[g]``, or None.

    Example (one head, M = N = 2, S = 6, blocks 0 1 2; mask rows: b0 -> {0, 2}, b1 -> {1}, b2 -> {2})::

        sub_masks(mask, [0, 2], [[0, 1], [2]])
        # group 0 (keys of blocks 0, 1): rows [0, 2] -> {0}, {}     (tile 0 stays local tile 0)
        # group 1 (keys of block 2):     rows [0, 2] -> {0}, {0}    (tile 2 becomes local tile 0)
    """
    S, M, N = mask.seq_len_q, mask.q_block, mask.kv_tile
    per = M // N
    B, H, nb = mask.batch, mask.heads, mask.num_q_blocks
    dev = mask.device
    n_groups = len(kv_groups)
    seq_q = block_tokens(q_blocks, S, M)
    seq_kv = [block_tokens(g, mask.seq_len_kv, M) for g in kv_groups]
    if seq_q == 0 or mask.nnz == 0:
        return [None] * n_groups
    if n_groups == 1 and len(q_blocks) == nb and len(kv_groups[0]) == mask.num_kv_blocks:
        return [mask]  # sorted partitions of everything: the whole mask, unchanged
    rows = torch.as_tensor(list(q_blocks), dtype=torch.int64, device=dev)
    nq = rows.numel()
    start = mask.offsets[:, :, rows].reshape(-1)  # (B * H * nq,)
    stop = mask.offsets[:, :, rows + 1].reshape(-1)
    counts = stop - start
    # Two device reads in all (this total, and the groups' sizes below): the other variable-size
    # results are sized by them, so the device's queue never drains in between.
    total = int(counts.sum())
    tiles = mask.indices[_segments(start, stop, total)].to(torch.int64)  # entries of the selected rows, row-major
    row_of = torch.repeat_interleave(torch.arange(B * H * nq, device=dev), counts, output_size=total)
    owner = torch.full((mask.num_kv_blocks,), -1, dtype=torch.int64)
    local = torch.zeros(mask.num_kv_blocks, dtype=torch.int64)
    for g, blocks in enumerate(kv_groups):
        ids = torch.as_tensor(list(blocks), dtype=torch.int64)
        owner[ids] = g
        local[ids] = torch.arange(ids.numel())
    if bool((owner < 0).any()):
        raise ValueError(f"kv_groups must cover every key block 0..{mask.num_kv_blocks - 1}")
    kb = tiles // per
    entry_owner = owner.to(dev)[kb]
    # Local key blocks keep their order, so local tile ids stay sorted within each row.
    entry_tile = local.to(dev)[kb] * per + tiles % per
    ones = torch.ones_like(entry_owner)
    per_group = torch.zeros(n_groups, dtype=torch.int64, device=dev).index_add_(0, entry_owner, ones).tolist()
    out: list[SparseMask | None] = []
    for g in range(n_groups):
        if per_group[g] == 0 or seq_kv[g] == 0:
            out.append(None)
            continue
        sel = _where_true(entry_owner == g, per_group[g])  # row-major, as the entries are
        row_counts = torch.zeros(B * H * nq, dtype=torch.int64, device=dev).index_add_(0, row_of[sel], ones[: sel.numel()])
        out.append(
            SparseMask._unchecked(
                _offsets_from_counts(row_counts, B, H, nq),
                entry_tile[sel].to(torch.int32),
                q_block=M,
                kv_tile=N,
                seq_len_q=seq_q,
                seq_len_kv=seq_kv[g],
            )
        )
    return out


def _where_true(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` true entries of the 1-D ``flags``, ascending, without a device read
    where torch can (``nonzero_static``; torch builds without its CUDA kernel use ``nonzero``)."""
    try:
        return torch.nonzero_static(flags, size=count).reshape(-1)
    except NotImplementedError:
        return torch.nonzero(flags).reshape(-1)


@dataclass(frozen=True, eq=False)
class RankLayout(MeshPosition):
    """One rank's view of a sequence-parallel call: a pure function of the sizes and the plan.

    Attributes:
        seq_len, q_block, ulysses, ring, rank: S, M, U, R and the global rank.
        head_order: ``(H,)`` int64 head permutation applied before the Ulysses all-to-all (on the
            call's device), or None for the natural order.
        head_restore: its inverse, applied after the way back, or None.
        head_offsets: ``(U + 1)`` boundaries of the head groups in the permuted order.
        heads: global ids of this rank's heads, in its local order.
        shard_sizes: tokens of every rank's input shard (length P).
        ulysses_shards: the shard sizes of this rank's Ulysses group (length U).
        chunk_sizes: tokens of each ring rank's chunk (length R).
        q_blocks, kv_blocks: this head group's block lists per ring rank (length R each).
        q_exchange, kv_exchange: this rank's chunk -> block exchanges.
        kv_lens: tokens of each ring rank's key/value blocks (length R).
    """

    seq_len: int
    q_block: int
    ulysses: int
    ring: int
    rank: int
    head_order: torch.Tensor | None
    head_restore: torch.Tensor | None
    head_offsets: tuple[int, ...]
    heads: tuple[int, ...]
    shard_sizes: tuple[int, ...]
    ulysses_shards: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    q_blocks: tuple[tuple[int, ...], ...]
    kv_blocks: tuple[tuple[int, ...], ...]
    q_exchange: TokenExchange
    kv_exchange: TokenExchange
    kv_lens: tuple[int, ...]

    @property
    def q_len(self) -> int:
        """Query tokens this rank computes (its query blocks)."""
        return block_tokens(self.q_blocks[self.ring_rank], self.seq_len, self.q_block)

    def step_kv_blocks(self) -> list[tuple[int, ...]]:
        """Key/value blocks visiting this rank at ring steps ``t = 0 .. R-1`` (chunk ``(i + t) mod R``)."""
        i, R = self.ring_rank, self.ring
        return [self.kv_blocks[(i + t) % R] for t in range(R)]

    def local_masks(self, mask: SparseMask) -> list[SparseMask | None]:
        """This rank's R sub-masks in ring-step order (None where nothing is selected).

        ``mask`` is the global mask with the natural head order. The result is cached on the
        mask for the latest layout it was sliced for (masks are immutable), so a mask reused
        across calls (fixed masks, a predictor's reused mask) is sliced once; the cache entry
        goes with the mask.
        """
        hit = _local_cache.get(mask)
        if hit is not None and hit[0] is self:
            return [mask if sub is _WHOLE else sub for sub in hit[1]]
        global_mask = mask
        heads = list(self.heads)
        if heads != list(range(mask.heads)):
            mask = mask.select_heads(heads)  # host ids: checked without a device read
        subs = sub_masks(mask, self.q_blocks[self.ring_rank], self.step_kv_blocks())
        # The cache must not hold the mask itself, or the weak key would never be released.
        _local_cache[global_mask] = (self, tuple(_WHOLE if sub is global_mask else sub for sub in subs))
        return subs


# mask -> (the RankLayout it was last sliced for, its sub-masks); see RankLayout.local_masks.
_WHOLE = object()  # stands for the mask itself in a cached entry
_local_cache: "weakref.WeakKeyDictionary[SparseMask, tuple[RankLayout, tuple]]" = weakref.WeakKeyDictionary()


def rank_layout(
    *,
    seq_len: int,
    q_block: int,
    heads: int,
    ulysses: int,
    ring: int,
    rank: int,
    head_perm: tuple[int, ...] | None = None,
    head_offsets: tuple[int, ...] | None = None,
    q_blocks: tuple[tuple[int, ...], ...] | None = None,
    kv_blocks: tuple[tuple[int, ...], ...] | None = None,
    device: torch.device | str = "cpu",
) -> RankLayout:
    """The :class:`RankLayout` of global rank ``rank`` (cached; every argument must be hashable).

    Args:
        seq_len, q_block, heads, ulysses, ring: S, M, H, U, R.
        rank: global rank r (ring index ``r // U``, Ulysses index ``r % U``).
        head_perm: the plan's head order, or None for ``range(H)``.
        head_offsets: the plan's head group boundaries, or None for ``H / U`` heads each.
        q_blocks, kv_blocks: the plan's block lists *of this rank's head group*, one sorted tuple
            per ring rank, or None for the home blocks.
        device: where the index tensors live (the call's device).
    """
    return _rank_layout(
        seq_len, q_block, heads, ulysses, ring, rank, head_perm, head_offsets, q_blocks, kv_blocks, str(device)
    )


@lru_cache(maxsize=512)
def _rank_layout(S, M, H, U, R, rank, head_perm, head_offsets, q_blocks, kv_blocks, device) -> RankLayout:
    i, k = rank // U, rank % U
    nb = -(-S // M)
    if head_offsets is None:
        head_offsets = tuple(j * (H // U) for j in range(U + 1))
    natural = head_perm is None or tuple(head_perm) == tuple(range(H))
    perm = tuple(range(H)) if head_perm is None else tuple(head_perm)
    home = home_blocks(nb, R)
    q_blocks = home if q_blocks is None else q_blocks
    kv_blocks = home if kv_blocks is None else kv_blocks
    shards = shard_sizes(S, U * R)
    chunks = tuple(sum(shards[j * U : (j + 1) * U]) for j in range(R))
    order = None if natural else torch.as_tensor(perm, dtype=torch.int64, device=device)
    return RankLayout(
        seq_len=S,
        q_block=M,
        ulysses=U,
        ring=R,
        rank=rank,
        head_order=order,
        head_restore=None if natural else torch.argsort(order),
        head_offsets=tuple(head_offsets),
        heads=perm[head_offsets[k] : head_offsets[k + 1]],
        shard_sizes=shards,
        ulysses_shards=shards[i * U : (i + 1) * U],
        chunk_sizes=chunks,
        q_blocks=q_blocks,
        kv_blocks=kv_blocks,
        q_exchange=_on(token_exchange(S, M, chunks, q_blocks, i), device),
        kv_exchange=_on(token_exchange(S, M, chunks, kv_blocks, i), device),
        kv_lens=tuple(block_tokens(b, S, M) for b in kv_blocks),
    )


def _on(ex: TokenExchange, device: str) -> TokenExchange:
    if ex.send_index is None or device == "cpu":
        return ex
    return TokenExchange(
        send_index=ex.send_index.to(device),
        restore_index=ex.restore_index.to(device),
        send_counts=ex.send_counts,
        recv_counts=ex.recv_counts,
        ring_rank=ex.ring_rank,
        group_local=ex.group_local,
    )
