"""The training loop: the same function under torchrun, under Ray Train, and in one process.

It joins the process group the launcher set up (if any), builds the mesh and the model
(meta device -> parallelize -> materialize), streams this rank's slice of every global batch,
and logs one metrics dict per logged step to the sinks on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.distributed.fsdp import FSDPModule

from dataloader.reader import DataExhausted
from dataloader.source import build_source
from ops.prometheus import build_prometheus_sink
from ops.sinks import JsonlSink, MetricSink, StdoutSink
from ops.telemetry import Telemetry
from trainer import distill, evaluate, router_health
from trainer.accounting import AccountedSource
from trainer.checkpoint import Checkpointer, CheckpointHook
from trainer.config import ConfigError, JobConfig, grad_accum_for, to_yaml
from trainer.fault_hook import LossFaults
from trainer.flops import flops_per_token
from trainer.guard import LossGuard, TrainingDiverged
from trainer.mesh import Mesh, build_mesh, init_distributed
from trainer.model import Transformer, build_model, materialize, mtp_cross_entropy
from trainer.moe import MoE
from trainer.parallelize import check_compile, clip_grad_norm_, parallelize
from trainer.precision import ComputeCopies
from trainer.resilience import CollectiveWatch, Preemption
from trainer.run_state import RunState

# The validation figures of this step, until log_step puts them in its record.
VAL_RECORD_KEY = "val_record"


@dataclass
class RunSummary:
    steps: int
    tokens: int
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    wall_s: float
    output_dir: str
    world_size: int
    ep: int
    # Exactly-once sample accounting of the final model's lineage (trainer/accounting.py).
    samples_consumed: int = 0
    samples_repeated: int = 0
    samples_skipped: int = 0
    samples_guard_skipped: int = 0
    samples_substituted: int = 0
    samples_policy_skipped: int = 0
    resumes: int = 0  # checkpoint loads in the final model's lineage
    accounting: dict[str, Any] = field(default_factory=dict)
    preempted: bool = False  # stopped early by SIGTERM, after a checkpoint
    faults_injected: int = 0  # faults.* injections in this run, restarts included

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "losses"}


# The CUDA caching allocator's setting the launchers run with, as torchtitan's do: segments
# that grow in place fragment far less over a step's changing shapes (the dry run counts the
# reserve that remains, trainer/dryrun.py ALLOCATOR_SLACK).
CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator() -> str:
    """Sets PYTORCH_CUDA_ALLOC_CONF to `CUDA_ALLOC_CONF` unless the user set it; returns the
    setting in force. Where CUDA has already started (a launcher bound the device before
    the loop ran), the allocator read its settings then, so they are applied again."""
    own = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if own is not None:
        return own
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_CONF
    if torch.cuda.is_initialized():
        torch.cuda.memory._set_allocator_settings(CUDA_ALLOC_CONF)
    return CUDA_ALLOC_CONF


def pick_device(cfg: JobConfig, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is visible")
        configure_cuda_allocator()  # before the device starts: its allocator reads it then
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def lr_lambda(cfg: JobConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at train.steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def optimizer_kernel(device: torch.device) -> dict[str, bool]:
    """AdamW's implementation on `device`: the fused kernel on CUDA (one pass over each
    parameter, its gradient and both moments; it takes FSDP's DTensor parameters, and the
    clip coefficient as its gradient scale), foreach elsewhere (the CPU path, kept as it
    was: its results are what the CPU tests compare layouts by)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_optimizer(
    model: Transformer, cfg: JobConfig, *, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms). `device` picks the kernel
    (`optimizer_kernel`); default: the parameters' device."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    t = cfg.train
    if device is None:
        device = next(model.parameters()).device
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        **optimizer_kernel(device),
    )


def uses_bf16(cfg: JobConfig, device: torch.device) -> bool:
    """train.dtype: bf16, or auto on a GPU."""
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")


def fsdp_bf16(cfg: JobConfig, mesh: Mesh, device: torch.device) -> bool:
    """Whether FSDP computes in bf16 parameters (multi-rank bf16); else one process in bf16
    computes in bf16 copies of its weights (`ComputeCopies`), and fp32 is fp32."""
    return mesh.fsdp and uses_bf16(cfg, device)


