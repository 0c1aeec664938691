"""Mask prediction on synthetic video-DiT workloads: quality vs density, cost vs dense, head spread.

Four studies, one run, all written to ``--out``:

* **quality** (``quality.csv``, ``quality.png``): output relative L2 error (and recall, cosine)
  against density for block 128x128 and 64x64 and fine 64x16 and 64x1 masks, predicted
  (``predict_mask``) and oracle (exact top-p on the true attention), over a sweep of top_p. The
  summary interpolates the density each needs at rel-L2 = 0.05 and the ratio 64x1 / 64x64
  (issue 5, target 2).
* **timing** (``timing.csv``, GPU): ``predict_mask`` against dense cuDNN SDPA on the same bf16
  inputs, side by side (target 1: <= 5% of dense at Wan2.1-1.3B 480p), plus a sweep of the
  Triton passes' program shape for the 64x1 predictor.
* **spread** (``spread.csv``, ``spread.png``): per-head oracle 64x64 density at top-p 0.9 of the
  generated workloads per preset, and the head-level imbalance of contiguous Ulysses groups
  (db-SP's ratio, max group / mean group) before any balancing (target 3).
* **reuse** (``reuse.csv``): across denoising steps, the relative change of the pooled q/k and
  the recall a reused mask keeps, for several reuse thresholds of ``MaskPredictor``.

    python benchmarks/bench_predict.py --out results/predict          # GPU, real shapes
    python benchmarks/bench_predict.py --quick --out /tmp/pq          # CPU smoke run (~1-2 min)
    python benchmarks/bench_predict.py --out /tmp/pcpu                # CPU study at 9x16x16 (~15 min)
    python benchmarks/bench_predict.py --studies quality --quality-shape wan1.3b-480p --layers 1 \
        --sample 16 --top-ps 0.5,0.7,0.8,0.85,0.9,0.95,0.97,0.99 --out /tmp/q480   # CPU, real shape (~30 min)

``--capture FILE`` runs the quality study on captured q/k/v (``dbsp.capture``) instead of the
generator. On GPU the quality and spread studies score a sample of query blocks (``--sample``)
against all keys; the estimate is unbiased over blocks and keeps the run to a few minutes. On
CPU every block is scored unless ``--sample`` is given. Each quality point prints a progress line.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if "--quick" in sys.argv:  # smoke-test the Triton passes in Triton's CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dbsp.mask import SparseMask  # noqa: E402
from dbsp.predict import MaskPredictor, oracle_mask, predict_mask  # noqa: E402
from dbsp.quality import attention_recall, dense_attention, evaluate_mask  # noqa: E402
from dbsp.video import PRESETS, make_workload  # noqa: E402

GRANULARITIES = {"128x128": (128, 128), "64x64": (64, 64), "64x16": (64, 16), "64x1": (64, 1)}
TOP_PS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
TARGET_ERR = 0.05


# ---------------------------------------------------------------------------------- helpers


def select_query_blocks(mask: SparseMask, blocks: torch.Tensor) -> SparseMask:
    """The rows of ``mask`` for the query blocks ``blocks`` (whole blocks), as a new mask whose
    queries are those blocks concatenated."""
    B, H = mask.batch, mask.heads
    blocks = blocks.to(mask.device)
    start = mask.offsets[:, :, blocks].reshape(-1)
    stop = mask.offsets[:, :, blocks + 1].reshape(-1)
    lengths = stop - start
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=mask.device), lengths)
    pos = torch.arange(int(lengths.sum()), device=mask.device) - (torch.cumsum(lengths, 0) - lengths)[seg] + start[seg]
    n = blocks.numel()
    flat = torch.zeros(B * H * n + 1, dtype=torch.int64, device=mask.device)
    flat[1:] = torch.cumsum(lengths, 0)
    idx = torch.arange(B * H, device=mask.device)[:, None] * n + torch.arange(n + 1, device=mask.device)
    return SparseMask(flat[idx].reshape(B, H, n + 1), mask.indices[pos], mask.q_block, mask.kv_tile, n * mask.q_block, mask.seq_len_kv)


def sample_blocks(seq_len: int, q_block: int, n: int | None, device) -> torch.Tensor:
    """``n`` whole query blocks spread evenly over the sequence (all whole blocks if None)."""
    whole = seq_len // q_block
    if n is None or n >= whole:
        return torch.arange(whole, device=device)
    return torch.linspace(0, whole - 1, n, device=device).round().long().unique()


def rows_of(blocks: torch.Tensor, q_block: int) -> torch.Tensor:
    return (blocks[:, None] * q_block + torch.arange(q_block, device=blocks.device)).reshape(-1)


def interp_density(points: list[tuple[float, float]], target: float) -> float:
    """Density at which rel-L2 falls to ``target``, by linear interpolation in log(error)
    between the two sweep points around it (nan if the sweep never reaches it)."""
    pts = sorted(points)  # by density
    for (d0, e0), (d1, e1) in zip(pts, pts[1:]):
        if e0 > target >= e1 and e0 > 0 and e1 > 0:
            t = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
            return d0 + t * (d1 - d0)
    if pts and pts[0][1] <= target:
        return pts[0][0]
    return float("nan")


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)


def timer(device: torch.device):
    if device.type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn):
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            t.append(1e3 * (time.perf_counter() - t0))
        return sorted(t)[1]

    return cpu


# ---------------------------------------------------------------------------------- studies


def quality_study(w, label: str, sample: int | None, top_ps, granularities=GRANULARITIES) -> tuple[list[dict], list[dict]]:
    """Error / recall / cosine vs density for every granularity and method on workload ``w``.

    Returns ``(rows, head_rows)``: one row per (granularity, method, top_p), and the same per head.
    """
    rows, head_rows = [], []
    q, k, v = w.q.float(), w.k.float(), w.v.float()
    for gran in granularities:
        M, N = GRANULARITIES[gran]
        blocks = sample_blocks(w.seq_len, M, sample, q.device)
        qs = q[:, rows_of(blocks, M)]
        dense = dense_attention(qs, k, v)
        methods = {"pred": {}, "oracle": None}
        if N == M:
            methods["pred-keys"] = {"pool_keys": False}
        for method, extra in methods.items():
            for tp in top_ps:
                t0 = time.perf_counter()
                if extra is None:
                    mask = oracle_mask(qs, k, q_block=M, kv_tile=N, top_p=tp)
                else:
                    full = predict_mask(w.q, w.k, q_block=M, kv_tile=N, top_p=tp, dense_above=None, **extra)
                    mask = select_query_blocks(full, blocks)
                mq = evaluate_mask(qs, k, v, mask, dense=dense)
                print(f"  quality {label} layer {w.layer} {gran} {method} top_p {tp}: density {mq.density:.4f}, "
                      f"rel-L2 {mq.rel_l2:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
                base = dict(workload=label, layer=w.layer, step=w.step, granularity=gran, method=method, top_p=tp)
                rows.append(dict(
                    base, density=round(mq.density, 6), recall=round(mq.recall, 6), rel_l2=round(mq.rel_l2, 6),
                    cosine=round(mq.cosine, 7), seconds=round(time.perf_counter() - t0, 3),
                ))
                for h in range(w.heads):
                    head_rows.append(dict(
                        base, head=h, kind=w.head_kinds[h], density=round(float(mq.per_head_density[0, h]), 6),
                        rel_l2=round(float(mq.per_head_rel_l2[0, h]), 6),
                    ))
    return rows, head_rows


def summarize_quality(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["workload"], r["layer"], r["granularity"], r["method"]) for r in rows})
    for wl, layer, gran, method in keys:
        pts = [(r["density"], r["rel_l2"]) for r in rows if (r["workload"], r["layer"], r["granularity"], r["method"]) == (wl, layer, gran, method)]
        out.append(dict(workload=wl, layer=layer, granularity=gran, method=method, density_at_target=interp_density(pts, TARGET_ERR)))
    return out


def head_ratios(head_rows: list[dict], method: str) -> list[tuple[str, float, float]]:
    """Per head ``(kind, d_64x64, d_64x1 / d_64x64)`` at the per-head rel-L2 target."""
    out = []
    for wl, layer, h in sorted({(r["workload"], r["layer"], r["head"]) for r in head_rows}):
        d = {}
        kind = ""
        for gran in ("64x64", "64x1"):
            pts = [(r["density"], r["rel_l2"]) for r in head_rows
                   if (r["workload"], r["layer"], r["head"], r["granularity"], r["method"]) == (wl, layer, h, gran, method)]
            kind = next((r["kind"] for r in head_rows if (r["workload"], r["layer"], r["head"]) == (wl, layer, h)), "")
            d[gran] = interp_density(pts, TARGET_ERR)
        if d["64x64"] > 0 and not math.isnan(d["64x64"]) and not math.isnan(d["64x1"]):
            out.append((kind, d["64x64"], d["64x1"] / d["64x64"]))
    return out


def timing_study(shape: str, device: torch.device, quick: bool) -> list[dict]:
    """Predictor time vs dense SDPA (cuDNN on GPU) on one layer of ``shape``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = make_workload(shape, device=device, dtype=dtype)
    q, k, v = w.q, w.k, w.v
    bench = timer(device)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)

    def dense():
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)
        return F.scaled_dot_product_attention(qt, kt, vt)

    t_dense = bench(dense)
    rows = [dict(shape=shape, variant="dense SDPA" + (" (cuDNN)" if device.type == "cuda" else " (CPU)"), ms=t_dense, pct_of_dense=100.0)]
    variants = {
        "128x128 pooled keys": dict(q_block=128, kv_tile=128),
        "128x128 pooled keys, torch": dict(q_block=128, kv_tile=128, backend="torch"),
        "64x64 pooled keys": dict(q_block=64, kv_tile=64),
        "64x64 pooled keys, torch": dict(q_block=64, kv_tile=64, backend="torch"),
        "64x16 pooled keys": dict(q_block=64, kv_tile=16, pool_keys=True),
        "64x64 per-key": dict(q_block=64, kv_tile=64, pool_keys=False),
        "64x16 per-key": dict(q_block=64, kv_tile=16),
        "64x1 per-key": dict(q_block=64, kv_tile=1),
        "64x1 per-key, 16 candidates, no refine": dict(q_block=64, kv_tile=1, candidates=16, refine=0),
        "64x1 per-key, 8 candidates, no refine": dict(q_block=64, kv_tile=1, candidates=8, refine=0),
        "64x1 per-key, torch passes": dict(q_block=64, kv_tile=1, backend="torch"),
    }
    if quick or device.type != "cuda":  # the torch rows are the GPU baselines of the fused kernels
        variants = {k_: v_ for k_, v_ in variants.items() if "torch" not in k_}
    for name, kw in variants.items():
        ms = bench(lambda: predict_mask(q, k, **kw))
        m = predict_mask(q, k, **kw)
        rows.append(dict(shape=shape, variant=name, ms=ms, pct_of_dense=100 * ms / t_dense, density=round(m.density(), 4)))
    backends = ("auto", "torch") if device.type == "cuda" else ("auto",)
    for backend in backends:
        pred = MaskPredictor(q_block=64, kv_tile=64, backend=backend)
        pred(q, k)
        ms = bench(lambda: pred(q, k))
        assert pred.stats.misses == 1, pred.stats  # every timed call was a hit
        name = "MaskPredictor reuse hit (pool + compare)" + (", torch" if backend == "torch" else "")
        rows.append(dict(shape=shape, variant=name, ms=ms, pct_of_dense=100 * ms / t_dense))
    if device.type == "cuda":
        rows += pass_breakdown(q, k, shape, t_dense, bench)
    return rows


