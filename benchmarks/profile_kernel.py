"""One launch of the sparse kernel for a profiler (Nsight Compute) to read.

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        -k regex:_sparse_fwd_kernel --launch-skip 1 -c 1 python benchmarks/profile_kernel.py --mask 64x1

Launches the kernel twice with a fixed configuration (the first launch compiles and warms up) on
Wan2.1-1.3B 480p shapes (B1 H12 S32760 D128, bf16) and a random mask at ``--density``, and prints
the effective TFLOPS and the bytes the K/V gather reads from L2 per second, so the counters can be
compared with the arithmetic.
"""

from __future__ import annotations

import argparse

import torch

from dbsp.attention import _schedule
from dbsp.kernels.sparse_fwd import sparse_fwd
from dbsp.mask import SparseMask

CONFIG = {
    128: dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2, USE_TMA=True, WARP_SPEC=False),
    64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, USE_TMA=True, WARP_SPEC=False),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mask", default="64x1", help="MxN. Default: 64x1")
    p.add_argument("--density", type=float, default=0.3)
    args = p.parse_args()
    M, N = (int(x) for x in args.mask.split("x"))
    B, H, S, D = 1, 12, 32760, 128
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tiles = torch.rand(B, H, -(-S // M), -(-S // N), device="cuda") < args.density
    mask = SparseMask.from_dense(tiles, q_block=M, kv_tile=N, seq_len_q=S, seq_len_kv=S)
    cfg = dict(CONFIG[M], USE_TMA=CONFIG[M]["USE_TMA"] and N >= CONFIG[M]["BLOCK_N"])
    order = _schedule(mask).order

    def run():
        return sparse_fwd(q, k, v, mask.offsets, mask.indices, order, q_block=M, kv_tile=N,
                          seq_len_kv=S, scale=D**-0.5, config=cfg)

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    entries = mask.density() * B * H * S * S
    kv_bytes = entries / M * D * 2 * 2  # every (query block, key) pair reads one K and one V row
    print(f"{args.mask} d={mask.density():.3f} config {cfg}: {ms:.3f} ms, "
          f"{4 * entries * D / ms / 1e9:.1f} TFLOPS, K/V rows read {kv_bytes / ms / 1e9:.2f} TB/s")


if __name__ == "__main__":
    main()
