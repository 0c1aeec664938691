"""What one sequence-parallel call spends cutting a new mask into its ranks' local masks.

    python benchmarks/profile_slicing.py [--shape wan14b-720p] [--density 0.5] [--repeats 5]

``sp_attention`` slices the global mask into each rank's ring-step masks
(``RankLayout.local_masks``: its heads, its query blocks, each step's key blocks). The result is
cached per mask, so a fixed or reused mask is sliced once; a mask predicted anew at every step is
sliced at every call. ``bench_sp.py --emulate`` reports this as ``slice_ms`` (5-12 ms a call on an
H100 for ring layouts at Wan2.1-14B 720p, against 15-26 ms of attention) but does not add it to
the emulated time. This script times the slicing of every rank under every U x R of 8 ranks
(unplanned layouts) on a random block mask of the given density (the work depends on the number
of selected tiles, not on where they are), synchronising the device after each call, and prints
a ``torch.profiler`` table of one U1R8 rank's slicing. CPU or GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from dbsp import SparseMask
from dbsp.dist.layout import _local_cache, rank_layout
from dbsp.video import get_shape


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()  # timing only


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="wan14b-720p")
    parser.add_argument("--heads", type=int, default=None, help="override the shape's heads (e.g. 40 for all of 14B)")
    parser.add_argument("--q-block", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    shape, dev = get_shape(args.shape), torch.device(args.device)
    S, H, M = shape.geometry.num_tokens, args.heads or shape.heads, args.q_block
    nb = -(-S // M)
    gen = torch.Generator(device=dev).manual_seed(0)
    tiles = torch.rand(1, H, nb, nb, device=dev, generator=gen) < args.density
    mask = SparseMask.from_dense(tiles, q_block=M, kv_tile=M, seq_len_q=S, seq_len_kv=S)
    del tiles
    print(f"{args.shape}: S {S}, H {H}, {nb} blocks of {M}, {mask.nnz} tiles (density {mask.density():.3f}) on {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else ""), flush=True)
    for u, r in ((1, 8), (2, 4), (4, 2), (8, 1)):
        if H % u:
            continue
        per_rank = []
        for rank in range(u * r):
            lay = rank_layout(seq_len=S, q_block=M, heads=H, ulysses=u, ring=r, rank=rank, device=dev)
            times = []
            for _ in range(args.repeats + 1):  # the first call warms up
                _local_cache.clear()
                sync(dev)
                t0 = time.perf_counter()
                lay.local_masks(mask)
                sync(dev)
                times.append(1e3 * (time.perf_counter() - t0))
            per_rank.append(statistics.median(times[1:]))
        print(f"  U{u}R{r}: slicing one call's local masks, per rank {min(per_rank):.2f}-{max(per_rank):.2f} ms "
              f"(median over {args.repeats} calls each)", flush=True)
    lay = rank_layout(seq_len=S, q_block=M, heads=H, ulysses=1, ring=8, rank=1, device=dev)
    _local_cache.clear()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        lay.local_masks(mask)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=12), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
