"""The one prepared GPU check: everything issue 22 asks of a Hopper GPU, in about 6 minutes.

Parts, each under its own guard (one that fails is recorded with its traceback and the rest
run), in this order:

  env          the device, torch and CUDA, the peak the MFU is taken against, and which
               optional packages are there (torchtitan, transformers, liger-kernel, NVML).
  moe_layer    the MoE layer's forward+backward at both shapes, 8192 tokens, bf16, in
               interleaved rounds: Mixtral (D 4096, F 14336, 8 experts, top-2) and
               DeepSeek-V2-Lite (D 2048, F 1408, 64 experts, top-6). Beside the layer
               (trainer.moe.MoE through its public constructor, bf16 weights): the dense
               SwiGLU of the same active size (hidden = top_k x F, the compute-equal limit),
               the layer with fp32 weights under autocast (how one process ran before this
               round), the layer under torch.compile (compile vs eager), the layer as it was
               before issue 22's layer half (tests/moe_legacy.py, the same weights),
               torchtitan's MoE when it is installed, and transformers' Mixtral block
               (grouped_mm experts).
  grouped_gemm `torch._grouped_mm` TFLOP/s against one dense matmul of the same FLOPs.
  gpu_risks    the MoE path's GPU-only risks: the router fp32 under bf16 autocast, gradients
               with capacity drops against a per-expert reference over the kept pairs (the
               caching allocator dirtied with NaN first), and host syncs of the layer counted
               with torch.cuda.set_sync_debug_mode over several forward+backward passes
               after a warm-up one (budget 0 at EP 1).
  steps        the three presets cut short (Mixtral 2 layers, DeepSeek-V2-Lite 4 layers,
               the 100M preset) through trainer.loop's setup and train_step, in each
               activation-checkpointing mode, FSDP on one rank and one process, eager and
               compiled: tokens/s, MFU, J/token and power from the NVML energy counter (read
               outside the timed steps), peak memory allocated and reserved against the dry
               run (`size_job`), and host syncs per step (counted over several steps after
               a warm-up step). Runs go in order of importance and stop at --budget-s.
  profile      one Mixtral 2-layer step under torch.profiler: GPU time per step by kind
               (expert GEMMs, other GEMMs, attention, permutation and combine, optimizer,
               weight casts and FSDP copies and collectives, the rest).
  loop_energy  a short trainer.loop.run of the 100M preset with telemetry on: the loop's own
               tokens/s, MFU and J/token, and whether the NVML energy counter was read off
               the step's thread (the sampler thread, ops.energy_interval_s).

Writes `gpu_check.log` (everything printed) and `gpu_check.json` (every part's rows, its
status and time) to --out (default $OUT, else ./gpu_check_out).

    python bench/gpu_check.py                      # on a CUDA GPU; exits 2 without one
    python bench/gpu_check.py --parts moe_layer,profile --budget-s 200
    python bench/gpu_check.py --cpu-smoke          # every part, tiny, on the CPU: checks
                                                   # the script, measures nothing

On an offline GPU node it needs, beyond torch: moeyard's own dependencies (`pip install .`:
omegaconf, fsspec, pyarrow, PyYAML, numpy and the rest of pyproject.toml's list) and
nvidia-ml-py (NVML, for energy and power); optional: transformers (the Mixtral block),
torchtitan (its MoE) and liger-kernel (train.loss_kernel=liger). Carry them as wheels: on a
machine with network, `pip wheel -w wheels . nvidia-ml-py transformers torchtitan
liger-kernel` (drop torch and the nvidia-* CUDA wheels from wheels/ when the node has its
torch), then on the node `pip install --no-index --find-links wheels moeyard nvidia-ml-py
transformers torchtitan liger-kernel`. The env part lists what it found.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ROOT / "infra" / "runs"

PARTS = (
    "env",
    "moe_layer",
    "grouped_gemm",
    "gpu_risks",
    "steps",
    "profile",
    "loop_energy",
)

# The MoE layer shapes of the issue, and the tokens of one micro-batch (2 x 4096).
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(dim=4096, hidden=14336, experts=8, top_k=2, norm_topk_prob=True),
    "deepseek-v2-lite": dict(dim=2048, hidden=1408, experts=64, top_k=6, norm_topk_prob=False),
}
TOKENS = 8192
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "coarse": dict(dim=64, hidden=128, experts=8, top_k=2, norm_topk_prob=True),
    "fine": dict(dim=64, hidden=32, experts=16, top_k=4, norm_topk_prob=False),
}


# --- the report: a log, tables, a JSON file ---------------------------------------------


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of `rows` (dicts) under `columns`; floats to 3 significant digits
    (4 for values of 100 and more), a missing value as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if math.isnan(v):
                return "nan"
            return f"{v:.4g}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


class Report:
    """Prints to stdout and to `gpu_check.log`; keeps every part's results for the JSON."""

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self._log = open(out_dir / "gpu_check.log", "w")  # noqa: SIM115 (closed in close())
        self.results: dict[str, Any] = {"parts": {}, "started": time.time()}
        self._current: dict[str, Any] | None = None

    def log(self, msg: str = "") -> None:
        print(msg, flush=True)
        self._log.write(msg + "\n")
        self._log.flush()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[dict[str, Any]]:
        """Runs a part under its own guard: an exception is logged with its traceback and
        recorded as the part's status, and the check goes on."""
        entry: dict[str, Any] = {"status": "running", "tables": {}, "notes": []}
        self.results["parts"][name] = entry
        self._current = entry
        self.log(f"\n=== {name}")
        t0 = time.perf_counter()
        try:
            yield entry
            entry["status"] = "ok"
        except Exception as e:  # each part on its own: one failure leaves the rest
            entry["status"] = "error"
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()
            self.log(f"part {name} FAILED: {entry['error']}")
            self.log(entry["traceback"])
        finally:
            entry["seconds"] = time.perf_counter() - t0
            self.log(f"({name}: {entry['status']}, {entry['seconds']:.1f} s)")
            self._current = None
            self.save()

    def note(self, msg: str) -> None:
        self.log(msg)
        if self._current is not None:
            self._current["notes"].append(msg)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
        self.log(f"\n{title}")
        self.log(format_table(columns, rows))
        if self._current is not None:
            self._current["tables"][title] = {"columns": list(columns), "rows": list(rows)}

    def save(self) -> None:
        with open(self.out_dir / "gpu_check.json", "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    def close(self) -> None:
        self.results["seconds"] = time.time() - self.results["started"]
        self.save()
        self._log.close()


class Budget:
    """Seconds left of the check's time budget."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


# --- timing ------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], dev: torch.device) -> float:
    """Milliseconds of one call of `fn`: CUDA events on a GPU, the wall clock elsewhere."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved_ms(
    fns: dict[str, Callable[[], object]], dev: torch.device, *, warmup: int, rounds: int
) -> dict[str, float]:
    """Median milliseconds of each function over `rounds` interleaved rounds (each round
    runs every function once, so drifts of clock and temperature fall on all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(time_ms(fn, dev))
    return {k: statistics.median(v) for k, v in times.items()}


# What sync debug mode says at a synchronizing operation (c10/cuda). Its other warning,
# "Synchronization debug mode is a prototype feature ...", comes once per process at the
# first set_sync_debug_mode call and is no sync: counted by a match on "synchroniz", it was
# the one "first-call sync" of the first H200 run.
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(message: str) -> bool:
    """Whether a warning's message is sync debug mode reporting a synchronizing operation."""
    return SYNC_WARNING in message


