"""Sparse attention kernels side by side: cuDNN SDPA, flash SDPA, FlexAttention and dbsp, one run.

For each shape, mask kind (128x128, 64x64, 64x16, 64x1), pattern (random, structured) and density,
it times every method on the same inputs and mask (median of CUDA-event timings with L2 flushes,
``triton.testing.do_bench``), and reports effective TFLOPS = 4 * computed score entries * D / time.
Writes ``kernels.csv`` and ``kernels.png`` to ``--out`` and prints a table.

    python benchmarks/bench_kernels.py --out results/            # GPU, all shapes
    python benchmarks/bench_kernels.py --quick --out /tmp/kq     # CPU smoke run (tiny, interpreter)

``--sweep`` also times every kernel configuration (BLOCK_M, BLOCK_N, warps, stages) and launch
order for dbsp, to choose the autotuner's list (``kernels_sweep.csv``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

QUICK = "--quick" in sys.argv
if QUICK:  # the kernel runs in Triton's interpreter on CPU; set before dbsp.kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dbsp import SparseMask, sparse_attention  # noqa: E402

SHAPES = {  # name: (B, H, S, D)
    "wan1.3b-480p": (1, 12, 32760, 128),
    "wan14b-720p-1of8": (1, 5, 75600, 128),
    "hunyuan-720p": (1, 24, 118800, 128),
    "quick": (1, 2, 300, 32),
}
MASKS = {"128x128": (128, 128), "64x64": (64, 64), "64x16": (64, 16), "64x1": (64, 1), "128x16": (128, 16), "128x1": (128, 1)}
FRAME_TOKENS = {"wan1.3b-480p": 30 * 52, "wan14b-720p-1of8": 45 * 80, "hunyuan-720p": 45 * 80, "quick": 50}


def make_mask(shape: str, kind: str, pattern: str, density: float, device, seed: int = 0) -> SparseMask:
    """A random or structured mask with about ``density`` of the score entries kept.

    structured: each query block keeps key tiles near its own position in the same frame and at
    the same position in other frames (a spatio-temporal band, the band width solved for the
    density), plus the first tile of the sequence (a sink). Built on the tile grid on ``device``.
    """
    B, H, S, _ = SHAPES[shape]
    M, N = MASKS[kind] if shape != "quick" else {"128x128": (32, 32), "64x64": (16, 16), "64x16": (16, 4), "64x1": (16, 1), "128x16": (32, 4), "128x1": (32, 1)}[kind]
    mq, nt = -(-S // M), -(-S // N)
    if density >= 1.0:
        return SparseMask.full(B, H, S, S, q_block=M, kv_tile=N, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    if pattern == "random":
        tiles = torch.rand(B, H, mq, nt, generator=g, device=device) < density
    else:
        frame = FRAME_TOKENS[shape]
        qc = (torch.arange(mq, device=device) * M + M / 2).reshape(mq, 1)
        kc = (torch.arange(nt, device=device) * N + N / 2).reshape(1, nt)
        dist = torch.remainder(kc - qc, frame)
        dist = torch.minimum(dist, frame - dist)  # distance to the same spatial position in any frame
        width = torch.quantile(dist.flatten()[:: max(1, dist.numel() // 1_000_000)].float(), density).item()
        band = dist <= width
        band[:, 0] = True
        tiles = band.expand(B, H, mq, nt)
    return SparseMask.from_dense(tiles, q_block=M, kv_tile=N, seq_len_q=S, seq_len_kv=S)


def bench(fn, quick: bool) -> float:
    """Median milliseconds of ``fn()``."""
    if quick:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def sdpa_fn(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run():
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(qt, kt, vt)

    return run


_flex_compiled = None


def flex_fn(q, k, v, mask: SparseMask):
    """Compiled FlexAttention with the same mask (128-token Flex blocks for fine-grained masks)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block = mask.q_block if mask.is_block else max(128, mask.q_block)
    bm = mask.to_flex_block_mask(block_size=block)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    opts = {"BLOCK_M": 64, "BLOCK_N": 64} if block == 64 else None
    return lambda: _flex_compiled(qt, kt, vt, block_mask=bm, kernel_options=opts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="wan1.3b-480p,wan14b-720p-1of8,hunyuan-720p")
    p.add_argument("--masks", default="128x128,64x64,64x16,64x1")
    p.add_argument("--patterns", default="random,structured")
    p.add_argument("--densities", default="1.0,0.5,0.3,0.15,0.05")
    p.add_argument("--methods", default="cudnn,flash,flex,dbsp")
    p.add_argument("--sweep", action="store_true", help="also time every dbsp kernel configuration")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (interpreter)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    shapes = ["quick"] if args.quick else args.shapes.split(",")
    methods = ["dbsp"] if args.quick else args.methods.split(",")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; torch {torch.__version__}; dtype {dtype}", flush=True)

    rows, sweep_rows = [], []
    for shape in shapes:
        B, H, S, D = SHAPES[shape]
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype) for _ in range(3))
        dense_flops = 4.0 * B * H * S * S * D
        base = {}
        for method in ("cudnn", "flash"):
            if method in methods:
                ms = bench(sdpa_fn(q, k, v, method), args.quick)
                base[method] = ms
                rows.append(dict(shape=shape, mask="dense", pattern="-", density=1.0, method=method, ms=ms,
                                 tflops=dense_flops / ms / 1e9))
                print(f"{shape:18s} dense            {method:6s} {ms:9.3f} ms {dense_flops / ms / 1e9:7.1f} TF", flush=True)
        for kind in args.masks.split(","):
            for pattern in args.patterns.split(","):
                for density in (float(d) for d in args.densities.split(",")):
                    if density >= 1.0 and pattern != "random":
                        continue
                    mask = make_mask(shape, kind, pattern, density, device)
                    d_actual = mask.density()
                    flops = dense_flops * d_actual
                    for method in methods:
                        if method in ("cudnn", "flash"):
                            continue
                        try:
                            if method == "flex":
                                fn = flex_fn(q, k, v, mask)
                            else:
                                # Force the kernel even for full masks, so its own speed is measured;
                                # "auto" would send a full mask to cuDNN (the cudnn row of the same run).
                                fn = lambda m=mask: sparse_attention(q, k, v, m, backend="triton")  # noqa: E731
                            fn()
                            ms = bench(fn, args.quick)
                        except Exception as e:  # record and go on: one broken baseline must not end the run
                            print(f"  {method} failed on {kind} {pattern} {density}: {type(e).__name__}: {e}"[:300], flush=True)
                            ms = math.nan
                        row = dict(shape=shape, mask=kind, pattern=pattern, density=round(d_actual, 4), method=method,
                                   ms=ms, tflops=flops / ms / 1e9 if ms == ms else math.nan)
                        rows.append(row)
                        print(f"{shape:18s} {kind:7s} {pattern:10s} d={d_actual:5.3f} {method:6s} {ms:9.3f} ms "
                              f"{row['tflops']:7.1f} TF", flush=True)
                    if args.sweep and density in (1.0, 0.3) and pattern == "random":
                        sweep_rows += sweep(q, k, v, mask, shape, kind, flops, args.quick)
                    del mask
            write_csv(out_dir / "kernels.csv", rows, quiet=True)  # keep what is done if the run is cut short
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()

    write_csv(out_dir / "kernels.csv", rows)
    if sweep_rows:
        write_csv(out_dir / "kernels_sweep.csv", sweep_rows)
    summarize(rows)
    plot(rows, out_dir / "kernels.png")
    return 0


