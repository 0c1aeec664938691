"""Predictor time vs dense cuDNN SDPA at Wan2.1-1.3B 480p (GPU), in three rounds of alternating
order, to tell run-to-run spread from real differences (bench_predict.py times each variant once).

    python benchmarks/predict_rounds.py
"""
import torch, triton
from dbsp.predict import predict_mask
from dbsp.video import make_workload
w = make_workload("wan1.3b-480p", device=torch.device("cuda"), dtype=torch.bfloat16)
q, k, v = w.q, w.k, w.v
V = {"128x128 pooled": dict(q_block=128, kv_tile=128), "64x64 pooled": dict(q_block=64, kv_tile=64),
     "64x32 pooled": dict(q_block=64, kv_tile=32, pool_keys=True), "64x16 pooled": dict(q_block=64, kv_tile=16, pool_keys=True),
     "64x16 per-key": dict(q_block=64, kv_tile=16), "64x1 per-key": dict(q_block=64, kv_tile=1)}
qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
from torch.nn.attention import SDPBackend, sdpa_kernel
def dense():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
for kw in V.values():
    predict_mask(q, k, **kw)
for r in range(3):
    td = triton.testing.do_bench(dense, warmup=25, rep=100, return_mode="median")
    out = [f"dense {td:.3f}"]
    for name, kw in (V.items() if r % 2 == 0 else reversed(V.items())):
        t = triton.testing.do_bench(lambda: predict_mask(q, k, **kw), warmup=25, rep=100, return_mode="median")
        out.append(f"{name} {t:.3f} ms ({100*t/td:.1f}%)")
    print(f"round {r}: " + "; ".join(out), flush=True)
