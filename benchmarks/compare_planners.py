"""Two versions of the planner side by side, interleaved in one process (issue 6 timings).

Timings on a shared CPU drift by tens of percent between runs, so comparing two planners from
two runs of ``bench_plan.py`` can mislead. This script loads an older ``dbsp`` as a second
package, ``dbsp_old``, and times both on the same summaries in alternating order::

    mkdir -p /tmp/old && git archive 01740bd dbsp | tar -x -C /tmp/old && mv /tmp/old/dbsp /tmp/old/dbsp_old
    python benchmarks/compare_planners.py --old /tmp/old --rounds 15

The masks are ``bench_plan.py``'s: layer 0 of the drifting synthetic Wan2.1-14B 720p workload
over ``--steps`` denoising steps, one ``WorkSummary`` per step, built by each package's own
``summarize_work`` (not timed). Per round and package, CPU time (``time.thread_time``) of:

* ``step 0``: ``choose_degrees`` (world 8) on step 0's summary;
* ``run``: a ``PlanCache(incremental=True)`` over all steps with ``world=8`` (what
  ``bench_plan.py`` section 3 calls "summaries, new"), as a share of the run's predicted attention;
* ``later``: ``choose_degrees`` on each step whose mask holds fully dense heads, per choice.

Every call plans from a fresh copy of the summary (its presets kept), as a real run does. Prints
medians, minima and the paired new/old ratio (median over rounds), and checks that both packages
pick the same degrees and plans (fingerprints).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import time

import dbsp.plan as new_plan
from dbsp.simulate import WORKLOADS, synthetic_work

from bench_plan import fresh  # a new summary object with its presets kept (benchmarks/ is on sys.path)


def summaries(mod, steps: int) -> list:
    """Layer 0's summary of every step, built by package ``mod`` (its presets recorded)."""
    wl = WORKLOADS["wan14b-720p"]
    out = []
    for step in range(steps):
        work = synthetic_work(heads=wl.heads, seq_len=wl.seq_len, q_block=wl.q_block, frames=wl.frames, seed=0, step=step)
        s = mod.summarize_work(work, q_block=wl.q_block, seq_len=wl.seq_len)
        s.__dict__["_presets"] = tuple(k for k in s.__dict__ if k not in {f.name for f in dataclasses.fields(s)})
        out.append(s)
    return out


def one_round(mod, cost, ss: list, later: list[int]) -> dict:
    heads = ss[0].heads
    t0 = time.thread_time()
    mod.choose_degrees(fresh(ss[0]), world=8, heads=heads, cost_model=cost, head_dim=128)
    step0 = time.thread_time() - t0
    copies = [fresh(s) for s in ss]
    cache = mod.PlanCache(incremental=True, cost_model=cost, head_dim=128)
    t0 = time.thread_time()
    plans = [cache.get(0, s, world=8) for s in copies]
    run = time.thread_time() - t0
    copies = [fresh(ss[i]) for i in later]
    t0 = time.thread_time()
    for s in copies:
        mod.choose_degrees(s, world=8, heads=heads, cost_model=cost, head_dim=128)
    per_later = (time.thread_time() - t0) / max(1, len(later))
    return dict(step0=1e3 * step0, run=1e3 * run, later=1e3 * per_later, plans=plans)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="directory holding the older package as dbsp_old/")
    parser.add_argument("--rounds", type=int, default=15, help="rounds, old and new alternating in order. Default: 15")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps. Default: 50")
    args = parser.parse_args()
    sys.path.insert(0, args.old)
    old_plan = importlib.import_module("dbsp_old.plan")
    packages = {"old": old_plan, "new": new_plan}
    print(f"building {args.steps} summaries per package ...", flush=True)
    sums = {name: summaries(mod, args.steps) for name, mod in packages.items()}
    costs = {name: mod.CostModel.default() for name, mod in packages.items()}
    for name, mod in packages.items():  # numba's import and compilation are not timed
        jit = getattr(mod, "_jit", None)
        print(f"{name}: planner loops {'compiled (numba)' if jit is not None and jit.warm_up() else 'numpy'}")
    later = [i for i, s in enumerate(sums["new"]) if new_plan.dense_heads(s)]
    times: dict[str, dict[str, list[float]]] = {name: {"step0": [], "run": [], "later": []} for name in packages}
    plans = {}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            res = one_round(packages[name], costs[name], sums[name], later)
            for key in times[name]:
                times[name][key].append(res[key])
            plans[name] = res["plans"]
        print(f"round {r + 1}/{args.rounds}: run old {times['old']['run'][-1]:.2f} ms, new {times['new']['run'][-1]:.2f} ms", flush=True)
    same = [a.fingerprint() == b.fingerprint() for a, b in zip(plans["old"], plans["new"])]
    attn = sum(costs["new"].predict(p.with_tile_work(s), head_dim=128).total_ms for p, s in zip(plans["new"], sums["new"]))
    print(f"\n{args.steps}-step run's predicted attention (new plans): {attn:.1f} ms; steps with fully dense heads: "
          f"{len(later)}; plans of the run identical in both: {sum(same)}/{len(same)}")
    rows = [("step0", "step 0 degree choice"), ("run", f"{args.steps}-step run")]
    if later:  # (no step of a short run may hold fully dense heads)
        rows.append(("later", "degree choice, dense steps"))
    for key, label in rows:
        cells = []
        for name in packages:
            v = times[name][key]
            share = f" ({100 * statistics.median(v) / attn:.3f}%, min {100 * min(v) / attn:.3f}%)" if key == "run" else ""
            cells.append(f"{name} median {statistics.median(v):6.2f} min {min(v):6.2f} ms{share}")
        ratio = statistics.median(n / o for n, o in zip(times["new"][key], times["old"][key]))
        print(f"  {label:>27}: " + "; ".join(cells) + f"; new/old paired median {ratio:.3f}")


if __name__ == "__main__":
    main()
