"""dbsp.integrations.diffusers on tiny random Wan2.1 and CogVideoX transformers (CPU, fp32).

Oracles are independent of dbsp's processors: the unmodified diffusers model, and the unmodified
model whose attention call is replaced (by monkeypatching diffusers' own attention function) with
``reference_attention`` under the same mask.
"""

import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel  # noqa: E402
from diffusers.models import attention_processor  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402
from diffusers.models.transformers import transformer_wan  # noqa: E402

from dbsp import SparseMask, reference_attention  # noqa: E402
from dbsp.integrations.diffusers import (  # noqa: E402
    FixedDensity,
    FixedMask,
    apply,
    get_handle,
    random_mask,
    remove,
    supported_models,
)
from dbsp.plan import PlanCache  # noqa: E402
from dbsp.predict import MaskPredictor  # noqa: E402
from harness import max_abs_err  # noqa: E402

# Latents (C=4, T=3, 10 x 14) -> 3 x 5 x 7 = 105 video tokens; 7 text tokens; 2 blocks of 4 heads x 16.
S, HEADS, TEXT = 105, 4, 7
TOL = 1e-5  # fp32: the same math in another order (chunked reference vs SDPA), outputs of size ~1


def tiny_wan(seed=0):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 10, 14, generator=gen),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
    )
    return model, inputs


def tiny_cogvideox(seed=0):
    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=14, sample_height=10, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 10, 14, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
        timestep=torch.tensor([500]),
        image_rotary_emb=get_3d_rotary_pos_embed(16, ((0, 0), (5, 7)), (5, 7), 3),
    )
    return model, inputs


MODELS = {"wan": tiny_wan, "cogvideox": tiny_cogvideox}


def run(model, inputs, **changes):
    with torch.no_grad():
        return model(**{**inputs, **changes}, return_dict=False)[0]


def self_attention_modules(model):
    blocks = model.blocks if isinstance(model, WanTransformer3DModel) else model.transformer_blocks
    return [block.attn1 for block in blocks]


# ------------------------------------------------------------------------------ oracles


def wan_reference_oracle(monkeypatch, masks):
    """Make diffusers' own Wan processor run reference_attention under ``masks[layer]`` for self-attention."""
    real = transformer_wan.dispatch_attention_fn
    calls = {"self": 0}

    def dispatch(query, key, value, attn_mask=None, **kwargs):
        if key.shape[1] != query.shape[1]:  # cross-attention (text keys): unchanged
            return real(query, key, value, attn_mask=attn_mask, **kwargs)
        layer = calls["self"] % len(masks)
        calls["self"] += 1
        return reference_attention(query, key, value, masks[layer])[0]

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", dispatch)
    return calls


def cogvideox_reference_oracle(monkeypatch, masks):
    """Make diffusers' own CogVideoX processor run reference_attention over the joint [text, video]
    sequence, with every text row and column kept and the video block under ``masks[layer]``."""
    calls = {"self": 0}

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False):
        assert attn_mask is None and not is_causal
        layer = calls["self"] % len(masks)
        calls["self"] += 1
        B, H, N, _ = query.shape
        video = masks[layer]
        tok = video.to_dense().repeat_interleave(video.q_block, 2)[:, :, :S]
        tok = tok.repeat_interleave(video.kv_tile, 3)[..., :S]  # (B, H, S, S) token picture
        joint = torch.ones(B, H, N, N, dtype=torch.bool)
        joint[:, :, TEXT:, TEXT:] = tok
        mask = SparseMask.from_dense(joint, q_block=1, kv_tile=1, seq_len_q=N, seq_len_kv=N)
        out, _ = reference_attention(*(x.transpose(1, 2) for x in (query, key, value)), mask)
        return out.transpose(1, 2)

    functional = types.SimpleNamespace(**{name: getattr(F, name) for name in dir(F) if not name.startswith("__")})
    functional.scaled_dot_product_attention = sdpa
    monkeypatch.setattr(attention_processor, "F", functional)
    return calls


ORACLES = {"wan": wan_reference_oracle, "cogvideox": cogvideox_reference_oracle}


