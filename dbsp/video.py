"""Video token geometry, 3D RoPE, token orders, and synthetic video-DiT attention workloads.

A video DiT patchifies its latent video into a grid of ``frames x height x width`` tokens and
flattens it row-major (frame, then row, then column) into one sequence of
``S = frames * height * width`` tokens, optionally followed by text/condition tokens (HunyuanVideo's
joint attention). Wan2.1 at 480p is ``21 x 30 x 52 = 32,760`` tokens, at 720p ``21 x 45 x 80 =
75,600``; HunyuanVideo at 720p ``33 x 45 x 80 = 118,800`` video tokens.

Token orders. Row-major order puts a 64-token block on ~1 image row of one frame, so a block is
long and thin. A 3D-tile order lists tokens tile by tile (e.g. tiles of ``4 x 4 x 4``), so a block
of 64 is a spatially compact cube and local attention covers fewer blocks. Picture, one frame of
4 x 8 tokens, tiles of 1 x 2 x 4 (the numbers are the new positions)::

    row-major                    tile order (tile = 2 rows x 4 columns)
     0  1  2  3  4  5  6  7        0  1  2  3  8  9 10 11
     8  9 10 11 12 13 14 15        4  5  6  7 12 13 14 15
    16 17 18 19 20 21 22 23       16 17 18 19 24 25 26 27
    24 25 26 27 28 29 30 31       20 21 22 23 28 29 30 31

:class:`TokenOrder` holds the permutation and its inverse; text tokens always stay at the end.

Workloads. :func:`make_workload` builds per-head Q/K/V whose *true* attention has the structures
reported for video DiTs (spatial-local, temporal, global/sink, near-dense and text heads), by
putting a positional component into the fast-rotating 3D-RoPE channels and object "content" into
the slow ones, exactly the split a RoPE model can express. See its docstring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ._checks import check_nonnegative_int, check_positive_int, check_tensor

HEAD_KINDS = ("spatial", "temporal", "global", "dense", "text")

# Default share of each head kind; "text" is used only when the geometry has text tokens.
DEFAULT_KIND_WEIGHTS = {"spatial": 0.35, "temporal": 0.25, "global": 0.15, "dense": 0.15, "text": 0.10}


@dataclass(frozen=True)
class VideoGeometry:
    """The token grid of one video after patchify, plus optional trailing text tokens.

    Args:
        frames, height, width: latent tokens along time, rows and columns (each >= 1).
        text_tokens: text/condition tokens appended after the video tokens, attended jointly
            (MM-DiT style, as in HunyuanVideo). Default: 0 (Wan2.1 uses cross-attention instead).

    Example::

        >>> g = VideoGeometry(21, 30, 52)
        >>> g.num_tokens, str(g)
        (32760, '21x30x52')
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0

    def __post_init__(self) -> None:
        check_positive_int("frames", self.frames)
        check_positive_int("height", self.height)
        check_positive_int("width", self.width)
        check_nonnegative_int("text_tokens", self.text_tokens)

    @property
    def video_tokens(self) -> int:
        """``frames * height * width``."""
        return self.frames * self.height * self.width

    @property
    def num_tokens(self) -> int:
        """Sequence length S: video tokens plus text tokens."""
        return self.video_tokens + self.text_tokens

    @property
    def dims(self) -> tuple[int, int, int]:
        """``(frames, height, width)`` of the latent token grid."""
        return (self.frames, self.height, self.width)

    def positions(self, *, device: torch.device | str | None = None) -> torch.Tensor:
        """``(video_tokens, 3)`` int64 ``(t, h, w)`` of every video token in row-major order."""
        t, h, w = torch.meshgrid(
            *(torch.arange(n, device=device) for n in self.dims), indexing="ij"
        )
        return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)

    def __str__(self) -> str:
        base = f"{self.frames}x{self.height}x{self.width}"
        return base + (f"+{self.text_tokens}text" if self.text_tokens else "")


@dataclass(frozen=True)
class ModelShape:
    """The attention shape of one video DiT at one resolution.

    Args:
        name: preset name, e.g. ``"wan1.3b-480p"``.
        geometry: the token grid (:class:`VideoGeometry`).
        heads: attention heads per layer.
        head_dim: D.
        layers: transformer blocks with self-attention.
    """

    name: str
    geometry: VideoGeometry
    heads: int
    head_dim: int
    layers: int

    def __post_init__(self) -> None:
        if not isinstance(self.geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(self.geometry).__name__}")
        check_positive_int("heads", self.heads)
        check_positive_int("head_dim", self.head_dim)
        check_positive_int("layers", self.layers)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