def per_key_passes(q: torch.Tensor, k: torch.Tensor) -> SimpleNamespace:
    """The Triton passes of ``predict_mask(q, k, q_block=64, kv_tile=1)`` (one refinement-free
    threshold search, GPU) and every intermediate a pass needs, for timing the passes one by one:
    ``passes, cfg, gs, ng, n_g, gmax, gsum, lse, theta, mass, pick, theta_row, forced``."""
    from dbsp import predict as P
    from dbsp.kernels.predict_select import TritonPasses

    B, S, H, D = q.shape
    cfg = P.PredictConfig(q_block=64, kv_tile=1)
    qbar = P.block_pool(q, 64).permute(0, 2, 1, 3).reshape(B * H, -1, D)
    passes = TritonPasses(qbar, k, H, 1, 1.0 / math.sqrt(D), group_tiles=P.group_tiles(64, 1))
    gs, ng, n_g = P._group_layout(S, 64, 1, q.device)
    gmax, gsum = passes.stats(gs, ng)
    lse, theta = passes.thresholds(gmax, gsum, n_g, cfg.top_p, 8)
    mass, _ = passes.candidates(lse, theta, count=False)
    pick = P._select(mass, theta, cfg.top_p)
    return SimpleNamespace(passes=passes, cfg=cfg, gs=gs, ng=ng, n_g=n_g, gmax=gmax, gsum=gsum, lse=lse, theta=theta,
                           mass=mass, pick=pick, theta_row=theta.gather(1, pick[:, None]).squeeze(1),
                           forced=P._forced(cfg, S, S))


