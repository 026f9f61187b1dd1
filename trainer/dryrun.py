"""Sizing a job before renting the cluster: `python -m trainer.train CONFIG --dry-run [--json]`.

`main(cfg, json_out=...)` is the entry point (`cluster.launch --dry-run` calls it too). It
needs no GPU, no process group and no memory for the weights:

- the model is built on the meta device and each MoE layer is sliced to one rank's experts
  with `GroupedExperts.shard`, the same call `trainer.parallelize` makes, so the per-rank
  parameter count is read off real tensor shapes; every rank holds the same number of
  parameters (dense ones replicated, E / ep experts each), so one meta model stands for all;
- the mesh is `trainer.mesh.Mesh` for the configured world size (its arithmetic only, no
  process groups), which gives the expert placement plan;
- totals, active parameters, FLOPs and the KV cache come from `trainer.flops`.

Memory per rank follows how `trainer.loop` trains today: fp32 parameters, fp32 gradients and
AdamW's two fp32 moments (16 bytes per parameter held), no sharding of any of them over data
parallel, plus with bf16 autocast a bf16 copy of every matmul weight held from forward to
backward. Activations are an estimate of the tensors the forward saves for backward with no
activation checkpointing, a fused attention kernel (no S x S scores kept), routing balanced
across experts, and the logits and their log-softmax for the loss (`activation_bytes`). The
job is said not to fit when that total exceeds `parallel.device_memory_gib`. `train.dtype`
auto is sized as it runs on a GPU (bf16 autocast) unless `train.device` is cpu.
"""

from __future__ import annotations

import itertools
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from trainer.config import JobConfig, ModelConfig
from trainer.flops import (
    ParamCounts,
    flops_per_token,
    kv_cache_elements_per_token,
    mha_kv_cache_elements_per_token,
    param_counts,
)
from trainer.mesh import Mesh

GIB = 1 << 30
# Bytes per parameter of training state as trainer.loop holds it: fp32 weight, fp32
# gradient, AdamW exp_avg and exp_avg_sq in fp32.
PARAM_BYTES, GRAD_BYTES, OPTIM_BYTES = 4, 4, 8
# The KV cache is sized for bf16 inference.
KV_CACHE_DTYPE_BYTES = 2


@dataclass(frozen=True)
class RankMemory:
    """Estimated bytes one rank holds at the peak of a training micro-step."""

    params: int
    grads: int
    optimizer: int
    weight_copies: int  # bf16 copies of matmul weights that autocast keeps for backward
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.weight_copies + self.activations


@dataclass(frozen=True)
class EPGroupPlacement:
    """The experts one EP rank holds, and the world ranks (node, GPU) that hold them."""

    ep_rank: int
    first_expert: int
    num_experts: int
    ranks: list[int]
    nodes: list[int]
    gpus: list[int]


