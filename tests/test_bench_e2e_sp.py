"""CPU smoke test of benchmarks/bench_e2e_sp.py: its --quick mode under torchrun on 2 gloo processes.

Every parallel configuration's output is checked inside the benchmark against a single-process run
of the same model (dense, or dbsp with the same mask); this test asserts those errors, the set of
configurations and the derived columns of the CSV the lead's GPU run relies on.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_e2e_sp.py"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_quick_run_on_two_gloo_processes(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "e2e_sp.png").stat().st_size > 0
    with (out / "e2e_sp.csv").open() as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}

    cases = ("32x32@0.3", "32x1@0.3")
    expected = {"1 GPU dense", "diffusers-cp U2R1", "diffusers-cp U1R2", "dbsp-dense U2R1", "dbsp-dense U1R2"}
    expected |= {f"dbsp {c} {layout}" for c in cases for layout in ("1 GPU", "U2R1", "U1R2", "auto")}
    assert set(rows) == expected

    # diffusers' native backend has no ring attention on CPU: skipped with the reason, not hidden.
    assert rows["diffusers-cp U1R2"]["error"].startswith("skipped")
    ran = {name: r for name, r in rows.items() if name != "diffusers-cp U1R2"}
    assert all(not r["error"] for r in ran.values()), {n: r["error"] for n, r in ran.items() if r["error"]}

    base = float(rows["1 GPU dense"]["forward_ms"])
    best_cp = float(rows["diffusers-cp U2R1"]["forward_ms"])
    for name, r in ran.items():
        ms = float(r["forward_ms"])
        assert ms > 0 and r["P"] == "2" and r["tokens"] == "1280", name
        assert float(r["speedup_vs_1gpu"]) == pytest.approx(base / ms, rel=2e-3, abs=1e-3), name
        assert float(r["speedup_vs_best_cp"]) == pytest.approx(best_cp / ms, rel=2e-3, abs=1e-3), name
        if name.endswith("1 GPU") or name == "1 GPU dense":
            assert r["err_flag"] == "ref" and math.isnan(float(r["rel_err"])), name
        else:
            # fp32 parallel output vs the single-process output of the same model and mask.
            assert float(r["rel_err"]) <= 1e-4 and r["err_flag"] == "", (name, r["rel_err"])
        if name.startswith("dbsp ") and not name.startswith("dbsp-dense"):
            assert float(r["density"]) == pytest.approx(0.3, abs=0.05), name
    assert "issue 10 (P = 2" in proc.stdout


def test_refuses_to_run_outside_torchrun():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert "torchrun" in proc.stderr
