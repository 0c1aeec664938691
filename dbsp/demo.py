"""``python -m dbsp demo``: a Wan-style video transformer denoising synthetic latents, dense and with dbsp.

The demo builds a diffusers ``WanTransformer3DModel`` with random weights (a tiny config by
default, the real Wan2.1 configs with ``--model``), runs a few flow-matching Euler steps on random
latents twice from the same start, once unmodified (dense attention) and once with
``dbsp.integrations.diffusers.apply`` (predicted or fixed sparse masks; with ``--procs P``
sequence-parallel over ``P`` processes), and prints per step: time, mask density per layer,
rho_s before/after balancing (several processes) and the relative error of the latents against
the dense run. It writes PNGs to ``--out``: per-head mask heatmaps, density per layer and step,
and the per-rank load before/after balancing (several processes).

What the numbers mean. The weights are random, so attention has no learned structure: a mask
predicted from q and k has nothing real to find and drops real attention mass. The error column
therefore shows what sparsity costs on a structureless model, not on a trained one. Speed needs
a GPU: on CPU, dbsp's attention is the exact reference implementation (no fast kernel).

Also used by ``benchmarks/bench_e2e.py``: :data:`WAN_CONFIGS`, :func:`build_wan`, :func:`wan_inputs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import math
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._checks import check_positive_int
from ._procs import join_or_kill


@dataclass(frozen=True)
class WanConfig:
    """A Wan2.1-style transformer and its latent-token grid (after the 1 x 2 x 2 patchify).

    Attributes:
        name: preset name.
        heads, head_dim, layers, ffn_dim: the transformer (model width = heads * head_dim).
        text_dim, text_tokens: the text embeddings fed to cross-attention.
        frames, height, width: latent tokens per axis; the latents are
            ``(1, 16, frames, 2 * height, 2 * width)``.
    """

    name: str
    heads: int
    head_dim: int
    layers: int
    ffn_dim: int
    text_dim: int
    text_tokens: int
    frames: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for name in ("heads", "head_dim", "layers", "ffn_dim", "text_dim", "text_tokens", "frames", "height", "width"):
            check_positive_int(name, getattr(self, name))

    @property
    def tokens(self) -> int:
        """Video tokens: frames x height x width."""
        return self.frames * self.height * self.width

    def describe(self) -> str:
        """One line naming the config's sizes."""
        return (
            f"{self.name}: {self.layers} blocks, {self.heads} heads x {self.head_dim}, ffn {self.ffn_dim}, "
            f"{self.frames}x{self.height}x{self.width} = {self.tokens} video tokens, {self.text_tokens} text tokens"
        )


# Wan2.1 configs from the released models' config.json (dim = heads * 128); grids are 480p
# (832 x 480, 81 frames) for 1.3B and 720p (1280 x 720, 81 frames) for 14B.
WAN_CONFIGS = {
    "tiny": WanConfig("tiny", heads=4, head_dim=64, layers=4, ffn_dim=512, text_dim=64, text_tokens=32,
                      frames=5, height=16, width=16),
    "wan2.1-1.3b": WanConfig("wan2.1-1.3b", heads=12, head_dim=128, layers=30, ffn_dim=8960, text_dim=4096,
                             text_tokens=512, frames=21, height=30, width=52),
    "wan2.1-14b": WanConfig("wan2.1-14b", heads=40, head_dim=128, layers=40, ffn_dim=13824, text_dim=4096,
                            text_tokens=512, frames=21, height=45, width=80),
}


def build_wan(config: WanConfig, *, device: torch.device | str, dtype: torch.dtype, seed: int = 0, layers: int | None = None):
    """A ``WanTransformer3DModel`` of ``config`` with random weights, in eval mode
    (:func:`dbsp.integrations.diffusers.random_wan_transformer`).

    Args:
        config: a :class:`WanConfig`.
        device, dtype: where and how to hold the weights.
        seed: Default: 0.
        layers: build only this many blocks (e.g. to time a few blocks of the 14B model).
            Default: ``config.layers``.
    """
    from .integrations.diffusers import random_wan_transformer

    return random_wan_transformer(
        heads=config.heads, head_dim=config.head_dim, layers=config.layers if layers is None else layers,
        ffn_dim=config.ffn_dim, text_dim=config.text_dim, device=device, dtype=dtype, seed=seed,
    )


