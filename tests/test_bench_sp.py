"""CPU checks of benchmarks/bench_sp.py --emulate: local problems keyed by content (identical work,
one time), interleaved timing, and the quick run's CSV columns the lead's GPU run relies on."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

from dbsp import SparseMask
from dbsp.video import make_workload

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sp  # noqa: E402


def _workload():
    return make_workload("cpu-tiny", layer=0, seed=0, device=torch.device("cpu"), dtype=torch.float32)


def test_identical_problems_share_one_entry_and_one_time():
    w = _workload()
    B, S, H, _ = w.q.shape
    full = SparseMask.full(B, 2, 160, 160, q_block=16, kv_tile=16)
    toks = torch.arange(160)
    ps = bench_sp.ProblemSet(w, repeats=3, warmup=False)
    a = ps.add(torch.tensor([0, 1]), toks, toks, full, True)
    b = ps.add(torch.tensor([2, 3]), toks + 160, toks, full, True)  # other heads and tokens, same work
    c = ps.add(torch.tensor([0, 1]), toks, toks, full, False)  # no lse: another problem
    dense = torch.ones(B, 2, 10, 10, dtype=torch.bool)
    dense[0, 1, 3, 4] = False  # one tile fewer: another problem, though offsets' shape and size agree
    d = ps.add(torch.tensor([0, 1]), toks, toks, SparseMask.from_dense(dense, q_block=16, kv_tile=16, seq_len_q=160,
                                                                       seq_len_kv=160), True)
    dense2 = torch.ones_like(dense)
    dense2[0, 1, 3, 5] = False  # same row counts as d (same offsets), other tile: compared index by index
    e = ps.add(torch.tensor([0, 1]), toks, toks, SparseMask.from_dense(dense2, q_block=16, kv_tile=16, seq_len_q=160,
                                                                        seq_len_kv=160), True)
    assert a == b and len({a, c, d, e}) == 4 and len(ps) == 4
    ps.time()
    assert all(ms is not None and ms > 0 for ms in ps.ms)
    assert all(x >= 0 for x in ps.spread)
    assert "3 interleaved rounds" in ps.spread_summary()


def test_rounds_call_every_problem_once_in_a_fresh_order():
    """ProblemSet.time: each round calls every problem exactly once, and the order changes from
    round to round, so no problem keeps one neighbour (an alternating order gives each problem at
    most 2 distinct predecessors; 6 shuffled rounds of 8 give every problem at least 3 here)."""
    w = _workload()
    toks = torch.arange(160)
    ps = bench_sp.ProblemSet(w, repeats=6, warmup=False, seed=1)
    for h in range(8):
        tiles = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
        tiles[..., : h + 1] = True  # 8 distinct problems
        ps.add(torch.tensor([0]), toks, toks, SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=160,
                                                                       seq_len_kv=160), False)
    calls = []
    ps._once = lambda p, timed: calls.append(p) or float(p + 1)  # noqa: E731
    ps.time()
    rounds = [calls[8 * r: 8 * (r + 1)] for r in range(6)]
    assert len(calls) == 48 and all(sorted(r) == list(range(8)) for r in rounds)
    before = {p: {r[r.index(p) - 1] for r in rounds if r.index(p) > 0} for p in range(8)}
    assert all(len(b) >= 3 for b in before.values()), before
    assert ps.samples == [[p + 1.0] * 6 for p in range(8)] and ps.ms == [p + 1.0 for p in range(8)]


def test_rho_interval_by_hand():
    """bench_sp.rho_interval on U1R2 with steps (0, 1) on ring rank 0 and (2, empty) on rank 1,
    timed in 2 rounds: a draw resamples 2 rounds, so (0, 0), (1, 1) and, half of the time, one of
    each (the median of 2 is their mean). Round 0 times (1, 2, 3): ranks 3 and 3, steps' maxima
    3 + 2, rho 5 / 3. Round 1 (2, 2, 1): ranks 4 and 1, maxima 2 + 2, rho 4 / 2.5. Their mean
    (1.5, 2, 2): ranks 3.5 and 2, maxima 2 + 2, rho 4 / 2.75, lower than both rounds. So the 90%
    interval is (4 / 2.75, 5 / 3); rounds that agree give one value, rho_measured's."""
    ids = torch.tensor([[[0, 1], [2, -1]]])
    ps = bench_sp.ProblemSet(_workload(), repeats=2, warmup=False)
    ps.samples = [[1.0, 2.0], [2.0, 2.0], [3.0, 1.0]]
    lo, hi = bench_sp.rho_interval(ids, ps, draws=2000)
    assert lo == pytest.approx(4 / 2.75) and hi == pytest.approx(5 / 3)
    ps.samples = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]
    ps.ms, ps.live = [1.0, 2.0, 3.0], [1, 1, 1]
    steps, _ = bench_sp.step_times(ids, ps)
    em = bench_sp.Emulated(bench_sp.Config("ring", "ring", 1, 2), steps, 0.0, 0.0, 0.0, 0.0, 0)
    assert bench_sp.rho_interval(ids, ps) == pytest.approx((em.rho_measured, em.rho_measured)) == (5 / 3, 5 / 3)