def count_syncs(fn: Callable[[], object], *, repeats: int) -> tuple[float, list[str]]:
    """Host syncs per call of `fn`, counted with torch.cuda.set_sync_debug_mode("warn") over
    `repeats` calls after a warm-up call (first calls sync for reasons of their own: lazy
    initialization, the allocator, autotuning). Returns (syncs per call, where they were)."""
    fn()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(repeats):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if is_sync_warning(str(w.message))]
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    return len(syncs) / repeats, where


# --- the profile's kinds -------------------------------------------------------------------

KINDS = (
    "expert GEMMs",
    "other GEMMs",
    "attention",
    "permutation and combine",
    "optimizer",
    "weight casts, FSDP copies and collectives",
    "the rest",
)

# Contexts that own every op under them, whatever the op (checked from the op up to the root).
_CONTEXT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimizer", ("optimizer.step", "optimizer.zero_grad", "adamw.step", "clip_grad_norm")),
    (
        "weight casts, FSDP copies and collectives",
        (
            "fsdp::",
            "nccl",
            "c10d",
            "all_gather",
            "reduce_scatter",
            "all_reduce",
            "allreduce",
            "allgather",
            "_chunk_cat",
            "split_with_sizes_copy",
            "_foreach_copy_",
        ),
    ),
)
# Ops classified by their own name.
_OP_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert GEMMs", ("_grouped_mm",)),
    (
        "attention",
        (
            "scaled_dot_product",
            "flash_attention",
            "efficient_attention",
            "cudnn_attention",
            "_flash_attn",
            "_efficient_attention",
        ),
    ),
    ("other GEMMs", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm")),
    ("optimizer", ("_fused_adam", "_foreach_", "aten::_fused_")),
    (
        "permutation and combine",
        (
            "sort",
            "topk",
            "gather",
            "scatter",
            "index_select",
            "aten::index",
            "index_put",
            "index_add",
            "embedding_bag",
            "histc",
            "bincount",
            "repeat_interleave",
            "searchsorted",
            "take_along_dim",
            "masked_scatter",
            # The combine's custom ops and Triton kernels (moeyard::swiglu is "the rest",
            # as aten::silu and aten::mul were).
            "moeyard::combine",
            "_combine_fwd_kernel",
            "_combine_bwd_kernel",
            "all_to_all",
            "ep_dispatch",
            "ep_exchange",
        ),
    ),
)


def classify(chain: Sequence[str]) -> str:
    """The kind of one op's GPU time. `chain`: the op's name, then its parents' up to the
    root (profiler ranges and ops alike).

    A context anywhere in the chain wins (an optimizer step, an FSDP range, a collective, a
    weight cast: whatever ops run inside it are its cost); else the nearest name that says
    what it is (a GEMM, attention, the routing's sorts, gathers and scatters); else the rest.
    """
    low = [n.lower() for n in chain]
    for kind, needles in _CONTEXT_RULES:
        if any(any(k in n for k in needles) for n in low):
            return kind
    for n in low:
        for kind, needles in _OP_RULES:
            if any(k in n for k in needles):
                return kind
    return "the rest"


