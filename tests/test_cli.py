import pytest

from dbsp.cli import main


def test_demo_runs_and_checks_against_oracle(capsys):
    assert main(["demo", "--seq-len", "200", "--heads", "2"]) == 0
    text = capsys.readouterr().out
    assert "SparseMask(64x1 fine-grained" in text and "max |out - SDPA(float64, same mask)|" in text


def test_unknown_command_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
