"""Mask prediction from sequence shards on 4 gloo processes: the same global mask on every rank,
equal to single-process ``predict_mask``, and usable by ``sp_attention`` with a plan."""

import re

import torch

from dbsp import sparse_attention
from dbsp.predict import predict_mask
from dbsp.dist import SPGroups, sp_attention
from dbsp.dist.layout import shard_sizes
from dbsp.dist.predict import predict_mask_sharded
from dbsp.plan import make_plan
from harness import max_abs_err, run_distributed

CASES = [
    # (name, B, S, H, D, options)
    ("block, pooled keys", 1, 203, 4, 16, dict(q_block=16, kv_tile=16, top_p=0.8, dense_above=None)),
    ("fine 16x1, per-key", 2, 150, 6, 16, dict(q_block=16, kv_tile=1, top_p=0.9, dense_above=None)),
    ("fine 8x2, fewer heads than ranks", 1, 97, 3, 8, dict(q_block=8, kv_tile=2, top_p=0.7, max_keep=5)),
]


def _shard(x, rank, world):
    sizes = shard_sizes(x.shape[1], world)
    lo = sum(sizes[:rank])
    return x[:, lo : lo + sizes[rank]]


def _predict_everywhere(rank, world):
    groups = SPGroups.init(ulysses=2, ring=2)
    results = {}
    for i, (name, B, S, H, D, options) in enumerate(CASES):
        gen = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
        q = 3.0 * q  # sharper scores, so top-p keeps a part of the tiles
        mask = predict_mask_sharded(_shard(q, rank, world), _shard(k, rank, world), groups=groups, **options)
        mask.validate()
        expected = predict_mask(q, k, **options)
        row = {
            "equal": torch.equal(mask.to_dense(), expected.to_dense()) and mask.kv_tile == expected.kv_tile,
            "digest": (mask.offsets.sum().item(), (mask.indices.long() * torch.arange(mask.nnz)).sum().item()),
            "density": mask.density(),
        }
        if H % 2 == 0:  # the predicted mask drives a planned parallel attention
            plan = make_plan(mask, ulysses=2, ring=2)
            out = sp_attention(*(_shard(x, rank, world) for x in (q, k, v)), mask, groups=groups, plan=plan)
            row["attention"] = max_abs_err(out, _shard(sparse_attention(q, k, v, mask), rank, world))
        results[name] = row
    try:
        bad = dict(q_block=16, kv_tile=16, top_p=0.8 if rank == 0 else 0.7)
        predict_mask_sharded(_shard(q, rank, world), _shard(k, rank, world), groups=groups, **bad)
        results["options"] = None
    except ValueError as exc:
        results["options"] = str(exc)
    return results


def test_sharded_prediction_is_global_and_identical_everywhere():
    per_rank = run_distributed(_predict_everywhere, 4, timeout=120)
    for name, *_ in CASES:
        rows = [r[name] for r in per_rank]
        assert all(row["equal"] for row in rows), name
        assert len({row["digest"] for row in rows}) == 1, name
        assert 0.0 < rows[0]["density"] < 1.0, name
        for row in rows:
            if "attention" in row:
                assert row["attention"] <= 2e-5, (name, row["attention"])
    for r in per_rank:
        assert re.search(r"differ across ranks in predict_mask options: rank 0: same as rank 0, rank 1: differs", r["options"])