# (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, WARP_SPEC): the autotuner's list and neighbours.
SWEEP = [
    (128, 128, 8, 2, True, False), (128, 128, 8, 2, False, False), (128, 128, 8, 3, True, False),
    (128, 64, 8, 3, True, False), (128, 64, 8, 2, True, False), (128, 128, 8, 2, True, True),
    (64, 64, 4, 3, False, False), (64, 64, 4, 4, False, False), (64, 64, 4, 2, False, False),
    (64, 64, 8, 3, False, False), (64, 32, 4, 3, False, False), (64, 64, 4, 3, False, True),
    (64, 64, 4, 3, True, False),
]


def sweep(q, k, v, mask, shape, kind, flops, quick):
    """Time kernel configurations and three launch orders on one mask."""
    from dbsp.attention import _schedule
    from dbsp.kernels.sparse_fwd import sparse_fwd

    order_heavy = _schedule(mask).order
    order_natural = torch.arange(order_heavy.numel(), device=q.device, dtype=torch.int32)
    counts = mask.row_counts().reshape(-1)
    order_global = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    scale = q.shape[-1] ** -0.5
    # Every configuration must compute the same output: compare each to a pointer-path run.
    check = dict(BLOCK_M=min(mask.q_block, 64), BLOCK_N=32, num_warps=4, num_stages=2, USE_TMA=False, WARP_SPEC=False)
    expected = sparse_fwd(q, k, v, mask.offsets, mask.indices, order_heavy, q_block=mask.q_block,
                          kv_tile=mask.kv_tile, seq_len_kv=mask.seq_len_kv, scale=scale, config=check)[0].float()
    out = []
    for i, (bm, bn, w, st, tma, ws) in enumerate(SWEEP):
        c = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma, WARP_SPEC=ws)
        if bm != min(mask.q_block, 128) or (tma and mask.kv_tile < bn):
            continue
        orders = {"heavy-per-head": order_heavy}
        if i in (0, 6):
            orders.update(natural=order_natural, global_heavy=order_global)
        for oname, order in orders.items():
            def fn():
                return sparse_fwd(q, k, v, mask.offsets, mask.indices, order, q_block=mask.q_block,
                                  kv_tile=mask.kv_tile, seq_len_kv=mask.seq_len_kv, scale=scale, config=c)
            try:
                diff = (fn()[0].float() - expected).abs().max().item()
                ms = bench(fn, quick)
            except Exception as e:
                print(f"  config {c} failed: {type(e).__name__}: {e}"[:300], flush=True)
                ms = diff = math.nan
            out.append(dict(shape=shape, mask=kind, density=round(mask.density(), 4), order=oname, **c, ms=ms,
                            tflops=flops / ms / 1e9 if ms == ms else math.nan, max_diff=diff))
            print(f"  sweep {kind} d={mask.density():.3f} {c} {oname:15s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF"
                  f" diff {diff:.1e}", flush=True)
    return out