# Where setup keeps the one-process bf16 compute copies (trainer/precision.py).
COMPUTE_COPIES_KEY = "compute_copies"


def keeps_gathered(mesh: Mesh) -> bool:
    """Whether FSDP keeps each unit gathered and its gradients unreduced from one
    micro-batch to the next: at dp_shard 1 (one rank, or pure replication) a unit's shard is
    the whole unit, so gathering it once per step and reducing its gradients once per step
    costs no memory and saves a cast-and-copy of every weight and a reduction of every
    gradient at each other micro-batch. Sharded (dp_shard > 1), the gathered weights and the
    unreduced gradients of the whole model would not fit, and each micro-batch gathers and
    reduces as FSDP does by default."""
    return mesh.fsdp and mesh.dp_shard == 1


def setup(cfg: JobConfig, *, local_rank: int = 0) -> RunState:
    """Joins the process group, validates the layout, builds model, optimizer and data."""
    device = pick_device(cfg, local_rank)
    # Before any work (a process group, the data).
    check_compile(cfg.train.compile, device, bf16=uses_bf16(cfg, device))
    rank, world = init_distributed(
        backend=cfg.parallel.backend, device=device, timeout_s=cfg.parallel.timeout_s
    )
    cfg.check_world(world)
    # train.global_batch_size fixes the micro-steps at this world size; resolved once into
    # the config, so that everything downstream (tokens per step, the sample accounting,
    # the checkpointed config) sees the derived value.
    cfg.train.grad_accum = grad_accum_for(cfg, world)
    mesh = build_mesh(
        world_size=world,
        rank=rank,
        ep=cfg.parallel.ep,
        dp_replicate=cfg.parallel.dp_replicate,
        dp_shard=cfg.parallel.dp_shard,
        timeout_s=cfg.parallel.timeout_s,
        device_type=device.type,
    )
    source = build_source(
        cfg.data,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
    )
    # The ledger of which global samples each step trained on rides in the source's state.
    source = AccountedSource(source)
    if source.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's vocabulary "
            f"({source.vocab_size})"
        )
    model = build_model(cfg.model)
    reshard = cfg.parallel.reshard_after_forward
    if keeps_gathered(mesh) and reshard == "default":
        reshard = "never"  # see keeps_gathered: resharding a whole unit frees nothing
    parallelize(
        model,
        mesh,
        activation_checkpoint=cfg.train.activation_checkpoint,
        compile=cfg.train.compile,
        param_dtype=torch.bfloat16 if fsdp_bf16(cfg, mesh, device) else None,
        reshard_after_forward=reshard,
        ep_exchange=cfg.parallel.ep_exchange,
    )
    if keeps_gathered(mesh) and reshard == "never":
        # parallelize reshards the embedding after its forward whatever is asked (it is
        # large and used once); at dp_shard 1 that frees nothing.
        emb = model.embed
        if isinstance(emb, FSDPModule):
            emb.set_reshard_after_forward(False)
    materialize(model, device=device, seed=cfg.train.seed)
    if cfg.checkpoint.init_from:
        from trainer.init_from import init_from

        # Before the optimizer exists and before resume, which wins when output_dir holds
        # a checkpoint (init_from then reads nothing).
        init_from(
            model, cfg.checkpoint, output_dir=cfg.run.output_dir, seed=cfg.train.seed, rank=rank
        )
    optimizer = build_optimizer(model, cfg, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    guard = (
        LossGuard(spike_factor=cfg.train.spike_factor, max_bad_steps=cfg.train.max_bad_steps)
        if cfg.train.loss_guard
        else None
    )
    faults = LossFaults(
        cfg.faults, output_dir=cfg.run.output_dir, rank=rank, resume=cfg.checkpoint.resume
    )
    state = RunState(cfg, mesh, device, model, optimizer, scheduler, source, guard, faults=faults)
    if uses_bf16(cfg, device) and not mesh.fsdp:
        state.extra[COMPUTE_COPIES_KEY] = ComputeCopies(model)
    # eval.* and distill.*: the evaluation set and the teacher, in state.extra.
    evaluate.attach(state)
    distill.attach(state)
    return state


def expert_load_stats(load_LE: torch.Tensor, dropped_L: torch.Tensor) -> list[dict[str, Any]]:
    """Per MoE layer: tokens per expert, coefficient of variation, max/mean, dropped share,
    experts that got no token."""
    out = []
    for i in range(load_LE.shape[0]):
        load = load_LE[i]
        mean = load.mean().item()
        total = load.sum().item()
        out.append(
            {
                "layer": i,
                "tokens": [int(x) for x in load.tolist()],
                "cv": (load.std(unbiased=False).item() / mean) if mean > 0 else 0.0,
                "max_over_mean": (load.max().item() / mean) if mean > 0 else 0.0,
                "dropped_frac": dropped_L[i].item() / total if total > 0 else 0.0,
                "idle_experts": int((load == 0).sum().item()),
            }
        )
    return out


def write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)


