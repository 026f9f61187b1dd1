"""Sharded checkpoints on any fsspec URL: save (sync or in the background), resume, reshard.

Layout under `run.output_dir`:

    checkpoints/step-00000100/.metadata        written last, by the coordinator: the commit
    checkpoints/step-00000100/__R_0.distcp     rank R's share, written by rank R
    checkpoints/latest                         {"step": 100, "url": ...}, after .metadata

Every rank writes its share straight to storage with `torch.distributed.checkpoint` (DCP).
A step directory without `.metadata` is incomplete: resume never uses it, and it is removed
with a log line at the next start. `latest` is a convenience for people and tools; resume
lists the directories and trusts `.metadata` alone.

What one checkpoint holds, as one flat DCP state dict:

    model.<name>                      model weights and buffers (router expert biases); each
                                      expert under its global id: `...experts.<id>.w1`
    optim.<param>.<state>             AdamW moments of dense parameters, and the step counter
    optim.<experts>.<id>.<w>.<state>  the moments of one expert, split out of the stacked
                                      [L, D, F] tensor by global id so they reshard with it
                                      (w13's moments as w1's and w3's, its step as
                                      `optim.<experts>.w1.step` and `.w3.step`)
    meta.progress, meta.scheduler,    pickled objects: step and tokens, LR schedule, optimizer
    meta.param_groups, meta.data,     hyperparameters, the data reader's cursor, the resolved
    meta.config, meta.layout,         config, the layout it was saved at, and the loss
    meta.guard                        guard's running state
    rng.rank<R>                       rank R's RNG states (torch, CUDA, Python, NumPy)

Dense keys are the same on every rank and experts are the same on every rank of a `dp`
group; DCP's planner keeps one writer per key, so each tensor is written once. Because
expert keys are global ids, a checkpoint saved at one expert-parallel layout loads at any
other: each rank asks for the keys it holds.

Asynchronous save: the loop snapshots the state to CPU (a copy) and hands it to a single
background thread; the next save waits for the previous one. The background thread talks
over its own gloo process group, created up front, since collectives from two threads on one
group are unsafe. A failed save is retried with exponential backoff; after
`checkpoint.retries` the error is raised in the loop at the next save or at the end.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import pickle
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.tensor import DTensor
from torch.futures import Future

from trainer.config import CheckpointConfig
from trainer.mesh import Mesh
from trainer.model import local_of, plain_name
from trainer.moe import EXPERT_PARTS, GroupedExperts, expert_slice

if TYPE_CHECKING:
    from trainer.run_state import RunState

log = logging.getLogger("moeyard.checkpoint")

# DCP warns on every single-process save and load; single-process is intended here (no_dist).
warnings.filterwarnings(
    "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
)

CHECKPOINTS = "checkpoints"
METADATA = ".metadata"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")

# Called on every rank once a checkpoint is complete: (its URL, its step, the metrics logged
# at that step). It runs in the thread that wrote the checkpoint (the background thread when
# checkpoint.async_save is on), once per checkpoint and in step order.
CheckpointHook = Callable[[str, int, dict[str, Any]], None]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, found or loaded; the message names the URL."""


def _say(msg: str) -> None:
    """A line operators see in the job's output (and in the log)."""
    print(f"checkpoint: {msg}", flush=True)
    log.info(msg)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_url(output_dir: str) -> str:
    return f"{output_dir.rstrip('/')}/{CHECKPOINTS}"


def step_url(output_dir: str, step: int) -> str:
    return f"{checkpoints_url(output_dir)}/{step_name(step)}"


