"""Bad input to the attention entry points gets a clear error naming the argument and sizes."""

import pytest
import torch

from dbsp import SparseMask, reference_attention, sparse_attention

ENTRY_POINTS = [
    pytest.param(lambda q, k, v, m, **kw: reference_attention(q, k, v, m, **kw), id="reference_attention"),
    pytest.param(lambda q, k, v, m, **kw: sparse_attention(q, k, v, m, **kw), id="sparse_attention"),
]


def qkv(b=1, sq=40, skv=40, h=2, d=16, dtype=torch.float32):
    return torch.randn(b, sq, h, d, dtype=dtype), torch.randn(b, skv, h, d, dtype=dtype), torch.randn(b, skv, h, d, dtype=dtype)


def full(b=1, h=2, sq=40, skv=40):
    return SparseMask.full(b, h, sq, skv, q_block=16, kv_tile=4)


@pytest.mark.parametrize("attend", ENTRY_POINTS)
def test_mismatched_qkv_shapes(attend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k and v must have the same shape.*\(1, 40, 2, 16\).*\(1, 39, 2, 16\)"):
        attend(q, k, v[:, :39], full())
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head dim"):
        attend(q, k[..., :8], v[..., :8], full())
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, S, H, D\), got 3 dims"):
        attend(q[0], k, v, full())


@pytest.mark.parametrize(
    "mask_sizes, message",
    [
        pytest.param(dict(b=2), r"mask is for batch=2, heads=2 but q has batch=1, heads=2", id="batch"),
        pytest.param(dict(h=3), r"mask is for batch=1, heads=3 but q has batch=1, heads=2", id="heads"),
        pytest.param(dict(sq=41), r"seq_len_q=41, seq_len_kv=40 but q has Sq=40 and k has Skv=40", id="seq_len_q"),
        pytest.param(dict(skv=30), r"seq_len_q=40, seq_len_kv=30 but q has Sq=40 and k has Skv=40", id="seq_len_kv"),
    ],
)
@pytest.mark.parametrize("attend", ENTRY_POINTS)
def test_mask_sizes_must_match_inputs(attend, mask_sizes, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        attend(q, k, v, full(**mask_sizes))


@pytest.mark.parametrize("attend", ENTRY_POINTS)
def test_non_floating_and_mixed_dtypes(attend):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a floating tensor .* got torch.int64"):
        attend(q.long(), k, v, full())
    with pytest.raises(TypeError, match=r"k has dtype torch.float64 but q has torch.float32"):
        attend(q, k.double(), v.double(), full())
    with pytest.raises(TypeError, match=r"v must be a torch.Tensor, got list"):
        attend(q, k, [1.0], full())
    with pytest.raises(TypeError, match=r"mask must be a dbsp.SparseMask, got Tensor"):
        attend(q, k, v, torch.ones(1, 2, 40, 40, dtype=torch.bool))


@pytest.mark.parametrize("attend", ENTRY_POINTS)
def test_devices_must_match(attend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
        attend(q, k.to("meta"), v, full())
    with pytest.raises(ValueError, match=r"mask is on meta but q is on cpu"):
        attend(q, k, v, full().to("meta"))


@pytest.mark.parametrize("attend", ENTRY_POINTS)
def test_bad_scale(attend):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be a finite positive number, got -1"):
        attend(q, k, v, full(), scale=-1.0)
    with pytest.raises(TypeError, match=r"scale must be a float or None, got str"):
        attend(q, k, v, full(), scale="0.1")


def test_unknown_backend_lists_known_ones():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown backend 'cudnn'; known backends: 'auto', 'reference'"):
        sparse_attention(q, k, v, full(), backend="cudnn")
