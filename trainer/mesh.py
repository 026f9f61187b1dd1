"""The device mesh: world = dp_replicate x dp_shard, and ep borrows its ranks from dp_shard.

`torch.distributed.device_mesh.DeviceMesh`es over the same ranks, row-major:

    dense:    (dp_replicate, dp_shard)
    experts:  (dp_replicate, efsdp, ep)      efsdp = dp_shard / ep

so a dp_shard group is an (efsdp x ep) block; `expert_dp` = (dp_replicate, efsdp) flattened
joins the ranks that hold the same experts.
Dense parameters are FSDP-sharded over `dp_shard` (and replicated over `dp_replicate`: HSDP);
experts are split over `ep` and each rank's experts FSDP-sharded over `efsdp` (and
replicated over `dp_replicate`), as torchtitan's FSDP2 + EP and Megatron's "MoE parallel
folding" lay them out. An expert-parallel group is `ep` consecutive ranks, inside one node
when the launcher orders ranks node-major, so the all-to-all rides the fast links. Every rank
reads its own slice of the global batch: data parallelism spans the whole world.

`Mesh` validates the degrees against the world size, names its axes, and hands out process
groups and sub-meshes by name; at world size 1 it holds no DeviceMesh.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError, ParallelConfig

# Axis names `group` and `sub_mesh` take.
AXES = ("world", "dp_replicate", "dp_shard", "efsdp", "ep", "dp", "expert_dp")


@dataclass
class Mesh:
    world_size: int
    rank: int
    ep: int
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: world_size / dp_replicate
    timeout_s: float | None = None  # collectives on the axis groups fail after this long
    # DeviceMeshes by name (see `build`); empty when not distributed.
    meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dp_replicate, self.dp_shard = ParallelConfig(
            dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, ep=self.ep
        ).degrees(self.world_size)

    @property
    def efsdp(self) -> int:
        """The ranks that shard one expert-parallel rank's experts (dp_shard / ep)."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """Ranks holding the same experts (dp_replicate x efsdp = world / ep)."""
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def fsdp(self) -> bool:
        """Whether parameters are sharded or replicated by FSDP: whenever there is a process
        group (any multi-rank run, and a one-rank run that set one up on purpose, as the GPU
        check does to measure the FSDP path on one device)."""
        return bool(self.meshes)

    def ranks(self, axis: str) -> list[int]:
        """World ranks in this rank's group along `axis`."""
        r, f, e = self._coords()
        F, E = self.efsdp, self.ep

        def at(rr: int, ff: int, ee: int) -> int:
            return (rr * F + ff) * E + ee

        if axis == "world":
            return list(range(self.world_size))
        if axis == "ep":
            return [at(r, f, i) for i in range(E)]
        if axis == "efsdp":
            return [at(r, i, e) for i in range(F)]
        if axis == "dp_replicate":
            return [at(i, f, e) for i in range(self.dp_replicate)]
        if axis == "dp_shard":
            return [at(r, i, j) for i in range(F) for j in range(E)]
        if axis in ("dp", "expert_dp"):
            return [at(i, j, e) for i in range(self.dp_replicate) for j in range(F)]
        raise KeyError(f"unknown mesh axis {axis!r}; expected one of {AXES}")

    def _coords(self) -> tuple[int, int, int]:
        E, F = self.ep, self.efsdp
        return self.rank // (F * E), (self.rank // E) % F, self.rank % E

    def size(self, axis: str) -> int:
        return len(self.ranks(axis))

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of `axis`, or None when this run is not distributed."""
        if axis not in AXES:
            raise KeyError(f"unknown mesh axis {axis!r}; expected one of {AXES}")
        if not self.meshes:
            return None
        if axis == "world":
            return dist.group.WORLD
        return self.sub_mesh(axis).get_group()

    def sub_mesh(self, axis: str) -> DeviceMesh:
        """The 1-D DeviceMesh of `axis`."""
        assert self.meshes, "sub_mesh needs a distributed run"
        return self.meshes["expert_dp" if axis == "dp" else axis]

    def dense_fsdp_mesh(self) -> DeviceMesh:
        """Where dense parameters are sharded: dp_shard, or (dp_replicate, dp_shard) (HSDP)."""
        return self.meshes["dense" if self.dp_replicate > 1 else "dp_shard"]

    def expert_fsdp_mesh(self) -> DeviceMesh:
        """Where one EP rank's experts are sharded: efsdp, or (dp_replicate, efsdp)."""
        return self.meshes["experts" if self.dp_replicate > 1 else "efsdp"]

    @property
    def timeout(self) -> datetime.timedelta | None:
        return None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)

    def build(self, device_type: str) -> None:
        """Creates the DeviceMeshes and their process groups (every rank calls it, in order).

        One 1-D world mesh, unflattened twice: into (dp_replicate, dp_shard) for the dense
        parameters and into (dp_replicate, efsdp, ep) for the experts, the same ranks in the
        same row-major order, so each dp_shard group is an (efsdp x ep) block.
        """
        if not dist.is_initialized():
            return
        opts = None if self.timeout is None else _backend_options(dist.get_backend(), self.timeout)

        def override(names: tuple[str, ...]) -> dict[str, Any] | None:
            return None if opts is None else dict.fromkeys(names, opts)

        R, S, F, E = self.dp_replicate, self.dp_shard, self.efsdp, self.ep
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        dense = world._unflatten(
            0, (R, S), ("dp_replicate", "dp_shard"), override(("dp_replicate", "dp_shard"))
        )
        experts = world._unflatten(
            0, (R, F, E), ("dp_replicate", "efsdp", "ep"), override(("dp_replicate", "efsdp", "ep"))
        )
        flat: dict[str, Any] = {} if opts is None else {"backend_override": opts}
        self.meshes = {
            "world": world,
            "dense": dense,
            "experts": experts["dp_replicate", "efsdp"],
            "dp_replicate": dense["dp_replicate"],
            "dp_shard": dense["dp_shard"],
            "efsdp": experts["efsdp"],
            "ep": experts["ep"],
            "expert_dp": experts["dp_replicate", "efsdp"]._flatten("expert_dp", **flat),
        }


