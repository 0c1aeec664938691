"""The pooled-key predictors at Wan2.1-1.3B 480p (GPU): whole calls (64x16 ... 128x128) against
dense SDPA, then the 64x16 call's pieces (pooling, the fp32 / TF32 / bf16 score products, the
select kernel at 2-8 warps, the emit kernel), to see where the time goes.

    python benchmarks/sweep_select.py
"""
import time
import torch
from dbsp.kernels import predict_pooled
from dbsp.predict import predict_mask
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
ent = torch.zeros(B * H, dtype=torch.int64, device="cuda")
for warps in (2, 4, 8):
    predict_pooled._warps = lambda ntp, w_=warps: w_
    t = timed(lambda: predict_pooled.select(dots, 0, keep, counts, ent, mq=mq, Sq=S, Skv=S, scale=D ** -0.5, top_p=0.9,
                                            lo=1, hi=nt, M=64, N=16, diagonal=True, text=0))
    print(f"select all rows (64x16), {warps} warps: {t:.3f} ms")
flat = torch.zeros(rows + 1, dtype=torch.int64, device="cuda")
torch.cumsum(counts.reshape(-1), 0, out=flat[1:])
dz = torch.zeros(B * H, dtype=torch.int8, device="cuda")
for warps in (2, 4, 8):
    predict_pooled._warps = lambda ntp, w_=warps: w_
    print(f"emit {warps} warps", timed(lambda: predict_pooled.emit(keep, flat, dz, int(flat[-1]), mq=mq)))
