"""The device mesh: world = dp x ep, with named axes and a process group per axis.

Ranks are laid out row-major over (dp, ep): an expert-parallel group is `ep` consecutive
ranks (inside one node when the launcher orders ranks node-major), and the `dp` axis joins the
ranks that hold the same experts. Every rank reads its own slice of the global batch, so the
dense parameters are data-parallel over the whole world.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trainer.config import ConfigError


@dataclass
class Mesh:
    world_size: int
    rank: int
    ep: int
    timeout_s: float | None = None  # collectives on the axis groups fail after this long
    _groups: dict[str, dist.ProcessGroup | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ep < 1 or self.world_size % self.ep:
            raise ConfigError(
                f"world size ({self.world_size}) must be divisible by parallel.ep ({self.ep})"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    def ranks(self, axis: str) -> list[int]:
        """World ranks in this rank's group along `axis` ('ep', 'dp' or 'world')."""
        if axis == "ep":
            return [self.dp_rank * self.ep + i for i in range(self.ep)]
        if axis == "dp":
            return [d * self.ep + self.ep_rank for d in range(self.dp)]
        if axis == "world":
            return list(range(self.world_size))
        raise KeyError(f"unknown mesh axis {axis!r}; expected 'ep', 'dp' or 'world'")

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group of `axis`, or None when this run is not distributed."""
        if axis not in ("ep", "dp", "world"):
            raise KeyError(f"unknown mesh axis {axis!r}; expected 'ep', 'dp' or 'world'")
        return self._groups.get(axis)

    def size(self, axis: str) -> int:
        return len(self.ranks(axis))

    @property
    def timeout(self) -> datetime.timedelta | None:
        return None if self.timeout_s is None else datetime.timedelta(seconds=self.timeout_s)

    def build_groups(self) -> None:
        """Creates the axis groups. Every rank calls new_group for every group, in order."""
        if not dist.is_initialized():
            return
        self._groups["world"] = dist.group.WORLD
        for d in range(self.dp):
            ranks = [d * self.ep + i for i in range(self.ep)]
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self._groups["ep"] = g
        for e in range(self.ep):
            ranks = [d * self.ep + e for d in range(self.dp)]
            g = dist.new_group(ranks, timeout=self.timeout)
            if self.rank in ranks:
                self._groups["dp"] = g


def init_distributed(*, backend: str, device: torch.device, timeout_s: float) -> tuple[int, int]:
    """Joins the process group torchrun or Ray Train set up in the environment, if any.

    Returns (rank, world size); (0, 1) without a launcher.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return 0, 1
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(*, world_size: int, rank: int, ep: int, timeout_s: float | None = None) -> Mesh:
    """Validates the layout and creates the groups (when distributed), each with the
    collective timeout `timeout_s` (parallel.timeout_s) rather than the backend default."""
    mesh = Mesh(world_size=world_size, rank=rank, ep=ep, timeout_s=timeout_s)
    mesh.build_groups()
    return mesh