@dataclass(frozen=True)
class SizingReport:
    world_size: int
    ep: int
    dp: int
    gpus_per_node: int
    counts: ParamCounts
    params_per_rank: int  # every rank holds the same number
    expert_params_per_rank: int
    flops_per_token: float
    seq_len: int
    micro_batch_size: int
    memory: RankMemory
    device_memory_gib: float  # parallel.device_memory_gib; 0 = no check
    # Parameters, gradients and optimizer state of one rank if they were sharded over the
    # whole world (what FSDP would give; not built), for the error's hint.
    fully_sharded_bytes: int
    kv_cache_elements_per_token: int
    kv_cache_bytes_per_token: int
    mha_kv_cache_bytes_per_token: int
    placement: list[EPGroupPlacement]
    warnings: list[str]

    @property
    def device_memory_bytes(self) -> int:
        return int(self.device_memory_gib * GIB)

    @property
    def fits(self) -> bool:
        return self.device_memory_bytes == 0 or self.memory.total <= self.device_memory_bytes

    def error(self) -> str | None:
        """The user-facing reason the job does not fit, or None."""
        if self.fits:
            return None
        dense = self.counts.total - self.counts.experts_total
        raise_ep = (
            f"raise parallel.ep (model.moe.num_experts, {self.num_experts}, must stay divisible "
            "by it), or "
            if self.ep < self.num_experts
            else ""
        )
        return (
            f"each rank needs an estimated {_gib(self.memory.total)} GiB "
            f"({_mem_line(self.memory)}) but parallel.device_memory_gib is "
            f"{self.device_memory_gib:g}: the dense parameters ({dense / 1e9:.2f}B) are "
            f"replicated on every rank and the experts are split over parallel.ep "
            f"({self.ep}) only. To fit, {raise_ep}lower train.micro_batch_size / train.seq_len; a "
            f"model this size needs its "
            f"parameters, gradients and optimizer state sharded over data parallel "
            f"(FSDP/ZeRO), which moeyard does not do yet: sharded over all "
            f"{self.world_size} ranks that state would take {_gib(self.fully_sharded_bytes)} "
            f"GiB a rank, plus the activations ({_gib(self.memory.activations)} GiB, which "
            "activation checkpointing, also not built yet, would cut)"
        )

    @property
    def num_experts(self) -> int:
        return sum(p.num_experts for p in self.placement)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: at least total_params, active_params, flops_per_token,
        bytes_per_rank (the estimated peak of one rank; all ranks are alike)."""
        kv_red = 1 - self.kv_cache_bytes_per_token / self.mha_kv_cache_bytes_per_token
        return {
            "total_params": self.counts.total,
            "active_params": self.counts.active,
            "flops_per_token": self.flops_per_token,
            "bytes_per_rank": self.memory.total,
            "memory_per_rank": {**asdict(self.memory), "total": self.memory.total},
            "params_per_rank": self.params_per_rank,
            "expert_params_per_rank": self.expert_params_per_rank,
            "world_size": self.world_size,
            "ep": self.ep,
            "dp": self.dp,
            "gpus_per_node": self.gpus_per_node,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "device_memory_bytes": self.device_memory_bytes,
            "fully_sharded_bytes_per_rank": self.fully_sharded_bytes,
            "fits": self.fits,
            "error": self.error(),
            "kv_cache": {
                "elements_per_token": self.kv_cache_elements_per_token,
                "bytes_per_token": self.kv_cache_bytes_per_token,
                "mha_bytes_per_token": self.mha_kv_cache_bytes_per_token,
                "reduction_vs_mha": kv_red,
                "dtype_bytes": KV_CACHE_DTYPE_BYTES,
            },
            "kv_cache_bytes_per_token": self.kv_cache_bytes_per_token,
            "placement": [asdict(p) for p in self.placement],
            "warnings": self.warnings,
        }


def _gib(n: int) -> str:
    """Bytes in GiB, to 4 significant digits (small jobs stay readable)."""
    return f"{n / GIB:.4g}"


def _mem_line(m: RankMemory) -> str:
    return (
        f"parameters {_gib(m.params)}, gradients {_gib(m.grads)}, optimizer "
        f"{_gib(m.optimizer)}, bf16 weight copies {_gib(m.weight_copies)}, "
        f"activations {_gib(m.activations)}"
    )


def activation_bytes(cfg: ModelConfig, *, tokens: int, bf16: bool) -> int:
    """Estimated bytes the forward of `tokens` tokens saves for backward, the loss included.

    Per token: the residual stream and the norms are fp32 (4 bytes) as trainer.model computes
    them; matmul outputs are 2 bytes under bf16 autocast, 4 in fp32. Counted per layer: the
    norm's input and normalized output and the projection input; attention's saved q, k, v,
    output and log-sum-exp (a fused kernel, no S x S scores) and the output projection's
    input; MLA's latent, its norm and up-projected keys and values; a dense SwiGLU's two
    hidden activations, their product and the activation; a MoE layer's router scores, top_k
    dispatched rows with their SwiGLU hiddens, the fp32 combine, and the shared experts.
    Routing is taken as balanced (each rank's experts receive top_k rows per token of its own
    on average); a skewed router needs more on the busiest rank. Then the final norm, the
    logits and the loss's log-softmax (fp32).
    """
    a = 2 if bf16 else 4
    D, H = cfg.dim, cfg.num_heads
    norm = 4 * D + 4 * D + a * D  # input, normalized, the projection's (cast) input
    if cfg.attention == "mla":
        m = cfg.mla
        N, R, V, C, Cq = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
            m.q_lora_rank,
        )
        attn = norm + (2 * a * Cq + 8 * Cq if Cq else 0)
        attn += a * (C + R) + 8 * C + a * C  # wkv_a out, the latent norm, wkv_b's input
        attn += 2 * a * H * (N + R) + a * H * (N + V)  # q, k, the up-projected k_nope and v
        attn += 2 * a * H * V + 4 * H  # attention output, wo's input, log-sum-exp
    else:
        Dh, Hkv = cfg.head_dim, cfg.num_kv_heads
        attn = norm + a * (2 * H * Dh + 2 * Hkv * Dh) + a * H * Dh + 4 * H
    dense_ffn = norm + 4 * a * cfg.dense_hidden
    moe = cfg.moe
    K, F, E = moe.top_k, moe.expert_hidden, moe.num_experts
    moe_ffn = 4 * D + 4 * D + 8 * E  # norm input, norm output, router logits and scores
    moe_ffn += K * (4 * D + 4 * a * F + a * D + 4 * D)  # rows in, hiddens, out, fp32 combine
    if moe.num_shared_experts:
        moe_ffn += a * D + 4 * a * F * moe.num_shared_experts
    num_moe = cfg.num_layers - cfg.num_dense_layers
    per_token = (
        cfg.num_layers * attn
        + cfg.num_dense_layers * dense_ffn
        + num_moe * moe_ffn
        + norm  # final norm
        + (a + 4) * cfg.vocab_size  # logits and the loss's fp32 log-softmax
    )
    return per_token * tokens


def _meta_params_per_rank(cfg: ModelConfig, *, ep: int) -> tuple[int, int]:
    """(parameters, expert parameters) of EP rank 0, read from a meta-device model."""
    from trainer.model import build_model

    model = build_model(cfg)
    num_local = cfg.moe.num_experts // ep
    for moe in model.moe_layers():
        moe.experts.shard(expert_offset=0, num_local=num_local)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for moe in model.moe_layers() for p in moe.experts.parameters())
    return total, experts


def size_job(
    cfg: JobConfig, *, world_size: int | None = None, gpus_per_node: int = 8
) -> SizingReport:
    """Sizes `cfg` for `world_size` ranks (default: parallel.world_size, else parallel.ep).

    Raises:
        ConfigError: the world size is not a multiple of parallel.ep, or differs from
            parallel.world_size when both are given.
    """
    world = world_size or cfg.parallel.world_size or cfg.parallel.ep
    dp = cfg.check_world(world)
    ep = cfg.parallel.ep
    m = cfg.model
    counts = param_counts(m)
    params_rank, experts_rank = _meta_params_per_rank(m, ep=ep)
    # The arithmetic the cluster plan and the report rely on, checked against real shapes.
    dense = counts.total - counts.experts_total
    assert params_rank == dense + counts.experts_total // ep, (params_rank, counts)
    assert experts_rank == counts.experts_total // ep

    t = cfg.train
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and t.device != "cpu")
    matmul_rank = params_rank - counts.norms - (0 if m.tie_embeddings else counts.embedding)
    memory = RankMemory(
        params=PARAM_BYTES * params_rank,
        grads=GRAD_BYTES * params_rank,
        optimizer=OPTIM_BYTES * params_rank,
        weight_copies=2 * matmul_rank if bf16 else 0,
        activations=activation_bytes(m, tokens=t.micro_batch_size * t.seq_len, bf16=bf16),
    )
    state_bytes = PARAM_BYTES + GRAD_BYTES + OPTIM_BYTES
    fully_sharded = state_bytes * counts.total // world

    per_ep = m.moe.num_experts // ep
    placement = []
    for e in range(ep):
        # World rank e is EP rank e of the first DP replica; its dp axis holds the same experts.
        ranks = Mesh(world_size=world, rank=e, ep=ep).ranks("dp")
        placement.append(
            EPGroupPlacement(
                ep_rank=e,
                first_expert=e * per_ep,
                num_experts=per_ep,
                ranks=ranks,
                nodes=[r // gpus_per_node for r in ranks],
                gpus=[r % gpus_per_node for r in ranks],
            )
        )
    warnings = []
    if ep > 1 and (gpus_per_node % ep and ep % gpus_per_node):
        warnings.append(
            f"parallel.ep ({ep}) neither divides nor is a multiple of {gpus_per_node} GPUs per "
            "node: some expert-parallel groups straddle two nodes"
        )
    elif ep > gpus_per_node:
        warnings.append(
            f"parallel.ep ({ep}) exceeds {gpus_per_node} GPUs per node: the all-to-all crosses "
            "nodes"
        )
    if cfg.parallel.device_memory_gib == 0:
        warnings.append("parallel.device_memory_gib is 0: the memory fit is not checked")
    kv = kv_cache_elements_per_token(m)
    return SizingReport(
        world_size=world,
        ep=ep,
        dp=dp,
        gpus_per_node=gpus_per_node,
        counts=counts,
        params_per_rank=params_rank,
        expert_params_per_rank=experts_rank,
        flops_per_token=flops_per_token(m, t.seq_len),
        seq_len=t.seq_len,
        micro_batch_size=t.micro_batch_size,
        memory=memory,
        device_memory_gib=cfg.parallel.device_memory_gib,
        fully_sharded_bytes=fully_sharded,
        kv_cache_elements_per_token=kv,
        kv_cache_bytes_per_token=kv * KV_CACHE_DTYPE_BYTES,
        mha_kv_cache_bytes_per_token=mha_kv_cache_elements_per_token(m) * KV_CACHE_DTYPE_BYTES,
        placement=placement,
        warnings=warnings,
    )


def _ranks_str(ranks: list[int]) -> str:
    if len(ranks) > 1 and all(b - a == ranks[1] - ranks[0] for a, b in itertools.pairwise(ranks)):
        step = ranks[1] - ranks[0]
        return f"{ranks[0]}..{ranks[-1]} step {step}" if len(ranks) > 2 else f"{ranks}"
    return ", ".join(map(str, ranks))


def _num(n: float) -> str:
    """A parameter count in B or M."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def format_report(r: SizingReport) -> str:
    """The human-readable report `--dry-run` prints."""
    c = r.counts
    kv_red = 1 - r.kv_cache_bytes_per_token / r.mha_kv_cache_bytes_per_token
    lines = [
        f"layout: world {r.world_size} = dp {r.dp} x ep {r.ep} ({r.gpus_per_node} GPUs per node)",
        f"parameters: total {_num(c.total)}, active per token {_num(c.active)} "
        f"(input embedding not counted as active; see trainer/flops.py)",
        f"training FLOPs per token at seq_len {r.seq_len}: {r.flops_per_token / 1e9:.4g} GFLOP "
        "(6 x active matmul parameters + attention scores and values)",
        f"per rank: {_num(r.params_per_rank)} parameters "
        f"({_num(r.expert_params_per_rank)} of them in experts; experts per MoE layer: "
        f"{r.num_experts // r.ep} of {r.num_experts})",
        f"memory per rank, estimated (micro-batch {r.micro_batch_size} x {r.seq_len} tokens, "
        "nothing sharded over dp, no activation checkpointing): "
        f"{_gib(r.memory.total)} GiB = {_mem_line(r.memory)} GiB",
        f"KV cache per token: {r.kv_cache_bytes_per_token:,} bytes "
        f"({r.kv_cache_elements_per_token:,} elements in bf16); multi-head attention with the "
        f"same heads and dims: {r.mha_kv_cache_bytes_per_token:,} bytes ({kv_red:.1%} less)",
        "expert placement (EP rank: experts -> world ranks, node:GPU):",
    ]
    shown = r.placement if len(r.placement) <= 16 else r.placement[:16]
    for p in shown:
        where = " ".join(f"{n}:{g}" for n, g in zip(p.nodes, p.gpus, strict=True))
        lines.append(
            f"  ep {p.ep_rank}: experts {p.first_expert}..{p.first_expert + p.num_experts - 1}"
            f" -> ranks {_ranks_str(p.ranks)} ({where})"
        )
    if len(shown) < len(r.placement):
        lines.append(f"  ... {len(r.placement) - len(shown)} more EP ranks")
    if r.device_memory_bytes:
        verdict = "fits" if r.fits else "DOES NOT FIT"
        lines.append(
            f"device memory {r.device_memory_gib:g} GiB: {verdict} "
            f"({r.memory.total / r.device_memory_bytes:.0%} used)"
        )
    lines += [f"warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def main(
    cfg: JobConfig,
    json_out: bool = False,
    *,
    world_size: int | None = None,
    gpus_per_node: int = 8,
    out: TextIO | None = None,
) -> int:
    """Prints the sizing of `cfg` (text, or one JSON object with `json_out`).

    Args:
        cfg: the loaded job config.
        json_out: print `SizingReport.to_dict()` as one JSON object instead of text.
        world_size: ranks to size for; default parallel.world_size, else parallel.ep.
        gpus_per_node: for the placement plan (ranks are node-major).
        out: where to print (stdout by default).

    Returns:
        0 when every rank fits in parallel.device_memory_gib (or no memory is configured),
        1 when a rank does not fit (the reason is printed to stderr and, with json_out, is
        the object's `error`).

    Raises:
        ConfigError: the world size does not fit the layout.
    """
    out = out or sys.stdout
    report = size_job(cfg, world_size=world_size, gpus_per_node=gpus_per_node)
    if json_out:
        print(json.dumps(report.to_dict()), file=out, flush=True)
    else:
        print(format_report(report), file=out, flush=True)
    err = report.error()
    if err is not None:
        print(f"dry run: does not fit: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
