"""Sequence-parallel sparse attention: Ulysses, Ring, USP and dbsp plans side by side, in one run.

Two modes:

``--emulate P`` (one GPU; results are *emulated*): for every configuration and every one of the P
ranks, the rank's exact local work under the layout (its heads, its query blocks, each ring step's
key/value blocks, the sub-masks the runtime builds) is timed with the real kernel, i.e. whatever
``dbsp.sparse_attention`` dispatches to (Triton on CUDA; dense SDPA for full heads), and in a ring
as the ring runs it: float32 output with the lse, merged into the running result after the
rank's first step with work. Communication comes from the cost model's stated bandwidth and latency
(``dbsp/cost_model.json``): the Ulysses all-to-all of q, k, v and o, the block exchange of the
tokens the layout moves (measured from the layout), and the ring P2P of each step, overlapped with
that step's compute (a step lasts ``max(slowest rank's compute, transfer)``). Local problems are
keyed by content (shapes, dtype, the sub-mask's selected tiles), so identical work on several
ranks or configurations is one problem with one time; all distinct problems of a layer are timed
interleaved (a warm-up call each, then ``--repeats`` rounds over all of them in a fresh random
order each, CUDA events per call, median per problem; see ``ProblemSet``), and the log reports the
spread of the rounds and, per configuration, the range that timing noise alone gives its measured
rho_s (``rho_measured_lo``/``_hi`` in ``sp.csv``, :func:`rho_interval`).

dbsp plans are made with the cost model (``make_plan(cost_model=...)``): they balance predicted
*time* (dense heads run on cuDNN faster per entry; calls mixing dense and sparse heads pay an
overhead), not tile entries. Each row reports three imbalance ratios of one formula (``max_k
sum_t max_i / mean`` of the per-step compute): ``rho_planned`` on tile entries (``Plan.imbalance``,
db-SP's rho_s), ``rho_model`` on the cost model's predicted per-step times
(``Prediction.compute_imbalance``) and ``rho_measured`` on the timed steps. Target 2 compares
measured with the model's (the planner's prediction in the units it balances).

``--real`` under ``torchrun`` (NCCL on GPUs, gloo on CPU): ``sp_attention`` end to end on real
processes, masks predicted from the shards with ``predict_mask_sharded``; reports the slowest rank.

Configurations (P ranks, H heads): ``ulysses`` (U = P), ``ring`` (R = P), ``usp`` (every hybrid
U x R, unbalanced), and dbsp plans for every U x R: ``dbsp-head`` (head level only), ``dbsp-block``
(block level only), ``dbsp-both``, plus ``dbsp-auto``: the degrees and plan chosen per layer by
``choose_degrees`` (the cost model), timed like the others. The baseline is the best *fixed*
unbalanced configuration over all layers of a workload (what a user of plain USP would pick).

Workloads: Wan2.1-14B 720p shapes (H 40, S 75600, D 128) from ``dbsp.video.make_workload``,
masks from ``dbsp.predict.predict_mask``: ``skewed`` (head focus spread over [0, 1]), ``mild``
(focus spread 0.3), ``regional`` (as skewed, plus ``region_skew=0.5``: attention sharpness varies
smoothly over the video, so the ranks' frame ranges carry different work, block-level imbalance on
top of the head-level one) and ``full`` (a dense mask, for the no-slowdown target).

    python benchmarks/bench_sp.py --emulate 8 --layers 2 --out results/sp       # GPU, 2-4 min
    python benchmarks/bench_sp.py --emulate 8 --quick --out /tmp/spq            # CPU smoke run
    torchrun --nproc_per_node 8 benchmarks/bench_sp.py --real --out results/sp_real
    torchrun --nproc_per_node 4 benchmarks/bench_sp.py --real --quick --out /tmp/spr   # CPU, gloo

Writes ``sp.csv`` (one row per workload, layer and configuration), ``sp_ranks.csv`` (per-rank
compute), ``sp_ranks.png`` (per-rank bars, best unbalanced vs dbsp) and ``sp_speedup.png``; prints
a table and the targets of issue 7.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from dbsp import SparseMask, sparse_attention
from dbsp.dist import SPGroups, merge_attention_, sp_attention
from dbsp.dist.layout import block_token_ids, rank_layout, shard_sizes
from dbsp.dist.predict import predict_mask_sharded
from dbsp.plan import CostModel, Plan, choose_degrees, dense_heads, make_plan
from dbsp.predict import DENSE_CROSSOVER, predict_mask
from dbsp.video import get_shape, make_workload

# name -> make_workload options
WORKLOADS = {
    "skewed": dict(skew=1.0),
    "mild": dict(skew=0.3),
    "regional": dict(skew=1.0, region_skew=0.5),
    "full": dict(skew=1.0),
}


@dataclass(frozen=True)
class Config:
    """One way to run the layer: degrees and an optional plan."""

    name: str
    family: str  # ulysses, ring, usp, dbsp-head, dbsp-block, dbsp-both, dbsp-auto
    ulysses: int
    ring: int
    plan: Plan | None = field(default=None, compare=False)

    @property
    def unbalanced(self) -> bool:
        return self.family in ("ulysses", "ring", "usp")


# --quick (the CPU smoke run): tiny and sparse enough that plans differ; CPU timings say nothing
# about GPUs.
QUICK = dict(shape="cpu-tiny", layers=1, repeats=2, q_block=16, top_p=0.6, dense_above=None)


def degrees(world: int, heads: int, num_blocks: int) -> list[tuple[int, int]]:
    """Every (U, R) with U * R = world, U dividing the heads and R at most the blocks; U descending."""
    return [(u, world // u) for u in range(world, 0, -1) if world % u == 0 and heads % u == 0 and world // u <= num_blocks]


def make_configs(mask: SparseMask, work: torch.Tensor, world: int, cost: CostModel, *, head_dim: int) -> list[Config]:
    """Every configuration of the comparison for this layer's mask (``work = mask.work()``); dbsp
    plans balance the cost model's predicted time (``make_plan(cost_model=cost)``) and weigh the
    local block layout too (``local_blocks=True``)."""
    H, S, M = mask.heads, mask.seq_len_q, mask.q_block
    pairs = degrees(world, H, mask.num_q_blocks)
    out = []
    for u, r in pairs:
        family = "ulysses" if r == 1 else "ring" if u == 1 else "usp"
        out.append(Config(f"{family} U{u}R{r}", family, u, r))
    common = dict(q_block=M, seq_len=S)
    for u, r in pairs:
        levels = []
        if u > 1:
            levels.append(("dbsp-head", dict(balance_blocks=False)))
        if r > 1:
            levels.append(("dbsp-block", dict(balance_heads=False)))
        if u > 1 and r > 1:
            levels.append(("dbsp-both", {}))
        for family, options in levels:
            plan = make_plan(work, ulysses=u, ring=r, **options, **common, cost_model=cost, head_dim=head_dim, local_blocks=True)
            out.append(Config(f"{family} U{u}R{r}", family, u, r, plan))
    u, r, plan = choose_degrees(work, world=world, heads=H, cost_model=cost, head_dim=head_dim, local_blocks=True, **common)
    out.append(Config(f"dbsp-auto U{u}R{r}", "dbsp-auto", u, r, plan))
    return out


def layout_of(cfg: Config, rank: int, mask: SparseMask, device):
    """The runtime's layout of ``rank`` under ``cfg`` (what ``sp_attention`` would build)."""
    plan = cfg.plan
    common = dict(seq_len=mask.seq_len_q, q_block=mask.q_block, heads=mask.heads, ulysses=cfg.ulysses, ring=cfg.ring,
                  rank=rank, device=device)
    if plan is None:
        return rank_layout(**common)
    k = rank % cfg.ulysses
    return rank_layout(**common, head_perm=plan.head_perm, head_offsets=plan.head_offsets,
                       q_blocks=plan.q_blocks[k], kv_blocks=plan.kv_blocks[k])


