"""Captured attention inputs (and masks) on disk: the format, a writer and a lazy loader.

Users capture q/k/v (or masks) from their own models, per layer and denoising step, and feed them
to dbsp's predictors, quality metrics and benchmarks instead of synthetic workloads. The format
(also in docs/capture_format.md) is one file, safetensors (``.safetensors``) or torch
(``.pt``/``.pth``), holding flat named tensors and string metadata:

===================================  ==========================================================
tensor name                          content
===================================  ==========================================================
``layer{L}.step{S}.q``               ``(B, Sq, H, D)`` queries as the attention sees them
                                     (after RoPE and any norm), in the model's token order
``layer{L}.step{S}.k``, ``.v``       ``(B, Skv, H, D)`` keys / values (``v`` optional)
``layer{L}.step{S}.mask.offsets``    ``(B, H, Mq + 1)`` int64 CSR offsets of a ``SparseMask``
``layer{L}.step{S}.mask.indices``    ``(nnz,)`` int32 key-tile ids
===================================  ==========================================================

Metadata (all values are strings; safetensors stores them in its header, ``.pt`` files in a
``"metadata"`` dict next to a ``"tensors"`` dict):

* ``dbsp_capture``: format version, ``"1"``.
* ``layout``: ``"BSHD"``.
* ``geometry`` (optional): ``"FxHxW"`` video tokens, and ``text_tokens``: count of trailing text
  tokens (``"0"`` if none), so tools can rebuild the :class:`~dbsp.video.VideoGeometry`.
* ``order`` (optional): name of the token order of the tensors (default ``"row_major"``).
* ``layer{L}.step{S}.mask``: JSON ``{"q_block", "kv_tile", "seq_len_q", "seq_len_kv"}``.
* anything else the user adds (model name, prompt, ...), kept as is.

Every entry may hold any subset of q/k/v/mask; q and k come together.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ._checks import check_nonnegative_int, check_tensor
from .mask import SparseMask
from .video import VideoGeometry, Workload

FORMAT_VERSION = "1"
_NAME = re.compile(r"^layer(\d+)\.step(\d+)\.(q|k|v|mask\.offsets|mask\.indices)$")


@dataclass(frozen=True, eq=False)
class CaptureEntry:
    """What was captured for one (layer, step): ``q``/``k``/``v`` ``(B, S, H, D)`` and/or a mask."""

    layer: int
    step: int
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    mask: SparseMask | None = None

    def __post_init__(self) -> None:
        check_nonnegative_int("layer", self.layer)
        check_nonnegative_int("step", self.step)
        if (self.q is None) != (self.k is None):
            raise ValueError(f"layer {self.layer} step {self.step}: q and k must be captured together")
        if self.v is not None and self.k is None:
            raise ValueError(f"layer {self.layer} step {self.step}: v needs q and k")
        for name in ("q", "k", "v"):
            t = getattr(self, name)
            if t is not None:
                check_tensor(name, t)
                if t.dim() != 4:
                    raise ValueError(f"{name} must be (B, S, H, D), got shape {tuple(t.shape)}")
        if self.q is not None:
            B, _, H, D = self.q.shape
            for name in ("k", "v"):
                t = getattr(self, name)
                if t is not None and (t.shape[0], t.shape[2], t.shape[3]) != (B, H, D):
                    raise ValueError(f"{name} {tuple(t.shape)} does not match q {tuple(self.q.shape)} in B, H, D")
            if self.v is not None and self.v.shape != self.k.shape:
                raise ValueError(f"v {tuple(self.v.shape)} must have the shape of k {tuple(self.k.shape)}")
        if self.mask is not None and not isinstance(self.mask, SparseMask):
            raise TypeError(f"mask must be a SparseMask, got {type(self.mask).__name__}")
        if self.mask is not None and self.q is not None:
            if (self.mask.batch, self.mask.heads, self.mask.seq_len_q, self.mask.seq_len_kv) != (
                self.q.shape[0], self.q.shape[2], self.q.shape[1], self.k.shape[1]
            ):
                raise ValueError(f"mask {self.mask!r} does not match q {tuple(self.q.shape)}, k {tuple(self.k.shape)}")


def _prefix(layer: int, step: int) -> str:
    return f"layer{layer}.step{step}"


def save_capture(
    path: str | Path,
    entries,
    *,
    geometry: VideoGeometry | None = None,
    order: str = "row_major",
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write captured entries to ``path`` (``.safetensors`` or ``.pt``/``.pth``).

    Args:
        path: the file; its suffix picks the container. safetensors needs the ``safetensors``
            package.
        entries: iterable of :class:`CaptureEntry` (one per (layer, step), no duplicates).
        geometry: the video token grid of the sequences. Default: None (not recorded).
        order: name of the token order of the tensors. Default: ``"row_major"``.
        metadata: extra string metadata (e.g. ``{"model": "Wan2.1-T2V-1.3B"}``). Default: none.

    Returns:
        The path written.

    Example::

        >>> w = make_workload("cpu-tiny")
        >>> save_capture("cap.safetensors", [CaptureEntry(0, 0, w.q, w.k, w.v)], geometry=w.geometry)
    """
    path = Path(path)
    kind = _container(path)
    meta: dict[str, str] = {"dbsp_capture": FORMAT_VERSION, "layout": "BSHD", "order": str(order)}
    if geometry is not None:
        if not isinstance(geometry, VideoGeometry):
            raise TypeError(f"geometry must be a VideoGeometry, got {type(geometry).__name__}")
        meta["geometry"] = f"{geometry.frames}x{geometry.height}x{geometry.width}"
        meta["text_tokens"] = str(geometry.text_tokens)
    for key, val in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {val!r}")
        if key in meta or _NAME.match(key) or key.endswith(".mask"):
            raise ValueError(f"metadata key {key!r} is reserved by the capture format")
        meta[key] = val
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        # safetensors refuses tensors that share memory; copy only those that do.
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        return t

    seen = set()
    for e in entries:
        if not isinstance(e, CaptureEntry):
            raise TypeError(f"entries must be CaptureEntry objects, got {type(e).__name__}")
        if (e.layer, e.step) in seen:
            raise ValueError(f"duplicate entry for layer {e.layer} step {e.step}")
        seen.add((e.layer, e.step))
        p = _prefix(e.layer, e.step)
        for name in ("q", "k", "v"):
            t = getattr(e, name)
            if t is not None:
                tensors[f"{p}.{name}"] = own(t)
        if e.mask is not None:
            m = e.mask
            tensors[f"{p}.mask.offsets"] = own(m.offsets)
            tensors[f"{p}.mask.indices"] = own(m.indices)
            meta[f"{p}.mask"] = json.dumps(
                {"q_block": m.q_block, "kv_tile": m.kv_tile, "seq_len_q": m.seq_len_q, "seq_len_kv": m.seq_len_kv}
            )
    if not seen:
        raise ValueError("entries is empty: nothing to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
        _safetensors().save_file(tensors, str(path), metadata=meta)
    else:
        torch.save({"metadata": meta, "tensors": tensors}, path)
    return path


class Capture:
    """A capture file opened for reading; tensors are read only when an entry is asked for.

    Use :func:`load_capture` to open one. ``keys()`` lists the ``(layer, step)`` pairs present.
    """

    def __init__(self, path: Path, metadata: dict[str, str], names: list[str], reader) -> None:
        self.path = path
        self.metadata = dict(metadata)
        self._read = reader
        self._parts: dict[tuple[int, int], set[str]] = {}
        for name in names:
            m = _NAME.match(name)
            if m is None:
                raise ValueError(f"{path}: tensor name {name!r} is not part of the dbsp capture format")
            self._parts.setdefault((int(m.group(1)), int(m.group(2))), set()).add(m.group(3))
        for (layer, step), parts in self._parts.items():
            if ("q" in parts) != ("k" in parts) or ("v" in parts and "k" not in parts):
                raise ValueError(f"{path}: layer {layer} step {step} holds {sorted(parts)}; q and k go together")
            if ("mask.offsets" in parts) != ("mask.indices" in parts) or (
                "mask.offsets" in parts and f"{_prefix(layer, step)}.mask" not in metadata
            ):
                raise ValueError(f"{path}: layer {layer} step {step} has an incomplete mask")

    @property
    def geometry(self) -> VideoGeometry | None:
        """The recorded :class:`VideoGeometry`, or None."""
        g = self.metadata.get("geometry")
        if not g:
            return None
        f, h, w = (int(x) for x in g.split("x"))
        return VideoGeometry(f, h, w, int(self.metadata.get("text_tokens", "0")))

    def keys(self) -> list[tuple[int, int]]:
        """Sorted ``(layer, step)`` pairs in the file."""
        return sorted(self._parts)

    @property
    def layers(self) -> list[int]:
        """Layer indices held, ascending."""
        return sorted({layer for layer, _ in self._parts})

    @property
    def steps(self) -> list[int]:
        """Step indices held, ascending."""
        return sorted({step for _, step in self._parts})

    def get(self, layer: int, step: int, *, device: torch.device | str | None = None) -> CaptureEntry:
        """Load the entry of ``(layer, step)`` (onto ``device``; default CPU)."""
        if (layer, step) not in self._parts:
            raise KeyError(f"{self.path}: no entry for layer {layer} step {step}; present: {self.keys()}")
        parts, p = self._parts[(layer, step)], _prefix(layer, step)
        t = {name: self._read(f"{p}.{name}").to(device or "cpu") for name in parts}
        mask = None
        if "mask.offsets" in parts:
            info = json.loads(self.metadata[f"{p}.mask"])
            mask = SparseMask(
                t["mask.offsets"], t["mask.indices"], info["q_block"], info["kv_tile"], info["seq_len_q"], info["seq_len_kv"]
            )
        return CaptureEntry(layer, step, t.get("q"), t.get("k"), t.get("v"), mask)

    def workload(self, layer: int, step: int, *, device: torch.device | str | None = None) -> Workload:
        """The entry as a :class:`~dbsp.video.Workload` (needs q, k and v); head kinds are ``"captured"``."""
        e = self.get(layer, step, device=device)
        if e.v is None:
            raise ValueError(f"{self.path}: layer {layer} step {step} has no v; a Workload needs q, k and v")
        S = e.q.shape[1]
        geometry = self.geometry or VideoGeometry(1, 1, S)
        if geometry.num_tokens != S:
            raise ValueError(f"{self.path}: geometry {geometry} has {geometry.num_tokens} tokens but q has {S}")
        H = e.q.shape[2]
        return Workload(
            q=e.q, k=e.k, v=e.v, geometry=geometry, head_kinds=("captured",) * H, head_focus=(float("nan"),) * H,
            layer=layer, step=step, num_steps=max(self.steps) + 1,
        )

    def __repr__(self) -> str:
        return f"Capture({str(self.path)!r}, entries={len(self._parts)}, layers={self.layers}, steps={self.steps}, geometry={self.geometry})"


def load_capture(path: str | Path) -> Capture:
    """Open a capture file written by :func:`save_capture` (or by hand in the same format).

    safetensors files are read lazily (one tensor at a time); ``.pt`` files are memory-mapped.
    Raises ``ValueError`` for files that are not dbsp captures or hold malformed entries.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"capture file {path} does not exist")
    kind = _container(path)
    if kind == "safetensors":
        st = _safetensors()
        with st.safe_open(str(path), framework="pt") as f:
            meta, names = dict(f.metadata() or {}), list(f.keys())

        def reader(name: str) -> torch.Tensor:
            with st.safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
    else:
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(blob, dict) or set(blob) != {"metadata", "tensors"}:
            raise ValueError(f"{path}: a .pt capture must hold a dict with keys 'metadata' and 'tensors'")
        meta, tensors = dict(blob["metadata"]), blob["tensors"]
        names = list(tensors)

        def reader(name: str) -> torch.Tensor:
            return tensors[name]

    if meta.get("dbsp_capture") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a dbsp capture (metadata dbsp_capture={meta.get('dbsp_capture')!r}, expected {FORMAT_VERSION!r})")
    if meta.get("layout") != "BSHD":
        raise ValueError(f"{path}: layout {meta.get('layout')!r} is not supported (expected 'BSHD')")
    return Capture(path, meta, names, reader)


def _container(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pt", ".pth"):
        return "torch"
    raise ValueError(f"capture files must end in .safetensors, .pt or .pth, got {path.name!r}")


def _safetensors():
    try:
        import safetensors.torch as st_torch
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading or writing .safetensors captures needs `pip install safetensors`; or use .pt") from err

    return SimpleNamespace(save_file=st_torch.save_file, safe_open=safe_open)
