"""The cost model at scale: predicted attention time and rho_s on 8 ... 1024 GPUs, no GPU needed.

``python -m dbsp simulate --workload wan14b-720p --gpus 8,16,...,1024`` compares four ways to run
one attention layer of the workload on P GPUs, all scored by :class:`dbsp.plan.CostModel`:

* **Ulysses**: ``U = P, R = 1``, heads contiguous. Only where ``P`` divides the head count
  (Wan2.1-14B has 40 heads: P = 8 is the largest power of two; beyond, it does not exist).
* **Ring**: ``U = 1, R = P``, blocks contiguous.
* **USP**: the fastest factorisation ``P = U * R`` (``U`` dividing the heads) under the cost
  model, with the unbalanced contiguous layout: the best a sparsity-blind hybrid can do.
* **dbsp**: the fastest factorisation with db-SP's balanced plan (:func:`dbsp.plan.choose_degrees`).

With 40 heads and powers of two, ``U`` is at most 8, so beyond 8 GPUs every hybrid is mostly ring.

The workload is synthetic (:func:`synthetic_tiles`): video-like block masks with heads of very
different densities and patterns, so that imbalance shows. It stands in for masks from a real
predictor until one is wired in; the workload table (:data:`WORKLOADS`) has the real geometry.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._checks import check_nonnegative_int, check_positive_int
from .plan import DEFAULT_REWARD, CostModel
from .plan.core import _as_work, _stats
from .plan.cost import _predictor
from .plan.degrees import _candidates, _score_pair

KINDS = ("window", "temporal", "sink", "dense", "hotspot")
"""Head patterns of :func:`synthetic_tiles`."""


@dataclass(frozen=True)
class Workload:
    """The attention geometry of one video DiT configuration."""

    name: str
    heads: int
    seq_len: int
    frames: int
    head_dim: int
    layers: int
    q_block: int = 64


WORKLOADS = {
    # Wan2.1-14B T2V at 720p, 81 frames: latent 21 x 45 x 80 = 75,600 tokens, 40 heads of 128, 40 layers.
    "wan14b-720p": Workload("wan14b-720p", heads=40, seq_len=75_600, frames=21, head_dim=128, layers=40),
    # Wan2.1-1.3B at 480p: 21 x 30 x 52 = 32,760 tokens, 12 heads of 128, 30 layers.
    "wan1.3b-480p": Workload("wan1.3b-480p", heads=12, seq_len=32_760, frames=21, head_dim=128, layers=30),
}


def synthetic_tiles(
    *,
    heads: int,
    seq_len: int,
    q_block: int = 64,
    frames: int = 21,
    seed: int = 0,
    step: int = 0,
    drift: float = 0.01,
    kinds: tuple[str, ...] = KINDS,
) -> torch.Tensor:
    """A skewed, video-like block mask: ``(1, H, NB, NB)`` bool, ``NB = ceil(seq_len / q_block)``.

    Tokens are frame-major (``frames`` frames of ``seq_len / frames`` tokens). Every head draws one
    pattern from ``kinds`` and its own parameters, so densities range from a few percent to ~90%:

    * ``window``: keys within 0-3 frames of the query's frame, thinned at random;
    * ``temporal``: keys at the same spatial position in every frame (diagonal stripes);
    * ``sink``: every key of the first frame, plus sparse random keys;
    * ``dense``: 50-90% random keys;
    * ``hotspot``: queries in a span of frames (the moving object) attend densely, others sparsely.

    Denoising steps drift slowly: every head's random keep rate scales by ``1 +- drift * step``
    (against a fixed per-head random field, so masks change a little per step), and the hotspot
    span moves by one frame every 10 steps.

    Args:
        heads, seq_len, q_block, frames: the geometry.
        seed: picks every head's pattern and parameters. Default: 0.
        step: the denoising step. Default: 0.
        drift: relative change of keep rates per step. Default: 0.01.
        kinds: the patterns heads draw from. Default: all of :data:`KINDS`.

    Returns:
        The tile picture, on CPU; ``SparseMask.from_dense(..., kv_tile=q_block)`` turns it into a mask.
    """
    for name, value in (("heads", heads), ("seq_len", seq_len), ("q_block", q_block), ("frames", frames)):
        check_positive_int(name, value)
    check_nonnegative_int("seed", seed)
    check_nonnegative_int("step", step)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    nb = -(-seq_len // q_block)
    start = np.arange(nb, dtype=np.float64) * q_block  # first token of every block
    per_frame = seq_len / frames
    frame = np.minimum(start // per_frame, frames - 1).astype(np.int64)  # (NB,)
    pos = (start - frame * per_frame) / q_block  # position inside the frame, in blocks
    fr, fc = frame[:, None], frame[None, :]
    out = np.empty((heads, nb, nb), dtype=bool)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(kinds), heads)
    for h in range(heads):
        hr = np.random.default_rng([seed, h])
        field = hr.random((nb, nb), dtype=np.float32)
        sign = 1.0 if hr.random() < 0.5 else -1.0
        scale = max(0.0, 1.0 + sign * drift * step)
        kind = kinds[pick[h]]
        if kind == "window":
            m = (np.abs(fr - fc) <= hr.integers(0, 4)) & (field < hr.uniform(0.4, 1.0) * scale)
        elif kind == "temporal":
            m = np.abs(pos[:, None] - pos[None, :]) <= hr.uniform(0.5, 6.0)
            m |= field < 0.02 * scale
        elif kind == "sink":
            m = (fc == 0) | (field < hr.uniform(0.02, 0.25) * scale)
        elif kind == "dense":
            m = field < hr.uniform(0.5, 0.9) * scale
        else:
            span = max(1, int(round(hr.uniform(0.2, 0.4) * frames)))
            lo = (int(hr.integers(0, frames)) + step // 10) % frames
            hot = ((frame - lo) % frames < span)[:, None]
            m = field < np.where(hot, hr.uniform(0.6, 0.9), hr.uniform(0.02, 0.1)) * scale
        np.fill_diagonal(m, True)  # every query block sees at least itself
        out[h] = m
    return torch.from_numpy(out)[None]


def synthetic_work(**kwargs) -> torch.Tensor:
    """``SparseMask.work()`` of :func:`synthetic_tiles` (same arguments), built without the mask.

    Returns:
        ``(1, H, NB, NB)`` int32: computed score entries per (query block, key block), exact for
        a partial last block.
    """
    tiles = synthetic_tiles(**kwargs)
    seq_len, q_block = kwargs["seq_len"], kwargs.get("q_block", 64)
    nb = tiles.shape[-1]
    size = np.full(nb, q_block, dtype=np.int32)
    size[-1] = seq_len - (nb - 1) * q_block
    cells = tiles.numpy()[0] * (size[:, None] * size[None, :])  # (H, NB, NB) int32
    return torch.from_numpy(cells.astype(np.int32, copy=False))[None]


def workload_work(name: str, *, seed: int = 0, step: int = 0) -> tuple[Workload, torch.Tensor]:
    """The named workload's geometry and the synthetic work of one layer at ``step``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
    wl = WORKLOADS[name]
    work = synthetic_work(heads=wl.heads, seq_len=wl.seq_len, q_block=wl.q_block, frames=wl.frames, seed=seed, step=step)
    return wl, work