def _key_digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


def call_ms(fn, device: torch.device) -> float:
    """Milliseconds of one call of ``fn``: CUDA events around it on GPU, the host clock on CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()  # timing only
    return start.elapsed_time(end)


class ProblemSet:
    """The distinct local problems of a layer, keyed by content and timed interleaved.

    A local problem is one rank's work at one ring step, as the runtime does it: ``sparse_attention``
    of its query tokens and heads against one key chunk, under its sub-mask; in a ring (``lse``)
    with float32 output and the lse, and, at a step after the rank's first with work (``merge``),
    the merge of that output into the running one (``merge_attention_``, into a float32 buffer of
    the same shape kept per shape). Its time depends on the shapes, the dtype, ``lse``, ``merge``
    and the sub-mask's content (which tiles are selected, hence which heads are dense), not on
    which heads or tokens they are. :meth:`add` keys a problem on exactly that (sizes, dtype, lse,
    merge, the sub-mask's block sizes and lengths, a hash of its offsets; candidates with the same
    key are compared index by index), so ranks with identical work share one entry and one time:
    an even layout measures as even.

    :meth:`time` times every problem added since the last call, interleaved: one warm-up call
    each (autotuning), then ``repeats`` rounds that each call every problem once, in a fresh
    random order every round (seeded), one timing per call (CUDA events on GPU, ``perf_counter``
    on CPU; inputs are gathered outside the timed region). The time of a problem is its median
    over the rounds, so a drift of the GPU's clock during the run shifts every problem alike, and
    the shuffle keeps a problem from always following the same neighbour (a heavy call before it
    leaves the GPU hotter and its clock lower). ``spread[p]`` is the relative interquartile range
    of its rounds and ``samples[p]`` the rounds' times in round order (:func:`rho_interval`).
    """

    def __init__(self, w, *, repeats: int, warmup: bool = True, features: list | None = None, seed: int = 0):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.w, self.repeats, self.warmup, self.features = w, repeats, warmup, features
        self._rng = random.Random(seed)
        self._index: dict[tuple, list[int]] = {}
        self._specs: list[tuple] = []  # (heads, q token ids, kv token ids, sub-mask, lse, merge)
        self._running: dict[tuple, tuple] = {}  # (tokens, heads) -> the running (out, lse) merged into
        self.ms: list[float | None] = []
        self.spread: list[float] = []
        self.samples: list[list[float]] = []
        self.live: list[int] = []  # non-empty (batch, head, query block) rows: kernel programs with work

    def __len__(self) -> int:
        return len(self._specs)

    def add(self, heads: torch.Tensor, q_tok: torch.Tensor, kv_tok: torch.Tensor, sub: SparseMask, lse: bool,
            merge: bool = False) -> int:
        """The id of this problem (a new one only if no equal problem was added before); ``merge``
        needs ``lse``."""
        if merge and not lse:
            raise ValueError("a merged step is a ring step: merge=True needs lse=True")
        B, S, H, D = self.w.q.shape
        key = (int(heads.numel()), int(q_tok.numel()), int(kv_tok.numel()), bool(lse), bool(merge), str(self.w.q.dtype), B, D,
               sub.q_block, sub.kv_tile, sub.seq_len_q, sub.seq_len_kv, int(sub.indices.numel()), _key_digest(sub.offsets))
        same = self._index.setdefault(key, [])
        for p in same:
            if torch.equal(self._specs[p][3].indices, sub.indices):
                return p
        same.append(len(self._specs))
        self._specs.append((heads, q_tok, kv_tok, sub, lse, merge))
        self.ms.append(None)
        self.spread.append(0.0)
        self.samples.append([])
        self.live.append(int((sub.offsets[..., 1:] > sub.offsets[..., :-1]).sum()))
        return len(self._specs) - 1

    def _once(self, p: int, timed: bool) -> float:
        heads, q_tok, kv_tok, sub, lse, merge = self._specs[p]
        w = self.w
        q = w.q.index_select(1, q_tok).index_select(2, heads)
        kk = w.k.index_select(1, kv_tok).index_select(2, heads)
        vv = w.v.index_select(1, kv_tok).index_select(2, heads)
        if not lse:
            call = lambda: sparse_attention(q, kk, vv, sub)  # noqa: E731
        else:
            running = self._running_for(q) if merge else None

            def call():
                o, l = sparse_attention(q, kk, vv, sub, return_lse=True, out_dtype=torch.float32)
                if running is not None:
                    merge_attention_(*running, o, l)
        if not timed:
            call()
            return 0.0
        return call_ms(call, w.q.device)

    def _running_for(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A running ``(out, lse)`` of ``q``'s shape to merge into (its values do not matter)."""
        B, L, H, D = q.shape
        if (L, H) not in self._running:
            self._running[L, H] = (torch.zeros(B, L, H, D, device=q.device), torch.zeros(B, H, L, device=q.device))
        return self._running[L, H]

    def time(self) -> None:
        """Time every problem not timed yet (class docstring); fills ``ms`` and ``spread``."""
        todo = [p for p, ms in enumerate(self.ms) if ms is None]
        if self.warmup:
            for p in todo:
                self._once(p, timed=False)
        for _ in range(self.repeats):
            for p in self._rng.sample(todo, len(todo)):
                self.samples[p].append(self._once(p, timed=True))
        for p in todo:
            xs = self.samples[p]
            med = statistics.median(xs)
            q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (med, med, med)
            self.ms[p], self.spread[p] = med, ((q3 - q1) / med if med > 0 else 0.0)
            if self.features is not None:
                self.features.append(self._feature(p))

    def _feature(self, p: int) -> dict:
        """One row of ``sp_problems.csv`` (the cost model's calibration input)."""
        heads, q_tok, kv_tok, sub, lse, merge = self._specs[p]
        # Heads whose every tile is selected go to dense SDPA (cuDNN) under backend="auto".
        counts, work = sub.row_counts(), sub.work()
        dense = (counts == sub.num_kv_tiles).all(dim=2).all(dim=0)
        ids = torch.nonzero(dense).reshape(-1).tolist()
        # Consecutive dense heads reach SDPA as a view; others are gathered (a copy) in mixed calls.
        consecutive = not ids or ids == list(range(ids[0], ids[-1] + 1))
        sparse = torch.nonzero(~dense).reshape(-1)
        shape = sparse_shape(sub.select_heads(sparse)) if sparse.numel() else dict(row_peak=0.0, contiguity=0.0)
        return dict(batch=int(self.w.q.shape[0]), heads=int(heads.numel()), q_tokens=int(q_tok.numel()), kv_tokens=int(kv_tok.numel()),
                    q_block=sub.q_block, kv_tile=sub.kv_tile, lse=int(lse), merge=int(merge), rows=self.live[p],
                    entries=int(work.sum()), dense_heads=int(dense.sum()), dense_entries=int(work[:, dense].sum()),
                    dense_consecutive=int(consecutive), sparse_row_peak=shape["row_peak"],
                    sparse_contiguity=shape["contiguity"],
                    density=round(sub.density(), 4), ms=round(self.ms[p], 4), spread=round(self.spread[p], 4))

    def spread_summary(self) -> str:
        """Median and largest relative IQR of the timed problems, for the log."""
        xs = sorted(x for x, ms in zip(self.spread, self.ms) if ms is not None)
        if not xs:
            return "no problems timed"
        return (f"timing spread (relative IQR over {self.repeats} interleaved rounds): median {100 * statistics.median(xs):.2f}%, "
                f"90th percentile {100 * xs[int(0.9 * (len(xs) - 1))]:.2f}%, max {100 * xs[-1]:.2f}%")


