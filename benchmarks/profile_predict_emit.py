"""Where the per-key 64x1 predictor's last pass spends its time (GPU, Wan2.1-1.3B 480p).

    python benchmarks/profile_predict_emit.py

Times ``TritonPasses.emit`` (with and without the dense-head round-up), one cumsum of the group
counts and a whole ``predict_mask`` call, then prints torch.profiler's table of 5 emit calls and
the kernel timeline of the last one (start offset and duration in microseconds): gaps between
kernels are GPU time spent waiting for the host.
"""
import json

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from bench_predict import per_key_on_gpu
from dbsp import predict as P

w, x = per_key_on_gpu("profile_predict_emit.py")
q, k = w.q, w.k
passes, cfg, gs, ng, n_g, gmax, gsum, lse, theta, mass, pick, theta_row, forced = (
    x.passes, x.cfg, x.gs, x.ng, x.n_g, x.gmax, x.gsum, x.lse, x.theta, x.mass, x.pick, x.theta_row, x.forced)


def bench(f):
    return triton.testing.do_bench(f, warmup=10, rep=80)


for da in (None, 0.6):
    print(f"emit dense_above={da}: {bench(lambda: passes.emit(theta_row, forced, dense_above=da)):.3f} ms")
R = passes.BH * passes.mq
c = torch.randint(0, 64, (R * ng,), device="cuda", dtype=torch.int32)
print(f"cumsum 3.1M int32->int64 minus: {bench(lambda: torch.cumsum(c, 0, dtype=torch.int64) - c):.3f} ms")
print(f"predict_mask 64x1 whole: {bench(lambda: P.predict_mask(q, k, q_block=64, kv_tile=1)):.3f} ms")
for _ in range(3): passes.emit(theta_row, forced, dense_above=0.6)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        passes.emit(theta_row, forced, dense_above=0.6)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
prof.export_chrome_trace("/tmp/dbsp_emit_trace.json")
ev = [e for e in json.load(open("/tmp/dbsp_emit_trace.json"))["traceEvents"] if e.get("cat") == "kernel"]
ev.sort(key=lambda e: e["ts"])
print("kernel timeline of the last emit call (start offset us, dur us, name):")
last = ev[-len(ev)//5:]
t0 = last[0]["ts"]
for e in last:
    print(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {e['name'][:70]}")