# Model shapes from the models' default configs (latent grid after the VAE and 1x2x2 patchify).
# Wan2.1-1.3B: 30 blocks, 12 heads; Wan2.1-14B: 40 blocks, 40 heads; HunyuanVideo: 20 dual-stream +
# 40 single-stream blocks, 24 heads, joint attention over up to 256 text tokens. The "cpu-*" presets
# are small grids for tests and CPU studies.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("wan1.3b-480p", VideoGeometry(21, 30, 52), heads=12, head_dim=128, layers=30),
        ModelShape("wan1.3b-720p", VideoGeometry(21, 45, 80), heads=12, head_dim=128, layers=30),
        ModelShape("wan14b-480p", VideoGeometry(21, 30, 52), heads=40, head_dim=128, layers=40),
        ModelShape("wan14b-720p", VideoGeometry(21, 45, 80), heads=40, head_dim=128, layers=40),
        ModelShape("hunyuan-480p", VideoGeometry(33, 30, 53, text_tokens=256), heads=24, head_dim=128, layers=60),
        ModelShape("hunyuan-720p", VideoGeometry(33, 45, 80, text_tokens=256), heads=24, head_dim=128, layers=60),
        ModelShape("cpu-tiny", VideoGeometry(5, 8, 8), heads=4, head_dim=64, layers=2),
        ModelShape("cpu-small", VideoGeometry(9, 16, 16), heads=12, head_dim=128, layers=4),
    )
}


