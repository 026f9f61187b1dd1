"""The job's configuration tree: dataclasses per section, loaded through OmegaConf.

A YAML preset from `infra/runs/` is merged onto the structured defaults, then dotted-key
overrides from the command line, and the result is converted back to dataclasses with
`OmegaConf.to_object` so that every `__post_init__` validates its section. Library code
receives only dataclasses, never a `DictConfig`.

`dataloader` and `ops` own their sections (`DataConfig`, `OpsConfig`); `cluster` extends the
root with its own section by subclassing `JobConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dataloader.config import DataConfig
from ops.config import OpsConfig


class ConfigError(ValueError):
    """A configuration a user can fix; the message names the key and the values."""


# The longest timeout or grace time a setting may ask for, in seconds.
MAX_WAIT_S = 7 * 24 * 3600


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def warn_ignored(section: str, obj: Any, keys: tuple[str, ...], why: str) -> None:
    """A warning naming each of `keys` that `obj` sets to other than its default: a setting
    that changes nothing because `why` must not pass in silence."""
    defaults = {f.name: f for f in dataclasses.fields(obj)}
    for key in keys:
        f = defaults[key]
        factory: Any = f.default_factory
        default = factory() if f.default is dataclasses.MISSING else f.default
        value = getattr(obj, key)
        if value != default:
            warnings.warn(f"{section}.{key} ({value!r}) is ignored: {why}", stacklevel=4)


@dataclass
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256
    num_shared_experts: int = 0
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    # Group-limited routing (DeepSeek-V2/V3): experts split into n_group groups, tokens
    # pick experts only inside their topk_group best groups. n_group=1 turns it off.
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    route_scale: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    # DeepSeek-V3 auxiliary-loss-free balancing: per-expert bias added to the scores for
    # selection only, updated after each step by bias_update_rate * sign(mean - load).
    bias_update_rate: float = 0.0
    # 0 = dropless; > 0 caps each expert at ceil(cf * tokens * top_k / num_experts) pairs
    # per source rank and drops the overflow (counted in the metrics).
    capacity_factor: float = 0.0
    # Which pairs an expert over capacity drops: its lowest-scoring ones ("score", as
    # DeepSeek and Megatron do) or the last ones in token order ("token_order").
    drop_policy: Literal["score", "token_order"] = "score"
    # Balance loss over the global batch, or DeepSeek-V3's sequence-wise one (each
    # sequence's own load fractions and mean scores, averaged over the sequences).
    aux_loss_scope: Literal["batch", "sequence"] = "batch"
    # Router health (trainer/router_health.py): tokens of the routing-churn probe (0 = no
    # churn figure); the collapse warning fires when an expert gets no token for
    # collapse_idle_logs logged steps in a row, or the window's load CV exceeds collapse_cv
    # (0 turns either test off).
    churn_probe_tokens: int = 256
    collapse_idle_logs: int = 5
    collapse_cv: float = 1.0
    # No collapse warning (nor `collapse` flag) at or before this training step: a fresh
    # router over the first small windows is uneven without being collapsed. The figures
    # are still computed and logged, and an expert idle since the start still counts.
    collapse_warmup_steps: int = 20

    def __post_init__(self) -> None:
        _require(self.num_experts >= 1, f"model.moe.num_experts ({self.num_experts}) must be >= 1")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"model.moe.top_k ({self.top_k}) must be between 1 and model.moe.num_experts "
            f"({self.num_experts})",
        )
        _require(
            self.expert_hidden >= 1, f"model.moe.expert_hidden ({self.expert_hidden}) must be >= 1"
        )
        _require(
            self.expert_hidden % 8 == 0,
            f"model.moe.expert_hidden ({self.expert_hidden}) must be a multiple of 8 (grouped "
            "GEMM row alignment)",
        )
        _require(self.num_shared_experts >= 0, "model.moe.num_shared_experts must be >= 0")
        _require(
            self.n_group >= 1 and self.num_experts % self.n_group == 0,
            f"model.moe.n_group ({self.n_group}) must divide model.moe.num_experts "
            f"({self.num_experts})",
        )
        _require(
            1 <= self.topk_group <= self.n_group,
            f"model.moe.topk_group ({self.topk_group}) must be between 1 and model.moe.n_group "
            f"({self.n_group})",
        )
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            _require(
                self.topk_group * per_group >= self.top_k,
                f"model.moe.top_k ({self.top_k}) exceeds the experts in model.moe.topk_group "
                f"({self.topk_group}) groups of {per_group}",
            )
        _require(
            self.capacity_factor >= 0,
            f"model.moe.capacity_factor ({self.capacity_factor}) must be >= 0",
        )
        _require(
            self.aux_loss_coef >= 0 and self.z_loss_coef >= 0,
            "model.moe loss coefficients must be >= 0",
        )
        _require(self.bias_update_rate >= 0, "model.moe.bias_update_rate must be >= 0")
        for key in ("churn_probe_tokens", "collapse_idle_logs", "collapse_warmup_steps"):
            value = getattr(self, key)
            _require(value >= 0, f"model.moe.{key} ({value}) must be >= 0")
        _require(self.collapse_cv >= 0, f"model.moe.collapse_cv ({self.collapse_cv}) must be >= 0")
        if self.drop_policy != "score" and self.capacity_factor == 0:
            warnings.warn(
                f"model.moe.drop_policy ({self.drop_policy}) is ignored: "
                "model.moe.capacity_factor is 0 (dropless)",
                stacklevel=3,
            )


@dataclass
class MLAConfig:
    """Multi-Head Latent Attention dims (DeepSeek-V2); used when model.attention is 'mla'."""

    kv_lora_rank: int = 64
    q_lora_rank: int = 0  # 0 = no query compression
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # Epsilon of the latent norms (kv_norm, q_norm); 0 = model.norm_eps. DeepSeek's released
    # models build them with 1e-6 whatever their config's rms_norm_eps.
    norm_eps: float = 0.0

    def validate(self, *, dim: int, num_heads: int) -> None:
        """Checks that the dims fit together (called by ModelConfig when attention is mla)."""
        _require(
            self.norm_eps >= 0,
            f"model.mla.norm_eps ({self.norm_eps}) must be >= 0 (0 = model.norm_eps)",
        )
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _require(
                getattr(self, key) >= 1, f"model.mla.{key} ({getattr(self, key)}) must be >= 1"
            )
        _require(self.q_lora_rank >= 0, f"model.mla.q_lora_rank ({self.q_lora_rank}) must be >= 0")
        _require(
            self.qk_rope_head_dim % 2 == 0,
            f"model.mla.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (rotary "
            "embedding rotates pairs)",
        )
        kv_up = num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        _require(
            self.kv_lora_rank < min(dim, kv_up),
            f"model.mla.kv_lora_rank ({self.kv_lora_rank}) must be smaller than model.dim "
            f"({dim}) and than model.num_heads x (model.mla.qk_nope_head_dim + "
            f"model.mla.v_head_dim) ({kv_up}): the latent is a compression of both",
        )
        q_full = num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        _require(
            self.q_lora_rank < min(dim, q_full),
            f"model.mla.q_lora_rank ({self.q_lora_rank}) must be smaller than model.dim ({dim}) "
            f"and than model.num_heads x (model.mla.qk_nope_head_dim + "
            f"model.mla.qk_rope_head_dim) ({q_full}), or 0 for no query compression",
        )


@dataclass
class RopeScalingConfig:
    """Rotary position scaling (`model.rope_scaling`): none, or YaRN (Peng et al., 2023), as the
    released DeepSeek-V2/V2-Lite/V3 configs use it (`trainer/layers.py` computes it exactly as
    transformers does).

    YaRN keeps the fast-rotating dims (more than beta_fast turns over
    original_max_seq_len) as they are, divides the slow ones (fewer than beta_slow turns) by
    `factor`, and ramps linearly between; cos and sin are multiplied by the attention factor
    (given, or mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set,
    else mscale(factor, 1), with mscale(s, m) = 0.1 m ln s + 1). Under MLA the softmax scale
    is further multiplied by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set.
    """

    type: Literal["none", "yarn"] = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0  # the context the model was pretrained with
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0  # 0 = derived from factor, mscale and mscale_all_dim
    truncate: bool = True  # round the ramp's ends to whole dims

    def __post_init__(self) -> None:
        if self.type == "none":
            warn_ignored(
                "model.rope_scaling",
                self,
                tuple(f.name for f in dataclasses.fields(self) if f.name != "type"),
                "model.rope_scaling.type is 'none'",
            )
            return
        _require(
            math.isfinite(self.factor) and self.factor >= 1,
            f"model.rope_scaling.factor ({self.factor}) must be a finite number >= 1",
        )
        _require(
            self.original_max_seq_len >= 1,
            f"model.rope_scaling.original_max_seq_len ({self.original_max_seq_len}) must be "
            "set (>= 1) for model.rope_scaling.type=yarn",
        )
        _require(
            self.beta_fast > 0 and self.beta_slow > 0,
            f"model.rope_scaling.beta_fast ({self.beta_fast}) and beta_slow ({self.beta_slow}) "
            "must be > 0",
        )
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            v = getattr(self, key)
            _require(math.isfinite(v) and v >= 0, f"model.rope_scaling.{key} ({v}) must be >= 0")


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3, section 2.2; `trainer/model.py`'s MTPModule):
    `depth` sequential modules after the main model, module k predicting the token k + 1
    positions ahead; 0 = off. Training only: evaluation and export of logits use the main
    model. `moe`: the module's transformer block is an MoE block (as DeepSeek-V3's) or a
    dense SwiGLU of model.dense_hidden."""

    depth: int = 0
    moe: bool = True

    def __post_init__(self) -> None:
        _require(self.depth >= 0, f"model.mtp.depth ({self.depth}) must be >= 0 (0 = off)")
        if self.depth == 0:
            warn_ignored("model.mtp", self, ("moe",), "model.mtp.depth is 0 (off)")


