"""Sparsity-aware Ring attention: R steps of local sparse attention, K/V passed around the ring.

Ring direction (the Plan contract): at step ``t = 0 .. R-1`` ring rank ``i`` computes its queries
against the key/value chunk that ring rank ``(i + t) mod R`` held at step 0, so K/V travel from
ring rank ``i + 1`` to ring rank ``i`` each step::

    R = 3          step 0      step 1      step 2
    ring rank 0    Q0 x KV0    Q0 x KV1    Q0 x KV2
    ring rank 1    Q1 x KV1    Q1 x KV2    Q1 x KV0
    ring rank 2    Q2 x KV2    Q2 x KV0    Q2 x KV1

A step whose (query chunk, key chunk) sub-mask selects nothing skips its compute (the chunk is
still passed on). The next chunk's send/receive is issued before the current step's compute and
waited on right before it is used. Partial results merge exactly by log-sum-exp.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..attention import sparse_attention
from .comm import merge_attention_, ring_pass
from .groups import SPGroups, check_one_degree


@dataclass(frozen=True, eq=False)
class RingSpec:
    """What one ring rank needs to run its R steps.

    Attributes:
        masks: R local masks in step order (step ``t`` pairs this rank's queries with chunk
            ``(i + t) mod R``); None where nothing is selected.
        kv_lens: tokens of each ring rank's key/value chunk, indexed by ring rank.
        ring_rank: i.
        group: the ring process group.
        send_to, recv_from: global ranks of ring ranks ``i - 1`` and ``i + 1``.
        scale, backend: passed to :func:`dbsp.sparse_attention`.
        need_lse: whether the caller uses the lse. With ``R = 1`` and no lse needed the local call
            asks for none, which lets ``backend="auto"`` send full heads to dense SDPA.
        timeout: limit of every ring transfer's wait (see :func:`dbsp.dist.ring_pass`), or None.
    """

    masks: tuple
    kv_lens: tuple[int, ...]
    ring_rank: int
    group: dist.ProcessGroup | None
    send_to: int
    recv_from: int
    scale: float | None
    backend: str
    need_lse: bool = True
    timeout: datetime.timedelta | None = None

    @property
    def ring(self) -> int:
        """R, the ring degree (one key/value chunk per ring rank)."""
        return len(self.kv_lens)

    def chunk_at(self, step: int) -> int:
        """The ring rank whose step-0 chunk this rank holds at ``step``."""
        return (self.ring_rank + step) % self.ring


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    """Partial results merge in float32 (float64 for float64 inputs), like the reference."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _kv_shape(like: torch.Tensor, tokens: int) -> tuple[int, ...]:
    return (like.shape[0], tokens, *like.shape[2:])


def _pass_next_kv(kv: list[torch.Tensor], t: int, spec: RingSpec):
    """Start sending this step's K/V on and receiving step ``t + 1``'s; None after the last step."""
    if t + 1 >= spec.ring:
        return None
    nxt = _kv_shape(kv[0], spec.kv_lens[spec.chunk_at(t + 1)])
    return ring_pass(kv, [nxt, nxt], group=spec.group, send_to=spec.send_to, recv_from=spec.recv_from, timeout=spec.timeout)


def _ring_forward(q, k, v, spec: RingSpec):
    """Forward ring loop; returns ``out (B, Lq, H, D)`` (float32 when merged) and ``lse (B, H, Lq)``.

    With ``R = 1`` and ``spec.need_lse`` False the lse is an empty placeholder.
    """
    if spec.ring == 1 and not spec.need_lse and spec.masks[0] is not None:
        out = sparse_attention(q, k, v, spec.masks[0], scale=spec.scale, backend=spec.backend)
        return out, q.new_empty((0,), dtype=_acc_dtype(q))
    acc = _acc_dtype(q)
    out = lse = None
    kv = [k, v]
    for t in range(spec.ring):
        pending = _pass_next_kv(kv, t, spec)
        mask = spec.masks[t]
        if mask is not None:
            # float32 partials: the merge rounds once at the end instead of once per step.
            o, l = sparse_attention(q, kv[0], kv[1], mask, scale=spec.scale, return_lse=True, backend=spec.backend,
                                    out_dtype=acc)
            # The first part becomes the running result (fresh tensors of this call); later ones merge into it.
            out, lse = (o, l.to(acc)) if out is None else merge_attention_(out, lse, o, l)
        if pending is not None:
            kv = pending.wait()
    if out is None:  # no step selected anything: every row is empty
        B, Lq, H, D = q.shape
        out = q.new_zeros((B, Lq, H, D), dtype=acc)
        lse = q.new_full((B, H, Lq), float("-inf"), dtype=acc)
    return out, lse