def test_ranks_with_identical_work_measure_as_balanced():
    """A full mask on U4R2 (cpu-tiny: 4 heads, 20 blocks): every rank has one head and 10 x 10
    blocks at every step, so all problems are one and rho_s measured is exactly 1."""
    w = _workload()
    B, S, H, _ = w.q.shape
    mask = SparseMask.full(B, H, S, S, q_block=16, kv_tile=16)
    cfg = bench_sp.Config("usp U4R2", "usp", 4, 2)
    ps = bench_sp.ProblemSet(w, repeats=2, warmup=False)
    ids, _, layouts = bench_sp.collect(cfg, w, mask, ps)
    # Two problems: every rank's first step, and its second, which also merges.
    assert (ids[..., 0] == ids[0, 0, 0]).all() and (ids[..., 1] == ids[0, 0, 1]).all() and len(ps) == 2
    assert [spec[5] for spec in ps._specs] == [False, True]
    ps.time()
    steps, rows = bench_sp.step_times(ids, ps)
    em = bench_sp.model_comm(cfg, steps, layouts, w, mask, latency_ms=0.0, a2a_bytes_s=1e12, p2p_bytes_s=1e12)
    assert em.rho_measured == 1.0 and em.max_over_mean == 1.0
    assert (rows == rows[0, 0, 0]).all() and rows[0, 0, 0] == B * 1 * 10


def test_a_ring_step_merges_after_the_ranks_first_step_with_work():
    """U1R2 on cpu-tiny (20 blocks, 10 a rank): rank 0's queries select only rank 1's keys, so its
    step 0 is empty and its step 1 is its first with work (no merge); rank 1 works at both steps and
    merges at step 1. The timed call of a merging step leaves the running buffer changed."""
    w = _workload()
    B, S, H, _ = w.q.shape
    tiles = torch.zeros(B, H, 20, 20, dtype=torch.bool)
    tiles[:, :, :10, 10:] = True  # rank 0's queries: rank 1's keys only
    tiles[:, :, 10:, :] = True  # rank 1's queries: every key
    mask = SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=S, seq_len_kv=S)
    ps = bench_sp.ProblemSet(w, repeats=1, warmup=False)
    ids, _, _ = bench_sp.collect(bench_sp.Config("ring U1R2", "ring", 1, 2), w, mask, ps)
    assert ids[0, 0, 0] == -1 and ids[0, 0, 1] >= 0 and (ids[0, 1] >= 0).all()
    merges = {(i, t): ps._specs[int(ids[0, i, t])][5] for i, t in ((0, 1), (1, 0), (1, 1))}
    assert merges == {(0, 1): False, (1, 0): False, (1, 1): True}
    ps.time()
    (out, lse), = ps._running.values()
    assert not bool((out == 0).all()) and bool(torch.isfinite(lse).all())
    with pytest.raises(ValueError, match="merge=True needs lse=True"):
        ps.add(torch.tensor([0]), torch.arange(16), torch.arange(16), SparseMask.full(B, 1, 16, 16, q_block=16, kv_tile=16),
               False, merge=True)