def wan_inputs(config: WanConfig, *, device, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(latents (1, 16, F, 2H, 2W), text (1, text_tokens, text_dim))`` for ``config``."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    latents = torch.randn(1, 16, config.frames, 2 * config.height, 2 * config.width, generator=gen)
    text = torch.randn(1, config.text_tokens, config.text_dim, generator=gen)
    return latents.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """One denoising run: latents after each step, seconds per step, dbsp's records and masks."""

    latents: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    records: list = field(default_factory=list)
    coverage: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, Mq, Mk) of the last step

    def to_numpy(self) -> dict:
        """The result as numpy arrays and plain values (what the demo saves between runs)."""
        return {"latents": [x.numpy() for x in self.latents], "seconds": self.seconds, "records": self.records,
                "coverage": {k: v.numpy() for k, v in self.coverage.items()}}

    @classmethod
    def from_numpy(cls, data: dict) -> "RunResult":
        """The inverse of :meth:`to_numpy`."""
        return cls([torch.from_numpy(x) for x in data["latents"]], data["seconds"], data["records"],
                   {k: torch.from_numpy(v) for k, v in data["coverage"].items()})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _denoise(model, config: WanConfig, args, device: torch.device, dtype: torch.dtype, *, progress: str | None) -> RunResult:
    """Flow-matching Euler steps ``x <- x + (sigma_next - sigma) * v(x, 1000 sigma)`` from the seeded latents."""
    latents, text = wan_inputs(config, device=device, dtype=dtype, seed=args.seed)
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1).tolist()
    result = RunResult()
    steps = range(args.steps)
    if progress is not None:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=progress, unit="step", leave=False)
    x = latents
    with torch.no_grad():
        for i in steps:
            t = torch.tensor([1000.0 * sigmas[i]], device=device)
            _sync(device)
            start = time.perf_counter()
            v = model(x, t, text, return_dict=False)[0]
            x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(dtype)
            _sync(device)
            result.seconds.append(time.perf_counter() - start)
            result.latents.append(x.float().cpu())
    return result


