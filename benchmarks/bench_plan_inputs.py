"""What planning costs per layer and step when the planner is fed the predicted ``SparseMask``
itself or a ``WorkSummary`` built from it where it lives (what the diffusers integration passes).

    python benchmarks/bench_plan_inputs.py [--device cuda]

For Wan2.1-1.3B 480p and Wan2.1-14B 720p shapes: predict 64x64 masks of three denoising steps
of one layer on the synthetic workload, then time (wall, the device synchronised) ``mask.work()``,
``summarize_work(mask, ring=world)`` and ``PlanCache.get`` with a first plan (a miss on a new
cache) and a reuse check (a hit), from the mask and from its summary, for fixed degrees and for
the degree choice (``world=``). Minimum of 5 runs each.
"""
import argparse
import time

import torch

from dbsp.plan import PlanCache, summarize_work
from dbsp.predict import predict_mask
from dbsp.video import make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, n=5):
        out = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(1e3 * (time.perf_counter() - t0))
        return min(out)

    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    for shape, world, requests in (("wan1.3b-480p", 2, (dict(ulysses=2, ring=1), dict(ulysses=1, ring=2), dict(world=2))),
                                   ("wan14b-720p", 8, (dict(ulysses=8, ring=1), dict(ulysses=2, ring=4), dict(world=8)))):
        masks = []
        for step in (0, 10):
            w = make_workload(shape, layer=3, step=step, device=device, dtype=dtype)
            masks.append(predict_mask(w.q, w.k, q_block=64, kv_tile=64, top_p=0.9))
            del w
        m = masks[0]
        print(f"\n{shape}: {m.heads} heads, {m.num_q_blocks} blocks of 64, density {m.density():.3f}, world {world}")
        print(f"  mask.work(): {timed(lambda: m.work()):.2f} ms   summarize_work(mask, ring={world}): "
              f"{timed(lambda: summarize_work(m, ring=world)):.2f} ms")
        summaries = [summarize_work(x, ring=world) for x in masks]
        for kw in requests:
            row = []
            for name, inputs in (("mask", masks), ("summary", summaries)):
                first = timed(lambda: PlanCache().get(0, inputs[1], **kw), n=3)
                cache = PlanCache()
                cache.get(0, inputs[0], **kw)
                check = timed(lambda: cache.get(0, inputs[0], **kw))
                row.append(f"{name}: first plan {first:8.2f} ms, check {check:7.2f} ms")
            print(f"  {str(kw):28s} " + " | ".join(row))
        del masks, summaries


if __name__ == "__main__":
    main()