@dataclass(frozen=True)
class Listing:
    """The step directories under `checkpoints/`: complete (with .metadata) and not."""

    complete: list[int]
    partial: list[int]

    @property
    def newest(self) -> int | None:
        return self.complete[-1] if self.complete else None


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def scan(output_dir: str) -> Listing:
    """Lists the checkpoints of a run (fresh from storage, not from a listing cache)."""
    fs, root = _fs(checkpoints_url(output_dir))
    fs.invalidate_cache()
    try:
        entries = fs.ls(root, detail=False)
    except FileNotFoundError:
        return Listing([], [])
    complete: list[int] = []
    partial: list[int] = []
    for entry in entries:
        m = _STEP_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if not m:
            continue
        step = int(m.group(1))
        (complete if fs.exists(f"{root}/{m.group(0)}/{METADATA}") else partial).append(step)
    return Listing(sorted(complete), sorted(partial))


def remove_checkpoint(output_dir: str, step: int) -> None:
    """Deletes a step directory, `.metadata` first, so an interrupted delete leaves an
    incomplete directory (ignored) rather than a complete-looking broken one."""
    fs, path = _fs(step_url(output_dir, step))
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):
        fs.rm(f"{path}/{METADATA}")
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)
    fs.invalidate_cache()


def retained(complete: list[int], cfg: CheckpointConfig) -> set[int]:
    """The steps retention keeps: the newest `keep_last`, and every `keep_every`-th step."""
    keep = set(complete[-cfg.keep_last :])
    if cfg.keep_every:
        keep |= {s for s in complete if s % cfg.keep_every == 0}
    return keep


# --- what goes into a checkpoint -------------------------------------------------------


ExpertParts = tuple[tuple[str, tuple[int, int] | None], ...]


def _expert_params(model: nn.Module) -> dict[str, tuple[GroupedExperts, str, ExpertParts]]:
    """Stacked expert parameter name -> (module, module name, the per-expert weights it is
    saved as: `EXPERT_PARTS`, e.g. w13 as w1 and w3)."""
    out = {}
    for mname, module in model.named_modules():
        if isinstance(module, GroupedExperts):
            mname = plain_name(mname)
            for name, parts in EXPERT_PARTS.items():
                out[f"{mname}.{name}"] = (module, mname, parts)
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): plain_name(name) for name, p in model.named_parameters()}


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """`model.<key>` -> tensor sharing storage with the model (experts by global id).

    Keys are those of the plain model whatever wraps its blocks (activation checkpointing,
    compile); under FSDP the values are DTensors (this rank's shards, global shapes), which
    DCP saves and loads in place, resharding to any other layout.
    """
    return {f"model.{plain_name(k)}": v for k, v in model.state_dict().items()}


def global_model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every `model.<key>` of the whole model (all experts, not only those held here)."""
    shapes: dict[str, tuple[int, ...]] = {}
    experts = {mname: module for _, (module, mname, _) in _expert_params(model).items()}
    for key, t in model.state_dict().items():
        key = plain_name(key)
        parts = key.split(".")
        # An expert key is <module name>.<global id>.<weight>.
        if len(parts) >= 3 and parts[-2].isdigit() and ".".join(parts[:-2]) in experts:
            module = experts[".".join(parts[:-2])]
            for gid in range(module.num_experts):
                shapes[f"model.{'.'.join(parts[:-2])}.{gid}.{parts[-1]}"] = tuple(t.shape)
        else:
            shapes[f"model.{key}"] = tuple(t.shape)
    return shapes


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's per-parameter state keyed by parameter name, expert moments split
    per global expert id (see the module docstring)."""
    names = _param_names(model)
    experts = _expert_params(model)
    out: dict[str, Any] = {}
    for p, st in optimizer.state.items():
        fqn = names[id(p)]
        for k, v in st.items():
            value = v if isinstance(v, Tensor) else pickle.dumps(v)
            if fqn not in experts:
                out[f"optim.{fqn}.{k}"] = value
                continue
            module, mname, parts = experts[fqn]
            for w, part in parts:
                if isinstance(v, Tensor) and v.shape == p.shape:
                    for i in range(v.shape[0]):
                        key = f"optim.{mname}.{module.expert_offset + i}.{w}.{k}"
                        out[key] = expert_slice(v, i, part)
                else:
                    # Per saved weight (w13's step counter as w1's and w3's), as when they
                    # were separate parameters.
                    out[f"optim.{mname}.{w}.{k}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out["meta.param_groups"] = pickle.dumps(groups)
    return out


def rng_state() -> bytes:
    return pickle.dumps(
        {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": np.random.get_state(),
        }
    )


def set_rng_state(blob: bytes) -> None:
    st = pickle.loads(blob)
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])


