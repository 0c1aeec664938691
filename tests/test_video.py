"""Video geometry, 3D RoPE, token orders, the workload generator and the capture format."""

import math

import pytest
import torch

from dbsp.capture import CaptureEntry, load_capture, save_capture
from dbsp.predict import oracle_mask, predict_mask
from dbsp.video import (
    PRESETS,
    TokenOrder,
    VideoGeometry,
    apply_rope,
    make_workload,
    region_field,
    rope_angles,
    rope_axis_channels,
    rope_frequencies,
    row_major_order,
    tile_order,
)


def probs(w, h, rows):
    """(len(rows), S) float64 attention probabilities of head h for the given query rows."""
    q = w.q[0, rows, h].double()
    k = w.k[0, :, h].double()
    return torch.softmax(q @ k.t() / math.sqrt(w.head_dim), dim=-1)


# ------------------------------------------------------------------------------ geometry, RoPE


def test_presets_have_the_model_token_counts():
    assert PRESETS["wan1.3b-480p"].geometry.num_tokens == 32_760
    assert PRESETS["wan14b-720p"].geometry.video_tokens == 75_600
    assert PRESETS["hunyuan-720p"].geometry.video_tokens == 118_800
    assert PRESETS["hunyuan-720p"].geometry.num_tokens == 118_800 + 256
    assert (PRESETS["wan14b-720p"].heads, PRESETS["hunyuan-720p"].heads, PRESETS["wan1.3b-480p"].head_dim) == (40, 24, 128)
    assert str(VideoGeometry(21, 30, 52)) == "21x30x52"


def test_geometry_validation():
    with pytest.raises(ValueError, match="frames must be >= 1, got 0"):
        VideoGeometry(0, 4, 4)
    with pytest.raises(TypeError, match="width must be an int"):
        VideoGeometry(1, 4, 4.0)
    with pytest.raises(ValueError, match="text_tokens must be >= 0"):
        VideoGeometry(1, 4, 4, text_tokens=-1)


def test_positions_are_row_major():
    g = VideoGeometry(2, 3, 5)
    pos = g.positions()
    assert pos.shape == (30, 3)
    idx = (pos[:, 0] * 3 + pos[:, 1]) * 5 + pos[:, 2]
    assert torch.equal(idx, torch.arange(30))


def test_rope_channels_and_relative_positions():
    assert rope_axis_channels(128) == (22, 21, 21)
    g = VideoGeometry(3, 4, 5, text_tokens=2)
    ang = rope_angles(g, 16)
    assert ang.shape == (62, 8)
    assert torch.equal(ang[60:], torch.zeros(2, 8))  # text tokens are not rotated
    # A constant vector rotated at every position: q_i . k_j = sum_f cos(freq_f * (pos_i - pos_j)).
    x = torch.ones(1, 62, 1, 16)
    r = apply_rope(x, ang)[0, :, 0].double()
    freqs, axis = rope_frequencies(16)
    pos = g.positions().double()
    i, j = 7, 41
    expected = 2 * torch.cos(freqs * (pos[i, axis] - pos[j, axis])).sum()
    assert float(r[i] @ r[j]) == pytest.approx(float(expected), abs=1e-5)
    assert torch.allclose(r.norm(dim=1), torch.full((62,), 4.0, dtype=torch.float64), atol=1e-5)  # norms kept
    with pytest.raises(ValueError, match=r"angles \(S, D // 2\)"):
        apply_rope(x, ang[:, :4])


# ------------------------------------------------------------------------------ token orders


@pytest.mark.parametrize("dims,tile,text", [((21, 30, 52), (4, 4, 4), 0), ((5, 6, 7), (2, 4, 8), 3), ((4, 8, 8), (4, 4, 4), 0)])
def test_tile_order_round_trips(dims, tile, text):
    g = VideoGeometry(*dims, text_tokens=text)
    order = tile_order(g, tile)
    x = torch.randn(2, g.num_tokens, 3, 4)
    y = order.apply(x)
    assert not torch.equal(x, y)
    assert torch.equal(order.restore(y), x)
    assert torch.equal(order.perm[order.inverse], torch.arange(g.num_tokens))
    assert torch.equal(order.perm[g.video_tokens :], torch.arange(g.video_tokens, g.num_tokens))  # text stays last
    assert torch.equal(row_major_order(g).apply(x), x)