@dataclass(frozen=True)
class SimRow:
    """One strategy at one GPU count. ``time_ms`` is NaN where the strategy does not exist."""

    gpus: int
    strategy: str
    ulysses: int
    ring: int
    time_ms: float
    imbalance: float
    moved_blocks: int


STRATEGIES = ("ulysses", "ring", "usp", "dbsp")


def simulate(
    work: torch.Tensor,
    *,
    gpus: list[int],
    q_block: int,
    seq_len: int,
    head_dim: int = 128,
    cost_model: CostModel | None = None,
    reward: float = DEFAULT_REWARD,
) -> list[SimRow]:
    """Predicted time and rho_s of Ulysses, Ring, USP and dbsp for each GPU count (module docstring).

    Args:
        work: ``(B, H, NB, NB)`` work of one attention layer (``SparseMask.work()``).
        gpus: GPU counts P.
        q_block, seq_len: the work's geometry.
        head_dim: D. Default: 128.
        cost_model: Default: :meth:`CostModel.default`.
        reward: R_b of dbsp's plans. Default: 2.0.

    Returns:
        ``len(gpus) * 4`` rows, by GPU count then strategy.
    """
    cost_model = CostModel.default() if cost_model is None else cost_model
    w = _as_work(work, q_block=q_block, seq_len=seq_len)
    predict = _predictor(cost_model, w, head_dim=head_dim, element_bytes=2)
    rows = []
    fastest = lambda c: (c.prediction.total_ms, -c.ulysses)  # noqa: E731  (choose_degrees' rule)
    stats = {}  # pass-1 statistics depend only on R, which recurs across GPU counts
    for p in gpus:
        check_positive_int("gpus", p)
        pairs = {}
        for u, r in _candidates(p, w.heads, w.num_blocks, uneven_heads=False):
            if r not in stats:
                stats[r] = _stats(w, r)
            pairs[u, r] = _score_pair(w, u, r, predict, reward=reward, uneven_heads=False, balance=True, stats=stats[r],
                                      cost=(cost_model, head_dim))
        plain = {ur: pair[0] for ur, pair in pairs.items()}
        best = {
            "ulysses": plain.get((p, 1)),
            "ring": plain.get((1, p)),
            "usp": min(plain.values(), key=fastest),
            "dbsp": min((pair[1] for pair in pairs.values()), key=fastest),
        }
        for name in STRATEGIES:
            c = best[name]
            if c is None:
                rows.append(SimRow(p, name, 0, 0, math.nan, math.nan, 0))
            else:
                moved = c.plan.moved_blocks("q") + c.plan.moved_blocks("kv")
                rows.append(SimRow(p, name, c.ulysses, c.ring, c.prediction.total_ms, c.prediction.imbalance, moved))
    return rows


