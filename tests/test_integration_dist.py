"""dbsp.integrations.diffusers with ``groups`` on 2 gloo processes equals the single-process run.

One spawn runs every case (process start-up and the diffusers import dominate). Each rank builds
the same tiny model and inputs from one seed, applies dbsp with ``groups``, runs one forward and
returns its (full, gathered) output; the test process runs the same case without ``groups`` and
compares. Ulysses (2 x 1), Ring (1 x 2), the planner's own degree choice, no planner, the mask
predictor (sharded prediction), dense steps, and CogVideoX's joint text attention are covered.
"""

import pytest
import torch

pytest.importorskip("diffusers")

from harness import max_abs_err, run_distributed  # noqa: E402
from test_integration import HEADS, S, run, tiny_cogvideox, tiny_wan  # noqa: E402

TOL = 1e-5  # fp32; Ring merges partial results by log-sum-exp, so sums run in another order

# name -> (model, degrees ("all" = the planner picks), policy kind, planner on, dense_steps, layers)
CASES = {
    "wan-ulysses": ("wan", (2, 1), "fine", True, 0, None),
    "wan-ring": ("wan", (1, 2), "fine", True, 0, None),
    "wan-ring-blocks-no-planner": ("wan", (1, 2), "block", False, 0, None),
    "wan-planner-chooses": ("wan", "all", "fine", True, 0, None),
    "wan-predictor": ("wan", (1, 2), "predictor", True, 0, None),
    "wan-dense-step": ("wan", (1, 2), "fine", True, 1, None),
    "wan-one-sparse-layer": ("wan", (1, 2), "fine", True, 0, [1]),
    "cogvideox-ring": ("cogvideox", (1, 2), "fine", True, 0, None),
    "cogvideox-ulysses": ("cogvideox", (2, 1), "block", True, 0, None),
}


def make_policy(kind):
    from dbsp.integrations.diffusers import FixedDensity
    from dbsp.predict import MaskPredictor

    if kind == "predictor":
        return MaskPredictor(q_block=16, kv_tile=1, top_p=0.6, dense_above=None, reuse_threshold=0.0)
    q_block, kv_tile = (16, 1) if kind == "fine" else (16, 16)
    return FixedDensity(0.3, q_block=q_block, kv_tile=kv_tile, per_layer=True)


def run_case(name, groups=None):
    from dbsp.integrations.diffusers import apply, remove
    from dbsp.plan import PlanCache

    model_name, _, kind, planner, dense_steps, layers = CASES[name]
    model, inputs = (tiny_wan if model_name == "wan" else tiny_cogvideox)()
    kwargs = {} if groups is None else {"groups": groups, "planner": PlanCache() if planner else None}
    handle = apply(model, predictor=make_policy(kind), dense_steps=dense_steps, layers=layers, record=True, **kwargs)
    out = run(model, inputs)
    remove(model)
    return out, handle.records


def _worker(rank, world):
    from dbsp.dist import SPGroups

    by_degrees = SPGroups.all_degrees()
    results = {}
    for name, (_, degrees, *_rest) in CASES.items():
        groups = by_degrees if degrees == "all" else by_degrees[degrees]
        out, records = run_case(name, groups)
        results[name] = (out.numpy(), [
            (r.layer, r.ulysses, r.ring, r.dense_step, r.density, r.rho_before, r.rho_after,
             r.rank_work_before, r.rank_work_after)
            for r in records
        ])
    return results


@pytest.fixture(scope="module")
def distributed():
    return run_distributed(_worker, 2, timeout=300)


@pytest.mark.parametrize("name", CASES)
def test_two_process_run_equals_single_process(distributed, name):
    expected, single_records = run_case(name)
    outs = [torch.from_numpy(rank_results[name][0]) for rank_results in distributed]
    assert torch.equal(outs[0], outs[1]), "every rank must return the same gathered output"
    err = max_abs_err(outs[0], expected)
    assert err < TOL, f"{name}: max |2-process - 1-process| = {err:.2e}"

    records = distributed[0][name][1]
    assert records == distributed[1][name][1]
    assert [r[4] for r in records] == [r.density for r in single_records]  # the same masks
    assert [r[0] for r in records] == (CASES[name][5] or [0, 1])
    degrees = CASES[name][1]
    for layer, U, R, dense, density, rho_before, rho_after, before, after in records:
        assert U * R == 2 and (degrees == "all" or (U, R) == degrees)
        assert (density == 1.0) == dense
        assert sum(map(sum, before)) == sum(map(sum, after)) == round(density * HEADS * S * S)
        assert rho_before >= 1.0 and rho_after >= 1.0
        if CASES[name][3] and not dense:  # the plan never makes balance worse
            assert rho_after <= rho_before + 1e-9
        elif not CASES[name][3]:
            assert rho_after == rho_before and before == after


def test_dense_step_equals_unmodified_model(distributed):
    model, inputs = tiny_wan()
    dense = run(model, inputs)
    out = torch.from_numpy(distributed[0]["wan-dense-step"][0])
    assert max_abs_err(out, dense) < TOL
