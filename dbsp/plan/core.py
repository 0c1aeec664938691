"""The plan's data types and the ring and tile math every other planning module builds on.

:class:`Plan` (the validated, frozen result), the planner's inputs (a mask's ``work()`` tensor or
its :class:`WorkSummary`), ``rho_s`` (:func:`imbalance_ratio`), :func:`tile_work` and
:func:`dense_heads`.

Rank layout (the contract with ``dbsp/dist``): ``P = U * R`` ranks; global rank ``r`` is Ulysses
index ``k = r % U`` and ring index ``i = r // U``. Head group ``k`` is served by the ring group
``{k, U + k, 2U + k, ...}``::

                    ring rank i = 0    i = 1      i = 2      i = 3
    head group k=0       rank 0        rank 2     rank 4     rank 6      heads head_perm[off[0]:off[1]]
    head group k=1       rank 1        rank 3     rank 5     rank 7      heads head_perm[off[1]:off[2]]

The sparse imbalance ratio (db-SP, section 2 of ``papers/db-SP.md``). With ``W[k, i, j]`` = the
work of group ``k``'s heads for the query blocks of ring rank ``i`` against the key blocks of ring
rank ``j``, ring step ``t`` has rank ``i`` compute ``W[k, i, (i + t) % R]`` (K/V travel from ring
rank ``i + 1`` to ``i``), and a step lasts as long as its slowest rank::

    T_k   = sum_t max_i W[k, i, (i + t) % R]
    rho_s = max_k T_k / (sum W / (U * R))          >= 1; 1 is perfect balance

Worked example, one group, R = 2, ``W = [[6, 2], [1, 1]]``: step 0 costs ``max(6, 1) = 6``, step 1
``max(W[0, 1], W[1, 0]) = max(2, 1) = 2``, so ``T = 8`` against a mean of ``10 / 2 = 5``:
``rho_s = 1.6``.

The home of block ``b`` is ``b * R // NB``: the ring rank holding it in the unplanned layout.

Planning fast: at Wan2.1-14B 720p the work tensor ``(H, NB, NB)`` is 224 MB, and one read of it
costs more than the whole plan. :func:`summarize_work` pools it, where the mask lives, into a
:class:`WorkSummary` of *units* (runs of ``coarse`` blocks inside each ring rank's home chunk):
``(H, NU, NU)``, 3.7 MB at the default. Every planning function also takes a summary. Plans built
from it move whole units, so everything evaluated on them (``tile_work``, ``rho_s``, the cost
model, the :class:`~dbsp.plan.PlanCache` check) is exact, not estimated; only the search is coarser.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch

from .._checks import check_positive_int, check_tensor
from ..mask import SparseMask


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=64)
def _home(num_blocks: int, ring: int) -> np.ndarray:
    """``(NB,)`` int64: home ring rank of every block, ``b * R // NB``. Read-only: one array per
    ``(NB, R)``, shared by every plan and candidate (copy it to change it)."""
    out = np.arange(num_blocks, dtype=np.int64) * ring // num_blocks
    out.flags.writeable = False
    return out


def _head_counts(heads: int, ulysses: int, uneven_heads: bool) -> list[int]:
    """Heads per Ulysses rank: ``H / U`` each, or (uneven mode) the first ``H % U`` get one more."""
    if ulysses > heads:
        raise ValueError(f"ulysses={ulysses} exceeds heads={heads}: every Ulysses rank needs at least one head")
    if heads % ulysses and not uneven_heads:
        raise ValueError(
            f"ulysses={ulysses} must divide heads={heads} (heads % ulysses = {heads % ulysses}); "
            f"pass uneven_heads=True to give ranks {heads // ulysses} or {heads // ulysses + 1} heads"
        )
    base, extra = divmod(heads, ulysses)
    return [base + (k < extra) for k in range(ulysses)]


def _check_degrees(ulysses: object, ring: object, world: object = None) -> None:
    check_positive_int("ulysses", ulysses)
    check_positive_int("ring", ring)
    if world is not None and check_positive_int("world", world) != ulysses * ring:
        raise ValueError(f"ulysses * ring must equal world: {ulysses} * {ring} = {ulysses * ring} != world={world}")


def _check_ring(ring: int, num_blocks: int) -> None:
    if ring > num_blocks:
        raise ValueError(
            f"ring={ring} exceeds the number of blocks {num_blocks}: every ring rank needs at least one block"
        )


# ---------------------------------------------------------------------------------------- Plan


def _group_tuples(owner: np.ndarray, ring: int) -> tuple[tuple[int, ...], ...]:
    """Block ids grouped by owning ring rank (in ``[0, ring)``), ascending within each rank."""
    bounds = [0] + np.cumsum(np.bincount(owner, minlength=ring)).tolist()
    if bool((owner[1:] >= owner[:-1]).all()):  # contiguous owners (e.g. every block at home): no sort
        return tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(ring))
    ids = np.argsort(owner, kind="stable").tolist()
    return tuple(tuple(ids[bounds[i] : bounds[i + 1]]) for i in range(ring))


@lru_cache(maxsize=64)
def _home_tuples(num_blocks: int, ring: int) -> tuple[tuple[int, ...], ...]:
    """:func:`_group_tuples` of the home layout, built once per ``(NB, R)``."""
    return _group_tuples(_home(num_blocks, ring), ring)


@dataclass(frozen=True, repr=False)
class Plan:
    """The balanced partition of one parallel attention call (the shared contract with ``dbsp.dist``).

    ``P = ulysses * ring`` ranks; rank ``r`` is Ulysses index ``k = r % ulysses`` and ring index
    ``i = r // ulysses``. Ulysses rank ``k`` gets the heads ``head_perm[head_offsets[k] :
    head_offsets[k + 1]]``; inside head group ``k``, ring rank ``i`` computes the query blocks
    ``q_blocks[k][i]`` against the key/value blocks ``kv_blocks[k][j]`` that visit it (at ring step
    ``t`` those of ring rank ``(i + t) % ring``). Block ``b`` covers tokens ``[b * q_block,
    min((b + 1) * q_block, seq_len))``; its *home* is ring rank ``b * ring // num_blocks``.

    Args:
        ulysses: U, the Ulysses (head-parallel) degree.
        ring: R, the ring (sequence-parallel) degree.
        heads: H.
        q_block: tokens per block (the mask's ``q_block``).
        seq_len: S, tokens of the sequence (any length; the last block may be partial).
        head_perm: length ``H``: the new head order.
        head_offsets: length ``U + 1``: ``0 = off[0] <= ... <= off[U] = H``; counts are ``H / U``
            each, or differ by at most one (uneven-heads mode).
        q_blocks: ``U`` tuples of ``R`` sorted tuples of block ids; each group's ``R`` tuples
            partition ``0 .. num_blocks - 1``, and ring rank ``i`` holds as many blocks as in the
            contiguous layout.
        kv_blocks: the same for key/value blocks.
        tile_work: ``(U, R, R)`` int64 ``W[k, i, j]`` of the mask the plan was built for (see the
            module docstring), or ``None`` (e.g. :meth:`identity`). Not part of equality or the
            fingerprint. Treat as read-only.

    Construction validates everything (:meth:`validate`). Build plans with :func:`make_plan` or
    :meth:`identity`.

    Example::

        >>> p = Plan.identity(ulysses=2, ring=2, heads=4, q_block=64, seq_len=256)
        >>> p.head_perm, p.q_blocks
        ((0, 1, 2, 3), (((0, 1), (2, 3)), ((0, 1), (2, 3))))
    """

    ulysses: int
    ring: int
    heads: int
    q_block: int
    seq_len: int
    head_perm: tuple[int, ...]
    head_offsets: tuple[int, ...]
    q_blocks: tuple[tuple[tuple[int, ...], ...], ...]
    kv_blocks: tuple[tuple[tuple[int, ...], ...], ...]
    tile_work: torch.Tensor | None = field(default=None, compare=False)
    _checked: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        if self._checked:
            # Accept lists (e.g. from JSON) but store hashable tuples of Python ints.
            for name in ("head_perm", "head_offsets"):
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
            for name in ("q_blocks", "kv_blocks"):
                groups = getattr(self, name)
                object.__setattr__(self, name, tuple(tuple(tuple(int(b) for b in blocks) for blocks in g) for g in groups))
            self.validate()

    # ------------------------------------------------------------------ construction

    @classmethod
    def identity(cls, *, ulysses: int, ring: int, heads: int, q_block: int, seq_len: int) -> "Plan":
        """The unplanned USP layout: heads in order, contiguous equal heads and blocks per rank.

        ``head_perm = (0, ..., H - 1)``, and in every head group ring rank ``i`` holds the blocks
        whose home it is. Running the runtime with this plan equals the plain USP path.
        """
        for name, value in (("ulysses", ulysses), ("ring", ring), ("heads", heads), ("q_block", q_block), ("seq_len", seq_len)):
            check_positive_int(name, value)
        counts = _head_counts(heads, ulysses, uneven_heads=False)
        nb = _cdiv(seq_len, q_block)
        _check_ring(ring, nb)
        blocks = _group_tuples(_home(nb, ring), ring)
        return cls(
            ulysses=ulysses,
            ring=ring,
            heads=heads,
            q_block=q_block,
            seq_len=seq_len,
            head_perm=tuple(range(heads)),
            head_offsets=tuple(int(x) for x in np.cumsum([0] + counts)),
            q_blocks=(blocks,) * ulysses,
            kv_blocks=(blocks,) * ulysses,
        )

    def with_tile_work(self, work: "SparseMask | torch.Tensor | WorkSummary") -> "Plan":
        """The same layout with ``tile_work`` computed from ``work`` (see :func:`tile_work`)."""
        return Plan(**{**self._layout(), "tile_work": tile_work(work, self), "_checked": False})

    def _layout(self) -> dict[str, Any]:
        return {
            "ulysses": self.ulysses,
            "ring": self.ring,
            "heads": self.heads,
            "q_block": self.q_block,
            "seq_len": self.seq_len,
            "head_perm": self.head_perm,
            "head_offsets": self.head_offsets,
            "q_blocks": self.q_blocks,
            "kv_blocks": self.kv_blocks,
        }

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check every invariant; raise ``ValueError``/``TypeError`` naming the field and sizes."""
        for name in ("ulysses", "ring", "heads", "q_block", "seq_len"):
            check_positive_int(name, getattr(self, name))
        U, R, H, nb = self.ulysses, self.ring, self.heads, self.num_blocks
        if sorted(self.head_perm) != list(range(H)) or len(self.head_perm) != H:
            raise ValueError(f"head_perm must be a permutation of range(heads={H}), got {self.head_perm}")
        off = self.head_offsets
        if len(off) != U + 1 or off[0] != 0 or off[-1] != H:
            raise ValueError(f"head_offsets must have length ulysses + 1 = {U + 1}, start at 0 and end at heads={H}; got {off}")
        counts = [off[k + 1] - off[k] for k in range(U)]
        if min(counts) < 1 or max(counts) - min(counts) > 1:
            raise ValueError(f"head_offsets must give every Ulysses rank H/U heads (or H//U and H//U + 1); got counts {counts}")
        _check_ring(R, nb)
        expected = np.bincount(_home(nb, R), minlength=R)
        for name in ("q_blocks", "kv_blocks"):
            groups = getattr(self, name)
            if len(groups) != U or any(len(g) != R for g in groups):
                raise ValueError(
                    f"{name} must hold ulysses={U} groups of ring={R} block lists; got "
                    f"{len(groups)} groups with {[len(g) for g in groups]} lists"
                )
            for k, group in enumerate(groups):
                sizes = np.array([len(b) for b in group])
                if not np.array_equal(sizes, expected):
                    raise ValueError(
                        f"{name}[{k}] must give every ring rank its contiguous-layout block count "
                        f"{expected.tolist()} (num_blocks={nb}, ring={R}); got {sizes.tolist()}"
                    )
                flat = np.fromiter((b for blocks in group for b in blocks), dtype=np.int64, count=nb)
                if flat.min() < 0 or flat.max() >= nb or np.bincount(flat, minlength=nb).max() != 1:
                    raise ValueError(f"{name}[{k}] must partition the block ids 0..{nb - 1} (num_blocks={nb})")
                if any(any(a >= b for a, b in zip(blocks, blocks[1:])) for blocks in group):
                    raise ValueError(f"{name}[{k}]: every ring rank's block ids must be sorted ascending")
        if self.tile_work is not None:
            check_tensor("tile_work", self.tile_work)
            if tuple(self.tile_work.shape) != (U, R, R):
                raise ValueError(f"tile_work must have shape (ulysses, ring, ring) = {(U, R, R)}, got {tuple(self.tile_work.shape)}")

    # ------------------------------------------------------------------ derived facts

    @property
    def world(self) -> int:
        """P = ulysses * ring."""
        return self.ulysses * self.ring

    @property
    def num_blocks(self) -> int:
        """NB = ceil(seq_len / q_block); block ids are ``0 .. NB - 1``."""
        return _cdiv(self.seq_len, self.q_block)

    @cached_property
    def inverse_head_perm(self) -> tuple[int, ...]:
        """``inv`` with ``inv[head_perm[j]] == j``: undoes the head permutation after attention."""
        inv = [0] * self.heads
        for j, h in enumerate(self.head_perm):
            inv[h] = j
        return tuple(inv)

    @property
    def heads_per_rank(self) -> tuple[int, ...]:
        """Heads of each Ulysses rank (length U)."""
        off = self.head_offsets
        return tuple(off[k + 1] - off[k] for k in range(self.ulysses))

    def head_group(self, k: int) -> tuple[int, ...]:
        """The head ids (original numbering) that Ulysses rank ``k`` computes."""
        return self.head_perm[self.head_offsets[k] : self.head_offsets[k + 1]]

    def home(self, block: int) -> int:
        """Ring rank that holds ``block`` in the contiguous layout: ``block * ring // num_blocks``."""
        return block * self.ring // self.num_blocks

    @cached_property
    def _owners(self) -> tuple[np.ndarray, np.ndarray]:
        """``(U, NB)`` int64 owning ring rank of every query block and every key/value block."""
        out = []
        for groups in (self.q_blocks, self.kv_blocks):
            owner = np.empty((self.ulysses, self.num_blocks), dtype=np.int64)
            for k, group in enumerate(groups):
                for i, blocks in enumerate(group):
                    owner[k, list(blocks)] = i
            out.append(owner)
        return out[0], out[1]

    @cached_property
    def _chunk_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """``(U, R)`` int64 tokens of every group's query chunk and key/value chunk on each ring
        rank (the last block may be partial), built once per plan from :attr:`_owners`."""
        U, R, nb, M = self.ulysses, self.ring, self.num_blocks, self.q_block
        short = M - (self.seq_len - (nb - 1) * M)  # tokens the last block lacks
        base = np.arange(U, dtype=np.int64)[:, None] * R
        out = []
        for owner in self._owners:  # blocks per chunk x M, less the last block's shortfall where it sits
            tokens = np.bincount((base + owner).reshape(-1), minlength=U * R).reshape(U, R) * M
            if short:
                tokens[np.arange(U), owner[:, -1]] -= short
            out.append(tokens)
        return out[0], out[1]

    def block_owner(self, kind: str) -> torch.Tensor:
        """``(U, NB)`` int64: ring rank that computes with each block; ``kind`` is "q" or "kv"."""
        return torch.from_numpy(self._owners[self._kind(kind)].copy())

    def exchange_counts(self, kind: str) -> torch.Tensor:
        """``(U, R, R)`` int64 ``C[k, j, g]``: blocks whose home is ring rank ``j`` and that ring
        rank ``g`` holds under the plan, in head group ``k`` (``kind`` "q" or "kv").

        Row ``j`` are the split sizes ring rank ``j`` sends in the block exchange; the diagonal
        stays in place. The identity plan has a diagonal ``C``.
        """
        return torch.from_numpy(self._exchange[self._kind(kind)].copy())

    @cached_property
    def _exchange(self) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`exchange_counts` of both kinds, ``(U, R, R)`` int64 each, built once per plan
        (the degree choice reads them for every candidate it predicts)."""
        home = _home(self.num_blocks, self.ring)
        U, R = self.ulysses, self.ring
        group = np.arange(U, dtype=np.int64)[:, None] * (R * R)  # one bincount for every group at once
        out = [np.bincount((group + home[None, :] * R + owner).reshape(-1), minlength=U * R * R).reshape(U, R, R)
               for owner in self._owners]
        return out[0], out[1]

    @cached_property
    def _sent(self) -> tuple[np.ndarray, np.ndarray]:
        """Per kind ``(U,)`` int64: the most blocks one ring rank sends away in each head group's
        block exchange (:attr:`_exchange`'s rows without the diagonal, largest sum), counted
        from the owners directly (the cost model reads it for every candidate it predicts)."""
        home = _home(self.num_blocks, self.ring)
        U, R = self.ulysses, self.ring
        cell = np.arange(U, dtype=np.int64)[:, None] * R + home  # (U, NB): (group, home rank) of every block
        out = []
        for owner in self._owners:
            away = owner != home
            out.append(np.bincount(cell[away], minlength=U * R).reshape(U, R).max(1) if away.any() else np.zeros(U, dtype=np.int64))
        return out[0], out[1]

    def moved_blocks(self, kind: str) -> int:
        """Blocks held away from their home, summed over head groups (``kind`` "q" or "kv"): the
        extra communication of the plan, in blocks of ``q_block`` tokens x (heads of the group)."""
        owner = self._owners[self._kind(kind)]
        return int((owner != _home(self.num_blocks, self.ring)[None, :]).sum())

    @staticmethod
    def _kind(kind: str) -> int:
        if kind not in ("q", "kv"):
            raise ValueError(f'kind must be "q" or "kv", got {kind!r}')
        return 0 if kind == "q" else 1

    def _need_tile_work(self) -> torch.Tensor:
        if self.tile_work is None:
            raise ValueError("this plan carries no tile_work; use plan.with_tile_work(mask_or_work) or imbalance_ratio(work, plan=plan)")
        return self.tile_work

    def rank_work(self) -> torch.Tensor:
        """``(U, R)`` int64: total work (computed score entries) of ring rank ``i`` in group ``k``."""
        return self._need_tile_work().sum(-1)

    def step_work(self) -> torch.Tensor:
        """``(U, R)`` int64: ring step ``t``'s cost in group ``k``, ``max_i W[k, i, (i + t) % R]``."""
        return _step_work(self._need_tile_work())

    def imbalance(self) -> float:
        """rho_s of the mask this plan was built for (see the module docstring)."""
        memo = self.__dict__
        if "_imbalance_memo" not in memo:  # tile_work is read-only: computed once per plan
            memo["_imbalance_memo"] = _rho(self._need_tile_work())
        return memo["_imbalance_memo"]

    def fingerprint(self) -> str:
        """Stable 16-hex-digit hash of the layout fields (not ``tile_work``): equal on every process
        that holds the same plan, different (with overwhelming probability) otherwise."""
        return self._fingerprint

    @cached_property
    def _fingerprint(self) -> str:
        parts = [self.ulysses, self.ring, self.heads, self.q_block, self.seq_len, *self.head_perm, *self.head_offsets]
        for groups in (self.q_blocks, self.kv_blocks):
            for group in groups:
                for blocks in group:
                    parts.append(len(blocks))
                    parts.extend(blocks)
        return hashlib.sha256(np.asarray(parts, dtype="<i8").tobytes()).hexdigest()[:16]

    # ------------------------------------------------------------------ printing

    def __repr__(self) -> str:
        heads = "/".join(str(c) for c in sorted(set(self.heads_per_rank)))
        rho = f", rho_s={self.imbalance():.4f}" if self.tile_work is not None else ""
        total = self.ulysses * self.num_blocks
        return (
            f"Plan(U={self.ulysses} x R={self.ring}, H={self.heads} ({heads} per rank), S={self.seq_len}, "
            f"{self.num_blocks} blocks of {self.q_block}{rho}, moved q={self.moved_blocks('q')}/{total} "
            f"kv={self.moved_blocks('kv')}/{total}, fingerprint={self.fingerprint()})"
        )

    def table(self) -> str:
        """A per-rank text table: heads, blocks, blocks moved in, work and share of the mean."""
        W = self.tile_work
        mean = float(W.sum()) / self.world if W is not None and float(W.sum()) > 0 else None
        home = _home(self.num_blocks, self.ring)
        qo, ko = self._owners
        lines = [f"{'rank':>5} {'k':>3} {'i':>4} {'heads':>5} {'q blk':>6} {'q in':>5} {'kv in':>6} {'work':>14} {'/mean':>7}"]
        for r in range(self.world):
            k, i = r % self.ulysses, r // self.ulysses
            q_in = int(((qo[k] == i) & (home != i)).sum())
            kv_in = int(((ko[k] == i) & (home != i)).sum())
            work = int(W[k, i].sum()) if W is not None else None
            share = f"{work / mean:7.3f}" if mean else f"{'-':>7}"
            lines.append(
                f"{r:>5} {k:>3} {i:>4} {self.heads_per_rank[k]:>5} {len(self.q_blocks[k][i]):>6} {q_in:>5} {kv_in:>6} "
                f"{work if work is not None else '-':>14} {share}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- work


@dataclass(frozen=True)
class _Work:
    """A validated work grid: ``cells`` is ``(H, NB, NB)`` (summed over batch), CPU numpy or device torch."""

    cells: Any
    q_block: int
    seq_len: int
    kv_tile: int | None  # None when built from a bare work tensor (mask kind unknown)
    batch: int
    cell_max: int  # an upper bound on every cell, so int32 sums are used only where they are exact

    @property
    def heads(self) -> int:
        return self.cells.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.cells.shape[1]


def _check_planning_mask(m: SparseMask, *, q_block: int | None, seq_len: int | None) -> None:
    """A mask the planner can take: self-attention, and agreeing with any q_block / seq_len given."""
    if m.seq_len_q != m.seq_len_kv:
        raise ValueError(f"planning needs self-attention masks; got seq_len_q={m.seq_len_q}, seq_len_kv={m.seq_len_kv}")
    for name, value, have in (("q_block", q_block, m.q_block), ("seq_len", seq_len, m.seq_len_q)):
        if value is not None and value != have:
            raise ValueError(f"{name}={value} disagrees with the mask's {name}={have}; leave it out for masks")


def _as_work(mask_or_work: object, *, q_block: int | None = None, seq_len: int | None = None) -> _Work:
    """Normalise the planner's input: a SparseMask (self-attention) or a ``(B, H, NB, NB)`` work tensor."""
    if isinstance(mask_or_work, _Work):
        return mask_or_work
    if isinstance(mask_or_work, WorkSummary):
        s = mask_or_work
        for name, value in (("q_block", q_block), ("seq_len", seq_len)):
            if value is not None and value != getattr(s, name):
                raise ValueError(f"{name}={value} disagrees with the summary's {name}={getattr(s, name)}; leave it out for summaries")
        return s
    if isinstance(mask_or_work, SparseMask):
        m = mask_or_work
        _check_planning_mask(m, q_block=q_block, seq_len=seq_len)
        work, q_block, seq_len, kv_tile = m.work(), m.q_block, m.seq_len_q, m.kv_tile
    elif isinstance(mask_or_work, torch.Tensor):
        work, kv_tile = mask_or_work, None
        if q_block is None or seq_len is None:
            raise TypeError("a work tensor needs q_block= and seq_len= (a SparseMask carries both)")
        check_positive_int("q_block", q_block)
        check_positive_int("seq_len", seq_len)
    else:
        raise TypeError(f"mask_or_work must be a dbsp.SparseMask or a work tensor or a WorkSummary, got {type(mask_or_work).__name__}")
    nb = _cdiv(seq_len, q_block)
    if work.dim() != 4 or work.shape[2] != nb or work.shape[3] != nb or work.shape[0] < 1 or work.shape[1] < 1:
        raise ValueError(
            f"work must have shape (B, H, NB, NB) with NB = ceil(seq_len / q_block) = ceil({seq_len} / {q_block}) = {nb}; "
            f"got {tuple(work.shape)}"
        )
    if work.is_floating_point() or work.dtype == torch.bool or work.is_complex():
        raise TypeError(f"work must be an integer tensor (computed score entries), got {work.dtype}")
    batch = work.shape[0]
    if kv_tile is not None:
        cell_max = q_block * q_block  # SparseMask.work() never exceeds one full block
    else:
        cell_max = _check_counts(work)
    cell_max *= batch
    if work.device.type == "cpu":
        cells = work.contiguous().numpy()
        if batch > 1:
            cells = cells.sum(0, dtype=np.int32 if cells.dtype == np.int32 and cell_max < 2**31 else np.int64)
        else:
            cells = cells[0]
    else:
        cells = work[0] if batch == 1 else work.sum(0, dtype=torch.int64)
    return _Work(cells, q_block, seq_len, kv_tile, batch, cell_max)


def _check_counts(work: torch.Tensor) -> int:
    """The largest cell of a raw work tensor; ``ValueError`` if any is negative. One pass."""
    if work.device.type == "cpu" and work.dtype.is_signed:
        # Viewed as unsigned, negative numbers turn huge: one max finds both the bound and negatives.
        a = work.contiguous().numpy()
        top = int(a.view(np.dtype(f"u{a.itemsize}")).max())
        negative = top >= 2 ** (8 * a.itemsize - 1)
    else:
        top = int(work.max())
        negative = bool(work.min() < 0) if work.dtype.is_signed else False
    if negative:
        raise ValueError(f"work must hold non-negative counts of computed score entries; found negative cells (min {int(work.min())})")
    return top


# ---------------------------------------------------------------------------------------- work summary

DEFAULT_SUMMARY_RING = 8
"""Ring degree a :class:`WorkSummary` aligns to by default: it then serves every ring degree that
divides 8 (the factorisations 8x1, 4x2, 2x4, 1x8 of 8 ranks)."""


DEFAULT_SUMMARY_UNITS = 160
"""Default units per side of a :class:`WorkSummary`: ``coarse = ceil(NB / 160)``. At Wan2.1-14B
720p (40 heads, 1182 blocks) that is ``coarse = 8``, 152 units per side and 3.7 MB of int32 (the
dense work tensor is 224 MB)."""


@lru_cache(maxsize=64)
def _unit_starts(num_blocks: int, ring: int, coarse: int) -> np.ndarray:
    """``(NU + 1,)`` int64 unit boundaries: every home chunk of ``ring`` cut every ``coarse`` blocks.

    ``num_blocks = 10, ring = 2, coarse = 2``: chunks ``[0, 5)`` and ``[5, 10)`` give units
    ``[0, 2) [2, 4) [4, 5) [5, 7) [7, 9) [9, 10)``, boundaries ``0 2 4 5 7 9 10``. Read-only and
    remembered: every step's summary of a run has the same units.
    """
    b = _bounds(num_blocks, ring)
    out = np.concatenate([np.arange(b[i], b[i + 1], coarse) for i in range(ring)] + [np.array([num_blocks])]).astype(np.int64)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=64)
def _unit_bounds(num_blocks: int, ring: int, coarse: int) -> tuple[int, ...]:
    """:func:`_unit_starts` as a tuple of ints (remembered likewise)."""
    return tuple(_unit_starts(num_blocks, ring, coarse).tolist())


@lru_cache(maxsize=64)
def _unit_chunks(num_blocks: int, summary_ring: int, coarse: int, ring: int) -> np.ndarray:
    """``(R + 1,)`` read-only: home chunk ``i`` of ``ring`` holds units ``chunk[i] .. chunk[i + 1] - 1``
    of the summary geometry ``(num_blocks, summary_ring, coarse)`` (``ring`` divides ``summary_ring``)."""
    starts = _unit_starts(num_blocks, summary_ring, coarse)
    out = np.searchsorted(_home(num_blocks, ring)[starts[:-1]], np.arange(ring + 1))
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False, repr=False)
class WorkSummary:
    """A compact, exact summary of a work tensor for planning: per-head work of *unit* pairs.

    The ``NB`` blocks are cut into *units*: every home chunk of ring degree ``ring`` (the blocks
    ``b`` with ``b * ring // NB == i``) is cut into runs of ``coarse`` consecutive blocks, the last
    run of a chunk possibly shorter. ``pooled[h, a, b]`` is the exact work of head ``h`` (summed
    over the batch) of the query blocks of unit ``a`` against the key blocks of unit ``b``::

        NB = 10, ring = 2, coarse = 2          blocks  0 1 | 2 3 | 4 | 5 6 | 7 8 | 9
                                               units     0     1    2    3     4    5
        chunk of ring rank 0 = units 0..2, of ring rank 1 = units 3..5

    What is exact and what is not:

    * exact: the tile matrix ``W[k, i, j]``, hence ``rho_s`` and the cost model's prediction, of
      every plan whose owners are constant on units (no unit split between ring ranks) and whose
      ring degree ``R`` has its home boundaries on unit boundaries (every ``R`` dividing ``ring``,
      and ``R = 1``). The identity plan and every plan built from a summary are such plans, so
      ``make_plan(summary, ...).imbalance()`` is the exact ``rho_s`` on the full work tensor.
      :func:`tile_work` / :func:`imbalance_ratio` on another plan raise ``ValueError``.
    * approximate: only the planner's *search*. From a summary it moves whole units of
      ``coarse`` blocks (the shorter last unit of each chunk stays home, so every ring rank keeps
      its block count), so its best plan can be a little less balanced than a block-level plan
      from the full work tensor. Per-head totals, and so the head-level plan, are exact.

    Build it with :func:`summarize_work` where the mask lives (GPU or CPU): only ``pooled``
    (a few MB) travels to the planner.

    Args:
        pooled: ``(H, NU, NU)`` integer CPU tensor (int32 or int64), non-negative.
        q_block: tokens per block.
        seq_len: S; ``NB = ceil(S / q_block)``.
        coarse: blocks per unit (``1 <= coarse <= NB // ring``).
        ring: the ring degree the units align to; the summary serves ring degrees dividing it.
        kv_tile: the mask's key tile (for the cost model's throughput curve), or ``None`` when
            unknown (built from a bare work tensor). Default: None.
        batch: B of the summarised work (the cost model's communicated bytes). Default: 1.

    Example (Wan2.1-14B 720p)::

        >>> s = summarize_work(mask)                                    # doctest: +SKIP
        >>> s
        WorkSummary(H=40, 1182 blocks of 64 in 152 units of <= 8 (ring 8), 3.7 MB)
        >>> plan = make_plan(s, ulysses=2, ring=4)
        >>> plan.imbalance() == imbalance_ratio(mask, ulysses=2, ring=4, plan=plan)
        True
    """

    pooled: torch.Tensor
    q_block: int
    seq_len: int
    coarse: int
    ring: int
    kv_tile: int | None = None
    batch: int = 1

    def __post_init__(self) -> None:
        for name in ("q_block", "seq_len", "coarse", "ring", "batch"):
            check_positive_int(name, getattr(self, name))
        if self.kv_tile is not None:
            check_positive_int("kv_tile", self.kv_tile)
        nb, R, c = self.num_blocks, self.ring, self.coarse
        _check_ring(R, nb)
        if c > nb // R:
            raise ValueError(
                f"coarse={c} is too large: the units must fit in the smallest home chunk of ring={R} "
                f"({nb // R} blocks of num_blocks={nb}); use coarse <= {nb // R}"
            )
        p = check_tensor("pooled", self.pooled)
        nu = len(self.unit_bounds) - 1
        if p.dim() != 3 or p.shape[0] < 1 or tuple(p.shape[1:]) != (nu, nu):
            raise ValueError(
                f"pooled must have shape (H, NU, NU) with NU = {nu} units (num_blocks={nb}, ring={R}, coarse={c}); "
                f"got {tuple(p.shape)}"
            )
        if p.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"pooled must be an int32 or int64 tensor, got {p.dtype}")
        if p.device.type != "cpu":
            raise ValueError(f"pooled must be a CPU tensor (the planner runs on the CPU), got device {p.device}")
        if p.numel() and int(p.min()) < 0:
            raise ValueError(f"pooled must hold non-negative work, found {int(p.min())}")

    @property
    def heads(self) -> int:
        """H."""
        return self.pooled.shape[0]

    @property
    def num_blocks(self) -> int:
        """NB = ceil(seq_len / q_block)."""
        return _cdiv(self.seq_len, self.q_block)

    @property
    def num_units(self) -> int:
        """NU, units per side."""
        return len(self.unit_bounds) - 1

    @cached_property
    def unit_bounds(self) -> tuple[int, ...]:
        """``NU + 1`` block ids: unit ``a`` holds blocks ``unit_bounds[a] .. unit_bounds[a + 1] - 1``."""
        return _unit_bounds(self.num_blocks, self.ring, self.coarse)

    @property
    def nbytes(self) -> int:
        """Bytes of ``pooled``."""
        return self.pooled.numel() * self.pooled.element_size()

    @cached_property
    def _cells(self) -> np.ndarray:
        return self.pooled.contiguous().numpy()

    @cached_property
    def _head_totals(self) -> np.ndarray:
        """``(H,)`` int64 work per head (:func:`summarize_work` presets it where the mask lives)."""
        return self._cells.reshape(self.heads, -1).sum(1, dtype=np.int64)

    @cached_property
    def _cell_bound(self) -> int:
        """An upper bound on every pooled cell (:func:`summarize_work` presets one without a pass),
        so head sums use int32 only where they provably fit."""
        return int(self.pooled.max()) if self.pooled.numel() else 0

    @cached_property
    def _starts(self) -> np.ndarray:
        return _unit_starts(self.num_blocks, self.ring, self.coarse)

    @cached_property
    def _ring_tiles(self) -> np.ndarray:
        """``(H, ring, ring)`` int64: every head's tiles with every unit at home at the summary's
        ring degree (one pass over ``pooled``); the tiles of any ``R`` dividing ``ring`` are
        their block sums (:func:`_summary_home_tiles`)."""
        return _chunk_tiles(self, self.ring)

    @cached_property
    def _all_heads(self) -> np.ndarray:
        """``(NU, NU)`` int64: every head's pooled work summed (:func:`summarize_work` presets it
        where the mask lives), the work of a head group of all heads (``U = 1``)."""
        out = self._cells.sum(0, dtype=np.int64)
        out.flags.writeable = False
        return out

    @cached_property
    def _unit_marginals(self) -> tuple[np.ndarray, np.ndarray]:
        """``((H, NU), (H, NU))`` int64: every head's work per query unit and per key unit."""
        a = self._cells
        return a.sum(2, dtype=np.int64), a.sum(1, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"WorkSummary(H={self.heads}, {self.num_blocks} blocks of {self.q_block} in {self.num_units} units of "
            f"<= {self.coarse} (ring {self.ring}), {self.nbytes / 1e6:.1f} MB)"
        )


