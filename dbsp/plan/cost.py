"""The cost model: a plan's predicted time, and per-head rates that weigh work by time.

:class:`CostModel` turns a plan into predicted time (compute, all-to-all, block exchange, ring
transfers with overlap) as a :class:`Prediction`; the default calibration is
``dbsp/cost_model.json``. The planner (:mod:`dbsp.plan.balance`) uses the per-head rates here to
balance predicted time where heads run at different speeds (dense heads on dense SDPA).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .._checks import check_positive_int
from .core import Plan, WorkSummary, _Stats, _Work, _cdiv, _dense_heads_of, _full_heads, _steps, _time_rho


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
        dense_sms: the GPU's streaming multiprocessors (132 on H100 and H200 SXM). Dense SDPA runs
            ``n = batch x dense heads x ceil(q tokens / 128)`` query tiles in waves of this many, so a
            call's dense entries cost ``ceil(n / dense_sms) / (n / dense_sms)`` times more (a call of
            133 tiles takes two waves). Used with ``dense_tflops``. None: no wave model. Default: None.
        merge_gbps: speed of the ring's merge, GB/s of the bytes it moves. Every ring step after a
            rank's first step with work merges its partial output into the running one
            (:func:`dbsp.dist.merge_attention_`): :meth:`merge_bytes` bytes, on that rank's clock. None:
            merges cost nothing (the model of calibrations that predate it). Default: None.
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
    dense_sms: int | None = None
    merge_gbps: float | None = None
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
        if self.dense_sms is not None:
            check_positive_int("dense_sms", self.dense_sms)
        g = self.merge_gbps
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0):
            raise ValueError(f"merge_gbps must be None or a finite number > 0, got {g!r}")

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
                   dense_unaligned=data.get("dense_unaligned", 1.0), dense_sms=data.get("dense_sms"),
                   merge_gbps=data.get("merge_gbps"), source=str(data.get("source", path)))

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
            if self.dense_sms is not None:
                data["dense_sms"] = self.dense_sms
        if self.merge_gbps is not None:
            data["merge_gbps"] = self.merge_gbps
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    # ------------------------------------------------------------------ prediction

    def tflops(self, *, density: float, fine_grained: bool) -> float:
        """Effective kernel TFLOPS at ``density`` (linear between points, flat outside)."""
        xs, ys = self._curves[bool(fine_grained)]
        return float(np.interp(density, xs, ys))

    @cached_property
    def _curves(self) -> dict[bool, tuple[np.ndarray, np.ndarray]]:
        """The throughput curves as (densities, TFLOPS) arrays, by ``fine_grained``, built once."""
        return {fine: (np.array([d for d, _ in curve]), np.array([t for _, t in curve]))
                for fine, curve in ((False, self.block_tflops), (True, self.fine_tflops))}

    def dense_waves(self, tiles: "int | np.ndarray") -> "float | np.ndarray":
        """Time factor of a dense SDPA call of ``tiles`` query tiles (``batch x heads x ceil(q
        tokens / 128)``): whole waves of ``dense_sms`` tiles over the fractional count,
        ``ceil(n / dense_sms) / (n / dense_sms)``; 1.0 for ``n = 0`` or without ``dense_sms``."""
        n = np.asarray(tiles, dtype=np.float64)
        out = np.ones_like(n)
        if self.dense_sms is not None:
            np.divide(np.ceil(n / self.dense_sms) * self.dense_sms, n, out=out, where=n > 0)
        return float(out) if out.ndim == 0 else out

    def _waves_of(self, dense_counts: np.ndarray, q_tokens: np.ndarray, batch: int) -> np.ndarray:
        """``(U, R)`` time factors of the dense heads' entries in each rank's calls: :meth:`dense_waves`
        of ``batch x the group's dense heads x 128-token tiles of the rank's query chunk``
        (``dense_counts``: ``(U,)``; ``q_tokens``: ``(U, R)`` or ``(R,)``)."""
        tiles = np.ceil(np.asarray(q_tokens, dtype=np.float64) / _CUDNN_Q_TILE)
        return self.dense_waves((batch * np.asarray(dense_counts, dtype=np.float64))[:, None] * tiles)

    def _dense_tiles(self, plan: Plan, dense_heads, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``((U, R, R) score entries of the dense heads in each tile, (U,) dense heads per group,
        (U,) whether each group's dense heads are consecutive in its head order)``, or None when
        dense heads are not modelled."""
        if self.dense_tflops is None or not dense_heads:
            return None
        dense = set(int(h) for h in dense_heads)
        if not dense <= set(range(plan.heads)):
            raise ValueError(f"dense_heads must be head ids in [0, {plan.heads}), got {sorted(dense)}")
        at = [[i for i, h in enumerate(plan.head_group(k)) if h in dense] for k in range(plan.ulysses)]
        counts = np.array([len(a) for a in at])
        consecutive = np.array([not a or a[-1] - a[0] == len(a) - 1 for a in at])
        q, kv = (t.astype(np.float64) for t in plan._chunk_tokens)  # (U, R) tokens of each rank's chunks
        out = (batch * counts)[:, None, None] * (q[:, :, None] * kv[:, None, :])
        return out, counts, consecutive

    @staticmethod
    def merge_bytes(batch, q_tokens, heads, head_dim: int):
        """Bytes one ring merge moves (what ``merge_gbps`` is a speed of): the float32 running
        output and lse read and written and the step's read, ``4 x batch x q tokens x heads x (3 D
        + 3)``. Takes numbers or numpy arrays (elementwise)."""
        return 4.0 * batch * np.asarray(q_tokens, dtype=np.float64) * heads * (3 * head_dim + 3)

    def _merges(self, D: np.ndarray, plan: Plan, head_dim: int, batch: int) -> np.ndarray:
        """``(U, R, R)`` seconds of the ring's merges: at each step with work (``D[k, i, t] > 0``)
        after the rank's first, its running output and lse merge with the step's (class doc)."""
        work = D > 0
        merging = work & (np.cumsum(work, axis=2) > 1)
        heads = np.array(plan.heads_per_rank, dtype=np.float64)[:, None]  # (U, 1)
        nbytes = self.merge_bytes(batch, plan._chunk_tokens[0], heads, head_dim)  # (U, R)
        return np.where(merging, (nbytes / (self.merge_gbps * 1e9))[:, :, None], 0.0)

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
            slow = np.where(plan._chunk_tokens[1] % _CUDNN_KV_TILE != 0, self.dense_unaligned, 1.0)[:, None, :]  # (U, 1, R)
            # Whole waves of query tiles, per rank's query chunk: (U, R, 1).
            slow = slow * self._waves_of(dense_k, plan._chunk_tokens[0], batch)[:, :, None]
            seconds = (W - dense_w) * (4.0 * head_dim) / rate + dense_w * slow * (4.0 * head_dim) / (self.dense_tflops * 1e12)
        D = _steps(W)  # (U, R, R): D[k, i, t]
        overhead = np.full((U, 1, 1), self.call_overhead_us * 1e-6)
        if dense_w is not None:  # a group holding dense and sparse heads makes mixed calls
            mixed = (dense_k > 0) & (dense_k < np.array(plan.heads_per_rank))
            extra = self.mixed_overhead_us + np.where(consecutive, 0.0, self.mixed_gather_us)
            overhead = overhead + np.where(mixed, extra * 1e-6, 0.0)[:, None, None]
        compute = np.where(D > 0, overhead + _steps(seconds), 0.0)
        if R > 1 and self.merge_gbps is not None:
            compute = compute + self._merges(D, plan, head_dim, batch)
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
            # Blocks each ring rank sends away (its row of the exchange counts off the diagonal), per group.
            sent = plan._sent  # (U,) q, kv
            blocks = float((2 * (sent[0] + sent[1]) * heads_k).max())
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
            rank_compute_ms=tuple(tuple(row) for row in (1e3 * compute.sum(2)).tolist()),
            imbalance=plan.imbalance(),
            compute_imbalance=_time_rho(compute),
        )