def breakdown(events: Sequence[Any], *, time_attr: str) -> dict[str, float]:
    """Microseconds by kind: each event's own time (`time_attr`: self_device_time_total on a
    GPU, self_cpu_time_total on the CPU), classified by its chain of parents. Every kernel is
    counted once, under the op that launched it."""
    out = dict.fromkeys(KINDS, 0.0)
    for ev in events:
        t = float(getattr(ev, time_attr, 0.0) or 0.0)
        if t <= 0:
            continue
        chain, node = [], ev
        while node is not None:
            chain.append(node.name)
            node = getattr(node, "cpu_parent", None)
        out[classify(chain)] += t
    return out


# --- builders --------------------------------------------------------------------------------


def _moe_cfg(shape: dict[str, Any]):
    from trainer.config import MoEConfig

    return MoEConfig(
        num_experts=shape["experts"],
        top_k=shape["top_k"],
        expert_hidden=shape["hidden"],
        norm_topk_prob=shape["norm_topk_prob"],
        aux_loss_coef=0.01,
    )


def _init_(module: torch.nn.Module, std: float = 0.02, dtype: torch.dtype | None = None) -> Any:
    """Draws every parameter from N(0, std) and casts the parameters (not the buffers: the
    router's counters and bias stay fp32) to `dtype`."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
            if dtype is not None:
                p.data = p.data.to(dtype)
    return module


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> Any:
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.to(dtype)
    return module


def legacy_moe(moe: Any, shape: dict[str, Any], dev: torch.device) -> tuple[Any, str]:
    """The layer as it was before issue 22's layer half (tests/moe_legacy.py: w1 and w3 in two
    grouped GEMMs, SwiGLU by autograd, the combine as K gathers) with `moe`'s weights, bf16;
    or (None, why not) where the repository's tests/ folder is not there."""
    try:
        from tests.moe_legacy import LegacyMoE
    except ImportError as e:
        return None, f"tests/moe_legacy.py not importable ({e})"
    legacy = LegacyMoE(shape["dim"], _moe_cfg(shape)).to(dev)
    legacy.load_from(moe)
    return _cast(legacy, torch.bfloat16).train(), "tests/moe_legacy.py, the same weights"


def titan_moe(shape: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """torchtitan's MoE at this shape (no shared expert, softmax scores, grouped GEMM), or
    (None, why not). torchtitan has moved its MoE between releases; the known places are
    tried in turn and each miss is reported."""
    try:
        tt = importlib.import_module("torchtitan")
    except ImportError as e:
        return None, f"torchtitan not installed ({e})"
    version = getattr(tt, "__version__", "?")
    misses = []
    for mod_name in ("torchtitan.models.moe", "torchtitan.models.moe.moe"):
        try:
            mod = importlib.import_module(mod_name)
            args = mod.MoEArgs(
                num_experts=shape["experts"],
                num_shared_experts=0,
                score_func="softmax",
                route_norm=shape["norm_topk_prob"],
                score_before_experts=False,
                top_k=shape["top_k"],
                use_grouped_mm=True,
                load_balance_coeff=None,
            )
            m = mod.MoE(args, dim=shape["dim"], hidden_dim=shape["hidden"])
            m.to(dev)
            if hasattr(m, "init_weights"):
                m.init_weights(init_std=0.02, buffer_device=dev)
            return _init_(m, dtype=dtype) if not hasattr(m, "init_weights") else _cast(m, dtype), (
                f"torchtitan {version} ({mod_name})"
            )
        except Exception as e:  # an API of another release: say so, try the next
            misses.append(f"{mod_name}: {type(e).__name__}: {e}")
    return None, f"torchtitan {version} installed, its MoE not built: " + "; ".join(misses)


def hf_mixtral_block(
    shape: dict[str, Any], dev: torch.device, dtype: torch.dtype
) -> tuple[Any, str]:
    """transformers' Mixtral sparse MoE block at this shape, its experts on grouped_mm."""
    try:
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        return None, f"transformers not installed ({e})"
    cfg = MixtralConfig(
        hidden_size=shape["dim"],
        intermediate_size=shape["hidden"],
        num_local_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"],
    )
    cfg._experts_implementation = "grouped_mm"
    with torch.device(dev):
        block = MixtralSparseMoeBlock(cfg)
    return _init_(block, dtype=dtype), f"transformers {transformers.__version__} (grouped_mm)"


def _moe_step(
    layer: Any, x: torch.Tensor, grad: torch.Tensor, *, autocast: bool = False
) -> Callable[[], None]:
    """One forward+backward of a moeyard MoE layer on x [T, D] (the aux loss included)."""

    def run() -> None:
        xi = x.detach().requires_grad_()
        ctx = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if autocast
            else contextlib.nullcontext()
        )
        with ctx:
            out, losses = layer(xi.unsqueeze(0))
        torch.autograd.backward(
            [out.squeeze(0), losses.aux_loss], [grad, torch.ones_like(losses.aux_loss)]
        )

    return run


def _plain_step(
    layer: Any, x: torch.Tensor, grad: torch.Tensor, shape_in: Callable[[torch.Tensor], Any]
) -> Callable[[], None]:
    """One forward+backward of a layer that returns one tensor of x's elements."""

    def run() -> None:
        xi = x.detach().requires_grad_()
        out = layer(shape_in(xi))
        out.reshape(x.shape).backward(grad)

    return run


