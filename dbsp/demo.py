"""``python -m dbsp demo``: a small sparse-attention run checked against an independent oracle."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .attention import sparse_attention
from .mask import SparseMask


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=1000, help="tokens. Default: 1000")
    parser.add_argument("--heads", type=int, default=4, help="Default: 4")
    parser.add_argument("--q-block", type=int, default=64, help="query rows per mask block. Default: 64")
    parser.add_argument("--kv-tile", type=int, default=1, help="keys per mask tile (1 = fine-grained). Default: 1")
    parser.add_argument("--density", type=float, default=0.3, help="fraction of tiles kept. Default: 0.3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda. Default: cuda where present")


def run_cli(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    B, S, H, D = 1, args.seq_len, args.heads, 64
    q, k, v = (torch.randn(B, S, H, D, device=device) for _ in range(3))
    mq, nt = -(-S // args.q_block), -(-S // args.kv_tile)
    tiles = torch.rand(B, H, mq, nt, device=device) < args.density
    mask = SparseMask.from_dense(tiles, q_block=args.q_block, kv_tile=args.kv_tile, seq_len_q=S, seq_len_kv=S)
    print(mask)

    t0 = time.perf_counter()
    out = sparse_attention(q, k, v, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()

    # Independent oracle: torch SDPA in float64 with the equivalent token-level boolean mask.
    tok = mask.to_dense().repeat_interleave(args.q_block, 2)[:, :, :S].repeat_interleave(args.kv_tile, 3)[..., :S]
    empty_rows = ~tok.any(-1)
    ref = F.scaled_dot_product_attention(
        *(x.transpose(1, 2).double() for x in (q, k, v)), attn_mask=tok | empty_rows[..., None]
    ).masked_fill(empty_rows[..., None], 0.0).transpose(1, 2)
    err = (out.double() - ref).abs().max().item()
    print(f"sparse_attention on {device}: out {tuple(out.shape)} in {1e3 * (t1 - t0):.1f} ms")
    print(f"max |out - SDPA(float64, same mask)| = {err:.3e}  (query rows with no key: {int(empty_rows.sum())})")
    return 0 if err < 1e-3 else 1
