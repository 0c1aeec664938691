"""The fine-grained (gather) path of the kernel: its two load options against the default, one run.

For M x 1 and M x 16 random masks at the Wan2.1-1.3B 480p shape (B 1, H 12, S 32760, D 128, bf16),
times every gather configuration of the autotuner's list with ``PREFETCH`` (the next chunk's key
ids loaded one iteration ahead) and ``OFF32`` (int32 row offsets) off and on, checks each output
against the default configuration, and prints TFLOPS and the speedup over the default. Dense cuDNN
SDPA is timed in the same run for scale.

    python benchmarks/sweep_gather.py --out results/gather            # GPU, ~1 min
    python benchmarks/sweep_gather.py --quick --out /tmp/gather       # CPU interpreter smoke run

Writes ``gather_sweep.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import SHAPES, bench, make_mask, sdpa_fn, write_csv  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages): the gather configurations of dbsp.kernels.sparse_fwd.CONFIGS
BASE = {64: [(64, 64, 4, 3), (64, 64, 4, 4)], 128: [(128, 64, 8, 3), (128, 128, 8, 2)]}
FLAGS = [dict(PREFETCH=False, OFF32=False), dict(PREFETCH=True, OFF32=False), dict(PREFETCH=False, OFF32=True),
         dict(PREFETCH=True, OFF32=True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny shape under the Triton interpreter")
    p.add_argument("--masks", default="64x1@0.2,128x1@0.2,64x1@0.1,64x16@0.2")
    args = p.parse_args(argv)
    from dbsp.attention import _schedule
    from dbsp.kernels.sparse_fwd import sparse_fwd

    device = "cpu" if args.quick else "cuda"
    dtype = torch.float16 if args.quick else torch.bfloat16  # the interpreter's bf16 dot is wrong
    shape = "quick" if args.quick else "wan1.3b-480p"
    B, H, S, D = SHAPES[shape]
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(device, dtype) for _ in range(3))
    rows = []
    dense_ms = None if args.quick else bench(sdpa_fn(q, k, v, "cudnn"), False)
    if dense_ms:
        print(f"dense cuDNN SDPA: {dense_ms:.3f} ms ({torch.cuda.get_device_name()})")
    for spec in args.masks.split(","):
        kind, density = spec.split("@")
        mask = make_mask(shape, kind, "random", float(density), device)
        M = mask.q_block
        flops = 4 * D * float(mask.work().sum())
        order = _schedule(mask).order
        base_out, base_ms = None, None
        for bm, bn, w, st in BASE[64 if M <= 64 else 128]:
            for flags in FLAGS:
                cfg = dict(BLOCK_M=min(bm, M), BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=False, WARP_SPEC=False, **flags)

                def fn():
                    return sparse_fwd(q, k, v, mask.offsets, mask.indices, order, q_block=M, kv_tile=mask.kv_tile,
                                      seq_len_kv=S, scale=D**-0.5, config=cfg)

                out = fn()[0].float()
                if base_out is None:
                    base_out = out
                ms = bench(fn, args.quick)
                base_ms = base_ms or ms
                diff = float((out - base_out).abs().max())
                rows.append(dict(shape=shape, mask=kind, density=round(mask.density(), 4), **cfg, ms=round(ms, 4),
                                 tflops=round(flops / ms / 1e9, 1), vs_first=round(base_ms / ms, 3), max_diff=diff,
                                 dense_ms=dense_ms))
                print(f"{kind}@{density} {bm}x{bn} w{w} s{st} prefetch={flags['PREFETCH']!s:5} off32={flags['OFF32']!s:5} "
                      f"{ms:8.3f} ms {flops / ms / 1e9:7.1f} TF x{base_ms / ms:.3f} diff {diff:.1e}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "gather_sweep.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