def moe_layer_part(
    rep: Report, dev: torch.device, *, shapes: dict[str, dict[str, Any]], tokens: int, rounds: int
) -> None:
    from trainer.moe import MoE, SwiGLU

    bf16 = torch.bfloat16
    for name, sh in shapes.items():
        D, F, E, K = sh["dim"], sh["hidden"], sh["experts"], sh["top_k"]
        torch.manual_seed(0)
        x = torch.randn(tokens, D, device=dev, dtype=bf16)
        grad = torch.randn(tokens, D, device=dev, dtype=bf16)
        moe = _init_(MoE(D, _moe_cfg(sh)).to(dev), dtype=bf16)
        moe_fp32 = _init_(MoE(D, _moe_cfg(sh)).to(dev))
        dense = _init_(SwiGLU(D, K * F).to(dev), dtype=bf16)
        for m in (moe, moe_fp32):
            m.train()

        fns: dict[str, Callable[[], None]] = {
            "dense-active": _plain_step(dense, x, grad, lambda t: t),
            "moeyard": _moe_step(moe, x, grad),
            "moeyard, fp32 weights under autocast": _moe_step(moe_fp32, x, grad, autocast=True),
        }
        where: dict[str, str] = {}
        legacy, why = legacy_moe(moe, sh, dev)
        where["moeyard before issue 22's layer half"] = why
        if legacy is not None:
            fns["moeyard, legacy layer"] = _moe_step(legacy, x, grad)
        tt, why = titan_moe(sh, dev, bf16)
        where["torchtitan"] = why
        if tt is not None:
            fns["torchtitan"] = _plain_step(tt, x, grad, lambda t: t.unsqueeze(0))
        hf, why = hf_mixtral_block(sh, dev, bf16)
        where["transformers Mixtral block"] = why
        if hf is not None:
            fns["transformers Mixtral block"] = _plain_step(hf, x, grad, lambda t: t.unsqueeze(0))
        if dev.type == "cuda":
            fns["moeyard, torch.compile"] = _moe_step(torch.compile(moe), x, grad)
            fns["dense-active, torch.compile"] = _plain_step(
                torch.compile(dense), x, grad, lambda t: t
            )
        for k, v in where.items():
            rep.note(f"{name}: {k}: {v}")
        ms = interleaved_ms(fns, dev, warmup=2, rounds=rounds)
        flops = 6.0 * tokens * 3 * D * K * F  # forward + backward of the active expert matmuls
        rows = [
            {
                "layer": k,
                "ms": t,
                "TFLOP/s": flops / t / 1e9,
                "x dense": t / ms["dense-active"],
                "x torchtitan": t / ms["torchtitan"] if "torchtitan" in ms else None,
            }
            for k, t in ms.items()
        ]
        rep.table(
            f"MoE layer fwd+bwd, {name}: D {D}, F {F}, {E} experts, top-{K}, {tokens} tokens, "
            f"bf16, median of {rounds} interleaved rounds",
            ["layer", "ms", "TFLOP/s", "x dense", "x torchtitan"],
            rows,
        )
        del moe, moe_fp32, dense, fns, tt, hf, legacy
        _free(dev)


def grouped_gemm_part(rep: Report, dev: torch.device, *, small: bool) -> None:
    experts, per_expert, dim, hidden = (4, 64, 64, 32) if small else (64, 1536, 2048, 768)
    dtype = torch.bfloat16
    rows_total = experts * per_expert
    x = torch.randn(rows_total, dim, device=dev, dtype=dtype)
    w = torch.randn(experts, dim, hidden, device=dev, dtype=dtype)
    offs = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * per_expert
    w_dense = torch.randn(dim, hidden, device=dev, dtype=dtype)
    flops = 2.0 * rows_total * dim * hidden
    ms = interleaved_ms(
        {
            "grouped": lambda: torch._grouped_mm(x, w, offs=offs),
            "dense": lambda: x @ w_dense,
        },
        dev,
        warmup=3,
        rounds=20,
    )
    rep.table(
        f"grouped GEMM bf16 ({experts} groups x {per_expert} rows, {dim} x {hidden})",
        ["kernel", "ms", "TFLOP/s", "x dense"],
        [
            {"kernel": k, "ms": t, "TFLOP/s": flops / t / 1e9, "x dense": t / ms["dense"]}
            for k, t in ms.items()
        ],
    )


def _kept_by_affinity(
    ids_TK: torch.Tensor, scores_TK: torch.Tensor, E: int, cap: int
) -> torch.Tensor:
    """Per expert, its cap highest-scoring pairs (ties: lower token first), as a [T, K] mask;
    written independently of trainer.moe.drop_overflow."""
    keep = torch.zeros_like(ids_TK, dtype=torch.bool)
    flat_ids, flat_scores, flat_keep = ids_TK.reshape(-1), scores_TK.reshape(-1), keep.view(-1)
    for e in range(E):
        pairs = torch.nonzero(flat_ids == e).squeeze(1)
        best = torch.argsort(flat_scores[pairs], descending=True, stable=True)[:cap]
        flat_keep[pairs[best]] = True
    return keep