# cuDNN's key tile: dense calls with other key lengths pay CostModel.dense_unaligned.
_CUDNN_KV_TILE = 128
# Dense SDPA's query tile for CostModel.dense_sms: 128-token tiles, one per SM at a time, fit the
# H100's measured calls best (benchmarks/calibrate_cost_model.py; 64 or 256 at one per SM fit worse).
_CUDNN_Q_TILE = 128


_TIME_SCALE = 1024
"""Integer scale of the time weights (:class:`_Rates`): a dense head's weight is rounded to 1/1024."""


@dataclass(frozen=True)
class _Rates:
    """Time weights for planning with a cost model (``make_plan(cost_model=...)``).

    Fully dense heads run on dense SDPA at ``dense_tflops``, the others on the sparse kernel at the
    curve's rate, so one entry of a dense head costs ``sparse_rate / dense_rate`` of a sparse one.
    The planner weighs the work in integers, sparse heads times ``sparse`` and dense heads times
    ``dense_w`` (``dense_w / sparse`` ~ that ratio), so its exact integer arithmetic carries over
    and equal loads mean equal predicted kernel time (with ``dense_sms``, on the mean wave factor:
    :func:`_rates_of`). A dense head's work is known without
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


def _rates_of(cost_model: "CostModel | None", w: "_Work | WorkSummary", totals: np.ndarray, head_dim: int, *,
              ulysses: int = 1, ring: int = 1) -> _Rates | None:
    """The time weights of ``w`` under ``cost_model`` (``totals``: ``(H,)`` work per head), or None
    where time and tile entries order plans alike (no cost model, no ``dense_tflops``, no dense
    heads and no mixed-call cost, or work too large for exact float64 sums at a useful scale).

    With ``dense_sms``, the dense rate is slowed by the mean wave factor (:meth:`CostModel.dense_waves`)
    of the dense heads split as evenly as possible over ``ulysses`` groups, on query chunks of
    ``seq_len / ring`` tokens: weights are per head, so they carry the wave loss on average."""
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
    counts = np.array([n // ulysses + (k < n % ulysses) for k in range(ulysses)])
    waves = float((counts * cost_model._waves_of(counts, [_cdiv(w.seq_len, ring)], w.batch)[:, 0]).sum()) / n
    dense_w = max(1, round(scale * rate * waves / cost_model.dense_tflops))
    g = math.gcd(scale, dense_w)
    sparse, dense_w = scale // g, dense_w // g
    mixed = round(cost_model.mixed_overhead_us * 1e-6 * rate * 1e12 / (4.0 * head_dim) * sparse)
    if sparse == dense_w and mixed == 0:
        return None
    return _Rates(dense=dense, sparse=sparse, dense_w=dense_w, mixed=mixed, batch=w.batch)


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
