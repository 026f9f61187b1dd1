"""Sizing a job before renting the cluster: `python -m trainer.train CONFIG --dry-run [--json]`.

`main(cfg, json_out=...)` is the entry point (`cluster.launch --dry-run` calls it too). It
needs no GPU, no process group and no memory for the weights:

- the model is built on the meta device and each MoE layer is sliced to one rank's experts
  with `GroupedExperts.shard`, the same call `trainer.parallelize` makes, so the per-rank
  parameter count is read off real tensor shapes (E / ep experts and every dense weight,
  before FSDP shards them over dp_shard); every rank is alike, so one meta model stands
  for all;
- the mesh is `trainer.mesh.Mesh` for the configured world size (its arithmetic only, no
  process groups), which gives the expert placement plan;
- totals, active parameters, FLOPs and the KV cache come from `trainer.flops`.

Memory per rank follows how `trainer.loop` trains (`memory_model`, every line printed):
the fp32 master weights, fp32 gradients and AdamW's two fp32 moments of the rank's FSDP
shard (dense parameters / dp_shard, experts / (ep x efsdp) = / dp_shard; nothing is
sharded in one process); the FSDP units gathered at once (one block, two on a GPU where the
next is prefetched, plus the output head, kept gathered from forward to backward) in the
compute dtype; in bf16 in one process a bf16 compute copy of every weight; the
activations the forward saves for backward under `train.activation_checkpoint` (none: every
tensor; full: each block's input; selective: matmul, attention and all-to-all outputs and
the routing decisions), counted per token from the layer shapes (`activation_parts`) with a
fused attention kernel (no S x S scores) and balanced routing; the all-to-all receive
buffers' headroom for routing imbalance (`ROUTING_HEADROOM`, EP > 1); the block rebuilt in
backward under checkpointing with its gradient temporaries; the loss's fp32 logits, or
under `train.loss_chunk_tokens` one chunk's and the head's gradients (`loss_bytes`); with
train.grad_accum > 1 the gradients of the earlier micro-steps, held through the forward;
and AdamW's step temporaries (foreach; none fused). The allocated peak is the largest of
the end of the forward, the backward and the optimizer step; on a GPU the caching
allocator reserves more (`ALLOCATOR_SLACK`, and FSDP's gathered units again on its own
stream), and that reserved peak is what must fit. Checked against the
measured peak of real CPU runs (tests/test_dryrun.py, bench/fsdp.py) and of H200 runs (within
5%). The job is said not to fit when the peak exceeds `parallel.device_memory_gib` less
`FIT_MARGIN` (the estimate's error, so that a job sized at 99% does not die at its first
step). `train.dtype` auto is sized as it runs on a GPU (bf16) unless `train.device` is cpu.
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


# The all-to-all receive buffers (and the expert activations of the rows in them) are sized
# for the busiest rank receiving this much more than a balanced share.
ROUTING_HEADROOM = 1.2
# Gradient temporaries of a block rebuilt in backward, as a share of its activations
# (measured on CPU: 0.3 to 0.5).
RECOMPUTE_TEMP = 0.4
# What the CUDA caching allocator reserves beyond the bytes allocated at the peak, with
# expandable segments (set by the launchers, see `trainer.loop.configure_cuda_allocator`):
# rounding and partly used segments (measured on an H200: 4-8% of the peak in one process),
# and under FSDP the units gathered in flight once more, since the all-gathers' outputs are
# allocated on FSDP's own stream, whose blocks the compute stream's allocations cannot reuse
# (measured: 9.0 GiB over 60.4 allocated for two gathered 2.9 GiB Mixtral blocks).
ALLOCATOR_SLACK = 0.05


@dataclass(frozen=True)
class RankMemory:
    """Estimated bytes one rank holds, by kind; `total` is the peak of a training step."""

    params: int  # fp32 master weights of this rank's shard
    grads: int  # fp32 gradients of the shard (all of them at the end of backward)
    # Gradients held through the forward: those of the earlier micro-steps of an
    # accumulating step (train.grad_accum > 1), else 0.
    grads_in_forward: int
    optimizer: int  # AdamW's two fp32 moments of the shard
    optimizer_temp: int  # AdamW's step temporaries (foreach: a sqrt of the second moments)
    gathered_forward: int  # FSDP units gathered at the end of the forward (last block, head)
    gathered_backward: int  # FSDP units gathered at once in backward (blocks, prefetch)
    weight_copies: int  # bf16 compute copies of every weight (one process, trainer/precision)
    activations: int  # the blocks' tensors saved for backward (train.activation_checkpoint)
    routing_headroom: int  # all-to-all receive buffers beyond a balanced share (EP > 1)
    recompute: int  # one block rebuilt in backward (checkpointing) and its temporaries
    loss: int  # final norm, logits, fp32 log-softmax, temporaries (or a chunk's: loss_bytes)
    num_blocks: int  # transformer blocks (the backward frees their activations one by one)
    allocator_stream_pool: int  # FSDP's gathered units reserved again on its stream (GPU)
    on_gpu: bool  # the allocator's slack is counted for a GPU only

    @property
    def forward_peak(self) -> int:
        """End of the forward: everything saved, the earlier micro-steps' gradients."""
        return (
            self.params
            + self.grads_in_forward
            + self.optimizer
            + self.gathered_forward
            + self.weight_copies
            + self.activations
            + self.routing_headroom
            + self.loss
        )

    @property
    def backward_peak(self) -> int:
        """In backward, block by block: the gradients grow while the saved activations of
        the blocks done are freed; the block being rebuilt (checkpointing) sits on top. The
        peak is at the first block reached (all activations, few new gradients) or the last
        (all gradients, one block's activations)."""
        saved = self.activations + self.routing_headroom
        return (
            self.params
            + self.optimizer
            + self.gathered_backward
            + self.weight_copies
            + self.recompute
            + max(self.grads_in_forward + saved, self.grads + saved // max(1, self.num_blocks))
        )

    @property
    def optimizer_peak(self) -> int:
        """The optimizer step: weights, gradients, moments and the step's temporaries."""
        return self.params + self.grads + self.optimizer + self.optimizer_temp

    @property
    def allocated(self) -> int:
        """The most bytes allocated at once in a step."""
        return max(self.forward_peak, self.backward_peak, self.optimizer_peak)

    @property
    def allocator(self) -> int:
        """What the caching allocator reserves beyond `allocated` (GPU; see ALLOCATOR_SLACK)."""
        if not self.on_gpu:
            return 0
        return int(ALLOCATOR_SLACK * self.allocated) + self.allocator_stream_pool

    @property
    def total(self) -> int:
        """The peak the device must hold: allocated plus the allocator's reserve."""
        return self.allocated + self.allocator

    def lines(self) -> list[tuple[str, int]]:
        """(what, bytes) for the report, in the order of the budget."""
        return [
            ("parameters (fp32 shard)", self.params),
            ("gradients (fp32 shard)", self.grads),
            ("gradients held through the forward (grad_accum)", self.grads_in_forward),
            ("optimizer (AdamW moments, fp32 shard)", self.optimizer),
            ("optimizer step temporaries", self.optimizer_temp),
            ("FSDP units gathered, end of forward", self.gathered_forward),
            ("FSDP units gathered at once in backward", self.gathered_backward),
            ("bf16 compute copies of the weights", self.weight_copies),
            ("activations saved for backward", self.activations),
            (f"all-to-all imbalance headroom (x{ROUTING_HEADROOM:g})", self.routing_headroom),
            ("block rebuilt in backward", self.recompute),
            ("loss: logits and log-softmax (or a chunk's)", self.loss),
            ("CUDA caching allocator reserve", self.allocator),
        ]


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
    dp_replicate: int
    dp_shard: int
    activation_checkpoint: str
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
    compile: bool = False  # train.compile: the activation figure is an upper bound

    @property
    def device_memory_bytes(self) -> int:
        return int(self.device_memory_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        """What the estimate may take: the device memory less `FIT_MARGIN`."""
        return int(self.device_memory_bytes * (1 - FIT_MARGIN))

    @property
    def fits(self) -> bool:
        return self.device_memory_bytes == 0 or self.memory.total <= self.usable_bytes

    def error(self) -> str | None:
        """The user-facing reason the job does not fit, or None."""
        if self.fits:
            return None
        m = self.memory
        hints = []
        if self.activation_checkpoint != "full":
            hints.append(
                f"train.activation_checkpoint={'full' if self.activation_checkpoint == 'selective' else 'selective or full'} "
                f"(activations now {_gib(m.activations)} GiB)"
            )
        hints.append("a smaller train.micro_batch_size (raise train.grad_accum to keep the batch)")
        if self.dp_replicate > 1:
            hints.append(
                f"parallel.dp_replicate 1 so that parallel.dp_shard shards over all "
                f"{self.world_size} ranks (now {self.dp_shard})"
            )
        hints.append(
            f"more ranks: parameters, gradients and optimizer state take "
            f"{_gib(m.params + m.grads + m.optimizer)} GiB at dp_shard {self.dp_shard}"
        )
        return (
            f"each rank needs an estimated {_gib(m.total)} GiB at its peak "
            f"({_mem_line(m)}) but parallel.device_memory_gib is {self.device_memory_gib:g}, "
            f"of which the dry run lets a job plan on {_gib(self.usable_bytes)} "
            f"({1 - FIT_MARGIN:.0%}; its estimates are within {FIT_MARGIN:.0%} of measured peaks). "
            "To fit, try " + "; or ".join(hints)
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
            "mtp_params": self.counts.mtp_total,
            "active_params": self.counts.active,
            "flops_per_token": self.flops_per_token,
            "bytes_per_rank": self.memory.total,
            "memory_per_rank": {
                **asdict(self.memory),
                "forward_peak": self.memory.forward_peak,
                "backward_peak": self.memory.backward_peak,
                "optimizer_peak": self.memory.optimizer_peak,
                "allocated": self.memory.allocated,
                "allocator": self.memory.allocator,
                "total": self.memory.total,
            },
            "compile": self.compile,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "activation_checkpoint": self.activation_checkpoint,
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
    return ", ".join(f"{what} {_gib(n)}" for what, n in m.lines() if n)


def activation_bytes(cfg: ModelConfig, *, tokens: int, bf16: bool) -> int:
    """Estimated bytes the forward of `tokens` tokens saves for backward, the loss included.

    Per token: the residual stream, the norms and matmul outputs take 2 bytes in bf16 (FSDP's
    bf16 parameters, or one process's compute copies) and 4 in fp32. Counted per layer: the
    norm's fp32 copy of its input, its normalized output and the projection input;
    attention's saved q, k, v, output and log-sum-exp (a fused kernel, no S x S scores) and
    the output projection's input; MLA's latent, its norm and up-projected keys and values;
    a dense SwiGLU's two hidden activations, their product and the activation; a MoE layer's
    router input (fp32)
    and scores, top_k dispatched rows with their SwiGLU hiddens and expert outputs (which the
    combine keeps, with its fp32 weights and indices), and the shared experts.
    Routing is taken as balanced (each rank's experts receive top_k rows per token of its own
    on average); a skewed router needs more on the busiest rank. Then the final norm, the
    logits and the loss's log-softmax (fp32).
    """
    # bf16 compute (FSDP's policy, or one process's compute copies) keeps the residual
    # stream in bf16 too.
    parts = activation_parts(cfg, a=2 if bf16 else 4, r=2 if bf16 else 4)
    num_moe = cfg.num_layers - cfg.num_dense_layers
    per_token = (
        cfg.num_layers * parts.attn_full
        + cfg.num_dense_layers * parts.dense_ffn_full
        + num_moe * parts.moe_ffn_full
        + parts.loss
        - LOSS_TEMP_BYTES * cfg.vocab_size  # saved for backward: not the loss's temporaries
    )
    return per_token * tokens


# fp32 bytes per token and vocabulary entry the loss holds besides what it saves: the fp32
# logits it computes from, and their gradient (measured on CPU).
LOSS_TEMP_BYTES = 8

# The share of parallel.device_memory_gib a job may not plan on: the estimate's error against
# measured peaks (tests/test_dryrun.py holds every H200 row within 5%).
FIT_MARGIN = 0.05


@dataclass(frozen=True)
class ActivationParts:
    """Bytes per token a layer's forward keeps for backward, by checkpointing mode."""

    attn_full: int
    attn_selective: int
    dense_ffn_full: int
    dense_ffn_selective: int
    moe_ffn_full: int
    moe_ffn_selective: int
    moe_routed_full: int  # the part of moe_ffn_full that scales with the rows received
    moe_routed_selective: int
    block_input: int  # what full checkpointing keeps of a block
    loss: int  # final norm, logits, fp32 log-softmax and the loss's fp32 temporaries


def activation_parts(cfg: ModelConfig, *, a: int, r: int) -> ActivationParts:
    """Per-token activation bytes of each layer kind (see `activation_bytes` for what is
    counted). `a`: bytes of a matmul output (2 in bf16, 4 in fp32); `r`: of the residual
    stream and the norms (4 in fp32, 2 with bf16 compute)."""
    D, H = cfg.dim, cfg.num_heads
    # RMSNorm keeps an fp32 copy of its input (the input itself in fp32), the normalized
    # tensor before the weight, and hands its output to a projection that keeps it.
    norm = 4 * D + r * D + a * D
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
        attn_sel = (a * Cq if Cq else 0) + a * H * (N + R)  # query projection(s)
        attn_sel += a * (C + R) + a * H * (N + V)  # the latent and its up-projection
        attn_sel += a * H * V + 4 * H + a * D  # attention output, log-sum-exp, wo's output
    else:
        Dh, Hkv = cfg.head_dim, cfg.num_kv_heads
        attn = norm + a * (2 * H * Dh + 2 * Hkv * Dh) + a * H * Dh + 4 * H
        attn_sel = a * (H * Dh + 2 * Hkv * Dh) + a * H * Dh + 4 * H + a * D
    dense = norm + 4 * a * cfg.dense_hidden
    dense_sel = 2 * a * cfg.dense_hidden + a * D
    moe = cfg.moe
    K, F, E = moe.top_k, moe.expert_hidden, moe.num_experts
    # rows in, hiddens (the [R, 2F] output of w13's grouped GEMM the fused SwiGLU keeps, and
    # its [R, F] output w2's grouped GEMM keeps), out (the combine keeps it), the combine's
    # fp32 weight and three int64 indices (tests/test_dryrun.py measures the block's bytes)
    routed = K * (r * D + 3 * a * F + a * D + 28)
    routed_sel = K * (a * D + 2 * a * F + 2 * a * D)  # rows in, w13's out, w2 out, rows back
    # The norm's fp32 copy (or input) and normalized tensor; the router's fp32 input (its own
    # copy below fp32, else the norm's output); router logits and scores.
    moe_full = 4 * D + r * D + 4 * D + 8 * E + routed
    moe_sel = 4 * E + 12 * K + routed_sel  # router logits, top-k ids and weights
    if moe.num_shared_experts:
        Fs = F * moe.num_shared_experts
        # their input: the norm's output the router kept in fp32, else a copy of its own
        moe_full += (a * D if a < 4 else 0) + 4 * a * Fs
        moe_sel += 2 * a * Fs + a * D
    loss = norm + (a + 4) * cfg.vocab_size + LOSS_TEMP_BYTES * cfg.vocab_size
    return ActivationParts(
        attn_full=attn,
        attn_selective=attn_sel,
        dense_ffn_full=dense,
        dense_ffn_selective=dense_sel,
        moe_ffn_full=moe_full,
        moe_ffn_selective=moe_sel,
        moe_routed_full=routed,
        moe_routed_selective=routed_sel,
        block_input=r * D,
        loss=loss,
    )


def loss_bytes(cfg: JobConfig, *, tokens: int, a: int, r: int) -> int:
    """Bytes the next-token loss holds at its peak, at the start of its backward
    (`RankMemory.loss`); `a` and `r` as in `activation_parts`.

    Whole (`train.loss_chunk_tokens` 0), per token: the final norm's tensors; the fp32
    log-softmax `F.cross_entropy` saves, the gradient of it and the gradient of the logits
    (4 bytes each per vocabulary entry); below fp32 that gradient's compute-dtype copy, and
    with distillation the logits themselves, which the loop keeps for the KL term.

    Chunked (trainer/loss.py; distillation still needs the whole logits), or Liger's fused
    kernel (chunks of T / ceil(V / D) tokens, to the next power of two): per token the final
    norm's input and output and the gradient of the hidden states (the head's input is cast
    chunk by chunk, not kept); the fp32 gradient of the head weight [V, D]; one chunk's fp32
    logits and the fp32 temporary of their log-sum-exp (8 bytes per entry; below fp32 the
    compute-dtype copies come and go under that); and below fp32 the compute-dtype product
    of the weight's gradient matmul [V, D].
    """
    m, t = cfg.model, cfg.train
    V, D = m.vocab_size, m.dim
    low = a if a < 4 else 0  # the compute-dtype copies exist only below fp32
    chunk = t.loss_chunk_tokens
    if t.loss_kernel == "liger":
        per = -(-V // D)
        chunk = 1 << max(0, (-(-tokens // per) - 1).bit_length())
    if cfg.distill.teacher or chunk <= 0 or chunk >= tokens:
        norm = 2 * r * D + a * D
        held = a * V if cfg.distill.teacher else low * V
        return tokens * (norm + 12 * V + held)
    return tokens * 3 * r * D + 4 * V * D + 8 * chunk * V + low * V * D


def memory_model(
    cfg: JobConfig,
    *,
    params_rank: int,
    experts_rank: int,
    block_units: list[int],
    head_params: int,
    world_size: int,
    fsdp: bool | None = None,
    fused_optimizer: bool | None = None,
    keep_gathered: bool | None = None,
) -> RankMemory:
    """The per-rank budget of `cfg` at `world_size` ranks (see the module docstring).

    Args:
        params_rank: parameters one EP rank holds before FSDP (dense + its experts).
        experts_rank: those of them in its experts.
        block_units: parameters of each block's FSDP units as gathered (dense + this EP
            rank's experts), for the units gathered at once.
        head_params: the output head's (kept gathered from forward to backward).
        fsdp: whether FSDP wraps the model; None = when there is more than one rank (one
            rank in a process group, as a one-worker Ray job has, is FSDP too).
        fused_optimizer: AdamW's fused kernel (no step temporaries); None = what
            `trainer.loop.build_optimizer` picks (fused on a GPU).
        keep_gathered: FSDP keeps every unit gathered for the whole step; None = as
            `trainer.loop.keeps_gathered` decides (dp_shard 1, unless
            parallel.reshard_after_forward is always); False = FSDP's own schedule.
    """
    t, m, p = cfg.train, cfg.model, cfg.parallel
    _, dp_shard = p.degrees(world_size)
    on_gpu = t.device != "cpu"
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and on_gpu)
    fsdp = world_size > 1 if fsdp is None else fsdp
    fused = on_gpu if fused_optimizer is None else fused_optimizer
    # Dense weights are sharded over dp_shard, this EP rank's experts over efsdp =
    # dp_shard / ep: either way a rank keeps about 1/dp_shard of the whole model.
    shard = params_rank
    if fsdp:
        efsdp = dp_shard // p.ep
        shard = -(-(params_rank - experts_rank) // dp_shard) + -(-experts_rank // efsdp)
    a = 2 if bf16 else 4
    r = 2 if bf16 else 4  # bf16 compute runs the residual stream in bf16 too
    parts = activation_parts(m, a=a, r=r)
    tokens = t.micro_batch_size * t.seq_len
    num_moe = m.num_layers - m.num_dense_layers
    full = [parts.attn_full + parts.dense_ffn_full] * m.num_dense_layers + [
        parts.attn_full + parts.moe_ffn_full
    ] * num_moe
    sel = [parts.attn_selective + parts.dense_ffn_selective] * m.num_dense_layers + [
        parts.attn_selective + parts.moe_ffn_selective
    ] * num_moe
    # MTP modules (model.mtp.depth): a block each, their input norms and projection outside
    # it (two norms' inputs and outputs, the 2D-wide projection input and its output) and a
    # loss each.
    n_mtp = m.mtp.depth
    mtp_moe = m.mtp.moe
    full += [parts.attn_full + (parts.moe_ffn_full if mtp_moe else parts.dense_ffn_full)] * n_mtp
    sel += [
        parts.attn_selective + (parts.moe_ffn_selective if mtp_moe else parts.dense_ffn_selective)
    ] * n_mtp
    mtp_in = n_mtp * (4 * r * m.dim + 3 * a * m.dim)
    ac = t.activation_checkpoint
    blocks = m.num_layers + n_mtp
    saved = {"none": full, "selective": sel, "full": [parts.block_input] * blocks}[ac]
    rebuilt = 0
    if ac != "none":
        rebuilt = max(f - s for f, s in zip(full, saved, strict=True))
    routed = parts.moe_routed_selective if ac == "selective" else parts.moe_routed_full
    headroom = 0
    moe_blocks = num_moe + (n_mtp if mtp_moe else 0)
    if p.ep > 1 and moe_blocks and ac != "full":
        headroom = int((ROUTING_HEADROOM - 1) * routed * moe_blocks)
    pbytes = 2 if bf16 else 4
    in_flight = 2 if on_gpu else 1  # the next unit is prefetched on a GPU's side stream
    largest = max(block_units, default=0)
    # Blocks that stay gathered from their forward to their backward: the last one by
    # default (its backward comes next), all with reshard_after_forward=never, none with
    # always; the output head always stays.
    kept = {"never": sum(block_units), "always": 0}.get(p.reshard_after_forward, largest)
    gathered_backward = in_flight * largest * pbytes if fsdp else 0
    stream_pool = gathered_backward
    if keep_gathered is None:
        keep_gathered = dp_shard == 1 and p.reshard_after_forward != "always"
    if fsdp and keep_gathered:
        # trainer.loop.keeps_gathered: at dp_shard 1 every unit is gathered once a step and
        # stays so (the embedding included), its gradients accumulated unsharded.
        kept = sum(block_units) + (0 if m.tie_embeddings else head_params)
        gathered_backward = stream_pool = 0
    grads = GRAD_BYTES * shard
    return RankMemory(
        params=PARAM_BYTES * shard,
        grads=grads,
        grads_in_forward=grads if t.grad_accum > 1 else 0,
        optimizer=OPTIM_BYTES * shard,
        optimizer_temp=0 if fused else PARAM_BYTES * shard,
        gathered_forward=(head_params + kept) * pbytes if fsdp else 0,
        gathered_backward=gathered_backward,
        weight_copies=2 * params_rank if (bf16 and not fsdp) else 0,
        activations=(sum(saved) + mtp_in) * tokens,
        routing_headroom=headroom * tokens,
        recompute=int(rebuilt * tokens * (1 + RECOMPUTE_TEMP)),
        # The main loss and each MTP depth's hold their own until the backward.
        loss=loss_bytes(cfg, tokens=tokens, a=a, r=r) * (1 + n_mtp),
        num_blocks=blocks,
        allocator_stream_pool=stream_pool if on_gpu else 0,
        on_gpu=on_gpu,
    )


def _meta_params_per_rank(cfg: ModelConfig, *, ep: int) -> tuple[int, int, list[int]]:
    """(parameters, expert parameters, parameters of each block) of EP rank 0, read from a
    meta-device model sliced as `parallelize` slices it, before FSDP shards it."""
    from trainer.model import build_model

    model = build_model(cfg)
    num_local = cfg.moe.num_experts // ep
    for moe in model.moe_layers():
        moe.experts.shard(expert_offset=0, num_local=num_local)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for moe in model.moe_layers() for p in moe.experts.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in [*model.layers, *model.mtp]]
    return total, experts, blocks


def size_job(
    cfg: JobConfig,
    *,
    world_size: int | None = None,
    gpus_per_node: int = 8,
    fsdp: bool | None = None,
    fused_optimizer: bool | None = None,
    keep_gathered: bool | None = None,
) -> SizingReport:
    """Sizes `cfg` for `world_size` ranks (default: parallel.world_size, else parallel.ep).

    `fsdp`, `fused_optimizer` and `keep_gathered` as `memory_model` takes them (None: as
    the loop decides).

    Raises:
        ConfigError: the world size is not a multiple of parallel.ep, or differs from
            parallel.world_size when both are given.
    """
    world = world_size or cfg.parallel.world_size or cfg.parallel.ep
    dp = cfg.check_world(world)
    ep = cfg.parallel.ep
    m = cfg.model
    counts = param_counts(m)
    params_rank, experts_rank, block_units = _meta_params_per_rank(m, ep=ep)
    # The arithmetic the cluster plan and the report rely on, checked against real shapes.
    # The MTP modules (training-only) are held and trained like the rest.
    experts_all = counts.experts_total + counts.mtp_experts
    dense = counts.trained_total - experts_all
    assert params_rank == dense + experts_all // ep, (params_rank, counts)
    assert experts_rank == experts_all // ep

    memory = memory_model(
        cfg,
        params_rank=params_rank,
        experts_rank=experts_rank,
        block_units=block_units,
        head_params=m.vocab_size * m.dim,
        world_size=world,
        fsdp=fsdp,
        fused_optimizer=fused_optimizer,
        keep_gathered=keep_gathered,
    )
    state_bytes = PARAM_BYTES + GRAD_BYTES + OPTIM_BYTES
    fully_sharded = state_bytes * counts.trained_total // world
    t = cfg.train

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
        dp_replicate=cfg.parallel.degrees(world)[0],
        dp_shard=cfg.parallel.degrees(world)[1],
        activation_checkpoint=t.activation_checkpoint,
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
        compile=t.compile,
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
        f"layout: world {r.world_size} = dp_replicate {r.dp_replicate} x dp_shard "
        f"{r.dp_shard}; ep {r.ep} of dp_shard, experts sharded over efsdp "
        f"{r.dp_shard // r.ep} ({r.gpus_per_node} GPUs per node)",
        f"parameters: total {_num(c.total)}, active per token {_num(c.active)} "
        f"(input embedding not counted as active; see trainer/flops.py)",
        *(
            [f"multi-token prediction: {_num(c.mtp_total)} more parameters trained, not in total"]
            if c.mtp_total
            else []
        ),
        f"training FLOPs per token at seq_len {r.seq_len}: {r.flops_per_token / 1e9:.4g} GFLOP "
        "(6 x active matmul parameters + attention scores and values)",
        f"per rank: {_num(r.params_per_rank)} parameters "
        f"({_num(r.expert_params_per_rank)} of them in experts; experts per MoE layer: "
        f"{r.num_experts // r.ep} of {r.num_experts})",
        f"memory per rank, estimated (micro-batch {r.micro_batch_size} x {r.seq_len} tokens, "
        f"activation checkpointing {r.activation_checkpoint}), GiB:",
        *(f"  {what:<44} {_gib(n):>10}" for what, n in r.memory.lines()),
        f"  {'peak at the end of the forward':<44} {_gib(r.memory.forward_peak):>10}",
        f"  {'peak in the backward':<44} {_gib(r.memory.backward_peak):>10}",
        f"  {'peak in the optimizer step':<44} {_gib(r.memory.optimizer_peak):>10}",
        f"  {'peak allocated':<44} {_gib(r.memory.allocated):>10}",
        f"  {'peak reserved (allocated + allocator)':<44} {_gib(r.memory.total):>10}",
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
            f"({r.memory.total / r.device_memory_bytes:.0%} used; at most "
            f"{1 - FIT_MARGIN:.0%}, the estimate's error kept spare)"
        )
    if r.compile:
        lines.append(
            "note: train.compile is on: the compiled blocks fuse elementwise work and save "
            "fewer activations than counted here (an H200 run of the 100M preset allocated "
            "half the eager peak), so the activation figure is an upper bound"
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