def sparse_shape(mask: SparseMask) -> dict:
    """Two shape features of a (sparse heads') mask for ``sp_problems.csv``, so that the cost
    model's residuals can be checked against them: ``row_peak``, the largest query-block row's
    tile count over the mean row's (the kernel's longest program), and ``contiguity``, the share of
    kept tiles whose left neighbour in the row is kept too (runs of keys read in order)."""
    counts = mask.row_counts().reshape(-1).double()
    idx = mask.indices.long()
    if idx.numel() == 0:
        return dict(row_peak=0.0, contiguity=0.0)
    rows = mask._entry_rows()
    adjacent = (rows[1:] == rows[:-1]) & (idx[1:] == idx[:-1] + 1)
    return dict(row_peak=round(float(counts.max() / counts.mean()), 4),
                contiguity=round(float(adjacent.sum()) / idx.numel(), 4))


@dataclass
class Emulated:
    config: Config
    steps: torch.Tensor  # (U, R, R): compute ms of ring rank i in head group k at step t
    all_to_all_ms: float
    exchange_ms: float
    ring_ms: float
    slice_ms: float  # slowest rank's sub-mask construction (host + device work per call)
    moved_tokens: int

    @property
    def total_ms(self) -> float:
        return self.all_to_all_ms + self.exchange_ms + self.ring_ms

    @property
    def rank_ms(self) -> torch.Tensor:
        """(U, R) compute per rank, summed over its ring steps."""
        return self.steps.sum(-1)

    @property
    def max_over_mean(self) -> float:
        """max / mean of the per-rank compute totals (ignores the ring's per-step waits)."""
        mean = float(self.rank_ms.mean())
        return float(self.rank_ms.max()) / mean if mean > 0 else 1.0

    @property
    def rho_measured(self) -> float:
        """rho_s of the measured times: max_k sum_t max_i steps / mean rank compute."""
        mean = float(self.rank_ms.mean())
        return float(self.steps.max(dim=1).values.sum(-1).max()) / mean if mean > 0 else 1.0


def collect(cfg: Config, w, mask: SparseMask, problems: ProblemSet, *, ranks=None):
    """Register the local problems of ``ranks`` (default: all) under ``cfg`` in ``problems``.

    Returns ``(ids, slice_ms, layouts)``: ``ids[k, i, t]`` the problem of ring rank ``i`` of head
    group ``k`` at ring step ``t`` (-1 for empty steps and ranks not collected here), the slowest
    sub-mask construction, and every rank's layout.
    """
    U, R = cfg.ulysses, cfg.ring
    S = w.q.shape[1]
    ids = torch.full((U, R, R), -1, dtype=torch.int64)
    slice_ms = 0.0
    layouts = [layout_of(cfg, r, mask, w.q.device) for r in range(U * R)]
    for r, lay in enumerate(layouts):
        if ranks is not None and r not in ranks:
            continue
        i, k = lay.ring_rank, lay.ulysses_rank
        t0 = time.perf_counter()
        subs = lay.local_masks(mask)
        if w.q.device.type == "cuda":
            torch.cuda.synchronize()  # timing only
        slice_ms = max(slice_ms, 1e3 * (time.perf_counter() - t0))
        heads = torch.as_tensor(lay.heads, device=w.q.device)
        q_tok = block_token_ids(lay.q_blocks[i], S, mask.q_block).to(w.q.device)
        merged = False  # a step after the rank's first with work merges into the running result
        for t, sub in enumerate(subs):
            if sub is None:
                continue
            kv_tok = block_token_ids(lay.kv_blocks[(i + t) % R], S, mask.q_block).to(w.q.device)
            ids[k, i, t] = problems.add(heads, q_tok, kv_tok, sub, R > 1, merge=merged)
            merged = R > 1
    return ids, slice_ms, layouts


