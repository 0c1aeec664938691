"""Issue 6 targets 1 and 2: balance of db-SP plans and the cost of planning, on CPU or GPU.

    python benchmarks/bench_plan.py --out results/plan            # Wan2.1-14B 720p size
    python benchmarks/bench_plan.py --out /tmp/plan --quick       # small CPU smoke run

1. rho_s before and after balancing for every U x R factorisation of 8 ranks, on synthetic skewed
   workloads (``dbsp.simulate.synthetic_work``: five head patterns, two seeds each), planned from
   the dense work tensor and from its ``WorkSummary`` (``rho_s`` of both judged exactly on the
   full work).
2. Time of a full re-plan (``make_plan``) and of the reuse check (``PlanCache.get`` on a hit), each
   from the dense work tensor (passes over 224 MB at Wan2.1-14B 720p) and from the summary; the
   time to build the summary (``summarize_work``) is reported apart: in a real run it is done
   where the mask lives (on the GPU for online predictors), and only the summary travels.
3. A 50-step run of drifting masks through a ``PlanCache``: planning time over the attention time
   the cost model predicts for the run. From the dense work, from summaries the old way (degrees
   chosen apart, then ``PlanCache(fast_check=False)``: the tile check recomputed from scratch, a
   full re-plan on every miss) and the new way (``PlanCache(incremental=True)`` with ``world=8``:
   the degree choice is the first miss, checks precomputed per plan, misses at ring degree 1
   repaired by head swaps), and the new way with the degrees given (those the degree choice picks
   at step 0, chosen before the run: the reuse machinery alone). Wall time and CPU time
   (``time.thread_time``) of the planning calls; the degree choice at step 0 is shown apart.
   Every path plans each step from a new summary object (as a real run does), so nothing one path
   remembers on a summary speeds up another.
   Then the new way for several thresholds P_s (re-plans against the rho_s reached), and
   ``PlanCache(defer=True)`` over 4 layers both ways: the step thread's time in ``get`` and the
   background thread's CPU time.
4. The degree choice (``choose_degrees``, world 8) on every step's summary of that layer: what a
   re-plan that re-picks the degrees costs at each step (later steps hold fully dense heads, whose
   time-weighted plans compete too), CPU time, median of ``--repeat``.

Writes ``plan_balance.csv``, ``plan_timing.csv``, ``plan_reuse.csv``, ``plan_reuse_deferred.csv``,
``plan_degrees.csv`` and ``plan_balance.png`` to ``--out`` and prints compact tables. With ``--device cuda`` the work tensor lives on the GPU and
the passes over it (and the summary's pooling) run there; the greedy, the refinement and the plan
itself run on the CPU. Times are medians; the CPU machines are shared, so expect some noise.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from dbsp.plan import _jit
from dbsp.plan import (CostModel, PlanCache, WorkSummary, choose_degrees, dense_heads, imbalance_ratio, make_plan, summarize_work,
                       tile_work)
from dbsp.simulate import KINDS, WORKLOADS, synthetic_work

FACTORISATIONS = [(8, 1), (4, 2), (2, 4), (1, 8)]
PATTERNS = {"mix": KINDS, "window": ("window",), "temporal": ("temporal",), "sink+dense": ("sink", "dense"), "hotspot": ("hotspot",)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeat: int) -> float:
    """Median wall time in ms of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def balance(geom: dict, device: torch.device, seeds: list[int]) -> list[dict]:
    rows = []
    for name, kinds in PATTERNS.items():
        for seed in seeds:
            work = synthetic_work(**geom, seed=seed, kinds=kinds).to(device)
            for u, r in FACTORISATIONS:
                kw = dict(q_block=geom["q_block"], seq_len=geom["seq_len"])
                naive = imbalance_ratio(work, ulysses=u, ring=r, **kw)
                t0 = time.perf_counter()
                plan = make_plan(work, ulysses=u, ring=r, **kw)
                ms = 1e3 * (time.perf_counter() - t0)
                summary = summarize_work(work, **kw)
                t0 = time.perf_counter()
                coarse = make_plan(summary, ulysses=u, ring=r)
                coarse_ms = 1e3 * (time.perf_counter() - t0)
                exact = imbalance_ratio(work, ulysses=u, ring=r, plan=coarse)  # judged on the full work
                assert exact == coarse.imbalance(), "a summary's rho_s must be exact"
                rows.append(dict(pattern=name, seed=seed, ulysses=u, ring=r, rho_before=naive, rho_after=plan.imbalance(),
                                 moved_q=plan.moved_blocks("q"), moved_kv=plan.moved_blocks("kv"),
                                 blocks=u * plan.num_blocks, plan_ms=ms, coarse=summary.coarse, rho_summary=exact,
                                 moved_summary=coarse.moved_blocks("q") + coarse.moved_blocks("kv"), plan_summary_ms=coarse_ms))
    return rows


