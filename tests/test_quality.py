"""Quality metrics against brute-force float64 computations on small odd shapes."""

import math

import pytest
import torch

from dbsp import SparseMask
from dbsp.quality import (
    attention_recall,
    cosine_similarity,
    dense_attention,
    evaluate_mask,
    relative_l2_error,
    tile_attention_mass,
)
from harness import random_mask, sdpa_oracle, token_mask


def qkv(b=2, sq=97, skv=130, h=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g) * 1.5 for s in (sq, skv, skv))


def brute_probs(q, k):
    """(B, H, Sq, Skv) float64 softmax of q k^T / sqrt(D)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1)


def test_full_mask_is_perfect():
    q, k, v = qkv()
    full = SparseMask.full(2, 3, 97, 130, q_block=32, kv_tile=8)
    mq = evaluate_mask(q, k, v, full)
    assert mq.density == 1.0
    assert mq.recall == pytest.approx(1.0, abs=1e-6)
    assert mq.rel_l2 < 1e-6
    assert mq.cosine == pytest.approx(1.0, abs=1e-9)
    assert attention_recall(q, k, full) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q_block,kv_tile", [(32, 32), (32, 8), (16, 1)])
def test_metrics_match_brute_force(q_block, kv_tile):
    q, k, v = qkv()
    mask = random_mask(2, 3, 97, 130, q_block=q_block, kv_tile=kv_tile, density=0.4)
    tok = token_mask(mask)  # (B, H, Sq, Skv)
    p = brute_probs(q, k)
    row_recall = (p * tok).sum(-1)  # (B, H, Sq); empty rows recall 0
    assert attention_recall(q, k, mask) == pytest.approx(float(row_recall.mean()), abs=1e-6)
    assert torch.allclose(attention_recall(q, k, mask, per_head=True), row_recall.mean(-1), atol=1e-6)

    out, _ = sdpa_oracle(q, k, v, mask)  # float64, empty rows = 0
    ref, _ = sdpa_oracle(q, k, v, SparseMask.full(2, 3, 97, 130, q_block=q_block))
    rel = float((out - ref).norm() / ref.norm())
    cos = float((out * ref).sum() / (out.norm() * ref.norm()))
    mq = evaluate_mask(q, k, v, mask)
    assert mq.rel_l2 == pytest.approx(rel, rel=1e-5)
    assert mq.cosine == pytest.approx(cos, abs=1e-6)
    assert mq.density == mask.density()
    per_head_rel = ((out - ref).pow(2).sum(dim=(1, 3)) / ref.pow(2).sum(dim=(1, 3))).sqrt()
    assert torch.allclose(mq.per_head_rel_l2, per_head_rel, rtol=1e-5)
    assert not torch.isnan(mq.per_head_cosine).any()


def test_error_and_cosine_helpers():
    a = torch.randn(1, 10, 2, 4, dtype=torch.float64)
    b = a + 0.1 * torch.randn_like(a)
    assert relative_l2_error(b, a) == pytest.approx(float((b - a).norm() / a.norm()))
    assert relative_l2_error(a, a) == 0.0
    assert cosine_similarity(a, 3.0 * a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert relative_l2_error(b, a, per_head=True).shape == (1, 2)
    with pytest.raises(ValueError, match=r"out and ref must both be \(B, S, H, D\) of one shape"):
        relative_l2_error(a, a[:, :5])


def test_recall_is_monotone_in_the_mask():
    q, k, _ = qkv(seed=3)
    small = random_mask(2, 3, 97, 130, q_block=16, kv_tile=4, density=0.2, empty_rows=False)
    bigger = SparseMask.from_dense(
        small.to_dense() | (torch.rand(2, 3, 7, 33) < 0.3), q_block=16, kv_tile=4, seq_len_q=97, seq_len_kv=130
    )
    assert attention_recall(q, k, small) <= attention_recall(q, k, bigger) + 1e-12


@pytest.mark.parametrize("q_block,kv_tile", [(32, 8), (16, 16), (64, 1)])
def test_tile_attention_mass_matches_brute_force(q_block, kv_tile):
    q, k, _ = qkv()
    mass = tile_attention_mass(q, k, q_block=q_block, kv_tile=kv_tile)
    p = brute_probs(q, k)  # (B, H, Sq, Skv)
    B, H, Sq, Skv = p.shape
    mq, nt = -(-Sq // q_block), -(-Skv // kv_tile)
    expected = torch.zeros(B, H, mq, nt, dtype=torch.float64)
    for i in range(mq):
        rows = p[:, :, i * q_block : (i + 1) * q_block].mean(dim=2)  # (B, H, Skv)
        for j in range(nt):
            expected[:, :, i, j] = rows[..., j * kv_tile : (j + 1) * kv_tile].sum(-1)
    assert mass.shape == (B, H, mq, nt)
    assert torch.allclose(mass.double(), expected, atol=1e-5)
    assert torch.allclose(mass.sum(-1).double(), torch.ones(B, H, mq, dtype=torch.float64), atol=1e-5)


def test_dense_attention_matches_sdpa():
    q, k, v = qkv(b=1)
    out, lse = dense_attention(q, k, v)
    ref, ref_lse = sdpa_oracle(q, k, v, SparseMask.full(1, 3, 97, 130, q_block=64))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_bad_inputs():
    q, k, v = qkv()
    mask = SparseMask.full(2, 3, 97, 130, q_block=32)
    with pytest.raises(ValueError, match=r"mask is for batch=2, heads=3 but q has batch=1"):
        evaluate_mask(q[:1], k[:1], v[:1], mask)
    with pytest.raises(ValueError, match="must agree on batch, heads and head dim"):
        attention_recall(q, k[..., :8], mask)
    with pytest.raises(ValueError, match="kv_tile must divide q_block"):
        tile_attention_mass(q, k, q_block=32, kv_tile=12)