def summarize_work(
    mask_or_work: "SparseMask | torch.Tensor",
    *,
    coarse: int | None = None,
    ring: int = DEFAULT_SUMMARY_RING,
    q_block: int | None = None,
    seq_len: int | None = None,
) -> WorkSummary:
    """The :class:`WorkSummary` of a mask or work tensor: per-head work pooled over units.

    Runs where the input lives: on a GPU mask or work tensor the pooling runs on the GPU and only
    the ``(H, NU, NU)`` result comes to the CPU. A GPU ``SparseMask`` is pooled straight from its
    index lists (work per entry, as :meth:`SparseMask.work` counts it), without building the
    ``(B, H, NB, NB)`` work tensor; a CPU mask goes through ``work()`` (int32, ``4 NB^2`` bytes
    per head), which is faster there. Exact integer sums; deterministic.

    Args:
        mask_or_work: a self-attention ``SparseMask`` or its ``work()`` tensor ``(B, H, NB, NB)``.
        coarse: blocks per unit, ``1 <= coarse <= NB // ring``; ``1`` keeps every block (exact
            planning at block level, no smaller than the work tensor). Default:
            ``ceil(NB / DEFAULT_SUMMARY_UNITS)`` capped at ``NB // ring``.
        ring: align units to the home chunks of this ring degree; the summary then serves every
            ring degree dividing it. Default: ``DEFAULT_SUMMARY_RING`` (8).
        q_block, seq_len: required with a work tensor; taken from a mask.

    Returns:
        A :class:`WorkSummary` on the CPU (int32 where every sum provably fits, else int64).

    Example (one head, 4 blocks, units of 2 blocks: ``0 + 1 + 4 + 5 = 10`` and so on)::

        >>> w = torch.arange(16, dtype=torch.int32).reshape(1, 1, 4, 4)
        >>> summarize_work(w, coarse=2, ring=2, q_block=64, seq_len=256).pooled.tolist()
        [[[10, 18], [42, 50]]]
    """
    if isinstance(mask_or_work, WorkSummary):
        raise TypeError("mask_or_work is already a WorkSummary; pass it to the planner directly")
    check_positive_int("ring", ring)
    # A device mask is pooled from its entries; a CPU mask goes through work() and the numpy
    # pooling (~4x faster there than a cost per entry pooled into units).
    from_entries = isinstance(mask_or_work, SparseMask) and mask_or_work.device.type != "cpu"
    if from_entries:
        m = mask_or_work
        _check_planning_mask(m, q_block=q_block, seq_len=seq_len)
        q_block, seq_len, kv_tile, batch = m.q_block, m.seq_len_q, m.kv_tile, m.batch
        nb = m.num_q_blocks
        cell_max = batch * q_block * q_block
    else:
        w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
        q_block, seq_len, kv_tile, batch, nb, cell_max = w.q_block, w.seq_len, w.kv_tile, w.batch, w.num_blocks, w.cell_max
    _check_ring(ring, nb)
    coarse = min(_cdiv(nb, DEFAULT_SUMMARY_UNITS), nb // ring) if coarse is None else check_positive_int("coarse", coarse)
    if coarse > nb // ring:
        raise ValueError(
            f"coarse={coarse} is too large: the units must fit in the smallest home chunk of ring={ring} "
            f"({nb // ring} blocks of num_blocks={nb}); use coarse <= {nb // ring}"
        )
    starts = _unit_starts(nb, ring, coarse)
    nu = len(starts) - 1
    unit = np.repeat(np.arange(nu), np.diff(starts))  # (NB,): unit of every block
    fits = coarse * coarse * cell_max < 2**31  # a unit pair sums at most coarse^2 cells
    totals = None  # (H,) per-head work, computed beside the pooling where cheap there
    chunk = _unit_chunks(nb, ring, coarse, ring).tolist()  # home chunks in units
    if from_entries:
        pooled, totals, extras = _pool_mask(mask_or_work, torch.from_numpy(unit), nu, chunk)
    elif isinstance(w.cells, np.ndarray):
        dt = np.int32 if fits and w.cells.dtype == np.int32 else np.int64
        runs = _runs(nb, ring, coarse)
        rows = _pool_rows(w.cells, runs, coarse, dt)  # (H, NB, NB) -> (H, NU, NB): the one full pass
        pooled = torch.from_numpy(_pool_cols(rows, runs, coarse, dt))  # -> (H, NU, NU)
        totals = pooled.sum((1, 2), dtype=torch.int64).numpy()
        extras = _pooled_extras(pooled, chunk)
    else:
        a, idx = w.cells, torch.from_numpy(unit).to(w.cells.device)
        acc = torch.int32 if fits and a.dtype == torch.int32 else torch.int64  # no widened copy of the work
        y = torch.zeros(w.heads, nb, nu, dtype=acc, device=a.device).index_add_(2, idx, a.to(acc))
        pooled = torch.zeros(w.heads, nu, nu, dtype=acc, device=a.device).index_add_(1, idx, y)
        totals = pooled.sum((1, 2), dtype=torch.int64).cpu().numpy()
        extras = _pooled_extras(pooled, chunk)
        pooled = pooled.cpu()
    pooled = pooled.to(torch.int32 if fits else torch.int64)
    out = WorkSummary(pooled.contiguous(), q_block=q_block, seq_len=seq_len, coarse=coarse, ring=ring, kv_tile=kv_tile, batch=batch)
    out.__dict__["_cell_bound"] = coarse * coarse * cell_max  # what a unit pair can hold, known without a pass
    out.__dict__["_head_totals"] = totals
    out.__dict__["_unit_marginals"], out.__dict__["_ring_tiles"], out.__dict__["_all_heads"] = extras[:2], extras[2], extras[3]
    extras[3].flags.writeable = False  # shared by every plan of the summary
    return out


def _pooled_extras(pooled: torch.Tensor, chunk: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the planner reads beside ``pooled`` ``(H, NU, NU)``, computed where it lives: ``((H,
    NU) work per query unit, (H, NU) per key unit, (H, ring, ring) home tiles, (NU, NU) every
    head's work summed)``, int64."""
    R = len(chunk) - 1
    y = torch.stack([pooled[:, chunk[i] : chunk[i + 1]].sum(1, dtype=torch.int64) for i in range(R)], 1)  # (H, R, NU)
    tiles = torch.stack([y[:, :, chunk[j] : chunk[j + 1]].sum(2) for j in range(R)], 2)
    return (pooled.sum(2, dtype=torch.int64).cpu().numpy(), y.sum(1).cpu().numpy(), tiles.cpu().numpy(),
            pooled.sum(0, dtype=torch.int64).cpu().numpy())


def _runs(num_blocks: int, ring: int, coarse: int) -> list[tuple[int, int, int]]:
    """Per home chunk ``[lo, hi)`` of ``ring``: ``(lo, mid, hi)`` with full units in ``[lo, mid)``
    and the chunk's shorter last unit (if any) in ``[mid, hi)``."""
    b = _bounds(num_blocks, ring).tolist()
    return [(lo, lo + (hi - lo) // coarse * coarse, hi) for lo, hi in zip(b[:-1], b[1:])]


def _pool_rows(a: np.ndarray, runs: list[tuple[int, int, int]], coarse: int, dtype) -> np.ndarray:
    """``(H, NB, X) -> (H, NU, X)``: rows summed over units. A reshape makes each chunk's full
    units one contiguous reduction (numpy's ``reduceat`` is ~8x slower on this shape)."""
    parts = []
    for lo, mid, hi in runs:
        parts.append(a[:, lo:mid].reshape(a.shape[0], (mid - lo) // coarse, coarse, a.shape[2]).sum(2, dtype=dtype))
        if mid < hi:
            parts.append(a[:, mid:hi].sum(1, dtype=dtype, keepdims=True))
    return np.concatenate(parts, 1)


def _pool_cols(a: np.ndarray, runs: list[tuple[int, int, int]], coarse: int, dtype) -> np.ndarray:
    """``(H, X, NB) -> (H, X, NU)``: columns summed over units, as ``coarse`` strided adds per chunk
    (summing a short innermost axis is slow in numpy)."""
    parts = []
    for lo, mid, hi in runs:
        acc = a[:, :, lo:mid:coarse].astype(dtype)
        for d in range(1, coarse):
            acc += a[:, :, lo + d : mid : coarse]
        parts.append(acc)
        if mid < hi:
            parts.append(a[:, :, mid:hi].sum(2, dtype=dtype, keepdims=True))
    return np.concatenate(parts, 2)


def _pool_mask(m: SparseMask, unit: torch.Tensor, nu: int, chunk: list[int]) -> tuple[torch.Tensor, np.ndarray, tuple]:
    """``(H, NU, NU)`` int64 CPU: a mask's work pooled over units, from its index lists (one pass),
    ``(H,)`` int64 per-head totals and :func:`_pooled_extras` (``chunk``: home chunks in units)."""
    H, mq = m.heads, m.num_q_blocks
    out = torch.zeros(H * nu * nu, dtype=torch.int64, device=m.device)
    if m.nnz:
        unit = unit.to(m.device)
        tiles = m.indices.to(torch.int64)
        rows = m._entry_rows()  # (b * H + h) * Mq + i
        cost = m._q_rows()[rows.remainder(mq)] * m._tile_keys()[tiles]  # query rows x keys of every entry
        head, qb = rows.div(mq, rounding_mode="floor").remainder(H), rows.remainder(mq)
        kb = tiles.div(m.q_block // m.kv_tile, rounding_mode="floor")
        out.index_add_(0, (head * nu + unit[qb]) * nu + unit[kb], cost)
    out = out.reshape(H, nu, nu)
    return out.cpu(), out.sum((1, 2)).cpu().numpy(), _pooled_extras(out, chunk)


def _bounds(num_blocks: int, ring: int) -> np.ndarray:
    """``(R + 1,)``: ring rank ``i`` is home to blocks ``bounds[i] .. bounds[i + 1] - 1``."""
    return np.searchsorted(_home(num_blocks, ring), np.arange(ring + 1))


def _acc_dtype(w: _Work, cells: int, heads: int = 1):
    """int32 when a sum of ``cells`` cells of ``heads`` heads provably fits, else int64."""
    return np.int32 if w.cells.dtype == np.int32 and cells * heads * w.cell_max < 2**31 else np.int64


_HOME_TILES_MAX_RING = 16
"""Pass 1 keeps per-head tiles of the contiguous layout up to this ring size ((H, R, R) ints; cheap
slices per head); longer rings get those tiles per head group from pass 2 instead."""


@dataclass(frozen=True)
class _Stats:
    """Pass 1 for ring degree ``R``: per-head marginals and, for short rings, per-head tiles of the
    contiguous layout."""

    rows: np.ndarray  # (H, NB) int64: work of each query block
    cols: np.ndarray | None  # (H, NB) int64: work of each key block; None for R = 1 (not needed)
    home_tiles: np.ndarray | None  # (H, R, R) int64: W of each head alone, blocks at home; None for long rings


def _stats(w: _Work, ring: int) -> _Stats:
    """Pass 1: one read of every cell (each head's slab is reduced twice while it sits in cache)."""
    a, H, nb = w.cells, w.heads, w.num_blocks
    b = _bounds(nb, ring)
    tiles = ring <= _HOME_TILES_MAX_RING
    if isinstance(a, np.ndarray):
        dt = _acc_dtype(w, nb)
        y = np.empty((H, nb, ring if tiles else 1), dtype=dt)
        cols = np.empty((H, nb), dtype=dt) if ring > 1 else None
        for h in range(H):
            x = a[h]
            if tiles:
                for j in range(ring):  # slices beat reduceat for few segments
                    x[:, b[j] : b[j + 1]].sum(1, dtype=dt, out=y[h, :, j])
            else:
                x.sum(1, dtype=dt, out=y[h, :, 0])
            if cols is not None:
                x.sum(0, dtype=dt, out=cols[h])
        y = y.astype(np.int64, copy=False)
        cols = None if cols is None else cols.astype(np.int64, copy=False)
    else:
        segments = [(b[j], b[j + 1]) for j in range(ring)] if tiles else [(0, nb)]
        y = torch.stack([a[:, :, lo:hi].sum(2, dtype=torch.int64) for lo, hi in segments], -1).cpu().numpy()
        cols = a.sum(1, dtype=torch.int64).cpu().numpy() if ring > 1 else None
    home_tiles = np.add.reduceat(y, b[:-1], axis=1) if tiles else None  # (H, R, R)
    return _Stats(rows=y.sum(2), cols=cols, home_tiles=home_tiles)


def _group_sum(w: _Work, heads: list[int]) -> np.ndarray:
    """Pass 2 for one head group: ``(NB, NB)`` the group's summed work, as a CPU array."""
    a = w.cells
    if isinstance(a, np.ndarray):
        if len(heads) == 1:  # a view; widened only for dtypes that would wrap when subtracted
            return a[heads[0]] if a.dtype in (np.int32, np.int64) else a[heads[0]].astype(np.int64)
        acc = a[heads[0]].astype(_acc_dtype(w, 1, len(heads)))
        for h in heads[1:]:
            acc += a[h]
        return acc
    return a.index_select(0, torch.as_tensor(heads, device=a.device)).sum(0, dtype=torch.int64).cpu().numpy()


def _onehot(owner: np.ndarray, ring: int) -> np.ndarray:
    """``(NB, R)`` float64 indicator of each block's owning ring rank."""
    out = np.zeros((owner.shape[0], ring))
    out[np.arange(owner.shape[0]), owner] = 1.0
    return out


_MATMUL_MAX_RING = 32
"""Owner reductions use a float64 one-hot product up to this ring size, a gather-and-reduce above."""


def _reduce_cols(A: np.ndarray, owner: np.ndarray, ring: int) -> np.ndarray:
    """``(NB, R)`` int64 ``Y[r, j]``: row ``r`` of ``A`` summed over the columns ring rank ``j`` owns.

    For short rings a float64 matrix product (every partial sum is an integer below 2^53, so it
    is exact; BLAS beats an integer gather-and-reduce by ~10x there); for long rings a gather
    and segment sums, whose cost does not grow with ``R``. Every rank owns at least one block.
    """
    if ring <= _MATMUL_MAX_RING:
        Af = A if A.dtype == np.float64 else A.astype(np.float64)
        return (Af @ _onehot(owner, ring)).astype(np.int64)
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(ring))
    A = A if bool((owner[1:] >= owner[:-1]).all()) else A[:, order]  # contiguous owners need no gather
    return np.add.reduceat(A, starts, axis=1, dtype=A.dtype if A.dtype == np.float64 else np.int64).astype(np.int64)


def _sum_groups(x: np.ndarray, groups: "list[list[int]]") -> np.ndarray:
    """``(len(groups), ...)``: ``x[g].sum(0)`` for every group ``g`` of ids (one gather and one
    ``reduceat``: a few times faster than a sum per group at 40 heads)."""
    if not all(groups):  # reduceat would return a row for an empty group
        return np.stack([x[g].sum(0) for g in groups])
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
    return np.add.reduceat(x[[h for g in groups for h in g]], starts, axis=0)


def _reduce_rows(A: np.ndarray, owner: np.ndarray, ring: int) -> np.ndarray:
    """``(R, ...)`` int64: the rows of ``A`` summed by owning ring rank (exact, as above)."""
    if ring <= _MATMUL_MAX_RING:
        Af = A if A.dtype == np.float64 else A.astype(np.float64)
        return (_onehot(owner, ring).T @ Af).astype(np.int64)
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(ring))
    A = A if bool((owner[1:] >= owner[:-1]).all()) else A[order]
    return np.add.reduceat(A, starts, axis=0, dtype=A.dtype if A.dtype == np.float64 else np.int64).astype(np.int64)


@lru_cache(maxsize=64)
def _step_index(R: int) -> np.ndarray:
    """``(R * R,)`` read-only: the flat index ``i * R + (i + t) % R`` of rank ``i``'s tile at ring step ``t``."""
    i = np.arange(R)
    flat = (i[:, None] * R + (i[:, None] + i[None, :]) % R).reshape(-1)
    flat.flags.writeable = False
    return flat


def _steps(W: np.ndarray) -> np.ndarray:
    """``(..., R, R)`` -> ``D[..., i, t] = W[..., i, (i + t) % R]``: rank ``i``'s work at ring step ``t``."""
    R = W.shape[-1]
    return np.take(W.reshape(W.shape[:-2] + (R * R,)), _step_index(R), axis=-1).reshape(W.shape)


def _step_work(W: torch.Tensor) -> torch.Tensor:
    """``(U, R)``: ``max_i W[k, i, (i + t) % R]`` for every group ``k`` and ring step ``t``."""
    return torch.from_numpy(_steps(W.numpy()).max(-2))


def _ring_time(W: np.ndarray) -> int:
    """``T = sum_t max_i W[i, (i + t) % R]`` of one group's ``(R, R)`` tile matrix."""
    return int(_steps(W).max(0).sum())


def _rho(W: "torch.Tensor | np.ndarray") -> float:
    """rho_s of ``(U, R, R)`` int64 tiles (module docstring), in integers but for the last division."""
    a = W.numpy() if isinstance(W, torch.Tensor) else W
    total = int(a.sum())
    if total == 0:
        return 1.0  # nothing to compute is perfectly balanced
    U, R, _ = a.shape
    return int(_steps(a).max(-2).sum(1).max()) * U * R / total


def _time_rho(C: np.ndarray) -> float:
    """rho_s of per-step times ``C[k, i, t]`` ``(U, R, R)`` (already in step order, unlike ``W``)."""
    total = float(C.sum())
    if total <= 0:
        return 1.0
    U, R, _ = C.shape
    return float(C.max(1).sum(1).max()) * U * R / total


def tile_work(mask_or_work: "SparseMask | torch.Tensor | WorkSummary", plan: Plan) -> torch.Tensor:
    """The ring tile matrix of a mask under a plan: ``(U, R, R)`` int64 ``W[k, i, j]``.

    ``W[k, i, j]`` sums the work of the heads of Ulysses group ``k``, query blocks
    ``plan.q_blocks[k][i]`` and key blocks ``plan.kv_blocks[k][j]``. One pass over the work (the
    head sums run on the work's device); everything the cost model and ``rho_s`` need.

    Args:
        mask_or_work: a ``SparseMask`` or its ``work()`` tensor ``(B, H, NB, NB)`` with
            ``NB == plan.num_blocks``, or a :class:`WorkSummary` (exact for plans that move
            whole units, e.g. plans built from it; ``ValueError`` for others).
        plan: the partition.

    Returns:
        ``(U, R, R)`` int64 CPU tensor.
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a dbsp Plan, got {type(plan).__name__}")
    w = _as_work(mask_or_work, q_block=plan.q_block, seq_len=plan.seq_len)
    _check_work_matches(w, plan)
    return torch.from_numpy(_tile_work(w, plan))


def _tile_work(w: _Work, plan: Plan) -> np.ndarray:
    """One pass over the work: ``(U, R, R)`` int64 tiles of ``plan``, computed where the work lives."""
    if isinstance(w, WorkSummary):
        return _summary_tile_work(w, plan)
    U, R, a = plan.ulysses, plan.ring, w.cells
    groups = [list(plan.head_group(k)) for k in range(U)]
    if R == 1:  # only per-head totals matter
        if isinstance(a, np.ndarray):
            totals = a.reshape(w.heads, -1).sum(1, dtype=_acc_dtype(w, w.num_blocks**2)).astype(np.int64)
        else:
            totals = a.sum((1, 2), dtype=torch.int64).cpu().numpy()
        return np.array([totals[g].sum() for g in groups], dtype=np.int64).reshape(U, 1, 1)
    q_owner, kv_owner = plan._owners
    out = np.empty((U, R, R), dtype=np.int64)
    for k, g in enumerate(groups):
        if isinstance(a, np.ndarray):
            out[k] = _reduce_rows(_reduce_cols(_group_sum(w, g), kv_owner[k], R), q_owner[k], R)
        else:
            # On the device: float64 sums of integers below 2^53 are exact; only (R, R) comes back.
            A = a.index_select(0, torch.as_tensor(g, device=a.device)).sum(0, dtype=torch.float64)
            oq, okv = (torch.from_numpy(_onehot(o[k], R)).to(a.device) for o in (q_owner, kv_owner))
            out[k] = (oq.T @ A @ okv).cpu().numpy().astype(np.int64)
    return out


def _check_aligned(s: WorkSummary, ring: int) -> None:
    """``ValueError`` unless ring degree ``ring``'s home chunks start on unit boundaries."""
    b = _bounds(s.num_blocks, ring)
    if not np.array_equal(s._starts[np.searchsorted(s._starts, b)], b):  # every chunk start is a unit start
        raise ValueError(
            f"ring={ring} does not fit the summary: its home chunks start at blocks {b[:-1].tolist()}, not all on unit "
            f"boundaries (summary built for ring={s.ring}, coarse={s.coarse}); summarize with ring= a multiple of {ring}"
        )


def _unit_owners(s: WorkSummary, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """``(U, NU)`` owning ring rank of every query unit and key unit; ``ValueError`` if the plan
    splits a unit (then its tile work is not determined by the summary)."""
    memo = plan.__dict__.setdefault("_unit_owner_memo", {})  # a PlanCache checks the same plan every step
    if s.unit_bounds in memo:
        return memo[s.unit_bounds]
    _check_aligned(s, plan.ring)
    first, sizes = s._starts[:-1], np.diff(s._starts)
    out = []
    for kind, owner in zip(("q", "kv"), plan._owners):
        unit_owner = owner[:, first]
        if not np.array_equal(np.repeat(unit_owner, sizes, axis=1), owner):
            raise ValueError(
                f"the plan splits a summary unit of {s.coarse} blocks between ring ranks ({kind} blocks): a summary gives "
                f"exact tiles only for plans that move whole units (as plans built from it do); pass the mask or work tensor"
            )
        out.append(unit_owner)
    memo[s.unit_bounds] = (out[0], out[1])
    return out[0], out[1]


def _summary_group_sum(s: WorkSummary, heads: list[int]) -> np.ndarray:
    """``(NU, NU)`` int32 or int64 (every head: the summary's read-only preset): the summed pooled
    work of some heads (exact)."""
    a = s._cells
    if len(heads) == a.shape[0] and len(set(heads)) == len(heads):  # every head: preset where the summary was built
        return s._all_heads
    # Same-type adds are ~3x faster than int32 into int64; int32 only where the sum provably fits.
    dt = np.int32 if a.dtype == np.int32 and len(heads) * s._cell_bound < 2**31 else np.int64
    acc = a[heads[0]].astype(dt)
    for h in heads[1:]:  # in place: no (len(heads), NU, NU) gather
        acc += a[h]
    return acc


def _chunk_tiles(s: WorkSummary, ring: int) -> np.ndarray:
    """``(H, R, R)`` int64: every head's tiles with every unit at home on ``ring`` ranks (one pass)."""
    chunk = _unit_chunks(s.num_blocks, s.ring, s.coarse, ring).tolist()  # home chunk i = units chunk[i] .. chunk[i + 1] - 1
    # Slice sums (few segments) beat reduceat; rows first, as adding whole rows vectorises:
    # (H, NU, NU) -> (H, R, NU) -> (H, R, R).
    y = np.stack([s._cells[:, chunk[i] : chunk[i + 1]].sum(1, dtype=np.int64) for i in range(ring)], 1)
    return np.stack([y[:, :, chunk[j] : chunk[j + 1]].sum(2) for j in range(ring)], 2)


def _summary_home_tiles(s: WorkSummary, ring: int) -> np.ndarray:
    """``(H, R, R)`` int64 home tiles of ``ring`` (aligned to the summary): block sums of the
    summary's cached ring tiles when ``ring`` divides its ring (home chunks nest:
    ``floor(b * R / NB) = floor(floor(b * ring / NB) / (ring / R))``), else one pass."""
    if ring == 1:  # one chunk: every head's total
        return np.asarray(s._head_totals, dtype=np.int64).reshape(-1, 1, 1)
    if s.ring % ring:
        return _chunk_tiles(s, ring)
    m = s.ring // ring
    return s._ring_tiles.reshape(s.heads, ring, m, ring, m).sum((2, 4))


def _summary_tile_work(s: WorkSummary, plan: Plan) -> np.ndarray:
    """``(U, R, R)`` int64 tiles of ``plan`` from a summary (exact; see :class:`WorkSummary`)."""
    U, R = plan.ulysses, plan.ring
    groups = [list(plan.head_group(k)) for k in range(U)]
    if R == 1:
        totals = s._head_totals
        return np.array([totals[g].sum() for g in groups], dtype=np.int64).reshape(U, 1, 1)
    q_owner, kv_owner = _unit_owners(s, plan)
    out = np.empty((U, R, R), dtype=np.int64)
    for k, g in enumerate(groups):
        out[k] = _reduce_rows(_reduce_cols(_summary_group_sum(s, g), kv_owner[k], R), q_owner[k], R)
    return out


def _check_work_matches(w: _Work, plan: Plan) -> None:
    if (w.heads, w.num_blocks, w.q_block, w.seq_len) != (plan.heads, plan.num_blocks, plan.q_block, plan.seq_len):
        raise ValueError(
            f"work is for heads={w.heads}, num_blocks={w.num_blocks} (q_block={w.q_block}, seq_len={w.seq_len}) "
            f"but the plan is for heads={plan.heads}, num_blocks={plan.num_blocks} "
            f"(q_block={plan.q_block}, seq_len={plan.seq_len})"
        )


def imbalance_ratio(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    ulysses: int,
    ring: int,
    plan: Plan | None = None,
    q_block: int | None = None,
    seq_len: int | None = None,
    world: int | None = None,
) -> float:
    """The sparse imbalance ratio rho_s of a mask on ``ulysses x ring`` ranks (module docstring).

    ``rho_s = max_k sum_t max_i W[k, i, (i + t) % R] / (sum W / (U * R))``: the slowest head group's
    ring time over the mean rank's work. 1 is perfect balance; a mask with no work gives 1.

    Args:
        mask_or_work: a ``SparseMask`` (self-attention) or a ``(B, H, NB, NB)`` integer work
            tensor from ``SparseMask.work()`` (summed over the batch here), or a
            :class:`WorkSummary` (exact for ring degrees dividing its ``ring`` and plans that
            move whole units; ``ValueError`` otherwise).
        ulysses, ring: the degrees U and R.
        plan: the partition to judge. Default: ``Plan.identity`` (heads and blocks contiguous,
            the unplanned USP layout; needs ``ulysses`` to divide the head count).
        q_block, seq_len: needed with a work tensor when ``plan`` is None (a plan or a mask
            carries them).
        world: the number of ranks, checked against ``ulysses * ring``. Default: not checked.

    Returns:
        rho_s >= 1.

    Example::

        >>> w = torch.tensor([[[[6, 2], [1, 1]]]], dtype=torch.int32)   # 1 head, 2 blocks
        >>> imbalance_ratio(w, ulysses=1, ring=2, q_block=64, seq_len=128)
        1.6
    """
    _check_degrees(ulysses, ring, world)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a dbsp Plan or None, got {type(plan).__name__}")
        if (plan.ulysses, plan.ring) != (ulysses, ring):
            raise ValueError(f"plan is for ulysses={plan.ulysses}, ring={plan.ring}, not ulysses={ulysses}, ring={ring}")
        q_block = plan.q_block if q_block is None else q_block
        seq_len = plan.seq_len if seq_len is None else seq_len
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    if plan is None:
        plan = Plan.identity(ulysses=ulysses, ring=ring, heads=w.heads, q_block=w.q_block, seq_len=w.seq_len)
    _check_work_matches(w, plan)
    return _rho(torch.from_numpy(_tile_work(w, plan)))


def _full_heads(w: "_Work | WorkSummary", totals: np.ndarray) -> np.ndarray:
    """``(H,)`` bool: the heads whose every tile is selected (total work ``B x S x S``), from their
    ``(H,)`` totals."""
    return np.asarray(totals) == w.batch * w.seq_len * w.seq_len


def _work_per_head(w: "_Work | WorkSummary") -> np.ndarray:
    """``(H,)`` int64 work of every head."""
    if isinstance(w, WorkSummary):
        return np.asarray(w._head_totals, dtype=np.int64)
    if isinstance(w.cells, np.ndarray):
        return w.cells.reshape(w.heads, -1).sum(1, dtype=np.int64)
    return w.cells.reshape(w.heads, -1).sum(1, dtype=torch.int64).cpu().numpy()


def dense_heads(mask_or_work: "SparseMask | torch.Tensor | WorkSummary", *, q_block: int | None = None,
                seq_len: int | None = None) -> tuple[int, ...]:
    """Ids of the heads whose every tile is selected in every batch: ``sparse_attention`` runs
    them through dense SDPA, at another rate than the sparse kernel (:class:`CostModel`).

    Exact for every input kind: a head is full when its total work equals ``B x S x S``. For a
    ``SparseMask`` this reads only the row counts.

    Args:
        mask_or_work: a self-attention ``SparseMask``, its ``work()`` tensor (then ``q_block`` and
            ``seq_len``) or a :class:`WorkSummary`.

    Returns:
        Sorted head ids.
    """
    if isinstance(mask_or_work, SparseMask):
        full = (mask_or_work.row_counts() == mask_or_work.num_kv_tiles).all(dim=2).all(dim=0)
        return tuple(int(h) for h in torch.nonzero(full).reshape(-1).tolist())
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    return _dense_heads_of(w)


def _dense_heads_of(w: "_Work | WorkSummary") -> tuple[int, ...]:
    return tuple(int(h) for h in np.nonzero(_full_heads(w, _work_per_head(w)))[0])
