"""A bench_sp.py --emulate run's configurations predicted again with another calibration (CPU).

    python benchmarks/rescore_sp.py --run results/h100/sp_shuffled2 --planned-with OLD.json \\
        [--cost-model dbsp/cost_model.json] [--workloads skewed,mild,regional,full] [--layers 2]

A new calibration changes the planner's predictions, but a GPU run is needed to time its plans.
This script answers the next best question offline: for the *same* plans the run timed, what
would the other calibration have predicted? It rebuilds each workload and layer on the CPU
(float32; the predicted masks differ from the GPU's bf16 ones in a few tiles at most), makes the
run's configurations with the calibration the run used (``--planned-with``), and for each one
prints the deviation of the measured rho_s (``sp.csv``) from both calibrations' predicted-time
rho_s (issue 7, target 2), and per layer the configuration each calibration ranks fastest with
its measured time. The run's own predictions are checked against the rebuilt ones (``rho_model``).
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch

import bench_sp
from dbsp.plan import CostModel, dense_heads
from dbsp.video import get_shape, make_workload


def main(argv: list[str] | None = None) -> float:
    """Prints the comparison; returns the largest difference between a rebuilt prediction's rho_s
    and the run's ``rho_model`` (0 when the rebuild is exact, as on CPU runs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="folder with the run's sp.csv")
    parser.add_argument("--planned-with", required=True, help="the calibration JSON the run planned with")
    parser.add_argument("--cost-model", default=None, help="the other calibration. Default: dbsp/cost_model.json")
    parser.add_argument("--workloads", default="skewed,mild,regional,full")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the settings of bench_sp.py --quick (its CPU smoke run)")
    args = parser.parse_args(argv)
    shape_name, q_block, top_p, dense_above = "wan14b-720p", 64, 0.9, bench_sp.DENSE_CROSSOVER
    if args.quick:
        q = bench_sp.QUICK
        shape_name, args.layers, q_block, top_p, dense_above = q["shape"], q["layers"], q["q_block"], q["top_p"], q["dense_above"]
    used = CostModel.from_json(args.planned_with)
    other = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    rows = list(csv.DictReader(open(Path(args.run) / "sp.csv")))
    mask_args = argparse.Namespace(q_block=q_block, kv_tile=q_block, top_p=top_p, dense_above=dense_above)
    shape, cpu = get_shape(shape_name), torch.device("cpu")
    check = 0.0
    for kind in args.workloads.split(","):
        devs = {"run's": [], "other": []}
        for layer in range(1 if kind == "full" else args.layers):
            w = make_workload(shape, layer=layer, seed=0, **bench_sp.WORKLOADS[kind], device=cpu, dtype=torch.float32)
            mask = bench_sp.make_mask(w, kind, mask_args)
            work, full = mask.work(), dense_heads(mask)
            timed = {r["config"]: r for r in rows if r["workload"] == kind and int(r["layer"]) == layer}
            picks = {}
            for cfg in bench_sp.make_configs(mask, work, 8, used, head_dim=w.head_dim):
                r = timed[cfg.name]
                preds = {name: bench_sp._predicted(cfg, mask, work, cm, w, full, 2)[1] for name, cm in
                         (("run's", used), ("other", other))}
                check = max(check, abs(preds["run's"].compute_imbalance - float(r["rho_model"])))
                for name, p in preds.items():
                    if cfg.family.startswith("dbsp"):
                        devs[name].append((abs(float(r["rho_measured"]) / p.compute_imbalance - 1), layer, cfg.name))
                    if name not in picks or p.total_ms < picks[name][0]:
                        picks[name] = (p.total_ms, cfg.name, float(r["total_ms"]))
            best = min(timed.values(), key=lambda r: float(r["total_ms"]))
            print(f"{kind} layer {layer}: measured fastest {best['config']} {float(best['total_ms']):.2f} ms; " + "; ".join(
                f"{name} calibration picks {c} (measured {ms:.2f} ms)" for name, (_, c, ms) in picks.items()), flush=True)
            del w, mask, work  # the next layer's workload needs the memory (~9 GB in float32)
        for name, d in devs.items():
            worst = max(d)
            print(f"  {kind}, target 2 with the {name} calibration: max {100 * worst[0]:.1f}% (layer {worst[1]} {worst[2]}), "
                  f"median {100 * statistics.median(x[0] for x in d):.1f}%")
    print(f"rebuilt vs the run's rho_model: largest difference {check:.4f}")
    return check


if __name__ == "__main__":
    main()