def write_csv(path: Path, rows: list[dict], quiet: bool = False) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    if not quiet:
        print(f"wrote {path}")


def summarize(rows: list[dict]) -> None:
    """Table: per (shape, mask, pattern, density) the ms of each method and dbsp's ratios."""
    cudnn = {r["shape"]: r["ms"] for r in rows if r["method"] == "cudnn"}
    cases: dict[tuple, dict] = {}
    for r in rows:
        if r["mask"] != "dense":
            cases.setdefault((r["shape"], r["mask"], r["pattern"], r["density"]), {})[r["method"]] = r["ms"]
    print("\nshape              mask    pattern    density   cudnn_ms   flex_ms   dbsp_ms  dbsp/flex  dbsp/cudnn  dbsp_TF")
    for (shape, kind, pattern, d), m in cases.items():
        c, fl, db = cudnn.get(shape, math.nan), m.get("flex", math.nan), m.get("dbsp", math.nan)
        B, H, S, D = SHAPES[shape]
        tf = 4.0 * B * H * S * S * D * d / db / 1e9 if db == db else math.nan
        print(f"{shape:18s} {kind:7s} {pattern:10s} {d:7.3f} {c:10.3f} {fl:9.3f} {db:9.3f} {db / fl:10.3f} {db / c:11.3f} {tf:8.1f}")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    panels = sorted({(r["shape"], r["mask"]) for r in rows if r["mask"] != "dense"})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (shape, kind) in zip(axes[0], panels):
        for method, style in (("flex", "s-"), ("dbsp", "o-")):
            for pattern, ls in (("random", "-"), ("structured", "--")):
                pts = sorted((r["density"], r["ms"]) for r in rows
                             if (r["shape"], r["mask"], r["method"], r["pattern"]) == (shape, kind, method, pattern))
                if pts:
                    ax.plot(*zip(*pts), style[0] + ls, label=f"{method} {pattern}")
        for method in ("cudnn", "flash"):
            ms = [r["ms"] for r in rows if r["shape"] == shape and r["method"] == method]
            if ms:
                ax.axhline(ms[0], color="gray" if method == "cudnn" else "silver", lw=1, label=f"{method} dense")
        ax.set_title(f"{shape} {kind}", fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
