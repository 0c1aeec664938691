"""SPGroups: the Ulysses and Ring process groups of one sequence-parallel layout, built explicitly.

Rank layout (the Plan contract): ``P = U x R`` ranks on a 2-D ``DeviceMesh`` of shape ``(R, U)``
named ``("ring", "ulysses")``. Global rank ``r`` has ring index ``i = r // U`` and Ulysses index
``k = r % U``, so the Ulysses groups are runs of consecutive ranks and the ring groups are strided::

    P = 8, U = 2, R = 4              ulysses groups (rows)   ring groups (columns)
                  k=0  k=1
        i = 0      0    1            {0, 1}                  {0, 2, 4, 6}
        i = 1      2    3            {2, 3}                  {1, 3, 5, 7}
        i = 2      4    5            {4, 5}
        i = 3      6    7            {6, 7}

The U shards of one Ulysses group are therefore one contiguous piece of the sequence.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .._checks import check_positive_int
from .layout import MeshPosition

log = logging.getLogger("dbsp")


def factorisations(world: int, *, heads: int | None = None) -> list[tuple[int, int]]:
    """Every ``(U, R)`` with ``U * R == world`` (and ``heads % U == 0`` when ``heads`` is given), U descending.

    Example: ``factorisations(8, heads=12) == [(4, 2), (2, 4), (1, 8)]``.
    """
    check_positive_int("world", world)
    if heads is not None:
        check_positive_int("heads", heads)
    return [(u, world // u) for u in range(world, 0, -1) if world % u == 0 and (heads is None or heads % u == 0)]


@dataclass(frozen=True)
class SPGroups(MeshPosition):
    """The process groups of one ``(ulysses, ring)`` factorisation of the world.

    Build it with :meth:`SPGroups.init` (a collective: every rank calls it with the same degrees)
    and pass it explicitly to :func:`dbsp.dist.sp_attention`; dbsp keeps no process-group state of
    its own.

    Attributes:
        ulysses: U, the Ulysses (head-parallel) degree.
        ring: R, the Ring (sequence-parallel) degree.
        mesh: the ``(R, U)`` DeviceMesh with dimension names ``("ring", "ulysses")``.
        ulysses_group: this rank's Ulysses group (U consecutive ranks).
        ring_group: this rank's ring group (R ranks, stride U).
        world_group: the group of all ``U * R`` ranks (used for the cross-rank checks).
        rank: this process's global rank.
        timeout: how long a collective or ring transfer of the Ulysses and ring groups waits for
            a peer before it raises, as :meth:`init` set it; None for groups built otherwise
            (they keep whatever their process groups have). Default: None.

    Example::

        >>> groups = SPGroups.init(ulysses=2, ring=2)      # on each of 4 ranks
        >>> groups.ring_rank, groups.ulysses_rank           # on rank 3
        (1, 1)
    """

    ulysses: int
    ring: int
    mesh: DeviceMesh
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    world_group: dist.ProcessGroup
    rank: int
    timeout: datetime.timedelta | None = None

    def __post_init__(self) -> None:
        check_positive_int("ulysses", self.ulysses)
        check_positive_int("ring", self.ring)
        if self.timeout is not None:
            _check_timeout(self.timeout)
        if tuple(self.mesh.mesh.shape) != (self.ring, self.ulysses):
            raise ValueError(
                f"mesh must have shape (ring, ulysses) = ({self.ring}, {self.ulysses}), "
                f"got {tuple(self.mesh.mesh.shape)}"
            )
        for name, size in (("ulysses_group", self.ulysses), ("ring_group", self.ring)):
            group = getattr(self, name)
            if dist.get_world_size(group) != size:
                raise ValueError(f"{name} has {dist.get_world_size(group)} ranks, expected {size}")

    @classmethod
    def init(
        cls, *, ulysses: int, ring: int, device_type: str | None = None, timeout: datetime.timedelta | None = None
    ) -> "SPGroups":
        """Build the groups for ``ulysses x ring`` over the default process group.

        A collective call: every rank must call it with the same arguments, after
        ``torch.distributed.init_process_group``.

        Args:
            ulysses: U >= 1, the Ulysses degree (heads are split U ways).
            ring: R >= 1, the Ring degree (the sequence is split R ways).
            device_type: the mesh's device type. Default: ``"cuda"`` when the default group's
                backend is NCCL, else ``"cpu"``.
            timeout: how long collectives and ring transfers of the Ulysses and ring groups wait
                for a peer before raising, so a rank that died or stopped calling fails the
                others instead of hanging them. (torch gives a DeviceMesh's sub-groups its
                30-minute default, whatever ``init_process_group`` was given; a mesh dimension
                that spans the whole world reuses the default group and keeps its timeout.)
                Default: the default process group's timeout.

        Returns:
            The ``SPGroups`` of this rank.

        Raises:
            RuntimeError: if torch.distributed is not initialised.
            ValueError: if ``ulysses * ring`` differs from the world size (naming both factors).
        """
        check_positive_int("ulysses", ulysses)
        check_positive_int("ring", ring)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "SPGroups.init needs torch.distributed to be initialised first "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        world = dist.get_world_size()
        if ulysses * ring != world:
            raise ValueError(
                f"ulysses x ring must equal the world size: ulysses={ulysses} x ring={ring} = "
                f"{ulysses * ring}, but the world has {world} ranks"
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if not isinstance(device_type, str):
            raise TypeError(f"device_type must be a str such as 'cuda' or 'cpu', got {type(device_type).__name__}")
        timeout = _default_timeout() if timeout is None else _check_timeout(timeout)
        mesh = init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
        for name in ("ring", "ulysses"):
            _set_timeout(mesh.get_group(name), timeout)
        return cls(
            ulysses=ulysses,
            ring=ring,
            mesh=mesh,
            ulysses_group=mesh.get_group("ulysses"),
            ring_group=mesh.get_group("ring"),
            world_group=dist.group.WORLD,
            rank=dist.get_rank(),
            timeout=timeout,
        )

    @classmethod
    def all_degrees(
        cls, *, heads: int | None = None, device_type: str | None = None, timeout: datetime.timedelta | None = None
    ) -> dict[tuple[int, int], "SPGroups"]:
        """Pre-built groups for every factorisation ``U x R`` of the world (for per-layer degree choice).

        A collective call. Switching between the returned layouts costs nothing beyond the data
        movement of the call itself.

        Args:
            heads: if given, keep only the factorisations with ``heads % U == 0``. Default: None.
            device_type, timeout: as in :meth:`init`.

        Returns:
            ``{(U, R): SPGroups}`` ordered by decreasing U.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SPGroups.all_degrees needs torch.distributed to be initialised first")
        pairs = factorisations(dist.get_world_size(), heads=heads)
        return {(u, r): cls.init(ulysses=u, ring=r, device_type=device_type, timeout=timeout) for u, r in pairs}

    @property
    def world_size(self) -> int:
        """P = U * R."""
        return self.ulysses * self.ring

    @property
    def device_type(self) -> str:
        """The mesh's device type (``"cuda"`` or ``"cpu"``)."""
        return self.mesh.device_type

    def device(self) -> torch.device:
        """The device collectives of these groups run on (the current CUDA device for ``cuda``)."""
        if self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.device_type)

    def ring_peer(self, ring_index: int) -> int:
        """Global rank of ring index ``ring_index`` (mod R) in this rank's ring group."""
        return (ring_index % self.ring) * self.ulysses + self.ulysses_rank

    def __repr__(self) -> str:
        return (
            f"SPGroups(ulysses={self.ulysses}, ring={self.ring}, rank={self.rank}, "
            f"ring_rank={self.ring_rank}, ulysses_rank={self.ulysses_rank}, device_type={self.device_type!r}, "
            f"timeout={self.timeout})"
        )