def gpu_risks_part(rep: Report, dev: torch.device, *, small: bool) -> None:
    import torch.nn.functional as F

    from trainer.config import MoEConfig
    from trainer.moe import MoE, capacity

    T, D = (256, 64) if small else (8192, 1024)
    cfg = MoEConfig(
        num_experts=16,
        top_k=4,
        expert_hidden=64 if small else 512,
        capacity_factor=1.0,
        aux_loss_coef=0.01,
    )
    torch.manual_seed(0)
    moe = MoE(D, cfg).to(dev)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
        moe.router.weight.normal_(0, 0.5)  # an uneven router, so that capacity drops
    moe.train()
    x = torch.randn(T, D, device=dev)
    rows: list[dict[str, Any]] = []

    with torch.autocast(dev.type, dtype=torch.bfloat16):
        r = moe.router(x)
    dtypes = {n: getattr(r, n).dtype for n in ("logits_TE", "scores_TE", "weights_TK")}
    rows.append(
        {
            "check": "router under bf16 autocast",
            "result": "fp32" if all(d == torch.float32 for d in dtypes.values()) else "NOT fp32",
            "notes": ", ".join(f"{n} {str(d).removeprefix('torch.')}" for n, d in dtypes.items()),
        }
    )

    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        grad_out = torch.randn(T, D, device=dev)
        if dev.type == "cuda":
            for n in (1 << 20, 1 << 22, 1 << 24):  # dirty the allocator's blocks with NaN
                torch.full((n,), float("nan"), device=dev)
        xa = x.clone().requires_grad_()
        out, _ = moe(xa.unsqueeze(0))
        (out[0] * grad_out).sum().backward()
        w13_grad = moe.experts.w13.grad.clone()
        moe.zero_grad()
        xb = x.clone().requires_grad_()
        rr = moe.router(xb)
        keep = _kept_by_affinity(rr.ids_TK, rr.scores_TK, cfg.num_experts, capacity(T, cfg))
        ex = moe.experts
        ref = torch.zeros_like(xb)
        for e in range(cfg.num_experts):
            tok, k = torch.nonzero((rr.ids_TK == e) & keep, as_tuple=True)
            h = F.silu(xb[tok] @ ex.w1[e]) * (xb[tok] @ ex.w3[e])
            ref = ref.index_add(0, tok, (h @ ex.w2[e]) * rr.weights_TK[tok, k, None])
        (ref * grad_out).sum().backward()
        finite = bool(torch.isfinite(xa.grad).all()) and bool(torch.isfinite(w13_grad).all())
        err_x = ((xa.grad - xb.grad).abs().max() / xb.grad.abs().max()).item()
        err_w = ((w13_grad - ex.w13.grad).abs().max() / ex.w13.grad.abs().max()).item()
        dropped = int((~keep).sum())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    rows.append(
        {
            "check": f"gradients with drops ({dropped} of {T * cfg.top_k} pairs dropped)",
            "result": ("finite" if finite else "NON-FINITE")
            + f", rel err x {err_x:.1e} w13 {err_w:.1e}",
            "notes": "against a per-expert loop over the kept pairs (fp32, TF32 off); want < 1e-4",
        }
    )
    if dev.type == "cuda":
        for cf in (0.0, 1.0):
            moe.cfg.capacity_factor = cf

            def layer_step() -> None:
                xs = x.clone().requires_grad_()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out, losses = moe(xs.unsqueeze(0))
                (out.float().sum() + losses.aux_loss).backward()

            per, where = count_syncs(layer_step, repeats=4)
            rows.append(
                {
                    "check": f"host syncs per MoE layer fwd+bwd at EP 1, capacity_factor {cf:g}",
                    "result": f"{per:g}",
                    "notes": "budget 0 (after a warm-up pass, over 4)"
                    + (f"; at {', '.join(where)}" if where else ""),
                }
            )
        moe.cfg.capacity_factor = 1.0
    else:
        rows.append(
            {"check": "host syncs (set_sync_debug_mode)", "result": "skipped", "notes": "CUDA only"}
        )
    rep.table("the MoE path's GPU-only risks", ["check", "result", "notes"], rows)


# --- training steps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSpec:
    """One shortened training step to measure."""

    preset: str  # infra/runs/<preset>.yaml
    layers: int
    fsdp: bool  # FSDP on a one-rank process group, else one process
    ac: str  # train.activation_checkpoint
    compile: bool = False
    grad_accum: int = 4
    syncs: bool = False  # also count host syncs per step
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        short = {"mixtral-8x7b-h200-2x8": "Mixtral", "deepseek-v2-lite-h200-1x8": "DSV2-Lite"}
        name = short.get(self.preset, self.preset)
        where = "FSDP 1 rank" if self.fsdp else "one process"
        comp = ", compile" if self.compile else ""
        return f"{name} {self.layers}L, {where}, {self.ac}{comp}, ga {self.grad_accum}"


MIXTRAL, DSV2L, M100 = "mixtral-8x7b-h200-2x8", "deepseek-v2-lite-h200-1x8", "moe-100m-1gpu"
# In order of importance: the check stops adding runs at its time budget.
STEP_SPECS: tuple[StepSpec, ...] = (
    StepSpec(MIXTRAL, 2, True, "selective", syncs=True),
    StepSpec(DSV2L, 4, True, "selective", syncs=True),
    StepSpec(MIXTRAL, 2, False, "selective", syncs=True),
    StepSpec(MIXTRAL, 2, True, "none"),
    StepSpec(MIXTRAL, 2, True, "full"),
    StepSpec(DSV2L, 4, True, "none"),
    StepSpec(DSV2L, 4, True, "full"),
    StepSpec(M100, 12, False, "none", grad_accum=1),
    StepSpec(M100, 12, True, "none", grad_accum=1),
    StepSpec(MIXTRAL, 2, True, "selective", grad_accum=1),
    StepSpec(MIXTRAL, 2, True, "selective", compile=True),
    StepSpec(DSV2L, 4, True, "selective", compile=True),
    StepSpec(M100, 12, False, "none", compile=True, grad_accum=1),
)
SMOKE_SPECS: tuple[StepSpec, ...] = (
    StepSpec("tiny", 2, True, "selective", grad_accum=2, syncs=True),
    StepSpec("tiny", 2, False, "none", grad_accum=2),
    StepSpec("tiny", 2, True, "full", grad_accum=2),
)


