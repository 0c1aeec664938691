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


CASES = [(256, 256, 128, 128, None), (200, 97, 64, 64, None), (192, 320, 64, 16, None), (97, 200, 32, 1, None),
         (300, 300, 64, 64, 128), (300, 257, 32, 4, 128)]


def _check(fn, sq, skv, q_block, kv_tile, block_size, with_lse=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = random_mask(2, 3, sq, skv, q_block=q_block, kv_tile=kv_tile, density=0.4, empty_rows=False, device=device)
    q = torch.randn(2, sq, 3, 64, device=device)
    k, v = torch.randn(2, skv, 3, 64, device=device), torch.randn(2, skv, 3, 64, device=device)
    ref, ref_lse = reference_attention(q, k, v, mask)
    out, lse = _flex(fn, q, k, v, mask.to_flex_block_mask(block_size=block_size), with_lse)
    live = ~torch.isinf(ref_lse)  # Flex's convention for empty rows differs; compare the others
    assert int(live.sum()) > 0
    assert max_abs_err(out[live.transpose(1, 2)], ref[live.transpose(1, 2)]) < 2e-4
    if with_lse:
        assert max_abs_err(lse[live], ref_lse[live]) < 2e-4


@pytest.mark.parametrize("sq, skv, q_block, kv_tile, block_size", CASES)
def test_flex_eager_matches_reference(sq, skv, q_block, kv_tile, block_size):
    _check(flex.flex_attention, sq, skv, q_block, kv_tile, block_size)


def test_flex_block_classification():
    from dbsp import SparseMask

    tiles = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    tiles[0, 0, :2, :2] = True  # Flex block (0, 0) of size 2 x 2 tiles: full
    tiles[0, 0, 2, 3] = True  # Flex block (1, 1): partial
    mask = SparseMask.from_dense(tiles, q_block=32, kv_tile=32, seq_len_q=128, seq_len_kv=128)
    bm = mask.to_flex_block_mask(block_size=64)
    assert bm.full_kv_num_blocks.tolist() == [[[1, 0]]] and bm.kv_num_blocks.tolist() == [[[0, 1]]]
    assert bm.full_kv_indices[0, 0, 0, 0] == 0 and bm.kv_indices[0, 0, 1, 0] == 1
    with pytest.raises(ValueError, match="block_size must be a multiple of q_block=32, got 48"):
        mask.to_flex_block_mask(block_size=48)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="compiled Flex on CPU (torch 2.13) has no lse and its C++ codegen fails on full blocks",
)
@pytest.mark.parametrize("sq, skv, q_block, kv_tile, block_size", CASES)
def test_flex_compiled_matches_reference(sq, skv, q_block, kv_tile, block_size):
    # Compiled Flex on CUDA needs blocks divisible by its own tile sizes (64 x 128 by default), so
    # the masks go to Flex as 128-token blocks (partial blocks with the exact token-level mask_mod).
    compiled = torch.compile(flex.flex_attention, dynamic=False)
    _check(compiled, sq, skv, q_block, kv_tile, max(block_size or 128, 128))
