"""Multi-GPU only: ``sp_attention`` over NCCL, bf16, against one GPU, under the 2x-torch-error rule.

One process per GPU (``run_distributed(..., backend="nccl")``); skipped on machines with fewer than
two GPUs (CI has none). For every ``U x R`` factorisation of the world, block and fine-grained
masks (with empty query blocks, an odd sequence length, so shards are uneven), with and without a
db-SP plan: every rank's output shard and lse must be within 2x the error of PyTorch's own bf16
SDPA (same boolean mask) against the fp64 oracle, and so must single-GPU ``sparse_attention``;
the largest difference between the parallel and the single-GPU output is reported too.
"""

import pytest
import torch
import torch.distributed as dist

from dbsp import sparse_attention
from dbsp.dist import SPGroups, sp_attention
from dbsp.dist.groups import factorisations
from dbsp.dist.layout import shard_sizes
from dbsp.plan import make_plan
from harness import max_abs_err, random_mask, run_distributed, sdpa_oracle, token_mask

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
H, D, S = 8, 128, 4133  # odd length: uneven shards and a partial last block
MASKS = [(64, 64, 0.3), (64, 1, 0.2), (128, 128, 0.25), (128, 1, 0.15)]


def _shard(x, rank, world, dim=1):
    sizes = shard_sizes(x.shape[dim], world)
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _nccl_cases(rank, world, seq_len=S):
    """Every case on this rank; ``seq_len`` smaller for a CPU (gloo) dry run of this file's logic."""
    device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    S = seq_len
    groups = SPGroups.all_degrees(heads=H)
    rows = []
    for seed, (M, N, density) in enumerate(MASKS):
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q, k, v = (torch.randn(1, S, H, D, generator=gen).to(device, torch.bfloat16) for _ in range(3))
        torch.manual_seed(seed)
        mask = random_mask(1, H, S, S, q_block=M, kv_tile=N, density=density, device=device)
        oracle_out, oracle_lse = sdpa_oracle(q, k, v, mask)  # fp64
        tok = token_mask(mask)
        empty = ~tok.any(-1)
        torch_bf16 = torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), attn_mask=tok | empty[..., None]
        ).masked_fill(empty[..., None], 0.0).transpose(1, 2)
        single_out, single_lse = sparse_attention(q, k, v, mask, return_lse=True)
        base_out = max_abs_err(torch_bf16, oracle_out)
        base_lse = max_abs_err(single_lse, oracle_lse)
        for (U, R), g in groups.items():
            for planned in (False, True):
                plan = make_plan(mask.work().cpu(), ulysses=U, ring=R, q_block=M, seq_len=S) if planned else None
                qs, ks, vs = (_shard(x, rank, world).contiguous() for x in (q, k, v))
                out, lse = sp_attention(qs, ks, vs, mask, groups=g, plan=plan, return_lse=True)
                rows.append(dict(
                    name=f"U{U}R{R} {M}x{N}@{density} plan={planned}",
                    nan=bool(torch.isnan(out).any() or torch.isnan(lse).any()),
                    out=max_abs_err(out, _shard(oracle_out, rank, world)),
                    lse=max_abs_err(lse, _shard(oracle_lse, rank, world, dim=2)),
                    vs_single=max_abs_err(out, _shard(single_out, rank, world)),
                    base_out=base_out, base_lse=base_lse,
                    single_out=max_abs_err(single_out, oracle_out),
                ))
    return rows


@pytest.mark.parametrize("world", [2, 4, 8])
def test_sp_attention_over_nccl_matches_one_gpu(world):
    if GPUS < world:
        pytest.skip(f"needs {world} GPUs, found {GPUS}")
    assert factorisations(world, heads=H)
    results = run_distributed(_nccl_cases, world, timeout=600, collective_timeout=120, backend="nccl")
    for rank, rows in enumerate(results):
        for row in rows:
            where = f"rank {rank}, {row['name']}"
            print(f"{where}: out err {row['out']:.2e} (torch bf16 {row['base_out']:.2e}, one GPU {row['single_out']:.2e}), "
                  f"lse err {row['lse']:.2e} (one GPU {row['base_lse']:.2e}), max |parallel - one GPU| {row['vs_single']:.2e}")
            assert not row["nan"], where
            assert row["single_out"] <= 2 * row["base_out"] + 1e-5, f"{where}: one-GPU kernel outside the 2x rule"
            assert row["out"] <= 2 * row["base_out"] + 1e-5, f"{where}: out error {row['out']:.2e} > 2 x {row['base_out']:.2e}"
            assert row["lse"] <= 2 * row["base_lse"] + 1e-4, f"{where}: lse error {row['lse']:.2e} > 2 x {row['base_lse']:.2e}"
