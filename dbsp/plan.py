"""db-SP planning: the sparse imbalance ratio, head- and block-level balancing, degree choice, reuse.

Pure functions of a mask's ``work()`` and the parallel degrees; no communication. Every rank that
calls them with identical inputs gets the identical :class:`Plan` (integer arithmetic, fixed
tie-breaking), and :meth:`Plan.fingerprint` lets ranks check that cheaply.

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

The planner (:func:`make_plan`) reads the work tensor twice:

1. pass 1, statistics: per-head query-block and key-block marginals ``(H, NB)`` and, for rings
   up to 16, every head's tiles under the contiguous layout ``(H, R, R)``;
2. head level: longest-processing-time greedy over per-head totals with equal head counts, then
   pairwise swaps while they lower the heaviest group;
3. block level, per head group (pass 2: the group's summed work ``(NB, NB)``): db-SP's biased
   greedy over the group's marginals with reward ``R_b`` (a block stays on its home ring rank
   unless another rank is lighter by more than ``R_b`` times its weight), the contiguous layout
   and a round-robin deal are scored on the exact ring time; the cheapest good-enough one is
   refined by swapping query or key blocks on the exact objective. Every ring rank keeps its
   block count, so tensor shapes never change;
4. the result is never worse than the unplanned layout: of {unplanned, heads balanced only,
   heads and blocks balanced} the lowest ``rho_s`` wins, ties to fewer moved blocks.

With a cost model (``make_plan(cost_model=...)``, and always inside :func:`choose_degrees`) the
planner balances predicted *time* rather than tile entries: fully dense heads run on dense SDPA,
faster per entry, so each head's work is weighed by its rate (integers, so the arithmetic stays
exact), and a head group mixing dense and sparse heads is charged the mixed-call overhead. The
candidates of both weightings are scored by :meth:`CostModel.predict`; the least predicted time
wins. ``rho_s`` (``imbalance_ratio``, ``Plan.imbalance``) keeps its tile-entry meaning; the
time-based ratio of the same formula is ``Prediction.compute_imbalance``.

:class:`CostModel` turns a plan into predicted time (compute, all-to-all, block exchange, ring
transfers with overlap); :func:`choose_degrees` picks ``(U, R)`` with it; :class:`PlanCache`
keeps plans across denoising steps while the mask's ``rho_s`` under them stays low.

The home of block ``b`` is ``b * R // NB``: the ring rank holding it in the unplanned layout.

Planning fast: at Wan2.1-14B 720p the work tensor ``(H, NB, NB)`` is 224 MB, and one read of it
costs more than the whole plan. :func:`summarize_work` pools it, where the mask lives, into a
:class:`WorkSummary` of *units* (runs of ``coarse`` blocks inside each ring rank's home chunk):
``(H, NU, NU)``, 3.7 MB at the default. Every function above also takes a summary. Plans built
from it move whole units, so everything evaluated on them (``tile_work``, ``rho_s``, the cost
model, the :class:`PlanCache` check) is exact, not estimated; only the search is coarser.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._checks import check_positive_int, check_tensor
from .mask import SparseMask

__all__ = [
    "CostModel",
    "DegreeChoice",
    "Plan",
    "PlanCache",
    "Prediction",
    "WorkSummary",
    "choose_degrees",
    "imbalance_ratio",
    "make_plan",
    "score_degrees",
    "summarize_work",
    "tile_work",
]

DEFAULT_REWARD = 2.0
"""R_b used by db-SP's experiments (``papers/db-SP.md`` section 4)."""

DEFAULT_REUSE_THRESHOLD = 1.05
"""P_s: keep a plan while the new mask's rho_s under it stays at or below this (balanced plans
land at 1.00-1.03, so this lets a mask drift by a few percent of imbalance before re-planning)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _home(num_blocks: int, ring: int) -> np.ndarray:
    """``(NB,)`` int64: home ring rank of every block, ``b * R // NB``."""
    return np.arange(num_blocks, dtype=np.int64) * ring // num_blocks


def _check_reward(reward: object) -> float:
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise TypeError(f"reward must be a float >= 0 (R_b; math.inf keeps every block home), got {type(reward).__name__}")
    if not reward >= 0:  # also rejects NaN
        raise ValueError(f"reward must be >= 0 (R_b), got {reward}")
    return float(reward)


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
    """Block ids grouped by owning ring rank, ascending within each rank."""
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(ring + 1))
    ids = order.tolist()
    return tuple(tuple(ids[bounds[i] : bounds[i + 1]]) for i in range(ring))


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
        R = self.ring
        out = []
        for owner in self._owners:
            flat = (home[None, :] * R + owner).reshape(self.ulysses, -1)
            out.append(np.stack([np.bincount(f, minlength=R * R) for f in flat]).reshape(self.ulysses, R, R))
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
        return _rho(self._need_tile_work())

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


def _unit_starts(num_blocks: int, ring: int, coarse: int) -> np.ndarray:
    """``(NU + 1,)`` int64 unit boundaries: every home chunk of ``ring`` cut every ``coarse`` blocks.

    ``num_blocks = 10, ring = 2, coarse = 2``: chunks ``[0, 5)`` and ``[5, 10)`` give units
    ``[0, 2) [2, 4) [4, 5) [5, 7) [7, 9) [9, 10)``, boundaries ``0 2 4 5 7 9 10``.
    """
    b = _bounds(num_blocks, ring)
    return np.concatenate([np.arange(b[i], b[i + 1], coarse) for i in range(ring)] + [np.array([num_blocks])]).astype(np.int64)


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
        return tuple(_unit_starts(self.num_blocks, self.ring, self.coarse).tolist())

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
        return np.asarray(self.unit_bounds, dtype=np.int64)

    @cached_property
    def _ring_tiles(self) -> np.ndarray:
        """``(H, ring, ring)`` int64: every head's tiles with every unit at home at the summary's
        ring degree (one pass over ``pooled``); the tiles of any ``R`` dividing ``ring`` are
        their block sums (:func:`_summary_home_tiles`)."""
        return _chunk_tiles(self, self.ring)

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
    the ``(H, NU, NU)`` result comes to the CPU. A ``SparseMask`` is pooled straight from its
    index lists (work per entry, as :meth:`SparseMask.work` counts it), without building the
    ``(B, H, NB, NB)`` work tensor. Exact integer sums; deterministic.

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
    if isinstance(mask_or_work, SparseMask):
        m = mask_or_work
        _check_planning_mask(m, q_block=q_block, seq_len=seq_len)
        q_block, seq_len, kv_tile, batch = m.q_block, m.seq_len_q, m.kv_tile, m.batch
        nb = m.num_q_blocks
        cell_max = batch * q_block * q_block
    else:
        w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
        q_block, seq_len, kv_tile, batch, nb, cell_max = w.q_block, w.seq_len, None, w.batch, w.num_blocks, w.cell_max
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
    chunk = np.searchsorted(_home(nb, ring)[starts[:-1]], np.arange(ring + 1)).tolist()  # home chunks in units
    if isinstance(mask_or_work, SparseMask):
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
    out.__dict__["_unit_marginals"], out.__dict__["_ring_tiles"] = extras[:2], extras[2]
    return out


def _pooled_extras(pooled: torch.Tensor, chunk: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the degree choice's bound reads, computed where ``pooled`` ``(H, NU, NU)`` lives:
    ``((H, NU) work per query unit, (H, NU) per key unit, (H, ring, ring) home tiles)``, int64."""
    R = len(chunk) - 1
    y = torch.stack([pooled[:, chunk[i] : chunk[i + 1]].sum(1, dtype=torch.int64) for i in range(R)], 1)  # (H, R, NU)
    tiles = torch.stack([y[:, :, chunk[j] : chunk[j + 1]].sum(2) for j in range(R)], 2)
    return pooled.sum(2, dtype=torch.int64).cpu().numpy(), y.sum(1).cpu().numpy(), tiles.cpu().numpy()


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


def _home_tiles(w: _Work, st: _Stats, groups: list[list[int]], ring: int, sums: dict | None = None) -> np.ndarray:
    """``(U, R, R)``: the groups' tile matrices with every block at home. From pass 1 for short
    rings; else one pass over the groups' heads (``sums`` caches group sums by head tuple)."""
    if st.home_tiles is not None:
        return np.stack([st.home_tiles[g].sum(0) for g in groups])
    home = _home(w.num_blocks, ring)
    out = []
    for g in groups:
        A = sums[tuple(g)] if sums is not None and tuple(g) in sums else _group_sum(w, g)
        out.append(_reduce_rows(_reduce_cols(A, home, ring), home, ring))
    return np.stack(out)


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


def _reduce_rows(A: np.ndarray, owner: np.ndarray, ring: int) -> np.ndarray:
    """``(R, ...)`` int64: the rows of ``A`` summed by owning ring rank (exact, as above)."""
    if ring <= _MATMUL_MAX_RING:
        Af = A if A.dtype == np.float64 else A.astype(np.float64)
        return (_onehot(owner, ring).T @ Af).astype(np.int64)
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(ring))
    A = A if bool((owner[1:] >= owner[:-1]).all()) else A[order]
    return np.add.reduceat(A, starts, axis=0, dtype=A.dtype if A.dtype == np.float64 else np.int64).astype(np.int64)


def _steps(W: np.ndarray) -> np.ndarray:
    """``(..., R, R)`` -> ``D[..., i, t] = W[..., i, (i + t) % R]``: rank ``i``'s work at ring step ``t``."""
    R = W.shape[-1]
    i = np.arange(R)
    flat = (i[:, None] * R + (i[:, None] + i[None, :]) % R).reshape(-1)
    return np.take(W.reshape(W.shape[:-2] + (R * R,)), flat, axis=-1).reshape(W.shape)


def _step_work(W: torch.Tensor) -> torch.Tensor:
    """``(U, R)``: ``max_i W[k, i, (i + t) % R]`` for every group ``k`` and ring step ``t``."""
    return torch.from_numpy(_steps(W.numpy()).max(-2))


def _ring_time(W: np.ndarray) -> int:
    """``T = sum_t max_i W[i, (i + t) % R]`` of one group's ``(R, R)`` tile matrix."""
    return int(_steps(W).max(0).sum())


def _rho(W: torch.Tensor) -> float:
    total = int(W.sum())
    if total == 0:
        return 1.0  # nothing to compute is perfectly balanced
    U, R, _ = W.shape
    return int(_step_work(W).sum(1).max()) * U * R / total


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
    """``(NU, NU)`` int32 or int64: the summed pooled work of some heads (exact)."""
    a = s._cells
    # Same-type adds are ~3x faster than int32 into int64; int32 only where the sum provably fits.
    dt = np.int32 if a.dtype == np.int32 and len(heads) * s._cell_bound < 2**31 else np.int64
    acc = a[heads[0]].astype(dt)
    for h in heads[1:]:  # in place: no (len(heads), NU, NU) gather
        acc += a[h]
    return acc


def _chunk_tiles(s: WorkSummary, ring: int) -> np.ndarray:
    """``(H, R, R)`` int64: every head's tiles with every unit at home on ``ring`` ranks (one pass)."""
    home = _home(s.num_blocks, ring)[s._starts[:-1]]
    chunk = np.searchsorted(home, np.arange(ring + 1)).tolist()  # home chunk i = units chunk[i] .. chunk[i + 1] - 1
    # Slice sums (few segments) beat reduceat; rows first, as adding whole rows vectorises:
    # (H, NU, NU) -> (H, R, NU) -> (H, R, R).
    y = np.stack([s._cells[:, chunk[i] : chunk[i + 1]].sum(1, dtype=np.int64) for i in range(ring)], 1)
    return np.stack([y[:, :, chunk[j] : chunk[j + 1]].sum(2) for j in range(ring)], 2)


def _summary_home_tiles(s: WorkSummary, ring: int) -> np.ndarray:
    """``(H, R, R)`` int64 home tiles of ``ring`` (aligned to the summary): block sums of the
    summary's cached ring tiles when ``ring`` divides its ring (home chunks nest:
    ``floor(b * R / NB) = floor(floor(b * ring / NB) / (ring / R))``), else one pass."""
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


# ---------------------------------------------------------------------------------------- balancing


