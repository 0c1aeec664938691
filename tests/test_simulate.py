"""The simulator: synthetic workloads, the strategies it compares, and the ``simulate`` command."""

import argparse
import csv
import math

import pytest
import torch

from dbsp import SparseMask
from dbsp import simulate as sim
from dbsp.plan import CostModel, Plan, make_plan


def test_synthetic_tiles_are_deterministic_skewed_and_drift_slowly():
    kw = dict(heads=40, seq_len=6000, q_block=64, frames=7)
    a = sim.synthetic_tiles(seed=1, **kw)
    assert a.shape == (1, 40, 94, 94) and a.dtype == torch.bool
    assert torch.equal(a, sim.synthetic_tiles(seed=1, **kw))
    assert not torch.equal(a, sim.synthetic_tiles(seed=2, **kw))
    assert bool(torch.diagonal(a[0], dim1=1, dim2=2).all())  # every query block sees itself
    density = a[0].float().mean((1, 2))
    assert float(density.min()) < 0.1 and float(density.max()) > 0.5  # heads differ a lot
    later = sim.synthetic_tiles(seed=1, step=1, **kw)
    changed = float((later != a).float().mean())
    assert 0 < changed < 0.02  # a few tiles per step
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        sim.synthetic_tiles(seed=0, kinds=("local",), **kw)
    with pytest.raises(ValueError, match="step must be >= 0"):
        sim.synthetic_tiles(seed=0, step=-1, **kw)


@pytest.mark.parametrize("seq_len", [1000, 1024, 4097])
def test_synthetic_work_equals_the_masks_work(seq_len):
    kw = dict(heads=3, seq_len=seq_len, q_block=64, frames=3, seed=5)
    tiles = sim.synthetic_tiles(**kw)
    mask = SparseMask.from_dense(tiles, q_block=64, kv_tile=64, seq_len_q=seq_len, seq_len_kv=seq_len)
    assert torch.equal(sim.synthetic_work(**kw), mask.work())


def test_parse_gpus():
    assert sim._parse_gpus("8,16,...,1024") == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert sim._parse_gpus("4,12,...,108") == [4, 12, 36, 108]
    assert sim._parse_gpus("8, 24 ,32") == [8, 24, 32]
    for bad in ("8,12,...,64", "8,...,64", "a,b", "0,8", "", "8,16,...,4"):
        with pytest.raises(argparse.ArgumentTypeError, match="--gpus"):
            sim._parse_gpus(bad)


def test_simulate_compares_the_strategies_with_the_cost_model():
    work = sim.synthetic_work(heads=12, seq_len=8000, frames=7, seed=3)
    cm = CostModel.default()
    rows = sim.simulate(work, gpus=[4, 8, 16], q_block=64, seq_len=8000, cost_model=cm)
    assert [(r.gpus, r.strategy) for r in rows] == [(p, s) for p in (4, 8, 16) for s in sim.STRATEGIES]
    by = {(r.gpus, r.strategy): r for r in rows}
    # Ulysses exists only where P divides the 12 heads.
    assert by[4, "ulysses"].time_ms > 0 and math.isnan(by[8, "ulysses"].time_ms) and math.isnan(by[16, "ulysses"].time_ms)
    for p in (4, 8, 16):
        ring = Plan.identity(ulysses=1, ring=p, heads=12, q_block=64, seq_len=8000).with_tile_work(work)
        assert by[p, "ring"].time_ms == pytest.approx(cm.predict(ring).total_ms)
        assert by[p, "ring"].imbalance == pytest.approx(ring.imbalance())
        usp, dbsp = by[p, "usp"], by[p, "dbsp"]
        assert usp.time_ms <= by[p, "ring"].time_ms + 1e-9
        assert not by[p, "ulysses"].time_ms < usp.time_ms  # NaN or at least USP's time
        assert dbsp.time_ms <= usp.time_ms + 1e-9  # dbsp's candidates include USP's layouts
        assert dbsp.ulysses * dbsp.ring == p and 12 % dbsp.ulysses == 0
    # The dbsp row is the plan the planner would make for its degrees, when blocks moved.
    d = by[8, "dbsp"]
    if d.moved_blocks:
        planned = make_plan(work, ulysses=d.ulysses, ring=d.ring, q_block=64, seq_len=8000)
        assert d.imbalance == pytest.approx(planned.imbalance())
    table = sim.format_table(rows)
    assert "n/a" in table and table.splitlines()[0].startswith(" GPUs |")


def test_simulate_command_writes_csv_and_png(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sim.add_cli_arguments(parser)
    args = parser.parse_args(["--workload", "wan1.3b-480p", "--gpus", "4,8", "--out", str(tmp_path)])
    assert sim.run_cli(args) == 0
    out = capsys.readouterr().out
    assert "workload wan1.3b-480p: H=12, S=32760, 512 blocks of 64" in out and "dbsp vs USP" in out
    with open(tmp_path / "simulate.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {r["strategy"] for r in rows} == set(sim.STRATEGIES)
    assert all(r["workload"] == "wan1.3b-480p" for r in rows)
    png = (tmp_path / "simulate.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with pytest.raises(ValueError, match="unknown workload"):
        sim.workload_work("wan99b")