def step_times(ids: torch.Tensor, problems: ProblemSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(steps, rows)`` ``(U, R, R)``: each step's timed ms and live rows (0 where ``ids`` is -1)."""
    steps = torch.zeros(ids.shape, dtype=torch.float64)
    rows = torch.zeros(ids.shape, dtype=torch.float64)
    for idx in torch.nonzero(ids >= 0).tolist():
        p = int(ids[tuple(idx)])
        steps[tuple(idx)], rows[tuple(idx)] = problems.ms[p], problems.live[p]
    return steps, rows


def rho_interval(ids: torch.Tensor, problems: ProblemSet, *, draws: int = 400, level: float = 0.9,
                 seed: int = 0) -> tuple[float, float]:
    """How far timing noise alone moves ``Emulated.rho_measured``: its central ``level`` interval
    over ``draws`` bootstrap resamples of the timing rounds.

    A draw picks ``repeats`` rounds with replacement, the same rounds for every problem (a round is
    one pass over all of them, so its problems share the GPU's state), takes each problem's median
    over them and recomputes rho_s from the steps of ``ids``. ``(rho, rho)`` when the rounds agree.
    """
    used = sorted({int(p) for p in ids[ids >= 0].tolist()})
    if not used:
        return 1.0, 1.0
    times = torch.tensor([problems.samples[p] for p in used], dtype=torch.float64)  # (problems, rounds)
    n_rounds = times.shape[1]
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(n_rounds, (draws, n_rounds), generator=gen)
    # Median as statistics.median takes it (the mean of the middle two of an even count).
    ms = times[:, picks].sort(dim=-1).values  # (problems, draws, rounds)
    ms = 0.5 * (ms[..., (n_rounds - 1) // 2] + ms[..., n_rounds // 2])
    where = {p: j for j, p in enumerate(used)}
    col = torch.tensor([where.get(int(p), 0) for p in ids.reshape(-1).tolist()])
    steps = ms.T[:, col].reshape(draws, *ids.shape) * (ids >= 0)  # (draws, U, R, R)
    mean = steps.sum(-1).mean(dim=(1, 2))
    rho = steps.max(dim=2).values.sum(-1).max(dim=1).values / mean.clamp_min(1e-30)
    rho = torch.where(mean > 0, rho, torch.ones_like(rho))
    lo, hi = torch.quantile(rho, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def local_steps(cfg: Config, w, mask: SparseMask, problems: ProblemSet, *, ranks=None):
    """Collect and time the local problems of ``ranks`` under ``cfg`` (problems timed before are
    reused); returns ``(steps, rows, slice_ms, layouts)`` as :func:`collect` and :func:`step_times`."""
    ids, slice_ms, layouts = collect(cfg, w, mask, problems, ranks=ranks)
    problems.time()
    steps, rows = step_times(ids, problems)
    return steps, rows, slice_ms, layouts


def model_comm(cfg: Config, steps: torch.Tensor, layouts, w, mask: SparseMask, *, latency_ms: float,
               a2a_bytes_s: float, p2p_bytes_s: float, slice_ms: float = 0.0) -> Emulated:
    """Add communication to measured per-rank compute: the emulated time of the call (module doc)."""
    U, R = cfg.ulysses, cfg.ring
    B, S, H, D = w.q.shape
    lat = latency_ms
    token_bytes = B * D * w.q.element_size()
    offsets = layouts[0].head_offsets
    heads_k = [offsets[j + 1] - offsets[j] for j in range(U)]
    # Ulysses: q, k, v there and o back; each rank sends (U - 1) / U of each shard.
    a2a = 0.0
    if U > 1:
        shard = max(shard_sizes(S, U * R)) * H * token_bytes
        a2a = 2 * lat + 1e3 * 4 * shard * (U - 1) / U / a2a_bytes_s
    # Block exchange: q and o (one all-to-all each) and k with v (one, packed) of the moved tokens;
    # a collective lasts as long as the rank that sends or receives the most.
    exch = 0.0
    for kind, collectives, tensors in (("q", 2, 1), ("kv", 1, 2)):
        busiest = max(
            max(getattr(lay, f"{kind}_exchange").moved_tokens, getattr(lay, f"{kind}_exchange").received_tokens)
            * heads_k[lay.ulysses_rank]
            for lay in layouts
        )
        if busiest:
            exch += collectives * (lat + 1e3 * tensors * busiest * token_bytes / a2a_bytes_s)
    # Ring: step t waits for its slowest rank and for the next K/V chunk (2 tensors).
    ring = 0.0
    for k in range(U):
        lay_k = layouts[k]
        total = 0.0
        for t in range(R):
            compute = float(steps[k, :, t].max())
            if t + 1 < R:
                incoming = max(lay_k.kv_lens[(i + t + 1) % R] for i in range(R))
                p2p = lat + 1e3 * 2 * incoming * heads_k[k] * token_bytes / p2p_bytes_s
                compute = max(compute, p2p)
            total += compute
        ring = max(ring, total)
    moved = sum(lay.q_exchange.moved_tokens + lay.kv_exchange.moved_tokens for lay in layouts)
    return Emulated(cfg, steps, a2a, exch, ring, slice_ms, moved)


def make_mask(w, kind: str, args) -> SparseMask:
    B, S, H, _ = w.q.shape
    if kind == "full":
        return SparseMask.full(B, H, S, S, q_block=args.q_block, kv_tile=args.kv_tile, device=w.q.device)
    return predict_mask(w.q, w.k, q_block=args.q_block, kv_tile=args.kv_tile, top_p=args.top_p, dense_above=args.dense_above)


def _predicted(cfg, mask, work, cost, w, full_heads, element_bytes: int):
    """``(plan with tile work, the cost model's Prediction)`` of one configuration (unbalanced
    ones: the identity layout)."""
    sizes = dict(ulysses=cfg.ulysses, ring=cfg.ring, q_block=mask.q_block, seq_len=mask.seq_len_q)
    tiled = cfg.plan if cfg.plan is not None else Plan.identity(heads=mask.heads, **sizes).with_tile_work(work)
    return tiled, cost.predict(tiled, head_dim=w.head_dim, batch=w.batch, element_bytes=element_bytes,
                               kv_tile=mask.kv_tile, dense_heads=full_heads)


def _print_predicted(kind, layer, configs, mask, work, cost, w, full_heads, t_plan) -> None:
    """``--plan-only``: every configuration's predicted time (the cost model), nothing timed."""
    print(f"  {kind} layer {layer}: density {mask.density():.3f}, {len(full_heads)} dense heads, {len(configs)} configs "
          f"(planned in {t_plan:.1f} s); predicted ms:")
    for cfg in configs:  # bf16 bytes, as the GPU run moves
        tiled, pred = _predicted(cfg, mask, work, cost, w, full_heads, 2)
        print(f"    {cfg.name:<22} {pred.total_ms:8.2f}   rho tiles {tiled.imbalance():.3f}, time {pred.compute_imbalance:.3f}")


def run_emulate(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    P = args.emulate
    cost = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    bw = (args.bandwidth_gbps or cost.nvlink_gbps) * 1e9
    shape = get_shape(args.shape)
    print(f"emulated {P} ranks on one {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; "
          f"shape {shape.name} (H {shape.heads}, S {shape.geometry.num_tokens}, D {shape.head_dim}), "
          f"{args.q_block}x{args.kv_tile} masks, {dtype}; comm {bw / 1e9:.0f} GB/s, {cost.comm_latency_us} us latency")
    rows, rank_rows, results, problems, tiles = [], [], {}, [], []
    for kind in args.workloads:
        layers = 1 if kind == "full" else args.layers
        for layer in range(layers):
            t0 = time.perf_counter()
            w = make_workload(shape, layer=layer, seed=args.seed, **WORKLOADS[kind], device=device, dtype=dtype)
            mask = make_mask(w, kind, args)
            work = mask.work().cpu()  # the planner runs on the host (the path the CPU smoke run tests)
            full_heads = dense_heads(mask)
            t_plan = time.perf_counter()
            configs = make_configs(mask, work, P, cost, head_dim=w.head_dim)
            t_plan = time.perf_counter() - t_plan
            if args.plan_only:
                _print_predicted(kind, layer, configs, mask, work, cost, w, full_heads, t_plan)
                del w, mask, work
                continue
            # Every configuration's local problems first, then all of them timed together, interleaved.
            pset = ProblemSet(w, repeats=args.repeats, warmup=not args.quick, features=problems)
            collected = [collect(cfg, w, mask, pset) for cfg in configs]
            pset.time()
            for cfg, (ids, slice_ms, layouts) in zip(configs, collected):
                steps, live = step_times(ids, pset)
                em = model_comm(cfg, steps, layouts, w, mask, latency_ms=cost.comm_latency_us * 1e-3, a2a_bytes_s=bw,
                                p2p_bytes_s=bw, slice_ms=slice_ms)
                tiled, pred = _predicted(cfg, mask, work, cost, w, full_heads, w.q.element_size())
                rho_plan = tiled.imbalance()
                rho_model = pred.compute_imbalance  # the cost model's own per-step compute times
                rho_lo, rho_hi = rho_interval(ids, pset)
                results[(kind, layer, cfg.name)] = em
                tiles.append(_tile_record(kind, layer, cfg, mask, tiled, em, live))
                rows.append(dict(
                    mode="emulated", workload=kind, layer=layer, config=cfg.name, family=cfg.family, U=cfg.ulysses, R=cfg.ring,
                    density=round(mask.density(), 4), total_ms=round(em.total_ms, 3), ring_ms=round(em.ring_ms, 3),
                    all_to_all_ms=round(em.all_to_all_ms, 3), exchange_ms=round(em.exchange_ms, 3), slice_ms=round(em.slice_ms, 3),
                    max_rank_ms=round(float(em.rank_ms.max()), 3), mean_rank_ms=round(float(em.rank_ms.mean()), 3),
                    rho_planned=round(rho_plan, 4), rho_model=round(rho_model, 4), rho_measured=round(em.rho_measured, 4),
                    rho_measured_lo=round(rho_lo, 4), rho_measured_hi=round(rho_hi, 4),
                    max_over_mean=round(em.max_over_mean, 4), predicted_ms=round(pred.total_ms, 3),
                    moved_tokens=em.moved_tokens,
                ))
                for r in range(P):
                    k, i = r % cfg.ulysses, r // cfg.ulysses
                    rank_rows.append(dict(workload=kind, layer=layer, config=cfg.name, rank=r, k=k, i=i,
                                          compute_ms=round(float(em.rank_ms[k, i]), 4)))
            print(f"  {kind} layer {layer}: density {mask.density():.3f}, {len(full_heads)} dense heads, {len(configs)} configs "
                  f"(planned in {t_plan:.1f} s), {len(pset)} distinct local problems, {time.perf_counter() - t0:.1f} s; "
                  f"{pset.spread_summary()}")
            del w, mask, work, pset, collected
    if args.plan_only:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sp.csv", rows)
    write_csv(out / "sp_ranks.csv", rank_rows)
    write_csv(out / "sp_problems.csv", problems)
    torch.save(tiles, out / "sp_tiles.pt")
    _summarise(rows, results, args, out)
    return 0


def _tile_record(kind: str, layer: int, cfg: Config, mask: SparseMask, tiled: Plan, em: Emulated, live) -> dict:
    """What an offline cost-model fit needs about one configuration of one layer (``sp_tiles.pt``):
    the planned tile work, the measured per-step compute and live rows, and the communication."""
    return dict(workload=kind, layer=layer, config=cfg.name, family=cfg.family, U=cfg.ulysses, R=cfg.ring,
                q_block=mask.q_block, kv_tile=mask.kv_tile, heads=mask.heads, seq_len=mask.seq_len_q,
                density=mask.density(), heads_per_rank=tiled.heads_per_rank, tile_work=tiled.tile_work.clone(),
                steps_ms=em.steps.clone(), rows=live.clone(), all_to_all_ms=em.all_to_all_ms,
                exchange_ms=em.exchange_ms, ring_ms=em.ring_ms, total_ms=em.total_ms)


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV with the first row's keys as the header (nothing written for no rows)."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summarise(rows: list[dict], results: dict, args, out: Path) -> None:
    """Print the table and the targets; draw the per-rank and speedup plots."""
    print(f"\n{'workload':<8} {'layer':>5} {'config':<20} {'total ms':>9} {'ring':>8} {'a2a':>7} {'exch':>6} {'slice':>6} "
          f"{'rho tiles':>9} {'rho time':>8} {'rho meas':>8} {'pred ms':>8}")
    for row in rows:
        print(f"{row['workload']:<8} {row['layer']:>5} {row['config']:<20} {row['total_ms']:>9.2f} {row['ring_ms']:>8.2f} "
              f"{row['all_to_all_ms']:>7.2f} {row['exchange_ms']:>6.2f} {row['slice_ms']:>6.1f} {row['rho_planned']:>9.3f} "
              f"{row['rho_model']:>8.3f} {row['rho_measured']:>8.3f} {row['predicted_ms']:>8.2f}")
    print("\nAll times are EMULATED (per-rank kernels timed on one device, communication from the cost model).")
    if args.quick:
        print("QUICK CPU smoke run: the reference backend's CPU time does not follow the mask; targets are not meaningful.")
    speedups, before_after = {}, None
    for kind in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == kind]
        layers = sorted({r["layer"] for r in mine})
        fixed = {}
        for r in mine:
            if r["family"] in ("ulysses", "ring", "usp"):
                fixed[r["config"]] = fixed.get(r["config"], 0.0) + r["total_ms"]
        base_name = min(fixed, key=fixed.get)
        auto = [next(r for r in mine if r["layer"] == layer and r["family"] == "dbsp-auto") for layer in layers]
        base = [next(r for r in mine if r["layer"] == layer and r["config"] == base_name) for layer in layers]
        oracle = [
            min((r for r in mine if r["layer"] == layer and r["family"].startswith("dbsp")), key=lambda r: r["total_ms"])
            for layer in layers
        ]
        per_layer = [b["total_ms"] / a["total_ms"] for a, b in zip(auto, base)]
        total = sum(b["total_ms"] for b in base) / sum(a["total_ms"] for a in auto)
        oracle_total = sum(b["total_ms"] for b in base) / sum(o["total_ms"] for o in oracle)
        speedups[kind] = per_layer
        print(f"\n{kind}: best fixed unbalanced = {base_name} ({fixed[base_name]:.1f} ms over {len(layers)} layers); "
              f"dbsp-auto picks {[a['config'].split()[-1] for a in auto]}")
        print(f"  dbsp-auto speedup {total:.3f}x (per layer min {min(per_layer):.3f} / median {statistics.median(per_layer):.3f} / "
              f"max {max(per_layer):.3f}); best dbsp config per layer {oracle_total:.3f}x")
        errs = [abs(r["rho_measured"] / r["rho_planned"] - 1) for r in mine if r["family"].startswith("dbsp")]
        errs_model = [abs(r["rho_measured"] / r["rho_model"] - 1) for r in mine if r["family"].startswith("dbsp")]
        worst = max((r for r in mine if r["family"].startswith("dbsp")), key=lambda r: abs(r["rho_measured"] / r["rho_model"] - 1))
        print(f"  rho_s measured vs planned, dbsp configs: in predicted time (the cost model's per-step compute, what the "
              f"planner balances): max deviation {100 * max(errs_model):.1f}% (layer {worst['layer']} {worst['config']}: "
              f"{worst['rho_measured']:.3f} vs {worst['rho_model']:.3f}), median {100 * statistics.median(errs_model):.1f}%; "
              f"in tile entries: max {100 * max(errs):.1f}%, median {100 * statistics.median(errs):.1f}%")
        # Timing noise alone: the measured rho_s's 90% interval over resampled rounds (rho_interval).
        noisy = [r for r in mine if r["family"].startswith("dbsp") and "rho_measured_lo" in r]
        if noisy:
            reach = sum(r["rho_measured_lo"] <= 1.05 * r["rho_model"] and r["rho_measured_hi"] >= r["rho_model"] / 1.05
                        for r in noisy)
            print(f"  timing noise: the worst row's measured rho_s spans {worst['rho_measured_lo']:.3f}-"
                  f"{worst['rho_measured_hi']:.3f} over resampled rounds (90%); {reach}/{len(noisy)} dbsp rows' "
                  f"intervals reach within 5% of the prediction")
        target = {
            "skewed": ("target 1: >= 1.5x", 1.5),
            "regional": ("target 1 (skewed): >= 1.5x", 1.5),
            "mild": ("target 1: >= 1.2x", 1.2),
            "full": ("target 3: >= 1/1.03 = 0.971x", 1 / 1.03),
        }.get(kind)
        if target:
            print(f"  {target[0]}: {'PASS' if total >= target[1] else 'FAIL'} ({total:.3f}x)")
        print(f"  target 2 (measured rho_s within 5% of the planner's predicted-time rho_s): "
              f"{'PASS' if max(errs_model) <= 0.05 else 'FAIL'} (max {100 * max(errs_model):.1f}%)")
        if before_after is None:
            before_after = (kind, layers[0], base_name, auto[0]["config"])
    _print_agreement(rows, "the emulated times")
    _plot(results, before_after, speedups, out)


def model_agreement(rows: list[dict]) -> tuple[int, int, int, int]:
    """Issue 6 target 3: ``(pairs ordered alike, pairs, predictions within 20%, configurations)``.

    Within each (workload, layer), every pair of configurations whose measured times differ by
    at least 1% counts; a pair agrees when the cost model orders it the same way.
    """
    agree = pairs = within = n = 0
    for key in dict.fromkeys((r["workload"], r["layer"]) for r in rows):
        mine = [r for r in rows if (r["workload"], r["layer"]) == key]
        for a, b in itertools.combinations(mine, 2):
            if abs(a["total_ms"] - b["total_ms"]) >= 0.01 * max(a["total_ms"], b["total_ms"]):
                pairs += 1
                agree += (a["predicted_ms"] < b["predicted_ms"]) == (a["total_ms"] < b["total_ms"])
        n += len(mine)
        within += sum(abs(r["predicted_ms"] / r["total_ms"] - 1) <= 0.2 for r in mine)
    return agree, pairs, within, n


def _print_agreement(rows: list[dict], what: str) -> None:
    agree, pairs, within, n = model_agreement(rows)
    if pairs and n:
        print(f"cost model vs {what}: ranking agrees on {agree}/{pairs} pairs ({100 * agree / pairs:.1f}%, target 80%); "
              f"predictions within 20%: {within}/{n} ({100 * within / n:.1f}%)")


def _plot(results: dict, before_after, speedups: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    kind, layer, before, after = before_after
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, name in zip(axes, (before, after)):
        em = results[(kind, layer, name)]
        U, R = em.config.ulysses, em.config.ring
        ranks = list(range(U * R))
        bottom = [0.0] * len(ranks)
        for t in range(R):
            vals = [float(em.steps[r % U, r // U, t]) for r in ranks]
            ax.bar(ranks, vals, bottom=bottom, label=f"step {t}" if R > 1 else "compute")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axhline(sum(bottom) / len(bottom), color="k", ls="--", lw=1, label="mean")
        ax.set_title(f"{name}: step time {em.total_ms:.1f} ms, rho_s {em.rho_measured:.2f}")
        ax.set_xlabel("rank")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("compute per rank, ms (emulated)")
    fig.suptitle(f"{kind} workload, layer {layer}: per-rank work before / after dbsp (emulated)")
    fig.tight_layout()
    fig.savefig(out / "sp_ranks.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, values in speedups.items():
        ax.plot(range(len(values)), values, "o-", label=kind)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("dbsp-auto speedup vs best fixed USP (emulated)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sp_speedup.png", dpi=120)
    print(f"wrote {out / 'sp.csv'}, {out / 'sp_ranks.csv'}, {out / 'sp_ranks.png'}, {out / 'sp_speedup.png'}")


def _timed(fn, device: torch.device, repeats: int, group=None) -> float:
    """Median wall ms of a collective or transfer: all ranks start together, one warm-up call."""
    times = []
    for _ in range(1 + repeats):
        dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize()  # timing only
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()  # timing only
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def comm_bench(groups: dict, shape, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict]:
    """Measured all-to-all (Ulysses group) and ring P2P (ring group) at this run's message sizes.

    Bandwidth = bytes each rank sends / median time (per GPU and direction, as the cost model
    counts it); latency = the median time of a 1-token message. Every rank runs every transfer.
    """
    S, H, D = shape.geometry.num_tokens, shape.heads, shape.head_dim
    P = dist.get_world_size()
    elem = torch.finfo(dtype).bits // 8
    rows = []
    for (u, r), g in groups.items():
        shard = -(-S // P)
        if u > 1:
            for tokens in (1, shard):
                x = torch.randn(u, tokens * (H // u) * D, device=device, dtype=dtype)
                y = torch.empty_like(x)
                ms = _timed(lambda: dist.all_to_all_single(y, x, group=g.ulysses_group), device, repeats)
                sent = x.numel() * elem * (u - 1) // u
                rows.append(dict(kind="all_to_all", U=u, R=r, tokens=tokens, bytes_per_rank=sent, ms=round(ms, 4),
                                 GBps=round(sent / ms / 1e6, 2)))
        if r > 1:
            me = dist.get_rank(g.ring_group)
            nxt = dist.get_global_rank(g.ring_group, (me + 1) % r)
            prv = dist.get_global_rank(g.ring_group, (me - 1) % r)
            for tokens in (1, shard):
                send = [torch.randn(tokens, H // u, D, device=device, dtype=dtype) for _ in range(2)]  # K and V
                recv = [torch.empty_like(x) for x in send]

                def p2p():
                    ops = [dist.P2POp(dist.isend, x, nxt, group=g.ring_group) for x in send]
                    ops += [dist.P2POp(dist.irecv, x, prv, group=g.ring_group) for x in recv]
                    for work in dist.batch_isend_irecv(ops):
                        work.wait()

                ms = _timed(p2p, device, repeats)
                sent = 2 * send[0].numel() * elem
                rows.append(dict(kind="ring_p2p", U=u, R=r, tokens=tokens, bytes_per_rank=sent, ms=round(ms, 4),
                                 GBps=round(sent / ms / 1e6, 2)))
    return rows


def _comm_rates(rows: list[dict], cost: CostModel) -> tuple[float, float, float]:
    """(latency ms, all-to-all bytes/s, P2P bytes/s) from ``comm_bench``; the cost model where a
    kind was not measured (a world of one)."""
    big = {kind: [r for r in rows if r["kind"] == kind and r["tokens"] > 1] for kind in ("all_to_all", "ring_p2p")}
    small = [r["ms"] for r in rows if r["tokens"] == 1]
    lat = statistics.median(small) if small else cost.comm_latency_us * 1e-3
    rate = {k: statistics.median(r["GBps"] for r in v) * 1e9 if v else cost.nvlink_gbps * 1e9 for k, v in big.items()}
    return lat, rate["all_to_all"], rate["ring_p2p"]


def run_real(args) -> int:
    """``sp_attention`` on real processes (launch with torchrun); rank 0 writes the CSVs (module doc)."""
    if "RANK" not in os.environ:
        raise SystemExit("--real runs under torchrun, e.g. torchrun --nproc_per_node 2 benchmarks/bench_sp.py --real --out DIR")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = get_shape(args.shape)
    groups = SPGroups.all_degrees(heads=shape.heads)
    cost = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    say = print if rank == 0 else (lambda *a, **k: None)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    say(f"real {P}-process run ({'NCCL' if cuda else 'gloo'}, {name}); shape {shape.name} (H {shape.heads}, "
        f"S {shape.geometry.num_tokens}, D {shape.head_dim}), {args.q_block}x{args.kv_tile} masks, {dtype}")
    comm = comm_bench(groups, shape, dtype, device, args.repeats)
    lat, a2a_bw, p2p_bw = _comm_rates(comm, cost)
    for row in comm:
        say(f"  {row['kind']:<10} U{row['U']}R{row['R']} {row['bytes_per_rank'] / 1e6:9.3f} MB/rank {row['ms']:8.3f} ms "
            f"{row['GBps']:8.1f} GB/s")
    say(f"  -> latency {1e3 * lat:.1f} us, all-to-all {a2a_bw / 1e9:.1f} GB/s, ring P2P {p2p_bw / 1e9:.1f} GB/s per GPU")
    rows, rank_rows, problems = [], [], []
    for kind in args.workloads:
        for layer in range(1 if kind == "full" else args.layers):
            t_layer = time.perf_counter()
            w = make_workload(shape, layer=layer, seed=args.seed, **WORKLOADS[kind], device=device, dtype=dtype)
            sizes = shard_sizes(w.seq_len, P)
            lo = sum(sizes[:rank])
            q, k, v = (x[:, lo : lo + sizes[rank]].contiguous() for x in (w.q, w.k, w.v))
            if kind == "full":
                mask = SparseMask.full(w.batch, w.heads, w.seq_len, w.seq_len, q_block=args.q_block, kv_tile=args.kv_tile,
                                       device=device)
            else:
                mask = predict_mask_sharded(q, k, groups=next(iter(groups.values())), q_block=args.q_block,
                                            kv_tile=args.kv_tile, top_p=args.top_p, dense_above=args.dense_above)
            work = mask.work().cpu()
            full_heads = dense_heads(mask)
            pset = ProblemSet(w, repeats=args.repeats, warmup=not args.quick, features=problems)
            for cfg in make_configs(mask, work, P, cost, head_dim=shape.head_dim):
                g = groups[(cfg.ulysses, cfg.ring)]
                times = []
                for _ in range(1 + args.repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    sp_attention(q, k, v, mask, groups=g, plan=cfg.plan)
                    if cuda:
                        torch.cuda.synchronize()  # timing only
                    times.append(1e3 * (time.perf_counter() - t0))
                mine = torch.tensor([statistics.median(times[1:])], dtype=torch.float64, device=device)
                per_rank = [torch.zeros_like(mine) for _ in range(P)]
                dist.all_gather(per_rank, mine)
                real = [float(x) for x in per_rank]
                # This rank's local problems on its own GPU; the sum over ranks fills every (k, i, t).
                steps, live, _, layouts = local_steps(cfg, w, mask, pset, ranks={rank})
                both = torch.stack([steps, live]).to(device)
                dist.all_reduce(both)
                steps, live = both.cpu().unbind(0)
                em = model_comm(cfg, steps, layouts, w, mask, latency_ms=lat, a2a_bytes_s=a2a_bw, p2p_bytes_s=p2p_bw)
                sizes_kw = dict(ulysses=cfg.ulysses, ring=cfg.ring, q_block=mask.q_block, seq_len=mask.seq_len_q)
                tiled = cfg.plan if cfg.plan is not None else Plan.identity(heads=mask.heads, **sizes_kw).with_tile_work(work)
                pred = cost.predict(tiled, head_dim=w.head_dim, batch=w.batch, element_bytes=w.q.element_size(),
                                    kv_tile=mask.kv_tile, dense_heads=full_heads)
                rows.append(dict(
                    mode="real", workload=kind, layer=layer, config=cfg.name, family=cfg.family, U=cfg.ulysses, R=cfg.ring,
                    density=round(mask.density(), 4), total_ms=round(max(real), 3), emulated_ms=round(em.total_ms, 3),
                    emulated_over_real=round(em.total_ms / max(real), 4), predicted_ms=round(pred.total_ms, 3),
                    max_rank_compute_ms=round(float(em.rank_ms.max()), 3), mean_rank_compute_ms=round(float(em.rank_ms.mean()), 3),
                    rho_planned=round(tiled.imbalance(), 4), rho_model=round(pred.compute_imbalance, 4),
                    rho_measured=round(em.rho_measured, 4),
                    all_to_all_ms=round(em.all_to_all_ms, 3), exchange_ms=round(em.exchange_ms, 3),
                    moved_tokens=em.moved_tokens, device=name, world=P,
                ))
                for r in range(P):
                    kk, i = r % cfg.ulysses, r // cfg.ulysses
                    rank_rows.append(dict(workload=kind, layer=layer, config=cfg.name, rank=r, wall_ms=round(real[r], 3),
                                          compute_ms=round(float(em.rank_ms[kk, i]), 4)))
            say(f"  {kind} layer {layer}: density {mask.density():.3f}, {time.perf_counter() - t_layer:.1f} s")
            del w, q, k, v, mask, work, pset
    gathered = [None] * P
    dist.all_gather_object(gathered, problems)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "sp_real.csv", rows)
        write_csv(out / "sp_real_ranks.csv", rank_rows)
        write_csv(out / "sp_real_comm.csv", comm)
        write_csv(out / "sp_real_problems.csv", [dict(rank=r, **p) for r, ps in enumerate(gathered) for p in ps])
        _summarise_real(rows, P, name, cuda)
        print(f"wrote sp_real.csv, sp_real_ranks.csv, sp_real_comm.csv, sp_real_problems.csv to {out}")
    dist.destroy_process_group()
    return 0


def _summarise_real(rows: list[dict], P: int, device: str, cuda: bool) -> None:
    """Table of the real run; dbsp vs the best fixed unbalanced configuration; emulated vs real."""
    print(f"\n{'workload':<8} {'layer':>5} {'config':<20} {'real ms':>8} {'emul ms':>8} {'emul/real':>9} {'pred ms':>8} "
          f"{'rho tiles':>9} {'rho meas':>8}")
    for r in rows:
        print(f"{r['workload']:<8} {r['layer']:>5} {r['config']:<20} {r['total_ms']:>8.2f} {r['emulated_ms']:>8.2f} "
              f"{r['emulated_over_real']:>9.3f} {r['predicted_ms']:>8.2f} {r['rho_planned']:>9.3f} {r['rho_measured']:>8.3f}")
    print(f"\nREAL {P}-process run ({'NCCL' if cuda else 'gloo'}, {device}); 'emul' = per-rank kernels timed alone "
          "+ communication modelled with the bandwidth measured above")
    for kind in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == kind]
        layers = sorted({r["layer"] for r in mine})
        fixed: dict[str, float] = {}
        for r in mine:
            if r["family"] in ("ulysses", "ring", "usp"):
                fixed[r["config"]] = fixed.get(r["config"], 0.0) + r["total_ms"]
        base = min(fixed, key=fixed.get)
        auto = sum(r["total_ms"] for r in mine if r["family"] == "dbsp-auto")
        best = sum(min(r["total_ms"] for r in mine if r["layer"] == layer and r["family"].startswith("dbsp")) for layer in layers)
        ratio = [r["emulated_over_real"] for r in mine]
        print(f"{kind}: best fixed unbalanced {base} {fixed[base]:.1f} ms; dbsp-auto {fixed[base] / auto:.3f}x, best dbsp config "
              f"per layer {fixed[base] / best:.3f}x; emulated/real min {min(ratio):.3f} median {statistics.median(ratio):.3f} "
              f"max {max(ratio):.3f}")
    _print_agreement(rows, "the real times")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--emulate", type=int, metavar="P", help="emulate P ranks on one device")
    mode.add_argument("--real", action="store_true", help="run on real processes (launch with torchrun)")
    parser.add_argument("--out", required=True, help="output folder for CSV and PNG")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny shape, 2 layers, 1 repeat")
    parser.add_argument("--shape", default="wan14b-720p", help="dbsp.video preset. Default: wan14b-720p")
    parser.add_argument("--workloads", default="skewed,mild,regional,full",
                        help="comma list of skewed, mild, regional, full. Default: all")
    parser.add_argument("--layers", type=int, default=4, help="layers per workload (the distribution). Default: 4")
    parser.add_argument("--repeats", type=int, default=None,
                        help="--emulate: timing rounds over all distinct local problems of a layer, interleaved (median "
                             "per problem; 3 or more for a spread); --real: timed calls per configuration and transfer "
                             "(median), and rounds of the per-rank local problems. Default: 5 (--emulate), 3 (--real)")
    parser.add_argument("--q-block", type=int, default=64, help="mask block (db-SP: 64). Default: 64")
    parser.add_argument("--kv-tile", type=int, default=64, help="mask key tile (64: block mask). Default: 64")
    parser.add_argument("--top-p", type=float, default=0.9, help="predictor's kept softmax mass. Default: 0.9")
    parser.add_argument("--dense-above", type=float, default=DENSE_CROSSOVER,
                        help=f"predictor: round heads denser than this up to full. Default: {DENSE_CROSSOVER}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-model", default=None, help="cost model JSON. Default: dbsp/cost_model.json")
    parser.add_argument("--plan-only", action="store_true",
                        help="--emulate: build the workloads, masks and plans and print each configuration's predicted "
                             "time; time nothing (runs on a CPU at full shapes)")
    parser.add_argument("--bandwidth-gbps", type=float, default=None, help="per-GPU bandwidth. Default: the cost model's NVLink")
    args = parser.parse_args(argv)
    args.workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    bad = [x for x in args.workloads if x not in WORKLOADS]
    if bad:
        parser.error(f"unknown workloads {bad}; choose from {list(WORKLOADS)}")
    if args.repeats is None:
        args.repeats = 3 if args.real else 5
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.kv_tile = min(args.kv_tile, args.q_block)
    return run_real(args) if args.real else run_emulate(args)


if __name__ == "__main__":
    sys.exit(main())
