"""dbsp on diffusers video transformers: one call on an unmodified model, one call to undo it.

``apply(transformer, ...)`` changes exactly these things, and ``remove(transformer)`` undoes them:

* The **self-attention** processor of every selected block is replaced by a dbsp processor. It
  computes q, k and v exactly like the model's own processor, then::

      mask = predictor(q, k)              per layer and denoising step (or a fixed mask)
      plan = planner(mask)                with groups only: db-SP head/block balancing
      out  = sparse_attention(q, k, v, mask)            one process
           | sp_attention(q, k, v, mask, plan=plan)      sequence parallel (Ulysses x Ring)

  and applies the model's output projection. Cross-attention (Wan's ``attn2``) keeps the model's
  processor: dense and exact.
* Joint text + video attention (CogVideoX) keeps the text exact. Only video x video is sparse::

                 keys: text    video
      text  queries [ dense  | dense  ]    exact SDPA
      video queries [ dense  | SPARSE ]    the mask; merged with the text part by log-sum-exp

* With ``groups`` (sequence parallel), diffusers hooks shard the video tokens over the ``P`` ranks
  where diffusers' own context parallelism does (the first block's input and the RoPE tables),
  with ``torch.tensor_split`` sizes as ``dbsp.dist`` expects, and all-gather them after the output
  projection. Everything between runs on ``1/P`` of the tokens and is otherwise untouched; every
  rank returns the full output.
* A hook on the transformer reads ``timestep`` to learn the denoising step.

The denoising step. diffusers transformers see the step only as ``timestep``, so the wrapper counts
distinct timesteps: a forward with the same timestep as the previous one is another *branch* of
the same step (classifier-free guidance runs cond and uncond as two calls), a smaller one starts
the next step, and a larger one starts a new run at step 0 (schedulers count down). Masks and plans
are kept per ``(layer, branch)``. ``handle.reset()`` starts over explicitly.

Supported models: ``WanTransformer3DModel`` (Wan2.1; Wan2.2 pipelines with two transformers need
``apply`` on each) and ``CogVideoXTransformer3DModel``, each with the processor diffusers installs
by default. This is the only dbsp module that imports diffusers, and only when a function runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import record_function

from .._checks import check_block_sizes, check_nonnegative_int, check_positive_int
from ..attention import available_backends, sparse_attention
from ..mask import SparseMask
from ..plan import Plan, PlanCache, WorkSummary, summarize_work
from ..predict import MaskPredictor

__all__ = [
    "AttentionRecord",
    "DbspHandle",
    "FixedDensity",
    "FixedMask",
    "apply",
    "get_handle",
    "random_mask",
    "random_wan_transformer",
    "remove",
    "supported_models",
]

_SUPPORTED = ("WanTransformer3DModel", "CogVideoXTransformer3DModel")

# Elements of random numbers drawn at once by FixedDensity (128 MB of float32).
_RANDOM_CHUNK = 1 << 25


def supported_models() -> tuple[str, ...]:
    """Names of the diffusers transformer classes :func:`apply` supports."""
    return _SUPPORTED


# ---------------------------------------------------------------------------------- mask policies


class FixedMask:
    """The same user-supplied mask for every call (or one mask per layer).

    Args:
        masks: a ``SparseMask`` for every selected layer, or ``{layer index: SparseMask}``. Each
            mask must match the attention it is used for: ``(B, H, S, S)`` with ``S`` the video
            tokens (all of them, also under sequence parallelism, where every rank must pass
            the same mask). It is moved to the attention's device once and kept there.

    Called by the processors as ``policy(q, k, *, layer, step, groups, seq_len)`` (the mask
    policy protocol of :func:`apply`); it ignores everything but ``layer`` and the device.

    Example::

        >>> mask = random_mask(1, 12, 32760, density=0.2, q_block=128, kv_tile=1, device="cuda")
        >>> handle = apply(transformer, predictor=FixedMask(mask))
    """

    def __init__(self, masks: SparseMask | Mapping[int, SparseMask]) -> None:
        if isinstance(masks, SparseMask):
            self._masks: dict[Any, SparseMask] = {None: masks}
        elif isinstance(masks, Mapping):
            for key, value in masks.items():
                if isinstance(key, bool) or not isinstance(key, int):
                    raise TypeError(f"FixedMask keys must be layer indices (int), got {key!r}")
                if not isinstance(value, SparseMask):
                    raise TypeError(f"FixedMask values must be SparseMask, got {type(value).__name__} for layer {key}")
            self._masks = dict(masks)
        else:
            raise TypeError(f"masks must be a SparseMask or a mapping of layer -> SparseMask, got {type(masks).__name__}")
        self._on_device: dict[tuple[Any, torch.device], SparseMask] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, step: int, groups=None, seq_len=None) -> SparseMask:
        key = None if None in self._masks else layer
        if key not in self._masks:
            raise ValueError(f"FixedMask has masks for layers {sorted(self._masks)} but not for layer {layer}")
        cached = self._on_device.get((key, q.device))
        if cached is None:
            cached = self._masks[key] if self._masks[key].device == q.device else self._masks[key].to(q.device)
            self._on_device[(key, q.device)] = cached
        return cached

    def __repr__(self) -> str:
        layers = "all layers" if None in self._masks else f"layers {sorted(self._masks)}"
        return f"FixedMask({layers})"


class FixedDensity:
    """Random key tiles at a fixed density: masks for speed measurements, not for quality.

    Every (batch, head, query block) keeps each key tile with probability ``density``
    (independently), drawn from a generator seeded with ``seed`` (and the layer index when
    ``per_layer``), on the attention's device. Equal arguments give equal masks on every rank of
    the same device type, as sequence parallelism requires. A mask is built once per layer (or
    once for all layers) and shape, then reused, so steady-state calls cost nothing. Called as
    ``policy(q, k, *, layer, step, groups, seq_len)`` like every mask policy of :func:`apply`.

    Args:
        density: probability of keeping a key tile, in (0, 1].
        q_block: M, query rows per block. Default: 64.
        kv_tile: N, keys per tile (1 = fine-grained, ``q_block`` = block mask). Default: 1.
        seed: base seed. Default: 0.
        per_layer: a different random mask per layer (else one mask for every layer, which is
            as fast and holds one mask in memory instead of one per layer). Default: False.

    Example (the benchmark's fine-grained target case)::

        >>> handle = apply(transformer, predictor=FixedDensity(0.2, q_block=128, kv_tile=1))
    """

    def __init__(self, density: float, *, q_block: int = 64, kv_tile: int = 1, seed: int = 0, per_layer: bool = False):
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {density}")
        check_positive_int("q_block", q_block)
        check_positive_int("kv_tile", kv_tile)
        if kv_tile > q_block or q_block % kv_tile:
            raise ValueError(f"kv_tile must divide q_block, got q_block={q_block}, kv_tile={kv_tile}")
        check_nonnegative_int("seed", seed)
        if not isinstance(per_layer, bool):
            raise TypeError(f"per_layer must be a bool, got {per_layer!r}")
        self.density, self.q_block, self.kv_tile = float(density), q_block, kv_tile
        self.seed, self.per_layer = seed, per_layer
        self._cache: dict[tuple, SparseMask] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, *, layer: int, step: int, groups=None, seq_len=None) -> SparseMask:
        B, H = q.shape[0], q.shape[2]
        S = q.shape[1] if seq_len is None else seq_len
        key = (layer if self.per_layer else None, B, H, S, q.device)
        mask = self._cache.get(key)
        if mask is None:
            seed = self.seed * 1_000_003 + (layer if self.per_layer else 0)
            mask = random_mask(B, H, S, density=self.density, q_block=self.q_block, kv_tile=self.kv_tile,
                               seed=seed, device=q.device)
            self._cache[key] = mask
        return mask

    def __repr__(self) -> str:
        return (
            f"FixedDensity(density={self.density}, {self.q_block}x{self.kv_tile}, seed={self.seed}, "
            f"per_layer={self.per_layer})"
        )


def random_mask(
    batch: int, heads: int, seq_len: int, *, density: float, q_block: int, kv_tile: int, seed: int = 0,
    device: torch.device | str = "cpu",
) -> SparseMask:
    """A square ``SparseMask`` whose tiles are kept independently with probability ``density``.

    Built in chunks of query blocks straight into CSR, so it never holds the dense tile picture of
    a large problem (at 64 x 1, S = 75,600 and 40 heads that picture has 3.6 G entries).

    Args:
        batch, heads, seq_len: B, H, S.
        density: keep probability in (0, 1].
        q_block, kv_tile: M and N of the mask.
        seed: seed of the generator on ``device``. Default: 0.
        device: Default: CPU.

    Returns:
        A ``SparseMask`` of ``(B, H, S, S)``; its ``density()`` is ``density`` up to sampling noise.
    """
    for name, value in (("batch", batch), ("heads", heads), ("seq_len", seq_len)):
        check_positive_int(name, value)
    check_block_sizes(q_block, kv_tile)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    device = torch.device(device)
    mq, nt = -(-seq_len // q_block), -(-seq_len // kv_tile)
    rows = batch * heads * mq
    gen = torch.Generator(device=device).manual_seed(seed)
    per_chunk = max(1, _RANDOM_CHUNK // nt)
    counts, indices = [], []
    for r0 in range(0, rows, per_chunk):
        keep = torch.rand(min(per_chunk, rows - r0), nt, generator=gen, device=device) < density
        counts.append(keep.sum(dim=1))
        indices.append(torch.nonzero(keep)[:, 1].to(torch.int32))  # row-major: sorted within each row
    flat = torch.zeros(rows + 1, dtype=torch.int64, device=device)
    torch.cumsum(torch.cat(counts), dim=0, out=flat[1:])
    pick = torch.arange(batch * heads, device=device)[:, None] * mq + torch.arange(mq + 1, device=device)
    # Valid by construction (sorted unique ids per row, chained offsets): skip the O(nnz) check,
    # whose temporaries would be several GB for the 14B 720p fine-grained masks.
    return SparseMask._unchecked(flat[pick].reshape(batch, heads, mq + 1), torch.cat(indices), q_block=q_block,
                                 kv_tile=kv_tile, seq_len_q=seq_len, seq_len_kv=seq_len)


# ---------------------------------------------------------------------------------- records, handle


@dataclass(frozen=True)
class AttentionRecord:
    """What one self-attention call did (kept with ``apply(..., record=True)``).

    Attributes:
        layer: block index. step: denoising step. branch: call of that step (cfg cond/uncond).
        dense_step: the call ran dense because ``step < dense_steps``.
        density: computed fraction of the ``S x S`` video scores (1.0 on dense steps).
        ulysses, ring: the parallel degrees used (1, 1 in one process).
        rho_before, rho_after: sparse imbalance ratio of the mask without and with the plan
            (None in one process).
        rank_work_before, rank_work_after: ``(U, R)`` work per rank (score entries) without and
            with the plan, as nested tuples (None in one process).
    """

    layer: int
    step: int
    branch: int
    dense_step: bool
    density: float
    ulysses: int = 1
    ring: int = 1
    rho_before: float | None = None
    rho_after: float | None = None
    rank_work_before: tuple[tuple[int, ...], ...] | None = None
    rank_work_after: tuple[tuple[int, ...], ...] | None = None


class _State:
    """Mutable state shared by the hooks and processors of one applied transformer."""

    def __init__(self, *, policy, groups, planner, dense_steps: int, backend: str, record: bool):
        self.policy = policy
        self.groups = groups  # None, SPGroups, or {(U, R): SPGroups}
        self.planner = planner
        self.dense_steps = dense_steps
        self.backend = backend
        self.record = record
        self.step = 0
        self.branch = 0
        self.last_timestep: float | None = None
        self.seq_len: int | None = None  # video tokens of the current forward (sequence parallel)
        self.records: list[AttentionRecord] = []
        self.masks: dict[tuple[int, int], SparseMask] = {}
        self._full: dict[tuple, SparseMask] = {}

    # -- the denoising step
    def on_forward(self, timestep) -> None:
        t = _timestep_value(timestep)
        if self.last_timestep is None or t > self.last_timestep:
            self.step, self.branch = 0, 0
        elif t == self.last_timestep:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self.last_timestep = t
        self.seq_len = None

    def reset(self) -> None:
        self.step, self.branch, self.last_timestep, self.seq_len = 0, 0, None, None
        self.records.clear()
        self.masks.clear()
        if isinstance(self.policy, MaskPredictor):
            self.policy.reset()
        if isinstance(self.planner, PlanCache):
            self.planner.clear()

    def full_mask(self, B: int, H: int, Sq: int, Skv: int, device: torch.device) -> SparseMask:
        key = (B, H, Sq, Skv, device)
        mask = self._full.get(key)
        if mask is None:
            mask = self._full[key] = SparseMask.full(B, H, Sq, Skv, q_block=64, device=device)
        return mask

    @property
    def any_groups(self):
        if isinstance(self.groups, Mapping):
            return next(iter(self.groups.values()))
        return self.groups


class DbspHandle:
    """What :func:`apply` installed on one transformer, and what it has recorded since.

    Attributes:
        model: the transformer's class name.
        layers: indices of the blocks whose self-attention dbsp makes sparse.
        predictor: the mask source (as passed to :func:`apply`, or the default predictor).
        planner: the ``PlanCache`` (sequence parallel) or None.
        groups: the ``SPGroups`` (or ``{(U, R): SPGroups}``) or None.
        dense_steps: steps that run dense attention.

    The transformer holds no reference to the handle; :func:`get_handle` finds it again.
    """

    def __init__(self, transformer: torch.nn.Module, model: str, layers: tuple[int, ...], state: _State):
        self._transformer = weakref.ref(transformer)
        self.model = model
        self.layers = layers
        self._state = state

    @property
    def predictor(self):
        """The mask source (as passed to :func:`apply`, or the default predictor)."""
        return self._state.policy

    @property
    def planner(self) -> PlanCache | None:
        """The ``PlanCache`` (sequence parallel), or None."""
        return self._state.planner

    @property
    def groups(self):
        """The ``SPGroups`` (or ``{(U, R): SPGroups}``), or None."""
        return self._state.groups

    @property
    def dense_steps(self) -> int:
        """Denoising steps that run dense attention."""
        return self._state.dense_steps

    @property
    def step(self) -> int:
        """The denoising step of the latest forward (0 before any)."""
        return self._state.step

    @property
    def branch(self) -> int:
        """The call index within the latest step (0 = first call of that step)."""
        return self._state.branch

    @property
    def records(self) -> list[AttentionRecord]:
        """One :class:`AttentionRecord` per self-attention call (empty unless ``record=True``)."""
        return self._state.records

    @property
    def masks(self) -> dict[tuple[int, int], SparseMask]:
        """The latest mask per ``(layer, branch)`` (empty unless ``record=True``)."""
        return self._state.masks

    def reset(self) -> None:
        """Start a new run: step 0, no records, and the predictor's and planner's memory cleared."""
        self._state.reset()

    def remove(self) -> None:
        """Same as ``remove(transformer)``."""
        transformer = self._transformer()
        if transformer is not None:
            remove(transformer)

    def __repr__(self) -> str:
        mode = "one process" if self._state.groups is None else f"sequence parallel over {_world(self._state.groups)} ranks"
        return (
            f"DbspHandle({self.model}, layers={len(self.layers)}, {mode}, predictor={self.predictor!r}, "
            f"dense_steps={self.dense_steps}, step={self.step})"
        )


def _planner_input(mask: SparseMask, ring: int) -> "WorkSummary | SparseMask":
    """What the planner reads for ``mask`` at ring degrees dividing ``ring``: the mask's
    :class:`~dbsp.plan.WorkSummary`, built on the mask's device (only the summary, 3.7 MB at
    Wan2.1-14B 720p, comes to the CPU; checks and re-plans from it cost a fraction of those from
    the mask's dense work); the mask itself where it has fewer query blocks than ``ring``."""
    return mask if mask.num_q_blocks < ring else summarize_work(mask, ring=ring)


def _world(groups) -> int:
    if isinstance(groups, Mapping):
        return next(iter(groups.values())).world_size
    return groups.world_size


def _timestep_value(timestep) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError("timestep is an empty tensor; dbsp reads it to count denoising steps")
        return float(timestep.detach().max())
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        return float(timestep)
    raise TypeError(f"timestep must be a tensor or a number, got {type(timestep).__name__}")


# ---------------------------------------------------------------------------------- the attention


def _dense_with_lse(state: _State, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Exact attention of ``q`` over all of ``k``/``v`` with its lse (``(B, Sq, H, D)``, ``(B, H, Sq)``)."""
    mask = state.full_mask(q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
    return sparse_attention(q, k, v, mask, return_lse=True, backend=state.backend)


def _merge(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from the two partial results."""
    from ..dist import merge_attention

    return merge_attention(out_a, lse_a, out_b, lse_b)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group``, returned as a new tensor.

    Backward passes the gradient through unchanged: the result is replicated and every rank
    computes the same loss from it, the convention of the sequence gather below.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SelfAttention:
    """What every dbsp processor shares: the mask, the plan and the attention call of one layer.

    ``sparse=False`` marks a block left out of ``layers`` under sequence parallelism: its tokens
    are sharded like every other block's, so it runs dense attention through ``sp_attention``.
    """

    def __init__(self, original, layer: int, state: _State, *, sparse: bool = True):
        self.original = original
        self.layer = layer
        self.state = state
        self.sparse = sparse

    def _is_dense_step(self) -> bool:
        return not self.sparse or self.state.step < self.state.dense_steps

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False):
        """Video self-attention of ``(B, S or S_r, H, D)`` q/k/v under this layer's mask."""
        state = self.state
        step, branch = state.step, state.branch
        dense = self._is_dense_step()
        B, H = q.shape[0], q.shape[2]
        S = q.shape[1] if state.groups is None else state.seq_len
        if dense:
            mask = state.full_mask(B, H, S, S, q.device)
        else:
            with record_function("dbsp.mask"):
                mask = self._mask(q, k, step, branch)
        if state.groups is None:
            if state.record and self.sparse:
                self._record(mask, step, branch, dense)
            with record_function("dbsp.self_attention"):
                return sparse_attention(q, k, v, mask, return_lse=return_lse, backend=state.backend)
        with record_function("dbsp.plan"):
            groups, plan = self._plan(mask, branch, dense)
        if state.record and self.sparse:
            self._record(mask, step, branch, dense, groups=groups, plan=plan)
        from ..dist import sp_attention

        with record_function("dbsp.self_attention"):
            return sp_attention(q, k, v, mask, groups=groups, plan=plan, return_lse=return_lse, backend=state.backend)

    def _mask(self, q, k, step: int, branch: int) -> SparseMask:
        state = self.state
        policy = state.policy
        if state.groups is None:
            if isinstance(policy, MaskPredictor):
                return policy(q, k, layer=(self.layer, branch), step=step)
            return policy(q, k, layer=self.layer, step=step, groups=None, seq_len=q.shape[1])
        if isinstance(policy, MaskPredictor):
            from ..dist import predict_mask_sharded

            if step < policy.dense_steps:
                return state.full_mask(q.shape[0], q.shape[2], state.seq_len, state.seq_len, q.device)
            return predict_mask_sharded(q, k, groups=state.any_groups, **dataclasses.asdict(policy.config))
        return policy(q, k, layer=self.layer, step=step, groups=state.groups, seq_len=state.seq_len)

    def _plan(self, mask: SparseMask, branch: int, dense: bool):
        state = self.state
        groups, planner = state.groups, state.planner
        if isinstance(groups, Mapping):
            world = _world(groups)
            plan = planner.get((self.layer, branch), _planner_input(mask, world), world=world)
            chosen = groups.get((plan.ulysses, plan.ring))
            if chosen is None:
                raise ValueError(
                    f"the planner chose ulysses={plan.ulysses}, ring={plan.ring} but groups holds only "
                    f"{sorted(groups)}; pass SPGroups.all_degrees(heads=...) or a single SPGroups"
                )
            return chosen, plan
        if planner is None or dense:
            return groups, None
        return groups, planner.get((self.layer, branch), _planner_input(mask, groups.ring), ulysses=groups.ulysses,
                                   ring=groups.ring)

    def run_original(self, *args):
        """A dense step in one process: the model's own processor, exactly as without dbsp."""
        if self.state.record:
            self.state.records.append(AttentionRecord(self.layer, self.state.step, self.state.branch, True, 1.0))
        return self.original(*args)

    def _record(self, mask: SparseMask, step: int, branch: int, dense: bool, *, groups=None, plan: Plan | None = None):
        state = self.state
        fields: dict[str, Any] = {}
        if groups is not None:
            U, R = groups.ulysses, groups.ring
            identity = Plan.identity(ulysses=U, ring=R, heads=mask.heads, q_block=mask.q_block, seq_len=mask.seq_len_q)
            before = identity.with_tile_work(mask)
            after = before if plan is None else plan.with_tile_work(mask)
            fields = dict(
                ulysses=U, ring=R,
                rho_before=before.imbalance(),
                rho_after=after.imbalance(),
                rank_work_before=tuple(tuple(int(x) for x in row) for row in before.rank_work().tolist()),
                rank_work_after=tuple(tuple(int(x) for x in row) for row in after.rank_work().tolist()),
            )
        state.records.append(AttentionRecord(self.layer, step, branch, dense, 1.0 if dense else mask.density(), **fields))
        state.masks[(self.layer, branch)] = mask


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on ``(B, S, H, D)``: channel pairs ``(2i, 2i+1)`` rotate by the angle whose cos
    and sin ``cos[..., 2i]`` / ``sin[..., 2i+1]`` hold (the tables repeat each angle twice).

    Arithmetic runs in the tables' dtype (float64 in Wan) and rounds once to ``x.dtype``, as the
    model's own processor does, so results are identical; each half is written straight into the
    output (no full-size temporary in the tables' dtype).
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * c - odd * s
    out[..., 1::2] = even * s + odd * c
    return out


class _WanSelfAttnProcessor(_SelfAttention):
    """dbsp self-attention for ``WanAttention`` blocks' ``attn1`` (Wan2.1 / Wan2.2)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError(
                "dbsp's Wan self-attention processor got encoder_hidden_states, attention_mask or extra "
                f"arguments ({sorted(kwargs)}); Wan's attn1 never passes them, so this model is not the "
                "Wan layout dbsp supports"
            )
        if self._is_dense_step() and self.state.groups is None:
            return self.run_original(attn, hidden_states, None, None, rotary_emb)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        # (B, S, H * D) -> (B, S, H, D)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = (_rope_interleaved(x, *rotary_emb) for x in (query, key))
        out = self.attend(query, key, value)
        out = out.flatten(2, 3).type_as(query)  # (B, S, H, D) -> (B, S, H * D)
        return attn.to_out[1](attn.to_out[0](out))


class _CogVideoXSelfAttnProcessor(_SelfAttention):
    """dbsp joint text + video attention for ``CogVideoXBlock.attn1``; text stays exact."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("CogVideoX joint attention needs encoder_hidden_states (the text tokens)")
        if attention_mask is not None:
            raise ValueError("dbsp's CogVideoX processor does not support attention_mask (diffusers' pipelines pass none)")
        if self._is_dense_step() and self.state.groups is None:
            return self.run_original(attn, hidden_states, encoder_hidden_states, None, image_rotary_emb)
        from diffusers.models.embeddings import apply_rotary_emb

        L = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, L + S, C): text first
        B = joint.shape[0]
        query, key, value = attn.to_q(joint), attn.to_k(joint), attn.to_v(joint)
        D = key.shape[-1] // attn.heads
        # (B, L + S, H * D) -> (B, L + S, H, D)
        query, key, value = (x.view(B, -1, attn.heads, D) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = torch.cat([query[:, :L], apply_rotary_emb(query[:, L:], image_rotary_emb, sequence_dim=1)], dim=1)
            key = torch.cat([key[:, :L], apply_rotary_emb(key[:, L:], image_rotary_emb, sequence_dim=1)], dim=1)
        qt, kt, vt = query[:, :L], key[:, :L], value[:, :L]  # text
        qv, kv, vv = query[:, L:], key[:, L:], value[:, L:]  # video (this rank's shard under groups)

        out_vv, lse_vv = self.attend(qv, kv, vv, return_lse=True)
        out_vt, lse_vt = _dense_with_lse(self.state, qv, kt, vt)
        out_v = _merge(out_vv, lse_vv, out_vt, lse_vt)[0].to(query.dtype)
        out_t = self._text_queries(qt, kt, vt, kv, vv, key, value)
        out = torch.cat([out_t, out_v], dim=1).flatten(2, 3)  # (B, L + S, H, D) -> (B, L + S, H * D)
        out = attn.to_out[1](attn.to_out[0](out))
        text, video = out.split([L, out.shape[1] - L], dim=1)
        return video, text

    def _text_queries(self, qt, kt, vt, kv, vv, key, value) -> torch.Tensor:
        """Exact attention of the text queries over every key (text and all video tokens)."""
        groups = self.state.groups
        if groups is None:
            # (B, L, H, D) x (B, L + S, H, D): one dense SDPA in the (B, H, S, D) layout.
            out = F.scaled_dot_product_attention(qt.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            return out.transpose(1, 2)
        # Video keys are sharded: every rank attends to its own shard, and the partial results are
        # merged across ranks by log-sum-exp with all-reduces (identical results on every rank).
        group = self.state.any_groups.world_group
        out_a, lse_a = _dense_with_lse(self.state, qt, kv, vv)  # text x local video keys
        out_b, lse_b = _dense_with_lse(self.state, qt, kt, vt)  # text x text (same on every rank)
        m = lse_a.detach().clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.maximum(m, lse_b.detach())
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)  # (B, H, L)
        num = _AllReduceSum.apply(out_a.float() * wa.transpose(1, 2)[..., None], group)
        den = _AllReduceSum.apply(wa, group)
        num = num + out_b.float() * wb.transpose(1, 2)[..., None]
        den = (den + wb).transpose(1, 2)[..., None]  # (B, H, L) -> (B, L, H, 1)
        return (num / den.clamp_min(torch.finfo(torch.float32).tiny)).to(qt.dtype)


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Split:
    """Shard the sequence axis of some inputs (by forward parameter name) or outputs (by index).

    ``inputs`` / ``outputs`` map to ``(dim, expected_dims)``; a tensor with another number of dims
    is not per-token (e.g. a ``(B,)`` timestep) and passes through, and a tuple is split element
    by element.
    """

    inputs: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    outputs: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class _ModelSpec:
    name: str
    blocks: str  # attribute holding the ModuleList of blocks
    attention: str  # the block's self-attention module
    processor: type
    stock_processors: tuple[str, ...]  # processor classes diffusers installs there by default
    splits: Mapping[str, _Split]  # module path ("" = the transformer) -> split
    gather: tuple[str, int]  # (module path, dim): all-gather its output


def _specs() -> dict[str, _ModelSpec]:
    # Where to shard and gather mirrors the models' diffusers context-parallel plans: Wan splits the
    # RoPE tables and the first block's input and gathers after proj_out (WanTransformer3DModel.
    # _cp_plan); CogVideoX has no such plan, so the same places are named here: its RoPE tables
    # arrive as a forward argument ((S, D) each), the text stream stays whole on every rank.
    return {
        "WanTransformer3DModel": _ModelSpec(
            "WanTransformer3DModel", "blocks", "attn1", _WanSelfAttnProcessor, ("WanAttnProcessor",),
            splits={
                "": _Split(inputs={"timestep": (1, 2)}),  # only Wan2.2 TI2V's per-token (B, S) timesteps
                "rope": _Split(outputs={0: (1, 4), 1: (1, 4)}),
                "blocks.0": _Split(inputs={"hidden_states": (1, 3)}),
            },
            gather=("proj_out", 1),
        ),
        "CogVideoXTransformer3DModel": _ModelSpec(
            "CogVideoXTransformer3DModel", "transformer_blocks", "attn1", _CogVideoXSelfAttnProcessor,
            ("CogVideoXAttnProcessor2_0",),
            splits={
                "": _Split(inputs={"image_rotary_emb": (0, 2)}),
                "transformer_blocks.0": _Split(inputs={"hidden_states": (1, 3)}),
            },
            gather=("proj_out", 1),
        ),
    }


def _spec_for(transformer) -> _ModelSpec:
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError("dbsp.integrations.diffusers needs diffusers >= 0.36: pip install 'dbsp[diffusers]'") from exc
    for name, spec in _specs().items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(transformer, cls):
            return spec
    raise TypeError(
        f"dbsp.integrations.diffusers.apply supports {' and '.join(_SUPPORTED)} (diffusers); "
        f"got {type(transformer).__name__}"
    )


# ---------------------------------------------------------------------------------- hooks


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> tuple[str, ...]:
    return tuple(list(inspect.signature(cls.forward).parameters)[1:])  # without self


def _shard(x: torch.Tensor, dim: int, state: _State) -> torch.Tensor:
    groups = state.any_groups
    size = x.shape[dim]
    if state.seq_len is None:
        state.seq_len = size
    elif state.seq_len != size:
        raise ValueError(
            f"sequence-parallel split found {size} tokens along dim {dim} but {state.seq_len} elsewhere in the "
            f"same forward: this model's layout does not match dbsp's split points for it"
        )
    if size < groups.world_size:
        raise ValueError(f"cannot shard {size} tokens over {groups.world_size} ranks: need at least one token per rank")
    return x.tensor_split(groups.world_size, dim=dim)[groups.rank]


def _split_value(value, dim: int, expected: int, state: _State):
    if isinstance(value, torch.Tensor):
        return _shard(value, dim, state) if value.dim() == expected else value
    if isinstance(value, (tuple, list)):
        return type(value)(_split_value(v, dim, expected, state) for v in value)
    return value


class _GatherSeq(torch.autograd.Function):
    """All-gather of uneven sequence shards along ``dim``; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, sizes: tuple[int, ...], rank: int, group):
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[:rank]), sizes[rank]
        x = x.movedim(dim, 0).contiguous()
        padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None, None, None, None


def _gather(x: torch.Tensor, dim: int, state: _State) -> torch.Tensor:
    from ..dist.layout import shard_sizes

    groups = state.any_groups
    sizes = shard_sizes(state.seq_len, groups.world_size)
    if x.shape[dim] != sizes[groups.rank]:
        raise ValueError(
            f"sequence-parallel gather expected rank {groups.rank}'s shard of {sizes[groups.rank]} tokens along "
            f"dim {dim} (of {state.seq_len}), got {x.shape[dim]}"
        )
    return _GatherSeq.apply(x, dim, sizes, groups.rank, groups.world_group)


@functools.lru_cache(maxsize=None)
def _hook_classes():
    """The diffusers ModelHook subclasses (built on first use: diffusers is imported lazily)."""
    from diffusers.hooks import ModelHook

    class TopHook(ModelHook):
        """Counts denoising steps from ``timestep``; shards the transformer's own per-token inputs."""

        def __init__(self, state: _State, split: _Split | None):
            super().__init__()
            self.state, self.split = state, split

        def pre_forward(self, module, *args, **kwargs):
            args = list(args)
            params = _forward_params(type(module))
            value = _argument(params, "timestep", args, kwargs)
            if value is None:
                raise ValueError(f"{type(module).__name__}.forward got no timestep; dbsp reads it to count denoising steps")
            self.state.on_forward(value)
            if self.split is not None:
                _split_arguments(self.split, params, args, kwargs, self.state)
            return tuple(args), kwargs

    class SplitHook(ModelHook):
        def __init__(self, state: _State, split: _Split):
            super().__init__()
            self.state, self.split = state, split

        def pre_forward(self, module, *args, **kwargs):
            args = list(args)
            _split_arguments(self.split, _forward_params(type(module)), args, kwargs, self.state)
            return tuple(args), kwargs

        def post_forward(self, module, output):
            if not self.split.outputs:
                return output
            out = list(output)
            for index, (dim, expected) in self.split.outputs.items():
                out[index] = _split_value(out[index], dim, expected, self.state)
            return type(output)(out)

    class GatherHook(ModelHook):
        def __init__(self, state: _State, dim: int):
            super().__init__()
            self.state, self.dim = state, dim

        def post_forward(self, module, output):
            return _gather(output, self.dim, self.state)

    return TopHook, SplitHook, GatherHook


def _argument(params: tuple[str, ...], name: str, args: list, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    index = params.index(name)
    return args[index] if index < len(args) else None


def _split_arguments(split: _Split, params: tuple[str, ...], args: list, kwargs: dict, state: _State) -> None:
    for name, (dim, expected) in split.inputs.items():
        if name in kwargs:
            kwargs[name] = _split_value(kwargs[name], dim, expected, state)
        else:
            index = params.index(name)
            if index < len(args):
                args[index] = _split_value(args[index], dim, expected, state)


_HOOK_PREFIX = "dbsp---"


@dataclass
class _Installed:
    """What apply() changed on one transformer, so remove() can restore it exactly."""

    handle: DbspHandle
    processors: list[tuple[torch.nn.Module, Any]]  # (attention module, its original processor)
    hooked: list[tuple[torch.nn.Module, str, bool, bool]]  # (module, hook name, had registry, had own forward)


_installed: "weakref.WeakKeyDictionary[torch.nn.Module, _Installed]" = weakref.WeakKeyDictionary()


def _register(module: torch.nn.Module, hook, name: str, installed: _Installed) -> None:
    from diffusers.hooks import HookRegistry

    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    installed.hooked.append((module, name, had_registry, had_forward))


# ---------------------------------------------------------------------------------- apply / remove

_DEFAULT = object()


def _resolve_transformer(obj):
    """A transformer, or a diffusers pipeline's ``transformer``."""
    if isinstance(obj, torch.nn.Module):
        return obj
    inner = getattr(obj, "transformer", None)
    if isinstance(inner, torch.nn.Module):
        return inner
    raise TypeError(
        f"apply/remove take a diffusers transformer ({' or '.join(_SUPPORTED)}) or a pipeline that has one as "
        f".transformer; got {type(obj).__name__}"
    )


def _as_policy(predictor):
    if predictor is None:
        return MaskPredictor(kv_tile=1)
    if isinstance(predictor, SparseMask):
        return FixedMask(predictor)
    if isinstance(predictor, MaskPredictor) or callable(predictor):
        return predictor
    raise TypeError(
        "predictor must be None, a dbsp.predict.MaskPredictor, a SparseMask, FixedMask, FixedDensity or a "
        f"callable (q, k, *, layer, step, groups, seq_len) -> SparseMask; got {type(predictor).__name__}"
    )


def _check_groups(groups):
    if groups is None:
        return None
    from ..dist import SPGroups

    if isinstance(groups, SPGroups):
        return groups
    if isinstance(groups, Mapping) and groups and all(isinstance(g, SPGroups) for g in groups.values()):
        worlds = {g.world_size for g in groups.values()}
        if len(worlds) != 1:
            raise ValueError(f"groups maps degrees to SPGroups of different world sizes {sorted(worlds)}")
        for key, g in groups.items():
            if key != (g.ulysses, g.ring):
                raise ValueError(f"groups[{key!r}] holds SPGroups(ulysses={g.ulysses}, ring={g.ring}); keys must be (U, R)")
        return dict(groups)
    raise TypeError(
        "groups must be None, a dbsp.dist.SPGroups, or {(ulysses, ring): SPGroups} as from "
        f"SPGroups.all_degrees(); got {type(groups).__name__}"
    )


def apply(
    transformer,
    *,
    predictor=None,
    groups=None,
    planner=_DEFAULT,
    dense_steps: int = 0,
    layers: Iterable[int] | None = None,
    backend: str = "auto",
    record: bool = False,
) -> DbspHandle:
    """Run a diffusers video transformer's self-attention through dbsp, in place.

    The transformer's parameters are not touched; its self-attention processors are replaced and
    diffusers hooks are registered (see the module docstring for the exact list). Returns a
    :class:`DbspHandle`; :func:`remove` restores the original model exactly.

    Picture (Wan block, one process; ``groups`` adds the shard / all-gather around the blocks)::

        x -> patchify -> [ block 0 .. block L-1 ] -> proj_out -> unpatchify
                            attn1: q, k, v, RoPE -> mask = predictor(q, k) -> sparse_attention
                            attn2: the model's own processor (cross-attention, dense, exact)
                            ffn:   unchanged

    Args:
        transformer: a ``WanTransformer3DModel`` or ``CogVideoXTransformer3DModel`` (or a diffusers
            pipeline holding one as ``.transformer``; a second ``.transformer_2`` is left alone),
            with diffusers' default processors.
        predictor: where masks come from, for each (layer, step, branch):

            * ``None``: ``dbsp.predict.MaskPredictor(kv_tile=1)`` (64 x 1 fine-grained masks,
              top-p 0.9, mask reuse across steps);
            * a ``MaskPredictor``: called with ``layer=(layer, branch)`` and the step. Under
              sequence parallelism it predicts from the shards with
              ``dbsp.dist.predict_mask_sharded`` (same mask as one process, but without reuse
              across steps, which needs the whole q and k);
            * a ``SparseMask`` (or :class:`FixedMask`): that mask for every layer;
            * :class:`FixedDensity`: random tiles at a fixed density (speed measurements);
            * any callable ``(q, k, *, layer, step, groups, seq_len) -> SparseMask`` returning the
              global ``(B, H, S, S)`` mask over the ``seq_len = S`` video tokens; ``q``, ``k`` are
              ``(B, S, H, D)`` (``groups=None``), or this rank's ``(B, S_r, H, D)`` shard under
              sequence parallelism (the mask must then be identical on every rank). Default: None.
        groups: None for one process; a ``dbsp.dist.SPGroups`` for sequence parallelism over its
            ``U x R`` ranks; or ``{(U, R): SPGroups}`` (``SPGroups.all_degrees()``) to let the
            planner choose the degrees per layer and step. Every rank must call ``apply`` with the
            same arguments and run the same forwards. Default: None.
        planner: sequence parallel only: a ``dbsp.plan.PlanCache`` (db-SP balancing, plan reuse
            across steps), or None for the unbalanced layout. It is fed each mask's
            ``WorkSummary`` (``summarize_work``, built where the mask lives), so its plans move
            whole summary units. Default: a new ``PlanCache()`` with ``groups``, nothing without
            (passing one without ``groups`` is an error).
        dense_steps: the first ``dense_steps`` denoising steps run dense attention (in one process
            through the model's own processor, exactly as without dbsp). Default: 0.
        layers: indices of the blocks whose self-attention dbsp makes sparse; the others keep the
            model's processor (under sequence parallelism they run dense attention through dbsp,
            since their tokens are sharded too). Default: None (all blocks).
        backend: local attention backend, as in :func:`dbsp.sparse_attention`. Default: ``"auto"``.
        record: keep an :class:`AttentionRecord` per call and the latest mask per (layer, branch)
            on the handle. Costs a device sync per call and the masks' memory. Default: False.

    Returns:
        The :class:`DbspHandle` (the transformer is modified in place).

    Raises:
        TypeError: for an unsupported model (naming the supported ones) or a wrong argument type.
        ValueError: if dbsp is already applied, diffusers' own context parallelism is enabled, a
            block carries a processor other than diffusers' default, or an argument is invalid.

    Example::

        >>> from diffusers import WanPipeline
        >>> from dbsp.integrations.diffusers import apply
        >>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)
        >>> handle = apply(pipe, dense_steps=2)           # 64 x 1 predicted masks after 2 dense steps
        >>> video = pipe(prompt, num_inference_steps=50).frames[0]
        >>> handle.remove()
    """
    transformer = _resolve_transformer(transformer)
    spec = _spec_for(transformer)
    if transformer in _installed:
        raise ValueError(f"dbsp is already applied to this {spec.name}; call remove(transformer) first")
    if getattr(transformer, "_parallel_config", None) is not None:
        raise ValueError(
            f"this {spec.name} has diffusers' context parallelism enabled (enable_parallelism); dbsp shards the "
            "sequence itself: pass groups= to apply() instead"
        )
    policy = _as_policy(predictor)
    groups = _check_groups(groups)
    if planner is _DEFAULT:
        planner = PlanCache() if groups is not None else None
    elif planner is not None:
        if groups is None:
            raise ValueError("planner balances sequence-parallel work: it needs groups= (got groups=None)")
        if not isinstance(planner, PlanCache):
            raise TypeError(f"planner must be a dbsp.plan.PlanCache or None, got {type(planner).__name__}")
    if isinstance(groups, Mapping) and planner is None:
        raise ValueError("groups={(U, R): SPGroups} needs a planner to choose the degrees; pass one SPGroups instead")
    check_nonnegative_int("dense_steps", dense_steps)
    if backend != "auto" and backend not in available_backends():
        raise ValueError(f"unknown backend {backend!r}; known: 'auto', " + ", ".join(map(repr, available_backends())))
    if not isinstance(record, bool):
        raise TypeError(f"record must be a bool, got {record!r}")

    blocks = getattr(transformer, spec.blocks)
    selected = tuple(range(len(blocks))) if layers is None else tuple(sorted(set(_check_layers(layers, len(blocks)))))
    # Under sequence parallelism every block sees sharded tokens, so blocks left out of `layers`
    # still need dbsp's processor (running dense attention over all shards).
    replaced = selected if groups is None else tuple(range(len(blocks)))
    for i in replaced:
        processor = getattr(blocks[i], spec.attention).processor
        if type(processor).__name__ not in spec.stock_processors:
            raise ValueError(
                f"block {i}'s {spec.attention} uses {type(processor).__name__}; dbsp replaces only diffusers' default "
                f"{' / '.join(spec.stock_processors)} (remove other attention customisations first)"
            )

    state = _State(policy=policy, groups=groups, planner=planner, dense_steps=dense_steps, backend=backend, record=record)
    handle = DbspHandle(transformer, spec.name, selected, state)
    installed = _Installed(handle, [], [])
    TopHook, SplitHook, GatherHook = _hook_classes()
    try:
        for i in replaced:
            module = getattr(blocks[i], spec.attention)
            original = module.processor
            module.set_processor(spec.processor(original, i, state, sparse=i in selected))
            installed.processors.append((module, original))
        _register(transformer, TopHook(state, spec.splits.get("") if groups is not None else None), _HOOK_PREFIX + "step",
                  installed)
        if groups is not None:
            for path, split in spec.splits.items():
                if path:
                    _register(transformer.get_submodule(path), SplitHook(state, split), _HOOK_PREFIX + "split", installed)
            path, dim = spec.gather
            _register(transformer.get_submodule(path), GatherHook(state, dim), _HOOK_PREFIX + "gather", installed)
    except BaseException:
        _undo(installed)
        raise
    _installed[transformer] = installed
    return handle


def _check_layers(layers, num_blocks: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of block indices, got {type(layers).__name__}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
        if not 0 <= i < num_blocks:
            raise ValueError(f"layer {i} is out of range: the model has {num_blocks} blocks (0 .. {num_blocks - 1})")
        out.append(i)
    if not out:
        raise ValueError("layers selects no block")
    return out


def _undo(installed: _Installed) -> None:
    for module, name, had_registry, had_forward in reversed(installed.hooked):
        registry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            # Leave the module as apply() found it: no empty registry, no instance-level forward.
            if not had_registry:
                del module._diffusers_hook
            if not had_forward:
                module.__dict__.pop("forward", None)
    installed.hooked.clear()
    for module, original in reversed(installed.processors):
        module.set_processor(original)
    installed.processors.clear()


def remove(transformer) -> None:
    """Undo :func:`apply`: the original processor objects back in place, dbsp's hooks removed.

    Afterwards the transformer is exactly as before ``apply`` (same parameters, same processor
    objects, no dbsp hook or attribute). Removing from a model dbsp is not applied to raises.

    Args:
        transformer: the transformer (or pipeline) passed to :func:`apply`.
    """
    transformer = _resolve_transformer(transformer)
    installed = _installed.pop(transformer, None)
    if installed is None:
        raise ValueError(f"dbsp is not applied to this {type(transformer).__name__}")
    _undo(installed)


def get_handle(transformer) -> DbspHandle | None:
    """The :class:`DbspHandle` of a transformer dbsp is applied to, else None."""
    installed = _installed.get(_resolve_transformer(transformer))
    return None if installed is None else installed.handle


# ---------------------------------------------------------------------------------- random-weight models


def random_wan_transformer(
    *, heads: int, head_dim: int, layers: int, ffn_dim: int, text_dim: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, seed: int = 0,
):
    """A diffusers ``WanTransformer3DModel`` with random weights (Wan2.1 layout), in eval mode.

    Parameters are created directly on ``device`` in ``dtype`` (a 14B model never exists in float32
    on the host), except those of the modules the model keeps in float32 (its
    ``_keep_in_fp32_modules``), as ``from_pretrained(torch_dtype=dtype)`` would load them. The same
    seed gives the same weights on every process of one device type. Used by the demo and the
    end-to-end benchmark, where random weights stand in for a checkpoint.

    Args:
        heads, head_dim: attention heads and their width (model width = heads * head_dim).
        layers: transformer blocks. ffn_dim: feed-forward width. text_dim: text-embedding width.
        device: Default: CPU. dtype: Default: float32. seed: Default: 0.

    Example (the Wan2.1-1.3B architecture)::

        >>> model = random_wan_transformer(heads=12, head_dim=128, layers=30, ffn_dim=8960, text_dim=4096,
        ...                                device="cuda", dtype=torch.bfloat16)
    """
    from diffusers import WanTransformer3DModel

    for name, value in (("heads", heads), ("head_dim", head_dim), ("layers", layers), ("ffn_dim", ffn_dim),
                        ("text_dim", text_dim)):
        check_positive_int(name, value)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                out_channels=16, text_dim=text_dim, freq_dim=256, ffn_dim=ffn_dim, num_layers=layers,
                rope_max_seq_len=1024,
            )
    finally:
        torch.set_default_dtype(previous)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if keep.intersection(name.split(".")):
            param.data = param.data.float()
    return model.eval()