def _check_timeout(timeout: object) -> datetime.timedelta:
    if not isinstance(timeout, datetime.timedelta):
        raise TypeError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__} {timeout!r}")
    if timeout <= datetime.timedelta(0):
        raise ValueError(f"timeout must be positive, got {timeout}")
    return timeout


def _default_timeout() -> datetime.timedelta:
    """The timeout given to ``init_process_group``; torch keeps it only on the backend's options."""
    world = dist.group.WORLD
    for device in getattr(world, "_device_types", ()):
        timeout = getattr(getattr(world._get_backend(device), "options", None), "_timeout", None)
        if isinstance(timeout, datetime.timedelta) and timeout > datetime.timedelta(0):
            return timeout
    return dist.default_pg_timeout


def _set_timeout(group: dist.ProcessGroup, timeout: datetime.timedelta) -> None:
    """Give a mesh sub-group ``timeout`` (torch creates them with its 30-minute default)."""
    if group is dist.group.WORLD:
        return  # the user's own group keeps the timeout the user gave it
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # a torch without the setter: only the time a dead peer stalls the others changes
        log.info("SPGroups: this torch cannot set sub-group timeouts; collectives keep torch's default")
        return
    setter(timeout, group)


def check_one_degree(groups: object, caller: str, *, unit: str) -> None:
    """Raise unless ``groups`` is an :class:`SPGroups` whose ``unit`` degree ("ulysses" or "ring") is 1."""
    if not isinstance(groups, SPGroups):
        raise TypeError(f"groups must be a dbsp.dist.SPGroups, got {type(groups).__name__}")
    if getattr(groups, unit) != 1:
        raise ValueError(
            f"{caller} needs groups with {unit} == 1, got ulysses={groups.ulysses}, ring={groups.ring}; "
            "use sp_attention for hybrid layouts"
        )
