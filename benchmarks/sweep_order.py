"""The sparse kernel's launch order against its tail, on the SP emulation's calls (GPU).

    python benchmarks/sweep_order.py [--rounds 9] [--workloads skewed,regional] [--out DIR]

The kernel's programs start in the order ``ORDER`` lists them; each SM takes the next program as
one finishes, so a long program that starts late finishes last while the other SMs idle. The
shipped order (``dbsp.attention._schedule``) sorts each head's query blocks heaviest first and
runs the heads one after another, so the last head's longest rows start late. This script times,
on the same calls, that order against the *global* one (every sparse row of the call, heaviest
first, heads mixed) and the natural one (head by head, query blocks in sequence order).

Calls: the Wan2.1-14B 720p workloads of ``bench_sp.py`` (64x64 masks predicted at top_p 0.9),
layers 0 and 1, every contiguous group of 5 and of 10 heads over the whole sequence (the local
problems of U8R1 and U4R1-like layouts); heads that select every tile go to SDPA in the library
and are left out here, as the library's launch order leaves them out. Each call is timed with
CUDA events in ``--rounds`` rounds (variants in a fresh random order per round; median), and the
outputs of the three orders are checked equal. The line of each call also gives the list-
scheduling model's makespan over its lower bound for both orders (programs of ``tiles + 2``
units on 264 slots: 132 SMs x 2 programs), the tail this predicts. Writes ``order.csv``.
"""
from __future__ import annotations

import argparse
import heapq
import random
import statistics
from pathlib import Path

import torch

from dbsp.attention import _schedule, _triton
from dbsp.predict import predict_mask
from dbsp.video import get_shape, make_workload

from bench_sp import WORKLOADS, call_ms, write_csv

SLOTS, PROGRAM_COST = 264, 2.0


def orders(counts: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``rows``: the flat (b * H + h) * Mq + qb ids the call runs, in the shipped order."""
    flat = counts.reshape(-1)
    heavy = torch.argsort(flat[rows], descending=True, stable=True)
    return {"per-head": rows, "global": rows[heavy], "natural": torch.sort(rows).values}


def makespan(durations: list[float]) -> float:
    """List scheduling: each program goes to the slot that frees first, in launch order."""
    slots = [0.0] * SLOTS
    for d in durations:
        heapq.heappush(slots, heapq.heappop(slots) + d)
    return max(slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--workloads", default="skewed,regional")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--groups", default="5,10", help="heads per call. Default: 5,10")
    parser.add_argument("--shape", default="wan14b-720p", help="dbsp.video preset (cpu-tiny: a CPU smoke run under "
                        "TRITON_INTERPRET=1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}", flush=True)
    shape = get_shape(args.shape)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rng = random.Random(0)
    rows_out = []
    for kind in args.workloads.split(","):
        for layer in range(args.layers):
            w = make_workload(shape, layer=layer, seed=0, **WORKLOADS[kind], device=dev, dtype=dtype)
            mask = predict_mask(w.q, w.k, q_block=64, kv_tile=64, top_p=0.9)
            H = mask.heads
            for size in (int(g) for g in args.groups.split(",")):
                for g0 in range(0, H, size):
                    heads = list(range(g0, min(H, g0 + size)))
                    sub = mask.select_heads(torch.tensor(heads, device=dev))
                    sched = _schedule(sub)
                    if sched.n_dense == len(heads):
                        continue
                    shipped = (sched.sparse_order if sched.sparse_order is not None else sched.order).long()
                    nnz = sched.sparse_nnz if sched.sparse_order is not None else -1
                    counts = sub.row_counts()
                    variants = orders(counts, shipped)
                    idx = torch.tensor(heads, device=dev)
                    q, k, v = (t.index_select(2, idx) for t in (w.q, w.k, w.v))
                    scale = q.shape[-1] ** -0.5
                    outs = {}
                    for name, order in variants.items():  # warm-up (autotuning) and the equality check
                        outs[name] = _triton(q, k, v, sub, scale, q.dtype, order=order.to(torch.int32), nnz=nnz)[0]
                    sparse = torch.nonzero(~(counts == sub.num_kv_tiles).all(dim=2).all(dim=0)).flatten().tolist()
                    same = all(torch.equal(outs[n][:, :, sparse], outs["per-head"][:, :, sparse]) for n in outs)
                    times = {n: [] for n in variants}
                    for _ in range(args.rounds):
                        for name in rng.sample(list(variants), len(variants)):
                            o32 = variants[name].to(torch.int32)
                            times[name].append(call_ms(lambda: _triton(q, k, v, sub, scale, q.dtype, order=o32, nnz=nnz), dev))
                    ms = {n: statistics.median(t) for n, t in times.items()}
                    flat = counts.reshape(-1).double().cpu()
                    model = {}
                    for name in ("per-head", "global"):
                        d = (flat[variants[name].cpu()] + PROGRAM_COST).tolist()
                        model[name] = makespan(d) / (sum(d) / SLOTS)
                    row = dict(workload=kind, layer=layer, heads=f"{heads[0]}-{heads[-1]}", n_heads=len(heads),
                               sparse_heads=len(sparse), density=round(sub.density(), 4),
                               per_head_ms=round(ms["per-head"], 4), global_ms=round(ms["global"], 4),
                               natural_ms=round(ms["natural"], 4), global_over_per_head=round(ms["global"] / ms["per-head"], 4),
                               model_per_head=round(model["per-head"], 4), model_global=round(model["global"], 4), same=same)
                    rows_out.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            del w, mask
    if not rows_out:
        print("no call holds a sparse head: nothing timed")
        return
    ratios = [r["global_over_per_head"] for r in rows_out]
    print(f"\nglobal / per-head over {len(ratios)} calls: median {statistics.median(ratios):.4f}, min {min(ratios):.4f}, "
          f"max {max(ratios):.4f}; total per-head {sum(r['per_head_ms'] for r in rows_out):.2f} ms, global "
          f"{sum(r['global_ms'] for r in rows_out):.2f} ms, natural {sum(r['natural_ms'] for r in rows_out):.2f} ms; "
          f"all outputs equal: {all(r['same'] for r in rows_out)}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "order.csv", rows_out)


if __name__ == "__main__":
    main()
