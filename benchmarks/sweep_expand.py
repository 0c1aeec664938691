"""The per-key 64x1 predictor's last kernel, bit words -> sorted tile ids, in variants (GPU,
Wan2.1-1.3B 480p): the library's kernel at several block sizes and warp counts, and the same
expansion with each set bit's rank in its word taken by a population count of the bits below
it (``popc``, or a SWAR count) instead of a prefix sum across the word's 64 lanes.

    python benchmarks/sweep_expand.py

Every variant's output is compared with the library kernel's (the buffer starts as -1, so an
unwritten slot shows); the times are ``triton.testing.do_bench`` medians.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bench_predict import per_key_on_gpu
from dbsp.kernels import predict_select as PS


@triton.jit
def _expand_rank(WORDS, STARTS, FULL, OUT, n_words, ng, nt, BW: tl.constexpr, GT: tl.constexpr, SWAR: tl.constexpr):
    """The library's expand, with bit ``j``'s output slot = the word's start + the set bits below ``j``."""
    ok, word, start, full, jl, tile = PS._expand_words(WORDS, STARTS, FULL, n_words, ng, BW, GT)
    j64 = jl.to(tl.int64)
    bits = ((word[:, None] >> j64[None, :]) & 1).to(tl.int32)
    below = word[:, None] & ((tl.full((GT,), 1, tl.int64) << j64) - 1)[None, :]
    if SWAR:
        x = below.to(tl.uint64, bitcast=True)
        x = x - ((x >> 1) & 0x5555555555555555)
        x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
        rank = ((x * 0x0101010101010101) >> 56).to(tl.int32)
    else:
        rank = libdevice.popc(below)
    bits = tl.where(full[:, None], (tile < nt).to(tl.int32), bits)
    rank = tl.where(full[:, None], jl[None, :], rank)
    tl.store(OUT + start[:, None] + rank, tile.to(tl.int32), mask=(bits > 0) & ok[:, None])


def main() -> None:
    w, x = per_key_on_gpu("sweep_expand.py")
    passes = x.passes
    captured = {}
    real = PS._expand_kernel

    class Capture:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                captured.update(grid=grid, args=args, kw=kw)
                return real[grid](*args, **kw)
            return launch

    PS._expand_kernel = Capture()
    try:
        passes.emit(x.theta_row, x.forced, dense_above=0.6)
    finally:
        PS._expand_kernel = real
    words, starts, full_rows, out, n_words, ng, nt = captured["args"]
    gs = captured["kw"]["GT"]
    ref = out.clone()
    print(f"device {torch.cuda.get_device_name()}; {n_words} words of {gs} tiles, {out.numel()} tile ids "
          f"({out.numel() * 4 / 1e6:.0f} MB), {int(full_rows.sum())} full rows")

    def bench(f):
        return triton.testing.do_bench(f, warmup=10, rep=100)

    rows = []
    for kind in ("scan", "swar", "popc"):
        for bits in ((256, 512, 1024) if kind != "popc" else (512,)):
            BW = max(1, bits // gs)
            for warps in ((2, 4, 8) if kind != "popc" else (4,)):
                buf = torch.full_like(out, -1)
                grid = (triton.cdiv(n_words, BW),)
                if kind == "scan":
                    fn = lambda: real[grid](words, starts, full_rows, buf, n_words, ng, nt, BW=BW, GT=gs, num_warps=warps)  # noqa: E731
                else:
                    fn = lambda: _expand_rank[grid](words, starts, full_rows, buf, n_words, ng, nt, BW=BW, GT=gs,  # noqa: E731
                                                    SWAR=kind == "swar", num_warps=warps)
                try:
                    fn()
                    same = bool(torch.equal(buf, ref))
                    ms = bench(fn)
                except Exception as e:  # a configuration the compiler rejects
                    print(f"{kind} bits={bits} warps={warps}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                rows.append((ms, kind, bits, warps, same))
                print(f"{kind:5s} bits/program {bits:5d} warps {warps}: {1e3 * ms:7.1f} us  equal to the library's: {same}")
    best = min(r for r in rows if r[4])
    lib = [r for r in rows if r[1] == "scan" and r[2] == PS.EXPAND_BITS and r[3] == PS.EXPAND_WARPS]
    print(f"library setting (scan, {PS.EXPAND_BITS} bits, {PS.EXPAND_WARPS} warps): {1e3 * lib[0][0]:.1f} us; "
          f"fastest equal variant: {best[1]} {best[2]} bits {best[3]} warps {1e3 * best[0]:.1f} us")


if __name__ == "__main__":
    main()
