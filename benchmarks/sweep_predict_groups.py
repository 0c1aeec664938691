"""Per-key predictor against its program shape: pooled query rows and key groups per program
(GPU, Wan2.1-1.3B 480p).

    python benchmarks/sweep_predict_groups.py [--rounds 2]

Times the stats pass (pass 1) and whole ``predict_mask`` calls (64x1 and 64x16 per key, top_p
0.9; ``triton.testing.do_bench``, median, L2 flushed) for settings of ``predict_select.BLOCK_M``
(pooled query rows per program) and ``GROUPS_PER_PROG`` (key groups per program, also the chunk
that ``SKIP_CHUNKS`` skips whole), in rounds. The first variant is the shipped one; every
variant's masks are checked against it (a setting changes which programs sum which chunk masses,
so a row whose mass crosses top_p within float rounding could keep one tile more or less; the
line says ``same=False`` then). Changes nothing.
"""
import argparse

import torch
import triton

from bench_predict import per_key_on_gpu
from dbsp.kernels import predict_select as S
from dbsp.predict import predict_mask

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=2)
args = parser.parse_args()

w, x = per_key_on_gpu("sweep_predict_groups.py")
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)


def bench(f):
    return triton.testing.do_bench(f, warmup=10, rep=80)


def run(bm: int, gpp: int):
    saved = S.BLOCK_M, S.GROUPS_PER_PROG
    S.BLOCK_M, S.GROUPS_PER_PROG = bm, gpp
    try:
        passes = S.TritonPasses(x.passes.qbar, x.passes.k, x.passes.H, x.passes.N, x.passes.scale, group_tiles=x.gs)
        times = [bench(lambda: passes.stats(x.gs, x.ng))]
        outs = []
        for N in (1, 16):
            call = lambda: predict_mask(w.q, w.k, q_block=64, kv_tile=N, top_p=0.9)  # noqa: E731
            m = call()
            outs += [m.offsets, m.indices]
            times.append(bench(call))
        return times, outs
    finally:
        S.BLOCK_M, S.GROUPS_PER_PROG = saved


variants = [(S.BLOCK_M, S.GROUPS_PER_PROG)] + [v for v in [(64, 16), (64, 32), (64, 4), (128, 8), (128, 16), (128, 32),
                                                             (32, 8), (32, 16), (32, 32)] if v != (S.BLOCK_M, S.GROUPS_PER_PROG)]
ref = None
for rnd in range(args.rounds):
    for bm, gpp in (variants if rnd % 2 == 0 else variants[::-1]):
        times, outs = run(bm, gpp)
        if ref is None:
            ref = outs
        same = all(torch.equal(a, b) for a, b in zip(outs, ref))
        print(f"round {rnd} block_m={bm:3d} groups_per_prog={gpp:2d}: stats (64x1 groups) {times[0]:.3f} ms, "
              f"64x1 per-key call {times[1]:.3f} ms, 64x16 per-key call {times[2]:.3f} ms, same={same}", flush=True)