def step_overrides(spec: StepSpec, out: str, *, small: bool) -> list[str]:
    o = [
        f"model.num_layers={spec.layers}",
        f"train.grad_accum={spec.grad_accum}",
        "train.global_batch_size=0",
        f"train.activation_checkpoint={spec.ac}",
        f"train.compile={str(spec.compile).lower()}",
        "parallel.ep=1",
        "parallel.world_size=0",
        "data.source=corpus",
        "ops.telemetry=false",
        "ops.stdout=false",
        "checkpoint.every=0",
        f"run.output_dir={out}",
        *spec.extra,
    ]
    if small:
        o += ["train.device=cpu", "data.corpus_max_bytes=100000"]
    else:
        # Large vocabularies: the loss in chunks (the whole micro-batch's fp32 logits would
        # be 11 GiB at DeepSeek-V2-Lite's 102400 entries).
        o += ["train.loss_chunk_tokens=2048"]
    return o


@contextlib.contextmanager
def fast_init() -> Iterator[None]:
    """Draws the weights on their device instead of trainer.model's layout-independent CPU
    draw (which takes tens of seconds for a few billion parameters): the speed of a step
    does not depend on the draw, the check's time does."""
    import trainer.model as tm

    real = tm.init_weights

    @torch.no_grad()
    def on_device(model: Any, seed: int) -> None:
        from trainer.layers import RMSNorm

        torch.manual_seed(seed)
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                t = tm.local_of(p)
                if isinstance(mod, RMSNorm) or name.endswith("norm_weight"):
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, 0.02)
        for moe in model.moe_layers():
            moe.router.expert_bias.zero_()
            moe.routed_E.zero_()
            moe.dropped.zero_()
        cfg = model.cfg
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        cos, sin = tm.rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)

    tm.init_weights = on_device  # type: ignore[assignment]
    try:
        yield
    finally:
        tm.init_weights = real  # type: ignore[assignment]


