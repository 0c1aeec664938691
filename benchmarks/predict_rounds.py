"""Predictor time vs dense cuDNN SDPA at Wan2.1-1.3B 480p (GPU), in three rounds of alternating
order, to tell run-to-run spread from real differences (bench_predict.py times each variant once).

    python benchmarks/predict_rounds.py [--budget] [--search 16x3,32x2] [--refine0] [--only "64x1 per-key,..."]

Two figures per predictor:

* ``alone``: ``triton.testing.do_bench`` of one ``predict_mask`` call (median; L2 flushed; the
  GPU idles while the host launches, so host overhead counts in full);
* ``in pipeline``: the call enqueued right after a dense attention, as in a model's forward where
  the host runs ahead of the GPU: the GPU time from the attention's end to the call's end (CUDA
  events; median of 20). The predictors read one host value (to size the indices), so the host
  time after that read still counts here.

``--budget`` adds the per-key masks with ``max_keep = ceil(0.2 * tiles)`` (as bench_e2e.py's
``64x1@0.2``): on random-weight-like diffuse rows nearly every row is over the cap, so these time
the budget search. ``--search 16x3,32x2`` repeats those rows for each (thresholds per round x
rounds) of the search (``dbsp.predict._BUDGET_CANDIDATES`` / ``_BUDGET_ROUNDS``; default: the
module's). Each budget row also reports the mean and largest rule-chosen tiles per query block
(forced diagonal tiles excluded) against max_keep.
"""
import argparse
import math
import statistics

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import dbsp.predict
from dbsp.predict import predict_mask
from dbsp.video import make_workload

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--budget", action="store_true", help="also time 64x16 and 64x1 per-key with max_keep = 20%% of tiles")
parser.add_argument("--search", default="", help="budget search settings TxR, comma-separated (implies --budget)")
parser.add_argument("--refine0", action="store_true",
                    help="also time the per-key predictors with refine=0 (one candidates pass; coarser threshold, more tiles)")
parser.add_argument("--only", default="", help="time only these predictors (names as printed, comma-separated)")
args = parser.parse_args()

w = make_workload("wan1.3b-480p", device=torch.device("cuda"), dtype=torch.bfloat16)
q, k, v = w.q, w.k, w.v
S = k.shape[1]
V = {"128x128 pooled": dict(q_block=128, kv_tile=128), "64x64 pooled": dict(q_block=64, kv_tile=64),
     "64x32 pooled": dict(q_block=64, kv_tile=32, pool_keys=True), "64x16 pooled": dict(q_block=64, kv_tile=16, pool_keys=True),
     "64x16 per-key": dict(q_block=64, kv_tile=16), "64x1 per-key": dict(q_block=64, kv_tile=1)}
if args.refine0:
    V.update({"64x16 per-key refine 0": dict(q_block=64, kv_tile=16, refine=0), "64x1 per-key refine 0": dict(q_block=64, kv_tile=1, refine=0)})
searches = [tuple(int(x) for x in t.split("x")) for t in args.search.split(",") if t] or [None]
BUDGET = {}  # name -> (predict_mask kwargs, (T, rounds) or None)
if args.budget or args.search:
    for tr in searches:
        tag = "" if tr is None else f" search {tr[0]}x{tr[1]}"
        for N in (16, 1):
            kw = dict(q_block=64, kv_tile=N, max_keep=math.ceil(0.2 * -(-S // N)))
            BUDGET[f"64x{N} per-key max_keep 20%{tag}"] = (kw, tr)
            V[f"64x{N} per-key max_keep 20%{tag}"] = kw
if args.only:
    keep = [n.strip() for n in args.only.split(",")]
    unknown = [n for n in keep if n not in V]
    if unknown:
        raise SystemExit(f"--only: unknown predictors {unknown}; known: {list(V)}")
    V = {n: V[n] for n in keep}
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


def search_setting(name):
    """Set the budget search's module settings for variant ``name`` (the module's own otherwise)."""
    tr = BUDGET.get(name, (None, None))[1] or DEFAULT_SEARCH
    if tr[0] is not None:  # an older dbsp has no budget search
        dbsp.predict._BUDGET_CANDIDATES, dbsp.predict._BUDGET_ROUNDS = tr


DEFAULT_SEARCH = (getattr(dbsp.predict, "_BUDGET_CANDIDATES", None), getattr(dbsp.predict, "_BUDGET_ROUNDS", None))
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
for name, kw in V.items():
    search_setting(name)
    m = predict_mask(q, k, **kw)
    if args.refine0 and "per-key" in name and name not in BUDGET:
        print(f"{name}: density {m.density():.4f}, nnz {m.nnz}")
    if name in BUDGET:  # the rule's own tiles (no forced diagonal), untimed
        counts = predict_mask(q, k, **kw, keep_diagonal=False, dense_above=None).row_counts().float()
        print(f"{name}: max_keep {kw['max_keep']}, rule tiles per query block: mean {counts.mean():.1f}, "
              f"min {counts.min():.0f}, max {counts.max():.0f}; density with the diagonal {m.density():.4f}")
for r in range(3):
    td = triton.testing.do_bench(dense, warmup=25, rep=100, return_mode="median")
    out = [f"dense {td:.3f}"]
    for name, kw in (V.items() if r % 2 == 0 else reversed(V.items())):
        search_setting(name)
        call = lambda: predict_mask(q, k, **kw)  # noqa: E731
        t = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        tp = in_pipeline(call)
        out.append(f"{name} alone {t:.3f} ms ({100*t/td:.1f}%), in pipeline {tp:.3f} ms ({100*tp/td:.1f}%)")
    print(f"round {r}: " + "; ".join(out), flush=True)
