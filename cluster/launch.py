"""`python -m cluster.launch CONFIG [key=value ...] [--dry-run [--json]]`: the Ray job entrypoint.

    ray job submit --working-dir . -- python -m cluster.launch infra/runs/tiny.yaml

The driver (this process, the job's entrypoint) connects to the running Ray cluster, checks
that it has room for `cluster.num_workers` workers, and hands a Ray Train V2 `TorchTrainer`
the same training function `trainer.train` runs (`trainer.loop.run`). Ray Train owns the
worker group, the process group (gloo on CPU, NCCL on GPU), restarts (`FailureConfig`) and
the run name; moeyard owns the mesh, the expert placement plan (cluster/placement.py) and
the checkpoint format (trainer/checkpoint.py).

A restarted worker group, or a resubmitted job with the same `run.output_dir`, continues from
the newest complete checkpoint there: `trainer.loop.run` resumes by itself. The Ray Train run
is named after `run.output_dir` and stored in it, so the checkpoints the loop writes there are
registered with Ray in place (`NO_UPLOAD`), never copied.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from cluster.config import LaunchConfig, load_launch_config
from cluster.elastic import counts_for
from cluster.elastic import describe as elastic_describe
from cluster.placement import PlacementPlan, WorkerInfo
from cluster.sizing import worker_capacity
from ops.sinks import MetricSink
from trainer.config import ConfigError

# Seconds between looks at the cluster while waiting for room for the workers.
_POLL_S = 1.0


class LaunchError(RuntimeError):
    """The job cannot start on this cluster; the message names the setting and the numbers.

    Only a message, so it pickles across Ray actor boundaries."""


def resolve_address(address: str) -> str:
    """`host:port` of the Ray cluster's GCS for `cluster.ray_address`.

    Raises:
        LaunchError: no address was given and no running cluster can be found.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        resolved = canonicalize_bootstrap_address(address or "auto")
    except (ConnectionError, ValueError) as e:
        raise LaunchError(f"cluster.ray_address ({address!r}): {e}") from None
    if resolved is None:
        raise LaunchError(
            f"cluster.ray_address ({address!r}) names no running Ray cluster: start one with "
            "`ray start --head`, submit with `ray job submit`, or set cluster.ray_address"
        )
    return resolved


def check_reachable(address: str, *, timeout_s: float) -> None:
    """Fails fast when nothing listens at the GCS address (`ray.init` would wait minutes).

    Raises:
        LaunchError: the address does not parse or does not accept a connection.
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(f"cluster.ray_address ({address!r}) is not host:port")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                from cluster.presets import ray_address_hint

                raise LaunchError(
                    f"cannot reach the Ray cluster at {address} (cluster.ray_address) within "
                    f"cluster.connect_timeout_s ({timeout_s:g} s): {e}; {ray_address_hint(address)}"
                ) from None
            time.sleep(0.2)


def worker_resources(cfg: LaunchConfig) -> dict[str, float]:
    res = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        res["GPU"] = 1.0
    return res


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return os.path.abspath(url[len("file://") :] if url.startswith("file://") else url)


@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train keeps the run: `storage_path/name`, by default run.output_dir itself."""

    storage_path: str
    name: str
    registers_checkpoints: bool  # the checkpoints in run.output_dir are inside the Ray run

    @classmethod
    def for_config(cls, cfg: LaunchConfig) -> RayStorage:
        out = cfg.run.output_dir.rstrip("/")
        parent, _, last = out.rpartition("/")
        if not last or not parent:
            raise LaunchError(
                f"run.output_dir ({cfg.run.output_dir!r}) needs a parent folder: Ray Train names "
                "the run after its last component and stores it in the parent"
            )
        storage = cfg.cluster.storage_path.rstrip("/") or parent
        name = cfg.cluster.run_name or last
        return cls(storage, name, f"{storage}/{name}" == out)


# Ray Train V2's record of a run's registered checkpoints, in the run folder.
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def _dir_names(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "checkpoint_dir_name" and isinstance(v, str)]
        return found + [n for v in node.values() for n in _dir_names(v)]
    if isinstance(node, list):
        return [n for v in node for n in _dir_names(v)]
    return []


def reset_stale_ray_record(run_url: str) -> list[str]:
    """Removes Ray Train's record of the run in `run_url` when it names checkpoints that no
    longer exist, and returns their names (empty when the record is sound or absent).

    The loop's retention (checkpoint.keep_last, keep_every) deletes old checkpoints that Ray
    registered; a new job of the same run would then fail to start, because Ray checks that
    every checkpoint it recorded still exists. The checkpoints in run.output_dir are the
    truth the loop resumes from, so Ray's record starts afresh.
    """
    import json

    import fsspec

    fs, root = fsspec.core.url_to_fs(run_url.rstrip("/"))
    snapshot = f"{root}/{RAY_SNAPSHOT}"
    if not fs.exists(snapshot):
        return []
    try:
        names = sorted(set(_dir_names(json.loads(fs.cat(snapshot)))))
    except ValueError:
        names = []  # unreadable: Ray could not load it either
        missing = ["(unreadable record)"]
    else:
        missing = [n for n in names if not fs.exists(f"{root}/{n}")]
    if missing:
        fs.rm(snapshot)
    return missing


def _pyarrow_filesystem(url: str) -> Any:
    """The pyarrow filesystem Ray Train should use for an `s3://` storage path: s3fs through
    pyarrow's fsspec handler, so Ray and moeyard reach S3 the same way: the credentials of the
    node's environment (or its instance profile), the endpoint and region from the job's
    runtime environment when `moeyard submit` passed them on."""
    if not url.startswith("s3://"):
        return None
    import pyarrow.fs
    import s3fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem()))


class FailurePolicy:
    """How many worker-group restarts a run gets, and how it says so.

    A worker that dies or raises makes Ray Train stop the group and start a new one (up to
    `cluster.max_failures` times); the new group's `trainer.loop.run` resumes from the newest
    complete checkpoint in run.output_dir (from step 0 when there is none). A worker group
    that cannot start (no room on the cluster) is retried as often, each try waiting up to
    `cluster.start_timeout_s`.
    """

    def __init__(self, cfg: LaunchConfig) -> None:
        self.max_failures = cfg.cluster.max_failures

    def failure_config(self) -> Any:
        # Train V2's classes by their own module: `ray.train` re-exports them only when V2 is
        # on (the default, which moeyard needs), so a type checker would see V1's there.
        from ray.train.v2.api.config import FailureConfig

        return FailureConfig(
            max_failures=self.max_failures,
            controller_failure_limit=self.max_failures,
        )

    def describe(self) -> str:
        if self.max_failures == 0:
            return "no restarts (cluster.max_failures=0)"
        n = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        return f"up to {n} restarts (cluster.max_failures), each from the newest checkpoint"


def _restart_counter() -> Any:
    """A tiny actor that counts how often rank 0 started the training function in this job,
    so every metrics record can carry `restarts` (Ray Train does not tell workers)."""
    import ray

    @ray.remote(num_cpus=0)
    class RestartCounter:
        def __init__(self) -> None:
            self.starts = 0

        def start(self) -> int:
            self.starts += 1
            return self.starts - 1

    # Pinned to the driver's node: a counter on a worker node would die with that node, and
    # the restarted group could not count its start.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # ray.remote's annotations give back the class itself, not the actor class it makes.
    return RestartCounter.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]


class TaggedSink:
    """Adds fixed fields (the restart count) to every record before passing it on."""

    def __init__(self, inner: Any, tags: dict[str, Any]) -> None:
        self.inner = inner
        self.tags = tags

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.inner.log({**metrics, **self.tags}, step)

    def close(self) -> None:
        self.inner.close()


def this_worker(ctx: Any, *, use_gpu: bool) -> WorkerInfo:
    """This worker's place, from its Ray Train context and Ray's runtime context."""
    import ray

    rt = ray.get_runtime_context()
    gpu_ids = tuple(str(g) for g in rt.get_accelerator_ids().get("GPU", []))
    return WorkerInfo(
        world_rank=ctx.get_world_rank(),
        local_rank=ctx.get_local_rank(),
        node_rank=ctx.get_node_rank(),
        node_id=rt.get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        device=f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu",
        gpu_ids=gpu_ids,
    )


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the placement plan, then `trainer.loop.run`."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    from cluster.elastic import at_size
    from trainer.loop import device_identity, make_sinks, run

    full: LaunchConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank, local_rank = ctx.get_world_rank(), ctx.get_local_rank()
    world = ctx.get_world_size()
    cfg = at_size(full, world)  # fewer replicas: more micro-steps, the same global batch
    restarts = ray.get(config["counter"].start.remote()) if rank == 0 else 0
    if rank == 0 and restarts:
        print(
            f"restart {restarts}: the worker group was restarted (a worker failed, or the "
            f"group was resized) with {world} workers; it resumes from the newest complete "
            f"checkpoint in {cfg.run.output_dir} (step 0 if there is none)",
            flush=True,
        )
    if rank == 0 and world != full.cluster.num_workers:
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum
        how = (
            f"train.global_batch_size keeps the global batch at {rows * world} rows "
            f"(train.grad_accum {cfg.train.grad_accum})"
            if full.train.global_batch_size
            else f"train.grad_accum {full.train.grad_accum} -> {cfg.train.grad_accum} keeps "
            f"the global batch at {rows * world} rows"
            if full.cluster.elastic_batch == "keep"
            else f"the global batch shrinks to {rows * world} of "
            f"{rows * full.cluster.num_workers} rows (cluster.elastic_batch=shrink)"
        )
        print(
            f"elastic: {world} of {full.cluster.num_workers} workers "
            f"({world // cfg.parallel.ep} data-parallel replicas of parallel.ep="
            f"{cfg.parallel.ep}); {how}",
            flush=True,
        )
    use_gpu = cfg.cluster.use_gpu
    if use_gpu:
        torch.cuda.set_device(local_rank)  # all_gather_object on NCCL uses the current device
    me = this_worker(ctx, use_gpu=use_gpu)
    workers = [me]
    if ctx.get_world_size() > 1:
        workers = [None] * ctx.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(workers, me)
    plan = PlacementPlan.build(workers, ep=cfg.parallel.ep, num_experts=cfg.model.moe.num_experts)
    if rank == 0:
        print(plan.table(), flush=True)
        for w in plan.warnings:
            print(f"warning: placement: {w}", flush=True)

    gpu_uuid = device_identity(torch.device("cuda", local_rank))[0] if use_gpu else None
    sinks: list[MetricSink] = [
        TaggedSink(s, {"restarts": restarts, "workers": world})
        for s in make_sinks(cfg, rank, local_rank=local_rank, gpu_uuid=gpu_uuid)
    ]
    storage = ctx.get_storage()
    out = cfg.run.output_dir.rstrip("/")

    def on_checkpoint(url: str, step: int, metrics: dict[str, Any]) -> None:
        # Every rank reports (ray.train.report is a barrier); rank 0 names the checkpoint,
        # which already lies inside the Ray run's folder, so Ray only records it.
        ckpt = None
        if rank == 0 and config["registers_checkpoints"] and url.startswith(out + "/"):
            path = storage.experiment_fs_path.rstrip("/") + url[len(out) :]
            ckpt = ray.train.Checkpoint(path=path, filesystem=storage.storage_filesystem)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        ray.train.report(
            {**scalars, "step": step, "restarts": restarts},
            checkpoint=ckpt,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )

    summary = run(
        cfg,
        local_rank=local_rank,
        sinks=sinks,
        on_checkpoint=on_checkpoint,
        placement=plan.to_dict(),
    )
    ray.train.report(
        {
            "step": summary.steps,
            "final_loss": summary.final_loss,
            "tokens": summary.tokens,
            "tokens_per_s": summary.tokens_per_s,
            "wall_s": summary.wall_s,
            "restarts": restarts,
            "done": True,
        }
    )


def make_trainer(elastic_cfg: LaunchConfig | None, *args: Any, **kwargs: Any) -> Any:
    """A Ray Train `TorchTrainer`; for an elastic run (`elastic_cfg`), one whose scaling
    policy starts only worker counts the run can use (cluster/elastic.py)."""
    # What `ray.train.torch.TorchTrainer` is with Train V2 on, by its own module (see
    # FailurePolicy.failure_config).
    from ray.train.v2.torch.torch_trainer import TorchTrainer

    if elastic_cfg is None:
        return TorchTrainer(*args, **kwargs)

    from cluster.elastic import scaling_policy

    cfg = elastic_cfg

    class ElasticTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kw: Any) -> Any:
            # Ray Train builds its own elastic policy from the ScalingConfig; this one
            # differs only in rounding the worker count down to a usable size.
            kw["scaling_policy"] = scaling_policy(cfg, self.scaling_config)
            return super()._initialize_and_run_controller(**kw)

    return ElasticTrainer(*args, **kwargs)


class JobController:
    """The driver side of a job: connect, check room, build the trainer, run, summarize."""

    def __init__(self, cfg: LaunchConfig) -> None:
        if _is_local(cfg.run.output_dir):
            # Workers (and a job's working directory) have their own cwd: pin the path.
            cfg.run.output_dir = _local_path(cfg.run.output_dir)
        if cfg.ops.prometheus == "off":
            cfg.ops.prometheus = "ray"  # Ray's metrics agent exports; nothing to configure
        self.cfg = cfg
        self.policy = FailurePolicy(cfg)
        self.sizes = counts_for(cfg)
        self.storage = RayStorage.for_config(cfg)

    def connect(self) -> str:
        """Joins the Ray cluster; returns its GCS address.

        Raises:
            LaunchError: the address is unknown or unreachable.
        """
        import ray

        c = self.cfg.cluster
        address = resolve_address(c.ray_address)
        check_reachable(address, timeout_s=c.connect_timeout_s)
        if ray.is_initialized() and ray.get_runtime_context().gcs_address != address:
            ray.shutdown()  # joined to another cluster earlier in this process
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=True)
        return address

    def wait_for_room(self) -> None:
        """Waits until the cluster's nodes can hold every worker, up to start_timeout_s.

        Raises:
            LaunchError: the cluster is still too small when the time is up.
        """
        import ray

        c = self.cfg.cluster
        per_worker = worker_resources(self.cfg)
        deadline = time.monotonic() + c.start_timeout_s
        said = False
        while True:
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            room = worker_capacity(nodes, per_worker, c.placement_strategy)
            if room >= self.sizes[-1]:  # the smallest usable size; Ray Train takes the largest
                return
            have = ", ".join(
                f"node {i}: " + " ".join(f"{k}={res.get(k, 0):g}" for k in per_worker)
                for i, res in enumerate(nodes)
            )
            need = (
                f"cluster.num_workers ({c.num_workers})"
                if len(self.sizes) == 1
                else f"at least {self.sizes[-1]} (cluster.min_workers={c.min_workers})"
            )
            msg = (
                f"{need} workers of {per_worker} "
                f"({c.placement_strategy}) do not fit: the cluster has room for {room} "
                f"({have or 'no nodes'})"
            )
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"{msg}; gave up after cluster.start_timeout_s ({c.start_timeout_s:g} s)"
                )
            if not said:
                print(
                    f"waiting for resources: {msg}; waiting up to cluster.start_timeout_s "
                    f"({c.start_timeout_s:g} s)",
                    flush=True,
                )
                said = True
            time.sleep(_POLL_S)

    def trainer(self) -> Any:
        from ray.train.torch import TorchConfig
        from ray.train.v2.api.config import RunConfig, ScalingConfig  # see failure_config

        cfg, c = self.cfg, self.cfg.cluster
        # Ray Train's own wait for the worker group's placement group; it reads this from the
        # driver's environment and passes it on to its controller.
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(c.start_timeout_s)
        # Ray Train's print patch sends each worker print to its logger as well, which shows
        # every line twice in a job's log.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        storage_path = self.storage.storage_path
        storage_fs = _pyarrow_filesystem(storage_path)
        if _is_local(storage_path):
            storage_path = _local_path(storage_path)
        elif storage_fs is not None:
            # With its own filesystem Ray Train takes the path without the scheme.
            storage_path = storage_path.split("://", 1)[1]
        elastic = len(self.sizes) > 1
        return make_trainer(
            cfg if elastic else None,
            train_fn_per_worker,
            train_loop_config={
                "cfg": cfg,
                "counter": _restart_counter(),
                "registers_checkpoints": self.storage.registers_checkpoints,
            },
            torch_config=TorchConfig(backend=cfg.backend, timeout_s=int(cfg.parallel.timeout_s)),
            scaling_config=ScalingConfig(
                num_workers=(self.sizes[-1], c.num_workers) if elastic else c.num_workers,
                elastic_resize_monitor_interval_s=c.resize_check_s,
                use_gpu=c.use_gpu,
                resources_per_worker=worker_resources(cfg),
                placement_strategy=c.placement_strategy,
            ),
            run_config=RunConfig(
                name=self.storage.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=self.policy.failure_config(),
            ),
        )

    def run(self) -> dict[str, Any]:
        """Runs the job to the end and returns rank 0's last report.

        Raises:
            LaunchError: the cluster cannot be reached or has no room.
            ray.train.TrainingFailedError: training failed more often than max_failures.
        """
        cfg, c = self.cfg, self.cfg.cluster
        address = self.connect()
        print(
            f"moeyard: {c.num_workers} workers ({'GPU' if c.use_gpu else 'CPU'}, "
            f"{cfg.backend}, {c.placement_strategy}) on the Ray cluster at {address}; "
            f"run {self.storage.name!r}, outputs in {cfg.run.output_dir}; "
            f"{self.policy.describe()}; {elastic_describe(cfg)}",
            flush=True,
        )
        if not self.storage.registers_checkpoints:
            print(
                "note: cluster.storage_path/run_name is not run.output_dir; checkpoints are "
                "written there but not registered with Ray Train",
                flush=True,
            )
        self.wait_for_room()
        stale = reset_stale_ray_record(f"{self.storage.storage_path}/{self.storage.name}")
        if stale:
            print(
                f"note: Ray Train's record of run {self.storage.name!r} named checkpoints that "
                f"retention has deleted since ({', '.join(stale[:3])}"
                f"{', ...' if len(stale) > 3 else ''}); it starts afresh, and training resumes "
                f"from the newest checkpoint in {cfg.run.output_dir}",
                flush=True,
            )
        result = self.trainer().fit()
        if result.error is not None:
            raise result.error
        return run_summary(cfg.run.output_dir)


