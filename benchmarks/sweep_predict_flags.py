"""Per-key predictor passes with and without the chunk-level group skip, at each pipeline depth
(GPU, Wan2.1-1.3B 480p).

    python benchmarks/sweep_predict_flags.py

Times the candidates pass, the emit + expand pass and whole ``predict_mask`` calls (64x1 and 64x16
per key at top_p 0.9, 64x1 at top_p 0.5; ``triton.testing.do_bench``, median, L2 flushed) for
settings of ``predict_select.SKIP_CHUNKS`` and ``PASS_STAGES`` (Triton pipelines the key loads
only of a loop without a branch around them). The first variant is the shipped one.
Every variant's output is checked against the first one's: the settings change speed only.
Changes nothing. (``results/h100/sweep_predict_flags.log`` also timed the per-group skip that the
chunk test replaced, as ``skip_mode=1``, and 64-bit word packing, as ``words32=False``; ``skip_mode``
0 and 2 there are SKIP_CHUNKS off and on.)
"""
import torch
import triton

from bench_predict import per_key_on_gpu
from dbsp.kernels import predict_select as S
from dbsp.predict import predict_mask

w, x = per_key_on_gpu("sweep_predict_flags.py")
passes, lse, theta, theta_row, forced = x.passes, x.lse, x.theta, x.theta_row, x.forced
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


def bench(f):
    return triton.testing.do_bench(f, warmup=10, rep=80)


def run(skip, stages):
    saved = S.SKIP_CHUNKS, S.PASS_STAGES
    S.SKIP_CHUNKS, S.PASS_STAGES = skip, stages
    try:
        cand = lambda: passes.candidates(lse, theta, count=False)  # noqa: E731
        emit = lambda: passes.emit(theta_row, forced, dense_above=0.6)  # noqa: E731
        outs = [cand()[0], emit()[1]]
        times = [bench(cand), bench(emit)]
        for N, top_p in ((1, 0.9), (16, 0.9), (1, 0.5)):
            call = lambda: predict_mask(w.q, w.k, q_block=64, kv_tile=N, top_p=top_p)  # noqa: E731
            outs.append(call().indices)
            times.append(bench(call))
        return times, outs
    finally:
        S.SKIP_CHUNKS, S.PASS_STAGES = saved


ref = None
variants = [(True, 2), (False, 2), (True, 3), (False, 3), (True, 1)]
for rnd in range(2):
    for skip, stages in variants:
        times, outs = run(skip, stages)
        if ref is None:
            ref = outs
        same = all(torch.equal(a, b) for a, b in zip(outs, ref))
        print(f"round {rnd} skip_chunks={skip!s:5} stages={stages}: candidates {times[0]:.3f} ms, "
              f"emit+expand {times[1]:.3f} ms, 64x1 call {times[2]:.3f} ms, 64x16 per-key call {times[3]:.3f} ms, "
              f"64x1 top_p 0.5 call {times[4]:.3f} ms, same={same}", flush=True)