def test_quick_emulation_run_writes_the_rho_columns(tmp_path, capsys):
    assert bench_sp.main(["--emulate", "8", "--quick", "--out", str(tmp_path)]) == 0
    log = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "sp.csv").open()))
    assert {"rho_planned", "rho_model", "rho_measured", "rho_measured_lo", "rho_measured_hi"} <= set(rows[0])
    assert all(float(r["rho_measured_lo"]) <= float(r["rho_measured_hi"]) for r in rows)
    full = [r for r in rows if r["workload"] == "full" and r["U"] == "4"]
    assert full and all(float(r["rho_measured"]) == 1.0 for r in full)
    problems = list(csv.DictReader((tmp_path / "sp_problems.csv").open()))
    assert problems and "spread" in problems[0]
    assert all(r["dense_consecutive"] in ("0", "1") for r in problems)
    assert {r["merge"] for r in problems} == {"0", "1"} and all(r["lse"] == "1" for r in problems if r["merge"] == "1")
    assert all(0.0 <= float(r["sparse_contiguity"]) <= 1.0 and float(r["sparse_row_peak"]) >= 0.0 for r in problems)
    assert any(float(r["sparse_row_peak"]) >= 1.0 for r in problems)
    assert "timing spread (relative IQR over 2 interleaved rounds)" in log
    assert log.count("target 2 (measured rho_s within 5% of the planner's predicted-time rho_s)") == len(bench_sp.WORKLOADS)


def test_sparse_shape_features_by_hand():
    """bench_sp.sparse_shape on a hand-made mask: 2 heads, 3 rows of 6 tiles. Rows keep (0, 1, 2),
    (4,), (1, 3) and (0, 1, 2, 3, 4, 5), (), (5,): 13 tiles, 7 of them right after a kept tile
    of their row (2 + 0 + 0 + 5 + 0 + 0); the longest row has 6 tiles against a mean of 13 / 6."""
    keep = [[(0, 1, 2), (4,), (1, 3)], [(0, 1, 2, 3, 4, 5), (), (5,)]]
    tiles = torch.zeros(1, 2, 3, 6, dtype=torch.bool)
    for h, rows in enumerate(keep):
        for i, cols in enumerate(rows):
            tiles[0, h, i, list(cols)] = True
    mask = SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=48, seq_len_kv=96)
    got = bench_sp.sparse_shape(mask)
    assert got == dict(row_peak=round(6 / (13 / 6), 4), contiguity=round(7 / 13, 4))
    empty = SparseMask.from_dense(torch.zeros(1, 1, 3, 6, dtype=torch.bool), q_block=16, kv_tile=16, seq_len_q=48,
                                  seq_len_kv=96)
    assert bench_sp.sparse_shape(empty) == dict(row_peak=0.0, contiguity=0.0)


def test_problem_rows_say_whether_dense_heads_are_consecutive():
    """sp_problems.csv's dense_consecutive: 1 when a call's dense heads form one run (SDPA reads them
    as a view), 0 when they are apart (gathered), 1 without dense heads."""
    w = _workload()
    B = w.q.shape[0]
    toks = torch.arange(160)
    ps = bench_sp.ProblemSet(w, repeats=1, warmup=False, features=[])
    for dense_heads, want in (((0, 2), 0), ((1, 2), 1), ((), 1)):
        tiles = torch.zeros(B, 3, 10, 10, dtype=torch.bool)
        tiles[..., 0] = True  # every row selects a tile
        tiles[:, list(dense_heads)] = True
        sub = SparseMask.from_dense(tiles, q_block=16, kv_tile=16, seq_len_q=160, seq_len_kv=160)
        p = ps.add(torch.tensor([0, 1, 2]), toks, toks, sub, False)
        ps.time()
        row = ps._feature(p)
        assert row["dense_heads"] == len(dense_heads) and row["dense_consecutive"] == want