def per_key_on_gpu(script: str) -> tuple:
    """``(workload, per_key_passes(q, k))`` on Wan2.1-1.3B 480p in bf16 on the GPU, for the
    per-key scripts; exits with a message naming ``script`` where there is no GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a GPU")
    w = make_workload("wan1.3b-480p", device=torch.device("cuda"), dtype=torch.bfloat16)
    return w, per_key_passes(w.q, w.k)


def pass_breakdown(q, k, shape, t_dense, bench) -> list[dict]:
    """Time each Triton pass of the 64x1 predictor alone (GPU), to see where the time goes."""
    from dbsp import predict as P
    from dbsp.kernels import predict_pooled

    B, S, H, D = q.shape
    x = per_key_passes(q, k)
    passes, cfg, gs, ng, n_g, gmax, gsum, lse, theta, theta_row, forced = (
        x.passes, x.cfg, x.gs, x.ng, x.n_g, x.gmax, x.gsum, x.lse, x.theta, x.theta_row, x.forced)
    counts, indices, _, _ = passes.emit(theta_row, forced, dense_above=None)
    counts = counts.reshape(B, H, -1)
    parts = {
        "block_pool(q)": lambda: P.block_pool(q, 64),
        "fused pool(q) kernel": lambda: predict_pooled.pool(q, 64),
        "pass 1 stats kernel": lambda: passes.stats(gs, ng),
        "thresholds kernel (lse, bracket, 8 candidates)": lambda: passes.thresholds(gmax, gsum, n_g, cfg.top_p, 8),
        "pass 2 candidates kernel (8, no counts)": lambda: passes.candidates(lse, theta, count=False),
        "pass 3 emit + expand kernels": lambda: passes.emit(theta_row, forced),
        "round up dense heads + offsets (torch)": lambda: P._offsets(P._round_up_dense_heads(counts, indices, S, S, cfg)[0]),
    }
    rows = []
    for name, fn in parts.items():
        ms = bench(fn)
        rows.append(dict(shape=shape, variant=f"64x1 part: {name}", ms=ms, pct_of_dense=100 * ms / t_dense))
    return rows


def spread_study(shape: str, layers: int, device: torch.device, sample: int | None) -> list[dict]:
    """Per-head oracle 64x64 density at top-p 0.9, on sampled query blocks."""
    rows = []
    for layer in range(layers):
        w = make_workload(shape, layer=layer, device=device)
        blocks = sample_blocks(w.seq_len, 64, sample, device)
        qs = w.q[:, rows_of(blocks, 64)]
        m = oracle_mask(qs, w.k, q_block=64, kv_tile=64, top_p=0.9, min_keep=1)
        dens = m.density(per_head=True)[0].tolist()
        for h, d in enumerate(dens):
            rows.append(dict(shape=shape, layer=layer, head=h, kind=w.head_kinds[h], focus=round(w.head_focus[h], 3), density=round(d, 5)))
    return rows


def ulysses_imbalance(dens: list[float], groups: int) -> float:
    """db-SP's head-level ratio: max over contiguous head groups of the summed density / mean."""
    t = torch.tensor(dens).reshape(groups, -1).sum(dim=1)
    return float(t.max() / t.mean())