def full_state(state: RunState, config_yaml: str) -> dict[str, Any]:
    """The flat state dict one rank contributes to a checkpoint (tensors share storage with
    the live state: snapshot it before training goes on)."""
    mesh = state.mesh
    sd: dict[str, Any] = model_state(state.model)
    sd.update(optimizer_state(state.model, state.optimizer))
    sd["meta.progress"] = pickle.dumps({"step": state.step, "tokens": state.tokens})
    sd["meta.scheduler"] = pickle.dumps(state.scheduler.state_dict())
    sd["meta.data"] = pickle.dumps(state.source.state_dict())
    sd["meta.config"] = config_yaml
    sd["meta.layout"] = pickle.dumps(
        {
            "world_size": mesh.world_size,
            "ep": mesh.ep,
            "dp_replicate": mesh.dp_replicate,
            "dp_shard": mesh.dp_shard,
        }
    )
    guard = getattr(state, "guard", None)
    if guard is not None:  # the loss guard's running mean decides which steps it skips
        sd["meta.guard"] = pickle.dumps(guard.state_dict())
    sd[f"rng.rank{mesh.rank}"] = rng_state()
    return sd


def _to_cpu(t: Tensor) -> Tensor:
    """A CPU copy of this rank's part of `t`: a DTensor keeps its mesh and placements, so
    the copy holds only the rank's own shards (never a whole model per rank)."""
    t = t.detach()
    if isinstance(t, DTensor):
        return DTensor.from_local(
            t.to_local().to("cpu", copy=True),
            t.device_mesh,
            t.placements,
            run_check=False,
            shape=t.shape,
            stride=t.stride(),
        )
    return t.to("cpu", copy=True)


def snapshot(sd: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of every tensor, so the background writer sees the state of this step."""
    return {k: (_to_cpu(v) if isinstance(v, Tensor) else v) for k, v in sd.items()}


# --- reading ---------------------------------------------------------------------------

_SPAN_BYTES = 64 << 20  # the most one ranged read fetches into memory


class RangeReader(FsspecReader):
    """DCP's fsspec reader, fetching each shard's needed bytes in a few large ranged reads.

    The stock reader seeks through a remote file object item by item, in request order, and
    `torch.load` reads each item's zip records in many small pieces: on object storage every
    seek outside the read-ahead buffer is another request. Here the items of a shard are
    sorted by offset and fetched in spans of up to 64 MB, then deserialized from memory.
    Only the byte ranges this rank asked for are read.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        # DCP's fsspec reader keeps the fsspec filesystem one level down (untyped there).
        fs = self.fs.fs  # type: ignore[attr-defined]
        for relative_path, reqs in per_file.items():
            path = str(self.fs.concat_path(self.path, relative_path))
            reqs.sort(key=lambda r: self.storage_data[r.storage_index].offset)
            i = 0
            while i < len(reqs):
                start = self.storage_data[reqs[i].storage_index].offset
                j, end = i, start
                while j < len(reqs):
                    info = self.storage_data[reqs[j].storage_index]
                    if j > i and info.offset + info.length - start > _SPAN_BYTES:
                        break
                    end = max(end, info.offset + info.length)
                    j += 1
                buf = memoryview(fs.cat_file(path, start=start, end=end))
                for req in reqs[i:j]:
                    info = self.storage_data[req.storage_index]
                    piece = io.BytesIO(buf[info.offset - start : info.offset - start + info.length])
                    self._deliver(req, info, piece, planner)
                i = j
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _deliver(self, req: ReadItem, info: Any, piece: io.BytesIO, planner: LoadPlanner) -> None:
        stream = self.transforms.transform_load_stream(req, info.transform_descriptors or (), piece)
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(stream.read(-1)))
            return
        if not stream.seekable():
            stream = io.BytesIO(stream.read(-1))
        tensor = torch.load(stream, map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise CheckpointError(
                f"{req.storage_index.fqn}: stored shape {tuple(tensor.size())} does not match "
                f"the requested {tuple(target.size())}"
            )
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def read_metadata(url: str) -> Metadata:
    """The DCP metadata of a checkpoint directory.

    Raises:
        CheckpointError: `.metadata` is missing (an incomplete checkpoint) or unreadable.
    """
    reader = FsspecReader(url)
    try:
        return reader.read_metadata()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {url} is incomplete: {METADATA} is missing (a save was interrupted)"
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {url}: {METADATA} is corrupt or unreadable ({type(e).__name__}: {e}); "
            "resume from another step with checkpoint.load_step=N, or delete the directory"
        ) from None


