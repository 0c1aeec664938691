"""Mask predictors: valid masks, the keep rule against brute force, budgets, forced tiles, step reuse."""

import math
from importlib.util import find_spec
from types import SimpleNamespace

import pytest
import torch

import dbsp.predict
from dbsp.predict import DENSE_CROSSOVER, MaskPredictor, block_pool, oracle_mask, predict_mask
from dbsp.quality import attention_recall, tile_attention_mass
from dbsp.video import make_workload
from harness import build_for_hopper

# (q_block, kv_tile, extra predict_mask kwargs): pooled block, per-key block, fine tiles, single keys.
CONFIGS = [
    pytest.param(32, 32, {}, id="32x32-pooled"),
    pytest.param(32, 32, {"pool_keys": False}, id="32x32-keys"),
    pytest.param(32, 8, {}, id="32x8"),
    pytest.param(16, 1, {}, id="16x1"),
    pytest.param(32, 4, {"pool_keys": True}, id="32x4-pooled"),
]

triton_only = pytest.mark.skipif(not find_spec("triton"), reason="needs triton (its interpreter on CPU)")


def structured_qk(b=2, sq=97, skv=97, h=3, d=16, seed=0):
    """Random q/k with a local bias (nearby tokens score higher), so masks are neither empty nor full."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g)
    k = torch.randn(b, skv, h, d, generator=g)
    pos = torch.arange(max(sq, skv), dtype=torch.float32)
    freq = torch.linspace(0.05, 0.6, d // 2)
    ang = pos[:, None] * freq[None, :]
    rot = torch.cat([ang.cos(), ang.sin()], dim=1) * 2.0  # a shared positional code
    q = q + rot[:sq, None, :]
    k = k + rot[:skv, None, :]
    return q, k


def brute_logmass(q, k, q_block, kv_tile, pooled):
    """(B, H, Mq, Nt) float64 tile log-masses of the pooled query, by plain loops."""
    B, Sq, H, D = q.shape
    Skv = k.shape[1]
    mq, nt = -(-Sq // q_block), -(-Skv // kv_tile)
    out = torch.empty(B, H, mq, nt, dtype=torch.float64)
    for i in range(mq):
        qbar = q[:, i * q_block : (i + 1) * q_block].double().mean(dim=1)  # (B, H, D)
        for j in range(nt):
            kt = k[:, j * kv_tile : (j + 1) * kv_tile].double()  # (B, n, H, D)
            if pooled:
                s = torch.einsum("bhd,bhd->bh", qbar, kt.mean(dim=1)) / math.sqrt(D)
                out[:, :, i, j] = s + math.log(kt.shape[1])
            else:
                s = torch.einsum("bhd,bnhd->bhn", qbar, kt) / math.sqrt(D)
                out[:, :, i, j] = torch.logsumexp(s, dim=-1)
    return out


def smallest_set(logm, top_p):
    """Bool (…, Nt): per row the smallest set of tiles whose softmax mass reaches top_p."""
    p = torch.softmax(logm, dim=-1)
    order = torch.argsort(p, dim=-1, descending=True)
    cum = torch.cumsum(torch.gather(p, -1, order), dim=-1)
    n_keep = (cum < top_p).sum(-1, keepdim=True) + 1
    rank = torch.argsort(order, dim=-1)
    return rank < n_keep


@pytest.mark.parametrize("q_block,kv_tile,extra", CONFIGS)
@pytest.mark.parametrize("sq,skv", [(97, 97), (200, 130), (64, 257)])
def test_predicted_masks_are_valid(q_block, kv_tile, extra, sq, skv):
    q, k = structured_qk(sq=sq, skv=skv)
    m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=0.8, **extra)
    m.validate()
    assert (m.batch, m.heads, m.seq_len_q, m.seq_len_kv, m.q_block, m.kv_tile) == (2, 3, sq, skv, q_block, kv_tile)
    assert m.device == q.device
    assert 0.0 < m.density() <= 1.0
    assert int(m.row_counts().min()) >= 1


@pytest.mark.parametrize("q_block,kv_tile,extra", CONFIGS)
def test_top_p_one_gives_the_full_mask(q_block, kv_tile, extra):
    q, k = structured_qk()
    m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=1.0, **extra)
    assert bool(m.to_dense().all())
    assert m.density() == 1.0


@pytest.mark.parametrize("q_block,kv_tile,extra", CONFIGS)
def test_recall_is_monotone_in_top_p(q_block, kv_tile, extra):
    q, k = structured_qk(seed=1)
    recalls, densities = [], []
    for tp in (0.3, 0.5, 0.7, 0.9, 0.97, 1.0):
        m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=tp, keep_diagonal=False, dense_above=None, **extra)
        recalls.append(attention_recall(q, k, m))
        densities.append(m.density())
    assert all(a <= b + 1e-9 for a, b in zip(recalls, recalls[1:])), recalls
    assert all(a <= b for a, b in zip(densities, densities[1:])), densities
    assert recalls[-1] == pytest.approx(1.0, abs=1e-6)
    assert recalls[0] < recalls[-2]  # the sweep really moves


@pytest.mark.parametrize("keep_diagonal", [False, True])
@pytest.mark.parametrize("q_block,kv_tile", [(32, 32), (32, 8), (16, 4)])
def test_pooled_keys_keep_exactly_the_smallest_set(q_block, kv_tile, keep_diagonal):
    q, k = structured_qk(sq=97, skv=130)
    for tp in (0.5, 0.9):
        m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=tp, pool_keys=True,
                         keep_diagonal=keep_diagonal, dense_above=None)
        expected = smallest_set(brute_logmass(q, k, q_block, kv_tile, pooled=True), tp)
        if keep_diagonal:
            mq, nt = expected.shape[2:]
            i = torch.arange(mq)[:, None]
            j = torch.arange(nt)[None, :]
            expected |= (j * kv_tile < (i + 1) * q_block) & ((j + 1) * kv_tile > i * q_block)
        assert torch.equal(m.to_dense(), expected)


@pytest.mark.parametrize("q_block,kv_tile", [(32, 1), (32, 4), (16, 16), (64, 8)])
def test_per_key_threshold_search_keeps_a_tight_superset(q_block, kv_tile):
    """Per-key scoring keeps every tile of the exact smallest top-p set, reaches top_p, and (for
    tiles as wide as blocks, where the bracket is exact) keeps exactly that set."""
    q, k = structured_qk(sq=200, skv=257, seed=2)
    logm = brute_logmass(q, k, q_block, kv_tile, pooled=False)
    p = torch.softmax(logm, dim=-1)
    for tp in (0.5, 0.8, 0.95):
        m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=tp, pool_keys=False,
                         keep_diagonal=False, min_keep=0, dense_above=None)
        got = m.to_dense()
        # Float32 masses vs this float64 brute force: compare against sets a hair smaller and
        # larger, so a tile sitting exactly on the top_p boundary cannot flip the outcome.
        inner, outer = smallest_set(logm, tp - 1e-4), smallest_set(logm, tp + 1e-4)
        assert bool((got | ~inner).all()), "a tile of the exact smallest set is missing"
        assert float((p * got).sum(-1).min()) >= tp - 1e-5
        if kv_tile == q_block:
            assert bool((outer | ~got).all()), "block masks with per-key scoring must keep the exact set"
        else:
            assert got.sum() <= 1.15 * inner.sum()  # the search is tight (a few percent over)


@pytest.mark.parametrize("q_block,kv_tile,extra", [(32, 1, {}), (32, 8, {}), (32, 32, {"pool_keys": False}), (16, 4, {})])
def test_a_planted_hot_key_is_always_found(q_block, kv_tile, extra):
    g = torch.Generator().manual_seed(5)
    B, S, H, D = 1, 200, 2, 16
    q = torch.randn(B, S, H, D, generator=g)
    k = 0.3 * torch.randn(B, S, H, D, generator=g)
    mq = -(-S // q_block)
    hot = torch.randperm(S, generator=g)[:mq]  # one distinct hot key per query block
    qbar = block_pool(q, q_block)  # (B, Mq, H, D)
    for i in range(mq):
        direction = qbar[:, i] / qbar[:, i].norm(dim=-1, keepdim=True)  # (B, H, D)
        k[:, hot[i]] = direction * 30.0 * math.sqrt(D) / qbar[:, i].norm(dim=-1, keepdim=True)
    for tp in (0.3, 0.9, 0.99):
        m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=tp, keep_diagonal=False, dense_above=None, **extra)
        tiles = m.to_dense()  # (B, H, Mq, Nt)
        for i in range(mq):
            assert bool(tiles[:, :, i, hot[i] // kv_tile].all()), f"hot key of block {i} missing at top_p={tp}"
        if tp == 0.3:
            assert int(m.row_counts().max()) == 1  # the hot tile alone carries the mass


@pytest.mark.parametrize("q_block,kv_tile,extra", [(32, 1, {}), (32, 32, {}), (32, 8, {"pool_keys": True})])
def test_budgets_bound_the_rule_chosen_tiles(q_block, kv_tile, extra):
    q, k = structured_qk(sq=200, skv=200)
    lo = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=0.05, min_keep=3, keep_diagonal=False, dense_above=None, **extra)
    assert int(lo.row_counts().min()) >= 3
    hi = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=0.99, max_keep=4, keep_diagonal=False, dense_above=None, **extra)
    assert int(hi.row_counts().max()) <= 4
    if extra.get("pool_keys", kv_tile == q_block):  # pooled keys clamp to exactly max_keep
        assert int(hi.row_counts().min()) == 4
    # The kept tiles are the heaviest ones: their mass beats every dropped tile of the row.
    if extra.get("pool_keys", kv_tile == q_block):
        return
    logm = brute_logmass(q, k, q_block, kv_tile, pooled=False)
    kept = hi.to_dense()
    worst_kept = torch.where(kept, logm, torch.full_like(logm, math.inf)).amin(-1)
    best_dropped = torch.where(kept, torch.full_like(logm, -math.inf), logm).amax(-1)
    assert bool((worst_kept >= best_dropped - 1e-6).all())


def _backend_or_skip(backend):
    """The test device for ``backend``; skips the Triton passes where they cannot run."""
    if backend == "triton":
        from dbsp.kernels import predict_select

        if not (torch.cuda.is_available() or predict_select.is_interpreted()):
            pytest.skip("the Triton passes need CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


def _budget_resolution(desc, n_rule, K, over):
    """Per row ``(rows, 1)`` an upper bound of the budget search's final bracket width in log-mass
    (predict.py's module docstring, "Budgets"), from the row's tile log-masses sorted descending
    and its rule count: over the cap, (heaviest - rule threshold) / T^R, where the rule threshold
    lies above the (n_rule+1)-th tile (or 88 below the heaviest); under the floor, max(rule threshold - K-th tile, initial
    width * 2^(1-T)) / T^(R-1), where the rule threshold lies at or below the n_rule-th tile."""
    T, R, nudge = dbsp.predict._BUDGET_CANDIDATES, dbsp.predict._BUDGET_ROUNDS, dbsp.predict._NUDGE
    rows = torch.arange(desc.shape[0])
    if over:  # a rule keeping every tile has its threshold at most 87.5 below the row's lse
        below_rule = torch.where(n_rule < desc.shape[1], desc[rows, n_rule.clamp(max=desc.shape[1] - 1)], desc[:, 0] - 88)
        return ((desc[:, 0] - below_rule + 2 * nudge) / T**R)[:, None]
    at_rule = desc[rows, (n_rule - 1).clamp(min=0)]
    start = torch.clamp(desc[:, 0] - desc[:, -1] + nudge, min=dbsp.predict._BUDGET_SPAN)
    return (torch.maximum(at_rule - desc[:, K - 1], start * 2.0 ** (1 - T)) / T ** (R - 1))[:, None]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("q_block,kv_tile", [(32, 1), (16, 4), (64, 16)])
def test_per_key_budgets_clamp_only_the_rows_outside_them(q_block, kv_tile, backend):
    """Per-key budgets against brute-force tile log-masses: rows whose rule count lies inside
    [min_keep, max_keep] are untouched; a row over max_keep keeps at most max_keep tiles, the
    heaviest ones, and every tile heavier than its (max_keep+1)-th by more than the search's
    resolution; a row under min_keep keeps at least min_keep, the heaviest, and none lighter than
    its min_keep-th by more than the resolution. With distinct masses that is max_keep or min_keep
    up to a few tiles."""
    dev = _backend_or_skip(backend)
    q, k = structured_qk(b=1, sq=200, skv=257, h=2, d=16, seed=3)
    logm = brute_logmass(q, k, q_block, kv_tile, pooled=False).flatten(0, 2)  # (rows, Nt)
    desc = logm.sort(dim=-1, descending=True).values
    q, k = q.to(dev), k.to(dev)
    kw = dict(q_block=q_block, kv_tile=kv_tile, keep_diagonal=False, dense_above=None, min_keep=0, backend=backend)
    base = predict_mask(q, k, top_p=0.9, **kw).to_dense().flatten(0, 2).cpu()
    n_base = base.sum(-1)
    mid = int(n_base.median())  # budgets at the median rule count move some rows, not all
    for budget in ({"max_keep": mid}, {"min_keep": mid + 1}):
        got = predict_mask(q, k, top_p=0.9, **{**kw, **budget}).to_dense().flatten(0, 2).cpu()
        n = got.sum(-1)
        K = budget.get("max_keep", budget.get("min_keep"))
        w = _budget_resolution(desc, n_base, K, over="max_keep" in budget) + 1e-4  # plus float32 vs float64 slack
        if "max_keep" in budget:
            clamped = n_base > K
            assert bool((n <= K).all())
            t_next = desc[:, K : K + 1]  # the (K+1)-th heaviest tile
            must = logm >= t_next + w
            assert bool((got | ~must)[clamped].all()), "a tile well above the (max_keep+1)-th is missing"
        else:
            clamped = n_base < K
            assert bool((n >= K).all())
            t_k = desc[:, K - 1 : K]  # the K-th heaviest tile
            may = logm >= t_k - w
            assert bool((may | ~got)[clamped].all()), "a tile well below the min_keep-th is kept"
        assert 0 < int(clamped.sum()) < clamped.numel()
        assert torch.equal(got[~clamped], base[~clamped])
        # A threshold set: every kept tile at least as heavy as every dropped one.
        worst_kept = torch.where(got, logm, torch.full_like(logm, math.inf)).amin(-1)
        best_dropped = torch.where(got, torch.full_like(logm, -math.inf), logm).amax(-1)
        assert bool((worst_kept >= best_dropped - 1e-5).all())
        # These masses are distinct: the count is the budget up to a few tiles.
        assert bool(((n[clamped] - K).abs() <= max(2, K // 20)).all()), (n[clamped] - K).tolist()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_per_key_budgets_are_strict_under_ties(backend):
    """Integer scores with many exact ties: a row over max_keep keeps exactly the tiles strictly
    heavier than its (max_keep+1)-th (so a tie across the cap is dropped whole: fewer than max_keep,
    never more), and a row under min_keep keeps exactly the tiles at least as heavy as its
    min_keep-th (a tie across the floor is kept whole)."""
    dev = _backend_or_skip(backend)
    g = torch.Generator().manual_seed(8)
    B, S, H, D, M = 1, 256, 2, 16, 16
    # Equal queries within a block (exact pooled means) and small integer entries: exact scores.
    q = torch.randint(-2, 3, (B, S // M, 1, H, D), generator=g).float().expand(B, S // M, M, H, D).reshape(B, S, H, D)
    k = torch.randint(-1, 2, (B, S, H, D), generator=g).float()
    logm = brute_logmass(q, k, M, 1, pooled=False).flatten(0, 2) * math.sqrt(D)  # scale = 1 below
    desc = logm.sort(dim=-1, descending=True).values
    q, k = q.to(dev), k.to(dev)
    kw = dict(q_block=M, kv_tile=1, keep_diagonal=False, dense_above=None, scale=1.0, backend=backend)
    for top_p, budget in ((0.9999, {"max_keep": 40}), (0.3, {"min_keep": 30})):
        base = predict_mask(q, k, top_p=top_p, min_keep=0, **kw).to_dense().flatten(0, 2).cpu()
        got = predict_mask(q, k, top_p=top_p, **{"min_keep": 0, **kw, **budget}).to_dense().flatten(0, 2).cpu()
        if "max_keep" in budget:
            K = budget["max_keep"]
            clamped = base.sum(-1) > K
            want = logm > desc[:, K : K + 1]
            assert bool((desc[:, K] == desc[:, K - 1])[clamped].any()), "no tie straddles the cap"
        else:
            K = budget["min_keep"]
            clamped = base.sum(-1) < K
            want = logm >= desc[:, K - 1 : K]
            assert bool((desc[:, K] == desc[:, K - 1])[clamped].any()), "no tie straddles the floor"
        assert 0 < int(clamped.sum())
        assert torch.equal(got[clamped], want[clamped])
        assert torch.equal(got[~clamped], base[~clamped])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_per_key_budget_search_reads_nothing_back(monkeypatch, backend):
    """The budget search runs a fixed number of count passes and never reads a device value
    (no .item, .tolist, bool or nonzero), so on the Triton backend the GPU never waits for it."""
    import dbsp.predict as P

    dev = _backend_or_skip(backend)
    q, k = (t.to(dev) for t in structured_qk(b=1, sq=128, skv=160, h=2, d=16, seed=9))
    search, passes_made, rounds = P._budget_thresholds, [], []

    def forbidden(*args, **kwargs):
        raise AssertionError("the budget search read a device value")

    def spy(passes, *args):
        counts = passes.counts

        def counting(theta):
            rounds.append(theta.shape)
            return counts(theta)

        passes.counts = counting
        passes_made.append(type(passes).__name__)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
                m.setattr(torch.Tensor, name, forbidden)
            m.setattr(torch, "nonzero", forbidden)
            return search(passes, *args)

    monkeypatch.setattr(P, "_budget_thresholds", spy)
    for budget in ({"max_keep": 5}, {"min_keep": 12}, {"min_keep": 3, "max_keep": 9}):
        rounds.clear()
        m = predict_mask(q, k, q_block=16, kv_tile=1, top_p=0.8, keep_diagonal=False, backend=backend, **budget)
        assert rounds == [(m.offsets[..., 1:].numel(), P._BUDGET_CANDIDATES)] * P._BUDGET_ROUNDS  # (rows, T) per round
        counts = m.row_counts()
        assert int(counts.max()) <= budget.get("max_keep", 160) and int(counts.min()) >= budget.get("min_keep", 1)
    assert passes_made == [{"torch": "_TorchPasses", "triton": "TritonPasses"}[backend]] * 3


@pytest.mark.parametrize("q_block,kv_tile,extra", CONFIGS)
def test_forced_tiles_diagonal_and_text(q_block, kv_tile, extra):
    S, text = 200, 23
    q, k = structured_qk(sq=S, skv=S)
    m = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=0.1, text_tokens=text, dense_above=None, **extra)
    tiles = m.to_dense()
    mq, nt = tiles.shape[2:]
    for i in range(mq):
        diag = range((i * q_block) // kv_tile, -(-min(S, (i + 1) * q_block) // kv_tile))
        assert bool(tiles[:, :, i, list(diag)].all()), f"diagonal of block {i} missing"
        assert bool(tiles[:, :, i, (S - text) // kv_tile :].all()), "text key tiles missing"
        if (i + 1) * q_block > S - text:
            assert bool(tiles[:, :, i].all()), "a query block with text queries must be full"


def test_dense_above_rounds_up_only_dense_heads():
    q, k = structured_qk(b=1, sq=256, skv=256, h=2, d=16)
    q[:, :, 0] = 0.0  # head 0: uniform attention, predicted density ~ top_p
    q[:, :, 1] *= 4.0  # head 1: sharp
    base = predict_mask(q, k, q_block=32, kv_tile=1, top_p=0.8, dense_above=None)
    dens = base.density(per_head=True)[0]
    assert dens[0] > 0.7 > dens[1]
    rounded = predict_mask(q, k, q_block=32, kv_tile=1, top_p=0.8, dense_above=0.7)
    tiles, base_tiles = rounded.to_dense(), base.to_dense()
    assert bool(tiles[:, 0].all())
    assert torch.equal(tiles[:, 1], base_tiles[:, 1])
    rounded.validate()
    assert DENSE_CROSSOVER == predict_mask.__kwdefaults__["dense_above"]


@pytest.mark.parametrize("q_block,kv_tile", [(32, 32), (16, 4), (16, 1)])
def test_oracle_mask_matches_brute_force(q_block, kv_tile):
    q, k = structured_qk(sq=97, skv=130, seed=4)
    mass = tile_attention_mass(q, k, q_block=q_block, kv_tile=kv_tile)
    for tp in (0.6, 0.9):
        m = oracle_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=tp)
        assert torch.equal(m.to_dense(), smallest_set(mass.double().log(), tp))
    assert oracle_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=1.0).density() == 1.0


def test_block_pool_matches_manual_mean():
    x = torch.randn(2, 70, 3, 8)
    pooled = block_pool(x, 32)
    assert pooled.shape == (2, 3, 3, 8)
    assert torch.allclose(pooled[:, 0], x[:, :32].mean(1))
    assert torch.allclose(pooled[:, 2], x[:, 64:].mean(1))  # partial block: its 6 real tokens


def test_workload_masks_are_sparse_where_the_heads_are_sharp():
    w = make_workload("cpu-small", layer=0)
    m = predict_mask(w.q, w.k, q_block=64, kv_tile=1, top_p=0.9, dense_above=None)
    dens = m.density(per_head=True)[0]
    focus = torch.tensor(w.head_focus)
    # Sharper heads (higher focus) get sparser masks: a strong negative rank correlation.
    rank = lambda t: torch.argsort(torch.argsort(t)).double()  # noqa: E731
    rho = torch.corrcoef(torch.stack([rank(dens), rank(focus)]))[0, 1]
    assert rho < -0.5
    assert float(dens.max() - dens.min()) > 0.3


@triton_only
@pytest.mark.parametrize("B,S,kv_tile,top_p,extra", [
    (1, 200, 1, 0.9, {"text_tokens": 20}),
    (1, 257, 4, 0.95, {"min_keep": 3, "max_keep": 9}),
    (2, 190, 1, 0.95, {"max_keep": 30}),  # budget search, one threshold at a time per group
    (2, 190, 16, 0.3, {"min_keep": 6}),  # budget search, all pairs at once; fewer groups than min_keep
    (2, 190, 64, 0.8, {"pool_keys": False}),
    (2, 190, 1, 0.8, {"dense_above": 0.675}),  # heads rounded up to full on the device
    (2, 190, 16, 0.8, {"dense_above": 0.73}),
    (1, 190, 16, 0.8, {"candidates": 16}),  # codes would not fit 4 bits: the separate emit pass
])
def test_triton_passes_match_the_torch_passes(B, S, kv_tile, top_p, extra):
    from dbsp.kernels import predict_select

    if not (torch.cuda.is_available() or predict_select.is_interpreted()):
        pytest.skip("the Triton passes need CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (t.to(dev) for t in structured_qk(b=B, sq=S, skv=S, h=2, d=32, seed=6))
    kw = {"q_block": 64, "kv_tile": kv_tile, "top_p": top_p, "dense_above": None, **extra}
    a = predict_mask(q, k, backend="torch", **kw)
    b = predict_mask(q, k, backend="triton", **kw)
    b.validate()
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.indices, b.indices)
    if "dense_above" in extra:
        tiles = b.offsets[..., -1] - b.offsets[..., 0]
        full = tiles == (b.offsets.shape[-1] - 1) * -(-S // kv_tile)
        assert 0 < int(full.sum()) < full.numel()
    # The Triton passes record the full heads (for sparse_attention's schedule); exactly those.
    from dbsp.mask import _known_full_heads

    counts = b.row_counts()
    assert _known_full_heads(b) == tuple(h for h in range(2) if bool((counts[:, h] == b.num_kv_tiles).all()))


def clustered_qk(S=512, span=128, h=1, d=16, strength=5.0, seed=3):
    """q/k where every token belongs to the ``span``-token stretch it sits in and scores
    ``~strength**2 / sqrt(d)`` with the keys of its own stretch only, so that key chunks far from
    a program's query blocks hold no kept tile."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, S, h, d, generator=g)
    k = torch.randn(1, S, h, d, generator=g)
    code = torch.nn.functional.one_hot(torch.arange(S) // span, d).float() * strength
    return q + code[None, :, None], k + code[None, :, None]


def _rule_passes(q, k, M, kv_tile, text_tokens, top_p=0.9):
    """The per-key Triton passes of ``q, k`` up to the rule's pick (one candidates pass, 8
    thresholds): ``passes, forced, lse, theta`` and the picked ``theta_row``."""
    from dbsp import predict as P
    from dbsp.kernels import predict_select as S

    B, Sq, H, D = q.shape
    cfg = P.PredictConfig(q_block=M, kv_tile=kv_tile, text_tokens=text_tokens, top_p=top_p)
    qbar = P.block_pool(q, M).permute(0, 2, 1, 3).reshape(B * H, -1, D)
    passes = S.TritonPasses(qbar, k, H, kv_tile, 1.0 / math.sqrt(D), group_tiles=P.group_tiles(M, kv_tile))
    gs, ng, n_g = P._group_layout(passes.nt, M, kv_tile, q.device)
    gmax, gsum = passes.stats(gs, ng)
    lse, theta = passes.thresholds(gmax, gsum, n_g, top_p, 8)
    mass, _ = passes.candidates(lse, theta, count=False)
    theta_row = theta.gather(1, P._select(mass, theta, top_p)[:, None]).squeeze(1)
    return SimpleNamespace(passes=passes, forced=P._forced(cfg, Sq, k.shape[1]), lse=lse, theta=theta,
                           theta_row=theta_row)


@triton_only
@pytest.mark.parametrize("kv_tile,text_tokens,budget", [(1, 40, {}), (4, 0, {"max_keep": 12})])
def test_triton_chunk_skip_changes_no_mask(monkeypatch, kv_tile, text_tokens, budget):
    """The per-key Triton passes give one mask with and without the chunk-level group skip, with
    and without the budget search (its counts pass skips the same way), and the torch passes'
    mask. On inputs whose far chunks hold no kept tile, the skip leaves
    groups unwritten (a poisoned count survives the emit kernel), and those are exactly groups
    that the unskipped kernel finds empty. Programs of 16 query blocks of 8 tokens and chunks of
    2 groups of 64 keys make a program see one 128-token stretch of queries and 4 chunks."""
    from dbsp.kernels import predict_select as S

    dev = _backend_or_skip("triton")
    monkeypatch.setattr(S, "BLOCK_M", 16)
    monkeypatch.setattr(S, "GROUPS_PER_PROG", 2)
    q, k = (t.to(dev) for t in clustered_qk())
    M = 8
    kw = dict(q_block=M, kv_tile=kv_tile, top_p=0.9, text_tokens=text_tokens, backend="triton", **budget)
    masks = {}
    for skip in (False, True):
        monkeypatch.setattr(S, "SKIP_CHUNKS", skip)
        masks[skip] = predict_mask(q, k, **kw)
    ref = masks[False]  # every group scored
    ref.validate()
    assert 0.05 < ref.density() < 0.5
    if budget:  # the cap binds somewhere (the search ran), and holds beside the forced diagonal
        counts = ref.row_counts()
        assert int(counts.max()) <= budget["max_keep"] + M // kv_tile and bool((counts >= budget["max_keep"]).any())
    masks["torch"] = predict_mask(q, k, **{**kw, "backend": "torch"})
    for key, m in masks.items():
        assert torch.equal(m.offsets, ref.offsets) and torch.equal(m.indices, ref.indices), key

    # The emit kernel alone, its counts poisoned with -1 (never a real count).
    x = _rule_passes(q, k, M, kv_tile, text_tokens)
    out = {}
    for skip in (False, True):
        monkeypatch.setattr(S, "SKIP_CHUNKS", skip)
        out[skip] = x.passes._emit_words(x.theta_row, x.forced, fill=-1)
    words0, counts0, kept0 = out[False]
    ng = x.passes.ng
    assert not bool((counts0 == -1).any())  # without skipping every group is written
    assert torch.equal(kept0, counts0.reshape(-1, ng).sum(dim=1, dtype=torch.int32))
    words, counts, kept = out[True]
    skipped = counts == -1
    assert int(skipped.sum()) > 0, "the chunk test skipped nothing"
    assert not bool(counts0[skipped].any()) and not bool(words0[skipped].any())
    assert torch.equal(counts[~skipped], counts0[~skipped]) and torch.equal(words[~skipped], words0[~skipped])
    assert torch.equal(kept, kept0)


@triton_only
@pytest.mark.parametrize("M,kv_tile,text_tokens,refine", [(8, 1, 40, 1), (16, 16, 0, 0), (8, 4, 24, 1)])
def test_triton_fused_emit_gives_the_unfused_mask(monkeypatch, M, kv_tile, text_tokens, refine):
    """The last candidates pass fused with the pick and the emit (``FUSED_EMIT``) gives the mask of
    the separate passes and of the torch passes. Its words kernel writes the bit words, counts and
    row totals that the emit kernel writes at the picked thresholds, with its code buffer poisoned
    (-1: every code 15, which keeps every tile where read): codes of skipped chunks stay unwritten
    and are never read. Shapes as in the chunk-skip test above (16-token query blocks: a program
    sees two stretches); kv_tile 1, 4 and 16 store 64, 16 and 4 codes per group."""
    from dbsp.kernels import predict_select as S

    dev = _backend_or_skip("triton")
    monkeypatch.setattr(S, "BLOCK_M", 16)
    monkeypatch.setattr(S, "GROUPS_PER_PROG", 2)
    monkeypatch.setattr(S, "FUSED_MAX_TILES", 64)  # the library fuses only groups of few tiles (speed)
    q, k = (t.to(dev) for t in clustered_qk())
    kw = dict(q_block=M, kv_tile=kv_tile, top_p=0.9, text_tokens=text_tokens, refine=refine, dense_above=0.3)
    masks = {}
    for fused in (False, True):
        monkeypatch.setattr(S, "FUSED_EMIT", fused)
        masks[fused] = predict_mask(q, k, backend="triton", **kw)
    masks["torch"] = predict_mask(q, k, backend="torch", **kw)
    ref = masks[False]
    ref.validate()
    assert 0.05 < ref.density() < 0.5
    for key, m in masks.items():
        assert torch.equal(m.offsets, ref.offsets) and torch.equal(m.indices, ref.indices), key

    x = _rule_passes(q, k, M, kv_tile, text_tokens)
    monkeypatch.setattr(S, "SKIP_CHUNKS", False)
    words0, counts0, kept0 = x.passes._emit_words(x.theta_row, x.forced, fill=-1)
    monkeypatch.setattr(S, "FUSED_EMIT", True)
    monkeypatch.setattr(S, "SKIP_CHUNKS", True)
    words, counts, kept, codes = x.passes._select_words(x.lse, x.theta, 0.9, x.forced, fill=-1)
    assert int((codes == -1).sum()) > 0, "the candidates kernel skipped no chunk"
    assert int((codes != -1).sum()) > 0
    assert torch.equal(words, words0) and torch.equal(counts, counts0) and torch.equal(kept, kept0)


@pytest.mark.parametrize("area", [1, 7, 190 * 190, 32760 * 32760, 118800 * 118800])
@pytest.mark.parametrize("dense_above", [0.0, 1e-9, 0.1, 0.6, 0.675, 0.73, 1 / 3, 0.999999, 1.0])
def test_dense_limit_decides_as_dense_heads_does(area, dense_above):
    """The Triton kernels' integer limit puts every entry count on the side that
    ``predict._dense_heads``' float64 density puts it (checked around the limit and at the ends)."""
    from dbsp.predict import _dense_limit

    e0 = _dense_limit(dense_above, area)
    entries = torch.tensor(sorted({max(0, min(area, e)) for e in (0, area, e0 - 2, e0 - 1, e0, e0 + 1)}), dtype=torch.int64)
    dense = entries.to(torch.float64) / area > dense_above
    assert torch.equal(entries >= e0, dense)


def _fused_or_skip():
    from dbsp.kernels import predict_select

    if not (torch.cuda.is_available() or predict_select.is_interpreted()):
        pytest.skip("the fused Triton kernels need CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_same_rows(a, b):
    """Masks equal row by row, except that a row whose mass crosses top_p within float rounding
    may keep one tile more or less (the two backends add the cumulative mass in different orders)."""
    ca, cb = a.offsets.diff(dim=-1).flatten(), b.offsets.diff(dim=-1).flatten()
    assert int((ca - cb).abs().max()) <= 1
    rows_a, rows_b = a.to_dense().flatten(0, 2), b.to_dense().flatten(0, 2)  # (rows, Skv)
    same = (rows_a == rows_b).all(dim=1).float().mean().item()
    assert same >= 0.99, f"only {same:.3f} of rows identical"


@triton_only
@pytest.mark.parametrize("q_block,kv_tile,top_p,extra", [
    (32, 32, 0.9, {}),
    (16, 16, 0.6, {"min_keep": 2, "max_keep": 3, "text_tokens": 20}),
    (32, 32, 0.7, {"dense_above": 0.5}),  # some heads rounded up to full
    (32, 4, 0.8, {"pool_keys": True, "keep_diagonal": False}),
    (16, 4, 0.5, {"pool_keys": True, "min_keep": 9}),  # the budget moves most rows' cut
])
def test_fused_pooled_predictor_matches_the_torch_path(q_block, kv_tile, top_p, extra):
    dev = _fused_or_skip()
    q, k = (t.to(dev) for t in structured_qk(b=2, sq=203, skv=203, h=3, d=32, seed=11))
    kw = {"dense_above": None, **extra}
    a = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=top_p, backend="torch", **kw)
    b = predict_mask(q, k, q_block=q_block, kv_tile=kv_tile, top_p=top_p, backend="triton", **kw)
    b.validate()
    assert 0.05 < b.density() < 1.0
    assert_same_rows(a, b)
    if extra.get("dense_above"):
        tiles = b.offsets[..., -1] - b.offsets[..., 0]  # (B, H) tiles kept per head
        full = tiles == (b.offsets.shape[-1] - 1) * -(-203 // kv_tile)
        assert 0 < int(full.sum()) < full.numel()


@triton_only
def test_fused_pooled_predictor_rounds_up_dense_heads_at_the_exact_boundary_as_the_torch_path():
    """A head whose density equals dense_above exactly (as float64 puts it) is not dense on either
    path, also where dense_above * Sq * Skv rounds just below its entry count (the fused path
    once compared with that product's floor and rounded such a head up); denser heads are."""
    dev = _fused_or_skip()
    q, k = (t.to(dev) for t in structured_qk(b=2, sq=203, skv=203, h=3, d=32, seed=11))
    kw = dict(q_block=32, kv_tile=32, top_p=0.7)
    base = predict_mask(q, k, dense_above=None, backend="torch", **kw)
    sizes = torch.tensor([32] * 6 + [203 - 6 * 32])  # (CUDA has no integer einsum: on the CPU)
    entries = torch.einsum("bhij,i,j->bh", base.to_dense().long().cpu(), sizes, sizes).flatten().tolist()
    area = 203 * 203
    edge = [e for e in entries if math.floor((e / area) * area) == e - 1]
    assert edge, "no head at a rounding boundary: pick another seed"
    dense_above = edge[0] / area
    assert any(e > edge[0] for e in entries) and any(e < edge[0] for e in entries)
    a = predict_mask(q, k, dense_above=dense_above, backend="torch", **kw)
    b = predict_mask(q, k, dense_above=dense_above, backend="triton", **kw)
    b.validate()
    full = (b.offsets[..., -1] - b.offsets[..., 0]).flatten() == 7 * 7  # (B * H,) heads with every tile
    assert full.tolist() == [e > edge[0] for e in entries]
    assert_same_rows(a, b)


@triton_only
@pytest.mark.parametrize("top_p,dense_above", [(0.99, None), (0.7, 0.5)], ids=["selected-full", "rounded-up"])
def test_fused_predictor_records_its_full_heads_for_the_attention_schedule(top_p, dense_above):
    """Heads 1 and 3 score every key alike, so they come out full (every tile selected, or rounded
    up); the fused predictor records exactly the full heads, and sparse_attention's schedule
    built from that record equals the one built by reading the mask (launch order, the dense and
    sparse heads' split, the sparse heads' tile count)."""
    from dbsp.attention import _schedule
    from dbsp.mask import SparseMask, _known_full_heads

    dev = _fused_or_skip()
    q, k = structured_qk(b=2, sq=203, skv=203, h=4, d=32, seed=3)
    k[:, :, [1, 3]] = 0.0
    m = predict_mask(q.to(dev), k.to(dev), q_block=32, kv_tile=32, top_p=top_p, dense_above=dense_above, backend="triton")
    counts = m.row_counts()
    truth = tuple(h for h in range(4) if bool((counts[:, h] == m.num_kv_tiles).all()))
    assert truth == (1, 3) and _known_full_heads(m) == truth
    read = SparseMask._unchecked(m.offsets, m.indices, q_block=32, kv_tile=32, seq_len_q=203, seq_len_kv=203)
    assert _known_full_heads(read) is None
    a, b = _schedule(m), _schedule(read)
    assert torch.equal(a.order, b.order) and a.n_dense == b.n_dense == 2
    assert torch.equal(a.dense.cpu(), torch.tensor([1, 3])) and torch.equal(b.dense.cpu(), torch.tensor([1, 3]))
    assert a.dense_range is None and b.dense_range is None
    # The sparse rows in launch order, as a boolean selection of ``order`` gives them.
    rows_dense = torch.tensor([False, True, False, True], device=counts.device).repeat(2)[a.order.long() // counts.shape[-1]]
    want = a.order[~rows_dense]
    assert torch.equal(a.sparse_order, want) and torch.equal(b.sparse_order, want)
    assert a.sparse_nnz == b.sparse_nnz == int(counts[:, [0, 2]].sum())


@triton_only
def test_fused_pooled_predictor_gives_the_same_mask_one_head_per_launch(monkeypatch):
    """Scoring one head per bmm + select launch (large shapes) chains the heads' offsets exactly as
    one launch for all of them does, with heads rounded up to full among them."""
    dev = _fused_or_skip()
    q, k = (t.to(dev) for t in structured_qk(b=2, sq=203, skv=203, h=3, d=32, seed=11))
    kw = dict(q_block=32, kv_tile=32, top_p=0.7, dense_above=0.5, backend="triton")
    whole = predict_mask(q, k, **kw)
    monkeypatch.setattr(dbsp.predict, "_FUSED_CHUNK_ELEMENTS", 1)
    chunked = predict_mask(q, k, **kw)
    chunked.validate()
    assert torch.equal(whole.offsets, chunked.offsets) and torch.equal(whole.indices, chunked.indices)


@triton_only
def test_fused_pooled_predictor_breaks_ties_towards_lower_tile_ids():
    dev = _fused_or_skip()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 128, 2, 16, generator=g)
    k = torch.randn(1, 1, 2, 16, generator=g).expand(1, 128, 2, 16).contiguous()  # every key tile scores the same
    kw = dict(q_block=16, kv_tile=16, top_p=0.5, keep_diagonal=False, dense_above=None)
    b = predict_mask(q.to(dev), k.to(dev), backend="triton", **kw)
    a = predict_mask(q, k, backend="torch", **kw)
    assert torch.equal(b.indices.cpu(), a.indices) and torch.equal(b.offsets.cpu(), a.offsets)
    assert b.indices.view(-1, 4).tolist() == [[0, 1, 2, 3]] * 16  # 8 equal tiles, half the mass each row


@triton_only
@pytest.mark.parametrize("top_p,budgets", [(0.5, {}), (0.8, {"min_keep": 5}), (0.95, {"max_keep": 6}), (0.3, {})])
def test_fused_pooled_predictor_matches_the_torch_path_under_many_ties(top_p, budgets):
    """Key tiles drawn from four distinct vectors, so every row's masses come in a few tied levels
    and the top_p cut falls inside a tie: the fused bisection must keep the same lowest-id tiles
    as the PyTorch path's stable sort, with and without budgets moving the cut."""
    dev = _fused_or_skip()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 64, 2, 16, generator=g)
    palette = torch.randn(4, 2, 16, generator=g)
    k = palette[torch.randint(0, 4, (48,), generator=g)].repeat_interleave(4, dim=0)[None]  # (1, 192, 2, 16)
    kw = dict(q_block=16, kv_tile=4, top_p=top_p, pool_keys=True, keep_diagonal=False, dense_above=None, **budgets)
    q, k = q.to(dev), k.to(dev)
    a = predict_mask(q, k, backend="torch", **kw)
    b = predict_mask(q, k, backend="triton", **kw)
    b.validate()
    assert 0.0 < a.density() < 1.0
    assert_same_rows(a, b)


@triton_only
def test_fused_pooling_and_reuse_check_match_the_torch_path():
    dev = _fused_or_skip()
    w0, w1 = make_workload("cpu-tiny", step=0), make_workload("cpu-tiny", step=3)
    from dbsp.kernels import predict_pooled

    got = predict_pooled.pool(w0.q.to(dev), 64).cpu()
    torch.testing.assert_close(got, block_pool(w0.q, 64).permute(0, 2, 1, 3), rtol=1e-5, atol=1e-6)
    changes = {}
    for backend in ("torch", "triton"):
        pred = MaskPredictor(reuse_threshold=0.02, q_block=64, kv_tile=64, backend=backend)
        masks = [pred(w.q.to(dev), w.k.to(dev)) for w in (w0, w0, w1)]
        changes[backend] = (pred.last_change(), pred.stats)
        assert masks[1] is masks[0] and masks[2] is not masks[0]
    assert changes["torch"][1] == changes["triton"][1]
    assert changes["triton"][0] == pytest.approx(changes["torch"][0], rel=1e-4)


@triton_only
@pytest.mark.parametrize("heads,d,block", [(5, 48, 24), (3, 32, 64), (12, 128, 16)])
def test_fused_pooling_matches_block_means_on_odd_shapes(heads, d, block):
    """Odd head counts, head dims below a power of two, a partial last block, strided input, and
    the change sums against the torch formula."""
    dev = _fused_or_skip()
    from dbsp.kernels import predict_pooled

    g = torch.Generator().manual_seed(heads)
    x = torch.randn(2, heads, 203, d, generator=g).transpose(1, 2)  # (B, S, H, D), not contiguous
    want = block_pool(x, block).permute(0, 2, 1, 3)
    old = torch.randn(want.shape, generator=g)
    acc = torch.zeros(2 * heads, 2, device=dev)
    got = predict_pooled.pool(x.to(dev), block, old.to(dev), acc)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    change = ((want - old) ** 2).sum((2, 3)).flatten(), (old ** 2).sum((2, 3)).flatten()
    torch.testing.assert_close(acc.cpu(), torch.stack(change, -1), rtol=1e-4, atol=1e-4)


@triton_only
def test_fused_pooled_predictor_refuses_too_many_tiles():
    dev = _fused_or_skip()
    from dbsp.kernels import predict_pooled

    q = torch.randn(1, predict_pooled.MAX_TILES + 8, 1, 16, device=dev)
    with pytest.raises(ValueError, match="at most 4096 key tiles"):
        predict_mask(q, q, q_block=16, kv_tile=1, pool_keys=True, backend="triton")


# ------------------------------------------------------------------------------ step reuse


def test_step_reuse_hits_on_identical_inputs_and_recomputes_on_change():
    pred = MaskPredictor(reuse_threshold=0.02, q_block=64, kv_tile=1, top_p=0.9)
    w0 = make_workload("cpu-tiny", step=0)
    m0 = pred(w0.q, w0.k, step=0)
    again = pred(w0.q.clone(), w0.k.clone(), step=1)
    assert again is m0
    assert (pred.stats.hits, pred.stats.misses) == (1, 1)
    assert pred.last_change() == 0.0

    other = make_workload("cpu-tiny", step=0, seed=1)  # new content: a large change
    m1 = pred(other.q, other.k, step=2)
    assert m1 is not m0
    assert pred.last_change() > 0.02
    fresh = predict_mask(other.q, other.k, q_block=64, kv_tile=1, top_p=0.9)
    assert torch.equal(m1.offsets, fresh.offsets) and torch.equal(m1.indices, fresh.indices)
    assert (pred.stats.hits, pred.stats.misses, pred.stats.calls) == (1, 2, 3)


def test_step_reuse_off_predicts_every_call_and_reads_nothing_back(monkeypatch):
    """reuse_threshold=None: identical inputs still get a fresh prediction (a new mask object equal
    to predict_mask's), no change is measured, and no pooled statistics are compared."""
    import dbsp.predict as P

    pred = MaskPredictor(reuse_threshold=None, q_block=64, kv_tile=16, top_p=0.9)
    w = make_workload("cpu-tiny", step=0)
    m0 = pred(w.q, w.k)
    pool_pair, compared = P._pool_pair, []

    def spy(*args, old=None, **kw):
        compared.append(old is not None)
        return pool_pair(*args, old=old, **kw)

    monkeypatch.setattr(P, "_pool_pair", spy)
    m1 = pred(w.q.clone(), w.k.clone())
    assert m1 is not m0 and compared == [False]  # pooled once, for the prediction only
    fresh = predict_mask(w.q, w.k, q_block=64, kv_tile=16, top_p=0.9)
    for m in (m0, m1):
        assert torch.equal(m.offsets, fresh.offsets) and torch.equal(m.indices, fresh.indices)
    assert (pred.stats.hits, pred.stats.misses) == (0, 2) and pred.last_change() == math.inf


def test_step_reuse_compares_with_the_last_prediction_so_drift_adds_up():
    thr = 0.05
    pred = MaskPredictor(reuse_threshold=thr, kv_tile=16)
    changes, hits, step_change = [], [], []
    prev = None
    for step in range(12):
        w = make_workload("cpu-tiny", step=step, num_steps=16, drift=0.3)
        before = pred.stats.hits
        pred(w.q, w.k, step=step)
        changes.append(pred.last_change())
        hits.append(pred.stats.hits > before)
        pooled = block_pool(w.q, 64)
        if prev is not None:  # change from the previous *step*, measured independently
            step_change.append(float(((pooled - prev).pow(2).sum((1, 3)).sqrt() / prev.pow(2).sum((1, 3)).sqrt()).max()))
        prev = pooled
    assert not hits[0] and any(hits[1:]) and not all(hits[1:])
    # Every reuse happened at or below the threshold, every recompute above it.
    assert all((c <= thr) == h for c, h in zip(changes[1:], hits[1:]))
    # Some step recomputed although it moved less than the threshold from the step before it:
    # the change is measured from the last prediction, so a slow drift adds up.
    assert any(not h and sc < thr for h, sc in zip(hits[1:], step_change))


def test_dense_steps_and_layers_and_shapes():
    pred = MaskPredictor(dense_steps=2, kv_tile=1)
    w = make_workload("cpu-tiny")
    for layer in (0, "block.7"):
        assert pred(w.q, w.k, layer=layer).density() == 1.0  # steps 0, 1 counted per layer
        assert pred(w.q, w.k, layer=layer).density() == 1.0
        pred(w.q, w.k, layer=layer)  # step 2: predicted
        pred(w.q, w.k, layer=layer)  # step 3: reused
    assert pred.stats == type(pred.stats)(dense=4, hits=2, misses=2)
    short = pred(w.q[:, :200], w.k[:, :200], layer=0)  # another shape: always a miss
    assert short.seq_len_q == 200 and pred.stats.misses == 3
    pred.reset()
    assert pred.stats.calls == 0 and pred.stats.hit_rate == 0.0


def test_predictor_validation():
    with pytest.raises(ValueError, match="reuse_threshold must be a finite float >= 0 or None"):
        MaskPredictor(reuse_threshold=-0.1)
    with pytest.raises(ValueError, match="dense_steps must be >= 0"):
        MaskPredictor(dense_steps=-1)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\]"):
        MaskPredictor(top_p=2.0)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_gets_a_clear_error():
    q, k = structured_qk()
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0"):
        predict_mask(q, k, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 1.5"):
        predict_mask(q, k, top_p=1.5)
    with pytest.raises(TypeError, match="top_p must be a float"):
        predict_mask(q, k, top_p="0.9")
    with pytest.raises(ValueError, match="kv_tile must be <= q_block.*kv_tile=128 > q_block=64"):
        predict_mask(q, k, q_block=64, kv_tile=128)
    with pytest.raises(ValueError, match=r"kv_tile must divide q_block.*q_block=64, kv_tile=24"):
        predict_mask(q, k, q_block=64, kv_tile=24)
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head dim"):
        predict_mask(q, k[:, :, :2])
    with pytest.raises(ValueError, match=r"must agree on batch, heads and head dim"):
        predict_mask(q, k[..., :8])
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        predict_mask(q, k.double())
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, S, H, D\)"):
        predict_mask(q[0], k)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        predict_mask(q, k.numpy())
    with pytest.raises(ValueError, match="text_tokens=500 exceeds the sequence"):
        predict_mask(q, k, text_tokens=500)
    with pytest.raises(ValueError, match="max_keep must be >= min_keep"):
        predict_mask(q, k, min_keep=5, max_keep=2)
    with pytest.raises(ValueError, match="backend must be 'auto', 'torch' or 'triton'"):
        predict_mask(q, k, backend="cuda")
    with pytest.raises(ValueError, match=r"dense_above must lie in \[0, 1\]"):
        predict_mask(q, k, dense_above=1.5)


@triton_only
@pytest.mark.parametrize("rows,ng,last", [(5, 512, 64), (7, 37, 5), (3, 16, 16), (4, 100, 1)])
def test_triton_thresholds_match_the_torch_ones(rows, ng, last):
    """The thresholds kernel gives predict._thresholds' lse and candidate thresholds (up to the
    order of its float sums) on random group statistics with ties and a partial last group, and
    its bracket is valid: at its low end the groups keep at least top_p by bound (b) or (a), above
    its high end less than top_p."""
    from dbsp import predict as P
    from dbsp.kernels import predict_select

    if not (torch.cuda.is_available() or predict_select.is_interpreted()):
        pytest.skip("the Triton passes need CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(ng)
    n_g = torch.full((ng,), 64.0)
    n_g[-1] = last
    gmax = torch.randn(rows, ng, generator=g) * 3
    gmax[:, 3] = gmax[:, 5]  # ties in the max tile mass
    gsum = torch.minimum(1 + torch.rand(rows, ng, generator=g) * 63, n_g)
    for top_p in (0.5, 0.9, 0.99):
        want = P._thresholds(gmax, gsum, n_g, top_p, 8)
        lse, theta = (t.cpu() for t in predict_select.TritonPasses.thresholds(None, gmax.to(dev), gsum.to(dev), n_g.to(dev), top_p, 8))
        torch.testing.assert_close(lse, want[0], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(theta, want[1], rtol=0, atol=1e-3)  # log-mass; sums near top_p cancel
        assert bool((theta.diff(dim=1) >= 0).all())
        lo, hi = (torch.exp(theta[:, i] - lse + P._NUDGE) for i in (0, -1))
        m = torch.exp(gmax - lse[:, None])
        Pg = m * gsum
        kept_lo = torch.maximum((Pg - n_g * lo[:, None]).clamp_min(0).sum(1), (m * (m >= lo[:, None])).sum(1))
        assert bool((kept_lo >= top_p * (1 - 1e-4)).all())
        assert bool(((Pg * (m >= hi[:, None] * (1 + 1e-4))).sum(1) <= top_p * (1 + 1e-4)).all())


_TTIR_SCRIPT = """
import sys
from dbsp.kernels import predict_pooled as P
from dbsp.kernels import predict_select as S

cases = [
    (P._pool_kernel, {"X": "*bf16", "OUT": "*fp32", "OLD": "*fp32", "ACC": "*fp32"}, dict(HAS_OLD=old, TB=32, D=128, DP=128))
    for old in (False, True)
] + [
    (P._select_kernel, {"DOTS": "*fp32", "KEEP": "*i8", "COUNT": "*i32", "TOTALS": "*i64", "scale": "fp32",
                        "log_n": "fp32", "log_last": "fp32", "top_p": "fp32"}, dict(DIAG=diag, NTP=ntp))
    for diag in (False, True) for ntp in (512, 4096)
] + [(P._emit_kernel, {"KEEP": "*i8", "OFFS": "*i64", "DENSE": "*i8", "OUT": "*i32"}, dict(NTP=1024))] + [
    (P._offsets_kernel, {"COUNT": "*i32", "TOTALS": "*i64", "OFFS": "*i64", "DENSE": "*i8", "HOST": "*i64", "limit": lim},
     dict(ROUND=rnd, BHP=64, RB=1024))
    for rnd, lim in ((False, "i32"), (True, "i32"), (True, "i64"))
] + [
    (S._thresholds_kernel, {"GMAX": "*fp32", "GSUM": "*fp32", "NG_KEYS": "*fp32", "LSE": "*fp32", "THETA": "*fp32",
                            "top_p": "fp32", "nudge": "fp32"}, dict(T=8, NGP=ngp))
    for ngp in (16, 4096)
] + [
    (S._candidates_kernel, {"QBAR": "*fp32", "K": "*bf16", "GMAX": "*fp32", "LSE": "*fp32", "THETA": "*fp32",
                            "MASS": "*fp32", "CNT": "*i32", "scale": "fp32", "margin": "fp32"},
     dict(BM=64, GK=64, N=n, D=128, BLOCK_D=128, GPP=8, T=8, T_P=8, IEEE=False, WITH_MASS=True, COUNT=count,
          WIDE=True, SKIP=skip, CODE=False))
    for n in (1, 16) for count in (False, True) for skip in (False, True)
] + [
    (S._expand_kernel, {"WORDS": "*i64", "STARTS": "*i64", "FULL": "*i8", "OUT": "*i32"},
     dict(BW=512 // gt, GT=gt))
    for gt in (64, 4)
] + [
    (S._candidates_kernel, {"QBAR": "*fp32", "K": "*bf16", "GMAX": "*fp32", "LSE": "*fp32", "THETA": "*fp32",
                            "MASS": "*fp32", "CNT": "*i32", "scale": "fp32", "margin": "fp32"},
     dict(BM=64, GK=64, N=n, D=128, BLOCK_D=128, GPP=8, T=16, T_P=16, IEEE=False, WITH_MASS=False, COUNT=True,
          WIDE=64 // n * 16 > S.COUNT_3D_PAIRS, SKIP=skip, CODE=False))
    for n in (1, 16) for skip in (False, True)
]
for kernel, types, const in cases:
    try:
        make_ir(kernel, types, const)
    except Exception as exc:
        sys.exit(f"{kernel.__name__} {const}: {exc}")
print(len(cases))
"""


_CUBIN_SCRIPT = """
import triton
from triton.compiler import ASTSource
from dbsp.kernels import predict_select as S

cases = [(S._emit_kernel, {"QBAR": "*fp32", "K": "*bf16", "GMAX": "*fp32", "THETA_ROW": "*fp32", "WORDS": "*i64",
                           "COUNTS": "*i32", "ROW_KEPT": "*i32", "scale": "fp32", "margin": "fp32"},
          dict(BM=64, GK=64, N=n, D=128, BLOCK_D=128, GPP=8, KEEP_DIAG=True, IEEE=False, SKIP=skip))
         for n in (1, 16) for skip in (False, True)]
cases += [(S._expand_kernel, {"WORDS": "*i64", "STARTS": "*i64", "FULL": "*i8", "OUT": "*i32"},
           dict(BW=512 // gt, GT=gt)) for gt in (64, 4)]
cases += [(S._candidates_kernel, {"QBAR": "*fp32", "K": "*bf16", "GMAX": "*fp32", "LSE": "*fp32", "THETA": "*fp32",
                                  "MASS": "*fp32", "CNT": "*fp32", "CODES": "*i32", "scale": "fp32", "margin": "fp32"},
           dict(BM=64, GK=64, N=n, D=128, BLOCK_D=128, GPP=8, T=8, T_P=8, IEEE=False, WITH_MASS=True, COUNT=False,
                WIDE=True, SKIP=True, CODE=True)) for n in (1, 16)]
cases += [(S._words_kernel, {"MASS": "*fp32", "THETA": "*fp32", "GMAX": "*fp32", "CODES": "*i32", "WORDS": "*i64",
                             "COUNTS": "*i32", "ROW_KEPT": "*i32", "top_p": "fp32", "margin": "fp32"},
           dict(T=8, T_P=8, N=n, GT=64 // n, GW=32, CB=64, KEEP_DIAG=True)) for n in (1, 16)]
cases += [(S._head_rows_kernel, {"WORDS": "*i64", "ROW_KEPT": "*i32", "PREFIX": "*i64", "HEAD_TILES": "*i64",
                                 "HEAD_DENSE": "*i8", "HOST": "*i64", "limit": "i64"}, dict(ROUND=rnd, RB=256))
          for rnd in (False, True)]
cases += [(S._row_starts_kernel, {"COUNTS": "*i32", "ROW_KEPT": "*i32", "PREFIX": "*i64", "HEAD_TILES": "*i64",
                                  "HEAD_DENSE": "*i8", "STARTS": "*i64", "FULL": "*i8", "OFFS": "*i64", "FINAL": "*i64",
                                  "HOST": "*i64"}, dict(BHP=16, CB=512))]
for kernel, types, const in cases:
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in kernel.arg_names}
    done = triton.compile(ASTSource(kernel, sig, constexprs=const), target=_target)
    assert done.asm["cubin"], kernel.__name__
print(len(cases))
"""


@triton_only
def test_per_key_emit_offsets_and_expand_compile_to_sm90_binaries():
    """The per-key emit, row-offset and expand kernels, and the candidates and words kernels of the
    fused emit, go all the way through Triton's pipeline to an sm_90 binary (ptxas included) on
    the CPU, past the front end that the test below checks."""
    assert build_for_hopper(_CUBIN_SCRIPT).split()[-1] == "13"


@triton_only
def test_fused_kernels_compile_for_hopper():
    """The compiler front end accepts the fused kernels and the per-key thresholds, candidates (also
    as the budget search's counts pass) and expand kernels for sm_90 (the interpreter checks no
    types)."""
    assert build_for_hopper(_TTIR_SCRIPT).split()[-1] == "26"
