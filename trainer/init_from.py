"""`checkpoint.init_from`: the weights of a new run from a transformers checkpoint (Mixtral,
Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3; `trainer/hf.py`'s tables) or a moeyard one, at any
parallel layout; `checkpoint.upcycle`: an MoE from a dense one.

DeepSeek-V3's MTP layers (after the last layer) fill the preset's `model.mtp.depth`
modules; layers beyond it are left unread with a note, fewer than it is an error, and the
copies of the embedding and head they hold are checked equal to the main ones.

Called on every rank after `materialize` (the model is parallelized: experts sliced by
global id, parameters possibly DTensors) and before resume, which wins when the run's
output_dir already holds a checkpoint (then nothing is read here). No optimizer state is
loaded and the run starts at step 0. Every rank reads what it holds and nothing more, one
tensor at a time; no collective is called.

Sparse upcycling (`checkpoint.upcycle=true`, a dense Llama/Mistral/Qwen2-style checkpoint):
attention, norms, embeddings and head are copied; in every MoE layer each routed expert
comes from the dense SwiGLU MLP. With G = intermediate_size / model.moe.expert_hidden
(G = 1: every expert is a copy of the MLP; G > 1: granular upcycling), expert e holds
slice e mod G of the MLP's hidden units, with its down projection scaled by
G / model.moe.route_scale. The router is drawn from the seed; for G > 1 the G slices of
one copy (experts cG .. cG + G - 1) share one router row, so they score alike and are
picked together.

When the upcycled model's logits equal the dense model's at step 0 (checked by the tests):
the top-k weights sum to one (softmax scores with model.moe.norm_topk_prob=true and
top_k > 1, or top_k = num_experts), top_k is a multiple of G, no group-limited routing when
G > 1, no capacity drops (model.moe.capacity_factor=0) and no shared experts. Then the
chosen experts are whole copies and the MoE output is the dense MLP's: for G = 1,
sum_k w_k f(x) = f(x); for G > 1, each chosen copy contributes sum_s (W_c / G) G f_s(x) =
W_c f(x). Otherwise the run starts near, not at, the dense model, and a warning says so.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from trainer.checkpoint import (
    CheckpointError,
    RangeReader,
    check_model_matches,
    global_model_shapes,
    model_state,
    read_metadata,
    resolve_checkpoint,
    scan,
)
from trainer.config import CheckpointConfig, ConfigError, ModelConfig
from trainer.hf import (
    CONFIG,
    DENSE,
    HFError,
    SafetensorsDir,
    TensorMap,
    _arch,
    _rope,
    architecture,
    check_semantics,
    from_hf,
    hf_shape,
    model_config_from_hf,
    mtp_layer_of,
    tensor_map,
)


def _say(msg: str) -> None:
    print(f"init_from: {msg}", flush=True)


def init_from(
    model: nn.Module,
    cfg: CheckpointConfig,
    *,
    output_dir: str,
    seed: int,
    rank: int = 0,
) -> str | None:
    """Loads `cfg.init_from` into the live model (see the module docstring).

    Returns what was loaded ("hf" or "moeyard"), or None when there is nothing to do (no
    init_from, or a checkpoint in `output_dir` that resume will load).

    Raises:
        ConfigError: init_from is neither kind of checkpoint, or upcycle is asked of a
            moeyard one.
        HFError: a transformers checkpoint that does not fit the preset's model; the message
            names the file and the first tensor or setting that disagrees.
        CheckpointError: a moeyard checkpoint of another model shape.
    """
    if not cfg.init_from:
        return None
    if cfg.resume and scan(output_dir).newest is not None:
        if rank == 0:
            _say(
                f"{output_dir} holds a checkpoint: resuming from it, checkpoint.init_from "
                f"({cfg.init_from}) is not read"
            )
        return None
    kind = checkpoint_kind(cfg.init_from)
    if kind == "moeyard":
        if cfg.upcycle:
            raise ConfigError(
                f"checkpoint.upcycle=true takes a dense transformers checkpoint; "
                f"checkpoint.init_from ({cfg.init_from}) is a moeyard checkpoint"
            )
        url = load_moeyard_weights(model, cfg.init_from)
    else:
        url = cfg.init_from
        load_hf_weights(model, url, upcycle=cfg.upcycle, seed=seed, rank=rank)
    if rank == 0:
        what = "upcycled from" if cfg.upcycle else "weights from"
        _say(f"{what} {url} ({kind}); optimizer fresh, step 0")
    return kind


def checkpoint_kind(url: str) -> str:
    """ "hf" for a directory with config.json, "moeyard" for a complete checkpoint (or a run
    holding one). Raises ConfigError naming checkpoint.init_from otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    if fs.exists(f"{path.rstrip('/')}/{CONFIG}"):
        return "hf"
    try:
        resolve_checkpoint(url)
    except CheckpointError:
        raise ConfigError(
            f"checkpoint.init_from ({url}) is neither a transformers checkpoint (no {CONFIG}) "
            "nor a complete moeyard checkpoint or run directory"
        ) from None
    return "moeyard"


def copy_full_into(target: Tensor, full: Tensor) -> None:
    """Copies the part of the whole tensor `full` that `target` holds: for a DTensor the
    local shard its placements give this rank, else all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
        target.to_local().copy_(full[index])
    else:
        target.copy_(full)


@torch.no_grad()
def load_moeyard_weights(model: nn.Module, url: str) -> str:
    """The model weights (and router biases) of a moeyard checkpoint, nothing else; returns
    the checkpoint used. Raises CheckpointError on another model shape."""
    url = resolve_checkpoint(url)
    md = read_metadata(url)
    check_model_matches(url, md, model)
    dcp.load(model_state(model), storage_reader=RangeReader(url), no_dist=True)
    return url


# --- transformers checkpoints ------------------------------------------------------------

_EXPERT_RE = re.compile(
    r"^(model\.layers\.\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_GATE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}


@dataclass(frozen=True)
class _Where:
    """Where a transformers-layout tensor lies: a file tensor, or one expert's part of
    transformers 5's fused [E, 2F, D] / [E, D, F] expert tensors."""

    name: str
    row: int | None = None
    half: int | None = None  # 0: the gate half of gate_up_proj, 1: the up half

    def shape(self, reader: SafetensorsDir) -> tuple[int, ...]:
        s = reader.shape(self.name)
        if self.row is not None:
            s = s[1:]
        if self.half is not None:
            s = (s[0] // 2, *s[1:])
        return s

    def take(self, t: Tensor) -> Tensor:
        """The part of the tensor read at (name, row)."""
        if self.half is None:
            return t
        F = t.shape[0] // 2
        return t[self.half * F : (self.half + 1) * F]


def _locate(reader: SafetensorsDir, hf_name: str) -> _Where | None:
    if hf_name in reader.entries:
        return _Where(hf_name)
    alt = hf_name.replace(".block_sparse_moe.", ".mlp.")
    if alt in reader.entries:
        return _Where(alt)
    m = _EXPERT_RE.match(hf_name)
    if m is None:
        return None
    layer, _, e, w = m.groups()
    for block in ("mlp", "block_sparse_moe"):
        if w in _GATE:
            fused = f"{layer}.{block}.experts.gate_up_proj"
            if fused in reader.entries:
                return _Where(fused, int(e), 0 if _GATE[w] == "gate" else 1)
        else:
            fused = f"{layer}.{block}.experts.down_proj"
            if fused in reader.entries:
                return _Where(fused, int(e))
    return None


# key (no `model.` prefix) -> where its source lies, and how to make it from that source.
_Plan = dict[str, tuple[_Where, Callable[[Tensor], Tensor]]]


def _need(reader: SafetensorsDir, hf_name: str, want: tuple[int, ...], key: str) -> _Where:
    where = _locate(reader, hf_name)
    if where is None:
        raise HFError(
            f"{reader.url} lacks {hf_name}, which the preset's model.{key} needs (model.* "
            "config differs from the checkpoint's, or the checkpoint is incomplete)"
        )
    have = where.shape(reader)
    if have != want:
        raise HFError(
            f"{reader.url}: tensor {where.name} has shape {have} in the checkpoint, the preset's "
            f"model.{key} needs {want} (model.* config differs from {reader.where})"
        )
    return where


def _plain_plan(
    cfg: ModelConfig, arch: str, reader: SafetensorsDir, shapes: dict, rank: int
) -> tuple[_Plan, list[TensorMap], set[str]]:
    """(the plan, the shared copies the files hold, to check against the loaded tensors,
    and the names left unread on purpose: MTP layers beyond model.mtp.depth).

    Raises:
        HFError: a tensor the preset needs is missing or of another shape, or the preset
            asks for more MTP layers than the files hold.
    """
    held = {d for n in reader.names() if (d := mtp_layer_of(n, cfg, arch)) is not None}
    if cfg.mtp.depth > len(held):
        raise HFError(
            f"model.mtp.depth ({cfg.mtp.depth}) exceeds the MTP layers {reader.url} holds "
            f"({len(held)}, after its {cfg.num_layers} layers)"
        )
    skipped = {
        n
        for n in reader.names()
        if (d := mtp_layer_of(n, cfg, arch)) is not None and d >= cfg.mtp.depth
    }
    if skipped and rank == 0:
        _say(
            f"{reader.url} holds {len(held)} MTP layers; model.mtp.depth is {cfg.mtp.depth}, "
            f"so {len(skipped)} of their tensors are not read"
        )
    plan: _Plan = {}
    copies: list[TensorMap] = []
    for spec in tensor_map(cfg, arch):
        if spec.shared:
            # DeepSeek-V3 checkpoints repeat the embedding and head in each MTP layer; some
            # conversions leave them out (the model shares them).
            if spec.hf in reader.entries:
                copies.append(spec)
            continue
        want = hf_shape(shapes["model." + spec.key], spec)
        where = _need(reader, spec.hf, want, spec.key)
        plan[spec.key] = (where, _from_hf_fn(where, spec, cfg))
    if cfg.tie_embeddings:  # the head is the embedding table
        plan["head.weight"] = plan["embed.weight"]
    return plan, copies, skipped


def _check_copies(
    reader: SafetensorsDir, copies: list[TensorMap], targets: dict[str, Tensor], cfg: ModelConfig
) -> None:
    """Each shared copy equals what was loaded for its key (this rank's part of it).

    Raises:
        HFError: a copy differs: the checkpoint's MTP layers would predict through another
            embedding or head than the model's, which moeyard shares.
    """
    from torch.distributed.tensor import DTensor

    for spec in copies:
        target = targets["model." + spec.key]
        full = from_hf(reader.read(spec.hf), spec, cfg).to(target.dtype)
        mine = torch.empty_like(target)
        copy_full_into(mine, full)
        a = mine.to_local() if isinstance(mine, DTensor) else mine
        b = target.to_local() if isinstance(target, DTensor) else target
        if not torch.equal(a, b.to(a.device)):
            raise HFError(
                f"{reader.url}: {spec.hf} differs from the main model's {spec.key}; moeyard's "
                "MTP modules share the embedding and the head, so the copies must be equal"
            )
        del full, mine


def _from_hf_fn(where: _Where, spec: TensorMap, cfg: ModelConfig) -> Callable[[Tensor], Tensor]:
    return lambda t: from_hf(where.take(t), spec, cfg)


def _upcycle_plan(cfg: ModelConfig, reader: SafetensorsDir, shapes: dict, rank: int) -> _Plan:
    hf, where = reader.config, reader.where
    if cfg.attention != "gqa":
        raise HFError(
            f"checkpoint.upcycle: model.attention={cfg.attention}, but {where} is a dense "
            "grouped-query model; upcycling keeps the attention, so the preset needs "
            "model.attention=gqa"
        )
    moe = cfg.moe
    if moe.num_shared_experts:
        raise HFError(
            f"checkpoint.upcycle with model.moe.num_shared_experts={moe.num_shared_experts}: "
            "upcycling initializes routed experts only; set it to 0"
        )
    theta = _rope(hf, where)
    for key, mine, theirs in (
        ("rope_theta", cfg.rope_theta, theta),
        ("norm_eps", cfg.norm_eps, float(hf.get("rms_norm_eps", 1e-6))),
        ("tie_embeddings", cfg.tie_embeddings, bool(hf.get("tie_word_embeddings", False))),
    ):
        if mine != theirs:
            raise HFError(f"model.{key} ({mine}) differs from {where} ({theirs})")
    window = hf.get("sliding_window")
    if window and int(window) < cfg.max_seq_len and hf.get("use_sliding_window", True):
        raise HFError(
            f"{where}: sliding_window={window} is shorter than model.max_seq_len "
            f"({cfg.max_seq_len}); moeyard attends to the whole sequence"
        )
    inter = int(hf["intermediate_size"])
    if inter % moe.expert_hidden:
        raise HFError(
            f"checkpoint.upcycle: {where} intermediate_size ({inter}) is not a multiple of "
            f"model.moe.expert_hidden ({moe.expert_hidden})"
        )
    G = inter // moe.expert_hidden
    if moe.num_experts % G:
        raise HFError(
            f"checkpoint.upcycle: model.moe.num_experts ({moe.num_experts}) must be a multiple "
            f"of intermediate_size / model.moe.expert_hidden ({G}), the slices of one copy"
        )
    exact = (
        (moe.top_k == moe.num_experts or (moe.norm_topk_prob and moe.top_k > 1))
        and moe.top_k % G == 0
        and (G == 1 or moe.n_group == 1)
        and moe.capacity_factor == 0
    )
    if not exact and rank == 0:
        _say(
            "warning: with these model.moe settings the upcycled model does not start equal to "
            "the dense one (that needs top-k weights that sum to one, top_k a multiple of "
            f"{G}, no group-limited routing when slicing, no capacity drops)"
        )
    plan: _Plan = {}
    dense = tensor_map(_as_dense(cfg), "dense")
    for spec in dense:
        i = _layer_of(spec.key)
        if i is not None and i >= cfg.num_dense_layers and ".ffn." in spec.key:
            continue  # MoE layers' experts are planned below
        want = hf_shape(shapes["model." + spec.key], spec)
        plan[spec.key] = (_need(reader, spec.hf, want, spec.key), _same)
    if cfg.tie_embeddings:
        plan["head.weight"] = plan["embed.weight"]
    F, D = moe.expert_hidden, cfg.dim
    scale = G / moe.route_scale
    for i in range(cfg.num_dense_layers, cfg.num_layers):
        mlp = f"model.layers.{i}.mlp."
        gate = _need(reader, mlp + "gate_proj.weight", (inter, D), f"layers.{i}.ffn.experts")
        up = _need(reader, mlp + "up_proj.weight", (inter, D), f"layers.{i}.ffn.experts")
        down = _need(reader, mlp + "down_proj.weight", (D, inter), f"layers.{i}.ffn.experts")
        for e in range(moe.num_experts):
            s = e % G
            rows = slice(s * F, (s + 1) * F)
            k = f"layers.{i}.ffn.experts.{e}."
            plan[k + "w1"] = (gate, _rows_of(rows))
            plan[k + "w3"] = (up, _rows_of(rows))
            plan[k + "w2"] = (down, _cols_of(rows, scale))
    return plan


def _same(t: Tensor) -> Tensor:
    return t


def _rows_of(rows: slice) -> Callable[[Tensor], Tensor]:
    """[I, D] dense gate/up projection -> one expert's [D, F] slice."""
    return lambda t: t[rows].t().contiguous()


def _cols_of(cols: slice, scale: float) -> Callable[[Tensor], Tensor]:
    """[D, I] dense down projection -> one expert's [F, D] slice, scaled."""
    return lambda t: (t[:, cols] * scale).t().contiguous()


def _as_dense(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every layer dense (the names of the dense checkpoint's tensors)."""
    import dataclasses

    return dataclasses.replace(cfg, num_dense_layers=cfg.num_layers)


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _tied_router(cfg: ModelConfig, layer: int, G: int, seed: int) -> Tensor:
    """[E, D] router weights drawn from the seed, one row per copy repeated over its G
    slices (the same on every rank and layout)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/upcycle/router/{layer}".encode()))
    rows = torch.empty(cfg.moe.num_experts // G, cfg.dim).normal_(0.0, 0.02, generator=g)
    return rows.repeat_interleave(G, dim=0)


# Tensors transformers checkpoints may hold that carry nothing moeyard needs.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _check_unused(reader: SafetensorsDir, plan: _Plan, also: set[str] | None = None) -> None:
    used = {w.name for w, _ in plan.values()} | (also or set())
    for name in reader.names():
        if name in used or _IGNORED.search(name):
            continue
        if name.endswith(".bias"):
            # Qwen2 has q/k/v biases; moeyard's attention has none. Zero biases change
            # nothing, so they pass; any other value would be dropped silently.
            if not bool((reader.read(name) == 0).all()):
                raise HFError(
                    f"{reader.url}: {name} is not zero, and moeyard's projections have no bias"
                )
            continue
        raise HFError(
            f"{reader.url}: tensor {name} has no place in the preset's model (model.* config "
            f"differs from {reader.where})"
        )


@torch.no_grad()
def load_hf_weights(
    model: nn.Module, url: str, *, upcycle: bool = False, seed: int = 0, rank: int = 0
) -> None:
    """Copies a transformers checkpoint into the live model (this rank's part of it).

    Every tensor's shape is checked against the preset's model before any is read, so a
    mismatch fails on every rank alike, naming the first tensor.

    Raises:
        HFError: see `init_from`.
    """
    reader = SafetensorsDir(url)
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    arch = _arch(reader.config, reader.where)
    shapes = global_model_shapes(model)
    if upcycle:
        if arch not in DENSE:
            raise HFError(
                f"checkpoint.upcycle=true takes a dense checkpoint ({', '.join(DENSE)}); "
                f"{reader.where} is {arch}"
            )
        plan = _upcycle_plan(cfg, reader, shapes, rank)
        copies: list[TensorMap] = []
        skipped: set[str] = set()
    else:
        if arch in DENSE:
            raise HFError(
                f"{reader.where} is a dense {arch}: set checkpoint.upcycle=true to start an MoE "
                "from it"
            )
        theirs = model_config_from_hf(reader.config, where=reader.where)
        mine = architecture(cfg)
        if mine != arch:
            raise HFError(f"the preset's model is a {mine}, {reader.where} a {arch}")
        check_semantics(cfg, theirs, where=reader.where)
        plan, copies, skipped = _plain_plan(cfg, arch, reader, shapes, rank)
    _check_unused(reader, plan, {c.hf for c in copies} | skipped)
    targets = model_state(model)
    by_source: dict[tuple[str, int | None], list[tuple[str, Callable[[Tensor], Tensor]]]] = {}
    for key, (where, fn) in plan.items():
        if "model." + key in targets:
            by_source.setdefault((where.name, where.row), []).append((key, fn))
    left = {k for k in targets if k[len("model.") :] not in plan}
    for key in sorted(left):
        # Router biases start at zero; an upcycled router is drawn from the seed.
        if not key.endswith("router.expert_bias") and not (
            upcycle and key.endswith("router.weight")
        ):
            raise HFError(f"{reader.url}: nothing in the checkpoint for the preset's {key}")
    for (name, row), consumers in by_source.items():
        t = reader.read(name, row=row)  # one tensor (or one expert's row) at a time
        for key, fn in consumers:
            copy_full_into(targets["model." + key], fn(t))
        del t
    _check_copies(reader, copies, targets, cfg)
    if upcycle:
        G = int(reader.config["intermediate_size"]) // cfg.moe.expert_hidden
        if G > 1:
            for i in range(cfg.num_dense_layers, cfg.num_layers):
                key = f"model.layers.{i}.ffn.router.weight"
                copy_full_into(targets[key], _tied_router(cfg, i, G, seed))