# ------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("name", MODELS)
def test_full_mask_equals_unmodified_model(name):
    model, inputs = MODELS[name]()
    dense = run(model, inputs)
    apply(model, predictor=SparseMask.full(1, HEADS, S, S, q_block=16, kv_tile=1))
    out = run(model, inputs)
    remove(model)
    assert max_abs_err(out, dense) < TOL


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("q_block, kv_tile", [(16, 1), (16, 16), (32, 4)])
def test_sparse_mask_equals_reference_attention_oracle(monkeypatch, name, q_block, kv_tile):
    model, inputs = MODELS[name]()
    masks = [random_mask(1, HEADS, S, density=0.3, q_block=q_block, kv_tile=kv_tile, seed=layer) for layer in range(2)]
    assert 0.15 < masks[0].density() < 0.45
    dense = run(model, inputs)
    handle = apply(model, predictor=FixedMask(dict(enumerate(masks))), record=True)
    out = run(model, inputs)
    remove(model)
    assert [r.density for r in handle.records] == [m.density() for m in masks]

    calls = ORACLES[name](monkeypatch, masks)
    oracle = run(model, inputs)
    assert calls["self"] == 2
    assert max_abs_err(out, oracle) < TOL
    assert max_abs_err(dense, oracle) > 100 * TOL  # the masks matter: the check above is not vacuous


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_the_original_exactly(name):
    model, inputs = MODELS[name]()
    before = run(model, inputs)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    processors = [m.processor for m in self_attention_modules(model)]
    all_processors = dict(model.attn_processors)
    attrs = {name: set(m.__dict__) for name, m in model.named_modules()}

    handle = apply(model, predictor=FixedDensity(0.3, q_block=16), record=True)
    assert get_handle(model) is handle
    assert all(m.processor is not p for m, p in zip(self_attention_modules(model), processors))
    assert max_abs_err(run(model, inputs), before) > 100 * TOL
    remove(model)

    assert get_handle(model) is None
    assert all(m.processor is p for m, p in zip(self_attention_modules(model), processors))
    assert all(model.attn_processors[k] is v for k, v in all_processors.items())
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == attrs  # no hook, no forward override
    state = model.state_dict()
    assert state.keys() == params.keys() and all(torch.equal(state[k], params[k]) for k in params)
    assert torch.equal(run(model, inputs), before)  # bitwise
    with pytest.raises(ValueError, match="not applied"):
        remove(model)
    apply(model)  # and it can be applied again
    remove(model)


# ------------------------------------------------------------------------------ steps


def test_steps_branches_and_dense_steps():
    model, inputs = tiny_wan()
    dense = {t: run(model, inputs, timestep=torch.tensor([t])) for t in (900, 800)}
    handle = apply(model, predictor=FixedDensity(0.3, q_block=16), dense_steps=1, record=True)
    seen = []
    outs = {}
    for t in (900, 900, 800, 800, 700, 1000):  # cfg-style pairs, then a new run (timestep goes up)
        outs.setdefault(t, run(model, inputs, timestep=torch.tensor([t])))
        seen.append((handle.step, handle.branch))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (0, 0)]
    assert [(r.step, r.branch, r.dense_step) for r in handle.records[::2]] == [
        (0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False), (2, 0, False), (0, 0, True)
    ]
    assert torch.equal(outs[900], dense[900])  # dense steps run the model's own processor
    assert max_abs_err(outs[800], dense[800]) > 100 * TOL
    handle.reset()
    assert handle.step == 0 and handle.records == []
    remove(model)


def test_predictor_keys_layers_and_branches_and_reuses():
    model, inputs = tiny_wan()
    predictor = MaskPredictor(q_block=16, kv_tile=1, top_p=0.5, dense_above=None, reuse_threshold=0.05)
    handle = apply(model, predictor=predictor, record=True)
    run(model, inputs)
    assert predictor.stats.misses == 2 and predictor.stats.hits == 0
    assert sorted(handle.masks) == [(0, 0), (1, 0)]
    run(model, inputs)  # same timestep: branch 1 of step 0, its own keys
    assert predictor.stats.misses == 4
    run(model, inputs, timestep=torch.tensor([499]))  # next step, nearly the same q and k: reused
    assert predictor.stats.hits == 2
    mask = handle.masks[(0, 0)]
    assert mask.kv_tile == 1 and 0.0 < mask.density() < 1.0
    remove(model)


def test_default_predictor_and_layers_subset():
    model, inputs = tiny_wan()
    original = [m.processor for m in self_attention_modules(model)]
    handle = apply(model, layers=[1])
    assert handle.layers == (1,) and isinstance(handle.predictor, MaskPredictor)
    assert handle.predictor.config.kv_tile == 1
    mods = self_attention_modules(model)
    assert mods[0].processor is original[0] and mods[1].processor is not original[1]
    assert torch.isfinite(run(model, inputs)).all()
    remove(model)


def test_pipeline_object_is_accepted():
    model, inputs = tiny_wan()
    pipe = types.SimpleNamespace(transformer=model)
    handle = apply(pipe, predictor=FixedDensity(0.5, q_block=16))
    assert get_handle(model) is handle
    remove(pipe)
    assert get_handle(model) is None