@contextlib.contextmanager
def one_rank_group(dev: torch.device, store_dir: str) -> Iterator[None]:
    """A one-rank process group, so that trainer.loop's setup applies FSDP on one device."""
    import torch.distributed as dist

    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    kw: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(
        "nccl" if dev.type == "cuda" else "gloo", store=store, rank=0, world_size=1, **kw
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class EnergyMeter:
    """The GPU's NVML energy counter, read around a timed span (not inside it)."""

    def __init__(self, dev: torch.device) -> None:
        self.sampler = None
        self.reason = "CPU: no GPU energy counter"
        if dev.type == "cuda":
            from ops.nvml import GpuSampler

            s = GpuSampler(str(torch.cuda.get_device_properties(dev).uuid))
            self.sampler = s if s.available else None
            self.reason = s.reason

    def mark(self) -> dict[str, Any]:
        return self.sampler.read() if self.sampler is not None else {}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def step_run(
    spec: StepSpec, dev: torch.device, meter: EnergyMeter, *, steps: int, small: bool
) -> dict[str, Any]:
    """Sets up `spec` through trainer.loop and times `steps` steps after a warm-up one."""
    from ops.metrics import resolve_peak_tflops
    from trainer.config import load_config
    from trainer.dryrun import size_job
    from trainer.flops import flops_per_token
    from trainer.loop import setup

    with tempfile.TemporaryDirectory() as tmp:
        preset = RUNS / f"{spec.preset}.yaml"
        cfg = load_config(
            preset, step_overrides(spec, f"{tmp}/run", small=small), ignore_sections=("cluster",)
        )
        estimate = size_job(cfg, world_size=1).memory.total
        with contextlib.ExitStack() as stack:
            if spec.fsdp:
                stack.enter_context(one_rank_group(dev, tmp))
            with fast_init():
                state = setup(cfg)
            try:
                row = _time_steps(spec, state, dev, meter, steps=steps)
            finally:
                state.source.close()
        tokens_step = cfg.train.seq_len * cfg.train.micro_batch_size * cfg.train.grad_accum
        tps = tokens_step * steps / row["seconds"]
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
        peak = resolve_peak_tflops(0.0, name)
        fpt = flops_per_token(cfg.model, cfg.train.seq_len)
        row.update(
            {
                "run": spec.label,
                "tokens/s": tps,
                "MFU %": 100 * tps * fpt / (peak * 1e12) if peak else None,
                "dry run GiB": estimate / 2**30,
            }
        )
        if "energy_j" in row:
            row["mJ/token"] = 1e3 * row["energy_j"] / (tokens_step * steps)
            row["W"] = row["energy_j"] / row["seconds"]
        return row


def _time_steps(
    spec: StepSpec, state: Any, dev: torch.device, meter: EnergyMeter, *, steps: int
) -> dict[str, Any]:
    from trainer.loop import train_step

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    train_step(state)  # warm-up: the optimizer's state, the allocator, kernel choices
    if spec.compile:
        train_step(state)  # the compiled graphs' second pass settles too
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    meter.mark()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(state)
    sync()
    seconds = time.perf_counter() - t0
    energy = meter.mark()
    row: dict[str, Any] = {"seconds": seconds, "step ms": 1e3 * seconds / steps}
    if "energy_j" in energy:
        row["energy_j"] = energy["energy_j"]
    if dev.type == "cuda":
        row["alloc GiB"] = torch.cuda.max_memory_allocated(dev) / 2**30
        row["reserved GiB"] = torch.cuda.max_memory_reserved(dev) / 2**30
        if spec.syncs:
            per, where = count_syncs(lambda: train_step(state), repeats=3)
            row["syncs/step"] = per
            row["sync sites"] = ", ".join(where)
    return row


def steps_part(
    rep: Report,
    dev: torch.device,
    budget: Budget,
    *,
    specs: Sequence[StepSpec],
    steps: int,
    small: bool,
) -> None:
    meter = EnergyMeter(dev)
    if meter.sampler is None:
        rep.note(f"energy not measured: {meter.reason}")
    rows = []
    try:
        for spec in specs:
            # A compiled run costs its compilation too; other runs a set-up and a few steps.
            need = 90.0 if spec.compile else 20.0
            if not small and budget.left() < need:
                rows.append(
                    {
                        "run": spec.label,
                        "error": f"skipped: {budget.left():.0f} s of the budget left",
                    }
                )
                continue
            try:
                rows.append(step_run(spec, dev, meter, steps=steps, small=small))
            except Exception as e:  # one run's failure leaves the others
                rows.append(
                    {
                        "run": spec.label,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    }
                )
                rep.log(traceback.format_exc())
            finally:
                if spec.compile:
                    torch._dynamo.reset()
                _free(dev)
            rep.log(f"  {rows[-1]}")
    finally:
        meter.close()
    rep.table(
        f"shortened steps ({steps} timed steps after a warm-up one; energy, power and peak "
        "memory over the timed steps; dry run = size_job's peak estimate)",
        [
            "run",
            "step ms",
            "tokens/s",
            "MFU %",
            "mJ/token",
            "W",
            "alloc GiB",
            "reserved GiB",
            "dry run GiB",
            "syncs/step",
            "error",
        ],
        rows,
    )
    sites = {r["run"]: r["sync sites"] for r in rows if r.get("sync sites")}
    for run, where in sites.items():
        rep.note(f"host syncs of '{run}' at: {where}")


def profile_part(rep: Report, dev: torch.device, *, small: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    from trainer.config import load_config
    from trainer.loop import setup, train_step

    spec = SMOKE_SPECS[0] if small else StepSpec(MIXTRAL, 2, True, "selective", grad_accum=2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            RUNS / f"{spec.preset}.yaml",
            step_overrides(spec, f"{tmp}/run", small=small),
            ignore_sections=("cluster",),
        )
        with one_rank_group(dev, tmp), fast_init():
            state = setup(cfg)
            try:
                train_step(state)
                train_step(state)
                activities = [ProfilerActivity.CPU] + (
                    [ProfilerActivity.CUDA] if dev.type == "cuda" else []
                )
                with profile(activities=activities) as prof:
                    train_step(state)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
            finally:
                state.source.close()
    attr = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    by_kind = breakdown(prof.events(), time_attr=attr)
    total = sum(by_kind.values()) or 1.0
    rep.table(
        f"one step of {spec.label}, {'GPU' if dev.type == 'cuda' else 'CPU'} time by kind (torch.profiler)",
        ["kind", "ms", "share %"],
        [{"kind": k, "ms": v / 1e3, "share %": 100 * v / total} for k, v in by_kind.items()]
        + [{"kind": "total", "ms": total / 1e3, "share %": 100.0}],
    )


def loop_energy_part(rep: Report, dev: torch.device, *, small: bool) -> None:
    """trainer.loop.run with telemetry on; the energy counter's reads by thread."""
    import ops.nvml as nvml_mod
    from ops.sinks import read_metrics
    from trainer.config import load_config
    from trainer.loop import run

    main = threading.get_ident()
    reads = {"main": 0, "other": 0}
    real = nvml_mod.GpuSampler._read_energy_counter

    def counted(self: Any) -> int | None:
        reads["main" if threading.get_ident() == main else "other"] += 1
        return real(self)

    nvml_mod.GpuSampler._read_energy_counter = counted  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as out:
            preset = RUNS / ("tiny.yaml" if small else f"{M100}.yaml")
            ov = [
                f"run.output_dir={out}",
                "train.steps=6" if small else "train.steps=60",
                "run.log_every=2" if small else "run.log_every=10",
                "ops.stdout=false",
                "checkpoint.every=0",
                "parallel.world_size=0",
            ]
            if small:
                ov += ["train.device=cpu", "parallel.ep=1", "data.corpus_max_bytes=100000"]
            cfg = load_config(preset, ov, ignore_sections=("cluster",))
            with fast_init():
                run(cfg)
            records = read_metrics(f"{out}/metrics.jsonl")
    finally:
        nvml_mod.GpuSampler._read_energy_counter = real  # type: ignore[method-assign]
    steady = records[1:] or records
    cost = nvml_read_cost(dev)

    def med(key: str) -> float | None:
        vals = [r[key] for r in steady if key in r]
        return statistics.median(vals) if vals else None

    mfu = med("mfu")
    jpt = med("energy_per_token_j")
    power = [d["power_w"] for r in steady for d in r.get("devices", ()) if "power_w" in d]
    rep.table(
        f"trainer.loop.run, {'tiny' if small else '100M'} preset, telemetry on (the loop's own records)",
        [
            "tokens/s",
            "MFU %",
            "mJ/token",
            "W",
            "energy reads on the step's thread",
            "on the sampler thread",
        ],
        [
            {
                "tokens/s": med("tokens_per_s"),
                "MFU %": 100 * mfu if mfu is not None else None,
                "mJ/token": 1e3 * jpt if jpt is not None else None,
                "W": statistics.median(power) if power else None,
                # The one on the step's thread is the baseline, taken before the first step.
                "energy reads on the step's thread": reads["main"],
                "on the sampler thread": reads["other"],
            }
        ],
    )
    if cost:
        rep.table(
            "NVML reads: what a logged step pays (the sampler's read with the energy counter on "
            "its thread) against the energy call itself; medians",
            ["read", "us"],
            [{"read": k, "us": v} for k, v in cost.items()],
        )


def nvml_read_cost(dev: torch.device) -> dict[str, float]:
    """Microseconds of GpuSampler.read() on the step's thread (energy on the sampler thread)
    and of the energy counter call itself; empty without a GPU or NVML."""
    if dev.type != "cuda":
        return {}
    from ops.nvml import GpuSampler

    s = GpuSampler(str(torch.cuda.get_device_properties(dev).uuid), energy_interval_s=0.1)
    if not s.available:
        return {}
    try:
        s.read()

        def med_us(fn: Callable[[], object], n: int) -> float:
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return 1e6 * statistics.median(ts)

        return {
            "GpuSampler.read() at a logged step": med_us(s.read, 100),
            "nvmlDeviceGetTotalEnergyConsumption": med_us(s._read_energy_counter, 20),
        }
    finally:
        s.close()


def env_part(rep: Report, dev: torch.device) -> None:
    from ops.metrics import resolve_peak_tflops

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = [
        {"what": "device", "value": name},
        {"what": "torch", "value": torch.__version__},
        {"what": "CUDA", "value": torch.version.cuda},
        {"what": "peak bf16 TFLOP/s (MFU's reference)", "value": resolve_peak_tflops(0.0, name)},
    ]
    for pkg in ("pynvml", "transformers", "torchtitan", "liger_kernel", "triton"):
        try:
            mod = importlib.import_module(pkg)
            rows.append({"what": pkg, "value": getattr(mod, "__version__", "present")})
        except ImportError:
            rows.append({"what": pkg, "value": "absent"})
    rep.table("environment", ["what", "value"], rows)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or "gpu_check_out",
        help="where the log and the JSON go (default $OUT)",
    )
    ap.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}"
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=330.0,
        help="the steps part adds no run past this many seconds of the whole check",
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument(
        "--rounds", type=int, default=10, help="interleaved rounds of the MoE layer timing"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="every part, tiny, on the CPU: checks the script"
    )
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: {', '.join(unknown)} not among {', '.join(PARTS)}")
    if args.steps < 1 or args.rounds < 1:
        ap.error(f"--steps ({args.steps}) and --rounds ({args.rounds}) must be >= 1")
    args.parts = parts
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    small = args.cpu_smoke
    if not small and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this "
            "check needs a machine with a CUDA GPU (--cpu-smoke checks the script on a CPU). "
            "Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    dev = torch.device("cpu") if small else torch.device("cuda", 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rep = Report(Path(args.out))
    rep.results["args"] = {k: v for k, v in vars(args).items()}
    budget = Budget(args.budget_s)
    if small:
        rep.log(
            "gpu_check --cpu-smoke: every part, tiny, on the CPU; nothing here is a measurement"
        )
    try:
        for part in args.parts:
            with rep.part(part):
                if part == "env":
                    env_part(rep, dev)
                elif part == "moe_layer":
                    moe_layer_part(
                        rep,
                        dev,
                        shapes=SMOKE_SHAPES if small else SHAPES,
                        tokens=256 if small else TOKENS,
                        rounds=2 if small else args.rounds,
                    )
                elif part == "grouped_gemm":
                    grouped_gemm_part(rep, dev, small=small)
                elif part == "gpu_risks":
                    gpu_risks_part(rep, dev, small=small)
                elif part == "steps":
                    steps_part(
                        rep,
                        dev,
                        budget,
                        specs=SMOKE_SPECS if small else STEP_SPECS,
                        steps=1 if small else args.steps,
                        small=small,
                    )
                elif part == "profile":
                    profile_part(rep, dev, small=small)
                elif part == "loop_energy":
                    loop_energy_part(rep, dev, small=small)
            _free(dev)
    finally:
        statuses = {k: v["status"] for k, v in rep.results["parts"].items()}
        rep.log(f"\nparts: {statuses}; total {time.time() - rep.results['started']:.0f} s")
        rep.log(f"results: {rep.out_dir / 'gpu_check.json'}, log: {rep.out_dir / 'gpu_check.log'}")
        rep.close()
    return 0 if all(s == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
