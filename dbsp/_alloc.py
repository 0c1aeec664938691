"""The one place dbsp allocates output tensors it fills itself.

Tests replace :func:`empty` with a version that fills the tensor with NaN, so any output element
that a code path forgets to write shows up as NaN instead of as stale memory.
"""

from __future__ import annotations

import torch


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for outputs that dbsp promises to write completely."""
    return torch.empty(shape, dtype=dtype, device=device)
