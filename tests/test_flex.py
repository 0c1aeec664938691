"""SparseMask.to_flex_block_mask: torch FlexAttention under the converted mask equals the reference."""

import inspect

import pytest
import torch

from dbsp import reference_attention
from harness import max_abs_err, random_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def _flex(fn, q, k, v, block_mask, with_lse=True):
    """Flex with (B, S, H, D) tensors; returns (out (B, S, H, D), lse (B, H, S) or None)."""
    args = [x.transpose(1, 2) for x in (q, k, v)]
    if not with_lse:
        return fn(*args, block_mask=block_mask).transpose(1, 2), None
    if "return_aux" in inspect.signature(flex.flex_attention).parameters:
        out, aux = fn(*args, block_mask=block_mask, return_aux=flex.AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = fn(*args, block_mask=block_mask, return_lse=True)
    return out.transpose(1, 2), lse


CASES = [(256, 256, 128, 128), (200, 97, 64, 64), (192, 320, 64, 16), (97, 200, 32, 1)]


def _check(fn, sq, skv, q_block, kv_tile, with_lse=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = random_mask(2, 3, sq, skv, q_block=q_block, kv_tile=kv_tile, density=0.4, empty_rows=False, device=device)
    q = torch.randn(2, sq, 3, 64, device=device)
    k, v = torch.randn(2, skv, 3, 64, device=device), torch.randn(2, skv, 3, 64, device=device)
    ref, ref_lse = reference_attention(q, k, v, mask)
    out, lse = _flex(fn, q, k, v, mask.to_flex_block_mask(), with_lse)
    live = ~torch.isinf(ref_lse)  # Flex's convention for empty rows differs; compare the others
    assert int(live.sum()) > 0
    assert max_abs_err(out[live.transpose(1, 2)], ref[live.transpose(1, 2)]) < 2e-4
    if with_lse:
        assert max_abs_err(lse[live], ref_lse[live]) < 2e-4


@pytest.mark.parametrize("sq, skv, q_block, kv_tile", CASES)
def test_flex_eager_matches_reference(sq, skv, q_block, kv_tile):
    _check(flex.flex_attention, sq, skv, q_block, kv_tile)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="compiled Flex on CPU (torch 2.13) has no lse and its C++ codegen fails on full blocks",
)
@pytest.mark.parametrize("sq, skv, q_block, kv_tile", CASES)
def test_flex_compiled_matches_reference(sq, skv, q_block, kv_tile):
    _check(torch.compile(flex.flex_attention, dynamic=False), sq, skv, q_block, kv_tile)
