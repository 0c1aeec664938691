"""Command line: ``python -m dbsp demo``.

This is the only module that reads environment variables (``DBSP_LOG``: the log level).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from . import SparseMask, sparse_attention

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    B, S, H, D = 1, args.seq_len, args.heads, 64
    q, k, v = (torch.randn(B, S, H, D, device=device) for _ in range(3))
    mq, nt = -(-S // args.q_block), -(-S // args.kv_tile)
    dense = torch.rand(B, H, mq, nt, device=device) < args.density
    mask = SparseMask.from_dense(dense, q_block=args.q_block, kv_tile=args.kv_tile, seq_len_q=S, seq_len_kv=S)
    print(mask)

    t0 = time.perf_counter()
    out, lse = sparse_attention(q, k, v, mask, return_lse=True)
    t1 = time.perf_counter()

    # Independent oracle: torch SDPA in float64 with the equivalent token-level boolean mask.
    tok = mask.to_dense().repeat_interleave(args.q_block, 2)[:, :, :S].repeat_interleave(args.kv_tile, 3)[..., :S]
    empty_rows = ~tok.any(-1)
    ref = F.scaled_dot_product_attention(
        *(x.transpose(1, 2).double() for x in (q, k, v)), attn_mask=tok | empty_rows[..., None]
    ).transpose(1, 2)
    ref[empty_rows.transpose(1, 2)] = 0.0
    err = (out.double() - ref).abs().max().item()
    print(f"sparse_attention on {device}: out {tuple(out.shape)}, {1e3 * (t1 - t0):.1f} ms")
    print(f"max |out - SDPA(float64, same mask)| = {err:.3e}  (rows with no key: {int(empty_rows.sum())})")
    return 0 if err < 1e-4 else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DBSP_LOG", "WARNING").upper(), format="%(name)s %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m dbsp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small end-to-end sparse attention run, checked against an oracle")
    demo.add_argument("--seq-len", type=int, default=1000)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--q-block", type=int, default=64)
    demo.add_argument("--kv-tile", type=int, default=1)
    demo.add_argument("--density", type=float, default=0.3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="cpu or cuda. Default: cuda where present")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