def _policy(args):
    from .integrations.diffusers import FixedDensity
    from .predict import MaskPredictor

    if args.masks == "fixed":
        return FixedDensity(args.density, q_block=args.q_block, kv_tile=args.kv_tile, per_layer=True, seed=args.seed)
    tiles = -(-_config(args).tokens // args.kv_tile)
    max_keep = None if args.max_density >= 1.0 else max(1, math.ceil(args.max_density * tiles))
    return MaskPredictor(q_block=args.q_block, kv_tile=args.kv_tile, top_p=args.top_p, max_keep=max_keep)


def _coverage(mask) -> torch.Tensor:
    """``(H, Mq, Mk)``: fraction of each q_block x q_block block of batch 0 that the mask computes."""

    def sizes(n: int, count: int) -> torch.Tensor:  # tokens per block; the last block may be partial
        out = torch.full((count,), float(mask.q_block), dtype=torch.float64)
        out[-1] = n - (count - 1) * mask.q_block
        return out

    area = sizes(mask.seq_len_q, mask.num_q_blocks)[:, None] * sizes(mask.seq_len_kv, mask.num_kv_blocks)[None, :]
    return (mask.work()[0].double().cpu() / area).float()


def _dbsp_run(model, config: WanConfig, args, device, dtype, groups, progress) -> RunResult:
    from .integrations.diffusers import apply, remove

    handle = apply(model, predictor=_policy(args), groups=groups, dense_steps=args.dense_steps, record=True)
    try:
        result = _denoise(model, config, args, device, dtype, progress=progress)
    finally:
        remove(model)
    result.records = list(handle.records)
    last = max(handle.layers)
    for layer in sorted({0, last}):
        mask = handle.masks.get((layer, 0))
        if mask is not None:
            result.coverage[layer] = _coverage(mask)
    return result


def _config(args) -> WanConfig:
    base = WAN_CONFIGS[args.model]
    grid = {k: v for k, v in (("frames", args.frames), ("height", args.height), ("width", args.width)) if v}
    layers = {"layers": args.layers} if args.layers else {}
    return dataclasses.replace(base, **grid, **layers)


# ---------------------------------------------------------------------------------- processes


def _worker(rank: int, world: int, init: str, args, results) -> None:
    import torch.distributed as dist

    from .dist import SPGroups

    try:
        device = torch.device(args.device, rank) if args.device == "cuda" else torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init, rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
        try:
            groups = SPGroups.init(ulysses=args.ulysses, ring=world // args.ulysses)
            config = _config(args)
            model = build_wan(config, device=device, dtype=_dtype(args, device), seed=args.seed)
            result = _dbsp_run(model, config, args, device, _dtype(args, device), groups,
                               progress=f"dbsp, {world} processes" if rank == 0 else None)
            # Plain arrays: tensors sent through a queue need the sender alive when they are read.
            results.put((rank, True, result.to_numpy() if rank == 0 else None))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _spawn(args) -> RunResult:
    """Run the dbsp pass on ``args.procs`` processes; returns rank 0's result. Never hangs:
    a failing or silent rank ends the run with an error after ``args.timeout`` seconds."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_worker, args=(r, args.procs, init, args, results), daemon=True) for r in range(args.procs)]
        for p in procs:
            p.start()
        done: dict[int, tuple[bool, object]] = {}
        deadline = time.monotonic() + args.timeout
        try:
            while len(done) < args.procs:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"demo: ranks {sorted(set(range(args.procs)) - set(done))} did not finish in {args.timeout} s")
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs) if r not in done and not p.is_alive() and p.exitcode]
                    if dead:
                        raise RuntimeError(f"demo: rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                    continue
                done[rank] = (ok, value)
                if not ok:
                    raise RuntimeError(f"demo: rank {rank} failed:\n{value}")
        finally:
            join_or_kill(procs)
    return RunResult.from_numpy(done[0][1])


# ---------------------------------------------------------------------------------- report


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _density_cell(values: list[float]) -> str:
    if len(values) <= 8:
        return " ".join(f"{v:.2f}" for v in values)
    return f"mean {sum(values) / len(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def _table(config: WanConfig, args, dense: RunResult, sparse: RunResult) -> str:
    by_step: dict[int, list] = {}
    for r in sparse.records:
        if r.branch == 0:
            by_step.setdefault(r.step, []).append(r)
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1).tolist()
    header = ["step", "t", "dense s", "dbsp s", f"density per layer ({config.layers} layers)"]
    if args.procs > 1:
        header.append("rho_s before -> after (mean over layers)")
    header.append("rel err vs dense")
    rows = []
    for i in range(args.steps):
        recs = sorted(by_step.get(i, []), key=lambda r: r.layer)
        dense_step = bool(recs) and all(r.dense_step for r in recs)
        row = [str(i), f"{1000 * sigmas[i]:.0f}", f"{dense.seconds[i]:.3f}", f"{sparse.seconds[i]:.3f}",
               "dense step (full attention)" if dense_step else _density_cell([r.density for r in recs])]
        if args.procs > 1:
            if dense_step or not recs:
                row.append("-")
            else:
                before = sum(r.rho_before for r in recs) / len(recs)
                after = sum(r.rho_after for r in recs) / len(recs)
                row.append(f"{before:.3f} -> {after:.3f}")
        row.append(f"{_rel_err(sparse.latents[i], dense.latents[i]):.2e}")
        rows.append(row)
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _plots(out: Path, config: WanConfig, args, sparse: RunResult) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    what = "predicted" if args.masks == "predicted" else f"fixed random (density {args.density})"

    if sparse.coverage:
        layers = sorted(sparse.coverage)
        heads = min(config.heads, 8)
        fig, axes = plt.subplots(len(layers), heads, figsize=(2.2 * heads, 2.4 * len(layers)), squeeze=False)
        for row, layer in enumerate(layers):
            for h in range(heads):
                ax = axes[row][h]
                image = ax.imshow(sparse.coverage[layer][h].numpy(), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
                ax.set_title(f"layer {layer}, head {h}", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.colorbar(image, ax=axes, shrink=0.8, label="computed fraction of the block")
        fig.suptitle(f"{what} {args.q_block}x{args.kv_tile} masks at the last step "
                     f"(query block x key block of {args.q_block} tokens)", fontsize=10)
        path = out / "masks.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    records = [r for r in sparse.records if r.branch == 0]
    if records:
        grid = torch.full((config.layers, args.steps), float("nan"))
        for r in records:
            grid[r.layer, r.step] = r.density
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.5 * args.steps), 2.0 + 0.12 * config.layers))
        image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("layer")
        ax.set_xticks(range(args.steps))
        ax.set_title(f"mask density per layer and step\n({what} masks; 1 = dense)", fontsize=9)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / "density.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    sp = [r for r in records if not r.dense_step and r.rank_work_before is not None]
    if sp:
        last = max(r.step for r in sp)
        # (layers, U, R) -> (R, U) -> global rank order r = i * U + k
        before = torch.tensor([r.rank_work_before for r in sp if r.step == last], dtype=torch.float64).sum(0).T.reshape(-1)
        after = torch.tensor([r.rank_work_after for r in sp if r.step == last], dtype=torch.float64).sum(0).T.reshape(-1)
        U, R = sp[0].ulysses, sp[0].ring
        ranks = torch.arange(before.numel())
        fig, ax = plt.subplots(figsize=(max(5.0, 2 + 0.8 * before.numel()), 3.2))
        ax.bar(ranks.numpy() - 0.2, (before / before.mean()).numpy(), width=0.4, label="before (contiguous)")
        ax.bar(ranks.numpy() + 0.2, (after / after.mean()).numpy(), width=0.4, label="after (db-SP plan)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(ranks.numpy(), [f"r{k}" for k in ranks.tolist()])
        ax.set_ylabel("work / mean over ranks")
        ax.set_ylim(0, 1.2 * float(max((before / before.mean()).max(), (after / after.mean()).max())))
        ax.set_title(f"per-rank attention work at step {last}, summed over layers\n(U={U} x R={R}; "
                     f"rank r = ring index r // U, head group r % U)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "rank_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------- CLI


def _dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``python -m dbsp demo`` to ``parser``."""
    parser.add_argument("--model", choices=sorted(WAN_CONFIGS), default="tiny",
                        help="transformer config, random weights. Default: tiny (runs on CPU in well under 2 minutes)")
    parser.add_argument("--frames", type=int, default=None, help="latent-token grid override (after patchify)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="number of blocks override")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps. Default: 4")
    parser.add_argument("--dense-steps", type=int, default=1, help="first steps with dense attention. Default: 1")
    parser.add_argument("--masks", choices=("predicted", "fixed"), default="predicted",
                        help="predicted: dbsp.predict.MaskPredictor on the model's q and k; fixed: random tiles at "
                             "--density. Default: predicted")
    parser.add_argument("--q-block", type=int, default=64, help="query rows per mask block. Default: 64")
    parser.add_argument("--kv-tile", type=int, default=1, help="keys per mask tile (1 = fine-grained). Default: 1")
    parser.add_argument("--top-p", type=float, default=0.9, help="predictor: attention mass to keep. Default: 0.9")
    parser.add_argument("--max-density", type=float, default=0.3,
                        help="predictor: at most this fraction of key tiles per query block (1 = no cap). Default: 0.3")
    parser.add_argument("--density", type=float, default=0.3, help="--masks fixed: tile density. Default: 0.3")
    parser.add_argument("--procs", type=int, default=1,
                        help="processes for sequence parallelism (gloo on CPU, NCCL with one GPU each). Default: 1")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses degree U (ring = procs / U). Default: 1")
    parser.add_argument("--device", default=None, help="cpu or cuda. Default: cuda where present")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="Default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="dbsp_demo", help="folder for the PNGs. Default: dbsp_demo")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a multi-process run gives up. Default: 600")


def _check_args(args) -> None:
    for name in ("steps", "procs", "ulysses", "q_block", "kv_tile", "timeout"):
        check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("frames", "height", "width", "layers"):
        if getattr(args, name) is not None:
            check_positive_int(f"--{name}", getattr(args, name))
    if args.dense_steps < 0 or args.dense_steps > args.steps:
        raise ValueError(f"--dense-steps must lie in [0, --steps={args.steps}], got {args.dense_steps}")
    if args.procs % args.ulysses:
        raise ValueError(f"--ulysses must divide --procs, got ulysses={args.ulysses}, procs={args.procs}")
    if not 0.0 < args.top_p <= 1.0 or not 0.0 < args.max_density <= 1.0 or not 0.0 < args.density <= 1.0:
        raise ValueError("--top-p, --max-density and --density must lie in (0, 1]")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m dbsp demo`` with parsed ``args``; returns the exit status."""
    missing = [name for name in ("diffusers", "matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the demo needs diffusers, matplotlib and tqdm (missing: {', '.join(missing)}); "
                         "pip install 'dbsp[demo]'")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        _check_args(args)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"python -m dbsp demo: {exc}") from exc
    config = _config(args)
    if config.heads % args.ulysses:
        raise SystemExit(f"python -m dbsp demo: --ulysses {args.ulysses} must divide the {config.heads} heads of {config.name}")
    device = torch.device(args.device)
    if device.type == "cuda" and args.procs > torch.cuda.device_count():
        raise SystemExit(f"--procs {args.procs} needs one GPU per process; {torch.cuda.device_count()} visible")
    dtype = _dtype(args, device)
    ring = args.procs // args.ulysses
    print(f"dbsp demo: Wan-style transformer, random weights ({config.describe()})")
    print(f"  {args.steps} flow-matching Euler steps on random latents, {device.type}, {str(dtype).replace('torch.', '')}; "
          f"first {args.dense_steps} step(s) dense")
    if args.masks == "predicted":
        cap = "" if args.max_density >= 1.0 else f", at most {args.max_density:.0%} of the key tiles per query block"
        print(f"  masks: predicted per layer and step by dbsp.predict.MaskPredictor from the model's own q and k "
              f"({args.q_block}x{args.kv_tile}, top-p {args.top_p}{cap}, diagonal kept, reused while q/k barely change).")
        print("  The weights are random, so attention has no learned structure for the predictor to find: the "
              "masks drop real\n  attention mass, and the error column shows what sparsity costs on a "
              "structureless model, not on a trained one.")
    else:
        print(f"  masks: random {args.q_block}x{args.kv_tile} tiles at density {args.density} (FixedDensity): a "
              "speed setting that carries no information\n  about attention, so the error column is large by construction.")
    if args.procs > 1:
        print(f"  sequence parallel: {args.procs} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
              f"ulysses={args.ulysses} x ring={ring}, db-SP plans (dbsp.plan.PlanCache)")
    if device.type == "cpu":
        print("  On CPU dbsp's attention is the exact reference implementation (no fast kernel): times show "
              "overhead, not speed.")
    else:
        print("  dbsp times include recording the statistics shown (a device sync and a pass over each mask per "
              "layer);\n  benchmarks/bench_e2e.py measures speed without it.")

    model = build_wan(config, device=device, dtype=dtype, seed=args.seed)
    dense = _denoise(model, config, args, device, dtype, progress="dense")
    if args.procs == 1:
        sparse = _dbsp_run(model, config, args, device, dtype, None, progress="dbsp")
    else:
        del model
        sparse = _spawn(args)

    print()
    print(_table(config, args, dense, sparse))
    total_dense, total_sparse = sum(dense.seconds), sum(sparse.seconds)
    ratio = f" ({total_dense / total_sparse:.2f}x)" if device.type == "cuda" else " (CPU times: not a speed comparison)"
    print(f"\ntotal: dense {total_dense:.2f} s, dbsp {total_sparse:.2f} s{ratio}; "
          f"final latents: relative error {_rel_err(sparse.latents[-1], dense.latents[-1]):.2e} vs dense")
    written = _plots(Path(args.out), config, args, sparse)
    print("wrote " + ", ".join(str(p) for p in written))
    if args.procs == 1:
        print("(per-rank load before/after balancing needs several processes: --procs 2)")
    return 0