def _ring_backward(q, k, v, out, lse, dout, dlse, spec: RingSpec):
    """Ring backward by recomputation: each step's local attention is re-run under autograd.

    With ``w_t = exp(lse_t - lse)`` the merged output is ``out = sum_t w_t out_t``, so the step's
    gradients are ``d out_t = w_t dout`` and ``d lse_t = w_t (<dout, out_t - out> + dlse)``. Key/value
    gradients travel around the ring with the chunk they belong to and arrive home after R passes.
    With ``R = 1`` the single step is the whole output: ``w = 1``, and ``lse`` may be a placeholder.
    """
    if spec.ring == 1:
        return _single_step_backward(q, k, v, dout, dlse, spec)
    acc = _acc_dtype(q)
    dq = torch.zeros_like(q, dtype=acc)
    dkv = [torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)]
    dout = dout.to(acc)
    kv = [k, v]
    pending_dkv = None
    finite = torch.isfinite(lse)
    lse_safe = torch.where(finite, lse, torch.zeros_like(lse))
    for t in range(spec.ring):
        pending_kv = _pass_next_kv(kv, t, spec)
        mask = spec.masks[t]
        grads = None
        if mask is not None:
            with torch.enable_grad():
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, kv[0], kv[1]))
                o, l = sparse_attention(qg, kg, vg, mask, scale=spec.scale, return_lse=True, backend=spec.backend)
                l_t, o_t = l.detach().to(acc), o.detach().to(acc)
                w = torch.where(finite & torch.isfinite(l_t), torch.exp(l_t - lse_safe), torch.zeros_like(lse))
                w_tok = w.transpose(1, 2).unsqueeze(-1)  # (B, H, Lq) -> (B, Lq, H, 1)
                d_o = (dout * w_tok).to(o.dtype)
                d_l = w * (dout * (o_t - out)).sum(-1).transpose(1, 2)
                if dlse is not None:
                    d_l = d_l + w * dlse.to(acc)
                grads = torch.autograd.grad((o, l), (qg, kg, vg), (d_o, d_l.to(l.dtype)), allow_unused=True)
        if pending_dkv is not None:
            dkv = pending_dkv.wait()  # the accumulator of the chunk held now, from ring rank i + 1
        if grads is not None:
            gq, gk, gv = (_grad_or_zeros(g, x) for g, x in zip(grads, (qg, kg, vg)))
            dq = dq + gq.to(acc)
            dkv = [dkv[0] + gk.to(acc), dkv[1] + gv.to(acc)]
        # Pass the accumulator on with its chunk; after the last pass it is back at its owner.
        held = _kv_shape(k, spec.kv_lens[spec.chunk_at(t + 1)])
        pending_dkv = ring_pass(
            dkv, [held, held], group=spec.group, send_to=spec.send_to, recv_from=spec.recv_from, timeout=spec.timeout
        )
        if pending_kv is not None:
            kv = pending_kv.wait()
    dkv = pending_dkv.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _single_step_backward(q, k, v, dout, dlse, spec: RingSpec):
    """``R = 1``: the one local call is the whole output, so its gradient is the answer."""
    mask = spec.masks[0]
    if mask is None:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.enable_grad():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o, l = sparse_attention(qg, kg, vg, mask, scale=spec.scale, return_lse=True, backend=spec.backend)
        d_l = torch.zeros_like(l) if dlse is None or dlse.numel() == 0 else dlse.to(l.dtype)
        grads = torch.autograd.grad((o, l), (qg, kg, vg), (dout.to(o.dtype), d_l), allow_unused=True)
    return tuple(_grad_or_zeros(g, x).to(x.dtype) for g, x in zip(grads, (q, k, v)))


def _grad_or_zeros(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: RingSpec):
        out, lse = _ring_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, dlse, ctx.spec)
        return dq, dk, dv, None


def ring_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: RingSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one ring rank's R steps on data already in the block layout.

    Args:
        q: ``(B, Lq, H, D)`` this rank's query blocks.
        k, v: ``(B, L_i, H, D)`` this rank's key/value chunk (``L_i = spec.kv_lens[i]``).
        spec: the rank's :class:`RingSpec`.

    Returns:
        ``(out, lse)``: ``(B, Lq, H, D)`` in q's dtype and ``(B, H, Lq)`` float32 (float64 for
        float64 inputs; an empty placeholder when ``R = 1`` and ``spec.need_lse`` is False).
        Differentiable (by recomputation in the backward pass) when the local backend is (the
        reference backend is; the Triton kernel is forward-only). Every rank takes part in the
        backward passes even where it computed nothing, so the ranks stay in step.
    """
    k, v = k.contiguous(), v.contiguous()  # sent as they are
    return _RingAttention.apply(q, k, v, spec)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask,
    *,
    groups: SPGroups,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    verify: bool = True,
):
    """Sparse attention with Ring parallelism only (``groups.ulysses == 1``).

    Each rank keeps the query blocks it owns (the home blocks ``{b : b * R // NB == i}``, moved
    into place with one all-to-all when shard boundaries cut blocks) and runs R ring steps,
    skipping steps whose sub-mask selects nothing. This is :func:`dbsp.dist.sp_attention` without
    a plan, restricted to ``U = 1``.

    Args:
        q, k, v: ``(B, S_r, H, D)``, this rank's contiguous sequence shard; shard sizes follow
            ``torch.tensor_split(range(S), P)``.
        mask: the global ``SparseMask`` (``B, H, S x S``), identical on every rank, on q's device.
        groups: an :class:`SPGroups` with ``ulysses == 1``.
        scale, return_lse, backend: as in :func:`dbsp.sparse_attention`.
        verify: check shapes, dtypes and mask sizes across ranks first. Default: True.

    Returns:
        ``out`` ``(B, S_r, H, D)`` or ``(out, lse)`` with lse ``(B, H, S_r)`` float32 (float64 for float64 inputs).

    Example::

        >>> groups = SPGroups.init(ulysses=1, ring=4)
        >>> out = ring_attention(q_shard, k_shard, v_shard, mask, groups=groups)
    """
    from .usp import sp_attention

    check_one_degree(groups, "ring_attention", unit="ulysses")
    return sp_attention(
        q, k, v, mask, groups=groups, scale=scale, return_lse=return_lse, backend=backend, verify=verify
    )