def summarize_spread(rows: list[dict]) -> list[dict]:
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        rs = [r for r in rows if r["shape"] == shape]
        d = torch.tensor([r["density"] for r in rs])
        H = PRESETS[shape].heads if shape in PRESETS else max(r["head"] for r in rs) + 1
        U = max(u for u in (1, 2, 4, 8) if H % u == 0)
        rhos = [ulysses_imbalance([r["density"] for r in rs if r["layer"] == layer], U) for layer in sorted({r["layer"] for r in rs})]
        out.append(dict(
            shape=shape, heads=len(rs), min=float(d.min()), p10=float(d.quantile(0.1)), median=float(d.median()),
            p90=float(d.quantile(0.9)), max=float(d.max()), mean=float(d.mean()),
            frac_below_0_1=float((d < 0.1).double().mean()), frac_above_0_6=float((d > 0.6).double().mean()),
            ulysses=U, rho_mean=sum(rhos) / len(rhos), rho_max=max(rhos),
        ))
    return out


def reuse_study(shape: str, steps: list[int], device: torch.device, sample: int | None, thresholds) -> list[dict]:
    """Relative change of pooled stats and recall kept by reused masks across steps (layer 0)."""
    ws = {s: make_workload(shape, step=s, device=device) for s in steps}
    w0 = ws[steps[0]]
    blocks = sample_blocks(w0.seq_len, 64, sample, device)
    r = rows_of(blocks, 64)
    kw = dict(q_block=64, kv_tile=1, dense_above=None)
    fresh = {s: predict_mask(w.q, w.k, **kw) for s, w in ws.items()}
    rec_fresh = {s: attention_recall(w.q[:, r], w.k, select_query_blocks(fresh[s], blocks)) for s, w in ws.items()}
    rows = []
    for thr in thresholds:
        pred = MaskPredictor(reuse_threshold=thr, **kw)
        for s in steps:
            w = ws[s]
            before = pred.stats
            m = pred(w.q, w.k, step=s)
            hit = pred.stats.hits > before.hits
            rec = attention_recall(w.q[:, r], w.k, select_query_blocks(m, blocks)) if hit else rec_fresh[s]
            rows.append(dict(shape=shape, threshold=thr, step=s, change=round(pred.last_change(), 5), hit=int(hit),
                             recall=round(rec, 5), recall_fresh=round(rec_fresh[s], 5)))
    return rows