def format_table(rows: list[SimRow]) -> str:
    """One line per GPU count: each strategy's time, degrees and rho_s."""
    head = f"{'GPUs':>5} | " + " | ".join(f"{s:^26}" for s in STRATEGIES) + " | dbsp vs USP"
    lines = [head, f"{'':>5} | " + " | ".join(f"{'ms':>8} {'UxR':>9} {'rho_s':>6}" for _ in STRATEGIES) + " |", "-" * len(head)]
    for p in sorted({r.gpus for r in rows}):
        by = {r.strategy: r for r in rows if r.gpus == p}
        cells = []
        for s in STRATEGIES:
            r = by[s]
            if math.isnan(r.time_ms):
                cells.append(f"{'n/a':>8} {'':>9} {'':>6}")
            else:
                cells.append(f"{r.time_ms:8.2f} {f'{r.ulysses}x{r.ring}':>9} {r.imbalance:6.3f}")
        lines.append(f"{p:>5} | " + " | ".join(cells) + f" | {by['usp'].time_ms / by['dbsp'].time_ms:10.2f}x")
    return "\n".join(lines)


def _parse_gpus(text: str) -> list[int]:
    """``"8,16,32"`` or ``"8,16,...,1024"`` (a geometric progression: 16 / 8 = 2, up to 1024)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            if len(parts) != 4 or parts[2] != "...":
                raise ValueError
            a, b, z = int(parts[0]), int(parts[1]), int(parts[3])
            if a < 1 or b % a or b // a < 2 or z < b:
                raise ValueError
            out = [a]
            while out[-1] * (b // a) <= z:
                out.append(out[-1] * (b // a))
            return out
        out = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--gpus must be a comma list like 8,16,32 or a doubling range like 8,16,...,1024; got {text!r}"
        ) from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--gpus must list GPU counts >= 1, got {text!r}")
    return out


def plot(rows: list[SimRow], path: Path, *, title: str) -> None:
    """Two panels over GPU count: predicted time per attention call, and rho_s."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting the simulation needs matplotlib: pip install 'dbsp[plot]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s, marker in zip(STRATEGIES, "osD^"):
        pts = [(r.gpus, r.time_ms, r.imbalance) for r in rows if r.strategy == s and not math.isnan(r.time_ms)]
        if pts:
            g, t, rho = zip(*pts)
            ax_t.plot(g, t, marker=marker, label=s)
            ax_r.plot(g, rho, marker=marker, label=s)
    for ax, label in ((ax_t, "predicted time per attention call (ms)"), (ax_r, "rho_s (max / mean rank work)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_t.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m dbsp simulate`` to ``parser``."""
    parser.add_argument("--workload", default="wan14b-720p", choices=sorted(WORKLOADS), help="Default: wan14b-720p")
    parser.add_argument("--gpus", type=_parse_gpus, default=_parse_gpus("8,16,...,1024"),
                        help="GPU counts: 8,16,32 or 8,16,...,1024 (doubling). Default: 8,16,...,1024")
    parser.add_argument("--step", type=int, default=0, help="denoising step of the synthetic masks. Default: 0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic masks. Default: 0")
    parser.add_argument("--reward", type=float, default=DEFAULT_REWARD, help="R_b of dbsp's plans. Default: 2.0")
    parser.add_argument("--cost-model", type=Path, default=None, help="calibration JSON. Default: dbsp/cost_model.json")
    parser.add_argument("--out", type=Path, default=None, help="folder for simulate.csv and simulate.png. Default: none")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m dbsp simulate`` with parsed ``args``: print the table, write CSV/PNG to ``--out``. Returns 0."""
    cost_model = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    t0 = time.perf_counter()
    wl, work = workload_work(args.workload, seed=args.seed, step=args.step)
    t1 = time.perf_counter()
    rows = simulate(work, gpus=args.gpus, q_block=wl.q_block, seq_len=wl.seq_len, head_dim=wl.head_dim,
                    cost_model=cost_model, reward=args.reward)
    t2 = time.perf_counter()
    density = float(work.sum(dtype=torch.float64)) / (wl.heads * wl.seq_len**2)
    print(f"workload {wl.name}: H={wl.heads}, S={wl.seq_len}, {work.shape[-1]} blocks of {wl.q_block}, "
          f"synthetic block mask (seed {args.seed}, step {args.step}), density {density:.3f}")
    print(f"cost model: {cost_model.source}")
    print("one attention layer, predicted (USP/dbsp: fastest U x R with U | heads; n/a: U = P does not divide the heads)")
    print(format_table(rows))
    print(f"workload {t1 - t0:.1f} s, simulation {t2 - t1:.1f} s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "simulate.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["workload", "gpus", "strategy", "ulysses", "ring", "time_ms", "rho_s", "moved_blocks"])
            for r in rows:
                writer.writerow([wl.name, r.gpus, r.strategy, r.ulysses, r.ring, f"{r.time_ms:.4f}", f"{r.imbalance:.4f}", r.moved_blocks])
        plot(rows, args.out / "simulate.png", title=f"{wl.name} (synthetic masks, density {density:.2f}); cost model: dbsp/cost_model.json")
        print(f"wrote {args.out / 'simulate.csv'} and {args.out / 'simulate.png'}")
    return 0
