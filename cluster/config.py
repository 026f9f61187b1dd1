"""The `cluster` section of the job config, and the root config `cluster.launch` loads.

`trainer.train` drops this section (`ignore_sections=("cluster",)`), so one preset serves
both launchers: `torchrun` takes its world size from the command line, Ray from
`cluster.num_workers`.

This module validates; which worker counts a run may use is the sizing policy's
(cluster/sizing.py), applied here to reject a `cluster` section that allows none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from cluster.sizing import usable_sizes
from trainer.config import ConfigError, JobConfig, grad_accum_for, load_config


@dataclass
class ClusterConfig:
    num_workers: int = 2  # training workers (Ray actors); the world size
    # Elastic continuation (cluster/elastic.py): with 0 < min_workers < num_workers, a run
    # that loses workers and gets no replacement goes on from its newest checkpoint with
    # fewer data-parallel replicas, down to min_workers, keeping parallel.ep and the global
    # batch (grad_accum rises). 0: the run needs num_workers, always.
    min_workers: int = 0
    # keep: only sizes at which grad_accum can make up the full global batch. shrink: every
    # multiple of parallel.ep; the global batch shrinks with the replicas. A run with
    # train.global_batch_size keeps that batch at every size (shrink is an error there).
    elastic_batch: Literal["keep", "shrink"] = "keep"
    # How often a running elastic group looks for room to grow back to a larger usable size.
    # Growing restarts the group from the newest checkpoint.
    resize_check_s: float = 600.0
    use_gpu: bool = False  # one GPU per worker; NCCL. Off: CPU workers and gloo
    cpus_per_worker: float = 1.0
    # Ray placement group strategy. PACK fills a node before the next one, which keeps an
    # expert-parallel group (consecutive ranks) inside a node.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Worker-group restarts after a worker dies or raises; -1 = unlimited, 0 = none.
    max_failures: int = 0
    # "auto": RAY_ADDRESS, else the cluster `ray start` left on this machine; or host:port.
    ray_address: str = "auto"
    connect_timeout_s: float = 10.0  # how long the Ray address may stay unreachable
    # How long to wait for the cluster to have room for every worker before failing.
    start_timeout_s: float = 120.0
    # Where Ray Train keeps its run state. Empty: the parent of run.output_dir, with the run
    # named after its last component, so that checkpoints written to run.output_dir are
    # registered with Ray in place and a resubmitted job continues the same run.
    storage_path: str = ""
    run_name: str = ""  # empty: the last component of run.output_dir

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"cluster.num_workers ({self.num_workers}) must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cluster.cpus_per_worker ({self.cpus_per_worker}) must be > 0")
        if self.max_failures < -1:
            raise ConfigError(
                f"cluster.max_failures ({self.max_failures}) must be -1 (unlimited) or >= 0"
            )
        if not 0 <= self.min_workers <= self.num_workers:
            raise ConfigError(
                f"cluster.min_workers ({self.min_workers}) must be between 0 (fixed size) and "
                f"cluster.num_workers ({self.num_workers})"
            )
        for key in ("connect_timeout_s", "start_timeout_s", "resize_check_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cluster.{key} ({getattr(self, key)}) must be > 0")
        if "/" in self.run_name:
            raise ConfigError(f"cluster.run_name ({self.run_name!r}) must not contain '/'")


@dataclass
class LaunchConfig(JobConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.cluster
        self.parallel.degrees(c.num_workers, where="cluster.num_workers")
        if self.train.global_batch_size:
            if c.elastic_batch == "shrink":
                raise ConfigError(
                    f"cluster.elastic_batch=shrink lets the global batch shrink with the "
                    f"replicas, but train.global_batch_size ({self.train.global_batch_size}) "
                    "fixes it: drop one of them"
                )
            try:
                grad_accum_for(self, c.num_workers)
            except ConfigError as e:
                raise ConfigError(f"cluster.num_workers ({c.num_workers}): {e}") from None
        if 0 < c.min_workers < c.num_workers:
            if len(self.usable_sizes()) == 1:
                raise ConfigError(
                    f"cluster.min_workers ({c.min_workers}) allows no smaller size: between it "
                    f"and cluster.num_workers ({c.num_workers}) no worker count "
                    f"{self._layout_clause()}{self._keeps_clause()}"
                )
            if c.max_failures == 0:
                raise ConfigError(
                    f"cluster.min_workers ({c.min_workers}) continues a run after a failure, "
                    "which needs restarts: set cluster.max_failures to -1 (unlimited) or >= 1"
                )
            if self.parallel.world_size:
                raise ConfigError(
                    f"parallel.world_size ({self.parallel.world_size}) pins the size; an "
                    f"elastic run (cluster.min_workers={c.min_workers}) needs it at 0"
                )
        if self.parallel.world_size and self.parallel.world_size != c.num_workers:
            raise ConfigError(
                f"parallel.world_size ({self.parallel.world_size}) does not match "
                f"cluster.num_workers ({c.num_workers})"
            )
        if not c.use_gpu and self.parallel.backend == "nccl":
            raise ConfigError("parallel.backend is 'nccl' but cluster.use_gpu is false")
        if not c.use_gpu and self.train.device == "cuda":
            raise ConfigError("train.device is 'cuda' but cluster.use_gpu is false")
        if c.use_gpu and self.train.device == "cpu":
            raise ConfigError("train.device is 'cpu' but cluster.use_gpu is true")

    def usable_sizes(self) -> list[int]:
        """The worker counts this run may use, largest first (cluster/sizing.py)."""
        c = self.cluster
        return usable_sizes(
            self,
            num_workers=c.num_workers,
            min_workers=c.min_workers,
            keep_batch=c.elastic_batch == "keep",
        )

    def _layout_clause(self) -> str:
        """What the layout asks of a worker count, for an error message."""
        p = self.parallel
        if p.dp_replicate == 1 and p.dp_shard == -1:
            return f"is a multiple of parallel.ep ({p.ep})"
        return (
            f"fits parallel.dp_replicate ({p.dp_replicate}) x parallel.dp_shard "
            f"({p.dp_shard}) with parallel.ep ({p.ep}) dividing dp_shard"
        )

    def _keeps_clause(self) -> str:
        """Why a multiple of parallel.ep may still not be usable, for an error message."""
        c, t = self.cluster, self.train
        if t.global_batch_size:
            return (
                f" over which the train.global_batch_size ({t.global_batch_size}) rows split "
                f"into whole micro-batches of train.micro_batch_size ({t.micro_batch_size})"
            )
        if c.elastic_batch == "keep":
            return (
                f" whose data-parallel degree divides the "
                f"{c.num_workers // self.parallel.ep * t.grad_accum} micro-batches "
                "of a full step (num_workers/ep x train.grad_accum; cluster.elastic_batch="
                "shrink drops this condition)"
            )
        return ""

    @property
    def backend(self) -> str:
        """The collective backend the workers' process group uses."""
        if self.parallel.backend != "auto":
            return self.parallel.backend
        return "nccl" if self.cluster.use_gpu else "gloo"


def load_launch_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | tuple[str, ...] = ()
) -> LaunchConfig:
    """The preset plus overrides, with the `cluster` section validated.

    Raises:
        ConfigError: a missing file, a bad key or value; the message names it.
    """
    return load_config(path, overrides, schema=LaunchConfig)
