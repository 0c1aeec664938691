"""CPU smoke test of benchmarks/compare_planners.py: two copies of this package side by side.

With the current package also loaded as the "old" one, the script must run end to end, find both
packages' plans identical (it compares their fingerprints) and print every timing line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dbsp

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare_planners.py"


def test_compare_planners_runs_both_packages_and_checks_their_plans(tmp_path):
    shutil.copytree(Path(dbsp.__file__).parent, tmp_path / "dbsp_old", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--old", str(tmp_path), "--rounds", "2", "--steps", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "plans of the run identical in both: 2/2" in out
    assert "step 0 degree choice: old median" in out and "2-step run: old median" in out and "new/old paired median" in out
    assert "round 2/2" in out
