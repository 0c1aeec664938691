"""Per-key 64x1 predictor passes against their launch settings (GPU, Wan2.1-1.3B 480p).

    python benchmarks/sweep_predict_warps.py

Times each Triton pass of ``predict_mask(q_block=64, kv_tile=1)`` (``triton.testing.do_bench``,
median) as shipped and with other ``num_warps`` (and, for the expand kernel, other
``EXPAND_BITS``), and says whether each variant's output equals the shipped one (float sums in
another order may differ in the last bits). Prints one line per variant; changes nothing.
"""
import torch
import triton

from bench_predict import per_key_on_gpu
from dbsp.kernels import predict_select as S

w, x = per_key_on_gpu("sweep_predict_warps.py")
q, k = w.q, w.k
passes, cfg, gs, ng, n_g, gmax, gsum, lse, theta, mass, pick, theta_row, forced = (
    x.passes, x.cfg, x.gs, x.ng, x.n_g, x.gmax, x.gsum, x.lse, x.theta, x.mass, x.pick, x.theta_row, x.forced)
ref = passes.emit(theta_row, forced, dense_above=0.6)


def bench(f):
    return triton.testing.do_bench(f, warmup=10, rep=60)


class Wrap:
    """A kernel whose launches get extra launch options (``num_warps=...``)."""

    def __init__(self, kern, **extra):
        self.kern, self.extra = kern, extra

    def __getitem__(self, grid):
        launch = self.kern[grid]
        return lambda *a, **kw: launch(*a, **{**kw, **self.extra})


def variant(attr, fn, **extra):
    """Time ``fn`` with module kernel ``attr`` launched with ``extra``; returns (ms, output)."""
    orig = getattr(S, attr)
    setattr(S, attr, Wrap(orig, **extra))
    try:
        out = fn()
        t = bench(fn)
    finally:
        setattr(S, attr, orig)
    return t, out


base_emit = bench(lambda: passes.emit(theta_row, forced, dense_above=0.6))
print(f"emit+expand shipped: {base_emit:.3f} ms")
for wn in (1, 2, 4, 8):
    t, out = variant("_expand_kernel", lambda: passes.emit(theta_row, forced, dense_above=0.6), num_warps=wn)
    same = torch.equal(out[1], ref[1]) and torch.equal(out[0], ref[0])
    print(f"emit+expand, expand num_warps={wn}: {t:.3f} ms same={same}")
for bits in (256, 1024, 2048):
    shipped, S.EXPAND_BITS = S.EXPAND_BITS, bits
    t = bench(lambda: passes.emit(theta_row, forced, dense_above=0.6))
    out = passes.emit(theta_row, forced, dense_above=0.6)
    S.EXPAND_BITS = shipped
    print(f"emit+expand, EXPAND_BITS={bits}: {t:.3f} ms same={torch.equal(out[1], ref[1])}")
for wn in (2, 8):
    t, out = variant("_emit_kernel", lambda: passes.emit(theta_row, forced, dense_above=0.6), num_warps=wn)
    print(f"emit+expand, emit num_warps={wn}: {t:.3f} ms same={torch.equal(out[1], ref[1])}")
t0 = bench(lambda: passes.candidates(lse, theta, count=False))
print(f"candidates shipped: {t0:.3f} ms")
for wn in (2, 8):
    t, out = variant("_candidates_kernel", lambda: passes.candidates(lse, theta, count=False), num_warps=wn)
    print(f"candidates num_warps={wn}: {t:.3f} ms same={torch.equal(out[0], mass)}")
t0 = bench(lambda: passes.thresholds(gmax, gsum, n_g, cfg.top_p, 8))
print(f"thresholds shipped: {t0:.3f} ms")
for wn in (1, 2, 8):
    t, out = variant("_thresholds_kernel", lambda: passes.thresholds(gmax, gsum, n_g, cfg.top_p, 8), num_warps=wn)
    print(f"thresholds num_warps={wn}: {t:.3f} ms same={torch.equal(out[1], theta)}")
t0 = bench(lambda: passes.stats(gs, ng))
print(f"stats shipped: {t0:.3f} ms")
for wn in (2, 8):
    t, out = variant("_stats_kernel", lambda: passes.stats(gs, ng), num_warps=wn)
    print(f"stats num_warps={wn}: {t:.3f} ms same={torch.equal(out[0], gmax)}")
