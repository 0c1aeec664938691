"""``python -m dbsp plan``: the per-rank cost table of one mask before and after db-SP balancing."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .mask import SparseMask
from .plan import DEFAULT_REWARD, CostModel, Plan, make_plan
from .plan.core import _as_work, _dense_heads_of, _tile_work

_MASK_FIELDS = ("offsets", "indices", "q_block", "kv_tile", "seq_len_q", "seq_len_kv")


def load_mask_or_work(path: Path) -> SparseMask | torch.Tensor:
    """Read a ``torch.save`` file holding a work tensor ``(B, H, NB, NB)`` or a dict of the
    SparseMask fields (offsets, indices, q_block, kv_tile, seq_len_q, seq_len_kv). Loaded with
    ``weights_only=True``: no code runs."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict) and set(_MASK_FIELDS) <= set(obj):
        return SparseMask(*(obj[f] for f in _MASK_FIELDS))
    raise ValueError(
        f"{path}: expected a work tensor (B, H, NB, NB) or a dict with the SparseMask fields {list(_MASK_FIELDS)}; "
        f"got {type(obj).__name__}{' with keys ' + str(sorted(obj)) if isinstance(obj, dict) else ''}"
    )


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m dbsp plan`` to ``parser``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--mask", type=Path, help="torch.save file: a work tensor or a dict of SparseMask fields")
    src.add_argument("--workload", help="a synthetic workload of dbsp.simulate instead, e.g. wan14b-720p")
    parser.add_argument("--ulysses", type=int, required=True, help="Ulysses degree U")
    parser.add_argument("--ring", type=int, required=True, help="ring degree R")
    parser.add_argument("--reward", type=float, default=DEFAULT_REWARD, help="R_b. Default: 2.0")
    parser.add_argument("--q-block", type=int, default=None, help="tokens per block (work tensors only)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (work tensors only)")
    parser.add_argument("--uneven-heads", action="store_true", help="allow heads %% ulysses != 0")
    parser.add_argument("--seed", type=int, default=0, help="--workload seed. Default: 0")
    parser.add_argument("--step", type=int, default=0, help="--workload denoising step. Default: 0")
    parser.add_argument("--head-dim", type=int, default=128, help="for predicted times. Default: 128")
    parser.add_argument("--cost-model", type=Path, default=None, help="calibration JSON. Default: dbsp/cost_model.json")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m dbsp plan`` with parsed ``args``; returns the exit status."""
    if args.mask is not None:
        source = load_mask_or_work(args.mask)
        w = _as_work(source, q_block=args.q_block, seq_len=args.seq_len)
        print(f"{args.mask}: {source if isinstance(source, SparseMask) else f'work tensor {tuple(source.shape)}'}")
    else:
        from .simulate import workload_work

        wl, work = workload_work(args.workload, seed=args.seed, step=args.step)
        w = _as_work(work, q_block=wl.q_block, seq_len=wl.seq_len)
        print(f"synthetic {wl.name} (seed {args.seed}, step {args.step}): work tensor {tuple(work.shape)}")
    cost_model = CostModel.default() if args.cost_model is None else CostModel.from_json(args.cost_model)
    base = Plan.identity(ulysses=args.ulysses, ring=args.ring, heads=w.heads, q_block=w.q_block, seq_len=w.seq_len) \
        if w.heads % args.ulysses == 0 else None
    t0 = time.perf_counter()
    plan = make_plan(w, ulysses=args.ulysses, ring=args.ring, reward=args.reward, uneven_heads=args.uneven_heads)
    elapsed = time.perf_counter() - t0
    kv_tile = w.kv_tile if w.kv_tile is not None else w.q_block
    shown = []
    if base is not None:
        base = Plan(**base._layout(), tile_work=torch.from_numpy(_tile_work(w, base)), _checked=False)
        shown.append(("before (contiguous heads and blocks)", base))
    shown.append((f"after (db-SP, R_b = {args.reward:g})", plan))
    full = _dense_heads_of(w) if cost_model.dense_tflops is not None else None
    for title, p in shown:
        pred = cost_model.predict(p, head_dim=args.head_dim, batch=w.batch, kv_tile=kv_tile, dense_heads=full)
        print(f"\n{title}: rho_s = {p.imbalance():.4f}, predicted {pred.total_ms:.2f} ms "
              f"(all-to-all {pred.all_to_all_ms:.2f}, block exchange {pred.exchange_ms:.2f}, ring {pred.ring_ms:.2f})")
        print(p.table())
    print(f"\n{plan!r}")
    print(f"planned in {1e3 * elapsed:.1f} ms on CPU (both passes over the work included)")
    return 0
