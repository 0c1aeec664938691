import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dbsp import SparseMask
from harness import random_mask, token_mask


def brute_counts(mask):
    """Token-level computed entries per (b, h) and per (b, h, qb, kb), by brute force."""
    tok = token_mask(mask).to(torch.int64)  # (B, H, Sq, Skv)
    B, H, Sq, Skv = tok.shape
    M = mask.q_block
    mq, mk = -(-Sq // M), -(-Skv // M)
    padded = torch.zeros(B, H, mq * M, mk * M, dtype=torch.int64)
    padded[:, :, :Sq, :Skv] = tok
    work = padded.reshape(B, H, mq, M, mk, M).sum(dim=(3, 5))
    return tok.sum(dim=(2, 3)), work


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    sq=st.integers(1, 130),
    skv=st.integers(1, 130),
    q_block=st.sampled_from([1, 4, 16, 32]),
    tile_div=st.sampled_from([1, 2, 4, 16, 32]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_round_trip_density_and_work_match_brute_force(b, h, sq, skv, q_block, tile_div, density, seed):
    kv_tile = max(1, q_block // tile_div)
    g = torch.Generator().manual_seed(seed)
    mq, nt = -(-sq // q_block), -(-skv // kv_tile)
    dense = torch.rand(b, h, mq, nt, generator=g) < density
    m = SparseMask.from_dense(dense, q_block=q_block, kv_tile=kv_tile, seq_len_q=sq, seq_len_kv=skv)
    assert torch.equal(m.to_dense(), dense)
    per_head, work = brute_counts(m)
    assert m.density() == pytest.approx(per_head.sum().item() / (b * h * sq * skv), abs=1e-12)
    assert torch.allclose(m.density(per_head=True), per_head.double() / (sq * skv))
    assert torch.equal(m.work().to(torch.int64), work)
    assert torch.equal(m._work_per_entry().to(torch.int64), work)  # the GPU path's formula, run here
    assert m.work().dtype == m._work_per_entry().dtype == torch.int32
    assert m.nnz == int(dense.sum())
    assert torch.equal(m.row_counts(), dense.sum(-1))


def test_full_mask_is_dense():
    m = SparseMask.full(2, 3, 97, 200, q_block=32, kv_tile=8)
    assert m.density() == 1.0
    assert bool(m.to_dense().all())
    assert m.work().sum().item() == 2 * 3 * 97 * 200
    assert SparseMask.full(1, 1, 10, 10, q_block=4).kv_tile == 4


def test_select_heads_matches_dense_indexing():
    m = random_mask(2, 5, 97, 120, q_block=16, kv_tile=4, density=0.4)
    perm = [3, 0, 4, 1]
    sel = m.select_heads(perm)
    assert torch.equal(sel.to_dense(), m.to_dense()[:, perm])
    sel.validate()
    with pytest.raises(ValueError, match=r"heads must lie in \[0, 5\)"):
        m.select_heads([5])


def test_repr_names_granularity_shape_and_density():
    m = SparseMask.full(1, 2, 100, 100, q_block=64, kv_tile=1)
    text = repr(m)
    for part in ("64x1 fine-grained", "B=1", "H=2", "Sq=100", "Skv=100", "density=1.0000"):
        assert part in text
    assert "block" in repr(SparseMask.full(1, 1, 64, 64, q_block=64))


def test_constructor_accepts_valid_csr_and_converts_dtypes():
    offsets = torch.tensor([[[0, 2, 3]]], dtype=torch.int32)
    m = SparseMask(offsets, torch.tensor([0, 2, 1]), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=6)
    assert m.offsets.dtype == torch.int64 and m.indices.dtype == torch.int32
    assert m.to_dense().tolist() == [[[[True, False, True], [False, True, False]]]]


@pytest.mark.parametrize(
    "offsets, indices, match",
    [
        ([[[0, 2, 3]]], [0, 3, 1], r"\[0, 3\).*max 3"),  # out of range
        ([[[0, 2, 3]]], [0, -1, 1], r"min -1"),
        ([[[0, 2, 3]]], [2, 0, 1], r"unsorted"),
        ([[[0, 2, 3]]], [1, 1, 1], r"duplicated"),
        ([[[0, 2, 4]]], [0, 1, 1], r"len\(indices\) = 3"),
        ([[[0, 2]]], [0, 1], r"ceil\(8 / 4\) = 2; got \(1, 1, 2\)"),
        ([[[1, 2, 3]]], [0, 1, 2], r"offsets\[0, 0, 0\] must be 0"),
        ([[[0, 3, 2]]], [0, 1], r"len\(indices\)|non-decreasing"),
        ([[[0, 1, 2], [3, 3, 4]]], [0, 1, 0, 1], r"chain"),
    ],
)
def test_constructor_rejects_bad_csr(offsets, indices, match):
    with pytest.raises(ValueError, match=match):
        SparseMask(torch.tensor(offsets), torch.tensor(indices), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=6)


def test_unsorted_row_boundary_is_fine():
    # Row 0 ends with tile 2 and row 1 starts with tile 0: not an ordering error.
    SparseMask(torch.tensor([[[0, 2, 3]]]), torch.tensor([1, 2, 0]), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=6)


@pytest.mark.parametrize(
    "q_block, kv_tile, exc, match",
    [
        (0, 1, ValueError, "q_block must be >= 1, got 0"),
        (4, 0, ValueError, "kv_tile must be >= 1, got 0"),
        (4, 8, ValueError, r"kv_tile must be <= q_block.*kv_tile=8 > q_block=4"),
        (6, 4, ValueError, r"kv_tile must divide q_block.*q_block=6, kv_tile=4"),
        (4.0, 2, TypeError, "q_block must be an int"),
    ],
)
def test_block_size_errors(q_block, kv_tile, exc, match):
    with pytest.raises(exc, match=match):
        SparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), q_block=q_block, kv_tile=kv_tile, seq_len_q=8, seq_len_kv=8)
    with pytest.raises(exc, match=match):
        SparseMask.full(1, 1, 8, 8, q_block=q_block, kv_tile=kv_tile)


def test_from_dense_shape_and_dtype_errors():
    with pytest.raises(ValueError, match=r"\(B, H, 2, 4\) .*got \(1, 1, 2, 3\)"):
        SparseMask.from_dense(torch.ones(1, 1, 2, 3, dtype=torch.bool), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=8)
    with pytest.raises(TypeError, match="bool"):
        SparseMask.from_dense(torch.ones(1, 1, 2, 4), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=8)
    with pytest.raises(ValueError, match="0/1"):
        SparseMask.from_dense(torch.full((1, 1, 2, 4), 2), q_block=4, kv_tile=2, seq_len_q=8, seq_len_kv=8)
    with pytest.raises(ValueError, match="seq_len_q must be >= 1"):
        SparseMask.from_dense(torch.ones(1, 1, 0, 4, dtype=torch.bool), q_block=4, kv_tile=2, seq_len_q=0, seq_len_kv=8)


def test_mask_is_frozen():
    m = SparseMask.full(1, 1, 8, 8, q_block=4)
    with pytest.raises(Exception):
        m.q_block = 2
