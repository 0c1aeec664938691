"""Test-wide set-up: Triton's CPU interpreter where there is no GPU, NaN-poisoned outputs, seeds."""

import os

import torch

# Must happen before any dbsp kernel module (and triton.jit) is imported: the interpreter is
# chosen when kernels are decorated. On a CUDA machine kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import dbsp._alloc  # noqa: E402

# Hypothesis profiles. "dbsp-ci" keeps hypothesis' default of 100 examples; the fuzz tests scale
# their own counts by max_examples / 100 (tests/test_fuzz.py: fuzz_settings), so "dbsp-long" runs
# 20x the bounded CI counts.
settings.register_profile(
    "dbsp-ci",
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same cases on every CI run
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dbsp-long",
    max_examples=2000,
    deadline=None,
    derandomize=False,  # new cases on every long run; a failure prints the blob that reproduces it
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-long",
        action="store_true",
        default=False,
        help="run the hypothesis fuzz tests with the long profile (>= 2,000 cases; also DBSP_FUZZ_LONG=1)",
    )


def pytest_configure(config):
    long = config.getoption("--fuzz-long") or os.environ.get("DBSP_FUZZ_LONG") == "1"
    settings.load_profile("dbsp-long" if long else "dbsp-ci")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every output dbsp allocates for itself starts as NaN, so unwritten elements are caught."""
    real_empty = dbsp._alloc.empty

    def nan_empty(shape, *, dtype, device):
        out = real_empty(shape, dtype=dtype, device=device)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(dbsp._alloc, "empty", nan_empty)
    yield


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield
