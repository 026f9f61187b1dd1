"""The sizing policy: which worker counts a run may use, and how many workers nodes can hold.

Arithmetic on the job's config and on node resources, nothing else: no Ray, no launcher.
The `cluster` section validates itself with it (cluster/config.py), the elastic scaling
policy rounds Ray Train's choice down with it (cluster/elastic.py), and the launcher waits
for room with it (cluster/launch.py). Imports flow that way only.

A size is usable when the layout fits it (world = parallel.dp_replicate x
parallel.dp_shard with parallel.ep dividing dp_shard; with the defaults, when ep divides it)
and, for a run that keeps its global batch, when the batch splits evenly over it:

- with `train.global_batch_size` set, the global batch is that many rows at every size and
  `grad_accum` follows from it (`trainer.config.grad_accum_for`);
- without it, and `cluster.elastic_batch: keep`, the batch is the full-size one
  (micro_batch_size x num_workers x grad_accum rows), kept by raising grad_accum;
- with `cluster.elastic_batch: shrink`, the batch shrinks with the replicas.
"""

from __future__ import annotations

from trainer.config import ConfigError, JobConfig, grad_accum_for


def candidate_sizes(*, num_workers: int, min_workers: int) -> list[int]:
    """Worker counts from `num_workers` down to `min_workers`, largest first; only
    `num_workers` for a fixed-size run (`min_workers` 0 or `num_workers`)."""
    if not min_workers or min_workers >= num_workers:
        return [num_workers]
    return list(range(num_workers, max(min_workers, 1) - 1, -1))


def worker_counts(
    *, num_workers: int, min_workers: int, ep: int, grad_accum: int, keep_batch: bool = True
) -> list[int]:
    """The worker counts a run without `train.global_batch_size` may use, largest first:
    multiples of `ep` from `min_workers` (0: `num_workers` only) to `num_workers`; with
    `keep_batch`, only those whose replica count divides the micro-batches of a full-size
    step (num_workers/ep x grad_accum), so the global batch stays the same."""
    sizes = candidate_sizes(num_workers=num_workers, min_workers=min_workers)
    if len(sizes) == 1:
        return sizes
    full = num_workers // ep * grad_accum  # micro-batches per replica-step at full size, x DP
    return [n for n in sizes if n % ep == 0 and (not keep_batch or full % (n // ep) == 0)]


def layout_fits(job: JobConfig, world_size: int) -> bool:
    """Whether the parallel layout can be laid out on `world_size` ranks: world =
    dp_replicate x dp_shard with ep dividing dp_shard (`ParallelConfig.degrees`); with the
    defaults, whether ep divides it."""
    return job.parallel.usable(world_size)


def usable_sizes(
    job: JobConfig, *, num_workers: int, min_workers: int, keep_batch: bool
) -> list[int]:
    """The worker counts the run may use, largest first (see the module docstring).

    `num_workers` itself is always first, usable or not: the `cluster` section checks it
    on its own and names the keys."""
    if not job.train.global_batch_size:
        sizes = worker_counts(
            num_workers=num_workers,
            min_workers=min_workers,
            ep=job.parallel.ep,
            grad_accum=job.train.grad_accum,
            keep_batch=keep_batch,
        )
        return [sizes[0]] + [n for n in sizes[1:] if layout_fits(job, n)]
    sizes = candidate_sizes(num_workers=num_workers, min_workers=min_workers)
    return [sizes[0]] + [n for n in sizes[1:] if layout_fits(job, n) and _splits(job, n)]


def _splits(job: JobConfig, world_size: int) -> bool:
    try:
        grad_accum_for(job, world_size)
    except ConfigError:
        return False
    return True


def worker_capacity(
    node_resources: list[dict[str, float]], per_worker: dict[str, float], strategy: str
) -> int:
    """How many workers of `per_worker` the nodes (their total resources) can hold at once
    under a placement strategy. STRICT_PACK needs one node for all; STRICT_SPREAD one worker
    per node; PACK and SPREAD may use every node fully."""
    fits = [
        min(int(res.get(k, 0.0) // v) for k, v in per_worker.items() if v > 0)
        for res in node_resources
    ]
    if not fits:
        return 0
    if strategy == "STRICT_PACK":
        return max(fits)
    if strategy == "STRICT_SPREAD":
        return sum(1 for f in fits if f > 0)
    return sum(fits)
