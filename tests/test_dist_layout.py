"""Layout arithmetic of the parallel runtime, in one process: shards, exchanges, sub-masks, LSE merge."""

import itertools
import random

import pytest
import torch

from dbsp import SparseMask, reference_attention
from dbsp.dist import merge_attention, merge_attention_
from dbsp.dist.layout import (
    block_token_ids,
    block_tokens,
    home_blocks,
    rank_layout,
    shard_sizes,
    sub_masks,
    token_exchange,
)
from harness import build_for_hopper, random_mask, token_mask


def test_shard_sizes_match_tensor_split():
    for S, P in [(10, 4), (97, 8), (3, 4), (64, 2), (1, 1)]:
        assert shard_sizes(S, P) == tuple(len(x) for x in torch.tensor_split(torch.arange(S), P))


def test_home_blocks_follow_the_contract_formula():
    for nb, R in [(13, 4), (5, 2), (2, 4), (1182, 8), (7, 7)]:
        groups = home_blocks(nb, R)
        assert sorted(itertools.chain(*groups)) == list(range(nb))
        for i, g in enumerate(groups):
            assert all(b * R // nb == i for b in g)
            assert list(g) == sorted(g)


def _random_partition(nb, R, rng):
    """Sorted block lists per ring rank, a random partition of 0..nb-1 (some may be empty)."""
    owner = [rng.randrange(R) for _ in range(nb)]
    return tuple(tuple(b for b in range(nb) if owner[b] == g) for g in range(R))


@pytest.mark.parametrize("S,M,R", [(10, 4, 2), (200, 16, 4), (97, 8, 3), (33, 16, 4), (64, 16, 2), (5, 4, 4)])
def test_token_exchange_delivers_every_block_in_order(S, M, R):
    """Simulate the all-to-all of every ring rank and check each one ends with its blocks' tokens."""
    rng = random.Random(S * 31 + R)
    nb = -(-S // M)
    chunks = shard_sizes(S, R)
    starts = [sum(chunks[:j]) for j in range(R)]
    for targets in [home_blocks(nb, R), _random_partition(nb, R, rng)]:
        sent = {}
        for j in range(R):
            ex = token_exchange(S, M, chunks, targets, j)
            tokens = torch.arange(starts[j], starts[j] + chunks[j])
            order = tokens if ex.send_index is None else tokens[ex.send_index]
            sent[j] = torch.split(order, list(ex.send_counts))
            if ex.restore_index is not None:  # the way back restores the chunk order
                assert torch.equal(order[ex.restore_index], tokens)
        for g in range(R):
            ex = token_exchange(S, M, chunks, targets, g)
            got = torch.cat([sent[j][g] for j in range(R)])
            assert [len(sent[j][g]) for j in range(R)] == list(ex.recv_counts)
            assert torch.equal(got, block_token_ids(targets[g], S, M)), (targets, g)
            assert len(got) == block_tokens(targets[g], S, M)


def test_aligned_home_layout_moves_nothing():
    # S = 256, M = 16, R = 4: chunks of 64 tokens are exactly the home blocks.
    for j in range(4):
        ex = token_exchange(256, 16, (64,) * 4, home_blocks(16, 4), j)
        assert ex.is_local and ex.moved_tokens == 0
    ex = token_exchange(250, 16, shard_sizes(250, 4), home_blocks(16, 4), 1)
    assert not ex.is_local


@pytest.mark.parametrize("kv_tile", [16, 4, 1])
@pytest.mark.parametrize("S", [97, 128])
def test_sub_masks_equal_the_token_picture(S, kv_tile):
    rng = random.Random(S + kv_tile)
    M, R = 16, 3
    mask = random_mask(2, 3, S, S, q_block=M, kv_tile=kv_tile, density=0.3)
    tok = token_mask(mask)  # (B, H, S, S)
    nb = -(-S // M)
    for _ in range(4):
        kv_groups = _random_partition(nb, R, rng)
        q_blocks = sorted(rng.sample(range(nb), rng.randrange(1, nb + 1)))
        tq = block_token_ids(q_blocks, S, M)
        subs = sub_masks(mask, q_blocks, kv_groups)
        assert len(subs) == R
        for g, sub in enumerate(subs):
            tk = block_token_ids(kv_groups[g], S, M)
            expected = tok[:, :, tq][:, :, :, tk]
            if sub is None:
                assert not expected.any()
                continue
            sub.validate()
            assert (sub.q_block, sub.kv_tile, sub.seq_len_q, sub.seq_len_kv) == (M, kv_tile, len(tq), len(tk))
            assert torch.equal(token_mask(sub), expected)


def test_sub_masks_read_the_device_twice_and_match_without_nonzero_static(monkeypatch):
    """sub_masks sizes its variable-length results from two reads (the rows' entry total and the
    groups' sizes): no nonzero or bincount, each a device read on CUDA, at any ring degree. Where
    torch has no nonzero_static kernel it falls back to nonzero, with the same sub-masks."""
    S, M, R = 200, 16, 8
    rng = random.Random(7)
    mask = random_mask(1, 3, S, S, q_block=M, kv_tile=4, density=0.4)
    nb = -(-S // M)
    kv_groups, q_blocks = _random_partition(nb, R, rng), sorted(rng.sample(range(nb), 6))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        subs = sub_masks(mask, q_blocks, kv_groups)
    ops = [e.name for e in prof.events()]
    assert ops.count("aten::nonzero") == ops.count("aten::bincount") == 0
    # One scalar read of the entries' total, one of the host-side owner check (never on the device).
    assert ops.count("aten::_local_scalar_dense") == 2
    assert sum(s is not None for s in subs) >= 2

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::nonzero_static' with arguments from the 'CUDA' backend")

    monkeypatch.setattr(torch, "nonzero_static", missing)
    for got, want in zip(sub_masks(mask, q_blocks, kv_groups), subs):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got.offsets, want.offsets) and torch.equal(got.indices, want.indices)


def test_sub_masks_with_all_blocks_is_the_mask_itself():
    mask = random_mask(1, 2, 50, 50, q_block=8, kv_tile=2)
    (sub,) = sub_masks(mask, list(range(7)), [list(range(7))])
    assert sub is mask


def test_rank_layout_heads_and_blocks():
    lay = rank_layout(
        seq_len=100, q_block=16, heads=4, ulysses=2, ring=2, rank=3,
        head_perm=(2, 0, 3, 1), head_offsets=(0, 2, 4),
        q_blocks=((0, 6), (1, 2, 3, 4, 5)), kv_blocks=((1, 2, 3), (0, 4, 5, 6)),
    )
    assert (lay.ring_rank, lay.ulysses_rank) == (1, 1)
    assert lay.heads == (3, 1)
    assert lay.shard_sizes == (25, 25, 25, 25) and lay.chunk_sizes == (50, 50)
    assert lay.q_len == 80 and lay.kv_lens == (48, 52)  # block 6 holds tokens 96..99
    assert lay.step_kv_blocks() == [(0, 4, 5, 6), (1, 2, 3)]
    assert torch.equal(lay.head_order[lay.head_restore], torch.arange(4))


def test_merge_attention_is_exact_and_nan_free():
    """Attention over keys A u B equals the merge of attention over A and over B, empty rows included."""
    B, S, H, D = 1, 40, 2, 8
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    dense = torch.rand(B, H, 5, 10) < 0.4
    dense[:, :, 1] = False  # query block 1 selects nothing at all
    dense[:, :, 2, :5] = False  # query block 2 selects nothing in part A
    full = SparseMask.from_dense(dense, q_block=8, kv_tile=4, seq_len_q=S, seq_len_kv=S)
    part_a = dense.clone()
    part_a[..., 5:] = False
    part_b = dense & ~part_a
    outs = [
        reference_attention(q, k, v, SparseMask.from_dense(d, q_block=8, kv_tile=4, seq_len_q=S, seq_len_kv=S))
        for d in (part_a, part_b)
    ]
    garbage = outs[0][0].clone()
    garbage[:, 16:24] = float("nan")  # rows whose part-A lse is -inf may hold anything
    out, lse = merge_attention(garbage, outs[0][1], outs[1][0], outs[1][1])
    ref_out, ref_lse = reference_attention(q, k, v, full)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.allclose(out, ref_out, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-12)
    assert torch.equal(out[:, 8:16], torch.zeros_like(out[:, 8:16]))


def _two_parts(B, S, H, D, *, dtype=torch.float32, seed=0):
    """Attention over two disjoint key sets (reference backend) with rows empty in A, in B and in
    both; NaN where a part selects nothing; and the union's attention, the oracle."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(3))
    nq = -(-S // 8)
    dense = torch.rand(B, H, nq, S) < 0.3
    dense[:, :, 0] = False  # block 0 selects nothing at all
    dense[:, 0, 1, : S // 2] = False  # head 0, block 1: nothing in part A
    dense[:, 1 % H, 2, S // 2 :] = False  # nothing in part B
    part_a = dense.clone()
    part_a[..., S // 2 :] = False
    sizes = dict(q_block=8, kv_tile=1, seq_len_q=S, seq_len_kv=S)
    parts = []
    for d in (part_a, dense & ~part_a):
        o, l = reference_attention(q, k, v, SparseMask.from_dense(d, **sizes))
        o = torch.where(torch.isinf(l).transpose(1, 2)[..., None], float("nan"), o)  # never to be read
        parts.append((o.to(dtype).contiguous(), l.float()))
    return parts, reference_attention(q, k, v, SparseMask.from_dense(dense, **sizes))


@pytest.mark.parametrize("b_dtype, transposed", [(torch.float32, ""), (torch.float32, "b"), (torch.bfloat16, "ab")])
def test_merge_kernel_matches_merge_attention(b_dtype, transposed):
    """The one-pass Triton merge (interpreter on CPU) equals merge_attention to float32 rounding
    and the union's attention: empty rows give 0 and -inf, NaN in an empty part is never read,
    either part may be a strided view (cuDNN's output layout; the ring's running result starts as
    its first step's output), part B in a lower precision."""
    from dbsp.kernels.merge import merge_into

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    B, S, H, D = 2, 37, 3, 24  # D not a power of two; 37 tokens: a partial last block
    ((out_a, lse_a), (out_b, lse_b)), (ref, ref_lse) = _two_parts(B, S, H, D)
    out_b = out_b.to(b_dtype)
    heads_outer = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  (B, H, L, D) memory
    out_a = heads_outer(out_a) if "a" in transposed else out_a
    out_b = heads_outer(out_b) if "b" in transposed else out_b
    want, want_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    out, lse = out_a.to(dev), lse_a.to(dev)
    assert out.is_contiguous() != ("a" in transposed)
    merge_into(out, lse, out_b.to(dev), lse_b.to(dev), block_rows=4)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.allclose(out, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite], want_lse[finite], atol=1e-6, rtol=1e-6)
    tol = 1e-2 if b_dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.double(), ref, atol=tol) and torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.equal(out[:, :8], torch.zeros_like(out[:, :8]))  # block 0: empty in both parts


_MERGE_CUBIN = """
import triton
from triton.compiler import ASTSource
from dbsp.kernels import merge as M

n = 0
for b_type in ("*fp32", "*bf16", "*fp16"):
    for ints in ("i32", "i64"):  # Triton passes ints past 2**31 (rows, strides of big outputs) as i64
        types = {"out_ptr": "*fp32", "lse_ptr": "*fp32", "o_ptr": b_type, "l_ptr": "*fp32"}
        sig = {a: "constexpr" if a in ("TINY", "BLOCK_R", "BLOCK_D") else types.get(a, ints) for a in M._merge_kernel.arg_names}
        src = ASTSource(M._merge_kernel, sig, constexprs=dict(TINY=M._TINY, BLOCK_R=16, BLOCK_D=128))
        assert triton.compile(src, target=_target).asm["cubin"]
        n += 1
print(n)
"""


def test_merge_kernel_compiles_to_an_sm90_binary():
    """The merge kernel goes through Triton's whole pipeline to an sm_90 binary on the CPU (the
    interpreter checks no types): float32, bfloat16 and float16 parts, 32- and 64-bit sizes."""
    assert build_for_hopper(_MERGE_CUBIN).split()[-1] == "6"


def test_merge_attention_in_place_equals_merge_attention():
    """merge_attention_ writes merge_attention's result into the running tensors and returns them
    (on CUDA through the one-pass kernel, to float32 rounding; elsewhere the same bits); tensors
    that cannot hold the merge are refused."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    parts, _ = _two_parts(1, 30, 2, 8, seed=1)
    (out_a, lse_a), (out_b, lse_b) = ((o.to(dev), l.to(dev)) for o, l in parts)
    want, want_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    out, lse = out_a.clone(), lse_a.clone()
    got, got_lse = merge_attention_(out, lse, out_b, lse_b)
    assert got is out and got_lse is lse
    if out.is_cuda:
        finite = torch.isfinite(want_lse)
        assert torch.allclose(out, want, atol=1e-6) and torch.allclose(lse[finite], want_lse[finite], atol=1e-6)
    else:
        assert torch.equal(out, want) and torch.equal(lse, want_lse)
    with pytest.raises(TypeError, match="must be torch.float32"):
        merge_attention_(out_a.bfloat16(), lse_a, out_b, lse_b)
    with pytest.raises(TypeError, match="must be torch.float64"):
        merge_attention_(out_a.clone(), lse_a.clone(), out_b.double(), lse_b)
    with pytest.raises(ValueError, match="one shape"):
        merge_attention_(out_a.clone(), lse_a.clone(), out_b[:, :-1], lse_b)


def test_local_masks_are_cached_per_mask_and_released_with_it():
    """A mask sliced twice for the same layout is sliced once; the cache does not keep it alive."""
    import gc
    import weakref

    from dbsp.dist import layout as L

    mask = random_mask(1, 4, 96, 96, q_block=8, kv_tile=2, density=0.4)
    lay = rank_layout(seq_len=96, q_block=8, heads=4, ulysses=1, ring=2, rank=1)
    first = lay.local_masks(mask)
    second = lay.local_masks(mask)
    assert all(a is b for a, b in zip(first, second))
    whole = rank_layout(seq_len=96, q_block=8, heads=4, ulysses=1, ring=1, rank=0)
    assert whole.local_masks(mask)[0] is mask  # the unsplit case returns the mask itself
    assert whole.local_masks(mask)[0] is mask  # also from the cache
    ref = weakref.ref(mask)
    del mask, first, second
    gc.collect()
    assert ref() is None and len(L._local_cache) == 0