def check_model_matches(url: str, md: Metadata, model: nn.Module) -> None:
    """Raises CheckpointError naming every missing, unexpected and mis-shaped model key."""
    want = global_model_shapes(model)
    have = {
        k: tuple(v.size)
        for k, v in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if not (missing or unexpected or shapes):
        return

    def few(keys: list[str], fmt: Callable[[str], str] = str) -> str:
        shown = ", ".join(fmt(k[len("model.") :]) for k in keys[:8])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = []
    if shapes:
        parts.append(
            "shape mismatches: "
            + few(
                shapes,
                lambda k: f"{k} (checkpoint {have['model.' + k]}, model {want['model.' + k]})",
            )
        )
    if missing:
        parts.append("missing from the checkpoint: " + few(missing))
    if unexpected:
        parts.append("not in the model: " + few(unexpected))
    raise CheckpointError(
        f"checkpoint {url} does not match the model (model.* config differs): " + "; ".join(parts)
    )


def _optimizer_targets(
    model: nn.Module, optimizer: torch.optim.Optimizer, md: Metadata
) -> tuple[dict[str, Any], list[tuple[nn.Parameter, dict[str, Any]]]]:
    """Tensors to load the optimizer state into, and (param, state) pairs to install after."""
    names = _param_names(model)
    experts = _expert_params(model)
    meta = md.state_dict_metadata
    targets: dict[str, Any] = {}
    installs: list[tuple[nn.Parameter, dict[str, Any]]] = []

    def alloc(key: str, p: Tensor, *, stacked: bool = False, num_parts: int = 1) -> Any:
        """A tensor to load `key` into: shaped (and, under FSDP, sharded) like `p` when the
        saved state has p's shape (or one expert of it, or one of its `num_parts` parts),
        else as saved. A scalar stays on the CPU: AdamW keeps its `step` there (a device
        `step` costs a host sync per parameter per step on the non-capturable path)."""
        m = meta[key]
        if isinstance(m, BytesStorageMetadata):
            return b""
        size = tuple(m.size)
        want = tuple(p.shape)
        if stacked:
            want = (*want[1:-1], want[-1] // num_parts)
        if size == want:
            return torch.empty_like(p, dtype=m.properties.dtype)
        device = "cpu" if not size else local_of(p).device
        return torch.empty(size, dtype=m.properties.dtype, device=device)

    for group in optimizer.param_groups:
        for p in group["params"]:
            fqn = names[id(p)]
            st: dict[str, Any] = {}
            prefix = f"optim.{fqn}."
            if fqn in experts:
                module, mname, parts = experts[fqn]
                # Moments by the first saved weight's keys; every part's loads into its slice.
                w0 = parts[0][0]
                first = f"optim.{mname}.{module.expert_offset}.{w0}."
                for key in [k for k in meta if k.startswith(first)]:
                    name = key[len(first) :]
                    stacked = alloc(key, p, stacked=True, num_parts=len(parts))
                    for w, part in parts:
                        for i in range(module.num_local_experts):
                            k = f"optim.{mname}.{module.expert_offset + i}.{w}.{name}"
                            if k not in meta:
                                raise CheckpointError(f"checkpoint optimizer state lacks {k}")
                            targets[k] = expert_slice(stacked, i, part)
                    st[name] = stacked
                # Other state (the step counter) is saved per saved weight; the first one's.
                prefix = f"optim.{mname}.{w0}."
            for key in [k for k in meta if k.startswith(prefix) and "." not in k[len(prefix) :]]:
                targets[key] = st[key[len(prefix) :]] = alloc(key, p)
            if st:
                installs.append((p, st))
    return targets, installs


def load_into(state: RunState, url: str, *, group: dist.ProcessGroup | None = None) -> int:
    """Loads the checkpoint at `url` into the live state, whatever layout saved it.

    Returns the step it was saved at.

    Raises:
        CheckpointError: incomplete or corrupt checkpoint, or one of another model shape.
    """
    md = read_metadata(url)
    check_model_matches(url, md, state.model)
    meta = md.state_dict_metadata
    rank = state.mesh.rank
    request: dict[str, Any] = model_state(state.model)
    opt_targets, installs = _optimizer_targets(state.model, state.optimizer, md)
    request.update(opt_targets)
    objects = [k for k in meta if k.startswith("meta.")]
    for k in objects:
        request[k] = b""
    rng_key = f"rng.rank{rank}"
    if rng_key in meta:
        request[rng_key] = b""
    dist_on = state.mesh.world_size > 1
    dcp.load(
        request,
        storage_reader=RangeReader(url),
        process_group=group,
        no_dist=not dist_on,
    )
    for p, st in installs:
        state.optimizer.state[p] = st
    groups = pickle.loads(request["meta.param_groups"])
    if len(groups) != len(state.optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint {url} has {len(groups)} optimizer parameter groups, the optimizer "
            f"{len(state.optimizer.param_groups)}"
        )
    for live, saved in zip(state.optimizer.param_groups, groups, strict=True):
        live.update(saved)
    state.scheduler.load_state_dict(pickle.loads(request["meta.scheduler"]))
    state.source.load_state_dict(pickle.loads(request["meta.data"]))
    guard = getattr(state, "guard", None)
    if guard is not None and "meta.guard" in request:
        guard.load_state_dict(pickle.loads(request["meta.guard"]))
    progress = pickle.loads(request["meta.progress"])
    state.step, state.tokens = int(progress["step"]), int(progress["tokens"])
    if rng_key in request:
        set_rng_state(request[rng_key])
    return state.step


def consolidated_model_state(url: str) -> dict[str, Tensor]:
    """The whole model's state dict from a checkpoint, read in this one process (no
    process group): keys as in `Transformer.state_dict()` at EP=1, experts by global id."""
    md = read_metadata(url)
    sd: dict[str, Any] = {
        k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for k, m in md.state_dict_metadata.items()
        if k.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    dcp.load(sd, storage_reader=RangeReader(url), no_dist=True)
    return {k[len("model.") :]: v for k, v in sd.items()}


def read_objects(url: str, keys: list[str]) -> dict[str, Any]:
    """The pickled/str objects `keys` (e.g. 'meta.config') of a checkpoint, in one process."""
    sd: dict[str, Any] = dict.fromkeys(keys, b"")
    dcp.load(sd, storage_reader=RangeReader(url), no_dist=True)
    return {k: (v if isinstance(v, str) else pickle.loads(v)) for k, v in sd.items()}


# --- writing ---------------------------------------------------------------------------


def _failures(e: BaseException) -> list[BaseException]:
    if isinstance(e, CheckpointException):
        return [exc for exc, _ in e.failures.values()]
    return [e]


def _describe(e: BaseException) -> str:
    excs = _failures(e)
    return "; ".join(f"{type(x).__name__}: {x}" for x in excs) or repr(e)


def _retryable(e: BaseException) -> bool:
    # Permissions do not fix themselves; anything else (a dropped connection, an endpoint
    # that is down, a throttled request) may.
    return not any(isinstance(x, PermissionError) for x in _failures(e))


class Checkpointer:
    """Saves, resumes and retains the checkpoints of one run; every rank holds one.

    All ranks must call `resume`, `maybe_save` and `close` at the same steps (they do, as the
    loop calls them unconditionally).
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        output_dir: str,
        mesh: Mesh,
        *,
        config_yaml: str = "",
        on_checkpoint: CheckpointHook | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = output_dir.rstrip("/")
        self.mesh = mesh
        self.config_yaml = config_yaml
        self.on_checkpoint = on_checkpoint
        self.last_saved = -1
        # Checkpoint traffic gets its own gloo group: the background writer must not share a
        # group with the training collectives, and DCP exchanges its plans as CPU objects.
        self.group: dist.ProcessGroup | None = None
        if mesh.world_size > 1:
            self.group = dist.new_group(backend="gloo", timeout=mesh.timeout)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[None] | None = None

    # -- resume --

    def _agree(self, obj: Any) -> Any:
        """Rank 0's value of `obj`, on every rank."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def resume(self, state: RunState) -> int | None:
        """Loads the newest complete checkpoint (or checkpoint.load_step) if there is one and
        checkpoint.resume is on; removes incomplete ones. Returns the step loaded, or None."""
        decision: tuple[str, Any] = ("none", None)
        if self.mesh.rank == 0:
            try:
                decision = self._choose()
            except CheckpointError as e:
                decision = ("error", str(e))
        kind, value = self._agree(decision)
        if kind == "error":
            raise CheckpointError(value)
        if kind == "none":
            return None
        url = step_url(self.output_dir, value)
        step = load_into(state, url, group=self.group)
        self.last_saved = step
        if self.mesh.rank == 0:
            _say(f"resumed from {url} (step {step}, {state.tokens} tokens)")
        return step

    def _choose(self) -> tuple[str, Any]:
        listing = scan(self.output_dir)
        for step in listing.partial:
            _say(
                f"ignoring incomplete checkpoint {step_url(self.output_dir, step)} (no "
                f"{METADATA}: a save was interrupted); removing it"
            )
            try:
                remove_checkpoint(self.output_dir, step)
            except Exception as e:
                _say(f"could not remove {step_url(self.output_dir, step)}: {e}")
        if not self.cfg.resume:
            if listing.complete:
                _say(
                    f"checkpoint.resume is false: starting from step 0 although "
                    f"{checkpoints_url(self.output_dir)} holds steps {listing.complete}"
                )
            return ("none", None)
        if self.cfg.load_step >= 0:
            if self.cfg.load_step not in listing.complete:
                return (
                    "error",
                    f"checkpoint.load_step ({self.cfg.load_step}) is not a complete checkpoint "
                    f"in {checkpoints_url(self.output_dir)} (complete: {listing.complete or 'none'})",
                )
            return ("load", self.cfg.load_step)
        return ("load", listing.newest) if listing.newest is not None else ("none", None)

    # -- save --

    def due(self, step: int, *, final_step: int) -> bool:
        every = self.cfg.every
        return bool(every) and step != self.last_saved and (step % every == 0 or step == final_step)

    def maybe_save(
        self, state: RunState, metrics: dict[str, Any] | None = None, *, final_step: int
    ) -> bool:
        """Saves when checkpoint.every says so (and at `final_step`). Returns whether it did.

        Raises:
            CheckpointError: the previous background save failed after its retries.
        """
        if not self.due(state.step, final_step=final_step):
            return False
        self.save(state, metrics)
        return True

    def save(self, state: RunState, metrics: dict[str, Any] | None = None) -> None:
        self.wait()
        sd = full_state(state, self.config_yaml)
        step, info = state.step, dict(metrics or {})
        self.last_saved = step
        if not self.cfg.async_save:
            self._write(step, sd, info)
            return
        sd = snapshot(sd)  # the only part the loop waits for
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt")
        self._pending = self._pool.submit(self._write, step, sd, info)

    def wait(self) -> None:
        """Blocks until the background save (if any) is done; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, raise_errors: bool = True) -> None:
        try:
            if raise_errors:
                self.wait()
            elif self._pending is not None:
                self._pending.exception()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _write(self, step: int, sd: dict[str, Any], metrics: dict[str, Any]) -> None:
        url = step_url(self.output_dir, step)
        rank = self.mesh.rank
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                self._write_once(url, sd)
                break
            except (Exception, CheckpointException) as e:
                what = _describe(e)
                if not _retryable(e):
                    raise CheckpointError(f"cannot write checkpoint {url}: {what}") from None
                if attempt + 1 == attempts:
                    raise CheckpointError(
                        f"checkpoint {url} failed after {attempts} attempts "
                        f"(checkpoint.retries={self.cfg.retries}): {what}"
                    ) from None
                wait_s = self.cfg.backoff_s * 2**attempt
                if rank == 0:
                    _say(
                        f"save of {url} failed (attempt {attempt + 1}/{attempts}: {what}); "
                        f"retrying in {wait_s:.1f}s"
                    )
                time.sleep(wait_s)
        if rank == 0:
            self._write_latest(step, url)
        if self.group is not None:
            dist.barrier(group=self.group)
        if rank == 0:
            self._retain()
        if self.on_checkpoint is not None:
            self.on_checkpoint(url, step, metrics)

    def _write_once(self, url: str, sd: dict[str, Any]) -> None:
        # A directory left at this step (an earlier run, or a resume from an older step)
        # is removed first: DCP would otherwise mix its old .metadata with new shards.
        err: str | None = None
        if self.mesh.rank == 0:
            try:
                fs, path = _fs(url)
                fs.invalidate_cache()
                if fs.exists(path):
                    remove_checkpoint(self.output_dir, int(path.rsplit("-", 1)[1]))
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
        if self.group is not None:
            err = self._agree(err)
        if err is not None:
            raise OSError(f"cannot clear {url}: {err}")
        # fsync makes a local checkpoint durable before .metadata commits it; object stores
        # are durable on upload (and DCP would fall back to a machine-wide sync there).
        fs, _ = _fs(url)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        dcp.save(
            sd,
            storage_writer=FsspecWriter(url, sync_files=local),
            process_group=self.group,
            no_dist=self.group is None,
        )

    def _write_latest(self, step: int, url: str) -> None:
        try:
            fs, root = _fs(checkpoints_url(self.output_dir))
            with fs.open(f"{root}/{LATEST}", "w") as f:
                f.write(json.dumps({"step": step, "url": url}) + "\n")
        except Exception as e:  # advisory only: resume lists the directories
            _say(f"could not update {checkpoints_url(self.output_dir)}/{LATEST}: {e}")

    def _retain(self) -> None:
        try:
            listing = scan(self.output_dir)
            keep = retained(listing.complete, self.cfg)
            newest = listing.newest if listing.newest is not None else -1
            stale = [s for s in listing.complete if s not in keep]
            stale += [s for s in listing.partial if s < newest]
            for s in sorted(stale):
                remove_checkpoint(self.output_dir, s)
        except Exception as e:  # a failed delete loses nothing; the next save tries again
            _say(f"retention in {checkpoints_url(self.output_dir)} failed: {e}")


def read_latest(output_dir: str) -> dict[str, Any] | None:
    """The `latest` pointer of a run, or None when it has none."""
    fs, root = _fs(checkpoints_url(output_dir))
    try:
        with fs.open(f"{root}/{LATEST}", "r") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def resolve_checkpoint(url: str) -> str:
    """A checkpoint directory from a step directory URL or a run's output_dir (newest)."""
    fs, path = _fs(url)
    fs.invalidate_cache()
    if fs.exists(f"{path.rstrip('/')}/{METADATA}"):
        return url.rstrip("/")
    listing = scan(url)
    if listing.newest is not None:
        return step_url(url, listing.newest)
    raise CheckpointError(
        f"{url} is neither a complete checkpoint (no {METADATA}) nor a run directory with one"
    )
