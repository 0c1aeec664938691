"""Write the planner's cost-model calibration (``dbsp/cost_model.json``) from a kernel benchmark CSV.

    python benchmarks/calibrate_cost_model.py results/h100/kernels_wan1.3b-480p.csv --out dbsp/cost_model.json

The throughput curves become the measured effective TFLOPS of ``benchmarks/bench_kernels.py``'s
dbsp rows on random masks, per density: block masks from ``--block-mask`` (default 64x64, the
planner's 64-token blocks), fine-grained masks from ``--fine-mask`` (default 64x1). Densities at
1.0 are left out (``sparse_attention`` sends full masks to cuDNN). Communication fields and the
per-call overhead are kept from the current calibration (they are stated, not measured here).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from dbsp.plan import CostModel


def curve(rows: list[dict], mask: str) -> tuple[tuple[float, float], ...]:
    points = sorted(
        (float(r["density"]), float(r["tflops"]))
        for r in rows
        if r["method"] == "dbsp" and r["mask"] == mask and r["pattern"] == "random" and float(r["density"]) < 1.0
    )
    if not points:
        raise SystemExit(f"no dbsp rows for mask {mask} on random masks below density 1.0 in the CSV")
    return tuple((round(d, 4), round(t, 1)) for d, t in points)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", type=Path, help="kernels.csv written by benchmarks/bench_kernels.py")
    p.add_argument("--block-mask", default="64x64")
    p.add_argument("--fine-mask", default="64x1")
    p.add_argument("--out", type=Path, default=Path("dbsp/cost_model.json"))
    args = p.parse_args()
    rows = list(csv.DictReader(args.csv.open()))
    shape = rows[0]["shape"]
    old = CostModel.default()
    new = CostModel(
        block_tflops=curve(rows, args.block_mask),
        fine_tflops=curve(rows, args.fine_mask),
        call_overhead_us=old.call_overhead_us,
        comm_latency_us=old.comm_latency_us,
        nvlink_gbps=old.nvlink_gbps,
        internode_gbps=old.internode_gbps,
        gpus_per_node=old.gpus_per_node,
        source=(f"kernel throughput measured by benchmarks/bench_kernels.py ({args.csv.name}, {shape}, dbsp on random "
                f"{args.block_mask} and {args.fine_mask} masks); communication and per-call overhead kept from the "
                f"previous calibration (stated, not measured: {old.nvlink_gbps:g} GB/s NVLink and "
                f"{old.internode_gbps:g} GB/s between nodes per GPU and direction, {old.call_overhead_us:g} us per call, "
                f"{old.comm_latency_us:g} us per transfer)"),
    )
    new.to_json(args.out, description=(
        "Calibration of dbsp.plan.CostModel (one GPU per rank, bf16, head_dim 128). Throughput is effective TFLOPS "
        "on computed score entries (4 * entries * head_dim FLOPs), as [density, TFLOPS] points, linear in between, "
        "flat outside. Bandwidths are GB/s per GPU and direction. Written by benchmarks/calibrate_cost_model.py."))
    print(f"wrote {args.out}: block {new.block_tflops}, fine {new.fine_tflops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