def get_shape(shape: str | ModelShape) -> ModelShape:
    """Look up a preset by name (a :class:`ModelShape` passes through)."""
    if isinstance(shape, ModelShape):
        return shape
    if not isinstance(shape, str):
        raise TypeError(f"shape must be a preset name or a ModelShape, got {type(shape).__name__}")
    if shape not in PRESETS:
        raise ValueError(f"unknown model shape {shape!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[shape]


# ---------------------------------------------------------------------------------- 3D RoPE


def rope_axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Rotary channel pairs given to (time, height, width) out of ``head_dim // 2``.

    The Wan2.1 split: height and width get ``head_dim // 6`` pairs each, time gets the rest
    (22, 21, 21 pairs for D = 128).
    """
    check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    hw = head_dim // 6
    return head_dim // 2 - 2 * hw, hw, hw


def rope_frequencies(head_dim: int, *, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair rotation frequency and axis of 3D RoPE.

    Each axis with ``n`` pairs (``2n`` real channels) uses ``theta ** (-2 i / (2n))`` for
    ``i = 0 .. n-1``, from 1 rad/token down to nearly 0.

    Returns:
        ``(freqs, axis)``: ``(head_dim // 2,)`` float64 radians per token and int64 axis id
        (0 = time, 1 = height, 2 = width), time pairs first.
    """
    freqs, axes = [], []
    for a, n in enumerate(rope_axis_channels(head_dim)):
        i = torch.arange(n, dtype=torch.float64)
        freqs.append(theta ** (-2.0 * i / (2 * n)))
        axes.append(torch.full((n,), a, dtype=torch.int64))
    return torch.cat(freqs), torch.cat(axes)


def rope_angles(
    geometry: VideoGeometry,
    head_dim: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotation angle of every (token, channel pair) under 3D RoPE, in row-major token order.

    Args:
        geometry: the token grid; text tokens (at the end) get angle 0 (no rotation).
        head_dim: D (even).
        theta: RoPE base. Default: 10000.0.
        device: where to build the result. Default: CPU.

    Returns:
        ``(geometry.num_tokens, head_dim // 2)`` float32 angles ``pos[axis] * freq``.
    """
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
    freqs, axis = rope_frequencies(head_dim, theta=theta)
    pos = geometry.positions(device=device).to(torch.float64)  # (Sv, 3)
    ang = pos[:, axis.to(pos.device)] * freqs.to(pos.device)  # (Sv, D/2)
    if geometry.text_tokens:
        ang = torch.cat([ang, ang.new_zeros(geometry.text_tokens, ang.shape[1])])
    return ang.to(torch.float32)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[..., 2i], x[..., 2i+1])`` by ``angles[s, i]``.

    Args:
        x: ``(B, S, H, D)`` tensor.
        angles: ``(S, D // 2)`` angles from :func:`rope_angles` (in the same token order as ``x``).

    Returns:
        The rotated tensor, same shape and dtype as ``x`` (computed in float32).
    """
    check_tensor("x", x)
    check_tensor("angles", angles)
    if x.dim() != 4 or angles.shape != (x.shape[1], x.shape[3] // 2) or x.shape[3] % 2:
        raise ValueError(
            f"x must be (B, S, H, D) with even D and angles (S, D // 2); got x {tuple(x.shape)}, "
            f"angles {tuple(angles.shape)}"
        )
    cos = angles.cos().to(x.device)[None, :, None, :]  # (1, S, 1, D/2)
    sin = angles.sin().to(x.device)[None, :, None, :]
    xf = x.float()
    re, im = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------------- orders


@dataclass(frozen=True, eq=False)
class TokenOrder:
    """A permutation of the token sequence and its inverse.

    ``apply`` takes a tensor in row-major order to this order: ``x_new = x.index_select(dim,
    perm)``, so new position ``i`` holds old token ``perm[i]``. ``restore`` undoes it.

    Args:
        name: e.g. ``"row_major"`` or ``"tile4x4x4"``.
        perm: ``(S,)`` int64 permutation of ``range(S)``.
        inverse: ``(S,)`` int64 with ``inverse[perm[i]] == i``.
    """

    name: str
    perm: torch.Tensor
    inverse: torch.Tensor = field(repr=False)

    def __post_init__(self) -> None:
        check_tensor("perm", self.perm)
        check_tensor("inverse", self.inverse)
        n = self.perm.numel()
        if self.perm.dim() != 1 or self.inverse.shape != self.perm.shape:
            raise ValueError(
                f"perm and inverse must be 1-D of one length, got {tuple(self.perm.shape)} and {tuple(self.inverse.shape)}"
            )
        ar = torch.arange(n, device=self.perm.device)
        if not torch.equal(torch.sort(self.perm).values, ar):
            raise ValueError(f"perm must be a permutation of range({n})")
        if not torch.equal(self.inverse[self.perm], ar):
            raise ValueError("inverse must satisfy inverse[perm[i]] == i")

    @classmethod
    def from_perm(cls, name: str, perm: torch.Tensor) -> "TokenOrder":
        """Build from a permutation; the inverse is computed."""
        perm = perm.to(torch.int64)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return cls(name, perm, inverse)

    @property
    def num_tokens(self) -> int:
        """Tokens the order permutes (the sequence length S)."""
        return self.perm.numel()

    def apply(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Row-major -> this order along ``dim`` (default 1, the S of ``(B, S, H, D)``)."""
        self._check(x, dim)
        return x.index_select(dim, self.perm.to(x.device))

    def restore(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This order -> row-major along ``dim``."""
        self._check(x, dim)
        return x.index_select(dim, self.inverse.to(x.device))

    def _check(self, x: torch.Tensor, dim: int) -> None:
        check_tensor("x", x)
        if x.shape[dim] != self.num_tokens:
            raise ValueError(
                f"x has {x.shape[dim]} tokens along dim {dim} but the order {self.name!r} is for {self.num_tokens}"
            )


def row_major_order(geometry: VideoGeometry) -> TokenOrder:
    """The identity order (frame, row, column), text tokens last."""
    return TokenOrder.from_perm("row_major", torch.arange(geometry.num_tokens))


def tile_order(geometry: VideoGeometry, tile: tuple[int, int, int] = (4, 4, 4)) -> TokenOrder:
    """3D-tile order: tokens listed tile by tile, tiles in row-major order, text tokens last.

    Tiles at the far edges are cut short when a dimension is not a multiple of the tile (for
    21 frames and tile 4, the last frame-tile holds 1 frame); such tiles hold fewer tokens, so
    blocks of 64 no longer align with the tiles after them. No 64-token tile divides Wan2.1's
    21 x 30 x 52 grid, so there some tiles are always partial.

    Args:
        geometry: the token grid.
        tile: ``(t, h, w)`` tile extent. Default: ``(4, 4, 4)`` = 64 tokens, one block.

    Returns:
        A :class:`TokenOrder` named ``"tile{t}x{h}x{w}"``.
    """
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
    if len(tile) != 3:
        raise ValueError(f"tile must be (t, h, w), got {tile!r}")
    for name, n in zip(("tile[0]", "tile[1]", "tile[2]"), tile):
        check_positive_int(name, n)
    pos = geometry.positions()
    tid = [pos[:, a] // tile[a] for a in range(3)]
    ntile = [-(-geometry.dims[a] // tile[a]) for a in range(3)]
    tile_id = (tid[0] * ntile[1] + tid[1]) * ntile[2] + tid[2]
    inner = ((pos[:, 0] % tile[0]) * tile[1] + pos[:, 1] % tile[1]) * tile[2] + pos[:, 2] % tile[2]
    key = tile_id * (tile[0] * tile[1] * tile[2]) + inner  # unique, increasing in the new order
    perm = torch.argsort(key)
    if geometry.text_tokens:
        perm = torch.cat([perm, torch.arange(geometry.video_tokens, geometry.num_tokens)])
    return TokenOrder.from_perm(f"tile{tile[0]}x{tile[1]}x{tile[2]}", perm)


# ---------------------------------------------------------------------------------- workloads


@dataclass(frozen=True, eq=False)
class Workload:
    """One layer at one denoising step of a synthetic (or captured) video-DiT attention.

    Attributes:
        q, k, v: ``(B, S, H, D)`` tensors in the token order ``order`` (RoPE already applied).
        geometry: the token grid; ``geometry.text_tokens`` text tokens sit at the end.
        head_kinds: kind of each head: one of ``HEAD_KINDS`` (``"captured"`` for captures).
        head_focus: per-head focus in [0, 1] (0 = most diffuse of its kind, 1 = sharpest).
        layer, step, num_steps, seed: where this snapshot sits in the generated run.
        order: the :class:`TokenOrder` of the sequence axis (row-major unless asked otherwise).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    geometry: VideoGeometry
    head_kinds: tuple[str, ...]
    head_focus: tuple[float, ...]
    layer: int = 0
    step: int = 0
    num_steps: int = 1
    seed: int = 0
    order: TokenOrder | None = None

    @property
    def batch(self) -> int:
        """B."""
        return self.q.shape[0]

    @property
    def seq_len(self) -> int:
        """S, video plus text tokens."""
        return self.q.shape[1]

    @property
    def heads(self) -> int:
        """H."""
        return self.q.shape[2]

    @property
    def head_dim(self) -> int:
        """D."""
        return self.q.shape[3]

    def __repr__(self) -> str:
        kinds = {k: self.head_kinds.count(k) for k in dict.fromkeys(self.head_kinds)}
        return (
            f"Workload(geometry={self.geometry}, B={self.batch}, S={self.seq_len}, H={self.heads}, "
            f"D={self.head_dim}, layer={self.layer}, step={self.step}/{self.num_steps}, "
            f"order={self.order.name if self.order else 'row_major'}, kinds={kinds}, "
            f"dtype={self.q.dtype}, device={self.q.device})"
        )


@dataclass(frozen=True)
class _HeadParams:
    """Parameters of one head. Shares are fractions of a central query's attention mass."""

    kind: str
    focus: float
    share: float  # on the positional peak (sets beta, solved per geometry)
    radius: tuple[float, float, float]  # peak width in tokens along (t, h, w); inf = flat
    axis_weight: tuple[float, float, float]
    content: float  # same-object score bonus is about content ** 2
    noise: float  # std of the token-level random score term
    sink_share: float  # on the sink keys (global heads)
    text_share: float  # on the text keys, for video queries (text heads)
    wobble_freq: float
    wobble_phase: float


def _lerp_log(lo: float, hi: float, t: float) -> float:
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * t)


def _lerp_logit(lo: float, hi: float, t: float) -> float:
    """Interpolate a probability linearly in log-odds (0 and 1 stay 0 and 1)."""
    if lo <= 0.0 and hi <= 0.0:
        return 0.0
    lo, hi = min(max(lo, 1e-6), 1 - 1e-6), min(max(hi, 1e-6), 1 - 1e-6)
    z = math.log(lo / (1 - lo)) + (math.log(hi / (1 - hi)) - math.log(lo / (1 - lo))) * t
    return 1.0 / (1.0 + math.exp(-z))


def _head_params(kind: str, focus: float, rng: torch.Generator) -> _HeadParams:
    """Map (kind, focus) to head parameters.

    Focus moves the share of a query's attention that sits on the head's structure (peak, sinks
    or text) from low to high in log-odds and narrows the peak. Since the oracle top-p 0.9 mask
    must cover the structure plus whatever part of the diffuse rest is needed to reach 0.9, its
    density falls from ~90% (share near 0) to the size of the structure (share above 0.9): the
    ranges below give a few percent to ~90% across the heads of one layer at ``skew=1``, at any
    grid size (the peak strength is solved per geometry, see :func:`_solve_beta`).
    """
    u = torch.rand(2, generator=rng).tolist()
    f = focus
    inf = math.inf
    sink = text = 0.0
    if kind == "spatial":
        share = _lerp_logit(0.3, 0.999, f)
        r = _lerp_log(6.0, 0.8, f)
        radius, weight = (_lerp_log(1.5, 0.5, f), r, r), (1.0, 1.0, 1.0)
        content, noise = 0.8, 0.5
    elif kind == "temporal":
        share = _lerp_logit(0.3, 0.998, f)
        r = _lerp_log(3.0, 0.7, f)
        radius, weight = (inf, r, r), (0.0, 1.0, 1.0)
        content, noise = 0.7, 0.5
    elif kind == "global":
        share = 0.15
        radius, weight = (2.0, 4.0, 4.0), (1.0, 1.0, 1.0)
        content, noise = 0.9, 0.5
        sink = _lerp_logit(0.2, 0.97, f)
    elif kind == "dense":
        share = _lerp_logit(0.02, 0.4, f)
        radius, weight = (3.0, 8.0, 8.0), (1.0, 1.0, 1.0)
        content, noise = 0.4, 0.3
    elif kind == "text":
        share = _lerp_logit(0.2, 0.8, f)
        r = _lerp_log(5.0, 1.5, f)
        radius, weight = (_lerp_log(2.0, 0.7, f), r, r), (1.0, 1.0, 1.0)
        content, noise = 0.6, 0.5
        text = _lerp_logit(0.2, 0.7, f)
    else:
        raise ValueError(f"unknown head kind {kind!r}; kinds: {', '.join(HEAD_KINDS)}")
    return _HeadParams(
        kind, focus, share, radius, weight, content, noise, sink, text,
        wobble_freq=0.5 + u[0], wobble_phase=2 * math.pi * u[1],
    )


def _axis_kernels(geometry: VideoGeometry, p: _HeadParams, freqs, axis, static):
    """Per axis: the band weights over rotary pairs (or None for a flat axis) and the kernel
    ``k(d) = sum_f w_f cos(freq_f d) / sum_f w_f`` at the offsets seen by a central query."""
    out = []
    for ax in range(3):
        use = (axis == ax) & ~static
        if p.axis_weight[ax] == 0 or math.isinf(p.radius[ax]) or not bool(use.any()):
            out.append((None, None))
            continue
        # A band centred (in log frequency) at 1 / radius: peak at d = 0, decay over ~radius.
        # The centre stays below 0.8 rad/token and the band spans several pairs so that the
        # kernel has no strong alias peaks (the fastest pair alone repeats every 2 pi tokens).
        centre = min(1.0 / p.radius[ax], 0.8)
        band = torch.exp(-0.5 * ((freqs.log() - math.log(centre)) / 0.9) ** 2) * use
        band = band / band.sum()
        n = geometry.dims[ax]
        d = torch.arange(n, dtype=torch.float64) - (n - 1) // 2
        ker = (band[None, :] * torch.cos(d[:, None] * freqs[None, :])).sum(dim=1)
        out.append((band, ker))
    return out


def _solve_beta(geometry: VideoGeometry, p: _HeadParams, kernels) -> float:
    """Peak strength beta such that a central query puts ``p.share`` of its mass above the flat
    background: ``1 - S * E[exp(noise)] / sum_j exp(beta * K(d_j)) = share``, with the 3D kernel a
    sum over axes (so the sum over keys factorises into a product over axes)."""
    if p.share <= 0:
        return 0.0
    betas = torch.logspace(-2, 2.5, 400, dtype=torch.float64)
    logz = torch.zeros_like(betas)
    for ax, (band, ker) in enumerate(kernels):
        n = geometry.dims[ax]
        if ker is None:
            logz += math.log(n)
        else:
            logz += torch.logsumexp(betas[:, None] * p.axis_weight[ax] * ker[None, :], dim=1)
    # Background keys weigh exp(noise) on average, exp(noise ** 2 / 2) for Gaussian score noise.
    share = 1.0 - torch.exp(math.log(geometry.video_tokens) + 0.5 * p.noise**2 - logz)
    hit = torch.nonzero(share >= p.share).reshape(-1)
    return float(betas[hit[0]]) if hit.numel() else float(betas[-1])


def _kind_counts(heads: int, weights: dict[str, float]) -> list[str]:
    """Largest-remainder rounding of ``weights * heads``, in HEAD_KINDS order."""
    names = [k for k in HEAD_KINDS if weights.get(k, 0.0) > 0]
    total = sum(weights[k] for k in names)
    raw = [weights[k] / total * heads for k in names]
    counts = [int(math.floor(r)) for r in raw]
    for i in sorted(range(len(names)), key=lambda i: raw[i] - counts[i], reverse=True)[: heads - sum(counts)]:
        counts[i] += 1
    return [k for k, c in zip(names, counts) for _ in range(c)]


def make_workload(
    shape: str | ModelShape | VideoGeometry = "cpu-small",
    *,
    batch: int = 1,
    heads: int | None = None,
    head_dim: int | None = None,
    text_tokens: int | None = None,
    layer: int = 0,
    step: int = 0,
    num_steps: int = 50,
    seed: int = 0,
    skew: float = 1.0,
    drift: float = 0.3,
    token_noise: float = 1.0,
    region_skew: float = 0.0,
    kind_weights: dict[str, float] | None = None,
    head_kinds: tuple[str, ...] | list[str] | None = None,
    order: str | TokenOrder = "row_major",
    tile: tuple[int, int, int] = (4, 4, 4),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Workload:
    """Synthetic Q/K/V of one self-attention layer of a video DiT at one denoising step.

    How the structure arises. In score units (``q . k / sqrt(D)``) every head is built from:

    * a positional peak: equal constant vectors for q and k in the fast-rotating 3D-RoPE pairs,
      so after RoPE ``q_i . k_j = beta * sum_axis w_axis * sum_f band_f cos(freq_f * dpos_axis)``:
      a peak at zero offset, about ``radius`` tokens wide along each axis (a band of frequencies
      around ``1 / radius``), flat along an axis with weight 0 (temporal heads along time);
      ``beta`` is solved per geometry so that a query in the middle of the video puts a chosen
      share of its attention on the peak;
    * content in the slow pairs (rotation < 0.25 rad over the grid): tokens belong softly to a
      few moving "objects" and score ``~ content**2`` with tokens of the same object anywhere in
      the video (scattered, fine-grained structure);
    * sink keys (global heads: a few tokens every query attends to) and text keys (text heads:
      video queries attend the trailing text tokens; text queries attend broadly);
    * i.i.d. token noise (real attention is never a clean kernel).

    Head kinds (``HEAD_KINDS``): ``spatial`` (local in h and w within the same or adjacent frames),
    ``temporal`` (same (h, w) across all frames), ``global`` (sinks plus diffuse), ``dense``
    (near-uniform), ``text`` (local plus text keys; needs text tokens). Each head also has a focus
    in [0, 1], spread over the heads of a layer, which moves it from diffuse to sharp: at
    ``skew=1`` the oracle 64 x 64 density at top-p 0.9 spans a few percent to ~90% across heads at
    the Wan 480p shape (denser on small CPU grids, which have fewer far-away keys).

    Steps: head strengths wobble by up to ``exp(+-2 drift)`` over the run (exactly 1 at step 0)
    and the token noise and object positions move slowly, so consecutive steps differ by a
    relative amount of order ``drift / num_steps``; ``drift=0`` gives identical steps. Layers draw
    independent heads.

    Seeding: kinds, focus and object layout come from a CPU generator seeded by ``(seed, layer)``
    (identical on every device); the per-token noise comes from a generator on ``device``, so CPU
    and CUDA give different but identically distributed tokens. The same arguments give the same
    tensors on the same device.

    Args:
        shape: a preset name from ``PRESETS`` (e.g. ``"wan1.3b-480p"``), a :class:`ModelShape`,
            or a :class:`VideoGeometry` (then ``heads`` and ``head_dim`` default to 12 and 128).
            Default: ``"cpu-small"`` (9 x 16 x 16 tokens, 12 heads, D = 128).
        batch: B; batch elements get independent content and noise. Default: 1.
        heads, head_dim: override the preset's. Default: the preset's.
        text_tokens: override the geometry's trailing text tokens. Default: the geometry's.
        layer: layer index (selects the heads). Default: 0.
        step, num_steps: denoising step in ``[0, num_steps)``. Default: 0 of 50.
        seed: base seed. Default: 0.
        skew: spread of per-head focus: 0 gives every head focus 0.5, 1 spreads them evenly
            over [0, 1], values above 1 push more heads to the extremes. Default: 1.0.
        drift: relative change of the head parameters over the whole run. Default: 0.3.
        token_noise: multiplies each head's token-level score noise (std 0.3-0.5 score units at
            1.0). More noise makes the important keys of a region more scattered, which favours
            fine-grained masks over block masks (see benchmarks/bench_predict.py). Default: 1.0.
        region_skew: spread of attention sharpness across the video. Every video query of every
            head is scaled by ``exp(region_skew * z)``, with ``z`` a smooth zero-mean, unit-variance
            random field over (frame, row, column) shared by the heads (a few slow waves, up to 2
            cycles along time, 1 along each spatial axis; moving with ``drift`` across steps):
            a query temperature, so regions with ``z > 0`` attend more sharply (sparser mask
            rows) and those with ``z < 0`` more broadly. Since the field varies along time, the
            contiguous frame ranges that sequence parallelism gives each rank carry different
            work: block-level imbalance, on top of the head-level one that ``skew`` sets.
            0 gives every region the same statistics (and the same tensors as before this
            option existed). Default: 0.0.
        kind_weights: share of each kind. Default: ``DEFAULT_KIND_WEIGHTS`` (text only with
            text tokens).
        head_kinds: explicit kind per head (overrides ``kind_weights``).
        order: ``"row_major"``, ``"tiled"`` (:func:`tile_order` with ``tile``) or a
            :class:`TokenOrder`. Default: ``"row_major"``.
        tile: tile for ``order="tiled"``. Default: ``(4, 4, 4)``.
        device: Default: CPU.
        dtype: of q, k, v (generated in float32). Default: float32.

    Returns:
        A :class:`Workload` with ``q, k, v`` of shape ``(B, S, H, D)``.

    Example::

        >>> w = make_workload("cpu-tiny", layer=1, step=3)
        >>> w.q.shape, w.head_kinds
        (torch.Size([1, 320, 4, 64]), ('temporal', 'dense', 'global', 'spatial'))
    """
    if isinstance(shape, VideoGeometry):
        geometry = shape
        n_heads, dim = (12 if heads is None else heads), (128 if head_dim is None else head_dim)
    else:
        ms = get_shape(shape)
        geometry = ms.geometry
        n_heads = ms.heads if heads is None else heads
        dim = ms.head_dim if head_dim is None else head_dim
    if text_tokens is not None:
        geometry = VideoGeometry(geometry.frames, geometry.height, geometry.width, text_tokens)
    check_positive_int("batch", batch)
    check_positive_int("heads", n_heads)
    check_positive_int("head_dim", dim)
    if dim % 2 or dim < 12:
        raise ValueError(f"head_dim must be even and >= 12 (3 RoPE axes), got {dim}")
    check_nonnegative_int("layer", layer)
    check_positive_int("num_steps", num_steps)
    check_nonnegative_int("step", step)
    if step >= num_steps:
        raise ValueError(f"step must lie in [0, num_steps) = [0, {num_steps}), got {step}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    for name, val in (("skew", skew), ("drift", drift), ("token_noise", token_noise), ("region_skew", region_skew)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not (0 <= val < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {val!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")

    rng = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    if head_kinds is not None:
        kinds = list(head_kinds)
        if len(kinds) != n_heads:
            raise ValueError(f"head_kinds has {len(kinds)} entries but heads={n_heads}")
    else:
        weights = dict(DEFAULT_KIND_WEIGHTS if kind_weights is None else kind_weights)
        bad = sorted(set(weights) - set(HEAD_KINDS))
        if bad or any(not (w >= 0) for w in weights.values()):
            raise ValueError(f"kind_weights must map kinds in {HEAD_KINDS} to weights >= 0, got {weights}")
        if not geometry.text_tokens:
            weights.pop("text", None)
        if sum(weights.values()) <= 0:
            raise ValueError(f"kind_weights must give some usable kind a positive weight, got {weights}")
        kinds = _kind_counts(n_heads, weights)
        kinds = [kinds[i] for i in torch.randperm(n_heads, generator=rng).tolist()]
    for kd in kinds:
        if kd not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kd!r}; kinds: {', '.join(HEAD_KINDS)}")
        if kd == "text" and not geometry.text_tokens:
            raise ValueError("head kind 'text' needs text tokens (text_tokens > 0)")

    # Stratified focus: every head gets its own slice of [0, 1], so even 4 heads spread out.
    strata = torch.randperm(n_heads, generator=rng).to(torch.float64)
    raw = (strata + torch.rand(n_heads, generator=rng, dtype=torch.float64)) / n_heads
    focus = (0.5 + skew * (raw - 0.5)).clamp(0.0, 1.0).tolist()
    params = [_head_params(kd, f, rng) for kd, f in zip(kinds, focus)]
    if token_noise != 1.0:
        params = [dataclasses.replace(p, noise=p.noise * token_noise) for p in params]

    device = torch.device("cpu") if device is None else torch.device(device)
    u = step / max(num_steps - 1, 1)  # position in the run, 0 .. 1
    temperature = None
    if region_skew > 0:
        z = region_field(geometry, seed=seed, step=step, num_steps=num_steps, drift=drift, batch=batch)
        temperature = torch.exp(region_skew * z).to(device)
    q, k, v = _generate(geometry, params, batch, dim, u, drift, rng, seed * 1_000_003 + layer, device, temperature)

    if isinstance(order, TokenOrder):
        tok_order = order
        if tok_order.num_tokens != geometry.num_tokens:
            raise ValueError(f"order is for {tok_order.num_tokens} tokens but the geometry has {geometry.num_tokens}")
    elif order == "row_major":
        tok_order = None
    elif order == "tiled":
        tok_order = tile_order(geometry, tile)
    else:
        raise ValueError(f"order must be 'row_major', 'tiled' or a TokenOrder, got {order!r}")
    if tok_order is not None:
        q, k, v = (tok_order.apply(x) for x in (q, k, v))
    return Workload(
        q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), geometry=geometry, head_kinds=tuple(kinds),
        head_focus=tuple(float(f) for f in focus), layer=layer, step=step, num_steps=num_steps,
        seed=seed, order=tok_order,
    )


def _object_membership(
    geometry: VideoGeometry, n_obj: int, u: float, drift: float, rng: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``(video_tokens, n_obj + 1)`` soft membership of each token in moving blobs (+ background)."""
    T, Hh, W = geometry.dims
    centre = torch.rand(n_obj, 2, generator=rng, dtype=torch.float64) * torch.tensor([Hh, W], dtype=torch.float64)
    vel = (torch.rand(n_obj, 2, generator=rng, dtype=torch.float64) - 0.5) * 0.5  # tokens per frame
    rad = (0.12 + 0.18 * torch.rand(n_obj, generator=rng, dtype=torch.float64)) * min(Hh, W) + 0.5
    shift = (torch.rand(n_obj, 2, generator=rng, dtype=torch.float64) - 0.5) * 2 * drift * u * torch.tensor([Hh, W]) * 0.1
    pos = geometry.positions().to(torch.float64)  # (Sv, 3)
    c = centre[None] + vel[None] * pos[:, None, :1] + shift[None]  # (Sv, n_obj, 2)
    d2 = ((pos[:, None, 1:] - c) ** 2).sum(-1) / rad[None] ** 2
    logits = torch.cat([-2.0 * d2, torch.full((pos.shape[0], 1), -2.0, dtype=torch.float64)], dim=1)
    return torch.softmax(3.0 * logits, dim=1).to(torch.float32).to(device)


def region_field(geometry: VideoGeometry, *, seed: int = 0, step: int = 0, num_steps: int = 50,
                 drift: float = 0.3, batch: int = 1) -> torch.Tensor:
    """``(batch, video_tokens)`` float32: the smooth random field ``z`` of ``make_workload``'s
    ``region_skew`` (zero mean and unit variance over each video's tokens, row-major order).

    Six plane waves ``cos(2 pi (f . x) + phase)`` over ``x = (t, h, w) / (dims - 1)`` with
    frequencies drawn uniformly in [0.3, 2] cycles along time and [0, 1] along each spatial axis;
    the phases advance by up to ``pi * drift`` over the run, so the field moves slowly across
    steps. It has its own generator (seeded by ``seed`` and ``batch`` index only), so it is the
    same for every layer of a video, as a property of the content would be.
    """
    check_positive_int("num_steps", num_steps)
    u = step / max(num_steps - 1, 1)
    dims = geometry.dims
    x = geometry.positions().to(torch.float64) / torch.tensor([max(n - 1, 1) for n in dims], dtype=torch.float64)
    lo = torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)  # cycles over the grid: (time, rows, columns)
    hi = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    out = torch.empty(batch, geometry.video_tokens)
    for b in range(batch):
        g = torch.Generator().manual_seed(seed * 7_919 + b + 104_729)
        freq = lo + (hi - lo) * torch.rand(6, 3, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(6, generator=g, dtype=torch.float64)
        speed = torch.rand(6, generator=g, dtype=torch.float64) * 2 - 1
        z = torch.cos(2 * math.pi * (x @ freq.T) + phase + math.pi * drift * u * speed).sum(dim=1)
        out[b] = ((z - z.mean()) / z.std().clamp_min(1e-12)).to(torch.float32)
    return out


def _generate(geometry, params, batch, dim, u, drift, rng, dev_seed, device, temperature=None):
    """Build q, k, v ``(B, S, H, D)`` float32 in row-major order from per-head parameters;
    ``temperature`` (``(B, Sv)`` or None) scales the video queries."""
    S, Sv, C = geometry.num_tokens, geometry.video_tokens, dim // 2
    freqs, axis = rope_frequencies(dim)
    extent = torch.tensor([n - 1 for n in geometry.dims], dtype=torch.float64)[axis]
    static = (freqs * extent < 0.25) | (extent == 0)  # pairs that barely rotate over the grid
    static_idx = torch.nonzero(static).reshape(-1)
    if static_idx.numel() < 4:
        raise ValueError(f"head_dim={dim} leaves {static_idx.numel()} slow RoPE pairs on grid {geometry}; need >= 4")
    sink_ch, text_ch, content_ch = static_idx[0], static_idx[1], static_idx[2:]
    n_content = content_ch.numel()
    n_obj = 6
    n_sink = max(1, round(0.002 * Sv))
    a = 0.5 * math.pi * drift * u  # slow rotation of the token noise across steps
    ca, sa = math.cos(a), math.sin(a)
    s4 = dim**0.25  # q and k scaled by D ** 0.25 so that SDPA's 1 / sqrt(D) yields score units

    heads = []
    for p in params:
        kernels = _axis_kernels(geometry, p, freqs, axis, static)
        # Wobble across steps, exactly 1 at step 0 so that `skew` alone sets the spread there.
        wob = math.exp(drift * (math.sin(math.pi * p.wobble_freq * u + p.wobble_phase) - math.sin(p.wobble_phase)))
        beta = _solve_beta(geometry, p, kernels) * wob
        amp = torch.zeros(C, dtype=torch.float64)
        for ax, (band, _) in enumerate(kernels):
            if band is not None:
                amp += band * beta * p.axis_weight[ax]
        # Sinks / text keys take `share` of the mass against Sv background keys of weight ~1.
        odds = lambda share: share / (1.0 - share)  # noqa: E731
        sink = math.log(odds(p.sink_share) * Sv / n_sink) + math.log(wob) if p.sink_share > 0 else None
        text = None
        if p.text_share > 0 and geometry.text_tokens:
            text = math.log(odds(p.text_share) * Sv / geometry.text_tokens) + math.log(wob)
        heads.append((p, amp.sqrt().to(torch.float32).to(device), sink, text))

    angles = rope_angles(geometry, dim, device=device)  # (S, C)
    gen = torch.Generator(device=device).manual_seed(dev_seed)
    q = torch.empty(batch, S, len(params), dim, device=device)
    k = torch.empty_like(q)
    v = torch.empty_like(q)
    for b in range(batch):
        member = _object_membership(geometry, n_obj, u, drift, rng, device)  # (Sv, n_obj + 1)
        sinks = torch.randperm(Sv, generator=rng)[:n_sink].to(device)
        for h, (p, amp, sink, text) in enumerate(heads):
            # Real and imaginary parts of the (S, C) rotary pairs before RoPE.
            qr = torch.zeros(S, C, device=device)
            qi = torch.zeros(S, C, device=device)
            kr = torch.zeros(S, C, device=device)
            ki = torch.zeros(S, C, device=device)
            # Positional peak: equal constants in q and k, so q_i . k_j = sum_f amp_f^2 cos(...).
            qr[:Sv] += amp
            kr[:Sv] += amp

            # Content: object features in the slow pairs, same for q and k (same-object bonus).
            feat = torch.randn(n_obj + 1, n_content, 2, generator=rng)
            feat = feat / feat.flatten(1).norm(dim=1)[:, None, None]
            feat[-1] *= 0.3  # the background is a weak object
            cont = p.content * (member @ feat.to(device).flatten(1)).reshape(Sv, n_content, 2)
            qr[:Sv, content_ch] += cont[..., 0]
            qi[:Sv, content_ch] += cont[..., 1]
            kr[:Sv, content_ch] += cont[..., 0]
            ki[:Sv, content_ch] += cont[..., 1]

            # Sinks: every query carries a unit sink component, the sink keys a strong one.
            if sink is not None:
                qr[:, sink_ch] += 1.0
                kr[sinks, sink_ch] += sink
            # Text: video queries of text heads look for text keys; text queries look broadly.
            if geometry.text_tokens:
                kr[Sv:, text_ch] += 1.0
                if text is not None:
                    qr[:Sv, text_ch] += text

            # Token noise with score-space std p.noise, rotating slowly across steps.
            sigma = math.sqrt(p.noise / math.sqrt(dim))
            for t in (qr, qi, kr, ki):
                n0 = torch.randn(S, C, generator=gen, device=device)
                n1 = torch.randn(S, C, generator=gen, device=device)
                t += sigma * (ca * n0 + sa * n1)

            # Values: object features plus noise, so dropping same-object keys costs accuracy.
            vf = torch.randn(n_obj + 1, dim, generator=rng).to(device)
            v0 = torch.randn(S, dim, generator=gen, device=device)
            v1 = torch.randn(S, dim, generator=gen, device=device)
            v[b, :, h] = ca * v0 + sa * v1
            v[b, :Sv, h] += member @ vf

            if temperature is not None:
                qr[:Sv] *= temperature[b, :, None]
                qi[:Sv] *= temperature[b, :, None]
            q[b, :, h] = torch.stack([qr, qi], dim=-1).reshape(S, dim) * s4
            k[b, :, h] = torch.stack([kr, ki], dim=-1).reshape(S, dim) * s4
    return apply_rope(q, angles), apply_rope(k, angles), v