def placement_plan(state: RunState) -> dict[str, Any]:
    """expert id -> EP rank -> world ranks holding it -> host and device, gathered from all
    ranks."""
    mesh = state.mesh
    me = {"rank": mesh.rank, "host": socket.gethostname(), "device": str(state.device)}
    workers = [me]
    if mesh.world_size > 1:
        workers = [None] * mesh.world_size  # type: ignore[list-item]
        dist.all_gather_object(workers, me)
    num_experts = state.cfg.model.moe.num_experts
    per_rank = num_experts // mesh.ep
    experts = []
    for e in range(num_experts):
        ep_rank = e // per_rank
        ranks = [d * mesh.ep + ep_rank for d in range(mesh.dp)]
        experts.append(
            {
                "expert": e,
                "ep_rank": ep_rank,
                "ranks": ranks,
                "hosts": [workers[r]["host"] for r in ranks],
                "devices": [workers[r]["device"] for r in ranks],
            }
        )
    return {
        "world_size": mesh.world_size,
        "ep": mesh.ep,
        "dp": mesh.dp,
        # FSDP: dense weights sharded over dp_shard, each EP rank's experts over its `ranks`.
        "dp_replicate": mesh.dp_replicate,
        "dp_shard": mesh.dp_shard,
        "workers": workers,
        "experts": experts,
    }


def _phase(state: RunState, name: str) -> contextlib.AbstractContextManager[None]:
    """Names a phase of the step that holds collectives, for the collective watchdog."""
    if state.watch is None:
        return contextlib.nullcontext()
    return state.watch.phase(name, step=state.step + 1)


def train_step(state: RunState) -> dict[str, torch.Tensor]:
    """One optimizer step over grad_accum micro-batches. Returns device tensors (no sync).

    bf16 compute: under FSDP the parameters are gathered in bf16 (MixedPrecisionPolicy) and
    the master weights stay fp32; one process computes in bf16 copies of its fp32 weights
    made once per step (`ComputeCopies`). At dp_shard 1 FSDP gathers each unit once per step
    and reduces its gradients once per step (`keeps_gathered`).
    """
    cfg, model, device = state.cfg, state.model, state.device
    accum = cfg.train.grad_accum
    copies: ComputeCopies | None = state.extra.get(COMPUTE_COPIES_KEY)
    gathered = keeps_gathered(state.mesh) and isinstance(model, FSDPModule)
    acct = state.source if isinstance(state.source, AccountedSource) else None
    cursor_before = acct.cursor() if acct is not None else 0
    lm_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    z_sum = torch.zeros((), device=device)
    # Each MTP depth's cross-entropy ([0] without MTP); lambda x their mean joins the loss.
    mtp_sum = torch.zeros(cfg.model.mtp.depth, device=device)
    mtp_weight = cfg.train.mtp_loss_weight
    kl_sum = torch.zeros((), device=device)
    distiller: distill.Distiller | None = state.extra.get(distill.DISTILLER_KEY)
    wait = 0.0
    # A loss fault the config asks for at this step (first pass only), or None.
    fault = state.faults.take(state.step + 1) if state.faults is not None else None
    if copies is not None:
        copies.begin()
    done = False
    try:
        for i in range(accum):
            t0 = time.perf_counter()
            rows = state.source.next_batch().to(device, non_blocking=True)
            wait += time.perf_counter() - t0
            inputs, targets = rows[:, :-1], rows[:, 1:]
            if gathered:
                assert isinstance(model, FSDPModule)
                last = i == accum - 1
                model.set_requires_gradient_sync(last)
                model.set_reshard_after_backward(last)
            with _phase(
                state, "forward/backward (MoE all-to-all, FSDP all-gather and reduce-scatter)"
            ):
                if distiller is not None:
                    out = model(inputs)
                    assert out.logits is not None
                    lm = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
                    mtp = mtp_cross_entropy(
                        model.head,
                        out.mtp_hidden,
                        targets,
                        chunk_tokens=cfg.train.loss_chunk_tokens,
                        kernel=cfg.train.loss_kernel,
                    )
                else:
                    out = model(
                        inputs,
                        targets,
                        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
                        loss_kernel=cfg.train.loss_kernel,
                    )
                    assert out.lm_loss is not None and out.mtp_loss is not None
                    lm, mtp = out.lm_loss, out.mtp_loss
                if fault is not None:
                    lm = lm * fault  # before backward: the gradients follow, as in a real one
                objective = lm
                if distiller is not None:
                    # (1 - alpha) CE + alpha T^2 KL(teacher || student), on the same inputs.
                    objective, kl = distiller.loss(inputs, out.logits, lm)
                    kl_sum += kl.detach()
                if mtp.numel():
                    objective = objective + mtp_weight * mtp.mean()
                loss = (objective + out.aux_loss + out.z_loss) / accum
                loss.backward()
            lm_sum += lm.detach()
            mtp_sum += mtp.detach()
            aux_sum += out.aux_loss.detach()
            z_sum += out.z_loss.detach()
        done = True
    finally:
        if copies is not None:
            copies.end(keep_grads=done)
    with _phase(state, "gradient-norm all-reduce (clip_grad_norm_)"):
        grad_norm = clip_grad_norm_(
            model, state.mesh, cfg.train.grad_clip, optimizer=state.optimizer
        )
    lr = state.optimizer.param_groups[0]["lr"]

    # One all-reduce per step carries the losses and the expert load of every MoE layer.
    moes: list[MoE] = model.moe_layers()
    parts = [torch.cat([torch.stack([lm_sum, aux_sum, z_sum]), mtp_sum]) / accum]
    parts += (
        [m.routed_E.float() for m in moes] + [torch.stack([m.dropped.float() for m in moes])]
        if moes
        else []
    )
    # Whether any rank was told to stop (SIGTERM) rides along: all ranks stop together.
    stop = state.preempt is not None and state.preempt.requested
    parts.append(torch.tensor([float(stop)], device=device))
    packed = torch.cat([p.reshape(-1) for p in parts])
    if state.mesh.world_size > 1:
        with _phase(state, "loss and expert-load all-reduce"):
            dist.all_reduce(packed, group=state.mesh.group("world"))
    losses = packed[:3] / state.mesh.world_size
    n = 3 + len(mtp_sum)  # the losses' share of `packed`
    mtp_losses = packed[3:n] / state.mesh.world_size

    skip = None
    if state.guard is not None:
        # Device-to-host sync: the guard decides on the global loss and norm, which every
        # rank holds identically, so all ranks skip or step together.
        objective_value = losses.sum() + (mtp_weight * mtp_losses.mean() if len(mtp_losses) else 0)
        skip = state.guard.is_bad(float(objective_value), float(grad_norm))
    if skip is None:
        state.optimizer.step()
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    metrics: dict[str, torch.Tensor] = {
        "lm_loss": losses[0],
        "aux_loss": losses[1],
        "z_loss": losses[2],
        "grad_norm": grad_norm,
        "skipped": torch.tensor(skip is not None),
    }
    if len(mtp_losses):
        metrics["mtp_losses"] = mtp_losses
    if moes:
        E = moes[0].cfg.num_experts
        load_LE = packed[n : n + len(moes) * E].view(len(moes), E)
        router_health.observe(state, load_LE)
        for m, load_E in zip(moes, load_LE, strict=True):
            if skip is None:
                m.update_bias(load_E)
            m.routed_E.zero_()
            m.dropped.zero_()
        metrics["load_LE"] = load_LE
        metrics["dropped_L"] = packed[n + len(moes) * E : -1]
    metrics["preempt"] = packed[-1] > 0
    if distiller is not None:
        metrics["distill_kl"] = distiller.reduce(kl_sum / accum, state.mesh)
    metrics["lr"] = torch.tensor(lr)
    metrics["data_wait_s"] = torch.tensor(wait)
    state.step += 1
    if acct is not None:
        acct.ledger.record(
            step=state.step, start=cursor_before, end=acct.cursor(), trained=skip is None
        )
    state.tokens += cfg.train.seq_len * cfg.train.micro_batch_size * accum * state.mesh.world_size
    if fault is not None:
        assert state.faults is not None
        state.faults.save()  # after the all-reduce above: every rank has read the record
    if state.guard is not None:
        state.guard.record(skip, step=state.step)
    return metrics


def roll_back(state: RunState, ckpt: Checkpointer, why: TrainingDiverged, *, count: int) -> None:
    """`train.on_bad_steps=rollback`: reloads the newest complete checkpoint, then moves the
    data back to where the bad steps left it, so the batches that diverged are not trained
    again; the samples passed over are recorded as such in the sample ledger.

    Raises:
        TrainingDiverged: more than train.max_rollbacks rollbacks, or no checkpoint.
    """
    cfg = state.cfg
    if count > cfg.train.max_rollbacks:
        raise TrainingDiverged(
            f"{why}; already rolled back train.max_rollbacks ({cfg.train.max_rollbacks}) times "
            "in this run"
        ) from None
    assert isinstance(state.source, AccountedSource)
    data_now = state.source.inner.state_dict()
    bad_step = state.step
    ckpt.wait()  # a save in flight may be the newest checkpoint
    loaded = ckpt.resume(state)
    if loaded is None:
        raise TrainingDiverged(
            f"{why}; train.on_bad_steps=rollback found no complete checkpoint to roll back to "
            f"in {cfg.run.output_dir} (checkpoint.every={cfg.checkpoint.every}, "
            f"checkpoint.resume={cfg.checkpoint.resume})"
        ) from None
    start = state.source.cursor()
    state.source.inner.load_state_dict(data_now)
    state.source.ledger.skip_on_purpose(
        start=start,
        end=state.source.cursor(),
        reason=f"rollback at step {bad_step} to step {loaded}",
    )
    if state.guard is not None:
        state.guard.consecutive = 0
    if state.mesh.rank == 0:
        print(
            f"rollback {count}/{cfg.train.max_rollbacks}: {why} -> back to the checkpoint of "
            f"step {loaded}; the data goes on from global sample {state.source.cursor()} "
            f"(samples {start}..{state.source.cursor() - 1} are passed over)",
            flush=True,
        )


def make_sinks(
    cfg: JobConfig, rank: int, *, local_rank: int = 0, gpu_uuid: str | None = None
) -> list[MetricSink]:
    """stdout and metrics.jsonl on rank 0; Prometheus (if `ops.prometheus` is on) on every
    rank, each exporting its own GPU's series; TensorBoard and W&B (`ops.tensorboard`,
    `ops.wandb`) on rank 0, which holds every rank's GPU samples (a resumed run's trackers
    go on from the first step it logs)."""
    sinks: list[MetricSink] = []
    prom = build_prometheus_sink(
        cfg.ops,
        run=cfg.run.name,
        node=socket.gethostname(),
        rank=rank,
        local_rank=local_rank,
        gpu=gpu_uuid,
    )
    if prom is not None:
        sinks.append(prom)
    if rank != 0:
        return sinks
    if cfg.ops.stdout:
        sinks.append(StdoutSink())
    out = cfg.run.output_dir.rstrip("/")
    if cfg.ops.jsonl:
        sinks.append(JsonlSink(f"{out}/metrics.jsonl"))
    try:
        if cfg.ops.tensorboard:
            from ops.tb_sink import TensorBoardSink  # imports tensorboard: only when asked for

            sinks.append(TensorBoardSink(f"{out}/tensorboard", config_text=to_yaml(cfg)))
        if cfg.ops.wandb:
            from ops.wandb_sink import WandbSink  # imports wandb: only when asked for

            sinks.append(
                WandbSink(
                    cfg.ops,
                    output_dir=out,
                    run_name=cfg.run.name,
                    config=yaml.safe_load(to_yaml(cfg)),
                )
            )
    except BaseException:
        for s in sinks:  # the servers and files opened so far
            s.close()
        raise
    return sinks


def device_identity(device: torch.device) -> tuple[str | None, str | None]:
    """(GPU UUID, device name) for ops: NVML finds the GPU by UUID, not by torch's index."""
    if device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(device)
    return str(props.uuid), props.name


def make_telemetry(state: RunState, *, local_rank: int, gpu_uuid: str | None) -> Telemetry:
    mesh, device = state.mesh, state.device

    def gather(values: list[float]) -> list[list[float]]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        rows = [torch.empty_like(t) for _ in range(mesh.world_size)]
        dist.all_gather(rows, t, group=mesh.group("world"))
        return torch.stack(rows).cpu().tolist()  # device-to-host sync, at log steps only

    return Telemetry(
        state.cfg.ops,
        rank=mesh.rank,
        local_rank=local_rank,
        world_size=mesh.world_size,
        gpu_uuid=gpu_uuid,
        device_name=device_identity(device)[1],
        flops_per_token=flops_per_token(state.cfg.model, state.cfg.train.seq_len),
        gather=gather if mesh.world_size > 1 else None,
    )


@dataclass
class Session:
    """What one call of `run` holds around the state: the checkpointer, the sinks, the
    telemetry, the logging window and what the summary reports."""

    ckpt: Checkpointer
    sinks: list[MetricSink]
    telemetry: Telemetry
    tokens_per_step: int
    losses: list[float] = field(default_factory=list)
    last_record: dict[str, Any] = field(default_factory=dict)
    preempted: bool = False
    rollbacks: int = 0
    t_start: float = 0.0
    # The logging window: steps and data wait since the last logged step.
    t_window: float = 0.0
    steps_window: int = 0
    wait_window: float = 0.0


def begin(
    state: RunState,
    *,
    local_rank: int,
    sinks: list[MetricSink] | None,
    on_checkpoint: CheckpointHook | None,
    placement: dict[str, Any] | None,
) -> Session:
    """Writes the resolved config and the placement plan, resumes from the newest complete
    checkpoint, starts the sinks, the telemetry, the SIGTERM handler and the watchdog."""
    cfg, rank = state.cfg, state.mesh.rank
    out = cfg.run.output_dir.rstrip("/")
    plan = placement if placement is not None else placement_plan(state)
    if rank == 0:
        write_text(f"{out}/config.yaml", to_yaml(cfg))
        write_text(f"{out}/placement.json", json.dumps(plan, indent=1))
    ckpt = Checkpointer(
        cfg.checkpoint, out, state.mesh, config_yaml=to_yaml(cfg), on_checkpoint=on_checkpoint
    )
    ckpt.resume(state)
    gpu_uuid = device_identity(state.device)[0]
    telemetry = make_telemetry(state, local_rank=local_rank, gpu_uuid=gpu_uuid)
    if sinks is None:
        sinks = make_sinks(cfg, rank, local_rank=local_rank, gpu_uuid=gpu_uuid)
    t = cfg.train
    session = Session(
        ckpt=ckpt,
        sinks=sinks,
        telemetry=telemetry,
        tokens_per_step=t.seq_len * t.micro_batch_size * t.grad_accum * state.mesh.world_size,
    )
    state.preempt = Preemption(t.preempt_grace_s)
    state.preempt.install(announce=rank == 0)
    state.watch = CollectiveWatch(
        rank=rank, world_size=state.mesh.world_size, timeout_s=cfg.parallel.timeout_s
    )
    telemetry.start()
    session.t_start = session.t_window = time.perf_counter()
    return session


def log_step(state: RunState, session: Session, m: dict[str, torch.Tensor]) -> None:
    """Builds the metrics record of a logged step and hands it to the sinks."""
    if state.device.type == "cuda":
        torch.cuda.synchronize()  # host sync: honest step timing at log steps only
    now = time.perf_counter()
    dt = now - session.t_window
    steps = session.steps_window
    # Device-to-host sync: the logged values.
    lm = m["lm_loss"].item()
    # MTP (model.mtp.depth > 0): each depth's cross-entropy, and lambda x their mean in loss.
    mtp = m["mtp_losses"].tolist() if "mtp_losses" in m else []
    mtp_term = state.cfg.train.mtp_loss_weight * sum(mtp) / len(mtp) if mtp else 0.0
    record: dict[str, Any] = {
        "loss": lm + m["aux_loss"].item() + m["z_loss"].item() + mtp_term,
        "lm_loss": lm,
        **{f"mtp_loss_{k}": v for k, v in enumerate(mtp, start=1)},
        "aux_loss": m["aux_loss"].item(),
        "z_loss": m["z_loss"].item(),
        "grad_norm": m["grad_norm"].item(),
        "lr": m["lr"].item(),
        "tokens": state.tokens,
        "tokens_per_s": session.tokens_per_step * steps / dt,
        "step_time_s": dt / steps,
        "data_wait_s": m["data_wait_s"].item(),
    }
    if state.guard is not None:
        record["skipped_steps"] = state.guard.skipped
        record["step_skipped"] = bool(m["skipped"])
    if state.faults is not None and state.faults.active:
        record["faults_injected"] = state.faults.count
    if "distill_kl" in m:
        record["distill_kl"] = m["distill_kl"].item()
        alpha = state.cfg.distill.alpha
        record["distill_loss"] = (1 - alpha) * lm + alpha * record["distill_kl"]
    record.update(state.extra.pop(VAL_RECORD_KEY, {}))
    record.update(state.source.metrics())
    if "load_LE" in m:
        record["moe"] = expert_load_stats(m["load_LE"].cpu(), m["dropped_L"].cpu())
        router_health.extend(state, record["moe"], state.model.moe_layers())
    session.telemetry.update(
        record,
        window_s=dt,
        window_steps=steps,
        window_tokens=session.tokens_per_step * steps,
        window_data_wait_s=session.wait_window,
    )
    session.losses.append(record["loss"])
    for s in session.sinks:
        s.log(record, state.step)
    session.t_window, session.steps_window, session.wait_window = time.perf_counter(), 0, 0.0
    session.last_record = record


def stop_for_preemption(state: RunState, session: Session) -> None:
    """Writes a checkpoint synchronously (unless this step has one) and announces the stop."""
    cfg, ckpt = state.cfg, session.ckpt
    if ckpt.last_saved != state.step:
        ckpt.save(state, session.last_record)
    ckpt.wait()  # the checkpoint is complete before the loop stops
    session.preempted = True
    if state.mesh.rank == 0:
        assert state.preempt is not None
        print(
            f"preempted: stopped after step {state.step} with a complete checkpoint "
            f"({state.preempt.elapsed():.1f} s after SIGTERM, "
            f"train.preempt_grace_s={cfg.train.preempt_grace_s:g}); rerun the "
            "same command to resume",
            flush=True,
        )


def train(state: RunState, session: Session) -> None:
    """Steps until train.steps, the end of the data, or a preemption; logs and checkpoints
    on the way, and rolls back on diverging steps when train.on_bad_steps says so."""
    cfg, ckpt = state.cfg, session.ckpt
    assert state.preempt is not None
    while state.step < cfg.train.steps:
        try:
            m = train_step(state)
        except TrainingDiverged as e:
            if cfg.train.on_bad_steps != "rollback":
                raise
            session.rollbacks += 1
            roll_back(state, ckpt, e, count=session.rollbacks)
            continue
        except DataExhausted as e:
            # data.epochs or data.token_budget reached: every rank hits it at the same
            # global batch, before any micro-batch of the step was trained.
            if state.mesh.rank == 0:
                print(f"data exhausted after step {state.step}: {e}", flush=True)
            if cfg.checkpoint.every and ckpt.last_saved != state.step:
                ckpt.save(state, session.last_record)
            break
        session.steps_window += 1
        session.wait_window += float(m["data_wait_s"])  # a host tensor: no device sync
        val = evaluate.maybe_evaluate(state)
        if val is not None:
            # An evaluation step is logged, with its figures; its time is not step time.
            session.t_window += val["val_time_s"]
            state.extra[VAL_RECORD_KEY] = val
        if state.step % cfg.run.log_every == 0 or state.step == cfg.train.steps or val:
            log_step(state, session, m)
        ckpt.maybe_save(state, session.last_record, final_step=cfg.train.steps)
        # Ranks stop on the flag they agreed on in the step's all-reduce, never on their
        # own: a rank signalled after that all-reduce stops one step later, with the rest.
        # Device-to-host sync (multi-rank only).
        if bool(m["preempt"]) if state.mesh.world_size > 1 else state.preempt.requested:
            stop_for_preemption(state, session)
            break
    ckpt.close()  # waits for a background save; raises its error


def end(state: RunState, session: Session) -> None:
    """Stops what `begin` started, whether the run succeeded or not."""
    if state.preempt is not None:
        state.preempt.uninstall()
    if state.watch is not None:
        state.watch.close()
    session.ckpt.close(raise_errors=False)
    for s in session.sinks:
        s.close()
    session.telemetry.close()
    state.source.close()


def summarize(state: RunState, session: Session) -> RunSummary:
    """The run summary (every rank), written to `summary.json` by rank 0."""
    wall = time.perf_counter() - session.t_start
    acct_figures: dict[str, Any] = {}
    if isinstance(state.source, AccountedSource):
        substituted = int(state.source.metrics().get("data_substituted_rows", 0))
        acct_figures = state.source.ledger.summary(substituted=substituted)
    out = state.cfg.run.output_dir.rstrip("/")
    losses = session.losses
    summary = RunSummary(
        steps=state.step,
        tokens=state.tokens,
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        tokens_per_s=state.tokens / wall if wall > 0 else 0.0,
        wall_s=wall,
        output_dir=out,
        world_size=state.mesh.world_size,
        ep=state.mesh.ep,
        samples_consumed=acct_figures.get("samples_consumed", 0),
        samples_repeated=acct_figures.get("samples_repeated", 0),
        samples_skipped=acct_figures.get("samples_skipped", 0),
        samples_guard_skipped=acct_figures.get("samples_guard_skipped", 0),
        samples_substituted=acct_figures.get("samples_substituted", 0),
        samples_policy_skipped=acct_figures.get("samples_policy_skipped", 0),
        resumes=acct_figures.get("resumes", 0),
        accounting=acct_figures,
        preempted=session.preempted,
        faults_injected=state.faults.count if state.faults is not None else 0,
    )
    if state.mesh.rank == 0:
        write_text(f"{out}/summary.json", json.dumps(summary.to_dict(), indent=1))
    return summary


def run(
    cfg: JobConfig,
    *,
    local_rank: int = 0,
    sinks: list[MetricSink] | None = None,
    on_checkpoint: CheckpointHook | None = None,
    placement: dict[str, Any] | None = None,
) -> RunSummary:
    """Trains up to `cfg.train.steps` steps and returns the summary (on every rank).

    Resumes from the newest complete checkpoint in `run.output_dir` (see
    `trainer/checkpoint.py`); `on_checkpoint(url, step, metrics)` is called on every rank
    after each checkpoint is complete (the Ray launcher registers it with Ray Train).
    `placement` is the expert placement plan a launcher computed (cluster/placement.py, with
    Ray node ids); it must be given on every rank or on none. Without it the loop gathers
    hostnames itself (`placement_plan`).

    The steps: `setup` (process group, mesh, model, optimizer, data), `begin` (outputs,
    resume, sinks, telemetry), `train` (the steps, with `train_step` and `log_step`), `end`
    (stop what begin started) and `summarize`.
    """
    state = setup(cfg, local_rank=local_rank)
    session = begin(
        state, local_rank=local_rank, sinks=sinks, on_checkpoint=on_checkpoint, placement=placement
    )
    try:
        train(state, session)
    finally:
        end(state, session)
    return summarize(state, session)
