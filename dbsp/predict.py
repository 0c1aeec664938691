"""Training-free mask prediction: from q and k to a SparseMask, block or fine-grained.

Every predictor scores each query block by its **pooled (mean) query**
``qbar_i = mean(q[i*M : (i+1)*M])`` and keeps, per query block, the key tiles that carry the top
``top_p`` of that query's softmax mass (FG-Attn's "mean q per slice, top-p 0.9" rule):

* **pooled keys** (the default for block masks, ``kv_tile == q_block``): keys are pooled per
  tile too, ``kbar_j``, and a tile's log-mass is estimated as ``qbar_i . kbar_j * scale +
  log(keys in tile)``. Cost: an ``(S/M) x (S/N)`` score grid, tiny for blocks. Selection is the
  exact smallest set whose softmax mass reaches ``top_p`` (PyTorch: a sort per query block; the
  fused Triton kernel finds the same cut by bisection on the masses' float bits).
* **per-key** (the default for fine masks, ``kv_tile < q_block``, down to 1): the pooled query
  is scored against every key, ``s = qbar_i . k_c * scale``, and a tile's log-mass is the
  log-sum-exp of its keys' scores, exact for the pooled query. Cost: ``(S/M) x S`` scores, 1/(2M)
  of the FLOPs of dense attention, never held for more than a chunk of query blocks at once.
  Selection sorts nothing; it finds a mass threshold (below).

Per-key threshold search (no sort of S keys). Keeping "the smallest set reaching top_p" is the
same as keeping every tile whose mass is at least the largest threshold tau with
``f(tau) = sum of tile masses >= tau  >=  top_p``. Three passes over the keys find it::

    pass 1  per query block: lse, and per group of 64 keys: max tile mass m_g, group mass P_g
            -> tau_hi: f(tau) <= sum_{g: m_g >= tau} P_g          (upper bracket)
               tau_lo: f(tau) >= sum_g max(P_g - n_g tau, 0), and
                       f(tau) >= sum_{g: m_g >= tau} m_g          (lower bracket, always valid)
    pass 2  exact f at `candidates` thresholds spaced evenly in log(tau) over [tau_lo, tau_hi];
            keep the largest one with f >= top_p; repeated `refine` times inside the winning gap
    pass 3  emit every tile with mass >= tau (plus the forced tiles); without budgets, for groups
            of a few tiles (64x16), the Triton passes fold this into the last pass 2, which
            stores each tile's threshold count

The result is a superset of the exact smallest set: it contains every tile of mass above tau* and
possibly some of mass in [tau, tau*), where tau is within a factor ``(tau_hi / tau_lo) **
(1 / candidates ** (refine + 1))`` of tau* (a few percent more tiles in practice). Its mass is
always >= top_p (up to float rounding). For block masks with per-key scoring each group is one
tile, the bracket is exact, and the set is the exact smallest one. Sets for different top_p are
nested exactly with pooled keys and for block masks; for fine per-key masks, up to that
resolution.

Budgets. After the rule, ``min_keep`` / ``max_keep`` bound the number of rule-chosen tiles per
query block. With pooled keys (and in :func:`oracle_mask`) the bound is exact: a row outside it
keeps its ``k`` heaviest tiles (ties towards lower tile ids). With per-key scoring a row outside
it gets a new threshold found by counting, in the same passes over the keys (no sort, no host
read)::

    over the cap  (rule count > max_keep): bracket [rule threshold, heaviest tile]
    under the floor (rule count < min_keep): bracket [a threshold keeping >= min_keep, rule threshold]
                  (the min_keep-th largest pass-1 group max, else 100 below the rule threshold)
    round r       count the tiles >= each of T = _BUDGET_CANDIDATES thresholds in the bracket
                  (evenly spaced; a min_keep row's first round halves the distance to the rule
                  threshold at each step) and keep the gap where the count crosses the budget;
                  _BUDGET_ROUNDS = 3 rounds
    answer        the gap's safe end

so a row over the cap keeps **at most max_keep** tiles, and one under the floor **at least
min_keep**, also under ties (a tie across the bound is dropped whole, or kept whole). The result is
a threshold set within the search's resolution ``w`` (log-mass) of the budget: over the cap it
keeps every tile heavier than the (max_keep+1)-th heaviest by more than ``w = (heaviest - rule
threshold) / T**3`` (the rule threshold is at most 87.5 below the row's log-sum-exp, so ``w <
0.022`` always: every tile more than 2.2% heavier); under the floor no tile lighter than the
min_keep-th heaviest by more than ``w = max(rule threshold - that tile, (initial width) / 2**15)
/ T**2``. With distinct tile masses that is the budget up to the few tiles in a gap of width
``w`` (on random data, ``max_keep`` or a tile or two less). Rows inside the budget keep the rule's
threshold and cost the search nothing on Triton (their thresholds are ``+inf``, and a program of
such rows skips every group). Should ties make both bounds impossible at once (more than
``max_keep - min_keep + 1`` tiles tie at the cap), min_keep wins.

Then forced tiles are added: the diagonal (the key tiles at the query block's own positions) and, with ``text_tokens``,
every text key tile and every tile of query blocks holding text queries. Finally a head whose
density exceeds ``dense_above`` is rounded up to full, because the dispatcher runs full heads on
dense SDPA, which is faster than any sparse kernel above the crossover density.

Picture (one head, query blocks of 2 tiles, top_p = 0.8; numbers are tile masses x 100)::

    tile:  0  1  2  3  4  5  6  7
    qb 0: 60 20 10  4  3  1  1  1   -> keep 0, 1           (80; diagonal 0, 1 already in)
    qb 2:  2  3  5 10 30 15 30  5   -> keep 3, 4, 5, 6     (85; diagonal 4, 5 already in)
    qb 3: 50 31  2  3  4  1  5  4   -> keep 0, 1           (81), plus the diagonal 6, 7
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Hashable

import torch

from ._checks import check_block_sizes, check_nonnegative_int, check_positive_int, check_qkv, check_scale, check_tensor
from .mask import SparseMask, _note_full_heads

log = logging.getLogger("dbsp")

# Density above which a predicted head is rounded up to a full (dense) head. A placeholder until
# the kernel benchmark measures where dbsp's sparse kernel stops beating dense cuDNN SDPA.
DENSE_CROSSOVER = 0.6

# Keys per pass-1 summary group (the bracket's resolution); a multiple of kv_tile is used.
_GROUP_KEYS = 64

# Thresholds sit this far (in log-mass) below the tile masses they are derived from.
_NUDGE = 1e-4

# Budget search (min_keep / max_keep, per-key scoring): thresholds counted per round, rounds, and
# the min_keep bracket's width below the rule threshold when pass 1 has fewer groups than
# min_keep (in log-mass). Read at call time, so benchmarks can sweep them.
_BUDGET_CANDIDATES = 16
_BUDGET_ROUNDS = 3
_BUDGET_SPAN = 100.0

# Score elements held at once per chunk by the torch passes (32 MB of fp32).
_CHUNK_ELEMENTS = 1 << 23
# Pooled dot products per bmm + select launch of the fused path (64 MiB of float32): one launch
# pair covers every head of Wan2.1-1.3B 480p at 64x16.
_FUSED_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PredictConfig:
    """Settings of :func:`predict_mask` (see its docstring for each field).

    Validated on construction; ``ValueError``/``TypeError`` name the field and the value.
    """

    q_block: int = 64
    kv_tile: int = 64
    top_p: float = 0.9
    min_keep: int = 1
    max_keep: int | None = None
    keep_diagonal: bool = True
    dense_above: float | None = DENSE_CROSSOVER
    pool_keys: bool | None = None
    text_tokens: int = 0
    scale: float | None = None
    candidates: int = 8
    refine: int = 1
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_block_sizes(self.q_block, self.kv_tile)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a float in (0, 1], got {type(self.top_p).__name__}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        check_nonnegative_int("min_keep", self.min_keep)
        if self.max_keep is not None:
            check_positive_int("max_keep", self.max_keep)
            if self.max_keep < self.min_keep:
                raise ValueError(f"max_keep must be >= min_keep, got max_keep={self.max_keep}, min_keep={self.min_keep}")
        if not isinstance(self.keep_diagonal, bool):
            raise TypeError(f"keep_diagonal must be a bool, got {self.keep_diagonal!r}")
        if self.pool_keys is not None and not isinstance(self.pool_keys, bool):
            raise TypeError(f"pool_keys must be a bool or None, got {self.pool_keys!r}")
        if self.dense_above is not None:
            if isinstance(self.dense_above, bool) or not isinstance(self.dense_above, (int, float)):
                raise TypeError(f"dense_above must be a float or None, got {self.dense_above!r}")
            if not (0.0 <= self.dense_above <= 1.0):
                raise ValueError(f"dense_above must lie in [0, 1], got {self.dense_above}")
        check_nonnegative_int("text_tokens", self.text_tokens)
        check_scale(self.scale)
        check_positive_int("candidates", self.candidates)
        if self.candidates < 2:
            raise ValueError(f"candidates must be >= 2, got {self.candidates}")
        check_nonnegative_int("refine", self.refine)
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {self.backend!r}")

    @property
    def uses_pooled_keys(self) -> bool:
        """Whether keys are pooled per tile (``pool_keys``; default: only for block masks)."""
        return self.kv_tile == self.q_block if self.pool_keys is None else self.pool_keys


def block_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x`` over consecutive blocks of ``block`` tokens (the last block may be partial).

    Args:
        x: ``(B, S, H, D)``.
        block: tokens per block (>= 1).

    Returns:
        ``(B, ceil(S / block), H, D)`` float32; a partial last block is averaged over its real
        tokens only.
    """
    check_tensor("x", x)
    check_positive_int("block", block)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, S, H, D), got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    whole = S // block
    # Sum in float32 without materialising a float32 copy of x (it can be hundreds of MB).
    parts = []
    if whole:
        parts.append(x[:, : whole * block].reshape(B, whole, block, H, D).sum(dim=2, dtype=torch.float32) / block)
    if S > whole * block:
        parts.append(x[:, whole * block :].sum(dim=1, keepdim=True, dtype=torch.float32) / (S - whole * block))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def predict_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_block: int = 64,
    kv_tile: int = 64,
    top_p: float = 0.9,
    min_keep: int = 1,
    max_keep: int | None = None,
    keep_diagonal: bool = True,
    dense_above: float | None = DENSE_CROSSOVER,
    pool_keys: bool | None = None,
    text_tokens: int = 0,
    scale: float | None = None,
    candidates: int = 8,
    refine: int = 1,
    backend: str = "auto",
) -> SparseMask:
    """Predict which (query block, key tile) pairs carry the attention, without training.

    See the module docstring for the algorithm and a picture.

    Args:
        q: ``(B, Sq, H, D)`` queries (RoPE applied, as the attention sees them).
        k: ``(B, Skv, H, D)`` keys, same dtype and device.
        q_block: M, query rows per block. Default: 64.
        kv_tile: N, keys per tile: ``N == M`` gives a block mask, ``N < M`` (down to 1) a
            fine-grained one; N must divide M. Default: 64.
        top_p: softmax mass of the pooled query each query block must keep, in (0, 1]; 1.0
            returns the full mask. Default: 0.9.
        min_keep: at least this many rule-chosen tiles per query block. Default: 1.
        max_keep: at most this many rule-chosen tiles per query block (forced tiles come on top).
            Default: None (no cap). Both bounds are strict, also under ties. Pooled keys keep
            exactly the budget's heaviest tiles; per-key scoring keeps a threshold set found by
            counting, the budget up to the tiles within the search's resolution (module docstring,
            "Budgets"): at most max_keep and every tile more than ~2% heavier than the
            (max_keep+1)-th.
        keep_diagonal: always keep the key tiles at the query block's own token positions.
            Default: True.
        dense_above: round a head up to full when its predicted density exceeds this; None
            never rounds. Default: ``DENSE_CROSSOVER`` (0.6, to be replaced by the measured
            crossover of the sparse kernel against dense SDPA).
        pool_keys: score pooled key tiles instead of single keys. Default: None = True for
            block masks, False for fine-grained ones.
        text_tokens: the last ``text_tokens`` tokens are text/condition tokens: every query block
            keeps their key tiles, and query blocks holding text queries keep everything.
            Default: 0.
        scale: softmax scale of the scores. Default: ``1 / sqrt(D)``.
        candidates: thresholds evaluated per pass of the per-key threshold search (>= 2).
            Default: 8.
        refine: extra passes of the threshold search inside the winning gap. Default: 1.
        backend: ``"torch"``, ``"triton"`` (CUDA only) or ``"auto"`` (Triton on CUDA when
            available). Both compute the same masks. Default: ``"auto"``.

    Returns:
        A ``SparseMask`` with ``batch=B, heads=H, seq_len_q=Sq, seq_len_kv=Skv`` on ``q.device``.

    Example::

        >>> from dbsp.video import make_workload
        >>> w = make_workload("cpu-tiny")
        >>> m = predict_mask(w.q, w.k, q_block=64, kv_tile=1, top_p=0.9)
        >>> m.kv_tile, m.seq_len_q
        (1, 320)
    """
    cfg = PredictConfig(
        q_block=q_block, kv_tile=kv_tile, top_p=top_p, min_keep=min_keep, max_keep=max_keep,
        keep_diagonal=keep_diagonal, dense_above=dense_above, pool_keys=pool_keys,
        text_tokens=text_tokens, scale=scale, candidates=candidates, refine=refine, backend=backend,
    )
    return _predict(q, k, cfg)