# ------------------------------------------------------------------------------ errors


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(TypeError, match="WanTransformer3DModel and CogVideoXTransformer3DModel") as info:
        apply(torch.nn.Linear(4, 4))
    assert "Linear" in str(info.value)
    with pytest.raises(TypeError, match="pipeline"):
        apply("not a model")
    assert supported_models() == ("WanTransformer3DModel", "CogVideoXTransformer3DModel")


def test_invalid_arguments_are_clear_errors():
    model, _ = tiny_wan()
    with pytest.raises(ValueError, match="planner balances sequence-parallel work"):
        apply(model, planner=PlanCache())
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        apply(model, backend="fast")
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 blocks"):
        apply(model, layers=[5])
    with pytest.raises(TypeError, match="dense_steps"):
        apply(model, dense_steps=1.5)
    with pytest.raises(TypeError, match="predictor must be"):
        apply(model, predictor=0.3)
    with pytest.raises(TypeError, match="groups must be"):
        apply(model, groups="ring")
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\]"):
        FixedDensity(0.0)
    assert get_handle(model) is None and all(
        type(m.processor).__name__ == "WanAttnProcessor" for m in self_attention_modules(model)
    )
    apply(model)
    with pytest.raises(ValueError, match="already applied"):
        apply(model)
    remove(model)
    model.blocks[0].attn1.set_processor(attention_processor.AttnProcessor2_0())
    with pytest.raises(ValueError, match="block 0's attn1 uses AttnProcessor2_0"):
        apply(model)


def test_mask_of_the_wrong_size_is_a_clear_error():
    model, inputs = tiny_wan()
    apply(model, predictor=SparseMask.full(1, HEADS, S + 1, S + 1, q_block=16))
    with pytest.raises(ValueError, match="seq_len_q=106"):
        run(model, inputs)
    remove(model)


def test_random_mask_density_and_determinism():
    a = random_mask(2, 3, 200, density=0.2, q_block=64, kv_tile=1, seed=7)
    b = random_mask(2, 3, 200, density=0.2, q_block=64, kv_tile=1, seed=7)
    a.validate()
    assert torch.equal(a.indices, b.indices) and torch.equal(a.offsets, b.offsets)
    assert abs(a.density() - 0.2) < 0.02
    dense = a.to_dense()
    assert dense.shape == (2, 3, 4, 200) and SparseMask.from_dense(
        dense, q_block=64, kv_tile=1, seq_len_q=200, seq_len_kv=200
    ).indices.equal(a.indices)


def test_wan_split_points_are_diffusers_context_parallel_plan():
    """dbsp shards and gathers Wan where diffusers' own context parallelism does."""
    from dbsp.integrations.diffusers import _specs

    spec = _specs()["WanTransformer3DModel"]
    ours = set(spec.splits) | {spec.gather[0]}
    assert ours == set(WanTransformer3DModel._cp_plan)
    gather = WanTransformer3DModel._cp_plan[spec.gather[0]]
    assert gather.gather_dim == spec.gather[1]
    for path, split in spec.splits.items():
        plan = WanTransformer3DModel._cp_plan[path]
        for key, (dim, expected) in {**split.inputs, **split.outputs}.items():
            assert (plan[key].split_dim, plan[key].expected_dims) == (dim, expected)
            assert plan[key].split_output == (key in split.outputs)


def test_planner_reads_the_masks_exact_work_summary():
    """Oracle: ``imbalance_ratio`` and ``make_plan`` on the mask itself. The planner's input is the
    mask's summary at the ring degree (exact: the same rho_s under every layout it can plan, and a
    plan from it that is as balanced on the mask as the summary says); the mask itself where it
    has fewer query blocks than the ring degree."""
    from dbsp.integrations.diffusers import _planner_input
    from dbsp.plan import WorkSummary, imbalance_ratio, make_plan

    mask = random_mask(1, 8, 40 * 16, density=0.3, q_block=16, kv_tile=1, seed=3)
    for ring in (1, 2, 4):
        s = _planner_input(mask, ring)
        assert isinstance(s, WorkSummary) and s.ring == ring
        for u, r in [(8 // ring, ring), (1, ring)]:
            assert imbalance_ratio(s, ulysses=u, ring=r) == imbalance_ratio(mask, ulysses=u, ring=r)
            plan = make_plan(s, ulysses=u, ring=r)
            assert plan.with_tile_work(mask).imbalance() == plan.imbalance()
            assert plan.imbalance() <= imbalance_ratio(mask, ulysses=u, ring=r) + 1e-12
    small = random_mask(1, 2, 3 * 16, density=0.5, q_block=16, kv_tile=16, seed=0)
    assert _planner_input(small, 4) is small