# ---------------------------------------------------------------------------------- plots


def plot_quality(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no quality.png")
        return
    wls = sorted({(r["workload"], r["layer"]) for r in rows})
    fig, axes = plt.subplots(1, len(wls), figsize=(6 * len(wls), 4.5), squeeze=False)
    colors = {"128x128": "C0", "64x64": "C1", "64x16": "C2", "64x1": "C3"}
    styles = {"pred": "-", "pred-keys": "-.", "oracle": ":"}
    for ax, (wl, layer) in zip(axes[0], wls):
        for gran in GRANULARITIES:
            for method, ls in styles.items():
                pts = sorted((r["density"], r["rel_l2"]) for r in rows if (r["workload"], r["layer"], r["granularity"], r["method"]) == (wl, layer, gran, method))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker=".", color=colors[gran], label=f"{gran} {method}")
        ax.axhline(TARGET_ERR, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("density (fraction of score entries computed)")
        ax.set_ylabel("output relative L2 error vs dense")
        ax.set_title(f"{wl} layer {layer}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_spread(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no spread.png")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, shape in enumerate(shapes):
        d = sorted(r["density"] for r in rows if r["shape"] == shape)
        ax.plot([(j + 0.5) / len(d) for j in range(len(d))], d, marker=".", label=shape, color=f"C{i}")
    ax.set_xlabel("head quantile")
    ax.set_ylabel("oracle 64x64 density at top-p 0.9")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU smoke run (9x16x16 grid, few points, ~1-2 min)")
    p.add_argument("--out", default="bench_predict_out")
    p.add_argument("--studies", default="quality,timing,spread,reuse")
    p.add_argument("--quality-shape", default=None, help="Default: wan1.3b-480p (GPU), cpu-small (--quick)")
    p.add_argument("--layers", type=int, default=2, help="layers in the quality study. Default: 2")
    p.add_argument("--time-shapes", default="wan1.3b-480p")
    p.add_argument("--spread-shapes", default="wan1.3b-480p,wan14b-720p,hunyuan-720p")
    p.add_argument("--spread-layers", type=int, default=4)
    p.add_argument("--sample", type=int, default=None,
                   help="query blocks scored per layer. Default: 32 on GPU, every block on CPU (6 with --quick)")
    p.add_argument("--top-ps", default=None, help="comma-separated top_p sweep of the quality study. Default: 11 values, 0.5-0.999")
    p.add_argument("--capture", default=None, help="run the quality study on a dbsp capture file instead")
    p.add_argument("--token-noise", type=float, default=1.0, help="make_workload(token_noise=...) of the quality study")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    studies = set(args.studies.split(","))
    quick = args.quick
    torch.manual_seed(args.seed)
    # GPU: score a sample of query blocks; CPU study: all blocks; --quick smoke: 6 blocks.
    sample = args.sample if args.sample is not None else 6 if quick else None if device.type == "cpu" else 32
    t_start = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")

    if "quality" in studies:
        rows, head_rows = [], []
        top_ps = tuple(float(x) for x in args.top_ps.split(",")) if args.top_ps else (0.9, 0.99) if args.quick else TOP_PS
        if args.capture:
            from dbsp.capture import load_capture

            cap = load_capture(args.capture)
            for layer, step in cap.keys():
                entry = cap.get(layer, step)
                if entry.v is None:
                    print(f"capture layer {layer} step {step}: no q/k/v, skipped")
                    continue
                r, hr = quality_study(cap.workload(layer, step, device=device), f"capture:{Path(args.capture).name}", sample, top_ps)
                rows, head_rows = rows + r, head_rows + hr
        else:
            shape = args.quality_shape or ("cpu-small" if device.type == "cpu" else "wan1.3b-480p")
            for layer in range(1 if args.quick else args.layers):
                w = make_workload(shape, layer=layer, device=device, seed=args.seed, token_noise=args.token_noise)
                label = shape if args.token_noise == 1.0 else f"{shape}:noise{args.token_noise:g}"
                r, hr = quality_study(w, label, sample, top_ps)
                rows, head_rows = rows + r, head_rows + hr
        write_csv(out / "quality.csv", rows)
        write_csv(out / "quality_heads.csv", head_rows)
        plot_quality(rows, out / "quality.png")
        summary = summarize_quality(rows)
        write_csv(out / "quality_summary.csv", summary)
        print(f"\nquality: density needed for output rel-L2 <= {TARGET_ERR} (interpolated over top_p)")
        print(f"{'workload':<16} {'layer':>5} {'granularity':>11} {'method':>9} {'density':>8}")
        for s_ in summary:
            print(f"{s_['workload']:<16} {s_['layer']:>5} {s_['granularity']:>11} {s_['method']:>9} {s_['density_at_target']:>8.4f}")
        for wl, layer in sorted({(s_["workload"], s_["layer"]) for s_ in summary}):
            get = {(s_["granularity"], s_["method"]): s_["density_at_target"] for s_ in summary if (s_["workload"], s_["layer"]) == (wl, layer)}
            for method in ("pred", "oracle"):
                fine, block = get.get(("64x1", method), math.nan), get.get(("64x64", method), math.nan)
                print(f"target 2 [{wl} layer {layer} {method}]: 64x1 / 64x64 density at rel-L2 {TARGET_ERR} = {fine / block:.3f} (target <= 0.7)")
        for method in ("pred", "oracle"):
            hr = head_ratios(head_rows, method)
            if hr:
                ratios = torch.tensor([r for _, _, r in hr])
                sparse = torch.tensor([r for _, d, r in hr if d < 0.6])
                print(f"per head [{method}]: 64x1 / 64x64 at each head's rel-L2 {TARGET_ERR}: median {ratios.median():.3f}, "
                      f"p10 {ratios.quantile(0.1):.3f}, p90 {ratios.quantile(0.9):.3f} over {len(hr)} heads"
                      + (f"; heads with 64x64 density < 0.6: median {sparse.median():.3f} ({len(sparse)} heads)" if len(sparse) else ""))

    if "timing" in studies:
        rows = []
        for shape in (["cpu-small"] if device.type == "cpu" else args.time_shapes.split(",")):
            rows += timing_study(shape, device, quick)
        if quick:  # the GPU-only pass breakdown, smoke-tested on a tiny workload in the interpreter
            w = make_workload("cpu-tiny")
            rows += pass_breakdown(w.q, w.k, "cpu-tiny", rows[0]["ms"], timer(device))
        write_csv(out / "timing.csv", rows)
        print("\ntiming: predictor vs dense attention (median ms)")
        for r in rows:
            print(f"{r['shape']:<14} {r['variant']:<48} {r['ms']:>9.3f} ms {r['pct_of_dense']:>7.2f}% of dense")

    if "spread" in studies:
        rows = []
        for shape in (["cpu-small"] if device.type == "cpu" else args.spread_shapes.split(",")):
            rows += spread_study(shape, 1 if quick else args.spread_layers, device, sample)
        write_csv(out / "spread.csv", rows)
        plot_spread(rows, out / "spread.png")
        summary = summarize_spread(rows)
        write_csv(out / "spread_summary.csv", summary)
        print("\nspread: per-head oracle 64x64 density at top-p 0.9; rho = db-SP head imbalance of U contiguous groups")
        for s in summary:
            print(f"{s['shape']:<14} heads {s['heads']:>4}  min {s['min']:.3f} p10 {s['p10']:.3f} median {s['median']:.3f} "
                  f"p90 {s['p90']:.3f} max {s['max']:.3f} mean {s['mean']:.3f}  <0.1: {s['frac_below_0_1']:.2f} "
                  f">0.6: {s['frac_above_0_6']:.2f}  rho(U={s['ulysses']}) mean {s['rho_mean']:.2f} max {s['rho_max']:.2f}")

    if "reuse" in studies:
        steps = [0, 1, 5] if quick else (list(range(0, 50, 3)) if device.type == "cpu" else list(range(50)))
        shape = "cpu-small" if device.type == "cpu" else "wan1.3b-480p"
        rows = reuse_study(shape, steps, device, sample, (0.02, 0.05, 0.1, 0.2))
        write_csv(out / "reuse.csv", rows)
        print("\nreuse: MaskPredictor over steps (layer 0, 64x1): hit rate and recall lost by reusing")
        for thr in sorted({r["threshold"] for r in rows}):
            rs = [r for r in rows if r["threshold"] == thr]
            hits = sum(r["hit"] for r in rs)
            loss = max(r["recall_fresh"] - r["recall"] for r in rs)
            ratio = min(r["recall"] / r["recall_fresh"] for r in rs)
            print(f"threshold {thr:<5} hits {hits:>3}/{len(rs)}  worst recall drop {loss:.4f}  worst reused/fresh recall {ratio:.4f}")

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