def timing(geom: dict, device: torch.device, repeat: int) -> list[dict]:
    work = synthetic_work(**geom, seed=0).to(device)
    kw = dict(q_block=geom["q_block"], seq_len=geom["seq_len"])
    summary = summarize_work(work, **kw)
    summarize_ms = _time(lambda: summarize_work(work, **kw), device, repeat)
    rows = []
    for u, r in FACTORISATIONS:
        plan = make_plan(work, ulysses=u, ring=r, **kw)
        cache, small = PlanCache(), PlanCache()
        cache.get(0, work, ulysses=u, ring=r, **kw)
        small.get(0, summary, ulysses=u, ring=r)
        rows.append(dict(
            ulysses=u, ring=r, device=device.type,
            replan_ms=_time(lambda: make_plan(work, ulysses=u, ring=r, **kw), device, repeat),
            check_ms=_time(lambda: cache.get(0, work, ulysses=u, ring=r, **kw), device, repeat),
            tile_pass_ms=_time(lambda: tile_work(work, plan), device, repeat),
            summarize_ms=summarize_ms,
            summary_mb=summary.nbytes / 1e6,
            summary_replan_ms=_time(lambda: make_plan(summary, ulysses=u, ring=r), device, 4 * repeat),
            summary_check_ms=_time(lambda: small.get(0, summary, ulysses=u, ring=r), device, 4 * repeat),
        ))
        assert small.hits > 0 and cache.hits > 0, "the timed checks must be hits"
    return rows


def fresh(s: WorkSummary) -> WorkSummary:
    """A new summary object equal to ``s`` as :func:`summarize_work` returned it: its preset
    statistics kept, nothing the planner remembers on it (the studies share one set of summaries,
    and a real run plans every step from a new one)."""
    out = dataclasses.replace(s)
    out.__dict__.update({k: s.__dict__[k] for k in s._presets})
    out.__dict__["_presets"] = s._presets
    return out


def summaries(geom: dict, device: torch.device, steps: int, layers: int) -> dict:
    """``(layer, step) -> (WorkSummary, ms to build it)`` of the drifting synthetic masks (layer
    ``l`` is seed ``l``), built once; the studies plan from :func:`fresh` copies."""
    kw = dict(q_block=geom["q_block"], seq_len=geom["seq_len"])
    out = {}
    for layer in range(layers):
        for step in range(steps):
            work = synthetic_work(**geom, seed=layer, step=step).to(device)
            _sync(device)
            t0 = time.perf_counter()
            s = summarize_work(work, **kw)
            _sync(device)
            out[layer, step] = (s, 1e3 * (time.perf_counter() - t0))
            s.__dict__["_presets"] = tuple(k for k in s.__dict__ if k not in {f.name for f in dataclasses.fields(s)})
    return out