def test_tile_order_makes_blocks_spatially_compact():
    g = VideoGeometry(8, 16, 16)  # divisible by the tile, so every block of 64 is one 4x4x4 cube
    pos = g.positions()[tile_order(g, (4, 4, 4)).perm]
    blocks = pos.reshape(-1, 64, 3)
    extent = blocks.amax(dim=1) - blocks.amin(dim=1)
    assert bool((extent == 3).all())
    row_major_extent = g.positions().reshape(-1, 64, 3)
    assert bool((row_major_extent[:, :, 2].amax(1) - row_major_extent[:, :, 2].amin(1) == 15).all())


def test_token_order_validation():
    with pytest.raises(ValueError, match="perm must be a permutation of range"):
        TokenOrder.from_perm("bad", torch.tensor([0, 0, 1]))
    order = tile_order(VideoGeometry(2, 4, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="x has 10 tokens along dim 1 but the order 'tile1x2x2' is for 32"):
        order.apply(torch.zeros(1, 10, 1, 1))


# ------------------------------------------------------------------------------ workloads


def test_workload_shapes_and_determinism():
    w = make_workload("cpu-tiny", batch=2, dtype=torch.bfloat16)
    assert w.q.shape == w.k.shape == w.v.shape == (2, 320, 4, 64)
    assert w.q.dtype == torch.bfloat16
    assert len(w.head_kinds) == len(w.head_focus) == 4
    again = make_workload("cpu-tiny", batch=2, dtype=torch.bfloat16)
    assert torch.equal(w.q, again.q) and torch.equal(w.k, again.k) and torch.equal(w.v, again.v)
    other = make_workload("cpu-tiny", batch=2, seed=1, dtype=torch.bfloat16)
    assert not torch.equal(w.q, other.q)
    assert not torch.equal(w.q[0], w.q[1])  # batch elements differ
    assert make_workload("cpu-tiny", layer=1).head_kinds != w.head_kinds or make_workload("cpu-tiny", layer=1).head_focus != w.head_focus
    assert "cpu-tiny" not in repr(w) and "5x8x8" in repr(w)


def test_steps_drift_slowly_and_drift_zero_freezes_them():
    w0, w1, w9 = (make_workload("cpu-tiny", step=s, num_steps=10) for s in (0, 1, 9))
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert 0 < rel(w1.q, w0.q) < 0.1
    assert rel(w9.q, w0.q) > 2 * rel(w1.q, w0.q)
    assert w1.head_kinds == w0.head_kinds  # the same layer keeps its heads
    f0, f1 = (make_workload("cpu-tiny", step=s, drift=0.0) for s in (0, 7))
    assert torch.equal(f0.q, f1.q) and torch.equal(f0.k, f1.k)


def test_skew_controls_the_spread_of_head_focus():
    assert set(make_workload("cpu-tiny", skew=0.0).head_focus) == {0.5}
    spread = make_workload("cpu-small", skew=1.0).head_focus
    assert max(spread) - min(spread) > 0.7
    # The mask densities follow: skew 0 makes heads of one kind alike, skew 1 spreads them.
    kinds = ("spatial",) * 4
    dens = [oracle_mask(w.q, w.k, q_block=64, kv_tile=64, top_p=0.9).density(per_head=True)[0]
            for w in (make_workload("cpu-tiny", head_kinds=kinds, skew=s) for s in (0.0, 1.0))]
    assert float(dens[0].max() - dens[0].min()) < 0.5 * float(dens[1].max() - dens[1].min())


def test_head_kinds_have_their_structure():
    g = VideoGeometry(5, 12, 12, text_tokens=16)
    kinds = ("spatial", "temporal", "global", "dense", "text")
    w = make_workload(g, heads=5, head_dim=64, head_kinds=kinds, skew=0.0)
    pos = g.positions()
    rows = torch.arange(0, g.video_tokens, 37)  # a spread of video queries
    d = pos[None, :, :] - pos[rows][:, None, :]  # (rows, Sv, 3) offsets to every video key
    same_frame_near = (d[..., 0] == 0) & (d[..., 1].abs() <= 2) & (d[..., 2].abs() <= 2)
    same_pos_other_frame = (d[..., 0] != 0) & (d[..., 1] == 0) & (d[..., 2] == 0)
    Sv = g.video_tokens

    def mass(h, sel):
        return float((probs(w, h, rows)[:, :Sv] * sel).sum(-1).mean())

    def share(sel):  # what a uniform attention would put there
        return float(sel.double().sum(-1).mean() / g.num_tokens)

    assert mass(0, same_frame_near) > 5 * share(same_frame_near)  # spatial: local in its frame
    assert mass(1, same_pos_other_frame) > 10 * share(same_pos_other_frame)  # temporal: across frames
    p_global = probs(w, 2, rows)
    top = p_global.mean(0).topk(3).indices
    assert float(p_global[:, top].sum(-1).mean()) > 0.2  # global: a few sink keys take a lot
    p_dense = probs(w, 3, rows)
    assert float(p_dense.max(-1).values.max()) < 20.0 / g.num_tokens  # dense: near uniform
    p_text = probs(w, 4, rows)
    assert float(p_text[:, Sv:].sum(-1).mean()) > 10 * 16 / g.num_tokens  # text: video queries read text


def test_density_spread_across_heads():
    """At skew 1 the heads of a layer range from sparse to nearly dense (oracle masks)."""
    w = make_workload("cpu-small")
    dens = oracle_mask(w.q, w.k, q_block=64, kv_tile=64, top_p=0.9).density(per_head=True)[0]
    assert float(dens.min()) < 0.35 and float(dens.max()) > 0.85


def test_token_noise_scatters_the_important_keys():
    """More token-level noise: fine 64x1 oracle masks need a smaller share of what 64x64 need."""
    ratios = []
    for noise in (1.0, 3.0):
        w = make_workload("cpu-small", token_noise=noise)
        fine = oracle_mask(w.q, w.k, q_block=64, kv_tile=1, top_p=0.9).density()
        block = oracle_mask(w.q, w.k, q_block=64, kv_tile=64, top_p=0.9).density()
        ratios.append(fine / block)
    assert ratios[1] < ratios[0] - 0.05
    with pytest.raises(ValueError, match="token_noise must be a finite number >= 0"):
        make_workload("cpu-tiny", token_noise=float("nan"))


def test_tiled_workload_is_the_row_major_one_permuted():
    a = make_workload("cpu-tiny")
    b = make_workload("cpu-tiny", order="tiled", tile=(1, 4, 4))
    assert b.order.name == "tile1x4x4"
    assert torch.equal(b.order.restore(b.q), a.q) and torch.equal(b.order.apply(a.v), b.v)
    assert b.head_kinds == a.head_kinds


def test_workload_validation():
    with pytest.raises(ValueError, match="unknown model shape 'wan2'"):
        make_workload("wan2")
    with pytest.raises(ValueError, match=r"step must lie in \[0, num_steps\) = \[0, 5\), got 5"):
        make_workload("cpu-tiny", step=5, num_steps=5)
    with pytest.raises(ValueError, match="head kind 'text' needs text tokens"):
        make_workload("cpu-tiny", head_kinds=("text",) * 4)
    with pytest.raises(ValueError, match="head_kinds has 2 entries but heads=4"):
        make_workload("cpu-tiny", head_kinds=("dense", "dense"))
    with pytest.raises(ValueError, match="skew must be a finite number >= 0"):
        make_workload("cpu-tiny", skew=-1.0)
    with pytest.raises(ValueError, match="kind_weights must map kinds"):
        make_workload("cpu-tiny", kind_weights={"local": 1.0})
    with pytest.raises(ValueError, match="order must be 'row_major', 'tiled' or a TokenOrder"):
        make_workload("cpu-tiny", order="zigzag")


# ------------------------------------------------------------------------------ capture format


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_capture_round_trip(tmp_path, suffix):
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    w = make_workload("cpu-tiny", text_tokens=8)
    mask = predict_mask(w.q, w.k, kv_tile=1, text_tokens=8)
    entries = [CaptureEntry(0, 0, w.q, w.k, w.v, mask), CaptureEntry(3, 7, w.q[:, :100], w.k[:, :100]), CaptureEntry(3, 9, mask=mask)]
    path = save_capture(tmp_path / f"cap{suffix}", entries, geometry=w.geometry, metadata={"model": "synthetic"})
    cap = load_capture(path)
    assert cap.keys() == [(0, 0), (3, 7), (3, 9)]
    assert cap.layers == [0, 3] and cap.steps == [0, 7, 9]
    assert cap.geometry == w.geometry and cap.metadata["model"] == "synthetic"
    e = cap.get(0, 0)
    assert torch.equal(e.q, w.q) and torch.equal(e.k, w.k) and torch.equal(e.v, w.v)
    assert torch.equal(e.mask.offsets, mask.offsets) and torch.equal(e.mask.indices, mask.indices)
    assert (e.mask.q_block, e.mask.kv_tile, e.mask.seq_len_kv) == (64, 1, w.seq_len)
    assert cap.get(3, 7).v is None and cap.get(3, 9).q is None
    wl = cap.workload(0, 0)
    assert wl.head_kinds == ("captured",) * 4 and torch.equal(wl.k, w.k)
    with pytest.raises(KeyError, match="no entry for layer 1 step 0"):
        cap.get(1, 0)
    with pytest.raises(ValueError, match="has no v"):
        cap.workload(3, 7)


def test_capture_errors(tmp_path):
    w = make_workload("cpu-tiny")
    with pytest.raises(ValueError, match="q and k must be captured together"):
        CaptureEntry(0, 0, q=w.q)
    with pytest.raises(ValueError, match="must end in .safetensors, .pt or .pth"):
        save_capture(tmp_path / "cap.npz", [CaptureEntry(0, 0, w.q, w.k)])
    with pytest.raises(ValueError, match="duplicate entry for layer 0 step 0"):
        save_capture(tmp_path / "cap.pt", [CaptureEntry(0, 0, w.q, w.k), CaptureEntry(0, 0, w.q, w.k)])
    with pytest.raises(ValueError, match="metadata key 'layout' is reserved"):
        save_capture(tmp_path / "cap.pt", [CaptureEntry(0, 0, w.q, w.k)], metadata={"layout": "x"})
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="must hold a dict with keys 'metadata' and 'tensors'"):
        load_capture(tmp_path / "other.pt")
    torch.save({"metadata": {"dbsp_capture": "1", "layout": "BSHD"}, "tensors": {"layer0.step0.q": w.q}}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match="q and k go together"):
        load_capture(tmp_path / "half.pt")
    with pytest.raises(FileNotFoundError):
        load_capture(tmp_path / "missing.pt")


