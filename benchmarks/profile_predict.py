"""Kernel-level profile of the fine predictors (64x1, 64x16) at Wan2.1-1.3B 480p (GPU).

    python benchmarks/profile_predict.py [--shape wan1.3b-480p] [--masks 64x1,64x16,64x16p]

A mask ``MxN`` scores every key (per-key passes); ``MxNp`` scores pooled key tiles (``pool_keys=True``).

Prints, per mask, the wall time of one ``predict_mask`` call and torch.profiler's table of the
GPU kernels and host ops of one call (after warm-up), to see where the time goes. With ``--host``,
instead: the wall time of one call on an otherwise idle GPU and cProfile's table of the host
functions over 50 calls (the device read that sizes the indices waits for the GPU; the rest is
host time).
"""

from __future__ import annotations

import argparse
import time

import torch

from dbsp.predict import predict_mask
from dbsp.video import make_workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="wan1.3b-480p")
    p.add_argument("--masks", default="64x1,64x16")
    p.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    p.add_argument("--host", action="store_true", help="host-side timing and a cProfile table instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_predict.py needs a GPU")
    w = make_workload(args.shape, device=torch.device("cuda"), dtype=torch.bfloat16)
    for spec in args.masks.split(","):
        pooled = spec.endswith("p")
        M, N = (int(x) for x in spec.rstrip("p").split("x"))
        call = lambda: predict_mask(w.q, w.k, q_block=M, kv_tile=N, top_p=0.9, pool_keys=True if pooled else None)  # noqa: E731
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        if args.host:
            host_profile(spec, call, args.rows)
            continue
        t0 = time.perf_counter()
        for _ in range(10):
            call()
        torch.cuda.synchronize()
        print(f"\n=== {spec}: {1e3 * (time.perf_counter() - t0) / 10:.3f} ms per call (wall, 10 calls)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


def host_profile(spec: str, call, rows: int) -> None:
    import cProfile
    import pstats

    wall = []
    for _ in range(20):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        wall.append(time.perf_counter() - t0)
    med = lambda xs: 1e3 * sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"\n=== {spec}: one call on an idle GPU {med(wall):.3f} ms wall (median of 20)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(rows)


if __name__ == "__main__":
    main()
