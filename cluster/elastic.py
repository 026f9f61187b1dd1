"""Elastic continuation: a run that loses workers and gets no replacement goes on with fewer
data-parallel replicas, from its newest checkpoint, with the same expert-parallel degree and
the same global batch.

    cluster.num_workers: 8      # the size the run wants (max_workers)
    cluster.min_workers: 4      # the smallest size it may go on with; 0 = fixed size
    cluster.elastic_batch: keep # or shrink: any multiple of parallel.ep, fewer rows a step

The worker counts a run may use are the multiples of parallel.ep between min_workers and
num_workers at which the global batch (micro_batch_size x num_workers/ep x ep x grad_accum
rows) can be kept by raising grad_accum (cluster/sizing.py; with train.global_batch_size set,
that batch, at every size). At DP = n/ep replicas the loop runs
grad_accum x (num_workers/n) micro-steps per step, so every optimizer step trains on the same
global samples in the same order as the full-size run, and the loss curve goes on unchanged
(to float summation order; the load-balancing aux loss is computed per micro-step over the
ranks present, so its value, and only its, depends on the size). `elastic_batch: shrink`
uses every multiple of parallel.ep instead (a 64-GPU run at ep=8 that loses a node goes on at
56, not 32) and trains on fewer rows a step: the loss curve changes, nothing is lost or
repeated (the data cursor counts global samples).

Ray Train's elastic scaling policy picks the largest worker count the cluster can hold; the
policy here rounds that down to a usable count, so a size EP cannot divide (or one that
cannot keep the global batch) is never started. A restarted group resumes from the newest
complete checkpoint, resharded to the new size by the checkpoint format (experts are stored
by global id, the data cursor by global sample). A group that could grow again (a node came
back) is resized at most every `cluster.resize_check_s` seconds; the restart resumes from the
newest checkpoint, so steps after it are trained again (not counted as repeated samples: the
sample ledger is restored with the checkpoint). With room for fewer than min_workers the run
waits for nodes, saying so in the job's log once a minute.

Who owns what: cluster/sizing.py decides which sizes are usable (arithmetic only), this
module applies that decision to a running job (the per-size config, Ray Train's scaling
policy), cluster/launch.py starts the job. Imports flow launch -> elastic -> config -> sizing.
"""

from __future__ import annotations

import copy
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from cluster.sizing import worker_capacity
from trainer.config import grad_accum_for

if TYPE_CHECKING:
    from cluster.config import LaunchConfig


# Seconds between "waiting for nodes" lines while an elastic run has too little room to start.
WAIT_NOTICE_S = 60.0


def counts_for(cfg: LaunchConfig) -> list[int]:
    """The worker counts a run may use, largest first (cluster/sizing.py)."""
    return cfg.usable_sizes()


def grad_accum_at(cfg: LaunchConfig, world_size: int) -> int:
    """grad_accum that keeps the run's global batch at `world_size` workers: the one
    `train.global_batch_size` implies, else the full-size batch's (elastic_batch=keep), else
    train.grad_accum as it is (elastic_batch=shrink).

    Raises:
        ValueError: `world_size` is not one of the run's worker counts.
    """
    c = cfg.cluster
    counts = counts_for(cfg)
    if world_size not in counts:
        raise ValueError(
            f"{world_size} workers is not a usable size for this run (cluster.num_workers="
            f"{c.num_workers}, cluster.min_workers={c.min_workers}, parallel.ep="
            f"{cfg.parallel.ep}): usable sizes are {counts}"
        )
    if cfg.train.global_batch_size:
        return grad_accum_for(cfg, world_size)
    if c.elastic_batch == "shrink":
        return cfg.train.grad_accum
    full_dp = c.num_workers // cfg.parallel.ep
    return cfg.train.grad_accum * full_dp // (world_size // cfg.parallel.ep)


def at_size(cfg: LaunchConfig, world_size: int) -> LaunchConfig:
    """A copy of `cfg` for a worker group of `world_size`: grad_accum raised to keep the
    global batch (at every size, the full one included, when train.global_batch_size sets
    it). The copy is what the loop trains with and what checkpoints record; `cfg` itself
    when nothing changes."""
    accum = grad_accum_at(cfg, world_size)
    if accum == cfg.train.grad_accum:
        return cfg
    scaled = copy.deepcopy(cfg)
    scaled.train.grad_accum = accum
    return scaled


def describe(cfg: LaunchConfig) -> str:
    """One line for the job log: the sizes the run may use."""
    c = cfg.cluster
    counts = counts_for(cfg)
    if len(counts) == 1:
        return f"fixed size: {c.num_workers} workers"
    keeps = (
        "that keep the global batch"
        if c.elastic_batch == "keep"
        else "; the global batch shrinks with the replicas"
    )
    return (
        f"elastic: {c.num_workers} workers, down to {counts[-1]} (usable sizes {counts}: "
        f"multiples of parallel.ep={cfg.parallel.ep} {keeps})"
    )


def raylet_answers(node: dict[str, Any], timeout_s: float = 1.0) -> bool:
    """Whether a node's raylet accepts a connection now (an entry of `ray.nodes()`)."""
    addr, port = node.get("NodeManagerAddress"), node.get("NodeManagerPort")
    if not addr or not port:
        return True  # nothing to probe: trust the node table
    try:
        socket.create_connection((addr, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def scaling_policy(cfg: LaunchConfig, scaling_config: Any) -> Any:
    """Ray Train's elastic scaling policy, restricted to the run's usable worker counts."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

    counts = counts_for(cfg)
    per_worker = dict(scaling_config._resources_per_worker_not_none)
    strategy = cfg.cluster.placement_strategy
    min_workers = cfg.cluster.min_workers

    class UsableSizesPolicy(ElasticScalingPolicy):
        """Rounds the number of workers the cluster can hold down to a usable count.

        The room comes from Ray's resource reservations, which follow the cluster's node
        table; right after a node dies (its workers fail at once) the table still says it is
        alive for the length of Ray's health checks, and a group sized for it would wait
        cluster.start_timeout_s for a placement that cannot come. So the room is also capped
        by what the nodes whose raylet answers right now can hold."""

        _below_since: float | None = None
        _said_at = 0.0

        def _count_possible_workers(self, reserved_resources: Any) -> int:
            room = min(super()._count_possible_workers(reserved_resources), live_room())
            return max((n for n in counts if n <= room), default=0)

        def make_decision_for_non_running_worker_group(self) -> Any:
            from ray.train.v2._internal.execution.scaling_policy import NoopDecision

            decision = super().make_decision_for_non_running_worker_group()
            if not isinstance(decision, NoopDecision):
                self._below_since = None
                return decision
            # Too little room for the smallest usable size: the run waits for nodes. Say so
            # in the job's log, once a minute, so that the wait is never silent.
            now = time.monotonic()
            if self._below_since is None:
                self._below_since = now
            if now - self._said_at >= WAIT_NOTICE_S:
                self._said_at = now
                print(
                    f"elastic: waiting for nodes: the cluster has room for {live_room()} "
                    f"workers, fewer than the smallest usable size {counts[-1]} "
                    f"(cluster.min_workers={min_workers}); waited {now - self._below_since:.0f} "
                    "s so far",
                    flush=True,
                )
            return decision

    def live_room() -> int:
        import ray

        alive = [n for n in ray.nodes() if n.get("Alive")]
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(alive)))) as pool:
            answers = list(pool.map(raylet_answers, alive))
        live = [n["Resources"] for n, ok in zip(alive, answers, strict=True) if ok]
        return worker_capacity(live, per_worker, strategy)

    return UsableSizesPolicy(scaling_config)