def _backend_options(backend: str, timeout: datetime.timedelta) -> tuple[str, Any] | None:
    """(backend, options with `timeout`) for the mesh's groups, so that a collective on any
    axis fails after parallel.timeout_s rather than the backend default."""
    if backend == "gloo":
        # Private in the stubs, but the way to give a gloo group its own timeout.
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    elif backend == "nccl" and dist.is_nccl_available():
        opts = dist.ProcessGroupNCCL.Options()
    else:
        return None
    opts._timeout = timeout
    return backend, opts


def init_distributed(*, backend: str, device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Joins the process group torchrun or Ray Train set up in the environment, if any.

    On CUDA the group is bound to this rank's device (`device_id`), so NCCL creates its
    communicators eagerly and never guesses the device from the rank.

    Returns (rank, world size); (0, 1) without a launcher.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size()


def build_mesh(
    *,
    world_size: int,
    rank: int,
    ep: int,
    dp_replicate: int = 1,
    dp_shard: int = -1,
    timeout_s: float | None = None,
    device_type: str = "cpu",
) -> Mesh:
    """Validates the layout and creates the DeviceMesh (when distributed), each group with
    the collective timeout `timeout_s` (parallel.timeout_s) rather than the backend default.

    Raises:
        ConfigError: the degrees do not fit the world size (the message names the keys).
    """
    try:
        mesh = Mesh(
            world_size=world_size,
            rank=rank,
            ep=ep,
            dp_replicate=dp_replicate,
            dp_shard=dp_shard,
            timeout_s=timeout_s,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh.build(device_type)
    return mesh
