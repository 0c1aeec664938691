"""Test-wide set-up: Triton's CPU interpreter where there is no GPU, NaN-poisoned outputs, seeds."""

import os

import torch

# Must happen before any dbsp kernel module (and triton.jit) is imported: the interpreter is
# chosen when kernels are decorated. On a CUDA machine kernels run natively.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import dbsp._alloc  # noqa: E402


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
