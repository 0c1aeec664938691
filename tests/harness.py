"""Shared test helpers: multi-process runs on gloo, the low-precision tolerance rule, oracles."""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dbsp._procs import join_or_kill


# ---------------------------------------------------------------------------- Triton IR for sm_90

_TTIR_PRELUDE = """
import triton
import triton._C.libtriton as lt
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_target = GPUTarget("cuda", 90, 32)
_backend = triton.compiler.make_backend(_target)
_options = _backend.parse_options({})


def make_ir(kernel, types, const):
    \"\"\"Build ``kernel``'s Triton IR for sm_90: arguments named in ``const`` are constexprs, the
    others take ``types`` (default i32).\"\"\"
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in kernel.arg_names}
    ctx = lt.ir.context()
    lt.ir.load_dialects(ctx)
    _backend.load_dialects(ctx)
    ASTSource(kernel, sig, constexprs=const).make_ir(
        _target, _options, _backend.get_codegen_implementation(_options), _backend.get_module_map(), ctx)
"""


def build_for_hopper(script: str) -> str:
    """Run ``script`` (which may call ``make_ir(kernel, types, const)``) in a fresh interpreter
    without TRITON_INTERPRET and return its stdout; fails the test if it exits non-zero.

    The interpreter runs kernels without checking types, so a type error would otherwise first
    surface on a GPU; the compiler front end catches it on the CPU. A fresh interpreter is needed
    because with TRITON_INTERPRET=1 ``@triton.jit`` makes interpreted functions.
    """
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _TTIR_PRELUDE + script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


# ---------------------------------------------------------------------------- distributed


def _worker(fn, rank, world_size, init_method, results, args, collective_timeout, backend):
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report everything, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn, world_size: int, *args, timeout: float = 120.0, collective_timeout: float = 30.0, backend: str = "gloo"
):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; return the results.

    ``backend`` is ``"gloo"`` (CPU, the CI default) or ``"nccl"`` (one GPU per rank: rank r uses
    ``cuda:r``).
    ``fn`` must be a module-level function (it is pickled into spawned processes). A failure on
    any rank raises ``RuntimeError`` quoting every failing rank's traceback. Collectives time out
    after ``collective_timeout`` seconds, so ranks waiting on a dead peer fail too; and the whole
    run is bounded by ``timeout`` seconds, after which live processes are killed and
    ``TimeoutError`` is raised. Nothing can hang forever.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, init_method, results, args, collective_timeout, backend),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        values, errors = {}, {}
        deadline = time.monotonic() + timeout
        try:
            while len(values) + len(errors) < world_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"run_distributed: {world_size - len(values) - len(errors)} of {world_size} ranks "
                        f"did not finish within {timeout:.0f} s; finished: {sorted(values)}, failed: {sorted(errors)}"
                        + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                    )
                try:
                    rank, ok, value = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in values and r not in errors]
                    for r in dead:  # a process that died without reporting (segfault, os._exit)
                        if procs[r].exitcode not in (0, None):
                            errors[r] = f"process exited with code {procs[r].exitcode} without a report"
                    continue
                (values if ok else errors)[rank] = value
        finally:
            join_or_kill(procs)
    if errors:
        raise RuntimeError(
            f"{len(errors)} of {world_size} ranks failed"
            + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        )
    return [values[r] for r in range(world_size)]


# ---------------------------------------------------------------------------- tolerances


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64; equal infinities count as exact."""
    a, e = actual.double(), expected.double()
    same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(same_inf, torch.zeros_like(a), (a - e).abs())
    return float(diff.max()) if diff.numel() else 0.0


def assert_lowp_close(actual, oracle, torch_lowp, *, atol: float = 1e-5, name: str = "out"):
    """The low-precision rule: error vs the fp64 oracle <= 2 x torch's own error + atol.

    ``torch_lowp`` is PyTorch's own SDPA (or other reference op) run at the same low precision
    as ``actual`` on the same inputs.
    """
    assert not torch.isnan(actual).any(), f"{name} has NaN"
    err = max_abs_err(actual, oracle)
    base = max_abs_err(torch_lowp, oracle)
    assert err <= 2.0 * base + atol, f"{name}: max error {err:.3e} > 2 x torch's {base:.3e} + {atol:.0e}"


# ---------------------------------------------------------------------------- oracles


def token_mask(mask) -> torch.Tensor:
    """``(B, H, Sq, Skv)`` bool token-level picture of a SparseMask (small tests only)."""
    t = mask.to_dense()
    t = t.repeat_interleave(mask.q_block, 2)[:, :, : mask.seq_len_q]
    return t.repeat_interleave(mask.kv_tile, 3)[..., : mask.seq_len_kv]


def sdpa_oracle(q, k, v, mask, *, scale=None, dtype=torch.float64):
    """Independent oracle: torch SDPA with the equivalent boolean mask, plus the lse.

    Rows that select no key are defined as out = 0, lse = -inf (SDPA would give NaN there).
    Returns ``(out (B, Sq, H, D), lse (B, H, Sq))`` in ``dtype``.
    """
    tok = token_mask(mask)
    empty = ~tok.any(-1)  # (B, H, Sq)
    qt, kt, vt = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=tok | empty[..., None], scale=scale)
    out = out.masked_fill(empty[..., None], 0.0).transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * (scale if scale is not None else qt.shape[-1] ** -0.5)
    lse = torch.logsumexp(s.masked_fill(~tok, float("-inf")), dim=-1)
    return out, lse


def random_mask(batch, heads, seq_q, seq_kv, *, q_block, kv_tile, density=0.3, empty_rows=True, device="cpu"):
    """A random SparseMask with, optionally, some query blocks that select nothing."""
    from dbsp import SparseMask

    mq, nt = -(-seq_q // q_block), -(-seq_kv // kv_tile)
    dense = torch.rand(batch, heads, mq, nt, device=device) < density
    if empty_rows and mq > 1:
        dense[:, :, 0] = False
    return SparseMask.from_dense(dense, q_block=q_block, kv_tile=kv_tile, seq_len_q=seq_q, seq_len_kv=seq_kv)
