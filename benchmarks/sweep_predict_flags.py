"""Per-key predictor passes under the settings of ``dbsp.kernels.predict_select`` (GPU,
Wan2.1-1.3B 480p).

    python benchmarks/sweep_predict_flags.py

Times the candidates pass, the last pass (the candidates pass, the pick and the emit + expand
kernels: fused with ``FUSED_EMIT``, three steps without) and whole ``predict_mask`` calls (64x1 and
64x16 per key at top_p 0.9, 64x1 at top_p 0.5; ``triton.testing.do_bench``, median, L2 flushed)
for settings of ``FUSED_EMIT``, ``SKIP_CHUNKS``, ``PASS_STAGES`` and ``WORDS_GROUPS``, two rounds. The first
variant is the shipped one. Every variant's output is checked against the first one's: the
settings change speed only. Changes nothing. (``results/h100/sweep_predict_flags.log`` also timed
the per-group skip that the chunk test replaced, as ``skip_mode=1``, and 64-bit word packing, as
``words32=False``; ``skip_mode`` 0 and 2 there are SKIP_CHUNKS off and on.)
"""
import torch
import triton

from bench_predict import per_key_on_gpu
from dbsp import predict as P
from dbsp.kernels import predict_select as S
from dbsp.predict import predict_mask

w, x = per_key_on_gpu("sweep_predict_flags.py")
passes, lse, theta, forced, top_p = x.passes, x.lse, x.theta, x.forced, x.cfg.top_p
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")


def bench(f):
    return triton.testing.do_bench(f, warmup=10, rep=80)


def run(fused, skip, stages, gw):
    saved = S.FUSED_EMIT, S.SKIP_CHUNKS, S.PASS_STAGES, S.WORDS_GROUPS
    S.FUSED_EMIT, S.SKIP_CHUNKS, S.PASS_STAGES, S.WORDS_GROUPS = fused, skip, stages, gw
    try:
        cand = lambda: passes.candidates(lse, theta, count=False)  # noqa: E731
        if fused:
            last = lambda: passes.select_emit(lse, theta, top_p, forced, dense_above=0.6)  # noqa: E731
        else:
            def last():
                pick = P._select(passes.candidates(lse, theta, count=False)[0], theta, top_p)
                return passes.emit(theta.gather(1, pick[:, None]).squeeze(1), forced, dense_above=0.6)
        outs = [cand()[0], last()[1]]
        times = [bench(cand), bench(last)]
        for N, p in ((1, 0.9), (16, 0.9), (1, 0.5)):
            call = lambda: predict_mask(w.q, w.k, q_block=64, kv_tile=N, top_p=p)  # noqa: E731
            outs.append(call().indices)
            times.append(bench(call))
        return times, outs
    finally:
        S.FUSED_EMIT, S.SKIP_CHUNKS, S.PASS_STAGES, S.WORDS_GROUPS = saved


ref = None
variants = [(True, True, 2, S.WORDS_GROUPS), (False, True, 2, S.WORDS_GROUPS), (True, True, 2, 16)]
for rnd in range(2):
    for fused, skip, stages, gw in variants:
        times, outs = run(fused, skip, stages, gw)
        if ref is None:
            ref = outs
        same = all(torch.equal(a, b) for a, b in zip(outs, ref))
        print(f"round {rnd} fused_emit={fused!s:5} skip_chunks={skip!s:5} stages={stages} words_groups={gw}: candidates {times[0]:.3f} ms, "
              f"last pass (candidates, pick, emit+expand) {times[1]:.3f} ms, 64x1 call {times[2]:.3f} ms, "
              f"64x16 per-key call {times[3]:.3f} ms, 64x1 top_p 0.5 call {times[4]:.3f} ms, same={same}", flush=True)
