import re

import pytest

from dbsp.cli import main

# A very small grid and model so the demo's whole path (dense run, dbsp run, table, PNGs) runs in seconds.
SMALL = ["--frames", "2", "--height", "6", "--width", "10", "--layers", "2", "--steps", "3", "--q-block", "16"]


def _rows(text):
    """The demo table's data rows: (step, density cell, rel err) per step."""
    rows = re.findall(r"^(\d+)\s+\d+\s+[\d.]+\s+[\d.]+\s+(.*?)\s+(\d\.\d\de[-+]\d\d)$", text, flags=re.M)
    return [(int(step), cell, float(err)) for step, cell, err in rows]


def test_demo_runs_dense_and_dbsp_and_writes_plots(capsys, tmp_path):
    pytest.importorskip("diffusers")
    assert main(["demo", *SMALL, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "masks: predicted per layer and step by dbsp.predict.MaskPredictor" in text and "random" in text
    rows = _rows(text)
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0][1].startswith("dense step") and rows[0][2] < 1e-6  # step 0 runs the model's own attention
    densities = [float(x) for x in rows[1][1].split()]
    assert len(densities) == 2 and all(0.0 < d < 1.0 for d in densities)  # 2 layers, sparse
    assert rows[2][2] > 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.png", "masks.png"]


def test_demo_with_two_processes_reports_balance(capsys, tmp_path):
    pytest.importorskip("diffusers")
    assert main(["demo", *SMALL, "--masks", "fixed", "--procs", "2", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "rho_s before -> after" in text and "ulysses=1 x ring=2" in text
    balance = re.findall(r"(\d\.\d{3}) -> (\d\.\d{3})", text)
    assert len(balance) == 2 and all(1.0 <= float(after) <= float(before) for before, after in balance)
    assert (tmp_path / "rank_load.png").stat().st_size > 0


def test_unknown_command_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