def _predict(q: torch.Tensor, k: torch.Tensor, cfg: PredictConfig, pooled: tuple | None = None) -> SparseMask:
    """``predict_mask`` with a checked config; ``pooled`` = ``(qbar, kbar)`` from :func:`_pool_pair`
    of the same q and k (a MaskPredictor miss has them already)."""
    B, Sq, Skv, H, D = check_qkv(q, k)
    if cfg.text_tokens > min(Sq, Skv):
        raise ValueError(f"text_tokens={cfg.text_tokens} exceeds the sequence (Sq={Sq}, Skv={Skv})")
    M, N = cfg.q_block, cfg.kv_tile
    if cfg.top_p >= 1.0:
        return SparseMask.full(B, H, Sq, Skv, q_block=M, kv_tile=N, device=q.device)
    scale = 1.0 / math.sqrt(D) if cfg.scale is None else cfg.scale
    fused = _fused(cfg, q.device, -(-Skv // N) if cfg.uses_pooled_keys else 0)
    if pooled is None or (cfg.uses_pooled_keys and N != M):
        pooled = _pool_pair(q, k, M, N if cfg.uses_pooled_keys else None, fused)
    qbar, kbar = pooled
    full = None  # per (batch, head): keeps every tile, where the kernels read it with the tile count
    if cfg.uses_pooled_keys and fused:
        offsets, indices, full = _predict_pooled_fused(qbar, kbar, Sq, Skv, scale, cfg)
        return _with_full_heads(SparseMask._unchecked(offsets, indices, q_block=M, kv_tile=N, seq_len_q=Sq,
                                                      seq_len_kv=Skv), full)
    qbar = qbar.reshape(B * H, -1, D)  # (B, H, Mq, D) -> (BH, Mq, D)
    offsets = None
    if cfg.uses_pooled_keys:
        counts, indices = _predict_pooled(qbar, kbar.reshape(B * H, -1, D), Sq, Skv, scale, cfg)
    else:
        counts, indices, full, offsets = _predict_per_key(qbar, k, Sq, Skv, scale, cfg)
    if offsets is None:  # not yet rounded up, no offsets yet
        counts = counts.reshape(B, H, -1)
        if cfg.dense_above is not None:
            counts, indices = _round_up_dense_heads(counts, indices, Sq, Skv, cfg)
        offsets = _offsets(counts)
    else:
        offsets = offsets.reshape(B, H, -1)
    return _with_full_heads(SparseMask._unchecked(offsets, indices, q_block=M, kv_tile=N, seq_len_q=Sq,
                                                  seq_len_kv=Skv), full)


def _with_full_heads(mask: SparseMask, full: list | None) -> SparseMask:
    """``mask``, with its full heads recorded for sparse_attention's schedule where ``full`` (per
    (batch, head), batch-major) says which (batch, head) keep every tile; a head is full when it is
    in every batch."""
    if full is None:
        return mask
    B, H = mask.batch, mask.heads
    return _note_full_heads(mask, [h for h in range(H) if all(full[b * H + h] for b in range(B))])


def _fused(cfg: PredictConfig, device: torch.device, pooled_tiles: int) -> bool:
    """Whether the fused Triton kernels (pooling, and for pooled keys the selection) run.

    ``"auto"``: on CUDA when Triton imports and the tiles per query block (``pooled_tiles``, 0 for
    per-key scoring) fit the select kernel. Both backends compute the same masks (up to float
    rounding at the top_p cut), so this only picks speed.
    """
    if cfg.backend == "torch":
        return False
    usable = _triton_usable(cfg, device)
    from .kernels import predict_pooled  # importable: _triton_usable checked

    fits = pooled_tiles <= predict_pooled.MAX_TILES
    if cfg.backend == "triton":
        if not fits:
            raise ValueError(
                f"backend='triton' scores pooled keys for at most {predict_pooled.MAX_TILES} key tiles per query "
                f"block, got {pooled_tiles}; use a larger kv_tile, pool_keys=False or backend='torch'"
            )
        return True
    return usable and fits and device.type == "cuda"


def _triton_usable(cfg: PredictConfig, device: torch.device) -> bool:
    """Whether the predictor's Triton kernels can run on ``device`` (Triton installed, and CUDA
    tensors or the interpreter); with ``backend="triton"`` a clear error where they cannot."""
    try:
        from .kernels import predict_select
    except ImportError:
        predict_select = None
    usable = predict_select is not None and (device.type == "cuda" or predict_select.is_interpreted())
    if cfg.backend == "triton" and not usable:
        raise ValueError(
            f"backend='triton' needs Triton (pip install 'dbsp[triton]') and CUDA tensors (or TRITON_INTERPRET=1 "
            f"set before importing dbsp); got device {device}"
        )
    return usable


def _pool_pair(q: torch.Tensor, k: torch.Tensor, q_block: int, kv_tile: int | None, fused: bool,
               old: tuple | None = None) -> tuple:
    """Pooled ``(qbar, kbar)``, each ``(B, H, blocks, D)`` float32: q per ``q_block`` tokens, k per
    ``kv_tile`` tokens (None: k is not pooled). With ``old`` (an earlier pair of the same shapes)
    also returns the largest relative change of the pair (see :class:`MaskPredictor`)."""
    if not fused:
        qbar = block_pool(q, q_block).permute(0, 2, 1, 3)
        kbar = None if kv_tile is None else block_pool(k, kv_tile).permute(0, 2, 1, 3)
        if old is None:
            return qbar, kbar
        return qbar, kbar, max(_relative_change(qbar, old[0]), _relative_change(kbar, old[1]))
    from .kernels import predict_pooled

    B, _, H, _ = q.shape
    acc = None if old is None else torch.zeros(2, B * H, 2, dtype=torch.float32, device=q.device)
    qbar = predict_pooled.pool(q, q_block, None if old is None else old[0], None if acc is None else acc[0])
    kbar = None
    if kv_tile is not None:
        kbar = predict_pooled.pool(k, kv_tile, None if old is None else old[1], None if acc is None else acc[1])
    if old is None:
        return qbar, kbar
    num, den = acc[..., 0].sqrt(), acc[..., 1].sqrt().clamp_min(1e-30)
    return qbar, kbar, float((num / den).max())


# ------------------------------------------------------------------------------ shared pieces


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Chained global CSR offsets ``(B, H, Mq + 1)`` from per-row counts ``(B, H, Mq)``."""
    B, H, mq = counts.shape
    flat = torch.zeros(B * H * mq + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.reshape(-1).to(torch.int64), 0, out=flat[1:])
    idx = torch.arange(B * H, device=counts.device)[:, None] * mq + torch.arange(mq + 1, device=counts.device)
    return flat[idx].reshape(B, H, mq + 1)


@dataclass(frozen=True)
class _Forced:
    """Tiles kept regardless of scores: the diagonal and the text tokens' tiles."""

    q_block: int
    kv_tile: int
    seq_len_q: int
    seq_len_kv: int
    keep_diagonal: bool
    text_tokens: int

    def tiles(self, rows: torch.Tensor, mq: int, nt: int) -> torch.Tensor:
        """``(len(rows), nt)`` bool for the query blocks ``rows % mq``."""
        M, N = self.q_block, self.kv_tile
        qb = (rows % mq)[:, None]
        j = torch.arange(nt, device=rows.device)[None, :]
        forced = torch.zeros(rows.numel(), nt, dtype=torch.bool, device=rows.device)
        if self.keep_diagonal:
            # Tiles overlapping the block's own token positions [qb * M, (qb + 1) * M).
            forced |= (j * N < (qb + 1) * M) & ((j + 1) * N > qb * M)
        if self.text_tokens:
            forced |= (j + 1) * N > self.seq_len_kv - self.text_tokens
            forced |= (qb + 1) * M > self.seq_len_q - self.text_tokens
        return forced


def _forced(cfg: PredictConfig, Sq: int, Skv: int) -> _Forced:
    return _Forced(cfg.q_block, cfg.kv_tile, Sq, Skv, cfg.keep_diagonal, cfg.text_tokens)


def _budget_counts(n_keep: torch.Tensor, nt: int, cfg: PredictConfig) -> torch.Tensor:
    lo = min(cfg.min_keep, nt)
    n_keep = n_keep.clamp(min=lo)
    if cfg.max_keep is not None:
        n_keep = n_keep.clamp(max=cfg.max_keep)
    return n_keep


def _exact_top_p(logm: torch.Tensor, top_p: float, cfg: PredictConfig) -> torch.Tensor:
    """``(R, nt)`` bool: per row the smallest set of tiles whose softmax mass reaches top_p,
    clamped to the min/max budgets (ties broken towards lower tile ids)."""
    R, nt = logm.shape
    p = torch.softmax(logm.float(), dim=1)
    order = torch.argsort(p, dim=1, descending=True, stable=True)
    cum = torch.cumsum(torch.gather(p, 1, order), dim=1)
    # Tiles before the one that crosses top_p, plus that one.
    n_keep = ((cum < top_p).sum(dim=1) + 1).clamp(max=nt)
    n_keep = _budget_counts(n_keep, nt, cfg)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(nt, device=logm.device).expand(R, nt))
    return rank < n_keep[:, None]


def _emit(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row counts and concatenated sorted tile ids of a ``(R, nt)`` bool picture."""
    return keep.sum(dim=1), torch.nonzero(keep)[:, 1].to(torch.int32)


def _dense_heads(keys: torch.Tensor, mq: int, M: int, Sq: int, Skv: int, dense_above: float) -> torch.Tensor:
    """``(B*H,)`` bool: heads whose density exceeds ``dense_above``, from the keys each of their
    ``mq`` query blocks keeps (``keys``: ``(B*H*mq,)``; the last block holds ``Sq - (mq-1) M`` queries)."""
    q_rows = torch.full((mq,), M, dtype=torch.int64, device=keys.device)
    q_rows[-1] = Sq - (mq - 1) * M
    per_head = (keys.reshape(-1, mq) * q_rows).sum(dim=1)
    return per_head.to(torch.float64) / (Sq * Skv) > dense_above


def _dense_limit(dense_above: float | None, area: int) -> int:
    """The fewest score entries ``e`` of a head with ``e / area > dense_above`` in float64, as
    :func:`_dense_heads` decides (entries and ``area`` are exact below 2**53, and Python's
    int / int is the correctly rounded float64 quotient, as torch's division of the two); 0 for None."""
    if dense_above is None:
        return 0
    e = max(0, math.floor(dense_above * area))
    while e > 0 and (e - 1) / area > dense_above:
        e -= 1
    while not e / area > dense_above and e <= area:
        e += 1
    return e


def _round_up_dense_heads(counts, indices, Sq, Skv, cfg):
    """Replace every head whose density exceeds ``cfg.dense_above`` by a full head.

    Densities come from the per-row counts (O(rows), no pass over the entries): a row keeps
    ``count * N`` keys, minus the missing keys of the partial last tile when it holds it.
    """
    B, H, mq = counts.shape
    M, N = cfg.q_block, cfg.kv_tile
    nt = -(-Skv // N)
    dev = counts.device
    flat = counts.reshape(-1).to(torch.int64)
    ends = torch.cumsum(flat, 0)
    last = indices[(ends - 1).clamp(min=0)].to(torch.int64) if indices.numel() else torch.zeros_like(ends)
    keys = flat * N - torch.where((flat > 0) & (last == nt - 1), nt * N - Skv, 0)
    dense = _dense_heads(keys, mq, M, Sq, Skv, cfg.dense_above).tolist()
    if not any(dense):
        return counts, indices
    head_ends = ends.reshape(B * H, mq)[:, -1].tolist()
    full = torch.arange(nt, dtype=torch.int32, device=dev).repeat(mq)
    pieces, start = [], 0
    for bh, end in enumerate(head_ends):
        pieces.append(full if dense[bh] else indices[start:end])
        start = end
    new_counts = torch.where(torch.tensor(dense, device=dev)[:, None], nt, counts.reshape(B * H, mq))
    return new_counts.reshape(B, H, mq), torch.cat(pieces)


# ------------------------------------------------------------------------------ pooled keys


def _predict_pooled(qbar, kbar, Sq, Skv, scale, cfg):
    """Pooled query x pooled key tiles, exact top-p per query block.

    Args: ``qbar (BH, Mq, D)``, ``kbar (BH, Nt, D)`` float32. Returns ``(counts (BH*Mq,), indices)``.
    """
    BH, mq, D = qbar.shape
    nt = kbar.shape[1]
    N = cfg.kv_tile
    # log(keys in tile): a tile of n keys with equal scores holds n times one key's mass.
    log_keys = torch.full((nt,), math.log(N), device=qbar.device)
    log_keys[-1] = math.log(Skv - (nt - 1) * N)
    counts, chunks = [], []
    heads_per_chunk = max(1, _CHUNK_ELEMENTS // (mq * nt))
    for h0 in range(0, BH, heads_per_chunk):
        h1 = min(BH, h0 + heads_per_chunk)
        logm = torch.bmm(qbar[h0:h1], kbar[h0:h1].transpose(1, 2)) * scale + log_keys  # (h, Mq, Nt)
        keep = _exact_top_p(logm.reshape(-1, nt), cfg.top_p, cfg)
        rows = torch.arange(h0 * mq, h1 * mq, device=qbar.device)
        keep |= _forced(cfg, Sq, Skv).tiles(rows, mq, nt)
        c, i = _emit(keep)
        counts.append(c)
        chunks.append(i)
    return torch.cat(counts), torch.cat(chunks)


def _predict_pooled_fused(qbar, kbar, Sq, Skv, scale, cfg):
    """The pooled-key rule with the Triton select, offsets and emit kernels (same masks as
    :func:`_predict_pooled` + :func:`_round_up_dense_heads`, up to float rounding at the top_p cut),
    with one host synchronisation (the total tile count, to size the indices, and which heads are
    full, for :func:`dbsp.attention.sparse_attention`'s dense-head split).

    Args: ``qbar (B, H, Mq, D)``, ``kbar (B, H, Nt, D)`` float32. Returns ``(offsets, indices,
    full)``, ``full`` telling per (batch, head) whether it keeps every tile of every row.
    """
    from .kernels import predict_pooled

    B, H, mq, D = qbar.shape
    nt = kbar.shape[2]
    M, N = cfg.q_block, cfg.kv_tile
    BH, rows, dev = B * H, B * H * mq, qbar.device
    q3, k3 = qbar.reshape(BH, mq, D), kbar.reshape(BH, nt, D)
    keep = torch.empty(rows, nt, dtype=torch.int8, device=dev)
    counts = torch.empty(rows, dtype=torch.int32, device=dev)
    totals = torch.zeros(2, BH, dtype=torch.int64, device=dev)  # kept tiles, kept score entries per head
    heads_per_chunk = max(1, _FUSED_CHUNK_ELEMENTS // (mq * nt))
    for h0 in range(0, BH, heads_per_chunk):
        h1 = min(BH, h0 + heads_per_chunk)
        dots = torch.bmm(q3[h0:h1], k3[h0:h1].transpose(1, 2))  # (h, Mq, Nt)
        predict_pooled.select(
            dots.reshape(-1, nt), h0 * mq, keep, counts, totals, mq=mq, Sq=Sq, Skv=Skv, scale=scale,
            top_p=cfg.top_p, lo=min(cfg.min_keep, nt), hi=nt if cfg.max_keep is None else cfg.max_keep, M=M, N=N,
            diagonal=cfg.keep_diagonal, text=cfg.text_tokens,
        )
    # density > dense_above  <=>  entries > limit, decided as _dense_heads' float64 density does
    # (floor(dense_above * Sq * Skv) is one less where the product rounds below an integer).
    limit = None if cfg.dense_above is None else _dense_limit(cfg.dense_above, Sq * Skv) - 1
    offsets, full, host = predict_pooled.offsets(counts, totals, mq=mq, nt=nt, limit=limit)
    host = host.tolist()  # the one device read: the tile total and which heads are full
    indices = predict_pooled.emit(keep, offsets, full, host[0], mq=mq)
    return offsets.reshape(B, H, mq + 1), indices, [bool(x) for x in host[1:]]


# ------------------------------------------------------------------------------ per-key scoring


def group_tiles(M: int, N: int) -> int:
    """Tiles per pass-1 group: one for block masks (so their bracket is exact), else enough
    tiles for about 64 keys. The Triton kernels use the same layout."""
    return 1 if N == M else max(1, _GROUP_KEYS // N)


def _group_layout(nt: int, M: int, N: int, device) -> tuple[int, int, torch.Tensor]:
    """Tiles per pass-1 group, number of groups, and ``(ng,)`` float tiles in each group."""
    gs = group_tiles(M, N)
    ng = -(-nt // gs)
    n_g = torch.full((ng,), float(gs), device=device)
    n_g[-1] = float(nt - (ng - 1) * gs)
    return gs, ng, n_g


class _TorchPasses:
    """The per-key passes in plain PyTorch, chunked over the query blocks of one head at a time.

    ``qbar (BH, Mq, D)`` float32 pooled queries, ``k (B, Skv, H, D)`` keys. Row ``r`` of every
    per-row tensor is query block ``r % Mq`` of head ``r // Mq``. Pooled queries are rounded to
    the keys' dtype before scoring, as the Triton kernels do, so both give the same scores up to
    summation order.
    """

    def __init__(self, qbar, k, heads, N, scale):
        self.qbar, self.k, self.H, self.N, self.scale = qbar, k, heads, N, scale
        self.BH, self.mq, _ = qbar.shape
        self.Skv = k.shape[1]
        self.nt = -(-self.Skv // N)
        self.rows_per_chunk = max(1, _CHUNK_ELEMENTS // self.Skv)

    def _keys(self, bh: int) -> torch.Tensor:
        return self.k[bh // self.H, :, bh % self.H]  # (Skv, D)

    def _score(self, bh: int, qrows: torch.Tensor) -> torch.Tensor:
        kh = self._keys(bh)
        s = (qrows.to(kh.dtype).float() @ kh.float().t()) * self.scale  # (R, Skv)
        return _tile_logmass(s, self.N, self.nt)

    def _chunks(self):
        for bh in range(self.BH):
            for i0 in range(0, self.mq, self.rows_per_chunk):
                i1 = min(self.mq, i0 + self.rows_per_chunk)
                yield bh * self.mq + i0, bh * self.mq + i1, self._score(bh, self.qbar[bh, i0:i1])

    def stats(self, gs: int, ng: int):
        """Pass 1: per group ``gmax (R, ng)`` (max tile log-mass) and ``gsum (R, ng)`` (sum of
        exp(tile log-mass - gmax))."""
        R = self.BH * self.mq
        gmax = torch.empty(R, ng, device=self.qbar.device)
        gsum = torch.empty(R, ng, device=self.qbar.device)
        for r0, r1, logm in self._chunks():
            g = torch.nn.functional.pad(logm, (0, ng * gs - self.nt), value=-math.inf).reshape(r1 - r0, ng, gs)
            mx = g.amax(dim=2)
            gmax[r0:r1] = mx
            gsum[r0:r1] = torch.exp(g - mx[..., None]).sum(dim=2)
        return gmax, gsum

    def thresholds(self, gmax, gsum, n_g, top_p, T):
        """Per row the log-sum-exp ``lse (R,)`` and ``T`` candidate thresholds ``(R, T)`` (:func:`_thresholds`)."""
        return _thresholds(gmax, gsum, n_g, top_p, T)

    def candidates(self, lse: torch.Tensor, theta: torch.Tensor, count: bool = True):
        """Pass 2: mass ``(R, T)`` and (with ``count``, else None) count ``(R, T)`` of tiles with
        log-mass >= ``theta``."""
        R, T = theta.shape
        mass = torch.empty(R, T, device=theta.device)
        cnt = torch.empty(R, T, dtype=torch.int64, device=theta.device) if count else None
        for r0, r1, logm in self._chunks():
            p = torch.exp(logm - lse[r0:r1, None])
            for t in range(T):
                sel = logm >= theta[r0:r1, t : t + 1]
                mass[r0:r1, t] = (p * sel).sum(dim=1)
                if count:
                    cnt[r0:r1, t] = sel.sum(dim=1)
        return mass, cnt

    def counts(self, theta: torch.Tensor) -> torch.Tensor:
        """Budget search passes: ``(R, T)`` int64 count of tiles with log-mass >= ``theta (R, T)``."""
        R, T = theta.shape
        cnt = torch.empty(R, T, dtype=torch.int64, device=theta.device)
        for r0, r1, logm in self._chunks():
            for t in range(T):
                cnt[r0:r1, t] = (logm >= theta[r0:r1, t : t + 1]).sum(dim=1)
        return cnt

    def emit(self, theta_row: torch.Tensor, forced: _Forced):
        """Pass 3: per-row counts and sorted tile ids of tiles with log-mass >= theta_row, or forced."""
        counts, chunks = [], []
        for r0, r1, logm in self._chunks():
            keep = logm >= theta_row[r0:r1, None]
            keep |= forced.tiles(torch.arange(r0, r1, device=logm.device), self.mq, self.nt)
            c, i = _emit(keep)
            counts.append(c)
            chunks.append(i)
        return torch.cat(counts), torch.cat(chunks)


def _tile_logmass(s: torch.Tensor, N: int, nt: int) -> torch.Tensor:
    """``(R, Skv)`` scores -> ``(R, Nt)`` log-sum-exp over each tile's keys."""
    if N == 1:
        return s
    pad = nt * N - s.shape[1]
    s = torch.nn.functional.pad(s, (0, pad), value=-math.inf)
    return torch.logsumexp(s.reshape(s.shape[0], nt, N), dim=2)


def _bracket(lse, gmax, gsum, n_g, top_p):
    """Per row ``(tau_lo, tau_hi)`` with tau_lo <= tau* <= tau_hi (see the module docstring)."""
    R, ng = gmax.shape
    m = torch.exp(gmax - lse[:, None])  # max tile mass per group
    P = m * gsum  # group mass
    ms, order = torch.sort(m, dim=1, descending=True)
    cumP = torch.gather(P, 1, order).cumsum(dim=1)
    i_hi = (cumP < top_p).sum(dim=1).clamp(max=ng - 1)
    tau_hi = ms.gather(1, i_hi[:, None]).squeeze(1)
    # Lower bound (a): every group whose max tile clears tau contributes at least that tile.
    cumM = ms.cumsum(dim=1)
    j = (cumM < top_p).sum(dim=1)
    tau_a = torch.where(j < ng, ms.gather(1, j.clamp(max=ng - 1)[:, None]).squeeze(1), torch.zeros_like(tau_hi))
    # Lower bound (b): a group keeps at least P_g - n_g * tau above tau; solve the piecewise-linear
    # sum_g (P_g - n_g tau)_+ = top_p on the segment between consecutive breakpoints P_g / n_g.
    beta = P / n_g
    bs, ob = torch.sort(beta, dim=1, descending=True)
    A = torch.gather(P, 1, ob).cumsum(dim=1)
    Nn = n_g[ob].cumsum(dim=1)
    tau_i = (A - top_p) / Nn
    nxt = torch.cat([bs[:, 1:], torch.zeros_like(bs[:, :1])], dim=1)
    ok = (tau_i >= 0) & (tau_i <= bs * (1 + 1e-6)) & (tau_i >= nxt * (1 - 1e-6))
    tau_b = torch.where(ok, tau_i, torch.zeros_like(tau_i)).amax(dim=1)
    tau_lo = torch.maximum(tau_a, tau_b)
    return tau_lo, torch.maximum(tau_hi, tau_lo)


def _thresholds(gmax, gsum, n_g, top_p, T):
    """``lse (R,)`` from the pass-1 statistics and ``theta (R, T)``: absolute tile log-mass
    thresholds spaced evenly over the bracket (in log-mass), ascending."""
    lse = torch.logsumexp(gmax + torch.log(gsum), dim=1)
    tau_lo, tau_hi = _bracket(lse, gmax, gsum, n_g, top_p)
    # Bracket ends are masses of actual tiles; a tiny nudge down keeps such a tile on the kept side
    # of the threshold despite the exp/log round trip.
    lo = torch.log(tau_lo.clamp_min(1e-38)) + lse - _NUDGE
    hi = torch.maximum(torch.log(tau_hi.clamp_min(1e-38)) + lse - _NUDGE, lo)
    frac = torch.arange(T, device=gmax.device, dtype=torch.float32) / (T - 1)
    return lse, lo[:, None] + (hi - lo)[:, None] * frac


def _select(mass, theta, top_p):
    """Index of the largest candidate threshold whose kept mass reaches top_p (0 if none)."""
    T = theta.shape[1]
    ok = mass >= top_p
    idx = torch.where(ok, torch.arange(T, device=theta.device), torch.zeros_like(theta, dtype=torch.int64))
    return idx.amax(dim=1)


def _passes(qbar, k, heads, M, N, scale, backend):
    if backend == "triton":
        from .kernels import predict_select  # imported lazily: Triton is optional

        return predict_select.TritonPasses(qbar, k, heads, N, scale, group_tiles=group_tiles(M, N))
    return _TorchPasses(qbar, k, heads, N, scale)


_warned_fallback = False


def _resolve_backend(cfg: PredictConfig, device: torch.device, M: int, N: int, D: int) -> str:
    """``"triton"`` or ``"torch"``; both compute the same masks, so "auto" only picks speed."""
    global _warned_fallback
    if cfg.backend == "torch":
        return "torch"
    usable = _triton_usable(cfg, device)
    if usable:
        from .kernels import predict_select
    if cfg.backend == "triton":
        if not predict_select.supports(N * group_tiles(M, N), N, D):
            raise ValueError(
                f"backend='triton' needs a power-of-two kv_tile, groups of >= 16 keys and 16 <= D <= 256; "
                f"got q_block={M}, kv_tile={N}, D={D}"
            )
        return "triton"
    if usable and device.type == "cuda" and predict_select.supports(N * group_tiles(M, N), N, D):
        return "triton"
    if not _warned_fallback:
        log.info("predict_mask: per-key passes run in PyTorch (the Triton passes need CUDA)")
        _warned_fallback = True
    return "torch"


def _budget_thresholds(passes, gmax, theta_rule, n_rule, nt, cfg):
    """Per-row thresholds that bring the rule's tile counts ``n_rule (R,)`` (at ``theta_rule (R,)``)
    into ``[min_keep, max_keep]`` by counting (the module docstring's "Budgets"); rows inside the
    budget keep ``theta_rule``. All on the device: no host read, a fixed number of passes.

    Each row searches a bracket ``[lo, hi]`` with ``count(lo) >= need > count(hi)``, where ``need``
    is ``max_keep + 1`` for rows over the cap and ``min_keep`` for rows under the floor: a round
    counts the tiles at ``_BUDGET_CANDIDATES`` thresholds ``lo + (hi - lo) * i / T`` and keeps the
    gap where the count crosses ``need``. The answer is the safe end: ``hi`` (at most max_keep) or
    ``lo`` (at least min_keep). Rows needing no search get ``+inf`` thresholds, which the Triton
    counts kernel skips.
    """
    T, rounds = _BUDGET_CANDIDATES, _BUDGET_ROUNDS
    k_min = min(cfg.min_keep, nt)
    too_few = n_rule < k_min
    if cfg.max_keep is None:
        too_many = torch.zeros_like(too_few)
    else:
        too_many = n_rule > cfg.max_keep
    need = torch.where(too_many, (cfg.max_keep or 0) + 1, k_min)
    # Over the cap: from the rule threshold (too many tiles) to just above the heaviest tile (none).
    # Under the floor: from a threshold that keeps at least min_keep tiles to the rule threshold. The
    # min_keep-th largest group max is one (that many groups hold a tile at least as heavy), else a
    # wide guess, checked by the first round (failing it, the row keeps every tile).
    if k_min >= 1 and gmax.shape[1] >= k_min:
        floor = gmax.topk(k_min, dim=1).values[:, -1] - _NUDGE
    else:
        floor = theta_rule - _BUDGET_SPAN
    lo = torch.where(too_many, theta_rule, floor)
    hi = torch.where(too_many, gmax.amax(dim=1) + _NUDGE, theta_rule)
    c_hi = torch.where(too_many, 0, n_rule)
    active = too_many | too_few
    i = torch.arange(T, device=theta_rule.device, dtype=torch.float32)
    even = i / T
    # A min_keep row's first round halves the distance to the rule threshold at each step, as its
    # floor may be far below, while the min_keep-th tile is usually close to the rule threshold.
    halving = torch.where(too_few[:, None], 1 - 0.5**i, even)
    for r in range(rounds):
        frac = halving if r == 0 else even
        grid = torch.where(active[:, None], lo[:, None] + (hi - lo)[:, None] * frac, math.inf)  # (R, T) ascending
        c = passes.counts(grid)
        n = (c >= need[:, None]).sum(dim=1)  # counts fall along the grid: a prefix holds
        below, above = (n - 1).clamp(min=0)[:, None], n.clamp(max=T - 1)[:, None]
        # No candidate holds f: a rule row's lo still does (its rule pass counted it); a min_keep
        # row's guessed floor failed, and -inf keeps every tile.
        new_lo = torch.where(n > 0, grid.gather(1, below).squeeze(1), torch.where(too_many, lo, -math.inf))
        new_hi = torch.where(n < T, grid.gather(1, above).squeeze(1), hi)
        new_c = torch.where(n < T, c.gather(1, above).squeeze(1), c_hi)
        lo, hi, c_hi = (torch.where(active, a, b) for a, b in ((new_lo, lo), (new_hi, hi), (new_c, c_hi)))
        active = active & (lo > -math.inf)
    # At most max_keep (hi) unless ties leave fewer than min_keep there; at least min_keep (lo).
    over = too_many & (c_hi >= k_min)
    return torch.where(over, hi, torch.where(too_many | too_few, lo, theta_rule))


def _predict_per_key(qbar, k, Sq, Skv, scale, cfg):
    """Pooled query x every key, threshold search. Returns ``(counts (BH*Mq,), indices, full,
    offsets)``. The Triton passes (else None for both) give ``full``, whether each (batch, head)
    keeps every tile, and the chained row offsets ``(1, BH, Mq + 1)``, with heads above
    ``cfg.dense_above`` already rounded up to full; the PyTorch passes leave that to the caller.

    ``qbar (B*H, Mq, D)`` float32; ``k (B, Skv, H, D)``.
    """
    BH, mq, D = qbar.shape
    N = cfg.kv_tile
    nt = -(-Skv // N)
    passes = _passes(qbar, k, k.shape[2], cfg.q_block, N, scale, _resolve_backend(cfg, qbar.device, cfg.q_block, N, D))
    gs, ng, n_g = _group_layout(nt, cfg.q_block, N, qbar.device)

    gmax, gsum = passes.stats(gs, ng)
    T = cfg.candidates
    lse, theta = passes.thresholds(gmax, gsum, n_g, cfg.top_p, T)
    budgets = cfg.min_keep > 1 or cfg.max_keep is not None  # only budgets need the counts
    forced = _forced(cfg, Sq, Skv)
    torch_passes = isinstance(passes, _TorchPasses)
    # Without budgets the Triton passes may pick and emit in the last candidates pass (same mask).
    emit_in_last_pass = not budgets and not torch_passes and passes.fuses(T)
    for r in range(cfg.refine + 1):
        last = r == cfg.refine
        if last and emit_in_last_pass:
            return passes.select_emit(lse, theta, cfg.top_p, forced, dense_above=cfg.dense_above)
        mass, cnt = passes.candidates(lse, theta, count=budgets and last)
        pick = _select(mass, theta, cfg.top_p)
        if not last:  # the next pass searches the winning gap
            lo = theta.gather(1, pick[:, None]).squeeze(1)
            hi = theta.gather(1, (pick + 1).clamp(max=T - 1)[:, None]).squeeze(1)
            theta = lo[:, None] + (hi - lo)[:, None] * (torch.arange(T, device=qbar.device) / T)
    theta_row = theta.gather(1, pick[:, None]).squeeze(1)
    if budgets:
        theta_row = _budget_thresholds(passes, gmax, theta_row, cnt.gather(1, pick[:, None]).squeeze(1), nt, cfg)

    if torch_passes:
        return (*passes.emit(theta_row, forced), None, None)
    return passes.emit(theta_row, forced, dense_above=cfg.dense_above)


# ------------------------------------------------------------------------------ oracle


def oracle_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_block: int = 64,
    kv_tile: int = 64,
    top_p: float = 0.9,
    min_keep: int = 1,
    max_keep: int | None = None,
    keep_diagonal: bool = False,
    text_tokens: int = 0,
    scale: float | None = None,
) -> SparseMask:
    """The mask a perfect predictor would give: exact top-p on the *true* attention.

    Per query block, the tiles are ranked by their exact attention mass averaged over the block's
    queries (:func:`dbsp.quality.tile_attention_mass`) and the smallest set reaching ``top_p`` is
    kept (budgets and forced tiles as in :func:`predict_mask`; no rounding up of dense heads).
    It costs one dense attention, so use it for studies and tests, not on the hot path.

    Args:
        q: ``(B, Sq, H, D)``; k: ``(B, Skv, H, D)``.
        q_block, kv_tile, top_p, min_keep, max_keep, keep_diagonal, text_tokens, scale: as in
            :func:`predict_mask`, except ``keep_diagonal`` defaults to False (the pure oracle).

    Returns:
        A ``SparseMask``.
    """
    from .quality import tile_attention_mass

    cfg = PredictConfig(
        q_block=q_block, kv_tile=kv_tile, top_p=top_p, min_keep=min_keep, max_keep=max_keep,
        keep_diagonal=keep_diagonal, dense_above=None, text_tokens=text_tokens, scale=scale,
    )
    B, Sq, Skv, H, D = check_qkv(q, k)
    if cfg.text_tokens > min(Sq, Skv):
        raise ValueError(f"text_tokens={cfg.text_tokens} exceeds the sequence (Sq={Sq}, Skv={Skv})")
    mass = tile_attention_mass(q, k, q_block=q_block, kv_tile=kv_tile, scale=scale)  # (B, H, Mq, Nt)
    mq, nt = mass.shape[2], mass.shape[3]
    if top_p >= 1.0:
        keep = torch.ones(B * H * mq, nt, dtype=torch.bool, device=q.device)
    else:
        keep = _exact_top_p(mass.reshape(-1, nt).clamp_min(1e-38).log(), top_p, cfg)
    keep |= _forced(cfg, Sq, Skv).tiles(torch.arange(B * H * mq, device=q.device), mq, nt)
    counts, indices = _emit(keep)
    return SparseMask._unchecked(
        _offsets(counts.reshape(B, H, mq)), indices, q_block=q_block, kv_tile=kv_tile, seq_len_q=Sq, seq_len_kv=Skv
    )


# ------------------------------------------------------------------------------ step reuse


@dataclass(frozen=True)
class PredictorStats:
    """Counters of a :class:`MaskPredictor`: calls that returned a dense (full) mask because of
    ``dense_steps``, reused a previous mask (hits), or predicted a new one (misses)."""

    dense: int
    hits: int
    misses: int

    @property
    def calls(self) -> int:
        """All calls: dense + hits + misses."""
        return self.dense + self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits over the calls that were not dense (0.0 before any)."""
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class _LayerState:
    calls: int = 0
    qbar: torch.Tensor | None = None
    kbar: torch.Tensor | None = None
    mask: SparseMask | None = None
    dtype: torch.dtype | None = None
    last_change: float = math.inf


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """Largest per-(batch, head) relative Frobenius change of pooled ``(B, H, blocks, D)`` stats."""
    num = (new - old).pow(2).sum(dim=(2, 3)).sqrt()
    den = old.pow(2).sum(dim=(2, 3)).sqrt().clamp_min(1e-30)
    return float((num / den).max())


class MaskPredictor:
    """Masks for every layer across denoising steps, reusing a layer's mask while its inputs
    barely change.

    Each call pools q and k per ``q_block`` tokens (cheap: one pass over q and k) and compares them
    with the pooled statistics stored when this layer's mask was last predicted. If for every
    (batch, head) ``||pooled_new - pooled_old|| / ||pooled_old|| <= reuse_threshold`` (Frobenius
    norms, for q and for k), the stored mask is returned (a *hit*); otherwise a new mask is
    predicted and stored (a *miss*). Comparing with the last *prediction*, not the last step, lets
    a slow drift add up until it triggers a new prediction. Inputs of another shape, dtype or
    device are always a miss. Calls with ``step < dense_steps`` return the full mask (early
    denoising steps shape the layout and are commonly kept dense).

    Args:
        reuse_threshold: largest relative change of the pooled q or k that still reuses the mask;
            0 reuses only identical statistics; None never reuses and skips the comparison (and
            its read of a device value, which makes the GPU wait for the host). Default: 0.05 (on
            the synthetic workloads a reused mask then keeps at least ~99% of the attention mass a
            fresh prediction keeps; see benchmarks/bench_predict.py).
        dense_steps: the first ``dense_steps`` steps get full masks. Default: 0.
        **config: :class:`PredictConfig` fields (``q_block``, ``kv_tile``, ``top_p``, ...),
            passed to :func:`predict_mask`.

    Example (``q, k`` of each layer come from the model's attention)::

        pred = MaskPredictor(kv_tile=1, dense_steps=2)
        for step in range(50):
            for layer in range(30):
                mask = pred(q, k, layer=layer, step=step)   # then sparse_attention(q, k, v, mask)
        print(pred.stats)   # PredictorStats(dense=60, hits=..., misses=...)
    """

    def __init__(self, *, reuse_threshold: float | None = 0.05, dense_steps: int = 0, **config) -> None:
        if reuse_threshold is not None:
            if isinstance(reuse_threshold, bool) or not isinstance(reuse_threshold, (int, float)):
                raise TypeError(f"reuse_threshold must be a float >= 0 or None, got {reuse_threshold!r}")
            if not (0.0 <= reuse_threshold < math.inf):
                raise ValueError(f"reuse_threshold must be a finite float >= 0 or None, got {reuse_threshold}")
            reuse_threshold = float(reuse_threshold)
        check_nonnegative_int("dense_steps", dense_steps)
        self.reuse_threshold = reuse_threshold
        self.dense_steps = dense_steps
        self.config = PredictConfig(**config)
        self._layers: dict[Hashable, _LayerState] = {}
        self._dense = self._hits = self._misses = 0

    @property
    def stats(self) -> PredictorStats:
        """Calls so far: dense steps, reuse hits and fresh predictions (misses)."""
        return PredictorStats(self._dense, self._hits, self._misses)

    def last_change(self, layer: Hashable = 0) -> float:
        """The relative change measured at this layer's last call (inf if none was measured)."""
        state = self._layers.get(layer)
        return state.last_change if state else math.inf

    def reset(self) -> None:
        """Forget every stored mask and zero the counters (e.g. before a new video)."""
        self._layers.clear()
        self._dense = self._hits = self._misses = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, layer: Hashable = 0, step: int | None = None) -> SparseMask:
        """The mask for ``layer`` at ``step`` (default: the number of earlier calls for this layer).

        Args:
            q: ``(B, Sq, H, D)``; k: ``(B, Skv, H, D)``.
            layer: any hashable layer id. Default: 0.
            step: denoising step index. Default: count of this layer's previous calls.
        """
        B, Sq, Skv, H, D = check_qkv(q, k)
        state = self._layers.setdefault(layer, _LayerState())
        if step is None:
            step = state.calls
        check_nonnegative_int("step", step)
        state.calls += 1
        cfg = self.config
        if step < self.dense_steps:
            self._dense += 1
            return SparseMask.full(B, H, Sq, Skv, q_block=cfg.q_block, kv_tile=cfg.kv_tile, device=q.device)
        if self.reuse_threshold is None:  # nothing stored, nothing compared
            self._misses += 1
            return _predict(q, k, cfg)
        fused = _fused(cfg, q.device, -(-Skv // cfg.kv_tile) if cfg.uses_pooled_keys else 0)
        old = state.mask
        comparable = (
            old is not None
            and state.qbar.shape == (B, H, -(-Sq // cfg.q_block), D)
            and state.kbar.shape == (B, H, -(-Skv // cfg.q_block), D)
            and state.qbar.device == q.device
            and state.dtype == q.dtype
        )
        if comparable:
            qbar, kbar, state.last_change = _pool_pair(q, k, cfg.q_block, cfg.q_block, fused, old=(state.qbar, state.kbar))
            if state.last_change <= self.reuse_threshold:
                self._hits += 1
                return old
        else:
            qbar, kbar = _pool_pair(q, k, cfg.q_block, cfg.q_block, fused)
            state.last_change = math.inf
        self._misses += 1
        mask = _predict(q, k, cfg, pooled=(qbar, kbar))
        state.qbar, state.kbar, state.mask, state.dtype = qbar, kbar, mask, q.dtype
        return mask