def run_summary(output_dir: str) -> dict[str, Any]:
    """summary.json of a finished run plus `restarts` from its last metrics record."""
    import json

    import fsspec

    from ops.sinks import read_metrics

    out = output_dir.rstrip("/")
    with fsspec.open(f"{out}/summary.json", "r") as f:
        summary = json.load(f)
    records = read_metrics(f"{out}/metrics.jsonl")
    summary["restarts"] = records[-1].get("restarts", 0) if records else 0
    return summary


def print_summary(summary: dict[str, Any], cfg: LaunchConfig) -> None:
    out = cfg.run.output_dir.rstrip("/")
    print(
        f"done: {summary.get('steps')} steps, final loss {summary.get('final_loss', float('nan')):.4f}, "
        f"{summary.get('tokens_per_s', 0.0):.0f} tokens/s, {summary.get('restarts', 0)} restart(s)\n"
        f"  metrics:     {out}/metrics.jsonl\n"
        f"  checkpoints: {out}/checkpoints/\n"
        f"  placement:   {out}/placement.json\n"
        f"  summary:     {out}/summary.json",
        flush=True,
    )


USAGE = "usage: python -m cluster.launch CONFIG.yaml [key=value ...] [--dry-run [--json]]"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    flags = {a for a in args if a in ("--dry-run", "--json")}
    args = [a for a in args if a not in flags]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    if "--json" in flags and "--dry-run" not in flags:
        print("--json goes with --dry-run", file=sys.stderr)
        return 2
    try:
        from cluster.presets import resolve_preset

        cfg = load_launch_config(resolve_preset(args[0]), args[1:])
        if "--dry-run" in flags:
            from trainer import dryrun

            if "--json" not in flags and len(counts_for(cfg)) > 1:
                # Memory per rank does not change with the size: the experts per rank (EP) and
                # the micro-batch stay; a smaller size runs more micro-steps.
                print(
                    f"{elastic_describe(cfg)}; the per-rank memory below holds at each size",
                    flush=True,
                )
            return dryrun.main(cfg, json_out="--json" in flags, world_size=cfg.cluster.num_workers)
        summary = JobController(cfg).run()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        print(f"training failed: {e}", file=sys.stderr)
        return 1
    print_summary(summary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
