"""End-to-end sequence parallelism: dbsp vs diffusers' own context parallelism (dense) on P GPUs, one run.

Issue 10: a real multi-GPU run of dbsp's sequence parallelism beside the ecosystem baseline, diffusers'
context parallelism (``ModelMixin.enable_parallelism`` with ``ContextParallelConfig``), per GPU count.
Model: a diffusers ``WanTransformer3DModel`` with random weights (``dbsp.demo.WAN_CONFIGS``), by default
Wan2.1-14B at 720p (21 x 45 x 80 = 75,600 tokens, 40 heads) with ``--layers 2`` of its 40 blocks, bf16.
Every rank builds the same model (same seed) and the same latents and text; every configuration
returns the full output on every rank.

Configurations (P = world size; ``U{u}R{r}`` = Ulysses degree u x Ring degree r, every factorisation
of P whose Ulysses degree divides the heads):

* ``1 GPU dense``: the unmodified model in one process (each rank runs it alone): the dense output
  every dense configuration is checked against, and the time speedups are relative to.
* ``diffusers-cp U{u}R{r}``: a fresh model (``enable_parallelism`` cannot be undone) with the
  ``_native_cudnn`` attention backend (cuDNN SDPA, the kernel dbsp uses for dense heads; ``native``
  on CPU) and diffusers' Ulysses / Ring / unified attention. Dense.
* ``dbsp-dense U{u}R{r}``: ``dbsp.integrations.diffusers.apply`` with a full mask and
  ``groups=SPGroups.init(ulysses=u, ring=r)``: the same work as diffusers-cp through dbsp's runtime.
* ``dbsp MxN@d 1 GPU`` / ``U{u}R{r}`` / ``auto``: ``FixedDensity(d)`` masks (random tiles; one mask
  for every layer) in one process, with fixed degrees, and with ``SPGroups.all_degrees`` (the
  planner picks the degrees per layer). The one-process run is the output reference of its case.

Timing: per rank the median of ``--repeats`` forwards after ``--warmup`` (barrier before each
forward; CUDA events, wall clock on CPU), then the max over ranks. Each configuration's first forward
is untimed and checked: relative L2 error of the output against its reference (max over ranks),
flagged ``HIGH`` above 2e-2 (bf16) / 1e-4 (fp32). That forward runs at timestep 999 everywhere; the
timed ones count down from 998, so dbsp sees a new denoising step each time (one plan per layer,
reused while it still balances) rather than ever more classifier-free-guidance branches.

    torchrun --nproc_per_node 2 benchmarks/bench_e2e_sp.py --out results/e2e_sp      # 2 GPUs
    torchrun --nproc_per_node 2 benchmarks/bench_e2e_sp.py --quick --out /tmp/e2esp  # CPU (gloo) smoke run

``--quick``: the ``tiny`` config, float32, CPU, gloo, 1 repeat. On CPU, diffusers' ``native``
backend has no ring attention (its forward returns no log-sum-exp), so diffusers-cp rows with
R > 1 are skipped there, with the reason in the table.

Rank 0 writes ``e2e_sp.csv`` and ``e2e_sp.png`` to ``--out`` and prints a table and the issue-10
ratios: best dbsp-dense vs best diffusers-cp (equal work: the runtime's overhead), and each sparse
configuration vs best diffusers-cp.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

from bench_e2e import Case, _sdpa_context, latents_tokens, parse_cases, write_csv
from dbsp.demo import WAN_CONFIGS, build_wan, wan_inputs
from dbsp.dist import SPGroups
from dbsp.dist.groups import factorisations
from dbsp.integrations.diffusers import FixedDensity, FixedMask, apply, remove
from dbsp.mask import SparseMask

DEFAULT_FIXED = "128x128@0.2,128x1@0.2"
QUICK_FIXED = "32x32@0.3,32x1@0.3"
CHECK_TIMESTEP = 999.0
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@dataclass(frozen=True)
class Config:
    """One timed configuration. ``ulysses == ring == 0`` means the planner picks ("auto")."""

    family: str  # "1 GPU", "diffusers-cp", "dbsp-dense" or "dbsp"
    ulysses: int = 1
    ring: int = 1
    case: Case | None = None  # the fixed-density case of "dbsp" rows

    @property
    def layout(self) -> str:
        if self.family == "1 GPU" or (self.family == "dbsp" and self.ulysses == 1 and self.ring == 1):
            return "1 GPU"
        return "auto" if self.ulysses == 0 else f"U{self.ulysses}R{self.ring}"

    @property
    def name(self) -> str:
        if self.family == "dbsp":
            return f"dbsp {self.case.q_block}x{self.case.kv_tile}@{self.case.density:g} {self.layout}"
        return "1 GPU dense" if self.family == "1 GPU" else f"{self.family} {self.layout}"


def configs(world: int, heads: int, cases: list[Case]) -> list[Config]:
    """Every configuration of one run, references first (``1 GPU dense``, then each case in one process)."""
    degrees = factorisations(world, heads=heads)
    out = [Config("1 GPU")]
    out += [Config("diffusers-cp", u, r) for u, r in degrees]
    out += [Config("dbsp-dense", u, r) for u, r in degrees]
    for case in cases:
        out.append(Config("dbsp", 1, 1, case))
        out += [Config("dbsp", u, r, case) for u, r in degrees]
        out.append(Config("dbsp", 0, 0, case))
    return out


# ------------------------------------------------------------------------------------ ranks


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def forward(model, latents, text, t: float):
    timestep = torch.tensor([t], device=latents.device)
    return model(latents, timestep, text, return_dict=False)[0]


def time_forwards(model, latents, text, *, warmup: int, repeats: int) -> float:
    """Median forward ms on this rank; a barrier before each forward keeps the ranks in step."""
    cuda = latents.device.type == "cuda"
    t = CHECK_TIMESTEP
    times = []
    for i in range(warmup + repeats):
        t -= 1.0
        dist.barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(model, latents, text, t)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            forward(model, latents, text, t)
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.float() - ref.float()).norm()
    return float(diff / ref.float().norm().clamp_min(1e-30))


def enable_diffusers_cp(model, groups: SPGroups, device: torch.device) -> None:
    """diffusers' context parallelism over ``groups``' mesh (the same ``(ring, ulysses)`` layout as dbsp)."""
    from diffusers import ContextParallelConfig

    _give_logger_warning_once()
    model.set_attention_backend("_native_cudnn" if device.type == "cuda" else "native")
    config = ContextParallelConfig(ulysses_degree=groups.ulysses, ring_degree=groups.ring, mesh=groups.mesh)
    # diffusers picks its device as rank % torch.accelerator.device_count(), which divides by zero
    # on a machine without accelerators; on CPU the index is unused, so report one device.
    patch = mock.patch.object(torch.accelerator, "device_count", return_value=1) if device.type != "cuda" \
        else contextlib.nullcontext()
    with patch:
        model.enable_parallelism(config=config)


def _give_logger_warning_once() -> None:
    """diffusers' context-parallel input hook calls ``logger.warning_once`` (for Wan2.1's 1-D timestep,
    on every forward), a method ``logging.Logger`` has only after ``transformers`` is imported (it
    adds it); without transformers the forward raises AttributeError. Give that one logger the method."""
    from diffusers.hooks import context_parallel

    logger = context_parallel.logger
    if hasattr(logger, "warning_once"):
        return
    seen: set[str] = set()

    def warning_once(msg, *args, **kwargs):
        if msg not in seen:
            seen.add(msg)
            logger.warning(msg, *args, **kwargs)

    logger.warning_once = warning_once


# ------------------------------------------------------------------------------------ the run


def run(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    config = WAN_CONFIGS[args.model]
    layers = min(args.layers, config.layers)
    latents, text = wan_inputs(config, device=device, dtype=dtype, seed=0)
    S = latents_tokens(latents)
    cases = parse_cases("fixed", args.fixed)
    all_groups = SPGroups.all_degrees(heads=config.heads)
    plan = configs(world, config.heads, cases)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    say(f"{config.describe()}; running {layers} of {config.layers} blocks; {world} processes; {dev_name}; {dtype}")

    policies = {case: FixedDensity(case.density, q_block=case.q_block, kv_tile=case.kv_tile, seed=0) for case in cases}
    full = FixedMask(SparseMask.full(1, config.heads, S, S, q_block=128, device=device))
    shared = build_wan(config, device=device, dtype=dtype, seed=0, layers=layers)
    refs: dict = {}
    start = time.perf_counter()
    rows = []
    for i, cfg in enumerate(plan):
        say(f"[{i + 1}/{len(plan)}] {cfg.name} (at {time.perf_counter() - start:.0f} s)")
        row = dict(model=args.model, layers=layers, tokens=S, P=world, config=cfg.name, family=cfg.family,
                   U=cfg.layout if cfg.ulysses == 0 else cfg.ulysses, R=cfg.layout if cfg.ulysses == 0 else cfg.ring,
                   density=1.0, device=dev_name)
        if cfg.family == "diffusers-cp" and device.type != "cuda" and cfg.ring > 1:
            row["error"] = "skipped: diffusers' native backend has no ring attention on CPU (no log-sum-exp)"
            rows.append(row)
            say(f"  {row['error']}")
            continue
        model, handle, error = shared, None, None
        try:
            with torch.no_grad(), _sdpa_context(device):
                if cfg.family == "diffusers-cp":
                    model = build_wan(config, device=device, dtype=dtype, seed=0, layers=layers)
                    enable_diffusers_cp(model, all_groups[(cfg.ulysses, cfg.ring)], device)
                elif cfg.family != "1 GPU":
                    groups = None if cfg.layout == "1 GPU" else (
                        all_groups if cfg.layout == "auto" else all_groups[(cfg.ulysses, cfg.ring)])
                    handle = apply(model, predictor=full if cfg.family == "dbsp-dense" else policies[cfg.case],
                                   groups=groups)
                out = forward(model, latents, text, CHECK_TIMESTEP)
                ms = time_forwards(model, latents, text, warmup=args.warmup, repeats=args.repeats)
        except Exception as exc:  # one failing configuration must not end the run: record it and go on
            error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            if handle is not None:
                remove(model)
        # Agree on failure before the next collective: a rank that raised alone must not leave the
        # others waiting in a barrier of the next configuration.
        failed = max_over_ranks(float(error is not None), device) > 0
        if failed:
            row["error"] = error or "failed on another rank"
            rows.append(row)
            say(f"  failed: {row['error']}")
        else:
            key = ("dense",) if cfg.family != "dbsp" else ("sparse", cfg.case)
            is_ref = cfg.layout == "1 GPU"
            if is_ref:
                refs[key] = out
            err = max_over_ranks(rel_err(out, refs[key]) if key in refs else math.nan, device)
            row["forward_ms"] = round(max_over_ranks(ms, device), 3)
            row["rel_err"] = math.nan if is_ref else err
            if is_ref:
                row["err_flag"] = "ref"
            elif key not in refs:  # its single-process reference failed: nothing to compare with
                row["err_flag"] = "no ref"
            else:
                row["err_flag"] = "HIGH" if not err <= TOLERANCE[dtype] else ""
            if cfg.family == "dbsp":
                like = latents.new_empty(1, S, config.heads, 1)
                row["density"] = round(policies[cfg.case](like, like, layer=0, step=0).density(), 4)
            rows.append(row)
            say(f"  {row['forward_ms']:10.2f} ms  rel err {fmt(row['rel_err'], '.2e')} {row['err_flag']}")
        if model is not shared:
            del model
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del shared
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    ok = [r for r in rows if "error" not in r]
    base = next((r["forward_ms"] for r in ok if r["family"] == "1 GPU"), math.nan)
    cp = [r["forward_ms"] for r in ok if r["family"] == "diffusers-cp"]
    best_cp = min(cp) if cp else math.nan
    for r in ok:
        r["speedup_vs_1gpu"] = round(base / r["forward_ms"], 3)
        r["speedup_vs_best_cp"] = round(best_cp / r["forward_ms"], 3) if cp else math.nan


# ------------------------------------------------------------------------------------ report


def fmt(x, spec: str) -> str:
    return "-" if x is None or x == "" or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summarize(rows: list[dict]) -> None:
    print(f"\n{'config':30s} {'density':>7s} {'forward ms':>11s} {'vs 1 GPU':>9s} {'vs best cp':>11s} {'rel err':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:30s} {r['error']}")
            continue
        print(f"{r['config']:30s} {r['density']:7.3f} {r['forward_ms']:11.2f} {fmt(r['speedup_vs_1gpu'], '8.2f')}x "
              f"{fmt(r['speedup_vs_best_cp'], '10.2f')}x {fmt(r['rel_err'], '9.2e')} {r['err_flag']}")
    ok = [r for r in rows if "error" not in r]
    cp = [r for r in ok if r["family"] == "diffusers-cp"]
    if not cp:
        print("\nno diffusers-cp configuration ran: no issue-10 ratios")
        return
    best_cp = min(cp, key=lambda r: r["forward_ms"])
    print(f"\nissue 10 (P = {best_cp['P']}, best diffusers-cp = {best_cp['config']}, {best_cp['forward_ms']:.2f} ms):")
    dense = [r for r in ok if r["family"] == "dbsp-dense"]
    if dense:
        best = min(dense, key=lambda r: r["forward_ms"])
        print(f"  best dbsp-dense ({best['config']}) vs best diffusers-cp: x{best['speedup_vs_best_cp']:.3f} "
              f"(runtime overhead {100 * (best['forward_ms'] / best_cp['forward_ms'] - 1):+.1f}%)")
    for r in ok:
        if r["family"] == "dbsp":
            print(f"  {r['config']:30s} vs best diffusers-cp: x{r['speedup_vs_best_cp']:.3f}")
    high = [r["config"] for r in ok if r["err_flag"] == "HIGH"]
    if high:
        print("  WARNING: output error above tolerance in " + ", ".join(high))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    colors = {"1 GPU": "#888888", "diffusers-cp": "#d08c3c", "dbsp-dense": "#8fb0dc", "dbsp": "#3b6fb6"}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(ok) + 2), 4.2))
    x = range(len(ok))
    ax.bar(x, [r["forward_ms"] for r in ok], color=[colors[r["family"]] for r in ok])
    for i, r in enumerate(ok):
        label = fmt(r["speedup_vs_best_cp"], ".2f")
        ax.text(i, r["forward_ms"], f"x{label}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), [r["config"] for r in ok], rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("forward ms (max over ranks)")
    if ok:
        r = ok[0]
        ax.set_title(f"{r['model']}, {r['layers']} blocks, {r['tokens']} tokens, P = {r['P']} ({r['device']}); "
                     "labels: speedup vs best diffusers-cp", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan2.1-14b", choices=sorted(WAN_CONFIGS), help="Default: wan2.1-14b")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks to build and run. Default: 2")
    p.add_argument("--fixed", default=None, help=f"FixedDensity cases MxN@density,... Default: {DEFAULT_FIXED}")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration. Default: 5")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed forwards after the checked one (which builds masks and plans). Default: 1")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective waits for a peer before failing (no hang). Default: 300")
    p.add_argument("--quick", action="store_true", help="tiny config, float32, CPU (gloo), 1 repeat")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"need --layers >= 1, --repeats >= 1, --warmup >= 0; got {args.layers}, {args.repeats}, "
                         f"{args.warmup}")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("bench_e2e_sp.py runs one process per GPU: launch it with torchrun, e.g.\n"
                         "  torchrun --nproc_per_node 2 benchmarks/bench_e2e_sp.py --out results/e2e_sp")
    if args.quick:
        args.model, args.repeats, args.warmup = "tiny", 1, 0
        args.fixed = QUICK_FIXED if args.fixed is None else args.fixed
    elif args.fixed is None:
        args.fixed = DEFAULT_FIXED
    if args.quick:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_e2e_sp needs GPUs (use --quick for the CPU smoke run)")
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout),
                            device_id=device if device.type == "cuda" else None)
    try:
        if dist.get_world_size() < 2:
            raise SystemExit("bench_e2e_sp compares parallel layouts: run it on 2 or more processes")
        rows = run(args, device, dtype)
        if dist.get_rank() == 0:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            write_csv(out / "e2e_sp.csv", rows)
            plot(rows, out / "e2e_sp.png")
            summarize(rows)
            print(f"\nwrote {out / 'e2e_sp.csv'}, {out / 'e2e_sp.png'}", flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