def test_region_field_is_smooth_standardised_seeded_and_drifts_slowly():
    """The field behind ``region_skew``: zero mean and unit variance per video, the same for the same
    seed and different for another, varying along time (frame means spread, so ring ranks' frame
    ranges differ), smooth (neighbouring tokens in a row differ far less than the field's spread)
    and moving slowly across steps."""
    g = PRESETS["cpu-small"].geometry
    z = region_field(g, seed=3, batch=2)
    assert z.shape == (2, g.video_tokens)
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-5) and torch.allclose(z.std(1), torch.ones(2), atol=1e-4)
    assert torch.equal(z, region_field(g, seed=3, batch=2))
    assert (z[0] - z[1]).abs().mean() > 0.3 and (z[0] - region_field(g, seed=4)[0]).abs().mean() > 0.3
    grid = z[0].reshape(g.dims)
    assert grid.mean((1, 2)).std() > 0.1  # frames differ (a purely spatial field would give ~0)
    assert (grid[:, :, 1:] - grid[:, :, :-1]).abs().mean() < 0.4  # i.i.d. unit noise: ~1.13
    later = region_field(g, seed=3, step=1, num_steps=50)[0]
    assert 0 < (later - z[0]).norm() / z[0].norm() < 0.05


def test_region_skew_makes_queries_sharper_where_the_field_is_high():
    """Oracle: the exact attention distributions of the generated tensors. With ``region_skew`` the
    per-query entropy (mean over heads) falls where the field is high, across the video (Pearson
    correlation below -0.8); without it the two are unrelated. Negative values are refused."""
    g = PRESETS["cpu-small"].geometry
    z = region_field(g, seed=3)[0]
    idx = torch.randperm(g.video_tokens, generator=torch.Generator().manual_seed(0))[:384]

    def entropy_corr(region_skew: float) -> float:
        w = make_workload("cpu-small", region_skew=region_skew, seed=3)
        p = (torch.einsum("qhd,khd->hqk", w.q[0, idx], w.k[0]) / w.head_dim**0.5).softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(0)
        a, b = z[idx] - z[idx].mean(), ent - ent.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    assert abs(entropy_corr(0.0)) < 0.3
    assert entropy_corr(0.5) < -0.8
    with pytest.raises(ValueError, match="region_skew"):
        make_workload("cpu-tiny", region_skew=-0.1)
