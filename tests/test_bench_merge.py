"""CPU smoke runs of the GPU scripts of the ring's merge: benchmarks/bench_merge.py (small shapes,
the kernel through Triton's interpreter, no timing) and benchmarks/profile_slicing.py."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_merge  # noqa: E402
import profile_slicing  # noqa: E402


def test_bench_merge_checks_and_writes_every_variant(tmp_path, monkeypatch, capsys):
    """Every shape, part-B layout and rows-per-program variant is run, checked against
    merge_attention and written; the ring rank's three variants agree."""
    monkeypatch.setattr(bench_merge, "DEVICE", "cpu")
    monkeypatch.setattr(bench_merge, "LAYOUTS", {"U1R8": (40, 3), "U2R4": (30, 2)})
    monkeypatch.setattr(bench_merge, "RING_RANK", (70, 2, 3))
    monkeypatch.setattr(bench_merge, "do_bench", lambda fn, rep: (fn(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "cpu")
    calls = []
    real = bench_merge.merge.merge_into
    monkeypatch.setattr(bench_merge.merge, "merge_into", lambda *a, **k: calls.append(k["block_rows"]) or real(*a, **k))
    assert bench_merge.main(["--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "merge.csv").open()))
    merges = [r for r in rows if r["what"] == "merge"]
    assert len(merges) == 2 * 2 * (1 + len(bench_merge.SWEEP_ROWS))  # shapes x layouts x (torch + kernels)
    assert {r["variant"] for r in merges} == {"torch"} | {f"kernel r{n}" for n in bench_merge.SWEEP_ROWS}
    swept = set(bench_merge.SWEEP_ROWS) - {bench_merge.merge.BLOCK_ROWS}
    assert set(calls) == swept and len(calls) == 2 * 2 * len(swept)
    ring = [r for r in rows if r["what"].startswith("ring rank")]
    assert [r["variant"] for r in ring] == ["calls only", "calls + torch merges", "calls + kernel merges"]
    assert all(float(r["max_err"]) < 1e-5 for r in rows)
    assert "one U1R8 ring rank, 3 steps" in capsys.readouterr().out


def test_profile_slicing_runs_on_the_cpu(capsys):
    assert profile_slicing.main(["--shape", "cpu-tiny", "--q-block", "16", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert all(f"U{u}R{8 // u}: slicing" in out for u in (1, 2, 4)) and "U8R1" not in out  # cpu-tiny has 4 heads
