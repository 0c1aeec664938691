"""Write the planner's cost-model calibration (``dbsp/cost_model.json``) from benchmark CSVs.

    python benchmarks/calibrate_cost_model.py --problems R/sp_emu8/sp_problems.csv \\
        --gather R/gather/gather_sweep.csv --comm R/sp_real/sp_real_comm.csv --out dbsp/cost_model.json
    python benchmarks/calibrate_cost_model.py --kernels results/h100/kernels_wan1.3b-480p.csv   # curves only

Each source replaces the fields it measures; the others are kept from ``--base`` (default: the
shipped calibration), and ``source`` in the JSON says which came from where.

* ``--problems`` (``sp_problems.csv`` of ``benchmarks/bench_sp.py --emulate``: every distinct local
  problem of every rank, timed with the real kernel): a least-squares fit, in relative error, of
  ``ms = a + m [call mixes dense and sparse heads] + g [... and its dense heads are not consecutive]
  + sparse entries / r_s + dense entries / r_d + [ring step that merges] merge bytes / b_m`` (dense
  entries times ``1 + u`` where the key length is not a multiple of 128, and times the wave factor
  of ``--dense-sms``; merge bytes as ``CostModel.merge_gbps`` counts them) over the block-mask
  problems (dense entries are those of fully selected heads, which ``sparse_attention`` sends to
  cuDNN). Sets ``call_overhead_us = a``, ``mixed_overhead_us = m``, ``mixed_gather_us = g`` (0 when
  the CSV has no ``dense_consecutive`` column or no such call), a flat ``block_tflops`` at ``r_s``,
  ``dense_tflops = r_d``, ``dense_unaligned = 1 + u``, ``dense_sms`` and ``merge_gbps = b_m`` (None
  when the CSV has no ``merge`` column, from runs before the emulation timed the ring's merges).
* ``--gather`` (``gather_sweep.csv`` of ``benchmarks/sweep_gather.py``): ``fine_tflops`` from the
  fastest configuration per density of the ``--fine-mask`` kind (the autotuner's pick).
* ``--kernels`` (``kernels.csv`` of ``benchmarks/bench_kernels.py``): block and fine curves from the
  dbsp rows on random masks (densities below 1.0; full masks go to cuDNN).
* ``--comm`` (``sp_real_comm.csv`` of ``benchmarks/bench_sp.py --real``): ``nvlink_gbps`` = the
  slower of the measured all-to-all and ring P2P bandwidths at full message size (per GPU and
  direction), ``comm_latency_us`` = the median time of the 1-token messages.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from dbsp.plan import CostModel


def _rows(path: Path) -> list[dict]:
    rows = list(csv.DictReader(path.open()))
    if not rows:
        raise SystemExit(f"{path} has no rows")
    return rows


def kernel_curve(rows: list[dict], mask: str) -> tuple[tuple[float, float], ...]:
    points = sorted(
        (float(r["density"]), float(r["tflops"]))
        for r in rows
        if r["method"] == "dbsp" and r["mask"] == mask and r["pattern"] == "random" and float(r["density"]) < 1.0
    )
    if not points:
        raise SystemExit(f"no dbsp rows for mask {mask} on random masks below density 1.0 in the CSV")
    return tuple((round(d, 4), round(t, 1)) for d, t in points)


def _nonneg_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: drop the most negative term and refit."""
    keep = list(range(A.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(A[:, keep], y, rcond=None)
        if np.all(coef >= 0):
            out = np.zeros(A.shape[1])
            out[keep] = coef
            return out
        keep.pop(int(np.argmin(coef)))


def fit_problems(rows: list[dict], head_dim: int, sms: int | None = None
                 ) -> tuple[float, float, float, float, float, float, float | None, str]:
    """``(a us, mixed us, gather us, sparse TFLOPS, dense TFLOPS, dense unaligned factor, merge GB/s
    or None, summary)`` from block-mask local problems.

    ``ms = a + mixed * [dense and sparse heads in the call] + gather * [... not consecutive] +
    sparse entries / r_s + dense entries * waves / r_d * (1 + u * [key length not a multiple of
    128]) + [merge] * merge bytes / b_m``, fitted in relative error with non-negative terms; the
    factor is ``1 + u``. ``waves`` is :meth:`CostModel.dense_waves` of the call's dense query tiles
    on ``sms`` SMs (1 for None). Merge bytes: :meth:`CostModel.merge_bytes`; GB/s is
    None without merging rows (or when the fit drops the term).
    """
    block = [r for r in rows if r["kv_tile"] == r["q_block"] and "dense_entries" in r]
    if len(block) < 4:
        raise SystemExit("need at least 4 block-mask problems with dense_entries (bench_sp.py --emulate)")
    y = np.array([float(r["ms"]) for r in block])
    dense = np.array([float(r["dense_entries"]) for r in block])
    sparse = np.array([float(r["entries"]) for r in block]) - dense
    n_dense, heads = (np.array([int(r[c]) for r in block]) for c in ("dense_heads", "heads"))
    mixed = ((n_dense > 0) & (n_dense < heads)).astype(np.float64)
    # Whole waves of query tiles, as CostModel.predict counts them (the batch from the entries).
    q_tokens = np.array([float(r["q_tokens"]) for r in block])
    kv_tokens = np.array([float(r["kv_tokens"]) for r in block])
    batch = np.where(n_dense > 0, np.rint(dense / np.maximum(n_dense * q_tokens * kv_tokens, 1.0)), 0.0)
    dense = dense * replace(CostModel.default(), dense_sms=sms)._waves_of(batch * n_dense, q_tokens[:, None], 1)[:, 0]
    # Older CSVs lack the column: every mixed call then counts as consecutive (no gather term).
    scattered = mixed * np.array([r.get("dense_consecutive", "1") in ("0", 0) for r in block], dtype=np.float64)
    unaligned = np.array([int(r["kv_tokens"]) % 128 != 0 for r in block], dtype=np.float64)
    merges = np.array([int(r.get("merge", 0)) * CostModel.merge_bytes(int(r.get("batch", 1)), int(r["q_tokens"]),
                                                                       int(r["heads"]), head_dim) for r in block])
    A = np.stack([np.ones_like(y), mixed, sparse, dense, dense * unaligned, scattered, merges], axis=1)
    coef = _nonneg_lstsq(A / y[:, None], np.ones_like(y))  # minimises relative error
    if coef[2] <= 0 or coef[3] <= 0:
        raise SystemExit(f"the fit has no throughput term ({coef}); the problems do not determine the model")
    rel = np.abs(A @ coef / y - 1)
    flops = 4.0 * head_dim
    r_s, r_d = flops / (coef[2] * 1e-3) / 1e12, flops / (coef[3] * 1e-3) / 1e12
    waves = f", dense SDPA in waves of {sms} query tiles" if sms else ""
    summary = (f"{len(block)} block-mask problems{waves} ({int(mixed.sum())} mixed, {int(scattered.sum())} of them with "
               f"dense heads apart, {int(unaligned.sum())} with key lengths "
               f"not a multiple of 128): relative error median {np.median(rel):.3f}, 90th percentile "
               f"{np.quantile(rel, 0.9):.3f}, max {rel.max():.3f}")
    merge_gbps = float(1e-6 / coef[6]) if coef[6] > 0 else None  # coef: ms per byte
    return (float(1e3 * coef[0]), float(1e3 * coef[1]), float(1e3 * coef[5]), float(r_s), float(r_d),
            float(1 + coef[4] / coef[3]), merge_gbps, summary)


def gather_curve(rows: list[dict], mask: str) -> tuple[tuple[float, float], ...]:
    best: dict[float, float] = {}
    for r in rows:
        if r["mask"] == mask:
            d = round(float(r["density"]), 4)
            best[d] = max(best.get(d, 0.0), float(r["tflops"]))
    if not best:
        raise SystemExit(f"no rows for mask {mask} in the gather sweep")
    return tuple(sorted((d, round(t, 1)) for d, t in best.items()))


def comm_fit(rows: list[dict]) -> tuple[float, float]:
    """``(GB/s, latency us)``."""
    big = [r for r in rows if int(r["tokens"]) > 1]
    small = [float(r["ms"]) for r in rows if int(r["tokens"]) == 1]
    if not big or not small:
        raise SystemExit("the comm CSV needs full-size and 1-token rows")
    per_kind = {k: statistics.median(float(r["GBps"]) for r in big if r["kind"] == k) for k in {r["kind"] for r in big}}
    return min(per_kind.values()), 1e3 * statistics.median(small)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", type=Path, help="kernels.csv of benchmarks/bench_kernels.py")
    p.add_argument("--problems", type=Path, help="sp_problems.csv of benchmarks/bench_sp.py --emulate")
    p.add_argument("--gather", type=Path, help="gather_sweep.csv of benchmarks/sweep_gather.py")
    p.add_argument("--comm", type=Path, help="sp_real_comm.csv of benchmarks/bench_sp.py --real")
    p.add_argument("--block-mask", default="64x64", help="--kernels: the block-mask kind. Default: 64x64")
    p.add_argument("--fine-mask", default="64x1", help="--kernels/--gather: the fine-grained kind. Default: 64x1")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dense-sms", type=int, default=132,
                   help="--problems: SMs of the GPU the problems were timed on (dense SDPA runs in waves of this many "
                        "128-query tiles; CostModel.dense_sms); 0: no wave model. Default: 132 (H100/H200 SXM)")
    p.add_argument("--device", default="", help="the GPU the CSVs come from, for the source note")
    p.add_argument("--base", type=Path, default=None, help="calibration to start from. Default: the shipped one")
    p.add_argument("--out", type=Path, default=Path("dbsp/cost_model.json"))
    args = p.parse_args(argv)
    if not any((args.kernels, args.problems, args.gather, args.comm)):
        p.error("give at least one of --kernels, --problems, --gather, --comm")
    model = CostModel.default() if args.base is None else CostModel.from_json(args.base)
    notes = []
    if args.kernels:
        rows = _rows(args.kernels)
        model = replace(model, block_tflops=kernel_curve(rows, args.block_mask), fine_tflops=kernel_curve(rows, args.fine_mask))
        notes.append(f"block and fine curves: bench_kernels.py {args.kernels.name} ({rows[0]['shape']}, random "
                     f"{args.block_mask} / {args.fine_mask} masks)")
    if args.problems:
        sms = args.dense_sms or None
        a_us, mixed_us, gather_us, r_s, r_d, unaligned, merge_gbps, summary = fit_problems(
            _rows(args.problems), args.head_dim, sms)
        model = replace(model, call_overhead_us=round(a_us, 1), mixed_overhead_us=round(mixed_us, 1),
                        mixed_gather_us=round(gather_us, 1), block_tflops=((0.0, round(r_s, 1)), (1.0, round(r_s, 1))),
                        dense_tflops=round(r_d, 1), dense_unaligned=round(unaligned, 3), dense_sms=sms,
                        merge_gbps=None if merge_gbps is None else round(merge_gbps, 1))
        merged = "no ring merges timed" if merge_gbps is None else f"ring merges at {merge_gbps:.0f} GB/s"
        notes.append(f"per-call overhead {a_us:.0f} us (+{mixed_us:.0f} us for calls mixing dense and sparse heads, "
                     f"+{gather_us:.0f} us more where the dense heads are not consecutive), block {r_s:.0f} TFLOPS, "
                     f"dense heads {r_d:.0f} TFLOPS (x{unaligned:.3f} time for key lengths not a multiple of 128), "
                     f"{merged}: fit to bench_sp.py --emulate local problems ({args.problems}; {summary})")
        print(f"problems: a = {a_us:.1f} us, mixed +{mixed_us:.1f} us (+{gather_us:.1f} us apart), sparse {r_s:.1f} TFLOPS, "
              f"dense {r_d:.1f} TFLOPS, unaligned x{unaligned:.3f}, {merged}; {summary}")
    if args.gather:
        model = replace(model, fine_tflops=gather_curve(_rows(args.gather), args.fine_mask))
        notes.append(f"fine curve: sweep_gather.py {args.gather.name} (random {args.fine_mask} masks, fastest configuration)")
    if args.comm:
        gbps, lat = comm_fit(_rows(args.comm))
        model = replace(model, nvlink_gbps=round(gbps, 1), comm_latency_us=round(lat, 1))
        notes.append(f"intra-node bandwidth {gbps:.0f} GB/s and latency {lat:.0f} us: bench_sp.py --real "
                     f"{args.comm.name} (all-to-all and ring P2P, slower of the two)")
        print(f"comm: {gbps:.1f} GB/s, latency {lat:.1f} us")
    where = f" on {args.device}" if args.device else ""
    kept = [name for name, given in (("block curve", args.kernels or args.problems), ("fine curve", args.kernels or args.gather),
                                      ("per-call overhead", args.problems), ("bandwidth and latency", args.comm)) if not given]
    model = replace(model, source=f"measured{where}: " + "; ".join(notes)
                    + (f". Kept from the base calibration: {', '.join(kept)}, " if kept else ". Kept from the base calibration: ")
                    + "internode_gbps and gpus_per_node (stated, not measured)")
    model.to_json(args.out, description=(
        "Calibration of dbsp.plan.CostModel (one GPU per rank, bf16, head_dim 128). Throughput is effective TFLOPS "
        "on computed score entries (4 * entries * head_dim FLOPs), as [density, TFLOPS] points, linear in between, "
        "flat outside; dense_tflops is the rate of fully dense heads (dense SDPA). Bandwidths are GB/s per GPU and "
        "direction. Written by benchmarks/calibrate_cost_model.py."))
    print(f"wrote {args.out}: block {model.block_tflops}, fine {model.fine_tflops}, dense {model.dense_tflops}, "
          f"overhead {model.call_overhead_us} (+{model.mixed_overhead_us}) us, {model.nvlink_gbps} GB/s, latency {model.comm_latency_us} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