def _swap_pairs(groups: list[list[int]], a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every swap of a head ``x`` of group ``a`` with a head ``y`` of another group ``b``:
    ``(xs (X,), ys (Y,), bs (Y,))``, the ``y`` in the order (b, position in b)."""
    xs = np.asarray(groups[a], dtype=np.int64)
    others = [b for b in range(len(groups)) if b != a]
    ys = np.asarray([y for b in others for y in groups[b]], dtype=np.int64)
    bs = np.repeat(others, [len(groups[b]) for b in others])
    return xs, ys, bs


def _best_swap(new: np.ndarray, ok: np.ndarray, xs: np.ndarray, ys: np.ndarray, bs: np.ndarray) -> tuple[int, int, int] | None:
    """``(b, x, y)`` of the allowed (``ok``) swap with the strictly smallest ``new`` (both ``(Y, X)``),
    ties to (b, position of x, position of y); None if no swap is allowed."""
    if not ok.any():
        return None
    score = np.where(ok, new, np.iinfo(np.int64).max)
    yi, xi = np.nonzero(score == score.min())
    first = np.lexsort((yi, xi, bs[yi]))[0]
    return int(bs[yi[first]]), int(xs[xi[first]]), int(ys[yi[first]])


def _balance_heads(totals: list[int], counts: list[int], refine: bool) -> list[list[int]]:
    """:func:`_lpt_heads`, remembered within one degree choice (:func:`_remembered`): its bound
    and its plans balance the same totals."""
    return _remembered(("lpt", tuple(int(t) for t in totals), tuple(counts), bool(refine)),
                       lambda: _lpt_heads(totals, counts, refine))


_MEMO = threading.local()
"""``memo``: the head groups computed so far in this thread's running degree choice, or None."""


def _remembered(key: tuple, compute) -> list[list[int]]:
    """``compute()`` (head groups), looked up by ``key`` while a degree choice runs on this thread
    (:func:`_score`); outside one, computed afresh (a memo across calls would make repeated
    re-plans of one mask look cheaper than re-plans of new masks)."""
    memo = getattr(_MEMO, "memo", None)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = tuple(tuple(g) for g in compute())
    return [list(g) for g in memo[key]]


def _lpt_heads(totals: list[int], counts: list[int], refine: bool) -> list[list[int]]:
    """Head groups with the given counts and balanced total work.

    Longest processing time first: heads by decreasing work (ties: lower id) go to the least
    loaded group that still has room (ties: lower group). Then, with ``refine``, swap a head of
    the heaviest group with a lighter head of another group while that lowers the heaviest group
    and keeps the pair below its old load (each swap strictly improves the sorted load vector,
    so this terminates).
    """
    U = len(counts)
    groups: list[list[int]] = [[] for _ in range(U)]
    load = [0] * U
    for h in sorted(range(len(totals)), key=lambda h: (-totals[h], h)):
        k = -1  # the least loaded group with room, lowest index on ties
        for j in range(U):
            if len(groups[j]) < counts[j] and (k < 0 or load[j] < load[k]):
                k = j
        groups[k].append(h)
        load[k] += totals[h]
    if refine and U > 1:
        tot = np.asarray(totals, dtype=np.int64)
        for _ in range(4 * len(totals) * U):
            a = max(range(U), key=lambda k: (load[k], -k))
            # Every swap of x in group a with y in another group b at once, in the order
            # (b, position of x, position of y); the first strictly smallest pair maximum wins.
            xs, ys, bs = _swap_pairs(groups, a)
            d = tot[xs][None, :] - tot[ys][:, None]  # (Y, X)
            lb = np.asarray(load, dtype=np.int64)[bs][:, None]
            new = np.maximum(load[a] - d, lb + d)
            swap = _best_swap(new, (d > 0) & (new < load[a]), xs, ys, bs)
            if swap is None:
                break
            b, x, y = swap
            d = totals[x] - totals[y]
            groups[a][groups[a].index(x)] = y
            groups[b][groups[b].index(y)] = x
            load[a] -= d
            load[b] += d
    return [sorted(g) for g in groups]


_TIME_SCALE = 1024
"""Integer scale of the time weights (:class:`_Rates`): a dense head's weight is rounded to 1/1024."""


@dataclass(frozen=True)
class _Rates:
    """Time weights for planning with a cost model (``make_plan(cost_model=...)``).

    Fully dense heads run on dense SDPA at ``dense_tflops``, the others on the sparse kernel at the
    curve's rate, so one entry of a dense head costs ``sparse_rate / dense_rate`` of a sparse one.
    The planner weighs the work in integers, sparse heads times ``sparse`` and dense heads times
    ``dense_w`` (``dense_w / sparse`` ~ that ratio), so its exact integer arithmetic carries over
    and equal loads mean equal predicted kernel time. A dense head's work is known without
    reading it (every cell is ``batch x q tokens x kv tokens``), so weighing a group's summed work
    is one rank-1 correction, and so is undoing it for the plan's true ``tile_work``. ``mixed`` is
    the cost of one call that holds dense and sparse heads (``mixed_overhead_us``), in weighted entries.

    Example: 436 TFLOPS sparse, 628.5 dense: ``sparse = 1024``, ``dense_w = 710`` (0.694, reduced
    by their gcd to 512 : 355); a group of one dense and one sparse head of equal tile counts
    weighs ``355 + 512``, where tile counts say ``1 + 1``.
    """

    dense: np.ndarray  # (H,) bool: heads whose every tile is selected
    sparse: int
    dense_w: int
    mixed: int
    batch: int

    @property
    def weights(self) -> np.ndarray:
        """``(H,)`` int64 weight of each head."""
        return np.where(self.dense, self.dense_w, self.sparse).astype(np.int64)

    def stats(self, st: _Stats) -> _Stats:
        """Pass-1 statistics in weighted entries (all of them are per head)."""
        wt = self.weights
        return _Stats(
            rows=st.rows * wt[:, None],
            cols=None if st.cols is None else st.cols * wt[:, None],
            home_tiles=None if st.home_tiles is None else st.home_tiles * wt[:, None, None],
        )

    def group(self, A: np.ndarray, heads: Sequence[int], tokens: np.ndarray) -> np.ndarray:
        """A head group's summed work ``A`` ``(N, N)`` in weighted entries; ``tokens`` ``(N,)`` are the
        query (= key) tokens of each cell (block or unit)."""
        out = A.astype(np.int64) * self.sparse
        nd = int(self.dense[list(heads)].sum())
        if nd and self.dense_w != self.sparse:
            out += (self.dense_w - self.sparse) * nd * self.batch * np.outer(tokens, tokens)
        return out

    def unweigh(self, W: np.ndarray, groups: list[list[int]], q_owner: np.ndarray, kv_owner: np.ndarray,
                tokens: np.ndarray) -> np.ndarray:
        """The true ``(U, R, R)`` tile work of weighted tiles ``W``; owners ``(U, N)`` of the cells."""
        U, R, _ = W.shape
        out = W.astype(np.int64).copy()
        for k, g in enumerate(groups):
            nd = int(self.dense[list(g)].sum())
            if nd and self.dense_w != self.sparse:
                q = np.bincount(q_owner[k], weights=tokens, minlength=R).astype(np.int64)
                kv = np.bincount(kv_owner[k], weights=tokens, minlength=R).astype(np.int64)
                out[k] -= (self.dense_w - self.sparse) * nd * self.batch * np.outer(q, kv)
        assert not (out % self.sparse).any(), "weighted tile work must undo exactly"
        return out // self.sparse


def _rates_of(cost_model: "CostModel | None", w: "_Work | WorkSummary", totals: np.ndarray, head_dim: int) -> _Rates | None:
    """The time weights of ``w`` under ``cost_model`` (``totals``: ``(H,)`` work per head), or None
    where time and tile entries order plans alike (no cost model, no ``dense_tflops``, no dense
    heads and no mixed-call cost, or work too large for exact float64 sums at a useful scale)."""
    if cost_model is None or cost_model.dense_tflops is None:
        return None
    full = w.batch * w.seq_len * w.seq_len
    dense = _full_heads(w, totals)
    n, H = int(dense.sum()), len(dense)
    if n == 0 or n == H:  # one rate for every head, no call mixes kinds
        return None
    density = float(np.asarray(totals)[~dense].sum()) / (w.batch * (H - n) * w.seq_len * w.seq_len)
    fine = w.kv_tile is not None and w.kv_tile < w.q_block
    rate = cost_model.tflops(density=density, fine_grained=fine)
    # Weighted sums go through float64 products (_reduce_cols): keep them below 2^52.
    scale = min(_TIME_SCALE, 2**52 // (full * H))
    if scale < 16:
        return None
    dense_w = max(1, round(scale * rate / cost_model.dense_tflops))
    g = math.gcd(scale, dense_w)
    sparse, dense_w = scale // g, dense_w // g
    mixed = round(cost_model.mixed_overhead_us * 1e-6 * rate * 1e12 / (4.0 * head_dim) * sparse)
    if sparse == dense_w and mixed == 0:
        return None
    return _Rates(dense=dense, sparse=sparse, dense_w=dense_w, mixed=mixed, batch=w.batch)


def _block_tokens(num_blocks: int, q_block: int, seq_len: int) -> np.ndarray:
    """``(NB,)`` int64 tokens of every block (the last one may be partial)."""
    tok = np.full(num_blocks, q_block, dtype=np.int64)
    tok[-1] = seq_len - (num_blocks - 1) * q_block
    return tok


def _mixed_groups(groups: list[list[int]], dense: np.ndarray) -> int:
    return sum(0 < int(dense[g].sum()) < len(g) for g in groups)


def _full_heads(w: "_Work | WorkSummary", totals: np.ndarray) -> np.ndarray:
    """``(H,)`` bool: the heads whose every tile is selected (total work ``B x S x S``), from their
    ``(H,)`` totals."""
    return np.asarray(totals) == w.batch * w.seq_len * w.seq_len


def _dense_first(groups: list[list[int]], dense: np.ndarray | None) -> list[list[int]]:
    """Each group's heads with its dense heads first (ids ascending within each kind).

    The order inside a group changes no work, but the runtime reads a rank's dense heads as one
    strided view when they are consecutive and gathers them otherwise (``attention``'s mixed
    calls; :class:`CostModel` charges the two cases apart)."""
    if dense is None or not dense.any():
        return groups
    return [sorted(g, key=lambda h: (not dense[h], h)) for g in groups]


def _balance_heads_timed(totals: list[int], dense: np.ndarray, counts: list[int], refine: bool, penalty: int) -> list[list[int]]:
    """:func:`_lpt_heads_timed`, remembered within one degree choice (as :func:`_balance_heads`)."""
    key = ("timed", tuple(int(t) for t in totals), tuple(bool(d) for d in np.asarray(dense)), tuple(counts), bool(refine), int(penalty))
    return _remembered(key, lambda: _lpt_heads_timed(totals, dense, counts, refine, penalty))


def _lpt_heads_timed(totals: list[int], dense: np.ndarray, counts: list[int], refine: bool, penalty: int) -> list[list[int]]:
    """:func:`_balance_heads` on weighted totals where a group holding both dense and sparse heads
    also costs ``penalty`` (its mixed calls): groups of one kind are preferred where that does not
    cost balance.

    Two starts: LPT as in :func:`_balance_heads` (refined there), and LPT that puts each head in
    the group whose cost after placing it is least (a dense head joins dense heads when that is
    no dearer). With ``refine`` both are improved by swaps on the cost with the penalty; the start
    with the lower maximum cost wins (ties: fewer mixed groups, then the first start).
    """
    if penalty <= 0:
        return _balance_heads(totals, counts, refine)
    U = len(counts)
    tot = np.asarray(totals, dtype=np.int64)
    dn = np.asarray(dense, dtype=np.int64)
    cnt = np.asarray(counts, dtype=np.int64)

    def costs(groups):
        return [int(tot[g].sum()) + penalty * (0 < int(dn[g].sum()) < len(g)) for g in groups]

    plain = _balance_heads(totals, counts, refine)
    groups: list[list[int]] = [[] for _ in range(U)]
    load, nd = [0] * U, [0] * U
    for h in sorted(range(len(totals)), key=lambda h: (-totals[h], h)):
        def after(k: int) -> int:  # group k's cost with h in it (mixed: both kinds so far)
            return load[k] + totals[h] + penalty * (0 < nd[k] + int(dn[h]) < len(groups[k]) + 1)

        k = min((k for k in range(U) if len(groups[k]) < counts[k]), key=lambda k: (after(k), k))
        groups[k].append(h)
        load[k] += totals[h]
        nd[k] += int(dn[h])
    starts = [[list(g) for g in plain], groups]
    if refine and U > 1:
        for groups in starts:
            # Loads and dense counts kept up to date by each swap (group sizes never change).
            load = np.asarray([tot[g].sum() for g in groups], dtype=np.int64)
            nds = np.asarray([dn[g].sum() for g in groups], dtype=np.int64)
            for _ in range(4 * len(totals) * U):
                c = load + penalty * ((nds > 0) & (nds < cnt))  # costs(groups)
                a = int(np.lexsort((np.arange(U), -c))[0])  # heaviest group, lowest index on ties
                xs, ys, bs = _swap_pairs(groups, a)
                d = tot[xs][None, :] - tot[ys][:, None]  # (Y, X)
                dd = dn[xs][None, :] - dn[ys][:, None]
                na, nb_ = nds[a] - dd, nds[bs][:, None] + dd
                new_a = load[a] - d + penalty * ((na > 0) & (na < cnt[a]))
                new_b = load[bs][:, None] + d + penalty * ((nb_ > 0) & (nb_ < cnt[bs][:, None]))
                new = np.maximum(new_a, new_b)
                swap = _best_swap(new, new < c[a], xs, ys, bs)
                if swap is None:
                    break
                b, x, y = swap
                groups[a][groups[a].index(x)] = y
                groups[b][groups[b].index(y)] = x
                load[a] += tot[y] - tot[x]
                load[b] += tot[x] - tot[y]
                nds[a] += dn[y] - dn[x]
                nds[b] += dn[x] - dn[y]
    best = min(range(2), key=lambda n: (max(costs(starts[n])), _mixed_groups(starts[n], dense), n))
    return [sorted(g) for g in starts[best]]


def _biased_greedy(weights: np.ndarray, home: np.ndarray, caps: list[int], reward: float, movable: np.ndarray | None = None) -> np.ndarray:
    """db-SP's biased greedy: ``(NB,)`` owning ring rank of every block.

    Blocks by decreasing weight (ties: lower id). Each goes to the least loaded ring rank with room
    (ties: lower rank), unless its home has room and ``load[home] - reward * w <= that load``: a
    block stays home unless another rank is lighter by more than ``reward`` times its weight.
    ``reward = 0`` is plain greedy (home wins ties); ``reward = inf`` keeps every block home, as do
    zero-weight blocks (moving them costs traffic and cannot help balance). ``caps[i]`` blocks end
    on rank ``i``. With ``movable`` (bool ``(NB,)``), the other blocks stay home and count towards
    their home's load from the start, and ``caps`` counts movable blocks only.
    """
    R = len(caps)
    owner = home.copy()
    load = [0] * R
    if movable is not None:
        for g, w in zip(home[~movable].tolist(), weights[~movable].tolist()):
            load[g] += w
    cnt = [0] * R
    order = np.argsort(-weights, kind="stable")
    if movable is not None:
        order = order[movable[order]]
    out = []
    if R <= _GREEDY_SCAN_MAX_RING:
        # Few ranks: a scan of the open ranks beats a heap with its outdated entries.
        open_ = [g for g in range(R) if caps[g] > 0]
        by_load = load.__getitem__
        for w, h in zip(weights[order].tolist(), home[order].tolist()):
            g = min(open_, key=by_load)  # least loaded rank with room, lowest index on ties
            if cnt[h] < caps[h] and (w == 0 or load[h] - reward * w <= load[g]):
                g = h
            out.append(g)
            cnt[g] += 1
            load[g] += w
            if cnt[g] == caps[g]:
                open_.remove(g)
    else:
        heap = [(load[g], g) for g in range(R)]  # (load, rank) of ranks with room; outdated entries are skipped
        heapq.heapify(heap)
        for w, h in zip(weights[order].tolist(), home[order].tolist()):
            while heap[0][0] != load[heap[0][1]] or cnt[heap[0][1]] >= caps[heap[0][1]]:
                heapq.heappop(heap)
            lmin, g = heap[0]  # least loaded rank with room, lowest index on ties
            if cnt[h] < caps[h] and (w == 0 or load[h] - reward * w <= lmin):
                g = h
            out.append(g)
            cnt[g] += 1
            if w:
                load[g] += w
                heapq.heappush(heap, (load[g], g))
    owner[order] = out
    return owner


_GREEDY_SCAN_MAX_RING = 16
"""The biased greedy scans the open ranks up to this ring size and keeps a heap above it."""

_REFINE_MAX_RING = 32
"""Block refinement runs for rings up to this size: its candidate scan costs O(NB * R) per swap,
and longer rings hold only a few blocks per rank."""

_REFINE_MAX_SWAPS = 32
"""At most this many refinement swaps per head group (each costs ~1 ms at NB = 1182, R = 8)."""


def _rest_max(D: np.ndarray, top: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """Per candidate and step, the largest ``D[i, t]`` over ranks ``i`` other than ``e1[t]`` and
    ``e2[c, t]``: ``(C, R)``, ``-1`` where no rank is left. ``top`` holds each step's three
    heaviest ranks, heaviest first, which is enough to skip two."""
    R = D.shape[1]
    t = np.arange(R)
    rest = np.full(e2.shape, -1, dtype=np.int64)
    for s in range(top.shape[0] - 1, -1, -1):
        r = top[s]
        rest = np.where((r != e1)[None, :] & (r[None, :] != e2), D[r, t][None, :], rest)
    return rest


def _among(owner: np.ndarray, ranks: np.ndarray, R: int) -> np.ndarray:
    """``np.isin(owner, ranks)`` for owners in ``[0, R)``, by a lookup table (a few times faster)."""
    table = np.zeros(R, dtype=bool)
    table[ranks] = True
    return table[owner]


def _refine(
    A: np.ndarray,
    Af: np.ndarray,
    q_owner: np.ndarray,
    kv_owner: np.ndarray,
    home: np.ndarray,
    R: int,
    *,
    target: float,
    max_swaps: int,
    candidates: int = 8,
    partners: int = 2,
    movable: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local search on one head group's exact ring time ``T = sum_t max_i W[i, (i + t) % R]``.

    ``A`` is the group's ``(NB, NB)`` work (``Af`` the same as float64). The search keeps ``Y =
    A`` summed over each ring rank's key blocks ``(NB, R)`` and ``Z = A`` summed over each rank's
    query blocks ``(R, NB)``, so a swap's effect on ``W`` is exact: moving query block ``r`` from
    rank ``a`` to ``b`` moves ``Y[r]`` from row ``a`` of ``W`` to row ``b``; moving key block
    ``c`` from ``j`` to ``j'`` moves ``Z[:, c]`` from column ``j`` to ``j'``. Each round finds the
    rank (query side) and the key rank (key side) that stand most above the step means where
    they set a step's maximum, takes their ``candidates`` blocks that weigh most on those steps,
    scores the swap of each with every block of the ``partners`` lightest other ranks at once,
    and applies the single best strict improvement (ties: the swap that brings more blocks
    home). Swaps keep every rank's block count. Stops at ``T <= target * sum(W) / R``, after
    ``max_swaps`` swaps, or when no swap helps. With ``movable`` (bool ``(NB,)``) only those
    blocks are swapped (summary units of equal size, so block counts stay).

    Returns:
        ``(q_owner, kv_owner, W)``: new owners ``(NB,)`` and the exact ``(R, R)`` tile matrix.
    """
    qo, ko = q_owner.copy(), kv_owner.copy()
    Y = _reduce_cols(Af, ko, R)
    Z = _reduce_rows(Af, qo, R)
    W = _reduce_rows(Y, qo, R)
    ii = np.arange(R)
    cols = (ii[:, None] + ii[None, :]) % R  # cols[i, t] = (i + t) % R: the key rank rank i meets at step t
    meet = (ii[:, None] - ii[None, :]) % R  # meet[j, t] = the rank that meets key rank j at step t
    goal = target * int(W.sum()) / R
    mov = np.ones(qo.shape[0], dtype=bool) if movable is None else movable
    for _ in range(max_swaps):
        D = W[ii[:, None], cols]  # (R, R): D[i, t] = rank i's work at ring step t
        peak = D.max(0)
        T = int(peak.sum())
        if T <= goal:
            break
        arg = D.argmax(0)
        excess = peak - D.mean(0)
        top = np.argsort(-D, axis=0, kind="stable")[:3]
        best = []  # (new T, -homes, kind, x, o)

        # Query side: swap one of rank a's heavy query blocks with any other rank's block.
        a = int(np.bincount(arg, weights=excess, minlength=R).argmax())
        light = np.argsort(np.where(ii == a, np.iinfo(np.int64).max, W.sum(1)), kind="stable")[:partners]
        mine, others = np.nonzero((qo == a) & mov)[0], np.nonzero(_among(qo, light, R) & mov)[0]
        weight = Y[mine][:, cols[a, arg == a]].sum(1)
        xs = mine[np.argsort(-weight, kind="stable")[:candidates]]
        bs = qo[others]
        cb = cols[bs]  # (O, R): the key rank that rank b meets at step t
        new_a = D[a] - Y[xs][:, None, cols[a]] + Y[others][None, :, cols[a]]  # (X, O, R)
        new_b = D[bs][None] + Y[xs][:, cb] - Y[others[:, None], cb][None]
        rest = _rest_max(D, top, np.full(R, a), np.broadcast_to(bs[:, None], cb.shape))
        new_T = np.maximum(np.maximum(new_a, new_b), rest[None]).sum(-1)
        homes = (home[xs][:, None] == bs[None, :]).astype(np.int64) + (home[others] == a)[None, :]
        if new_T.size:
            xi, oi = divmod(int(np.argmin(new_T * 3 - homes)), len(others))
            best.append((int(new_T[xi, oi]), -int(homes[xi, oi]), 0, int(xs[xi]), int(others[oi])))

        # Key side: swap one of key rank j's heavy key blocks with any other key rank's block.
        j = int(np.bincount((arg + ii) % R, weights=excess, minlength=R).argmax())
        light = np.argsort(np.where(ii == j, np.iinfo(np.int64).max, W.sum(0)), kind="stable")[:partners]
        mine, others = np.nonzero((ko == j) & mov)[0], np.nonzero(_among(ko, light, R) & mov)[0]
        steps = np.nonzero((arg + ii) % R == j)[0]
        weight = Z[meet[j, steps]][:, mine].sum(0)
        xs = mine[np.argsort(-weight, kind="stable")[:candidates]]
        js = ko[others]
        p = meet[j]  # (R,): rank meeting key rank j at step t
        q = meet[js]  # (O, R): rank meeting key rank j' at step t
        new_p = D[p, ii] - Z[p][:, xs].T[:, None, :] + Z[p][:, others].T[None]  # (X, O, R)
        new_q = (D[q, ii[None, :]] - Z[q, others[:, None]])[None] + Z[q[None], xs[:, None, None]]
        rest = _rest_max(D, top, p, q)
        new_T = np.maximum(np.maximum(new_p, new_q), rest[None]).sum(-1)
        homes = (home[xs][:, None] == js[None, :]).astype(np.int64) + (home[others] == j)[None, :]
        if new_T.size:
            xi, oi = divmod(int(np.argmin(new_T * 3 - homes)), len(others))
            best.append((int(new_T[xi, oi]), -int(homes[xi, oi]), 1, int(xs[xi]), int(others[oi])))

        if not best:
            break
        new, _, kind, x, o = min(best)
        if new >= T:
            break
        if kind == 0:  # query block x: a -> b, o: b -> a
            a, b = int(qo[x]), int(qo[o])
            W[a] += Y[o] - Y[x]
            W[b] += Y[x] - Y[o]
            Z[a] += A[o] - A[x]
            Z[b] += A[x] - A[o]
            qo[x], qo[o] = b, a
        else:  # key block x: j -> j2, o: j2 -> j
            j, j2 = int(ko[x]), int(ko[o])
            W[:, j] += Z[:, o] - Z[:, x]
            W[:, j2] += Z[:, x] - Z[:, o]
            Y[:, j] += A[:, o] - A[:, x]
            Y[:, j2] += A[:, x] - A[:, o]
            ko[x], ko[o] = j2, j
    return qo, ko, W


def _round_robin(caps: list[int]) -> np.ndarray:
    """Blocks dealt in order to ring ranks 0, 1, ..., R - 1, 0, ... (skipping full ranks): the
    layout that balances masks whose work depends mostly on ``r - c`` (local windows, bands)."""
    R, nb = len(caps), sum(caps)
    owner = np.empty(nb, dtype=np.int64)
    cnt, g = [0] * R, 0
    for b in range(nb):
        while cnt[g] >= caps[g]:
            g = (g + 1) % R
        owner[b] = g
        cnt[g] += 1
        g = (g + 1) % R
    return owner


def _balance_blocks(
    group_sum,
    rows: np.ndarray | None,
    cols: np.ndarray | None,
    home_W: np.ndarray,
    home: np.ndarray,
    caps: list[int],
    reward: float,
    refine: bool,
    target: float,
    movable: np.ndarray | None = None,
    early=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block layout of one head group: ``(q_owner, kv_owner, W)``.

    ``rows``/``cols`` are the group's ``(NB,)`` marginals (``None``: from ``group_sum()``),
    ``home_W`` its tiles with every block at home, and ``group_sum()`` returns its ``(NB, NB)``
    work (pass 2, only read when needed). The "blocks" may be summary units: then only the
    ``movable`` ones (all of equal size) move and ``caps`` counts movable units per rank.
    If the contiguous layout is within ``target`` of the mean (or ``reward`` is infinite) it is
    kept. Otherwise marginal balancing, which ignores where the work sits inside ``W``, is not
    trusted blindly: the biased greedy, the contiguous layout and the round-robin deal are scored
    on the exact ring time; among those within ``target`` of the mean the one that moves fewest
    blocks wins, else the fastest; then :func:`_refine`.
    """
    R = len(caps)
    goal = target * int(home_W.sum()) / R
    if reward == math.inf or _ring_time(home_W) <= goal:
        return home, home, home_W
    A = group_sum()
    Af = A.astype(np.float64)
    rows = A.sum(1) if rows is None else rows
    cols = A.sum(0) if cols is None else cols
    if movable is None:
        rr = _round_robin(caps)
    else:
        rr = home.copy()
        rr[movable] = _round_robin(caps)
    starts = [(home, home, home_W)]
    for qo, ko in ((_biased_greedy(rows, home, caps, reward, movable), _biased_greedy(cols, home, caps, reward, movable)), (rr, rr)):
        starts.append((qo, ko, _reduce_rows(_reduce_cols(Af, ko, R), qo, R)))
    scored = [(_ring_time(Wk), int((qo != home).sum() + (ko != home).sum()), n) for n, (qo, ko, Wk) in enumerate(starts)]
    good = [s for s in scored if s[0] <= goal]
    _, _, n = min(good, key=lambda s: (s[1], s[0], s[2])) if good else min(scored)
    qo, ko, Wk = starts[n]
    if refine and R <= _REFINE_MAX_RING and _ring_time(Wk) > goal:
        if early is not None:
            early(qo, ko, _REFINE_MAX_SWAPS)
        qo, ko, Wk = _refine(A, Af, qo, ko, home, R, target=target, max_swaps=_REFINE_MAX_SWAPS, movable=movable)
    return qo, ko, Wk


def make_plan(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    ulysses: int,
    ring: int,
    reward: float = DEFAULT_REWARD,
    q_block: int | None = None,
    seq_len: int | None = None,
    balance_heads: bool = True,
    balance_blocks: bool = True,
    per_group_blocks: bool = True,
    uneven_heads: bool = False,
    refine: bool = True,
    refine_target: float = 1.01,
    world: int | None = None,
    cost_model: "CostModel | None" = None,
    head_dim: int = 128,
    element_bytes: int = 2,
) -> Plan:
    """The db-SP plan of a mask on ``ulysses x ring`` ranks (module docstring for the algorithm).

    The block step on a picture: R = 2, one head group, 4 query blocks of weights
    ``[8, 6, 1, 1]``; blocks 0, 1 live on ring rank 0 and blocks 2, 3 on rank 1::

        contiguous:   rank 0 = {0, 1} -> 14    rank 1 = {2, 3} -> 2
        R_b = 0:      0 -> r0 (8); 1 -> r1, lighter (6); 2 stays home, a tie (7); 3 -> r0, home full
                      rank 0 = {0, 3} -> 9     rank 1 = {1, 2} -> 7     2 blocks moved
        R_b = 2:      1 stays home: rank 1 is lighter by 8, not by more than 2 x 6 = 12
                      rank 0 = {0, 1} -> 14    rank 1 = {2, 3} -> 2     nothing moved

    Balancing marginals ignores where the work sits inside the ``W`` matrix (the greedy can
    make a local-window mask worse), so per head group the greedy, the contiguous layout and a
    round-robin deal are scored on the exact ring time; the cheapest good-enough one (or else the
    best) is refined by block swaps on the exact objective. Finally the plan is never worse than
    the unplanned layout: if balancing heads only, or nothing, gives an equal or lower
    ``rho_s``, that layout is returned (it moves fewer blocks).

    Args:
        mask_or_work: a ``SparseMask`` (self-attention) or its ``work()`` tensor
            ``(B, H, NB, NB)``; summed over the batch. Or a :class:`WorkSummary`
            (:func:`summarize_work`): the plan then moves whole units of ``coarse`` blocks, and
            its ``tile_work`` and ``imbalance()`` are still exact for the full work; ``ring`` must
            divide the summary's ``ring``.
        ulysses: U, must divide the head count (see ``uneven_heads``).
        ring: R, at most the number of blocks.
        reward: R_b >= 0, the home bonus of the biased greedy; ``0`` is plain greedy (best
            marginal balance, moves most blocks), ``math.inf`` keeps every block home. It shapes
            the greedy only: the exact-objective stages (round-robin start, swaps) may move
            other blocks when that is what balances (never with ``math.inf``), and
            :func:`choose_degrees` weighs every move against its exchange time. Default: 2.0 (db-SP).
        q_block, seq_len: required with a work tensor; taken from a mask.
        balance_heads: head-level LPT (else heads stay contiguous). Default: True.
        balance_blocks: block-level balancing (else blocks stay contiguous). Default: True.
        per_group_blocks: a block plan per Ulysses head group, from that group's own statistics
            (db-SP's code shares one plan over all heads; with False the greedy's shared plan is
            used as is, without refinement). Default: True.
        uneven_heads: allow ``H % U != 0``: ranks get ``H // U`` or ``H // U + 1`` heads, balanced
            by work. Needs runtime support for uneven all-to-all splits. Default: False.
        refine: head swaps after LPT, and block swaps on the exact objective (rings up to 32)
            after the block greedy. Default: True.
        refine_target: a group's block layout is good enough once its ring time is within
            this factor of its mean rank work: the start that moves fewest blocks among those
            that reach it is kept, and refinement stops there. Default: 1.01.
        world: the number of ranks, checked against ``ulysses * ring``. Default: not checked.
        cost_model: balance predicted *time* instead of tile entries. Fully dense heads run on
            dense SDPA at ``dense_tflops``, faster per entry than the sparse kernel, so the
            planner weighs each head's work by its rate (dense heads by ``sparse rate / dense
            rate``, in integers) and, at the head level, charges a group that mixes dense and
            sparse heads its ``mixed_overhead_us`` per call (groups of one kind are preferred
            where balance allows). The candidates of both weightings (time and tile entries) are
            then scored by :meth:`CostModel.predict` and the least predicted time wins (ties:
            fewer moved blocks), so the plan is never slower, by the model, than the tile-based
            one. Planning costs up to twice as much where the mask has dense heads. ``None``:
            tile entries, the rule above. Default: None.
        head_dim, element_bytes: for the cost model (its per-entry time and communicated bytes).
            Defaults: 128, 2.

    Returns:
        A :class:`Plan` with ``tile_work`` filled, so ``plan.imbalance()`` is its rho_s (tile
        entries, also with a cost model; the predicted time's ratio is
        ``cost_model.predict(plan, ...).compute_imbalance``).

    Example::

        >>> plan = make_plan(mask, ulysses=2, ring=4)                    # doctest: +SKIP
        >>> imbalance_ratio(mask, ulysses=2, ring=4), plan.imbalance()
        (1.36, 1.007)
    """
    _check_degrees(ulysses, ring, world)
    reward = _check_reward(reward)
    if isinstance(refine_target, bool) or not isinstance(refine_target, (int, float)) or not refine_target >= 1.0:
        raise ValueError(f"refine_target must be a number >= 1.0, got {refine_target!r}")
    if cost_model is not None:
        if not isinstance(cost_model, CostModel):
            raise TypeError(f"cost_model must be a dbsp CostModel or None, got {type(cost_model).__name__}")
        check_positive_int("head_dim", head_dim)
        check_positive_int("element_bytes", element_bytes)
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    return _plan_from(w, ulysses=ulysses, ring=ring, reward=reward, balance_heads=balance_heads,
                      balance_blocks=balance_blocks, per_group_blocks=per_group_blocks, uneven_heads=uneven_heads,
                      refine=refine, refine_target=refine_target, cost_model=cost_model, head_dim=head_dim,
                      element_bytes=element_bytes)


def _plan_from(w: _Work, *, ulysses: int, ring: int, cost_model: "CostModel | None" = None, head_dim: int = 128,
               element_bytes: int = 2, **options: Any) -> Plan:
    """The planner's choice among :func:`_layouts`: the lowest ring time, ties to fewer moves. With a
    cost model, among the candidates of both weightings (:func:`_timed_layouts`): the least
    predicted time, ties to fewer moves, then to the tile-weighted candidate."""
    if cost_model is None:
        return min(_layouts(w, ulysses=ulysses, ring=ring, **options), key=_ring_key)
    layouts, dense = _timed_layouts(w, ulysses=ulysses, ring=ring, cost_model=cost_model, head_dim=head_dim, **options)
    predict = _predictor(cost_model, w, head_dim=head_dim, element_bytes=element_bytes, dense=dense)
    return min(layouts, key=lambda p: (predict(p).total_ms, _moved(p)))


def _head_totals(w: "_Work | WorkSummary", st: _Stats | None) -> np.ndarray:
    """``(H,)`` int64 work per head: a summary's, or from pass-1 statistics."""
    return w._head_totals if isinstance(w, WorkSummary) else st.rows.sum(1)


def _timed_layouts(w: "_Work | WorkSummary", *, ulysses: int, ring: int, cost_model: "CostModel", head_dim: int,
                   stats: _Stats | None = None, **options: Any) -> tuple[list[Plan], tuple[int, ...]]:
    """``(candidates, dense heads)``: :func:`_layouts` on tile entries, then, where time and tiles
    differ (:func:`_rates_of`), on time-weighted work; pass 1 is shared."""
    if not isinstance(w, WorkSummary) and stats is None:
        stats = _stats(w, ring)
    totals = _head_totals(w, stats)
    dense = tuple(int(h) for h in np.nonzero(_full_heads(w, totals))[0])
    layouts = _layouts(w, ulysses=ulysses, ring=ring, stats=stats, **options)
    rates = _rates_of(cost_model, w, totals, head_dim)
    if rates is not None:
        layouts += _layouts(w, ulysses=ulysses, ring=ring, stats=stats, rates=rates, **options)
    return layouts, dense


def _layouts(
    w: _Work,
    *,
    ulysses: int,
    ring: int,
    reward: float = DEFAULT_REWARD,
    balance_heads: bool = True,
    balance_blocks: bool = True,
    per_group_blocks: bool = True,
    uneven_heads: bool = False,
    refine: bool = True,
    refine_target: float = 1.01,
    stats: _Stats | None = None,
    rates: _Rates | None = None,
    prune_for=None,
) -> list[Plan]:
    """The candidate plans, fewest moved blocks first: the unplanned layout (contiguous heads,
    blocks at home), balanced heads with blocks at home, and (with ``balance_blocks``) balanced
    heads and blocks. Each carries its exact ``tile_work``. Two passes over the work.

    With ``rates`` the balancing runs on time-weighted work (:class:`_Rates`), heads with the
    mixed-call cost (:func:`_balance_heads_timed`); ``tile_work`` stays the true tile work.

    ``prune_for`` (summaries only; a degree choice): group set -> :func:`_prune_moves`' test,
    which stops the block balancing (raises :class:`_Pruned`) once the candidate cannot win."""
    if isinstance(w, WorkSummary):
        prune = None if prune_for is None else prune_for(1 if rates is None else 2)
        return _summary_layouts(w, ulysses=ulysses, ring=ring, reward=reward, balance_heads=balance_heads,
                                balance_blocks=balance_blocks, per_group_blocks=per_group_blocks,
                                uneven_heads=uneven_heads, refine=refine, refine_target=refine_target, rates=rates,
                                prune=prune)
    if prune_for is not None:
        raise TypeError("prune_for is for summaries only")
    H, nb, U, R = w.heads, w.num_blocks, ulysses, ring
    counts = _head_counts(H, U, uneven_heads)
    _check_ring(R, nb)
    st = _stats(w, R) if stats is None else stats  # pass 1
    if rates is not None:
        st = rates.stats(st)
    off = np.cumsum([0] + counts).tolist()
    contiguous = [list(range(off[k], off[k + 1])) for k in range(U)]
    if not balance_heads:
        groups = contiguous
    elif rates is not None:
        groups = _balance_heads_timed(st.rows.sum(1).tolist(), rates.dense, counts, refine, R * R * rates.mixed)
    else:
        groups = _balance_heads(st.rows.sum(1).tolist(), counts, refine)
    if groups == contiguous:  # (always at U = 1): one layout, not two equal ones
        groups = contiguous
    home = _home(nb, R)
    caps = np.bincount(home, minlength=R).tolist()
    sums: dict[tuple[int, ...], np.ndarray] = {}  # pass 2: each head group's summed work, once
    tokens = _block_tokens(nb, w.q_block, w.seq_len)

    def group_sum(g: list[int]) -> np.ndarray:
        if tuple(g) not in sums:
            A = _group_sum(w, g)
            sums[tuple(g)] = A if rates is None else rates.group(A, g, tokens)
        return sums[tuple(g)]

    def true(W: np.ndarray, groups: list[list[int]], q_owner: np.ndarray, kv_owner: np.ndarray) -> np.ndarray:
        return W if rates is None else rates.unweigh(W, groups, q_owner, kv_owner, tokens)

    if st.home_tiles is None:  # long rings: contiguous-layout tiles come from the group sums
        for g in groups + contiguous:
            group_sum(g)
    homes = np.tile(home, (U, 1))
    heads_only = _home_tiles(w, st, groups, R, sums)
    unplanned = heads_only if groups is contiguous else _home_tiles(w, st, contiguous, R, sums)
    common = dict(ulysses=U, ring=R, heads=H, q_block=w.q_block, seq_len=w.seq_len, counts=counts)
    out = [_build_plan(groups=contiguous, q_owner=homes, kv_owner=homes, tile_work=true(unplanned, contiguous, homes, homes), **common)]
    ordered = _dense_first(groups, rates.dense if rates is not None else _full_heads(w, st.rows.sum(1)))
    if groups is not contiguous or ordered != contiguous:  # (the contiguous groups, dense heads first)
        out.append(_build_plan(groups=ordered, q_owner=homes, kv_owner=homes, tile_work=true(heads_only, groups, homes, homes), **common))
    if balance_blocks and R > 1:
        q_owner, kv_owner, W = homes.copy(), homes.copy(), heads_only.copy()
        if per_group_blocks:
            for k, g in enumerate(groups):
                q_owner[k], kv_owner[k], W[k] = _balance_blocks(
                    lambda g=g: group_sum(g), st.rows[g].sum(0), st.cols[g].sum(0), heads_only[k], home, caps, reward, refine, refine_target
                )
        else:
            q_owner[:] = _biased_greedy(st.rows.sum(0), home, caps, reward)
            kv_owner[:] = _biased_greedy(st.cols.sum(0), home, caps, reward)
            for k, g in enumerate(groups):
                W[k] = _reduce_rows(_reduce_cols(group_sum(g), kv_owner[k], R), q_owner[k], R)
        if (q_owner != homes).any() or (kv_owner != homes).any():
            out.append(_build_plan(groups=ordered, q_owner=q_owner, kv_owner=kv_owner, tile_work=true(W, groups, q_owner, kv_owner),
                                   **common))
    return out


def _summary_layouts(
    s: WorkSummary,
    *,
    ulysses: int,
    ring: int,
    reward: float,
    balance_heads: bool,
    balance_blocks: bool,
    per_group_blocks: bool,
    uneven_heads: bool,
    refine: bool,
    refine_target: float,
    rates: _Rates | None = None,
    prune=None,
) -> list[Plan]:
    """:func:`_layouts` from a summary: the same candidates, blocks moved in whole units.

    Units play the role of blocks (``A`` is a group's ``(NU, NU)`` pooled work, exact), except
    that only full units (``coarse`` blocks) move, so every ring rank keeps its block count; the
    owners are expanded to blocks at the end. One pass over ``pooled`` gives every head's tiles
    under the contiguous layout; a head group's sum is read only where its blocks need balancing.
    """
    H, nb, U, R = s.heads, s.num_blocks, ulysses, ring
    counts = _head_counts(H, U, uneven_heads)
    _check_ring(R, nb)
    _check_aligned(s, R)
    starts, sizes = s._starts, np.diff(s._starts)
    home = _home(nb, R)[starts[:-1]]  # (NU,): home ring rank of every unit
    movable = sizes == s.coarse
    caps = np.bincount(home[movable], minlength=R).tolist()
    head_tiles = _summary_home_tiles(s, R)  # (H, R, R), shared by the candidates of a degree choice
    tokens = np.add.reduceat(_block_tokens(nb, s.q_block, s.seq_len), starts[:-1])  # (NU,) tokens per unit
    if rates is not None:
        head_tiles = head_tiles * rates.weights[:, None, None]
    off = np.cumsum([0] + counts).tolist()
    contiguous = [list(range(off[k], off[k + 1])) for k in range(U)]
    if not balance_heads:
        groups = contiguous
    elif rates is not None:
        groups = _balance_heads_timed(head_tiles.sum((1, 2)).tolist(), rates.dense, counts, refine, R * R * rates.mixed)
    else:
        groups = _balance_heads(head_tiles.sum((1, 2)).tolist(), counts, refine)
    if groups == contiguous:  # (always at U = 1): one layout, not two equal ones
        groups = contiguous

    def group_sum(g: list[int]) -> np.ndarray:
        A = _summary_group_sum(s, g)
        return A if rates is None else rates.group(A, g, tokens)

    def true(W: np.ndarray, groups: list[list[int]], q_owner: np.ndarray, kv_owner: np.ndarray) -> np.ndarray:
        return W if rates is None else rates.unweigh(W, groups, q_owner, kv_owner, tokens)
    heads_only = np.stack([head_tiles[g].sum(0) for g in groups])
    unplanned = heads_only if groups is contiguous else np.stack([head_tiles[g].sum(0) for g in contiguous])
    homes = np.tile(_home(nb, R), (U, 1))
    unit_homes = np.tile(home, (U, 1))
    common = dict(ulysses=U, ring=R, heads=H, q_block=s.q_block, seq_len=s.seq_len, counts=counts)
    out = [_build_plan(groups=contiguous, q_owner=homes, kv_owner=homes, tile_work=true(unplanned, contiguous, unit_homes, unit_homes),
                       **common)]
    ordered = _dense_first(groups, _full_heads(s, s._head_totals))
    if groups is not contiguous or ordered != contiguous:  # (the contiguous groups, dense heads first)
        out.append(_build_plan(groups=ordered, q_owner=homes, kv_owner=homes, tile_work=true(heads_only, groups, unit_homes, unit_homes),
                               **common))
    if balance_blocks and R > 1:
        q_owner, kv_owner, W = np.tile(home, (U, 1)), np.tile(home, (U, 1)), heads_only.copy()
        if per_group_blocks:
            sent = 0  # the cost model's exchanged blocks so far: max over groups of 2 (q + kv) x heads

            def exchanged(g: list[int], owners, swaps: int = 0) -> int:
                """Group ``g``'s ``2 (q + kv) x heads``, or a bound on it after ``swaps`` swaps of
                :func:`_refine` (a swap changes two ranks' sent counts by one unit each, so the
                largest by at most one unit)."""
                out = sum(int(np.bincount(home[o != home], weights=sizes[o != home], minlength=R).max()) for o in owners)
                return 2 * len(g) * max(0, out - swaps * s.coarse)

            def check(g: list[int], qo: np.ndarray, ko: np.ndarray, swaps: int) -> None:
                """Stop before refining when even the fewest blocks it could leave moved lose."""
                bound = max(sent, exchanged(g, (qo, ko), swaps))
                if bound and prune(bound):
                    raise _Pruned

            for k, g in enumerate(groups):
                early = None if prune is None else (lambda qo, ko, swaps, g=g: check(g, qo, ko, swaps))
                q_owner[k], kv_owner[k], W[k] = _balance_blocks(
                    lambda g=g: group_sum(g), None, None, heads_only[k], home, caps, reward, refine, refine_target, movable,
                    early
                )
                if prune is not None:
                    sent = max(sent, exchanged(g, (q_owner[k], kv_owner[k])))
                    if sent and prune(sent):
                        raise _Pruned
        else:
            total = s._cells.sum(0, dtype=np.int64) if rates is None else group_sum(list(range(H)))
            q_owner[:] = _biased_greedy(total.sum(1), home, caps, reward, movable)
            kv_owner[:] = _biased_greedy(total.sum(0), home, caps, reward, movable)
            for k, g in enumerate(groups):
                W[k] = _reduce_rows(_reduce_cols(group_sum(g), kv_owner[k], R), q_owner[k], R)
        if (q_owner != home).any() or (kv_owner != home).any():
            q_blocks, kv_blocks = np.repeat(q_owner, sizes, axis=1), np.repeat(kv_owner, sizes, axis=1)
            out.append(_build_plan(groups=ordered, q_owner=q_blocks, kv_owner=kv_blocks, tile_work=true(W, groups, q_owner, kv_owner),
                                   **common))
    return out


def _build_plan(*, ulysses, ring, heads, q_block, seq_len, groups, counts, q_owner, kv_owner, tile_work) -> Plan:
    """A Plan from the planner's arrays, skipping re-validation (the planner builds valid layouts)."""
    memo: dict[bytes, tuple[tuple[int, ...], ...]] = {}

    def tuples(owner: np.ndarray) -> tuple[tuple[int, ...], ...]:  # groups often share a layout
        key = np.ascontiguousarray(owner, dtype=np.int64).tobytes()
        if key not in memo:
            memo[key] = _group_tuples(owner, ring)
        return memo[key]

    plan = Plan(
        ulysses=ulysses,
        ring=ring,
        heads=heads,
        q_block=q_block,
        seq_len=seq_len,
        head_perm=tuple(int(h) for g in groups for h in g),
        head_offsets=tuple(int(x) for x in np.cumsum([0] + list(counts))),
        q_blocks=tuple(tuples(q_owner[k]) for k in range(ulysses)),
        kv_blocks=tuple(tuples(kv_owner[k]) for k in range(ulysses)),
        tile_work=None if tile_work is None else torch.from_numpy(np.ascontiguousarray(tile_work, dtype=np.int64)),
        _checked=False,
    )
    # Seed the cached owner arrays that Plan would otherwise rebuild from the tuples.
    plan.__dict__["_owners"] = (np.array(q_owner, dtype=np.int64), np.array(kv_owner, dtype=np.int64))
    return plan


# ---------------------------------------------------------------------------------------- cost model


def _check_curve(name: str, curve: object) -> tuple[tuple[float, float], ...]:
    try:
        points = tuple((float(d), float(t)) for d, t in curve)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a list of [density, tflops] pairs, got {curve!r}") from None
    if not points or any(not (0.0 <= d <= 1.0) or not t > 0 for d, t in points):
        raise ValueError(f"{name} needs at least one [density, tflops] pair with 0 <= density <= 1 and tflops > 0, got {points}")
    if any(a[0] >= b[0] for a, b in zip(points, points[1:])):
        raise ValueError(f"{name} densities must be strictly increasing, got {[d for d, _ in points]}")
    return points


@dataclass(frozen=True)
class Prediction:
    """The cost model's prediction for one attention call under a plan. Times in milliseconds.

    ``total_ms = all_to_all_ms + exchange_ms + ring_ms``. ``rank_compute_ms[k][i]`` is the kernel
    time of rank ``(k, i)`` summed over its ring steps, without waiting or communication: what a
    per-rank emulated timing measures.

    Two imbalance ratios, one formula (module docstring) on different units: ``imbalance`` is
    rho_s of the tile entries (:func:`imbalance_ratio`, db-SP's definition, what the planner
    reports without a cost model); ``compute_imbalance`` is the same ratio of the predicted
    per-step compute times ``C[k, i, t]`` (dense heads at their rate, call and mixed-call
    overheads), ``max_k sum_t max_i C / mean_(k, i) sum_t C``: what a per-rank timing of the
    plan's local problems should measure.
    """

    ulysses: int
    ring: int
    total_ms: float
    all_to_all_ms: float
    exchange_ms: float
    ring_ms: float
    rank_compute_ms: tuple[tuple[float, ...], ...]
    imbalance: float
    compute_imbalance: float = 1.0


@dataclass(frozen=True)
class CostModel:
    """Latency model of one parallel sparse attention call: compute + communication.

    Per head group ``k`` and ring step ``t``, every rank runs its tile ``W[k, i, (i + t) % R]``
    (``call_overhead_us + 4 * D * entries / throughput``, nothing for an empty tile) while the
    next K/V chunk travels (``comm_latency_us + bytes / bandwidth``); the step lasts
    ``max(slowest rank's compute, transfer)`` (no transfer after the last step). The call adds
    the Ulysses all-to-all of q, k, v and o (each rank sends ``(U - 1) / U`` of its shard) and,
    for plans that move blocks, the block exchange (the most loaded rank's moved q, o, k and v
    blocks). Kernel throughput is interpolated linearly in the mask density from the curve of its
    kind (block masks: ``kv_tile == q_block``; fine-grained: ``kv_tile < q_block``).

    Bandwidths are per GPU and direction. A group runs at ``nvlink_gbps`` when it fits inside one
    node of ``gpus_per_node`` GPUs (Ulysses groups are consecutive ranks: ``U`` must divide
    ``gpus_per_node``; ring groups are strided by ``U``, so they fit only when ``U * R <=
    gpus_per_node``), otherwise at ``internode_gbps`` (conservative: its slowest hop sets the pace).

    The default calibration is ``dbsp/cost_model.json`` (:meth:`default`); the kernel benchmark
    writes the same format (:meth:`to_json`, :meth:`from_json`).

    Args:
        block_tflops: ``((density, effective TFLOPS), ...)`` for block masks, densities increasing.
        fine_tflops: the same for fine-grained masks.
        call_overhead_us: fixed cost of one kernel call (one non-empty ring step), microseconds.
        comm_latency_us: fixed cost of one transfer or collective, microseconds.
        nvlink_gbps: intra-node bandwidth, GB/s.
        internode_gbps: inter-node bandwidth, GB/s.
        gpus_per_node: GPUs that share the fast interconnect.
        dense_tflops: effective TFLOPS of fully dense heads, which ``sparse_attention`` sends to
            dense SDPA (cuDNN) rather than the sparse kernel; used when :meth:`predict` is told
            which heads are dense. None: dense heads run at the sparse curve's rate. Default: None.
        mixed_overhead_us: extra cost of a call that holds both dense and sparse heads (one more
            launch: the sparse kernel runs the sparse heads' rows in place, SDPA the dense heads as
            a view); used with ``dense_tflops``. Default: 0.
        mixed_gather_us: further cost of such a call when its dense heads are not consecutive in
            the rank's head order (SDPA then reads a gathered copy and its output is scattered
            back). Plans list each group's dense heads first, so only unplanned layouts pay it.
            Default: 0.
        dense_unaligned: time factor (>= 1) of dense heads' entries in calls whose key length is
            not a multiple of 128 (cuDNN's key tile: on H100 such calls run ~12% slower at the
            same work; a ring chunk of an odd number of 64-token blocks is one). Used with
            ``dense_tflops``. Default: 1.0.
        source: where the numbers come from (free text; not compared).
    """

    block_tflops: tuple[tuple[float, float], ...]
    fine_tflops: tuple[tuple[float, float], ...]
    call_overhead_us: float
    comm_latency_us: float
    nvlink_gbps: float
    internode_gbps: float
    gpus_per_node: int
    dense_tflops: float | None = None
    mixed_overhead_us: float = 0.0
    mixed_gather_us: float = 0.0
    dense_unaligned: float = 1.0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_tflops", _check_curve("block_tflops", self.block_tflops))
        object.__setattr__(self, "fine_tflops", _check_curve("fine_tflops", self.fine_tflops))
        for name in ("call_overhead_us", "comm_latency_us", "nvlink_gbps", "internode_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            if value < 0 or (name.endswith("gbps") and value == 0):
                raise ValueError(f"{name} must be {'> 0' if name.endswith('gbps') else '>= 0'}, got {value}")
        check_positive_int("gpus_per_node", self.gpus_per_node)
        d = self.dense_tflops
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0):
            raise ValueError(f"dense_tflops must be None or a finite number > 0, got {d!r}")
        for name in ("mixed_overhead_us", "mixed_gather_us"):
            m = getattr(self, name)
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {m!r}")
        f = self.dense_unaligned
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f < 1:
            raise ValueError(f"dense_unaligned must be a finite number >= 1, got {f!r}")

    # ------------------------------------------------------------------ loading

    _FIELDS = ("block_tflops", "fine_tflops", "call_overhead_us", "comm_latency_us", "nvlink_gbps", "internode_gbps", "gpus_per_node")

    @classmethod
    def from_json(cls, path: str | Path) -> "CostModel":
        """Load a calibration: a JSON object with the fields above (extra keys are documentation
        and are ignored; ``source`` is kept). A missing field raises ``ValueError`` naming it."""
        text = path.read_text() if hasattr(path, "read_text") else Path(path).read_text()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a cost model must be a JSON object, got {type(data).__name__}")
        missing = [f for f in cls._FIELDS if f not in data]
        if missing:
            raise ValueError(f"{path}: cost model JSON lacks {missing}; it needs {list(cls._FIELDS)}")
        return cls(**{f: data[f] for f in cls._FIELDS}, dense_tflops=data.get("dense_tflops"),
                   mixed_overhead_us=data.get("mixed_overhead_us", 0.0), mixed_gather_us=data.get("mixed_gather_us", 0.0),
                   dense_unaligned=data.get("dense_unaligned", 1.0),
                   source=str(data.get("source", path)))

    @classmethod
    def default(cls) -> "CostModel":
        """The documented default calibration shipped as ``dbsp/cost_model.json``."""
        return cls.from_json(resources.files("dbsp").joinpath("cost_model.json"))

    def to_json(self, path: str | Path, **extra: object) -> None:
        """Write this calibration (plus ``extra`` documentation keys) in the :meth:`from_json` format."""
        data = {**extra, "source": self.source, **{f: getattr(self, f) for f in self._FIELDS}}
        if self.dense_tflops is not None:
            data["dense_tflops"] = self.dense_tflops
            data["mixed_overhead_us"] = self.mixed_overhead_us
            data["mixed_gather_us"] = self.mixed_gather_us
            data["dense_unaligned"] = self.dense_unaligned
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    # ------------------------------------------------------------------ prediction

    def tflops(self, *, density: float, fine_grained: bool) -> float:
        """Effective kernel TFLOPS at ``density`` (linear between points, flat outside)."""
        curve = self.fine_tflops if fine_grained else self.block_tflops
        return float(np.interp(density, [d for d, _ in curve], [t for _, t in curve]))

    def _dense_tiles(self, plan: Plan, dense_heads, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``((U, R, R) score entries of the dense heads in each tile, (U,) dense heads per group,
        (U,) whether each group's dense heads are consecutive in its head order)``, or None when
        dense heads are not modelled."""
        if self.dense_tflops is None or not dense_heads:
            return None
        dense = set(int(h) for h in dense_heads)
        if not dense <= set(range(plan.heads)):
            raise ValueError(f"dense_heads must be head ids in [0, {plan.heads}), got {sorted(dense)}")
        S, M, nb = plan.seq_len, plan.q_block, plan.num_blocks
        short = nb * M - S  # the last block may be partial

        def tokens(blocks: tuple[int, ...]) -> int:  # sorted block ids
            return len(blocks) * M - (short if blocks and blocks[-1] == nb - 1 else 0)

        at = [[i for i, h in enumerate(plan.head_group(k)) if h in dense] for k in range(plan.ulysses)]
        counts = np.array([len(a) for a in at])
        consecutive = np.array([not a or a[-1] - a[0] == len(a) - 1 for a in at])
        out = np.zeros((plan.ulysses, plan.ring, plan.ring))
        for k in np.nonzero(counts)[0]:
            q = np.array([tokens(b) for b in plan.q_blocks[k]], dtype=np.float64)
            kv = np.array([tokens(b) for b in plan.kv_blocks[k]], dtype=np.float64)
            out[k] = batch * counts[k] * np.outer(q, kv)
        return out, counts, consecutive

    def _bandwidth(self, group: int, span: int) -> float:
        """Bytes/s of a group of ``group`` ranks spread over ``span`` consecutive global ranks."""
        g = self.gpus_per_node
        inside = span <= g and g % span == 0 if group > 1 else True
        return (self.nvlink_gbps if inside else self.internode_gbps) * 1e9

    def predict(
        self,
        plan: Plan,
        *,
        head_dim: int = 128,
        batch: int = 1,
        element_bytes: int = 2,
        kv_tile: int | None = None,
        density: float | None = None,
        dense_heads: Sequence[int] | None = None,
    ) -> Prediction:
        """Predicted time of one attention call under ``plan`` (which must carry ``tile_work``).

        Args:
            plan: the partition, with ``tile_work`` of the mask (``make_plan`` fills it).
            head_dim: D. Default: 128.
            batch: B, for the communicated bytes (``tile_work`` already sums the batch). Default: 1.
            element_bytes: bytes per q/k/v/o element. Default: 2 (bf16).
            kv_tile: the mask's key tile; ``None`` or ``q_block`` means a block mask. Default: None.
            density: the sparse heads' density for the throughput curve. Default: from
                ``tile_work`` (without the dense heads' work).
            dense_heads: ids of the heads whose every tile is selected (:func:`dense_heads`). With
                ``dense_tflops`` set, their entries of each tile (exactly ``B x heads x q tokens x
                kv tokens``) run at that rate and the rest at the sparse curve's. Default: None.

        Returns:
            A :class:`Prediction`.
        """
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a dbsp Plan, got {type(plan).__name__}")
        for name, value in (("head_dim", head_dim), ("batch", batch), ("element_bytes", element_bytes)):
            check_positive_int(name, value)
        W = plan._need_tile_work().numpy().astype(np.float64)
        U, R, S, H = plan.ulysses, plan.ring, plan.seq_len, plan.heads
        modelled = self._dense_tiles(plan, dense_heads, batch)
        dense_w, dense_k, consecutive = modelled if modelled is not None else (None, None, None)  # (U, R, R) entries, (U,) heads
        n_dense = 0 if dense_heads is None else len(set(dense_heads))
        if density is None:
            sparse_heads = H - n_dense if dense_w is not None else H
            density = float(W.sum() - (dense_w.sum() if dense_w is not None else 0.0)) / max(1, batch * sparse_heads * S * S)
        fine = kv_tile is not None and kv_tile < plan.q_block
        rate = self.tflops(density=density, fine_grained=fine) * 1e12
        if dense_w is None:
            seconds = W * (4.0 * head_dim) / rate
        else:
            slow = np.where(_kv_tokens(plan) % _CUDNN_KV_TILE != 0, self.dense_unaligned, 1.0)[:, None, :]  # (U, 1, R)
            seconds = (W - dense_w) * (4.0 * head_dim) / rate + dense_w * slow * (4.0 * head_dim) / (self.dense_tflops * 1e12)
        D = _steps(W)  # (U, R, R): D[k, i, t]
        overhead = np.full((U, 1, 1), self.call_overhead_us * 1e-6)
        if dense_w is not None:  # a group holding dense and sparse heads makes mixed calls
            mixed = (dense_k > 0) & (dense_k < np.array(plan.heads_per_rank))
            extra = self.mixed_overhead_us + np.where(consecutive, 0.0, self.mixed_gather_us)
            overhead = overhead + np.where(mixed, extra * 1e-6, 0.0)[:, None, None]
        compute = np.where(D > 0, overhead + _steps(seconds), 0.0)
        lat = self.comm_latency_us * 1e-6
        heads_k = np.array(plan.heads_per_rank, dtype=np.float64)
        ring_bw = self._bandwidth(R, U * R)
        token_bytes = batch * head_dim * element_bytes  # one token of one head
        ring_ms = all_to_all_ms = exchange_ms = 0.0
        if R > 1:
            kv_tokens = max(len(b) for group in plan.kv_blocks for b in group) * plan.q_block
            p2p = lat + 2 * kv_tokens * heads_k * token_bytes / ring_bw  # (U,) K and V of one chunk
            steps = compute.max(1)  # (U, R): slowest rank per step
            ring_ms = 1e3 * float((np.maximum(steps[:, :-1], p2p[:, None]).sum(1) + steps[:, -1]).max())
            q_moved, kv_moved = plan._exchange
            out = [(q_moved[k].sum(1) - np.diag(q_moved[k]), kv_moved[k].sum(1) - np.diag(kv_moved[k])) for k in range(U)]
            blocks = max(float(2 * (q.max() + kv.max()) * heads_k[k]) for k, (q, kv) in enumerate(out))
            if blocks > 0:
                exchange_ms = 1e3 * (2 * lat + blocks * plan.q_block * token_bytes / ring_bw)
        else:
            ring_ms = 1e3 * float(compute[:, 0, 0].max())
        if U > 1:
            shard = _cdiv(S, U * R) * H * token_bytes  # one tensor's local shard
            all_to_all_ms = 1e3 * (2 * lat + 4 * shard * (U - 1) / U / self._bandwidth(U, U))
        return Prediction(
            ulysses=U,
            ring=R,
            total_ms=all_to_all_ms + exchange_ms + ring_ms,
            all_to_all_ms=all_to_all_ms,
            exchange_ms=exchange_ms,
            ring_ms=ring_ms,
            rank_compute_ms=tuple(tuple(float(x) for x in row) for row in 1e3 * compute.sum(2)),
            imbalance=_rho(plan.tile_work),
            compute_imbalance=_time_rho(compute),
        )


# cuDNN's key tile: dense calls with other key lengths pay CostModel.dense_unaligned.
_CUDNN_KV_TILE = 128


def _kv_tokens(plan: Plan) -> np.ndarray:
    """``(U, R)`` key tokens of every group's ring chunks (the last block may be partial)."""
    short = plan.num_blocks * plan.q_block - plan.seq_len
    return np.array([[len(b) * plan.q_block - (short if plan.num_blocks - 1 in b else 0) for b in group]
                     for group in plan.kv_blocks], dtype=np.int64)


# ---------------------------------------------------------------------------------------- degree choice


@dataclass(frozen=True)
class DegreeChoice:
    """One scored ``(ulysses, ring)`` candidate: its plan and the cost model's prediction."""

    ulysses: int
    ring: int
    plan: Plan
    prediction: Prediction


def _candidates(world: int, heads: int, num_blocks: int, uneven_heads: bool) -> list[tuple[int, int]]:
    out = []
    for u in range(1, world + 1):
        if world % u == 0 and u <= heads and (uneven_heads or heads % u == 0) and world // u <= num_blocks:
            out.append((u, world // u))
    if not out:
        raise ValueError(
            f"no (ulysses, ring) with ulysses * ring = world={world}, ulysses dividing heads={heads}"
            f"{' (or uneven)' if uneven_heads else ''} and ring <= num_blocks={num_blocks}"
        )
    return out


def score_degrees(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    world: int,
    heads: int | None = None,
    cost_model: CostModel | None = None,
    balance: bool = True,
    reward: float = DEFAULT_REWARD,
    uneven_heads: bool = False,
    head_dim: int = 128,
    element_bytes: int = 2,
    q_block: int | None = None,
    seq_len: int | None = None,
) -> list[DegreeChoice]:
    """Plan and score every factorisation ``world = ulysses * ring`` that the head count allows.

    Candidates: every divisor ``U`` of ``world`` with ``U <= heads`` and ``heads % U == 0`` (any
    ``U <= heads`` with ``uneven_heads``), ``R = world / U <= num_blocks``. With ``balance``,
    each candidate keeps the faster (by the cost model) of the full plan and the plan that
    balances heads only, so blocks move only where the exchange pays for itself.

    Args:
        mask_or_work: a ``SparseMask``, its ``work()`` tensor (then ``q_block``/``seq_len``) or a
            :class:`WorkSummary` (whose ``ring`` every candidate ring degree must divide).
        world: P, the number of ranks.
        heads: H, checked against the mask when given. Default: the mask's.
        cost_model: Default: :meth:`CostModel.default`.
        balance: plan with :func:`make_plan` (else the unbalanced identity layout). Default: True.
        reward, uneven_heads: as in :func:`make_plan`.
        head_dim, element_bytes: as in :meth:`CostModel.predict`.

    Returns:
        One :class:`DegreeChoice` per candidate, by increasing ``ulysses``.
    """
    return _scored(mask_or_work, world=world, heads=heads, cost_model=cost_model, balance=balance, reward=reward,
                   uneven_heads=uneven_heads, head_dim=head_dim, element_bytes=element_bytes, q_block=q_block,
                   seq_len=seq_len, prune=False)


def _scored(mask_or_work, *, world, heads=None, cost_model=None, balance=True, reward=DEFAULT_REWARD, uneven_heads=False,
            head_dim=128, element_bytes=2, q_block=None, seq_len=None, prune: bool) -> list[DegreeChoice]:
    """:func:`score_degrees`' argument checks, then :func:`_score`."""
    check_positive_int("world", world)
    cost_model = CostModel.default() if cost_model is None else cost_model
    if not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model must be a dbsp CostModel or None, got {type(cost_model).__name__}")
    w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
    if heads is not None and check_positive_int("heads", heads) != w.heads:
        raise ValueError(f"heads={heads} but the mask has {w.heads} heads")
    return _score(w, world, cost_model, balance=balance, reward=_check_reward(reward), uneven_heads=uneven_heads,
                  head_dim=head_dim, element_bytes=element_bytes, prune=prune)


def _score(w: "_Work | WorkSummary", world: int, cost_model: CostModel, *, balance: bool, reward: float,
           uneven_heads: bool, head_dim: int, element_bytes: int, prune: bool) -> list[DegreeChoice]:
    """:func:`score_degrees` on checked arguments. With ``prune``, candidates are planned in order
    of :func:`_lower_bound_ms` and those whose bound exceeds the best predicted time found so far
    are skipped (they cannot win), so the result holds the best candidate but not every one. On a
    summary, once a time is found, each later candidate is first held to the tighter
    :func:`_summary_bound_ms`, then planned with :func:`_prune_moves`, which stops its block
    balancing as soon as the blocks it moves make it slower than the best."""
    outer = getattr(_MEMO, "memo", None)
    _MEMO.memo = {} if outer is None else outer
    try:
        return _score_now(w, world, cost_model, balance=balance, reward=reward, uneven_heads=uneven_heads,
                          head_dim=head_dim, element_bytes=element_bytes, prune=prune)
    finally:
        _MEMO.memo = outer


def _score_now(w: "_Work | WorkSummary", world: int, cost_model: CostModel, *, balance: bool, reward: float,
               uneven_heads: bool, head_dim: int, element_bytes: int, prune: bool) -> list[DegreeChoice]:
    """:func:`_score` with the head-group memo in place."""
    predict = _predictor(cost_model, w, head_dim=head_dim, element_bytes=element_bytes)
    pairs = _candidates(world, w.heads, w.num_blocks, uneven_heads and balance)
    tight = dict(reward=reward, uneven_heads=uneven_heads, balance=balance, head_dim=head_dim, element_bytes=element_bytes)
    bounds = {}
    summary = prune and isinstance(w, WorkSummary)
    if prune:
        totals = _work_per_head(w)
        bounds = {p: _lower_bound_ms(cost_model, w, totals, *p, head_dim=head_dim, element_bytes=element_bytes) for p in pairs}
        if summary:  # the order: with the head groups and home tiles, one moved unit for plans that move
            parts = {p: {} for p in pairs}
            bounds = {p: max(b, _summary_bound_ms(cost_model, w, *p, moves=False, parts=parts[p], **tight)) for p, b in bounds.items()}
        pairs = sorted(pairs, key=lambda p: (bounds[p], -p[0]))
    out: list[DegreeChoice] = []
    best = math.inf
    for u, r in pairs:
        if prune and bounds[u, r] > best * (1 + 1e-9):
            continue
        prune_for = None
        if summary and best < math.inf and "tighten" in parts[u, r]:
            # Sorting every rank's units costs about a head balancing: only where there is a time to beat.
            limit = best * (1 + 1e-9)
            if parts[u, r]["tighten"]() > limit:
                continue
            prune_for = lambda n, p=parts[u, r], limit=limit: _prune_moves(p, n, limit)  # noqa: E731
        try:
            plain, balanced = _score_pair(w, u, r, predict, reward=reward, uneven_heads=uneven_heads, balance=balance,
                                          cost=(cost_model, head_dim), prune_for=prune_for)
        except _Pruned:  # its block balancing showed that it cannot win
            continue
        choice = balanced if balance else plain
        best = min(best, choice.prediction.total_ms)
        out.append(choice)
    return sorted(out, key=lambda c: c.ulysses)


class _Pruned(Exception):
    """A degree candidate's planning stopped early: every plan it could score is slower than the best so far."""


def _prune_moves(parts: dict, n: int, limit: float):
    """For the block balancing of group set ``n`` (1: balanced heads, 2: time-balanced) of one
    candidate, from its :func:`_summary_bound_ms` ``parts``: a test ``sent -> bool``, True once a
    plan that already exchanges ``sent`` blocks (the cost model's count, ``2 (q + kv) x heads``
    of the busiest group so far) must be slower than ``limit``; None where another plan of the
    candidate (blocks at home, or the other set's moves) may be faster, as stopping then could
    change the pick."""
    if n >= len(parts["moved"]) or parts["home"] <= limit or any(b <= limit for i, b in enumerate(parts["moved"]) if i != n):
        return None
    base = parts["a2a"] + parts["ring"][n] + 2 * parts["lat"]
    return lambda sent: base + sent * parts["block_ms"] > limit


def _work_per_head(w: "_Work | WorkSummary") -> np.ndarray:
    """``(H,)`` int64 work of every head."""
    if isinstance(w, WorkSummary):
        return np.asarray(w._head_totals, dtype=np.int64)
    if isinstance(w.cells, np.ndarray):
        return w.cells.reshape(w.heads, -1).sum(1, dtype=np.int64)
    return w.cells.reshape(w.heads, -1).sum(1, dtype=torch.int64).cpu().numpy()


def _lower_bound_ms(cost: CostModel, w: "_Work | WorkSummary", totals: np.ndarray, u: int, r: int, *, head_dim: int,
                    element_bytes: int) -> float:
    """A lower bound on ``cost.predict(plan).total_ms`` over every plan of ``w`` on ``(u, r)``.

    Every term of :meth:`CostModel.predict` that a plan can change is bounded below by what no
    plan avoids: the all-to-all (fixed by ``u, r``), no block exchange, and a ring time of at
    least the mean rank compute (the total work at its rates over ``u * r`` ranks, call overheads
    dropped) and at least ``r - 1`` transfers of the smallest possible largest key chunk.
    """
    H, S, B = w.heads, w.seq_len, w.batch
    full = B * S * S
    dense = _full_heads(w, totals) if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    n_dense = int(dense.sum())
    total, dense_total = float(totals.sum()), float(totals[dense].sum()) if n_dense else 0.0
    density = (total - dense_total) / max(1, (H - n_dense) * full)
    fine = w.kv_tile is not None and w.kv_tile < w.q_block
    rate = cost.tflops(density=density, fine_grained=fine) * 1e12
    seconds = (total - dense_total) * 4.0 * head_dim / rate
    if n_dense:
        seconds += dense_total * 4.0 * head_dim / (cost.dense_tflops * 1e12)
    ring_ms = 1e3 * seconds / (u * r)
    lat = cost.comm_latency_us * 1e-6
    token_bytes = B * head_dim * element_bytes
    if r > 1:
        kv_tokens = _cdiv(w.num_blocks, r) * w.q_block  # the largest chunk holds at least this many blocks
        p2p = lat + 2 * kv_tokens * _cdiv(H, u) * token_bytes / cost._bandwidth(r, u * r)
        ring_ms = max(ring_ms, 1e3 * (r - 1) * p2p)
    a2a_ms = 0.0
    if u > 1:
        shard = _cdiv(S, u * r) * H * token_bytes
        a2a_ms = 1e3 * (2 * lat + 4 * shard * (u - 1) / u / cost._bandwidth(u, u))
    return a2a_ms + ring_ms


def _entry_ms(cost: CostModel, w: "_Work | WorkSummary", totals: np.ndarray, head_dim: int) -> np.ndarray:
    """``(H,)`` float64: the least predicted milliseconds per tile entry of each head, as
    :meth:`CostModel.predict` rates them (dense heads at ``dense_tflops`` when modelled, without
    the unaligned-key factor, which is >= 1; the others at the sparse curve's rate for their
    density, which no plan changes)."""
    H, full = w.heads, w.batch * w.seq_len * w.seq_len
    dense = _full_heads(w, totals) if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    n_dense = int(dense.sum())
    density = float(totals[~dense].sum()) / max(1, (H - n_dense) * full)
    fine = w.kv_tile is not None and w.kv_tile < w.q_block
    out = np.full(H, 1e3 * 4.0 * head_dim / (cost.tflops(density=density, fine_grained=fine) * 1e12))
    if n_dense:
        out[dense] = 1e3 * 4.0 * head_dim / (cost.dense_tflops * 1e12)
    return out


def _summary_bound_ms(cost: CostModel, s: WorkSummary, u: int, r: int, *, reward: float, uneven_heads: bool, balance: bool,
                      head_dim: int, element_bytes: int, groups: list[list[int]] | None = None, parts: dict | None = None,
                      moves: bool = True) -> float:
    """A lower bound on the predicted time of the plan :func:`_score_pair` scores for ``(u, r)``
    on summary ``s``, tighter than :func:`_lower_bound_ms` because it knows the planner's head
    groups (cheap: per-head totals) and the summary's home tiles and unit marginals.

    The scored plan is the fastest of plans that keep the contiguous, the balanced or (with
    dense heads) the time-balanced head groups (:func:`_layouts`), with blocks at home or moved in
    whole units. Per head group set, with every tile's time taken at its heads' least rate
    (:func:`_entry_ms`, plus the mixed-call cost of groups holding dense and sparse heads, whose
    every tile is non-empty):

    * blocks at home: the cost model's ring time of those tiles (exact but for call overheads and
      the unaligned-key factor);
    * blocks moved: the exchange's latency plus, for a ring time ``T``, the exchange of the fewest
      units every rank must send away so that no rank computes more than ``T`` (rank ``(k, i)``
      computes its query units' rows, ``sum_t`` of its step times, and its key units' columns,
      which ring time bounds from below; sending a unit away lowers a rank's load by at most
      that unit's work), minimised over ``T`` from the largest group mean upwards.

    A ring time is at least each rank's row and column load, and the exchange is set by the
    largest count of units a rank sends, so the bound holds for every plan with those groups
    whose ranks keep their block counts (as the planner's do). ``groups``: bound only the plans
    with these head groups that move units (for tests). ``parts``: filled with what
    :func:`_prune_moves` needs (the bound at home, and per group set of :func:`_layouts` --
    contiguous, balanced, time-balanced -- the bound with moves and its ring-time part).
    ``moves=False``: the cheaper bound that counts one moved unit for plans that move (no
    sorting of units); ``parts["tighten"]()`` then returns the full bound (and updates ``parts``).
    """
    H, S, B, nb, R = s.heads, s.seq_len, s.batch, s.num_blocks, r
    if s.ring % R:
        return 0.0  # home tiles only for ring degrees whose chunks nest in the summary's
    totals = np.asarray(s._head_totals, dtype=np.int64)
    ms = _entry_ms(cost, s, totals, head_dim)
    dense = totals == B * S * S if cost.dense_tflops is not None else np.zeros(H, dtype=bool)
    counts = _head_counts(H, u, uneven_heads)
    off = np.cumsum([0] + counts).tolist()
    sets = [([list(range(off[k], off[k + 1])) for k in range(u)], False)]  # (groups, may move blocks)
    if groups is not None:
        sets = [(groups, True)]
    elif balance:
        sets.append((_balance_heads(totals.tolist(), counts, True), True))
        rates = _rates_of(cost, s, totals, head_dim)
        if rates is not None:
            sets.append((_balance_heads_timed((totals * rates.weights).tolist(), rates.dense, counts, True, R * R * rates.mixed), True))
    lat = cost.comm_latency_us * 1e-3
    token_bytes = B * head_dim * element_bytes
    a2a = 0.0
    if u > 1:
        a2a = 1e3 * (2 * cost.comm_latency_us * 1e-6 + 4 * _cdiv(S, u * R) * H * token_bytes * (u - 1) / u / cost._bandwidth(u, u))
    tiles = _summary_home_tiles(s, R) * ms[:, None, None]  # (H, R, R) ms per head, blocks at home
    bw = cost._bandwidth(R, u * R)
    mixed = cost.mixed_overhead_us * 1e-3 if cost.dense_tflops is not None and dense.any() else 0.0
    home = math.inf
    moved, ring = [math.inf] * len(sets), [0.0] * len(sets)
    mixes, p2ps = [None] * len(sets), [None] * len(sets)
    block_ms = 2 * s.q_block * token_bytes / bw * 1e3
    for n, (gs, may_move) in enumerate(sets):
        heads_k = np.array([len(g) for g in gs], dtype=np.float64)
        mix = mixes[n] = np.array([mixed if 0 < int(dense[g].sum()) < len(g) else 0.0 for g in gs])  # (U,) per call
        C = np.stack([tiles[g].sum(0) for g in gs]) + mix[:, None, None]  # (U, R, R)
        if R == 1:
            home = min(home, a2a + float(C.max()))
            continue
        p2p = p2ps[n] = lat + 1e3 * 2 * _cdiv(nb, R) * s.q_block * heads_k * token_bytes / bw  # (U,)
        steps = _steps(C).max(1)  # (U, R)
        if groups is None:
            home = min(home, a2a + float((np.maximum(steps[:, :-1], p2p[:, None]).sum(1) + steps[:, -1]).max()))
        if may_move and reward != math.inf:
            bound, ring[n] = _moved_bound_ms(s, gs, ms, mix, R, p2p, block_ms, lat, moves)
            moved[n] = a2a + bound

    def tighten() -> float:
        """The bound again with ``moves=True``, reusing this call's groups and tiles."""
        for n, (gs, may_move) in enumerate(sets):
            if R > 1 and may_move and reward != math.inf:
                bound, ring[n] = _moved_bound_ms(s, gs, ms, mixes[n], R, p2ps[n], block_ms, lat, True)
                moved[n] = a2a + bound
        return min([home] + moved)

    if parts is not None:
        parts.update(home=home, moved=moved, ring=ring, a2a=a2a, lat=lat, block_ms=block_ms / 2, tighten=tighten)
    return min([home] + moved)


def _moved_bound_ms(s: WorkSummary, groups: list[list[int]], ms: np.ndarray, mix: np.ndarray, R: int, p2p: np.ndarray,
                    block_ms: float, lat: float, moves: bool = True) -> tuple[float, float]:
    """:func:`_summary_bound_ms`' bound on exchange + ring time of plans with ``groups`` that move
    units, and its bound on their ring time alone. ``ms``: ``(H,)`` per entry; ``mix``: ``(U,)``
    per call; ``block_ms``: the exchange time of one block of one head (both ways). ``moves=False``:
    one unit moved, the ring time at its bound (no sorting)."""
    U, H = len(groups), s.heads
    idx, chunk = _movable_units(s, R)  # (R, n) movable units of each home chunk (NU: none), (R + 1,)
    weigh = np.zeros((U, H))
    for k, g in enumerate(groups):
        weigh[k, g] = ms[g]
    heads_k = weigh.astype(bool).sum(1).astype(np.float64)
    mean = max(float((weigh @ s._head_totals.astype(np.float64))[k]) / R + R * mix[k] for k in range(U))
    mean = max(mean, float(((R - 1) * p2p).max()))
    if not moves:
        return mean + 2 * lat + heads_k.min() * s.coarse * block_ms, mean
    lefts = []
    for marg in s._unit_marginals:  # query units' rows, key units' columns
        load = np.concatenate([weigh @ marg.astype(np.float64), np.zeros((U, 1))], 1)  # (U, NU + 1) ms per unit
        start = np.add.reduceat(load[:, :-1], chunk[:-1], axis=1) + R * mix[:, None]  # (U, R) loads at home
        sent = np.cumsum(-np.sort(-load[:, idx], axis=2), axis=2)  # (U, R, n): the n heaviest units sent away
        lefts.append(start[:, :, None] - np.concatenate([np.zeros((U, R, 1)), sent], 2))  # (U, R, n + 1)
    # A plan's ring time T is at least every rank's load, so rank (k, i) sent at least
    # count(left > T) units; T ranges over the group mean and the loads where a count drops.
    cands = np.unique(np.concatenate([[mean]] + [x.reshape(-1) for x in lefts]))
    cands = cands[cands >= mean]
    need = np.zeros((len(cands), U))
    feasible = np.ones(len(cands), dtype=bool)
    for x in lefts:
        over = x[None] > cands[:, None, None, None] * (1 + 1e-12)  # (C, U, R, n + 1); slack keeps the bound below
        feasible &= ~over[..., -1].any((1, 2))
        need += over.sum(3).max(2)
    blocks = np.maximum((need * heads_k).max(1), heads_k.min()) * s.coarse  # at least one unit moves
    total = cands + 2 * lat + blocks * block_ms
    return (float(total[feasible].min()) if feasible.any() else math.inf), mean


def _movable_units(s: WorkSummary, ring: int) -> tuple[np.ndarray, np.ndarray]:
    """``((R, n) movable units of each home chunk of ``ring``, padded with ``NU``; (R + 1,) chunk
    starts in units)``."""
    memo = s.__dict__.setdefault("_movable_memo", {})
    if ring not in memo:
        home = _home(s.num_blocks, ring)[s._starts[:-1]]
        movable = np.diff(s._starts) == s.coarse
        chunk = np.searchsorted(home, np.arange(ring + 1))
        per = [np.nonzero(movable[chunk[i] : chunk[i + 1]])[0] + chunk[i] for i in range(ring)]
        n = max(len(p) for p in per)
        idx = np.full((ring, n), s.num_units, dtype=np.int64)
        for i, p in enumerate(per):
            idx[i, : len(p)] = p
        memo[ring] = (idx, chunk)
    return memo[ring]


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


def _predictor(cost_model: CostModel, w: _Work, *, head_dim: int, element_bytes: int, dense: tuple[int, ...] | None = None):
    """``plan -> Prediction`` for plans of the work ``w`` (dense heads found once, when modelled;
    ``dense``: already known)."""
    kv_tile = w.kv_tile if w.kv_tile is not None else w.q_block
    if cost_model.dense_tflops is None:
        dense = None
    elif dense is None:
        dense = _dense_heads_of(w)
    return lambda plan: cost_model.predict(plan, head_dim=head_dim, batch=w.batch, element_bytes=element_bytes,
                                           kv_tile=kv_tile, dense_heads=dense)


def _moved(plan: Plan) -> int:
    return plan.moved_blocks("q") + plan.moved_blocks("kv")


def _ring_key(plan: Plan) -> tuple[int, int]:
    """Order plans by their slowest group's ring time, then by moved blocks."""
    return int(_step_work(plan.tile_work).sum(1).max()), _moved(plan)


def _score_pair(w: _Work, u: int, r: int, predict, *, reward: float, uneven_heads: bool, balance: bool, stats: _Stats | None = None,
                cost: "tuple[CostModel, int] | None" = None, prune_for=None):
    """``(unbalanced, balanced)`` DegreeChoices of one ``(U, R)`` from one set of passes.

    The unbalanced one exists where ``U`` divides the heads. The balanced one (with ``balance``)
    is the faster, by the cost model, of the planner's choice and the layouts that move no
    blocks, so blocks move only where the exchange pays for itself. With ``cost`` (the cost
    model and head_dim) and a mask where time and tile entries differ (dense heads), the
    time-weighted candidates (:func:`_timed_layouts`) compete too. ``prune_for``: as in
    :func:`_layouts` (then :class:`_Pruned` may be raised).
    """
    if not balance:
        plan = _layouts(w, ulysses=u, ring=r, balance_heads=False, balance_blocks=False, stats=stats)[0]
        return DegreeChoice(u, r, plan, predict(plan)), None
    memo: dict[int, Prediction] = {}  # plan id -> prediction: the contiguous layout is scored twice
    predict = lambda p, f=predict: memo[id(p)] if id(p) in memo else memo.setdefault(id(p), f(p))  # noqa: E731
    layouts = _layouts(w, ulysses=u, ring=r, reward=reward, uneven_heads=uneven_heads, stats=stats, prune_for=prune_for)
    plain = DegreeChoice(u, r, layouts[0], predict(layouts[0])) if w.heads % u == 0 else None
    chosen = min(layouts, key=_ring_key)
    options = [chosen] + [p for p in layouts if p is not chosen and _moved(p) == 0]
    if cost is not None:
        if not isinstance(w, WorkSummary) and stats is None:
            stats = _stats(w, r)
        rates = _rates_of(cost[0], w, _head_totals(w, stats), cost[1])
        if rates is not None:
            options += _layouts(w, ulysses=u, ring=r, reward=reward, uneven_heads=uneven_heads, stats=stats, rates=rates,
                                prune_for=prune_for)
    pred, _, plan = min(((predict(p), n, p) for n, p in enumerate(options)), key=lambda x: (x[0].total_ms, x[0].imbalance, x[1]))
    return plain, DegreeChoice(u, r, plan, pred)


def choose_degrees(
    mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
    *,
    world: int,
    heads: int,
    cost_model: CostModel | None = None,
    **options: Any,
) -> tuple[int, int, Plan]:
    """The fastest ``(ulysses, ring)`` for this mask on ``world`` ranks, and its plan.

    Scores the allowed factorisations as :func:`score_degrees` does (same keyword options) and
    returns the one with the least predicted time (ties: the larger ``ulysses``, fewer ring steps).
    Candidates are planned in order of a lower bound on their predicted time (the all-to-all, and
    the mean rank compute or the ring transfers, whichever is larger); those whose bound exceeds
    the best time found are not planned, since they cannot win. From a :class:`WorkSummary` the
    bound also knows the planner's head groups, the home tiles and, for plans that move blocks,
    the units every rank must send away to reach a ring time (:func:`_summary_bound_ms`), and a
    candidate's block balancing stops as soon as the blocks it has moved make it slower than the
    best; the pick and its plan are those of the full scoring.
    Run it per layer and step, or let :class:`PlanCache` decide when to re-run it.

    Example::

        >>> u, r, plan = choose_degrees(mask, world=8, heads=40)     # doctest: +SKIP
        >>> (u, r), plan.imbalance()
        ((4, 2), 1.004)

    Returns:
        ``(ulysses, ring, plan)``.
    """
    scored = _scored(mask_or_work, world=world, heads=heads, cost_model=cost_model, prune=True, **options)
    best = min(scored, key=lambda c: (c.prediction.total_ms, -c.ulysses))
    return best.ulysses, best.ring, best.plan


# ---------------------------------------------------------------------------------------- reuse


_INCREMENTAL_TARGET = 1.01
"""An incremental re-plan (:func:`_repair`) is kept when its rho_s reaches this (``make_plan``'s
default ``refine_target``, where full plans land); above it :class:`PlanCache` plans afresh."""


class _Check:
    """The reuse check of one cached plan on summaries: its exact ``rho_s`` on a new summary.

    Under a fixed plan the tile matrix is a linear function of the summary, so everything that
    depends only on the plan is built once here: the head groups' index arrays, and the units'
    one-hot owner matrices ``(R, NU)`` / ``(NU, R)`` (their products with a group's pooled work
    reduce it to ``(R, R)`` tiles; float64 products of integers below 2^53 are exact). A check
    then reads the summary once: ``R = 1`` needs only the per-head totals (preset by
    :func:`summarize_work`), so it is ``O(H)``; longer rings sum each group's pooled work (one
    pass over ``(H, NU, NU)``) and do two small products per group. The result equals
    ``imbalance_ratio(summary, ..., plan=plan)`` exactly (same integer tiles, same formula).
    """

    def __init__(self, plan: Plan, s: WorkSummary) -> None:
        U, R = plan.ulysses, plan.ring
        self.U, self.R, self.key = U, R, (s.unit_bounds, s.heads)
        perm = np.asarray(plan.head_perm, dtype=np.int64)
        off = plan.head_offsets
        self.perm, self.starts = perm, np.asarray(off[:-1], dtype=np.int64)
        self.groups = [perm[off[k] : off[k + 1]] for k in range(U)]
        self.largest = max(len(g) for g in self.groups)
        if R > 1:
            q_owner, kv_owner = _unit_owners(s, plan)  # ValueError if the plan splits a unit
            self.oq = np.stack([_onehot(q_owner[k], R).T for k in range(U)])  # (U, R, NU)
            self.okv = np.stack([_onehot(kv_owner[k], R) for k in range(U)])  # (U, NU, R)
            i = np.arange(R)
            self.flat = (i[:, None] * R + (i[:, None] + i[None, :]) % R).reshape(-1)  # as in _steps

    def tiles(self, s: WorkSummary) -> np.ndarray:
        """``(U, R, R)`` int64: the plan's tile matrix on summary ``s`` (same units as at build)."""
        if (s.unit_bounds, s.heads) != self.key:
            raise ValueError("the summary's units or heads differ from those the check was built for")
        U, R = self.U, self.R
        if R == 1:
            return np.add.reduceat(s._head_totals[self.perm], self.starts).reshape(U, 1, 1)
        a = s._cells
        dt = np.int32 if a.dtype == np.int32 and self.largest * s._cell_bound < 2**31 else np.int64
        acc = np.empty((U,) + a.shape[1:], dtype=dt)  # the groups' summed pooled work
        for k, g in enumerate(self.groups):
            if len(g) == a.shape[0]:  # one group of every head: one reduction
                a.sum(0, dtype=dt, out=acc[k])
            else:  # in place: no gather of the group's heads
                np.copyto(acc[k], a[g[0]])
                for h in g[1:]:
                    np.add(acc[k], a[h], out=acc[k])
        return np.matmul(self.oq, np.matmul(acc.astype(np.float64), self.okv)).astype(np.int64)

    def rho(self, s: WorkSummary) -> float:
        """Exact ``rho_s`` of summary ``s`` under the plan (the formula of :func:`_rho`)."""
        return self.rho_of(self.tiles(s))

    def rho_of(self, W: np.ndarray) -> float:
        """``rho_s`` of ``(U, R, R)`` tiles ``W``, computed as :func:`_rho` does."""
        total = int(W.sum())
        if total == 0:
            return 1.0
        U, R = self.U, self.R
        if R == 1:
            return int(W.max()) * U * R / total
        D = W.reshape(U, R * R)[:, self.flat].reshape(U, R, R)
        return int(D.max(1).sum(1).max()) * U * R / total


def _swap_heads(totals: np.ndarray, groups: list[list[int]]) -> list[list[int]]:
    """Head groups repaired from ``groups`` by pairwise swaps (every group keeps its head count).

    While a head ``x`` of the heaviest group ``a`` (ties: lowest ``a``) and a lighter head ``y`` of
    another group can swap so that both groups end below ``a``'s old load, apply the swap with
    the lowest new pair maximum (ties: the first in the order (``y``'s group, ``y``, ``x``)). Each
    swap lowers the sorted load vector, so this terminates; the heaviest load never rises.
    Deterministic (integer arithmetic, fixed tie-breaking).
    """
    H, U = len(totals), len(groups)
    if U == 1:
        return [sorted(groups[0])]
    gid = np.empty(H, dtype=np.int64)
    for k, g in enumerate(groups):
        gid[g] = k
    tot = np.asarray(totals, dtype=np.int64)
    load = np.zeros(U, dtype=np.int64)
    np.add.at(load, gid, tot)
    big = np.iinfo(np.int64).max
    for _ in range(4 * H * U):
        a = int(np.argmax(load))
        xs = np.nonzero(gid == a)[0]
        ys = np.nonzero(gid != a)[0]
        ys = ys[np.argsort(gid[ys], kind="stable")]  # by group, then head id
        d = tot[xs][None, :] - tot[ys][:, None]  # (Y, X)
        new = np.maximum(load[a] - d, load[gid[ys]][:, None] + d)
        score = np.where((d > 0) & (new < load[a]), new, big)
        best = int(np.argmin(score))
        yi, xi = divmod(best, len(xs))
        if score[yi, xi] == big:
            break
        x, y, b = int(xs[xi]), int(ys[yi]), int(gid[ys[yi]])
        shift = int(d[yi, xi])
        gid[x], gid[y] = b, a
        load[a] -= shift
        load[b] += shift
    return [np.nonzero(gid == k)[0].tolist() for k in range(U)]


def _repair(s: WorkSummary, plan: Plan, *, target: float) -> "Plan | None":
    """An incremental re-plan of a head-level plan (``R = 1``) for the new summary ``s``, or None
    when it does not reach ``rho_s <= target`` (the caller then plans afresh).

    At ``R = 1`` a plan is only its head groups and ``rho_s`` is the heaviest group's share of
    the per-head totals, so the repair is :func:`_swap_heads` from the cached groups on the new
    totals (which :func:`summarize_work` presets): ``O(H)`` data, no pass over ``pooled``. Its
    ``rho_s`` under ``s`` is never above the cached plan's. It keeps every rank's head count and
    is a valid :class:`Plan`, but it is not the plan :func:`make_plan` would build from ``s``
    (LPT from scratch, then the same swaps); both are local optima of the same swap rule.
    Longer rings are not repaired: refining the cached block layouts after the heads move cost
    more than planning afresh on this repository's drifting workloads.
    """
    if plan.ring != 1:
        return None
    U = plan.ulysses
    groups = _swap_heads(s._head_totals, [list(plan.head_group(k)) for k in range(U)])
    groups = _dense_first(groups, _full_heads(s, s._head_totals))
    W = np.array([s._head_totals[g].sum() for g in groups], dtype=np.int64).reshape(U, 1, 1)
    owner = np.zeros((U, plan.num_blocks), dtype=np.int64)
    new = _build_plan(ulysses=U, ring=1, heads=plan.heads, q_block=plan.q_block, seq_len=plan.seq_len, groups=groups,
                      counts=list(plan.heads_per_rank), q_owner=owner, kv_owner=owner, tile_work=W)
    return new if _rho(new.tile_work) <= target else None


class PlanCache:
    """Plans kept across denoising steps, one per key (e.g. the layer index); re-plans on drift.

    ``get(key, mask, ...)`` evaluates the new mask under the cached plan (one tile pass) and keeps
    the plan (a *hit*) while ``rho_s <= threshold`` (db-SP's rule with P_s), or, when balancing
    could not get below ``threshold`` (few heads or blocks per rank), while ``rho_s`` stays within
    ``threshold - 1`` of what the plan had when it was built. Otherwise, or for a new key or
    other degrees, it plans afresh (a *miss*). With ``world=`` instead of ``ulysses=``/``ring=`` a miss re-runs
    :func:`choose_degrees`. A hit returns the very same ``Plan`` object, so runtime state keyed on
    it stays valid. Deterministic: ranks that feed identical masks make identical decisions.

    Masks, work tensors and :class:`WorkSummary` objects are all accepted. With summaries the
    check reads only the ``(H, NU, NU)`` pooled work (well under 1 ms at Wan2.1-14B 720p, against
    ~50 ms for a pass over the dense work), and its ``rho_s`` is exact: plans built from a summary
    move whole units, so the threshold means the same as with the full work tensor. A plan is
    reused only for inputs of the same kind (summaries of the same ``coarse`` and ``ring``, or
    masks and work tensors); switching kind is a miss. For summaries the check is precomputed per
    cached plan (``_Check``: head groups and unit one-hot owners built once), so a check at ``R = 1``
    reads only the per-head totals and one at ``R > 1`` one pass over ``pooled``; it gives the same
    ``rho_s`` as :func:`imbalance_ratio`, bit for bit.

    **Incremental re-plans** (``incremental=True``, summaries, ring degree 1): a miss first repairs
    the cached plan, whose only content at ``R = 1`` is its head groups, by pairwise head swaps on
    the new per-head totals (no pass over ``pooled``), and keeps the repair when its ``rho_s``
    reaches 1.01 (where full plans land); otherwise it plans afresh (``world=``: re-chooses the
    degrees). A repair's ``rho_s`` is never above the cached plan's on the new mask and it is a
    valid plan, but it is not the plan :func:`make_plan` would return, and with ``world=`` the
    degrees are re-chosen only when a repair fails. Longer rings always plan afresh (repairing
    their block layouts cost more than a new plan). Off by default: the plans then equal
    :func:`make_plan`'s (and :func:`choose_degrees`') on the mask of every miss.

    **Deferred decisions** (``defer=True``) take planning off the caller's thread: each ``get``
    returns the plan decided at the previous call for the key and hands this call's mask to one
    background thread, which checks it and re-plans (or re-chooses degrees) if needed; the next
    ``get`` for the key waits for that decision (usually long finished: it had a whole step of
    GPU work to run beside) and returns it. Every rank therefore switches plans at the same call,
    so ranks that feed identical masks still make identical decisions. The first call for a key
    (or after the degrees or input kind change) returns the unbalanced layout: the requested
    degrees, or with ``world=`` the largest Ulysses degree the heads allow. The plan in use lags
    the masks by one step, which the reuse rule already tolerates (masks drift slowly). The thread
    shares Python's GIL with the caller: its decisions still slow the caller's Python work (kernel
    launches) a little; on this repository's CPU benchmark the caller's share of planning fell from
    21% to 4% of the predicted attention time (``benchmarks/bench_plan.py``). Where the check is
    cheaper than the hand-off (a plan with ``R = 1`` and a summary: ``O(H)``), ``get`` makes it on
    the caller's thread and sends only misses to the background; the decisions are the same. With
    ``incremental=True`` as well the caller's share fell to 0.7% there (background: 2.3%, mostly
    the first degree choice of each layer).

    Args:
        threshold: P_s >= 1. Default: ``DEFAULT_REUSE_THRESHOLD`` (1.05).
        reward, uneven_heads: as in :func:`make_plan`.
        cost_model, head_dim, element_bytes: for ``world=`` (degree choice); a cost model given
            here also plans fixed degrees by predicted time (``make_plan(cost_model=...)``); the
            reuse check stays on the tile-entry rho_s. Default: None (``world=``: the default model).
        defer: decide in a background thread, one call late (above). Default: False.
        incremental: repair the cached plan on a miss before planning afresh (above; summaries
            only). Default: False.
        fast_check: check summaries with the precomputed check (above); ``False`` recomputes the
            tiles from scratch every time (the same ``rho_s``; for comparisons). Default: True.

    Attributes:
        hits, misses: counts of decisions since construction (or :meth:`clear`).
        repairs: the misses answered by an incremental repair (included in ``misses``).
        decide_ms: wall time spent deciding (checks and re-plans), on whichever thread.
        decide_cpu_ms: CPU time of the deciding thread over the same spans (``time.thread_time``;
            unlike ``decide_ms`` it does not count waiting for the CPU or the GIL).
        last_imbalance: rho_s of the mask of the latest decision under the plan it chose.

    Example::

        >>> cache = PlanCache(threshold=1.05)
        >>> for step in range(50):                                  # doctest: +SKIP
        ...     plan = cache.get(layer, masks[step], ulysses=2, ring=4)
        >>> cache.hits, cache.misses
        (47, 3)
    """

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_REUSE_THRESHOLD,
        reward: float = DEFAULT_REWARD,
        uneven_heads: bool = False,
        cost_model: CostModel | None = None,
        head_dim: int = 128,
        element_bytes: int = 2,
        defer: bool = False,
        incremental: bool = False,
        fast_check: bool = True,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 1.0:
            raise ValueError(f"threshold must be a number >= 1.0 (P_s), got {threshold!r}")
        if not isinstance(defer, bool):
            raise TypeError(f"defer must be True or False, got {defer!r}")
        for name, value in (("incremental", incremental), ("fast_check", fast_check)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        self.incremental, self.fast_check = incremental, fast_check
        self._checks: dict[Any, _Check] = {}  # key -> the precomputed check of its cached plan (summaries)
        self.threshold = float(threshold)
        self.defer = defer
        self._pending: dict[Any, Future] = {}  # key -> the background decision of the last call
        self.decide_ms = self.decide_cpu_ms = 0.0
        self._lock = threading.Lock()  # counters are updated from the caller's and the background thread
        self._worker: ThreadPoolExecutor | None = None
        self._options = {"reward": _check_reward(reward), "uneven_heads": bool(uneven_heads)}
        self._choice = {"cost_model": cost_model, "head_dim": head_dim, "element_bytes": element_bytes}
        self._plans: dict[Any, tuple[tuple, Plan, float]] = {}  # key -> (request, plan, limit)
        self.hits = 0
        self.misses = 0
        self.repairs = 0
        self.last_imbalance = float("nan")

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        """Forget every plan and reset the counts (after any pending deferred decision finishes)."""
        for fut in self._pending.values():
            fut.result()
        self._pending.clear()
        self._plans.clear()
        self._checks.clear()
        self.hits = self.misses = self.repairs = 0
        self.decide_ms = self.decide_cpu_ms = 0.0

    def get(
        self,
        key: Any,
        mask_or_work: "SparseMask | torch.Tensor | WorkSummary",
        *,
        ulysses: int | None = None,
        ring: int | None = None,
        world: int | None = None,
        q_block: int | None = None,
        seq_len: int | None = None,
    ) -> Plan:
        """The plan for ``key`` and this mask: the cached one if it still balances, else a new one.

        Give either ``ulysses`` and ``ring``, or ``world`` (degrees chosen by the cost model).
        """
        if world is None:
            if ulysses is None or ring is None:
                raise TypeError("PlanCache.get needs ulysses= and ring=, or world=")
            check_positive_int("ulysses", ulysses)
            check_positive_int("ring", ring)
            request: tuple = ("degrees", ulysses, ring)
        else:
            if ulysses is not None or ring is not None:
                raise TypeError("PlanCache.get takes ulysses= and ring=, or world=, not both")
            request = ("world", check_positive_int("world", world))
        w = _as_work(mask_or_work, q_block=q_block, seq_len=seq_len)
        # Plans from summaries move whole units; they are kept for summaries of the same units only.
        source = ("summary", w.coarse, w.ring) if isinstance(w, WorkSummary) else ("work",)
        request += (w.heads, w.num_blocks, w.q_block, w.seq_len) + source
        if not self.defer:
            return self._decide(key, request, w, ulysses, ring, world)
        pending = self._pending.pop(key, None)
        if pending is not None:
            pending.result()  # the previous call's decision (re-raises its error, if any)
        cached = self._plans.get(key)
        plan = cached[1] if cached is not None and cached[0] == request else None
        if plan is None:
            plan = self._unbalanced(request, w)
        if plan is None:  # no unbalanced layout for these degrees (uneven heads): decide now
            return self._decide(key, request, w, ulysses, ring, world)
        if cached is not None and plan is cached[1] and self._cheap(plan, w):
            # The check of a head-level plan on a summary costs less than the hand-off: made here,
            # and only a miss goes to the background (the same decision, made from the same mask).
            t0, c0 = time.perf_counter(), time.thread_time()
            rho = self._check(key, plan, w)
            if rho <= cached[2]:
                with self._lock:
                    self.hits += 1
                    self.last_imbalance = rho
            with self._lock:
                self.decide_ms += 1e3 * (time.perf_counter() - t0)
                self.decide_cpu_ms += 1e3 * (time.thread_time() - c0)
            if rho <= cached[2]:
                return plan
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbsp-plan")
        self._pending[key] = self._worker.submit(self._decide, key, request, w, ulysses, ring, world)
        return plan

    def _cheap(self, plan: Plan, w: "_Work | WorkSummary") -> bool:
        """Whether the check of ``plan`` on ``w`` is ``O(H)``: a summary's head totals at ``R = 1``."""
        return plan.ring == 1 and self.fast_check and isinstance(w, WorkSummary)

    def _check(self, key, plan: Plan, w: "_Work | WorkSummary") -> float:
        """Exact rho_s of ``w`` under the cached ``plan`` of ``key``."""
        if isinstance(w, WorkSummary) and self.fast_check:
            check = self._checks.get(key)
            if check is None:
                check = self._checks[key] = _Check(plan, w)
            return check.rho(w)
        return _rho(torch.from_numpy(_tile_work(w, plan)))

    def _unbalanced(self, request: tuple, w: "_Work | WorkSummary") -> "Plan | None":
        """The contiguous layout for ``request`` (``world=``: the largest Ulysses degree), or None."""
        if request[0] == "degrees":
            u, r = request[1], request[2]
        else:
            try:
                u, r = max(_candidates(request[1], w.heads, w.num_blocks, False))
            except ValueError:
                return None
        if w.heads % u or r > w.num_blocks:
            return None
        # Plan.identity's layout, built without re-validating it (a few ms on the caller's thread).
        homes = np.tile(_home(w.num_blocks, r), (u, 1))
        contiguous = [list(range(k * (w.heads // u), (k + 1) * (w.heads // u))) for k in range(u)]
        layout = dict(ulysses=u, ring=r, heads=w.heads, q_block=w.q_block, seq_len=w.seq_len, counts=[w.heads // u] * u,
                      groups=contiguous, q_owner=homes, kv_owner=homes)
        base = _build_plan(**layout, tile_work=None)
        return _build_plan(**layout, tile_work=_tile_work(w, base))

    def _decide(self, key, request: tuple, w, ulysses, ring, world) -> Plan:
        """Check the cached plan on ``w`` and keep it, or plan afresh; record the decision."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return self._decide_now(key, request, w, ulysses, ring, world)
        finally:
            with self._lock:
                self.decide_ms += 1e3 * (time.perf_counter() - t0)
                self.decide_cpu_ms += 1e3 * (time.thread_time() - c0)

    def _decide_now(self, key, request: tuple, w, ulysses, ring, world) -> Plan:
        cached = self._plans.get(key)
        if cached is not None and cached[0] == request:
            rho = self._check(key, cached[1], w)
            if rho <= cached[2]:
                with self._lock:
                    self.hits += 1
                    self.last_imbalance = rho
                return cached[1]
            if self.incremental and isinstance(w, WorkSummary):
                plan = _repair(w, cached[1], target=_INCREMENTAL_TARGET)
                if plan is not None:
                    with self._lock:
                        self.misses += 1
                        self.repairs += 1
                    return self._keep(key, request, plan)
        with self._lock:
            self.misses += 1
        if world is None:
            timed = self._choice if self._choice["cost_model"] is not None else {}
            plan = _plan_from(w, ulysses=ulysses, ring=ring, **timed, **self._options)
        else:
            _, _, plan = choose_degrees(w, world=world, heads=w.heads, **self._choice, **self._options)
        return self._keep(key, request, plan)

    def _keep(self, key, request: tuple, plan: Plan) -> Plan:
        """Cache ``plan`` for ``key`` (its check is built at the next summary check)."""
        self.last_imbalance = plan.imbalance()
        rho = self.last_imbalance
        self._checks.pop(key, None)
        self._plans[key] = (request, plan, self.threshold if rho <= self.threshold else rho + self.threshold - 1.0)
        return plan