def test_calibration_recovers_the_mixed_call_terms():
    """calibrate_cost_model.fit_problems on problems timed by a known model (with noise-free
    times) returns that model's overheads, rates, factors and merge speed, with and without dense
    SDPA's waves of query tiles; rows without dense_consecutive fit no gather term, rows without
    merge no merge speed."""
    import calibrate_cost_model as cal

    approx = lambda x: pytest.approx(x, rel=1e-6, abs=1e-6)  # noqa: E731
    a, m, gth, r_s, r_d, u, D = 30e-3, 50e-3, 400e-3, 400.0, 600.0, 0.1, 128  # ms, ms, ms, TFLOPS, TFLOPS
    merge_gbps = 1500.0
    sms = 132

    def problems(waves: bool) -> list[dict]:
        g = torch.Generator().manual_seed(3)
        rows = []
        for i in range(60):
            heads, batch = 5, 1 + i % 2
            q = (9472, 18944, 9344)[i % 3]  # 74, 148 and 73 query tiles of 128
            nd = int(torch.randint(0, heads + 1, (1,), generator=g))
            kv = 9472 if i % 4 else 9408
            dense = batch * nd * q * kv
            n = batch * nd * math.ceil(q / 128)  # dense query tiles: ceil(n / 132) waves of 132
            slow = math.ceil(n / sms) * sms / n if waves and n else 1.0
            sparse = int(torch.randint(10**8, 10**9, (1,), generator=g)) * (heads - nd) // heads
            mixed = 0 < nd < heads
            apart = mixed and i % 2 == 0
            merge = i % 5 < 2
            merge_bytes = 4 * batch * q * heads * (3 * D + 3)
            ms = (a + (m if mixed else 0) + (gth if apart else 0) + 4 * D * sparse / (r_s * 1e9)
                  + 4 * D * dense * slow * (1 + u * (kv % 128 != 0)) / (r_d * 1e9) + merge * merge_bytes / (merge_gbps * 1e6))
            rows.append(dict(batch=str(batch), heads=str(heads), q_tokens=str(q), kv_tokens=str(kv), q_block="64",
                             kv_tile="64", entries=str(sparse + dense), dense_entries=str(dense), dense_heads=str(nd),
                             dense_consecutive=str(int(not apart)), merge=str(int(merge)), ms=str(ms)))
        return rows

    for rows, given in ((problems(False), None), (problems(True), sms)):
        a_us, m_us, g_us, rs, rd, unaligned, gbps, _ = cal.fit_problems(rows, D, given)
        assert (a_us, m_us, g_us) == (approx(30.0), approx(50.0), approx(400.0))
        assert (rs, rd, unaligned, gbps) == (approx(400.0), approx(600.0), approx(1.1), approx(merge_gbps))
    old = [{k: v for k, v in r.items() if k != "dense_consecutive"} for r in rows]
    assert cal.fit_problems(old, D, sms)[2] == 0.0
    unmerged = [{k: v for k, v in r.items() if k != "merge"} for r in rows if r["merge"] == "0"]
    assert cal.fit_problems(unmerged, D, sms)[6] is None and cal.fit_problems(unmerged, D, sms)[3] == approx(400.0)
    # Waves the fit does not know of: the model no longer fits exactly.
    assert cal.fit_problems(rows, D)[4] != approx(600.0)


def test_plan_only_prints_predictions_and_times_nothing(tmp_path, capsys):
    """--plan-only: every configuration's predicted time, dbsp-auto included, and no CSV."""
    assert bench_sp.main(["--emulate", "8", "--quick", "--plan-only", "--workloads", "skewed", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = [x.split() for x in out.splitlines() if x.startswith("    ")]
    names = [x[0] + " " + x[1] for x in lines]
    assert any(n.startswith("dbsp-auto") for n in names) and any(n.startswith("ring U1R8") for n in names)
    assert all(float(x[-1]) > 0 for x in lines)
    assert not list(tmp_path.iterdir())


def test_rescore_rebuilds_the_runs_predictions_exactly(tmp_path, capsys):
    """benchmarks/rescore_sp.py on a quick CPU run: the configurations it rebuilds predict the
    run's rho_model exactly (to sp.csv's 4 decimals) with the run's calibration, not with another
    (a per-call overhead of 500 us), which it reports beside it (both lines per workload)."""
    import json

    import rescore_sp
    from importlib import resources

    assert bench_sp.main(["--emulate", "8", "--quick", "--out", str(tmp_path)]) == 0
    shipped = json.loads(resources.files("dbsp").joinpath("cost_model.json").read_text())
    (tmp_path / "used.json").write_text(json.dumps(shipped))
    (tmp_path / "other.json").write_text(json.dumps({**shipped, "call_overhead_us": 500.0}))
    capsys.readouterr()
    check = rescore_sp.main(["--run", str(tmp_path), "--planned-with", str(tmp_path / "used.json"),
                             "--cost-model", str(tmp_path / "other.json"), "--quick"])
    log = capsys.readouterr().out
    assert check <= 5e-5 + 1e-12  # sp.csv rounds rho_model to 4 decimals
    assert log.count("target 2 with the run's calibration") == log.count("target 2 with the other calibration") == 4
    # Rebuilt with a calibration the run did not use, the predictions no longer match.
    wrong = rescore_sp.main(["--run", str(tmp_path), "--planned-with", str(tmp_path / "other.json"), "--quick"])
    assert wrong > 5e-5 + 1e-12
