"""The ring's LSE merge: PyTorch (``merge_attention``) against the one-pass kernel (``merge_attention_``).

    python benchmarks/bench_merge.py [--repeats 50] [--rounds 3] [--out DIR]      # GPU

Shapes: one rank's running output under each ring layout of 8 ranks at Wan2.1-14B 720p (40 heads,
75,600 tokens, D 128): U1R8 (9,450 tokens x 40 heads), U2R4 (18,900 x 20), U4R2 (37,800 x 10).
Part B is float32, either contiguous (the kernel's output) or a transposed view (cuDNN's layout
for dense heads). The kernel runs at its shipped rows per program (``merge.BLOCK_ROWS``) and at
the others of ``SWEEP_ROWS``. Each variant is timed with ``triton.testing.do_bench`` (L2 flushed between
calls), in ``--rounds`` rounds of a fresh random order (median); the kernel's result is checked
against PyTorch's. Also times one ring rank's whole local work at U1R8 (8 steps of
``sparse_attention`` at 64x64 density 0.3 with float32 output and lse, plus the 7 merges), with
each merge, to show the merge's share of a step. Effective bandwidth counts the bytes the kernel
must move (out read and written, part B read, both lse read, lse written). Writes ``merge.csv``.
"""
from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import torch
from triton.testing import do_bench

from dbsp import SparseMask, sparse_attention
from dbsp.dist import merge_attention, merge_attention_
from dbsp.kernels import merge
from dbsp.plan import CostModel

from bench_sp import write_csv

LAYOUTS = {"U1R8": (9450, 40), "U2R4": (18900, 20), "U4R2": (37800, 10)}
RING_RANK = (9450, 40, 8)  # one U1R8 rank: query tokens, heads, ring steps
SWEEP_ROWS = (4, 8, 16, 32, 64)
DEVICE = "cuda"


def parts(L: int, H: int, D: int, *, transposed: bool, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(1, L, H, D, device=device, generator=gen)
    lse = torch.randn(1, H, L, device=device, generator=gen)
    o = torch.randn(1, L, H, D, device=device, generator=gen)
    if transposed:
        o = o.transpose(1, 2).contiguous().transpose(1, 2)
    lb = torch.randn(1, H, L, device=device, generator=gen)
    lb[0, 0, : L // 10] = float("-inf")  # some rows empty in part B
    return out, lse, o, lb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="do_bench rep (ms of timing per variant and round)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/merge")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_merge.py times CUDA kernels; no GPU here")
    dev, D = torch.device(DEVICE), 128
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    rows = []
    for name, (L, H) in LAYOUTS.items():
        for transposed in (False, True):
            out, lse, o, lb = parts(L, H, D, transposed=transposed, device=dev)
            want, want_lse = merge_attention(out, lse, o, lb)
            got, got_lse = merge_attention_(out.clone(), lse.clone(), o, lb)
            err = max(float((got - want).abs().max()), float((got_lse - want_lse).abs().max()))
            if err > 1e-5:
                raise SystemExit(f"{name}: the kernel's merge differs from merge_attention by {err:.2e}")
            acc, acc_lse = out.clone(), lse.clone()  # merging into it again and again is fine for timing
            variants = {
                "torch": lambda: merge_attention(out, lse, o, lb),
                f"kernel r{merge.BLOCK_ROWS}": lambda: merge_attention_(acc, acc_lse, o, lb),
            }
            for rows_per in SWEEP_ROWS:  # the kernel's rows per program, against the shipped setting
                if rows_per != merge.BLOCK_ROWS:
                    variants[f"kernel r{rows_per}"] = lambda n=rows_per: merge.merge_into(acc, acc_lse, o, lb, block_rows=n)
            samples = {v: [] for v in variants}
            for _ in range(args.rounds):
                for v in random.sample(list(variants), len(variants)):
                    samples[v].append(do_bench(variants[v], rep=args.repeats))
            moved = CostModel.merge_bytes(1, L, H, D)
            for v, xs in samples.items():
                ms = statistics.median(xs)
                rows.append(dict(what="merge", layout=name, part_b="transposed" if transposed else "contiguous",
                                 variant=v, ms=round(ms, 4), gbps=round(moved / ms / 1e6, 1), max_err=f"{err:.1e}"))
                print(f"  merge {name} ({L} x {H} heads), part B {rows[-1]['part_b']:<10}: {v:<10} {ms:7.3f} ms "
                      f"({rows[-1]['gbps']:7.1f} GB/s of the kernel's bytes)", flush=True)
    rows += ring_rank(dev, D, args)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    write_csv(path / "merge.csv", rows)
    print(f"wrote {path / 'merge.csv'}")
    return 0


def ring_rank(dev, D: int, args) -> list[dict]:
    """One U1R8 ring rank's 8 steps: kernel calls with float32 out and lse, then 7 merges."""
    L, H, R = RING_RANK
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
    kvs = [(torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16, generator=gen),
            torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16, generator=gen)) for _ in range(R)]
    nb = -(-L // 64)
    masks = [SparseMask.from_dense(torch.rand(1, H, nb, nb, device=dev, generator=gen) < 0.3, q_block=64, kv_tile=64,
                                   seq_len_q=L, seq_len_kv=L) for _ in range(R)]

    def steps(merge):
        out = lse = None
        for (k, v), m in zip(kvs, masks):
            o, l = sparse_attention(q, k, v, m, return_lse=True, out_dtype=torch.float32)
            out, lse = (o, l) if out is None else merge(out, lse, o, l)
        return out

    def calls_only():
        for (k, v), m in zip(kvs, masks):
            sparse_attention(q, k, v, m, return_lse=True, out_dtype=torch.float32)

    variants = {"calls only": calls_only, "calls + torch merges": lambda: steps(merge_attention),
                "calls + kernel merges": lambda: steps(merge_attention_)}
    err = float((variants["calls + torch merges"]() - variants["calls + kernel merges"]()).abs().max())
    samples = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in random.sample(list(variants), len(variants)):
            samples[v].append(do_bench(variants[v], rep=args.repeats))
    rows = []
    base = statistics.median(samples["calls only"])
    for v, xs in samples.items():
        ms = statistics.median(xs)
        rows.append(dict(what="ring rank U1R8, 64x64 @ 0.3", layout="U1R8", part_b="kernel output", variant=v,
                         ms=round(ms, 4), gbps="", max_err=f"{err:.1e}"))
        print(f"  one U1R8 ring rank, {R} steps: {v:<22} {ms:7.3f} ms (merges {ms - base:6.3f} ms, "
              f"{100 * (ms - base) / base:5.1f}% of the calls)", flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
