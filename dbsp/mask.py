"""SparseMask: the one mask type of dbsp, for block-sparse and fine-grained attention.

A mask says which (query block, key tile) pairs of an attention call are computed. Queries are
cut into blocks of ``q_block`` rows (M); keys into tiles of ``kv_tile`` columns (N). With
``kv_tile == q_block`` it is an ordinary block-sparse mask; with ``kv_tile == 1`` it is FG-Attn's
M x 1 slice mask, where every query block keeps its own list of single keys.

Picture (one head, Sq = Skv = 8, q_block = 4, kv_tile = 2; ``#`` = computed, ``.`` = skipped)::

          keys  0 1 2 3 4 5 6 7        tiles    0   1   2   3
    q 0..3      # # . . . . # #   ->   qb 0:    #   .   .   #     indices [0, 3]
    q 4..7      . . # # # # . .        qb 1:    .   #   #   .     indices [1, 2]

Storage is CSR per (batch, head, query block): ``offsets`` is ``(B, H, Mq + 1)`` int64 holding
*global* positions into ``indices`` (int32 key-tile ids, sorted and unique within each row), so
row ``(b, h, i)`` selects ``indices[offsets[b, h, i] : offsets[b, h, i + 1]]`` and
``offsets[b, h, Mq] == offsets[b, h + 1, 0]``. Nothing of size Sq x Skv is ever built except by
``to_dense`` (tiles, not tokens) and ``to_flex_block_mask`` (for comparisons).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import torch

from ._checks import check_block_sizes, check_positive_int, check_tensor


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False, repr=False)
class SparseMask:
    """Which (query block, key tile) pairs of an attention call are computed.

    Args:
        offsets: ``(B, H, Mq + 1)`` integer tensor of global CSR positions into ``indices``,
            with ``Mq = ceil(seq_len_q / q_block)``. Stored as int64.
        indices: ``(nnz,)`` integer tensor of key-tile ids in ``[0, ceil(seq_len_kv / kv_tile))``,
            sorted and unique within each (batch, head, query block). Stored as int32.
        q_block: M, query rows per block (>= 1).
        kv_tile: N, keys per tile; ``1 <= kv_tile <= q_block`` and ``q_block % kv_tile == 0``.
        seq_len_q: number of query tokens (any length; the last block may be partial).
        seq_len_kv: number of key tokens (any length; the last tile may be partial).

    The constructor validates everything and raises ``ValueError``/``TypeError`` quoting the sizes.
    Build masks with :meth:`from_dense`, :meth:`full` or a predictor (``dbsp.predict_mask``).

    Example::

        >>> dense = torch.tensor([[[[1, 0, 0, 1], [0, 1, 1, 0]]]], dtype=torch.bool)
        >>> m = SparseMask.from_dense(dense, q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=8)
        >>> m.indices.tolist(), m.density()
        ([0, 3, 1, 2], 0.5)
    """

    offsets: torch.Tensor
    indices: torch.Tensor
    q_block: int
    kv_tile: int
    seq_len_q: int
    seq_len_kv: int
    _checked: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_tensor("offsets", self.offsets)
        check_tensor("indices", self.indices)
        if self.offsets.dtype != torch.int64:
            if self.offsets.is_floating_point() or self.offsets.dtype == torch.bool:
                raise TypeError(f"offsets must be an integer tensor, got {self.offsets.dtype}")
            object.__setattr__(self, "offsets", self.offsets.to(torch.int64))
        if self.indices.dtype != torch.int32:
            if self.indices.is_floating_point() or self.indices.dtype == torch.bool:
                raise TypeError(f"indices must be an integer tensor, got {self.indices.dtype}")
            if self.indices.numel():
                lo, hi = int(self.indices.min()), int(self.indices.max())
                if lo < -(2**31) or hi >= 2**31:  # the int32 cast would wrap them into valid-looking ids
                    raise ValueError(f"indices must fit in int32, got min {lo}, max {hi}")
            object.__setattr__(self, "indices", self.indices.to(torch.int32))
        # The kernels address offsets and indices as flat arrays from their data pointers.
        for name in ("offsets", "indices"):
            if not getattr(self, name).is_contiguous():
                object.__setattr__(self, name, getattr(self, name).contiguous())
        if self._checked:
            self.validate()
        else:
            # O(1), so even trusted producers get it: every backend would read a bad granularity silently.
            check_block_sizes(self.q_block, self.kv_tile)
            check_positive_int("seq_len_q", self.seq_len_q)
            check_positive_int("seq_len_kv", self.seq_len_kv)

    # ------------------------------------------------------------------ construction

    @classmethod
    def _unchecked(cls, offsets, indices, *, q_block, kv_tile, seq_len_q, seq_len_kv) -> "SparseMask":
        """Build without the O(nnz) validation; for producers that guarantee a valid CSR."""
        return cls(offsets, indices, q_block, kv_tile, seq_len_q, seq_len_kv, _checked=False)

    @classmethod
    def from_dense(
        cls, dense: torch.Tensor, *, q_block: int, kv_tile: int, seq_len_q: int, seq_len_kv: int
    ) -> "SparseMask":
        """Build a mask from a dense tile-level boolean tensor.

        Args:
            dense: ``(B, H, ceil(seq_len_q / q_block), ceil(seq_len_kv / kv_tile))`` bool (or 0/1
                integers): ``dense[b, h, i, j]`` says query block ``i`` computes key tile ``j``.
            q_block, kv_tile, seq_len_q, seq_len_kv: as in the class docstring.

        Returns:
            The equivalent ``SparseMask`` on ``dense.device``.
        """
        check_tensor("dense", dense)
        check_block_sizes(q_block, kv_tile)
        check_positive_int("seq_len_q", seq_len_q)
        check_positive_int("seq_len_kv", seq_len_kv)
        mq, nt = _cdiv(seq_len_q, q_block), _cdiv(seq_len_kv, kv_tile)
        if dense.dim() != 4 or tuple(dense.shape[2:]) != (mq, nt):
            raise ValueError(
                f"dense must have shape (B, H, ceil(seq_len_q/q_block), ceil(seq_len_kv/kv_tile)) = "
                f"(B, H, {mq}, {nt}) for seq_len_q={seq_len_q}, q_block={q_block}, "
                f"seq_len_kv={seq_len_kv}, kv_tile={kv_tile}; got {tuple(dense.shape)}"
            )
        if dense.dtype != torch.bool:
            if dense.is_floating_point():
                raise TypeError(f"dense must be a bool tensor, got {dense.dtype}")
            if dense.numel() and not bool(((dense == 0) | (dense == 1)).all()):
                raise ValueError("dense must hold only 0/1 (or be a bool tensor)")
            dense = dense.bool()
        B, H = dense.shape[:2]
        flat = dense.reshape(B * H * mq, nt)
        counts = flat.sum(dim=1)
        indices = torch.nonzero(flat.reshape(-1)).reshape(-1).remainder_(nt).to(torch.int32)
        offsets = _offsets_from_counts(counts, B, H, mq)
        return cls._unchecked(
            offsets, indices, q_block=q_block, kv_tile=kv_tile, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv
        )

    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        seq_len_q: int,
        seq_len_kv: int,
        *,
        q_block: int = 64,
        kv_tile: int | None = None,
        device: torch.device | str | None = None,
    ) -> "SparseMask":
        """A mask that selects every key tile for every query block (dense attention).

        ``kv_tile`` defaults to ``q_block`` (a block mask). ``sparse_attention(backend="auto")``
        sends full masks to dense SDPA, which gives the same result faster.
        """
        kv_tile = q_block if kv_tile is None else kv_tile
        check_positive_int("batch", batch)
        check_positive_int("heads", heads)
        check_positive_int("seq_len_q", seq_len_q)
        check_positive_int("seq_len_kv", seq_len_kv)
        check_block_sizes(q_block, kv_tile)
        mq, nt = _cdiv(seq_len_q, q_block), _cdiv(seq_len_kv, kv_tile)
        counts = torch.full((batch * heads * mq,), nt, dtype=torch.int64, device=device)
        offsets = _offsets_from_counts(counts, batch, heads, mq)
        indices = torch.arange(nt, dtype=torch.int32, device=device).repeat(batch * heads * mq)
        mask = cls._unchecked(
            offsets, indices, q_block=q_block, kv_tile=kv_tile, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv
        )
        return _note_full_heads(mask, range(heads))

    # ------------------------------------------------------------------ shape facts

    @property
    def batch(self) -> int:
        """B, the batch size."""
        return self.offsets.shape[0]

    @property
    def heads(self) -> int:
        """H, the number of heads."""
        return self.offsets.shape[1]

    @property
    def num_q_blocks(self) -> int:
        """Mq = ceil(seq_len_q / q_block)."""
        return _cdiv(self.seq_len_q, self.q_block)

    @property
    def num_kv_tiles(self) -> int:
        """ceil(seq_len_kv / kv_tile): the range of valid ``indices``."""
        return _cdiv(self.seq_len_kv, self.kv_tile)

    @property
    def num_kv_blocks(self) -> int:
        """ceil(seq_len_kv / q_block): key blocks of the planner's ``work()`` grid."""
        return _cdiv(self.seq_len_kv, self.q_block)

    @property
    def nnz(self) -> int:
        """Number of selected (query block, key tile) pairs over all batches and heads."""
        return self.indices.numel()

    @property
    def device(self) -> torch.device:
        """The device of ``offsets`` and ``indices``."""
        return self.indices.device

    @property
    def is_block(self) -> bool:
        """True for block-sparse masks (``kv_tile == q_block``)."""
        return self.kv_tile == self.q_block

    def row_counts(self) -> torch.Tensor:
        """``(B, H, Mq)`` int64: number of selected key tiles per query block."""
        return self.offsets[..., 1:] - self.offsets[..., :-1]

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every invariant of the CSR form; raise ``ValueError`` quoting the sizes.

        Costs O(nnz); masks built by dbsp's own constructors skip it.
        """
        check_block_sizes(self.q_block, self.kv_tile)
        check_positive_int("seq_len_q", self.seq_len_q)
        check_positive_int("seq_len_kv", self.seq_len_kv)
        off, idx = self.offsets, self.indices
        if off.device != idx.device:
            raise ValueError(f"offsets is on {off.device} but indices is on {idx.device}")
        mq = self.num_q_blocks
        if off.dim() != 3 or off.shape[2] != mq + 1 or off.shape[0] < 1 or off.shape[1] < 1:
            raise ValueError(
                f"offsets must have shape (B, H, Mq + 1) with Mq = ceil(seq_len_q / q_block) = "
                f"ceil({self.seq_len_q} / {self.q_block}) = {mq}; got {tuple(off.shape)}"
            )
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D (nnz,), got shape {tuple(idx.shape)}")
        nnz = idx.numel()
        rows = off.reshape(-1, mq + 1)
        if int(rows[0, 0]) != 0:
            raise ValueError(f"offsets[0, 0, 0] must be 0, got {int(rows[0, 0])}")
        if int(rows[-1, -1]) != nnz:
            raise ValueError(
                f"offsets[-1, -1, -1] must equal len(indices) = {nnz}, got {int(rows[-1, -1])}"
            )
        if rows.shape[0] > 1 and not bool((rows[1:, 0] == rows[:-1, -1]).all()):
            raise ValueError("offsets must chain: offsets[b, h, Mq] must equal the next (b, h)'s offsets[.., 0]")
        if bool((rows[:, 1:] < rows[:, :-1]).any()):
            raise ValueError("offsets must be non-decreasing along the query-block axis")
        if nnz == 0:
            return
        nt = self.num_kv_tiles
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= nt:
            raise ValueError(
                f"indices must lie in [0, ceil(seq_len_kv / kv_tile)) = [0, {nt}) for "
                f"seq_len_kv={self.seq_len_kv}, kv_tile={self.kv_tile}; got min {lo}, max {hi}"
            )
        is_start = torch.zeros(nnz + 1, dtype=torch.bool, device=idx.device)
        is_start[rows.reshape(-1)] = True
        step = idx[1:].to(torch.int64) - idx[:-1].to(torch.int64)
        bad = (step <= 0) & ~is_start[1:nnz]
        if bool(bad.any()):
            p = int(torch.nonzero(bad)[0, 0]) + 1
            kind = "duplicated" if int(step[p - 1]) == 0 else "unsorted"
            raise ValueError(
                f"indices must be sorted and unique within each (batch, head, query block); position "
                f"{p} holds {int(idx[p])} after {int(idx[p - 1])} ({kind})"
            )

    # ------------------------------------------------------------------ conversions

    def _entry_rows(self) -> torch.Tensor:
        """``(nnz,)`` int64: the flat row ``(b * H + h) * Mq + i`` of every entry of ``indices``.

        Computed on demand, never cached: it costs 8 bytes per entry, which at Wan scale with
        64 x 1 tiles is gigabytes that would otherwise live as long as the mask.
        """
        counts = self.row_counts().reshape(-1)
        return torch.repeat_interleave(torch.arange(counts.numel(), device=self.device), counts)

    def to_dense(self) -> torch.Tensor:
        """``(B, H, Mq, ceil(Skv / kv_tile))`` bool: the tile-level picture. For small tests only."""
        B, H, mq, nt = self.batch, self.heads, self.num_q_blocks, self.num_kv_tiles
        dense = torch.zeros(B * H * mq, nt, dtype=torch.bool, device=self.device)
        dense[self._entry_rows(), self.indices.to(torch.int64)] = True
        return dense.reshape(B, H, mq, nt)

    def to(self, device: torch.device | str) -> "SparseMask":
        """The same mask on ``device`` (with the same record of full heads, if any)."""
        moved = SparseMask._unchecked(
            self.offsets.to(device),
            self.indices.to(device),
            q_block=self.q_block,
            kv_tile=self.kv_tile,
            seq_len_q=self.seq_len_q,
            seq_len_kv=self.seq_len_kv,
        )
        full = _known_full_heads(self)
        return moved if full is None else _note_full_heads(moved, full)

    def select_heads(self, heads: torch.Tensor | list[int]) -> "SparseMask":
        """The mask restricted to (and reordered by) ``heads``, a list of head ids.

        ``mask.select_heads(perm)`` permutes heads the way ``x.index_select(2, perm)`` permutes
        the head axis of a ``(B, S, H, D)`` tensor.
        """
        given = torch.as_tensor(heads, dtype=torch.int64).reshape(-1)
        ids = given.tolist()  # one read if the ids are on a device
        if not ids:
            raise ValueError("heads must select at least one head")
        if min(ids) < 0 or max(ids) >= self.heads:
            raise ValueError(f"heads must lie in [0, {self.heads}), got {ids}")
        heads = given.to(self.device, non_blocking=True)
        B, mq = self.batch, self.num_q_blocks
        start = self.offsets[:, heads, 0].reshape(-1)  # (B * len(heads),)
        stop = self.offsets[:, heads, mq].reshape(-1)
        indices = self.indices[_segments(start, stop)]
        counts = (self.offsets[:, heads, 1:] - self.offsets[:, heads, :-1]).reshape(-1)
        offsets = _offsets_from_counts(counts, B, heads.numel(), mq)
        picked = SparseMask._unchecked(
            offsets,
            indices,
            q_block=self.q_block,
            kv_tile=self.kv_tile,
            seq_len_q=self.seq_len_q,
            seq_len_kv=self.seq_len_kv,
        )
        full = _known_full_heads(self)
        if full is None:
            return picked
        return _note_full_heads(picked, [i for i, h in enumerate(ids) if h in full])

    # ------------------------------------------------------------------ statistics

    def _q_rows(self) -> torch.Tensor:
        """``(Mq,)`` int64: query rows in each block (the last one may be partial)."""
        mq = self.num_q_blocks
        rows = torch.full((mq,), self.q_block, dtype=torch.int64, device=self.device)
        rows[-1] = self.seq_len_q - (mq - 1) * self.q_block
        return rows

    def _tile_keys(self) -> torch.Tensor:
        """``(ceil(Skv / kv_tile),)`` int64: keys in each tile (the last one may be partial)."""
        nt = self.num_kv_tiles
        keys = torch.full((nt,), self.kv_tile, dtype=torch.int64, device=self.device)
        keys[-1] = self.seq_len_kv - (nt - 1) * self.kv_tile
        return keys

    def _row_keys(self) -> torch.Tensor:
        """``(B, H, Mq)`` int64: selected keys per query block, the partial last tile counted exactly.

        O(rows), not O(nnz): only the sequence's last tile can be partial, and it sorts last in
        its row, so a row's keys are ``count * kv_tile`` minus the padding when it ends on that tile.
        """
        keys = self.row_counts() * self.kv_tile
        pad = self.num_kv_tiles * self.kv_tile - self.seq_len_kv
        if pad and self.nnz:
            keys -= self._ends_on_last_tile().to(torch.int64) * pad
        return keys

    def _ends_on_last_tile(self) -> torch.Tensor:
        """``(B, H, Mq)`` bool: the row selects the sequence's last key tile (always its last entry)."""
        last = self.indices[(self.offsets[..., 1:] - 1).clamp(min=0)].to(torch.int64)
        return (self.row_counts() > 0) & (last == self.num_kv_tiles - 1)

    def density(self, *, per_head: bool = False) -> float | torch.Tensor:
        """Fraction of the ``Sq x Skv`` score entries that are computed.

        Partial last blocks and tiles are counted exactly. With ``per_head=True`` returns a
        ``(B, H)`` float64 tensor, else one float over all batches and heads. Costs O(B * H * Mq).
        """
        B, H = self.batch, self.heads
        per_bh = (self._row_keys() * self._q_rows()).sum(-1).reshape(B * H)  # (B, H, Mq) -> (B * H,)
        total = self.seq_len_q * self.seq_len_kv
        if per_head:
            return per_bh.reshape(B, H).to(torch.float64) / total
        return int(per_bh.sum()) / (total * B * H)

    def work(self) -> torch.Tensor:
        """Computed score entries per (batch, head, query block, key block): the planner's input.

        Key blocks are ``q_block`` keys wide, so the grid is square for self-attention and a
        fine-grained mask counts only the keys it actually selects inside each block.

        Returns:
            ``(B, H, Mq, ceil(Skv / q_block))`` int32 (each cell is at most ``q_block**2``;
            ``torch.sum`` promotes to int64).
        """
        return self._work_by_counts() if self.device.type == "cpu" else self._work_per_entry()

    def _work_per_entry(self) -> torch.Tensor:
        """:meth:`work` as one index_add of every entry's cost (query rows x keys): the GPU path."""
        B, H, mq, mk = self.batch, self.heads, self.num_q_blocks, self.num_kv_blocks
        out = torch.zeros(B * H * mq * mk, dtype=torch.int64, device=self.device)
        if self.nnz:
            tiles = self.indices.to(torch.int64)
            rows = self._entry_rows()
            cost = self._q_rows()[rows.remainder(mq)] * self._tile_keys()[tiles]  # rows x keys per entry
            out.index_add_(0, rows * mk + tiles // (self.q_block // self.kv_tile), cost)
        return out.to(torch.int32).reshape(B, H, mq, mk)

    def _work_by_counts(self) -> torch.Tensor:
        """:meth:`work` with one pass over the entries: count the tiles of each (row, key block),
        then scale by ``kv_tile`` keys and the block's query rows, O(rows) work for the partial
        last tile (it ends its row, as in :meth:`_row_keys`). On the CPU ~4x faster than a cost
        per entry; kept off the GPU path, whose kernels are measured as they are."""
        B, H, mq, mk = self.batch, self.heads, self.num_q_blocks, self.num_kv_blocks
        out = torch.zeros(B * H * mq * mk, dtype=torch.int32, device=self.device)
        if self.nnz:
            per = self.q_block // self.kv_tile
            kb = self.indices.to(torch.int64)
            if per > 1:
                kb = kb.div(per, rounding_mode="floor")
            counts = self.row_counts().reshape(-1)
            base = torch.repeat_interleave(torch.arange(0, counts.numel() * mk, mk, device=self.device), counts)
            out.index_add_(0, base.add_(kb), torch.ones(1, dtype=torch.int32, device=self.device).expand(self.nnz))
        out = out.view(B * H, mq, mk).mul_(self.kv_tile)  # keys per (row, key block), every tile full
        pad = self.num_kv_tiles * self.kv_tile - self.seq_len_kv
        if pad and self.nnz:  # the partial tile lies in the last key block
            out[..., -1] -= self._ends_on_last_tile().reshape(B * H, mq).to(torch.int32) * pad
        out.mul_(self._q_rows().to(torch.int32)[None, :, None])
        return out.reshape(B, H, mq, mk)

    # ------------------------------------------------------------------ FlexAttention

    def to_flex_block_mask(self, *, block_size: int | None = None):
        """The same mask as a torch FlexAttention ``BlockMask`` (for comparisons and benchmarks).

        Flex works on square blocks of ``block_size`` tokens (a multiple of ``q_block``).
        Default: ``q_block``. A Flex block whose every tile is selected is marked *full*, so
        compiled Flex skips ``mask_mod`` there (its fastest path); a block mask at its own block
        size is all full blocks. A block with only some tiles selected is *partial*: Flex computes
        it whole and applies a token-level ``mask_mod``, so it cannot skip work inside a block.
        The ``mask_mod`` (a lookup in the tile-level picture) is always attached because Flex's
        eager, uncompiled path applies only ``mask_mod``. This reads ``to_dense()``: use it at
        benchmark sizes, not on the hot path.
        """
        from torch.nn.attention.flex_attention import BlockMask

        F = self.q_block if block_size is None else check_positive_int("block_size", block_size)
        if F % self.q_block:
            raise ValueError(f"block_size must be a multiple of q_block={self.q_block}, got {F}")
        B, H = self.batch, self.heads
        mq, nt, M, N = self.num_q_blocks, self.num_kv_tiles, self.q_block, self.kv_tile
        fq, fk = _cdiv(self.seq_len_q, F), _cdiv(self.seq_len_kv, F)
        rows, cols = F // M, F // N  # mask rows and tiles per Flex block
        tiles = self.to_dense()  # (B, H, Mq, Nt)

        def grid(fill: bool) -> torch.Tensor:  # (B, H, fq, rows, fk, cols), padding set to fill
            g = torch.full((B, H, fq * rows, fk * cols), fill, dtype=torch.bool, device=self.device)
            g[:, :, :mq, :nt] = tiles
            return g.reshape(B, H, fq, rows, fk, cols)

        full = grid(True).all(dim=5).all(dim=3)  # (B, H, fq, fk)
        partial = grid(False).any(dim=5).any(dim=3) & ~full

        def as_kv_blocks(sel: torch.Tensor):
            order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
            return sel.sum(-1).to(torch.int32), order

        def mask_mod(b, h, q_idx, kv_idx):
            return tiles[b, h, q_idx // M, kv_idx // N]

        kwargs = {}
        if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
            kwargs["seq_lengths"] = (self.seq_len_q, self.seq_len_kv)
        return BlockMask.from_kv_blocks(
            *as_kv_blocks(partial), *as_kv_blocks(full), BLOCK_SIZE=(F, F), mask_mod=mask_mod, **kwargs
        )

    # ------------------------------------------------------------------ printing

    def __repr__(self) -> str:
        kind = "block" if self.is_block else "fine-grained"
        return (
            f"SparseMask({self.q_block}x{self.kv_tile} {kind}, B={self.batch}, H={self.heads}, "
            f"Sq={self.seq_len_q}, Skv={self.seq_len_kv}, q_blocks={self.num_q_blocks}, "
            f"kv_tiles={self.num_kv_tiles}, nnz={self.nnz}, density={self.density():.4f}, "
            f"device={self.device})"
        )


# Heads known to select every key tile in every query block of every batch, recorded by the
# producers that know it without reading the device (SparseMask.full, the predictor's Triton
# paths), so that sparse_attention can split off dense heads without waiting for the GPU.
_full_heads: "weakref.WeakKeyDictionary[SparseMask, tuple[int, ...]]" = weakref.WeakKeyDictionary()


def _note_full_heads(mask: SparseMask, heads) -> SparseMask:
    """Record ``heads`` (ascending ids) as ``mask``'s full heads (exactly those); returns ``mask``."""
    _full_heads[mask] = tuple(heads)
    return mask


def _known_full_heads(mask: SparseMask) -> tuple[int, ...] | None:
    """The full heads recorded for ``mask``, or None if its producer recorded none."""
    return _full_heads.get(mask)


def _offsets_from_counts(counts: torch.Tensor, B: int, H: int, mq: int) -> torch.Tensor:
    """Chained ``(B, H, Mq + 1)`` global offsets from ``(B * H * Mq,)`` per-row counts."""
    flat = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), dim=0, out=flat[1:])
    gather = torch.arange(B * H, device=counts.device)[:, None] * mq + torch.arange(mq + 1, device=counts.device)
    return flat[gather].reshape(B, H, mq + 1)


def _segments(start: torch.Tensor, stop: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Concatenated ``arange(start[i], stop[i])`` for all i, without a Python loop. ``total``: the
    sum of the lengths where the caller knows it (read from the device here otherwise, the call's
    one device read)."""
    lengths = stop - start
    total = int(lengths.sum()) if total is None else total
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=start.device), lengths, output_size=total)
    first = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=start.device) - first[seg] + start[seg]
