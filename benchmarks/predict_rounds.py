"""Predictor time vs dense cuDNN SDPA at Wan2.1-1.3B 480p (GPU), in three rounds of alternating
order, to tell run-to-run spread from real differences (bench_predict.py times each variant once).

    python benchmarks/predict_rounds.py

Two figures per predictor:

* ``alone``: ``triton.testing.do_bench`` of one ``predict_mask`` call (median; L2 flushed; the
  GPU idles while the host launches, so host overhead counts in full);
* ``in pipeline``: the call enqueued right after a dense attention, as in a model's forward where
  the host runs ahead of the GPU: the GPU time from the attention's end to the call's end (CUDA
  events; median of 20). The predictors read one host value (to size the indices), so the host
  time after that read still counts here.
"""
import statistics

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from dbsp.predict import predict_mask
from dbsp.video import make_workload

w = make_workload("wan1.3b-480p", device=torch.device("cuda"), dtype=torch.bfloat16)
q, k, v = w.q, w.k, w.v
V = {"128x128 pooled": dict(q_block=128, kv_tile=128), "64x64 pooled": dict(q_block=64, kv_tile=64),
     "64x32 pooled": dict(q_block=64, kv_tile=32, pool_keys=True), "64x16 pooled": dict(q_block=64, kv_tile=16, pool_keys=True),
     "64x16 per-key": dict(q_block=64, kv_tile=16), "64x1 per-key": dict(q_block=64, kv_tile=1)}
qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))


def dense():
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)


def in_pipeline(fn, n=20):
    times = []
    for _ in range(n):
        mid, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dense()
        mid.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(mid.elapsed_time(end))
    return statistics.median(times)


print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
for kw in V.values():
    predict_mask(q, k, **kw)
for r in range(3):
    td = triton.testing.do_bench(dense, warmup=25, rep=100, return_mode="median")
    out = [f"dense {td:.3f}"]
    for name, kw in (V.items() if r % 2 == 0 else reversed(V.items())):
        call = lambda: predict_mask(q, k, **kw)  # noqa: E731
        t = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        tp = in_pipeline(call)
        out.append(f"{name} alone {t:.3f} ms ({100*t/td:.1f}%), in pipeline {tp:.3f} ms ({100*tp/td:.1f}%)")
    print(f"round {r}: " + "; ".join(out), flush=True)
