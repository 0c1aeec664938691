"""The pooled-key predictors at Wan2.1-1.3B 480p (GPU): whole calls (64x16 ... 128x128) against
dense SDPA, then the 64x16 call's pieces (pooling, the fp32 / TF32 / bf16 score products, the
select kernel at 2-8 warps, the offsets and emit kernels), to see where the time goes.

    python benchmarks/sweep_select.py
"""
import time

import torch
import triton
import triton.language as tl

from dbsp.kernels import predict_pooled
from dbsp.predict import block_pool, predict_mask
from dbsp.video import make_workload


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


w = make_workload("wan1.3b-480p", device=torch.device("cuda"), dtype=torch.bfloat16)
B, S, H, D = w.q.shape
dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(w.q.transpose(1, 2), w.k.transpose(1, 2), w.v.transpose(1, 2)))
print(f"dense SDPA {dense:.3f} ms")
for N in (16, 32, 64, 128):
    t = timed(lambda: predict_mask(w.q, w.k, q_block=64 if N < 128 else 128, kv_tile=N, top_p=0.9, pool_keys=True))
    print(f"{64 if N < 128 else 128}x{N} pooled: {t:.3f} ms = {100 * t / dense:.1f}%")
qbar = predict_pooled.pool(w.q, 64)
kbar = predict_pooled.pool(w.k, 16)
mq, nt = qbar.shape[2], kbar.shape[2]
print(f"pool q/64 {timed(lambda: predict_pooled.pool(w.q, 64)):.4f} ms, k/16 {timed(lambda: predict_pooled.pool(w.k, 16)):.4f} ms")
print(f"torch block_pool q/64 {timed(lambda: block_pool(w.q, 64)):.4f} ms, k/16 {timed(lambda: block_pool(w.k, 16)):.4f} ms")


@triton.jit
def _pool_blocks(X, OUT, S, H, nb, s_xb, s_xs, s_xh, BLOCK: tl.constexpr, BPP: tl.constexpr, D: tl.constexpr):
    # BPP consecutive blocks of one head per program, loaded as one (BPP * BLOCK, D) tile.
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = pid * BPP * BLOCK + tl.arange(0, BPP * BLOCK)
    d = tl.arange(0, D)
    x = tl.load(X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + t[:, None].to(tl.int64) * s_xs + d[None, :],
                mask=(t < S)[:, None], other=0.0).to(tl.float32)
    sums = tl.sum(tl.reshape(x, (BPP, BLOCK, D)), axis=1)
    blk = pid * BPP + tl.arange(0, BPP)
    n = tl.minimum(BLOCK, S - blk * BLOCK).to(tl.float32)
    tl.store(OUT + (bh.to(tl.int64) * nb + blk)[:, None] * D + d[None, :], sums / n[:, None], mask=(blk < nb)[:, None])


def pool_blocks(x, block, bpp, warps):
    B_, S_, H_, D_ = x.shape
    nb = -(-S_ // block)
    out = torch.empty(B_, H_, nb, D_, dtype=torch.float32, device=x.device)
    _pool_blocks[(triton.cdiv(nb, bpp), B_ * H_)](x, out, S_, H_, nb, x.stride(0), x.stride(1), x.stride(2),
                                                  BLOCK=block, BPP=bpp, D=D_, num_warps=warps)
    return out


for block, x in ((16, w.k), (64, w.q)):
    want = predict_pooled.pool(x, block)
    for bpp in (1, 2, 4, 8):
        for warps in (2, 4, 8):
            if bpp * block > 256:
                continue
            got = pool_blocks(x, block, bpp, warps)
            err = (got - want).abs().max().item()
            print(f"pool_blocks block {block} x{bpp} per program, {warps} warps: {timed(lambda: pool_blocks(x, block, bpp, warps)):.4f} ms (max diff {err:.1e})")
for warps in (1, 2, 4, 8):
    nb16 = -(-S // 16)
    out = torch.empty(B, H, nb16, D, dtype=torch.float32, device="cuda")
    f = lambda: predict_pooled._pool_kernel[(nb16, B * H)](w.k, out, out, out, S, H, nb16, 16, *w.k.stride(), HAS_OLD=False, TB=16, D=D, DP=D, num_warps=warps)  # noqa: E731
    print(f"current pool kernel k/16 at {warps} warps: {timed(f):.4f} ms")
q3, k3 = qbar.reshape(B * H, mq, D), kbar.reshape(B * H, nt, D)
print("bmm fp32 all heads", timed(lambda: torch.bmm(q3, k3.transpose(1, 2))))
torch.backends.cuda.matmul.allow_tf32 = True
print("bmm tf32 all heads", timed(lambda: torch.bmm(q3, k3.transpose(1, 2))))
torch.backends.cuda.matmul.allow_tf32 = False
print("bmm bf16 all heads", timed(lambda: torch.bmm(q3.bfloat16(), k3.bfloat16().transpose(1, 2))))
dots = torch.bmm(q3, k3.transpose(1, 2)).reshape(-1, nt)
rows = dots.shape[0]
keep = torch.empty(rows, nt, dtype=torch.int8, device="cuda")
counts = torch.empty(rows, dtype=torch.int32, device="cuda")
ent = torch.zeros(2, B * H, dtype=torch.int64, device="cuda")
for warps in (2, 4, 8):
    predict_pooled._warps = lambda ntp, w_=warps: w_
    t = timed(lambda: predict_pooled.select(dots, 0, keep, counts, ent, mq=mq, Sq=S, Skv=S, scale=D ** -0.5, top_p=0.9,
                                            lo=1, hi=nt, M=64, N=16, diagonal=True, text=0))
    print(f"select all rows (64x16), {warps} warps: {t:.3f} ms")
predict_pooled._warps = lambda ntp: 4 if ntp <= 2048 else 8
ent.zero_()
predict_pooled.select(dots, 0, keep, counts, ent, mq=mq, Sq=S, Skv=S, scale=D ** -0.5, top_p=0.9, lo=1, hi=nt, M=64,
                      N=16, diagonal=True, text=0)
limit = int(0.6 * S * S)
print(f"offsets (one launch) {timed(lambda: predict_pooled.offsets(counts, ent, mq=mq, nt=nt, limit=limit)):.4f} ms")
offs, full, _ = predict_pooled.offsets(counts, ent, mq=mq, nt=nt, limit=limit)
total = int(offs[-1, -1])
for warps in (2, 4, 8):
    predict_pooled._warps = lambda ntp, w_=warps: w_
    print(f"emit {warps} warps {timed(lambda: predict_pooled.emit(keep, offs, full, total, mq=mq)):.4f} ms")