def reuse(geom: dict, device: torch.device, steps: int, cost_model: CostModel, head_dim: int, path: str,
          pooled: dict | None = None, threshold: float = 1.05) -> list[dict]:
    """One layer over ``steps`` denoising steps of drifting masks. ``path``:

    * "dense": degrees chosen at step 0 (its time counts as planning of step 0), then a
      ``PlanCache`` on the work tensor;
    * "summary": the same from summaries, with the check as it was before ``_Check`` (``fast_check=False``);
    * "summary, new": ``PlanCache(incremental=True)`` with ``world=8`` from summaries: the degree
      choice is its first miss;
    * "summary, given": the same cache with the degrees given (those the degree choice picks at
      step 0, chosen before the run and not counted), as for a user who fixes them.

    Summaries come from ``pooled`` (:func:`summaries`); building them is the ``summarize_ms``
    column, not planning. ``rho`` is exact (from the dense work, or from the summary, which is
    exact for the plans built from it).
    """
    kw = dict(q_block=geom["q_block"], seq_len=geom["seq_len"])

    def source(step: int):
        if path == "dense":
            work = synthetic_work(**geom, seed=0, step=step).to(device)
            return work, work, kw, 0.0
        s, ms = pooled[0, step]
        s = fresh(s)
        return s, s, {}, ms

    work, src, extra, _ = source(0)
    choose_ms = choose_cpu = 0.0
    if path == "summary, given":
        u, r, _ = choose_degrees(fresh(src), world=8, heads=geom["heads"], cost_model=cost_model, head_dim=head_dim)
        cache = PlanCache(threshold=threshold, incremental=True, cost_model=cost_model, head_dim=head_dim)
        request = dict(ulysses=u, ring=r)
    elif path != "summary, new":
        t0, c0 = time.perf_counter(), time.thread_time()
        u, r, _ = choose_degrees(src, world=8, heads=geom["heads"], cost_model=cost_model, head_dim=head_dim, **extra)
        choose_ms, choose_cpu = 1e3 * (time.perf_counter() - t0), 1e3 * (time.thread_time() - c0)
        cache = PlanCache(threshold=threshold, fast_check=False)
        request = dict(ulysses=u, ring=r)
    else:
        cache = PlanCache(threshold=threshold, incremental=True, cost_model=cost_model, head_dim=head_dim)
        request = dict(world=8)
    rows = []
    for step in range(steps):
        work, src, extra, summarize_ms = source(step)
        misses, repairs = cache.misses, cache.repairs
        _sync(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        plan = cache.get(0, src, **request, **extra)
        _sync(device)
        ms, cpu = 1e3 * (time.perf_counter() - t0), 1e3 * (time.thread_time() - c0)
        exact = imbalance_ratio(work, ulysses=plan.ulysses, ring=plan.ring, plan=plan)
        attn = cost_model.predict(plan.with_tile_work(work), head_dim=head_dim).total_ms
        rows.append(dict(path=path, threshold=threshold, step=step, ulysses=plan.ulysses, ring=plan.ring,
                         replanned=int(cache.misses > misses), repaired=int(cache.repairs > repairs), rho=exact,
                         planning_ms=ms + (choose_ms if step == 0 else 0.0), planning_cpu_ms=cpu + (choose_cpu if step == 0 else 0.0),
                         summarize_ms=summarize_ms, predicted_attention_ms=attn))
    return rows


def reuse_deferred(geom: dict, steps: int, cost_model: CostModel, head_dim: int, layers: int, pooled: dict, new: bool) -> list[dict]:
    """``layers`` layers over ``steps`` steps through one ``PlanCache(defer=True)`` with ``world=8``
    (degree choice and re-plans in its background thread), from summaries of drifting masks.

    After each layer's ``get`` the caller sleeps for that layer's predicted attention time, as a
    host thread waits for its GPU; ``planning_ms`` is the time spent inside ``get`` (what the step
    waits for: the hand-off, the wait for the previous decision, the first call's unbalanced
    layout; ``planning_cpu_ms`` its CPU time), ``decide_ms`` / ``decide_cpu_ms`` the background
    thread's wall and CPU time. Building the summaries (on the GPU where the masks live) is not
    counted. ``new``: the new cache (``incremental=True``, precomputed checks), else the old
    (``fast_check=False``, full re-plans).
    """
    options = dict(incremental=True) if new else dict(fast_check=False)
    cache = PlanCache(defer=True, cost_model=cost_model, head_dim=head_dim, **options)
    rows = []
    for step in range(steps):
        for layer in range(layers):
            summary = fresh(pooled[layer, step][0])
            decided, decided_cpu = cache.decide_ms, cache.decide_cpu_ms
            t0, c0 = time.perf_counter(), time.thread_time()
            plan = cache.get(layer, summary, world=8)
            ms, cpu = 1e3 * (time.perf_counter() - t0), 1e3 * (time.thread_time() - c0)
            attn = cost_model.predict(plan.with_tile_work(summary), head_dim=head_dim).total_ms
            time.sleep(attn / 1e3)
            rows.append(dict(path="summary, deferred" + (", new" if new else ""), step=step, layer=layer, ulysses=plan.ulysses,
                             ring=plan.ring, rho=imbalance_ratio(summary, ulysses=plan.ulysses, ring=plan.ring, plan=plan),
                             planning_ms=ms, planning_cpu_ms=cpu, predicted_attention_ms=attn,
                             decide_ms=cache.decide_ms - decided, decide_cpu_ms=cache.decide_cpu_ms - decided_cpu))
    cache.clear()
    return rows


def degree_choices(pooled: dict, steps: int, cost_model: CostModel, head_dim: int, repeat: int) -> list[dict]:
    """``choose_degrees`` (world 8) on each step's summary of layer 0, each time from a
    :func:`fresh` copy: the pick, the summary's fully dense heads and the median CPU time."""
    rows = []
    for step in range(steps):
        s = pooled[0, step][0]
        times = []
        for _ in range(repeat):
            copy = fresh(s)
            c0 = time.thread_time()
            u, r, _ = choose_degrees(copy, world=8, heads=copy.heads, cost_model=cost_model, head_dim=head_dim)
            times.append(1e3 * (time.thread_time() - c0))
        rows.append(dict(step=step, ulysses=u, ring=r, dense_heads=len(dense_heads(s)), choose_cpu_ms=statistics.median(times)))
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{n}\nU{u}R{r}" for n in PATTERNS for u, r in FACTORISATIONS]
    worst = lambda key: [max(x[key] for x in rows if x["pattern"] == n and (x["ulysses"], x["ring"]) == (u, r))  # noqa: E731
                         for n in PATTERNS for u, r in FACTORISATIONS]
    fig, ax = plt.subplots(figsize=(14, 4))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], worst("rho_before"), width=0.4, label="contiguous (USP)")
    ax.bar([x + 0.2 for x in xs], worst("rho_after"), width=0.4, label="db-SP plan")
    ax.axhline(1.05, color="k", lw=0.8, ls="--", label="target 1.05")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("rho_s (worst over seeds)")
    ax.set_ylim(0.95, None)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _loops() -> str:
    """Which inner loops the planner runs, compiled first so that no timing includes numba's
    import or compilation (``dbsp.plan._jit``)."""
    if not _jit.warm_up():
        return "numpy (numba not installed, or DBSP_NUMBA=0)"
    import numba

    return f"compiled (numba {numba.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small shapes, for a CPU smoke run")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda where present). Default: auto")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of the reuse run. Default: 50")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (median). Default: 5")
    parser.add_argument("--cost-model", type=Path, default=None, help="calibration JSON. Default: dbsp/cost_model.json")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    wl = WORKLOADS["wan14b-720p"]
    geom = dict(heads=wl.heads, seq_len=wl.seq_len, q_block=wl.q_block, frames=wl.frames)
    seeds, steps, repeat = [0, 1], args.steps, args.repeat
    if args.quick:
        geom, seeds, steps, repeat = dict(heads=40, seq_len=8000, q_block=64, frames=7), [0], min(steps, 6), 2
    cost_model = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    args.out.mkdir(parents=True, exist_ok=True)
    nb = -(-geom["seq_len"] // geom["q_block"])
    title = f"H={geom['heads']}, S={geom['seq_len']} ({nb} blocks of {geom['q_block']}), synthetic block masks, device {device}"
    print(title)
    print(f"planner loops: {_loops()}")

    bal = balance(geom, device, seeds)
    write_csv(bal, args.out / "plan_balance.csv")
    plot(bal, args.out / "plan_balance.png", title)
    print("\n1. rho_s before -> after (worst over seeds), moved q+kv blocks, make_plan ms; dense work / summary")
    print(f"{'pattern':>11} | " + " | ".join(f"{f'U{u}R{r}':^42}" for u, r in FACTORISATIONS))
    for name in PATTERNS:
        cells = []
        for u, r in FACTORISATIONS:
            sel = [x for x in bal if x["pattern"] == name and (x["ulysses"], x["ring"]) == (u, r)]
            before, after = max(x["rho_before"] for x in sel), max(x["rho_after"] for x in sel)
            coarse = max(x["rho_summary"] for x in sel)
            moved = max(x["moved_q"] + x["moved_kv"] for x in sel)
            cells.append(f"{before:5.3f} -> {after:6.4f} / {coarse:6.4f} {moved:5d} {max(x['plan_ms'] for x in sel):4.0f}/"
                         f"{max(x['plan_summary_ms'] for x in sel):<4.1f}")
        print(f"{name:>11} | " + " | ".join(cells))
    for key, label in (("rho_after", "dense work"), ("rho_summary", f"summary (coarse={bal[0]['coarse']}, exact rho_s)")):
        worst = max(x[key] for x in bal)
        print(f"worst rho_s after balancing from {label}: {worst:.4f} (target <= 1.05: {'met' if worst <= 1.05 else 'NOT met'})")

    tim = timing(geom, device, repeat)
    write_csv(tim, args.out / "plan_timing.csv")
    print(f"\n2. planning cost on {device} (median): full re-plan and reuse check (a hit), from the dense work / the summary")
    for x in tim:
        print(f"   U{x['ulysses']}R{x['ring']}: re-plan {x['replan_ms']:7.1f} / {x['summary_replan_ms']:5.2f} ms (target <= 10)   "
              f"check {x['check_ms']:6.1f} / {x['summary_check_ms']:5.2f} ms (target <= 1)   dense tile pass {x['tile_pass_ms']:6.1f} ms")
    print(f"   building the summary ({tim[0]['summary_mb']:.1f} MB) from the dense work on {device}: {tim[0]['summarize_ms']:.1f} ms "
          f"(done where the mask lives; on a GPU mask only the summary comes to the CPU)")

    layers = 2 if args.quick else 4
    pooled = summaries(geom, device, steps, layers)
    print(f"\n3. {steps}-step run of one layer on 8 GPUs: planning over the predicted attention time (target <= 1%), "
          f"wall / CPU of the calling thread")
    reu = []
    for path in ("dense", "summary", "summary, new", "summary, given"):
        rows = reuse(geom, device, steps, cost_model, head_dim=128, path=path, pooled=pooled)
        reu += rows
        attn_ms = sum(x["predicted_attention_ms"] for x in rows)
        wall, cpu = sum(x["planning_ms"] for x in rows), sum(x["planning_cpu_ms"] for x in rows)
        later = sum(x["planning_ms"] for x in rows[1:]), sum(x["planning_cpu_ms"] for x in rows[1:])
        summ_ms = sum(x["summarize_ms"] for x in rows)
        label = {"dense": "dense work, old", "summary": "summaries, old", "summary, new": "summaries, new",
                 "summary, given": "new, U, R given"}[path]
        print(f"   {label:>16}: U{rows[-1]['ulysses']}R{rows[-1]['ring']}, {sum(x['replanned'] for x in rows)} re-plans "
              f"({sum(x['repaired'] for x in rows)} repairs), max exact rho_s {max(x['rho'] for x in rows):.4f}; all planning "
              f"{wall:.1f} / {cpu:.1f} ms = {100 * wall / attn_ms:.2f}% / {100 * cpu / attn_ms:.2f}% of {attn_ms:.0f} ms; "
              f"steps 1-{steps - 1} only {100 * later[0] / attn_ms:.2f}% / {100 * later[1] / attn_ms:.2f}% "
              f"(step 0{'' if path == 'summary, given' else ', with the degree choice'}: {rows[0]['planning_ms']:.1f} / "
              f"{rows[0]['planning_cpu_ms']:.1f} ms)"
              + (f"; with the CPU summaries {100 * (wall + summ_ms) / attn_ms:.1f}%" if path != "dense" else ""))
    print("   the new way per threshold P_s: re-plans (repairs), rho_s max / mean, predicted attention, planning wall / CPU")
    for threshold in (1.02, 1.05, 1.10):
        rows = reuse(geom, device, steps, cost_model, head_dim=128, path="summary, new", pooled=pooled, threshold=threshold)
        reu += rows
        attn_ms = sum(x["predicted_attention_ms"] for x in rows)
        wall, cpu = sum(x["planning_ms"] for x in rows), sum(x["planning_cpu_ms"] for x in rows)
        later = sum(x["planning_ms"] for x in rows[1:]), sum(x["planning_cpu_ms"] for x in rows[1:])
        print(f"   P_s {threshold:.2f}: {sum(x['replanned'] for x in rows):2d} ({sum(x['repaired'] for x in rows):2d}), "
              f"{max(x['rho'] for x in rows):.4f} / {statistics.mean(x['rho'] for x in rows):.4f}, {attn_ms:.1f} ms, "
              f"{100 * wall / attn_ms:.2f}% / {100 * cpu / attn_ms:.2f}% (steps 1-{steps - 1}: {100 * later[0] / attn_ms:.2f}% / "
              f"{100 * later[1] / attn_ms:.2f}%)")
    deferred = []
    for new in (False, True):
        rows = reuse_deferred(geom, steps, cost_model, head_dim=128, layers=layers, pooled=pooled, new=new)
        deferred += rows
        attn_ms = sum(x["predicted_attention_ms"] for x in rows)
        wall, cpu = sum(x["planning_ms"] for x in rows), sum(x["planning_cpu_ms"] for x in rows)
        bg, bg_cpu = sum(x["decide_ms"] for x in rows), sum(x["decide_cpu_ms"] for x in rows)
        degrees = sorted({(x["ulysses"], x["ring"]) for x in rows if x["step"] > 0})
        print(f"   deferred ({'new' if new else 'old'}; PlanCache(defer=True), world=8, {layers} layers, degrees after step 0: "
              f"{', '.join(f'U{u}R{r}' for u, r in degrees)}; max rho_s {max(x['rho'] for x in rows if x['step'] > 0):.4f} "
              f"after step 0): step thread {wall:.1f} / {cpu:.1f} ms = {100 * wall / attn_ms:.2f}% / {100 * cpu / attn_ms:.2f}% "
              f"of {attn_ms:.0f} ms; background {bg:.1f} / {bg_cpu:.1f} ms = {100 * bg / attn_ms:.2f}% / {100 * bg_cpu / attn_ms:.2f}%; "
              f"all CPU {100 * (cpu + bg_cpu) / attn_ms:.2f}%")
    write_csv(reu, args.out / "plan_reuse.csv")
    write_csv(deferred, args.out / "plan_reuse_deferred.csv")

    deg = degree_choices(pooled, steps, cost_model, head_dim=128, repeat=repeat)
    write_csv(deg, args.out / "plan_degrees.csv")
    print(f"\n4. degree choice (choose_degrees, world 8) on each step's summary, CPU ms (median of {repeat}): what a re-plan "
          f"that re-picks the degrees costs")
    for label, sel in (("step 0", deg[:1]), ("without dense heads", [x for x in deg if not x["dense_heads"]]),
                       ("with dense heads", [x for x in deg if x["dense_heads"]])):
        if sel:
            ms = [x["choose_cpu_ms"] for x in sel]
            picks = sorted({(x["ulysses"], x["ring"]) for x in sel})
            print(f"   {label:>20}: {len(sel):2d} steps, median {statistics.median(ms):5.1f} ms, max {max(ms):5.1f} ms; picks "
                  f"{', '.join(f'U{u}R{r}' for u, r in picks)}")
    written = ("plan_balance.csv", "plan_balance.png", "plan_timing.csv", "plan_reuse.csv", "plan_reuse_deferred.csv", "plan_degrees.csv")
    print(f"\nwrote {', '.join(written)} to {args.out}")


if __name__ == "__main__":
    main()