@dataclass
class ModelConfig:
    vocab_size: int = 320
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); fewer = grouped-query
    # Per-head dim of grouped-query attention; 0 = dim / num_heads. Qwen3-MoE sets it apart
    # (2048 wide, 32 heads of 128).
    head_dim: int = 0
    attention: Literal["gqa", "mla"] = "gqa"
    # RMSNorm over each head's query and key, before rotary embedding (Qwen3).
    qk_norm: bool = False
    mla: MLAConfig = field(default_factory=MLAConfig)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    # The first num_dense_layers blocks use a dense SwiGLU of hidden dense_hidden (DeepSeek
    # keeps the first layers dense); the rest are MoE.
    num_dense_layers: int = 0
    dense_hidden: int = 512
    tie_embeddings: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)

    def __post_init__(self) -> None:
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        _require(
            self.head_dim >= 0, f"model.head_dim ({self.head_dim}) must be >= 0 (0 = dim / heads)"
        )
        _require(
            self.dim >= 1 and self.num_layers >= 1, "model.dim and model.num_layers must be >= 1"
        )
        _require(self.num_heads >= 1, f"model.num_heads ({self.num_heads}) must be >= 1")
        if self.attention == "mla":
            # MLA's head dims are its own (model.mla.*); it has no separate key/value heads.
            _require(
                self.num_kv_heads == self.num_heads,
                f"model.num_kv_heads ({self.num_kv_heads}) does not apply to "
                f"model.attention=mla (every head has its own keys and values, rebuilt from "
                f"one latent); leave it 0 or equal to model.num_heads ({self.num_heads})",
            )
            _require(
                not self.qk_norm,
                "model.qk_norm=true does not apply to model.attention=mla (its queries and keys "
                "are rebuilt from normalized latents: model.mla.q_lora_rank, kv_norm)",
            )
            _require(
                self.head_dim in (0, self.dim // self.num_heads),
                f"model.head_dim ({self.head_dim}) does not apply to model.attention=mla (its "
                "head dims are model.mla.*); leave it 0",
            )
            self.mla.validate(dim=self.dim, num_heads=self.num_heads)
        else:
            _require(
                self.head_dim > 0 or self.dim % self.num_heads == 0,
                f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads}), "
                "or model.head_dim set",
            )
            if self.head_dim == 0:
                # Resolved here, as num_kv_heads is (load_config puts the 0 back for presets).
                self.head_dim = self.dim // self.num_heads
            _require(
                self.num_heads % self.num_kv_heads == 0,
                f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                f"({self.num_kv_heads})",
            )
            _require(
                self.head_dim % 2 == 0,
                f"model.head_dim ({self.head_dim}; 0 = model.dim / model.num_heads) must be even "
                "(rotary embedding rotates pairs)",
            )
        _require(
            0 <= self.num_dense_layers <= self.num_layers,
            f"model.num_dense_layers ({self.num_dense_layers}) must be between 0 and "
            f"model.num_layers ({self.num_layers})",
        )
        _require(
            self.dim % 8 == 0,
            f"model.dim ({self.dim}) must be a multiple of 8 (grouped GEMM alignment)",
        )
        _require(self.vocab_size >= 2, f"model.vocab_size ({self.vocab_size}) must be >= 2")
        if self.attention != "mla":
            warn_ignored(
                "model.mla",
                self.mla,
                tuple(f.name for f in dataclasses.fields(MLAConfig)),
                f"model.attention is {self.attention!r}",
            )
        if self.num_dense_layers == 0 and not (self.mtp.depth and not self.mtp.moe):
            warn_ignored(
                "model", self, ("dense_hidden",), "model.num_dense_layers is 0 (every layer MoE)"
            )
        if self.attention != "mla" and self.rope_scaling.mscale_all_dim:
            warnings.warn(
                f"model.rope_scaling.mscale_all_dim ({self.rope_scaling.mscale_all_dim}) is "
                "ignored: it scales MLA's softmax only (model.attention is 'gqa'); the rotary "
                "attention factor still applies",
                stacklevel=3,
            )

    @property
    def latent_norm_eps(self) -> float:
        """Epsilon of MLA's latent norms: model.mla.norm_eps, or model.norm_eps when 0."""
        return self.mla.norm_eps or self.norm_eps

    @property
    def rope_dim(self) -> int:
        """Dims rotary embedding rotates per head: MLA's rotary key, else the head."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim


@dataclass
class ParallelConfig:
    """The layout: world = dp_replicate x dp_shard; ep borrows its ranks from dp_shard.

    Dense parameters are FSDP-sharded over dp_shard and replicated over dp_replicate (HSDP);
    experts are split over ep and sharded over dp_shard / ep (see `trainer/mesh.py`). With
    the defaults, `parallel.ep` alone means what it always meant: ep ranks share the
    experts, and every rank trains on its own slice of the global batch.
    """

    dp_replicate: int = 1  # HSDP replicas; 1 = plain FSDP
    dp_shard: int = -1  # FSDP shard degree; -1 = world size / dp_replicate
    ep: int = 1  # expert-parallel degree; must divide dp_shard
    # Whether a block's gathered weights are freed after its forward and gathered again in
    # backward (less memory, one more all-gather per block): default = every block but the
    # last (whose backward starts right away), always, or never (ZeRO-2-like).
    reshard_after_forward: Literal["default", "always", "never"] = "default"
    # How token rows move between EP ranks (trainer/dispatch.py): p2p = one message per
    # (rank, local expert) chunk, received straight into the grouped GEMM's order, no regroup
    # copies; all_to_all = one all_to_all_single per direction plus a regroup copy each way;
    # auto = p2p on gloo, all_to_all on NCCL.
    ep_exchange: Literal["auto", "p2p", "all_to_all"] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # Seconds a collective may wait before the run fails naming it (a dead or hung rank).
    timeout_s: float = 600.0
    # Ranks the layout is written for; 0 = whatever the launcher starts. When set, a launch
    # with another number of ranks fails, and `--dry-run` sizes the job for this many.
    world_size: int = 0
    # Usable memory of one device, for the dry run's fit check; 0 = no check.
    device_memory_gib: float = 0.0

    def __post_init__(self) -> None:
        _require(self.ep >= 1, f"parallel.ep ({self.ep}) must be >= 1")
        _require(
            self.dp_replicate >= 1, f"parallel.dp_replicate ({self.dp_replicate}) must be >= 1"
        )
        _require(
            self.dp_shard == -1 or self.dp_shard >= 1,
            f"parallel.dp_shard ({self.dp_shard}) must be >= 1, or -1 for the rest of the world",
        )
        if self.dp_shard != -1:
            _require(
                self.dp_shard % self.ep == 0,
                f"parallel.ep ({self.ep}) must divide parallel.dp_shard ({self.dp_shard}): "
                "expert parallelism borrows its ranks from the sharded data-parallel dim",
            )
        # Bounded: the process group takes it as a timedelta, timers as a platform time_t.
        _require(
            0 < self.timeout_s <= MAX_WAIT_S,
            f"parallel.timeout_s ({self.timeout_s}) must be > 0 and at most {MAX_WAIT_S} (7 days)",
        )
        _require(self.world_size >= 0, f"parallel.world_size ({self.world_size}) must be >= 0")
        if self.ep == 1:
            warn_ignored("parallel", self, ("ep_exchange",), "parallel.ep is 1 (rows stay local)")
        if self.world_size:
            self.degrees(self.world_size, where="parallel.world_size")
        _require(
            self.device_memory_gib >= 0,
            f"parallel.device_memory_gib ({self.device_memory_gib}) must be >= 0",
        )

    def degrees(self, world_size: int, *, where: str = "world size") -> tuple[int, int]:
        """(dp_replicate, dp_shard) at `world_size` ranks.

        Raises:
            ConfigError: dp_replicate x dp_shard is not the world size, or ep does not
                divide dp_shard; the message names the keys and the numbers.
        """
        R = self.dp_replicate
        _require(
            world_size % R == 0,
            f"{where} ({world_size}) must be divisible by parallel.dp_replicate ({R})",
        )
        shard = world_size // R if self.dp_shard == -1 else self.dp_shard
        _require(
            R * shard == world_size,
            f"parallel.dp_replicate ({R}) x parallel.dp_shard ({shard}) = {R * shard} must "
            f"equal the {where} ({world_size})",
        )
        if R == 1 and self.dp_shard == -1:
            # The default layout: dp_shard is the world, so say it in the world's terms.
            _require(
                world_size % self.ep == 0,
                f"{where} ({world_size}) must be divisible by parallel.ep ({self.ep})",
            )
        _require(
            shard % self.ep == 0,
            f"parallel.ep ({self.ep}) must divide parallel.dp_shard ({shard} = {where} "
            f"{world_size} / parallel.dp_replicate {R}): expert parallelism borrows its ranks "
            "from the sharded data-parallel dim",
        )
        return R, shard

    def usable(self, world_size: int) -> bool:
        """Whether `degrees` accepts `world_size` (elastic sizing picks only those)."""
        try:
            self.degrees(world_size)
        except ConfigError:
            return False
        return True


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    micro_batch_size: int = 4  # rows per rank per micro-step
    seq_len: int = 128
    grad_accum: int = 1
    # Rows per optimizer step over all ranks; 0 = micro_batch_size x world size x
    # grad_accum. Set, it holds at every world size and grad_accum follows from it
    # (`grad_accum_for`): the same preset trains the same way on 1 rank and on 8.
    global_batch_size: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = no clipping
    # Multi-token prediction (model.mtp.depth > 0): lambda, the weight of the mean of the
    # depths' cross-entropies added to the loss (DeepSeek-V3: 0.3, then 0.1 late in training).
    mtp_loss_weight: float = 0.3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 on GPU (FSDP bf16 parameters with fp32 gradient reduction and fp32 master
    # weights; in one process bf16 copies of the fp32 weights made once a step and fp32
    # gradient accumulation, trainer/precision.py), fp32 on CPU.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # Activation checkpointing per transformer block: none; full (keep only each block's
    # input, recompute the rest in backward); selective (keep matmul outputs, the
    # all-to-all outputs and the router's top-k: recompute never repeats a collective or
    # changes a routing decision).
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    # torch.compile per transformer block (after activation checkpointing, before FSDP).
    compile: bool = False
    # The next-token loss over this many tokens at a time (trainer/loss.py): the whole
    # micro-batch's fp32 logits and log-softmax never exist at once, and the gradients are
    # computed chunk by chunk in the forward; 0 = all tokens at once (the logits
    # materialized, as with distillation, which needs them).
    loss_chunk_tokens: int = 0
    # torch: the loss above; liger: Liger-Kernel's fused linear cross-entropy (CUDA, the
    # optional `gpu` extra), which chunks by itself.
    loss_kernel: Literal["torch", "liger"] = "torch"
    # Loss guard: skip a step with a non-finite loss or gradient norm, or (spike_factor > 0)
    # a loss above spike_factor x the running mean; stop after max_bad_steps in a row.
    loss_guard: bool = True
    spike_factor: float = 0.0
    max_bad_steps: int = 3
    # On SIGTERM (preemption) the loop finishes its step, saves a checkpoint and stops; this
    # long at most, else it exits without one (trainer/resilience.py).
    preempt_grace_s: float = 60.0
    # What max_bad_steps bad steps in a row do: "abort" stops the run; "rollback" reloads
    # the newest checkpoint and goes on with the data after the bad steps (the samples in
    # between are passed over and reported), at most max_rollbacks times in a run.
    on_bad_steps: Literal["abort", "rollback"] = "abort"
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        _require(
            self.spike_factor == 0 or self.spike_factor > 1,
            f"train.spike_factor ({self.spike_factor}) must be 0 (off) or > 1",
        )
        _require(
            self.max_bad_steps >= 1, f"train.max_bad_steps ({self.max_bad_steps}) must be >= 1"
        )
        _require(
            self.max_rollbacks >= 0, f"train.max_rollbacks ({self.max_rollbacks}) must be >= 0"
        )
        _require(
            0 < self.preempt_grace_s <= MAX_WAIT_S,
            f"train.preempt_grace_s ({self.preempt_grace_s}) must be > 0 and at most "
            f"{MAX_WAIT_S} (7 days)",
        )
        for key in ("steps", "micro_batch_size", "seq_len", "grad_accum"):
            _require(getattr(self, key) >= 1, f"train.{key} ({getattr(self, key)}) must be >= 1")
        _require(
            self.global_batch_size >= 0 and self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size ({self.global_batch_size}) must be 0 (micro_batch_size "
            f"x world size x grad_accum) or a multiple of train.micro_batch_size "
            f"({self.micro_batch_size})",
        )
        _require(self.lr > 0, f"train.lr ({self.lr}) must be > 0")
        _require(
            0 <= self.min_lr_ratio <= 1,
            f"train.min_lr_ratio ({self.min_lr_ratio}) must be in [0, 1]",
        )
        _require(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must be >= 0")
        _require(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must be >= 0")
        _require(
            self.loss_chunk_tokens >= 0,
            f"train.loss_chunk_tokens ({self.loss_chunk_tokens}) must be >= 0 (0 = whole)",
        )
        if self.loss_kernel == "liger":
            warn_ignored(
                "train",
                self,
                ("loss_chunk_tokens",),
                "train.loss_kernel is 'liger', which chunks the loss by itself",
            )
        _require(
            math.isfinite(self.mtp_loss_weight) and self.mtp_loss_weight >= 0,
            f"train.mtp_loss_weight ({self.mtp_loss_weight}) must be a finite number >= 0",
        )

        if not self.loss_guard:
            warn_ignored(
                "train",
                self,
                ("spike_factor", "max_bad_steps", "on_bad_steps", "max_rollbacks"),
                "train.loss_guard is false",
            )


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 = none
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step forever; 0 = off
    async_save: bool = True
    resume: bool = True
    load_step: int = -1  # -1 = newest complete checkpoint
    # A failed save is tried again `retries` times, waiting backoff_s, 2 * backoff_s, ...
    # in between; then the run fails with the last error.
    retries: int = 3
    backoff_s: float = 2.0
    # A new run's weights (not its optimizer state or step) from a transformers checkpoint
    # directory or a moeyard checkpoint, any URL; resume still wins when run.output_dir
    # holds a checkpoint (trainer/init_from.py).
    init_from: str = ""
    # With init_from a dense Llama/Mistral/Qwen2-style checkpoint: build the MoE from it
    # (sparse upcycling, trainer/init_from.py).
    upcycle: bool = False

    def __post_init__(self) -> None:
        if not self.resume:
            warn_ignored(
                "checkpoint", self, ("load_step",), "checkpoint.resume is false (starts over)"
            )
        _require(
            not self.upcycle or bool(self.init_from),
            "checkpoint.upcycle=true needs checkpoint.init_from (the dense checkpoint to upcycle)",
        )
        _require(self.every >= 0, f"checkpoint.every ({self.every}) must be >= 0")
        _require(self.keep_last >= 1, f"checkpoint.keep_last ({self.keep_last}) must be >= 1")
        _require(self.keep_every >= 0, f"checkpoint.keep_every ({self.keep_every}) must be >= 0")
        _require(self.retries >= 0, f"checkpoint.retries ({self.retries}) must be >= 0")
        _require(self.backoff_s >= 0, f"checkpoint.backoff_s ({self.backoff_s}) must be >= 0")
        _require(self.load_step >= -1, f"checkpoint.load_step ({self.load_step}) must be >= -1")


@dataclass
class FaultsConfig:
    """Faults injected on purpose at chosen steps, to rehearse the loss guard
    (`trainer/fault_hook.py`, runbooks/loss-spike-or-nan.md). Off when the lists are empty.

    Each listed step (1-based, as logged) is injected on its first pass only: a step trained
    again after a loss-guard rollback or a restart of the same run is left alone (the run
    records the injected steps in `run.output_dir`), so a rehearsal ends instead of
    diverging forever.
    """

    # The step's loss is multiplied by NaN on every rank (its gradients follow).
    nonfinite_loss_steps: list[int] = field(default_factory=list)
    # The step's loss is multiplied by loss_spike_factor on every rank.
    loss_spike_steps: list[int] = field(default_factory=list)
    loss_spike_factor: float = 10.0

    def __post_init__(self) -> None:
        if not self.loss_spike_steps:
            warn_ignored("faults", self, ("loss_spike_factor",), "faults.loss_spike_steps is empty")
        seen: dict[int, str] = {}
        for key in ("nonfinite_loss_steps", "loss_spike_steps"):
            for step in getattr(self, key):
                _require(
                    step >= 1,
                    f"faults.{key} ({getattr(self, key)}) holds {step}: steps count from 1",
                )
                _require(
                    step not in seen,
                    f"faults.{key} ({getattr(self, key)}) holds step {step}, which is already "
                    f"in faults.{seen.get(step)}: one fault per step",
                )
                seen[step] = key
        _require(
            math.isfinite(self.loss_spike_factor) and self.loss_spike_factor > 1,
            f"faults.loss_spike_factor ({self.loss_spike_factor}) must be a finite number > 1",
        )

    @property
    def steps(self) -> list[int]:
        """Every step with a fault, sorted."""
        return sorted([*self.nonfinite_loss_steps, *self.loss_spike_steps])


@dataclass
class EvalConfig:
    """Validation (trainer/evaluate.py): the loss on held-out data every `every` steps.

    The evaluation set is the first `steps` x `batch_size` rows of the prepared dataset at
    `path`, in file order: the same fixed batches every time and at every world size (the
    ranks split each batch; the loss is summed over all its tokens).
    """

    every: int = 0  # steps between evaluations; 0 = off
    # A prepared dataset (any fsspec URL); empty = `data.path`/val, the split `moeyard
    # prepare --val-fraction` writes, when data.source is shards.
    path: str = ""
    steps: int = 10  # batches per evaluation
    batch_size: int = 8  # rows per batch, over all ranks (at least one per rank)

    def __post_init__(self) -> None:
        _require(self.every >= 0, f"eval.every ({self.every}) must be >= 0 (0 = off)")
        _require(self.steps >= 1, f"eval.steps ({self.steps}) must be >= 1")
        _require(self.batch_size >= 1, f"eval.batch_size ({self.batch_size}) must be >= 1")


@dataclass
class DistillConfig:
    """Knowledge distillation (trainer/distill.py): the loss is (1 - alpha) x next-token
    cross-entropy + alpha x T^2 x KL(teacher || student) at temperature T, on the same batch.
    """

    # An exported moeyard checkpoint (`moeyard export`: model.safetensors + config.yaml),
    # any fsspec URL; empty = no distillation.
    teacher: str = ""
    alpha: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.alpha) and 0 <= self.alpha <= 1,
            f"distill.alpha ({self.alpha}) must be in [0, 1]",
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"distill.temperature ({self.temperature}) must be a finite number > 0",
        )


@dataclass
class RunConfig:
    name: str = "moeyard"
    output_dir: str = "runs/moeyard"  # any fsspec URL: s3://..., file://..., a local path
    log_every: int = 1

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "run.output_dir must not be empty")
        _require(self.log_every >= 1, f"run.log_every ({self.log_every}) must be >= 1")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        self._check_eval_and_distill()
        _require(
            self.train.seq_len > self.model.mtp.depth,
            f"train.seq_len ({self.train.seq_len}) must exceed model.mtp.depth "
            f"({self.model.mtp.depth}): depth k predicts the token k + 1 ahead",
        )
        if not self.model.mtp.depth:
            warn_ignored(
                "train", self.train, ("mtp_loss_weight",), "model.mtp.depth is 0 (no MTP modules)"
            )
        _require(
            self.train.seq_len <= self.model.max_seq_len,
            f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})",
        )
        _require(
            self.model.moe.num_experts % self.parallel.ep == 0,
            f"model.moe.num_experts ({self.model.moe.num_experts}) must be divisible by "
            f"parallel.ep ({self.parallel.ep})",
        )
        for key in ("nonfinite_loss_steps", "loss_spike_steps"):
            late = [s for s in getattr(self.faults, key) if s > self.train.steps]
            _require(
                not late,
                f"faults.{key} holds step(s) {late} beyond train.steps ({self.train.steps}): "
                "such a fault would never be injected",
            )
        if self.parallel.world_size:
            grad_accum_for(self, self.parallel.world_size)  # raises naming the keys

    def _check_eval_and_distill(self) -> None:
        ev = self.eval
        if ev.every and not ev.path:
            _require(
                self.data.source == "shards",
                f"eval.every ({ev.every}) needs eval.path: it defaults to data.path/val only "
                f"when data.source is 'shards' (it is {self.data.source!r})",
            )
            ev.path = self.data.path.rstrip("/") + "/val"
        if not ev.every:
            for key, default in (("path", ""), ("steps", 10), ("batch_size", 8)):
                if getattr(ev, key) != default:
                    warnings.warn(
                        f"eval.{key} ({getattr(ev, key)!r}) is ignored: eval.every is 0 (off)",
                        stacklevel=3,
                    )
        d = self.distill
        if d.teacher:
            warn_ignored(
                "train",
                self.train,
                ("loss_chunk_tokens", "loss_kernel"),
                "distillation (distill.teacher) needs the student's whole logits",
            )
        if not d.teacher and (d.alpha, d.temperature) != (0.5, 1.0):
            warnings.warn(
                f"distill.alpha ({d.alpha}) and distill.temperature ({d.temperature}) are ignored: "
                "distill.teacher is empty (no distillation)",
                stacklevel=3,
            )

    def check_world(self, world_size: int) -> int:
        """Validates the layout against a world size and returns the data-parallel degree.

        Raises:
            ConfigError: the world size does not fit parallel.dp_replicate x
                parallel.dp_shard with parallel.ep dividing dp_shard, or differs from
                parallel.world_size when that is set.
        """
        _require(
            self.parallel.world_size in (0, world_size),
            f"the launcher started {world_size} ranks but parallel.world_size is "
            f"{self.parallel.world_size}",
        )
        self.parallel.degrees(world_size)
        return world_size // self.parallel.ep


def grad_accum_for(cfg: JobConfig, world_size: int) -> int:
    """The micro-steps per optimizer step on `world_size` ranks.

    Every rank reads its own slice of the global batch, so the data-parallel size is the
    world size: with `train.global_batch_size` set, grad_accum = global_batch_size /
    (micro_batch_size x world_size); without it, `train.grad_accum` as given.

    Raises:
        ConfigError: the global batch does not split into whole micro-batches over the
            ranks, or a `train.grad_accum` other than 1 disagrees with the derived one.
    """
    t = cfg.train
    if not t.global_batch_size:
        return t.grad_accum
    rows = t.micro_batch_size * world_size  # one micro-step over all ranks
    _require(
        t.global_batch_size % rows == 0,
        f"train.global_batch_size ({t.global_batch_size}) must be divisible by "
        f"train.micro_batch_size ({t.micro_batch_size}) x the data-parallel size "
        f"({world_size} ranks) = {rows}",
    )
    accum = t.global_batch_size // rows
    _require(
        t.grad_accum in (1, accum),
        f"train.grad_accum ({t.grad_accum}) disagrees with train.global_batch_size "
        f"({t.global_batch_size}) / (train.micro_batch_size ({t.micro_batch_size}) x "
        f"{world_size} ranks) = {accum}; set only one of them",
    )
    return accum


C = TypeVar("C", bound=JobConfig)

# Sections that belong to a launcher's schema (cluster/ extends JobConfig with them).
LAUNCHER_SECTIONS = ("cluster",)


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    schema: type[C] = JobConfig,  # type: ignore[assignment]
    ignore_sections: tuple[str, ...] | None = None,
) -> C:
    """Loads a YAML preset plus `key=value` overrides into the dataclass tree `schema`.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: OmegaConf dotted keys, e.g. `train.steps=20`.
        schema: the root dataclass (`cluster` passes a subclass with its own section).
        ignore_sections: top-level YAML sections that this entrypoint does not read; they
            are dropped, not validated. None: the launcher sections the schema lacks (the
            `cluster` section when loading a plain JobConfig, under `torchrun`).

    Raises:
        ConfigError: a missing file, an unknown key, a value of the wrong type, or a value
            that fails validation; the message names the file and the key.
    """
    where = str(path) if path is not None else "<defaults>"
    if ignore_sections is None:
        fields = {f.name for f in dataclasses.fields(schema)}
        ignore_sections = tuple(s for s in LAUNCHER_SECTIONS if s not in fields)
    try:
        base = OmegaConf.structured(schema)
        # The default ModelConfig resolved num_kv_heads (0 = num_heads) against the default
        # num_heads; put the 0 back so a preset that sets only num_heads gets multi-head.
        base.model.num_kv_heads = 0
        base.model.head_dim = 0
        # Likewise data.source: the default resolved "auto" against an empty data section;
        # put "auto" back so that it follows from the data.path or data.mix a layer sets.
        base.data.source = "auto"
        layers = [base]
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(os.fspath(path))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where} is not valid YAML: {e}") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{where} must hold a mapping of sections, not a list or scalar")
            for section in ignore_sections:
                loaded.pop(section, None)
            layers.append(loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0].lstrip("+")
            if key.split(".", 1)[0] in ignore_sections:
                continue
            try:
                layers.append(OmegaConf.from_dotlist([item]))
            # OmegaConf raises IndexError/KeyError/TypeError on some malformed keys ("[=0").
            except (
                yaml.YAMLError,
                OmegaConfBaseException,
                ValueError,
                IndexError,
                KeyError,
                TypeError,
            ) as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"override {item!r} cannot be parsed: {msg}") from None
        try:
            merged = OmegaConf.merge(*layers)
        except TypeError:
            # A mapping where the schema has a list (faults.*_steps={a: 1}), or the reverse:
            # OmegaConf says only "incompatible container types"; name the layer that has it.
            raise ConfigError(_shape_error(layers, where, overrides)) from None
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid config key {key!r}: {msg}") from None
    except ValueError as e:  # raised by a __post_init__ through OmegaConf
        raise ConfigError(f"{where}: {e}") from None
    assert isinstance(obj, schema)
    return obj


def _shape_error(layers: list[Any], where: str, overrides: list[str] | tuple[str, ...]) -> str:
    """Names the first layer (the file, or an override) whose merge fails on a container of
    the wrong kind."""
    merged = layers[0]
    for layer in layers[1:]:
        try:
            merged = OmegaConf.merge(merged, layer)
        except TypeError:
            item = next((o for o in overrides if _parses_to(o, layer)), None)
            what = f"override {item!r}" if item is not None else where
            return (
                f"{what}: a value has the wrong shape for its key (a mapping where a list is "
                "expected, or the reverse)"
            )
    return f"{where}: a value has the wrong shape for its key"


def _parses_to(item: str, layer: Any) -> bool:
    try:
        return bool(OmegaConf.from_dotlist([item]) == layer)
    except Exception:  # an override the loader skipped (another entrypoint's section)
        return False


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what is written beside the run's outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
