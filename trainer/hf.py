"""Hugging Face transformers checkpoints: which architecture a moeyard model is, its
`config.json`, the name and layout of every tensor in both directions, and a reader for
sharded safetensors directories on any fsspec URL that fetches one tensor at a time.

Shape legend: E experts, D model dim, F expert hidden, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, C kv_lora_rank.

One table per architecture (`Arch`, in `ARCHS`): its transformers class, the settings it
cannot compute, its `config.json` fields in both directions and the names of its tensors.
The code that walks a model's layers reads the tables and never asks which architecture it
has: the next architecture is a new table. Tested against transformers 5.x, whose modeling
code is the reference:

    moeyard                                   transformers
    model.attention=gqa, softmax top-k > 1    MixtralForCausalLM
      with normalized weights, no shared
      experts, dense layers or q/k norm
    model.attention=gqa with model.qk_norm,   Qwen3MoeForCausalLM
      softmax top-k, no shared experts,
      optional dense first layers
      (mlp_only_layers)
    model.attention=mla, softmax, weights     DeepseekV2ForCausalLM
      not normalized, shared experts,
      optional group-limited routing and
      dense first layers
    model.attention=mla, sigmoid scores with  DeepseekV3ForCausalLM
      the selection bias, shared experts,
      group-limited routing, dense first
      layers, multi-token prediction
    a dense Llama/Mistral/Qwen2 checkpoint    (input only) the attention, norms and
                                              embeddings of an upcycled MoE

Rotary scaling (none or YaRN, `model.rope_scaling`) maps to `rope_parameters` (and the 4.x
`rope_scaling` block) in every architecture. Anything a table refuses (for instance sigmoid
scores with GQA, shared experts with GQA, top-1 with normalized weights, a latent-norm
epsilon other than DeepSeek's fixed 1e-6) has no transformers class that computes the same
function, and `architecture` raises naming every setting in the way.

Layouts that differ:
- experts: moeyard stacks them per layer as w1/w3 [E, D, F] and w2 [E, F, D] (saved per
  global id, `...experts.<id>.w1` of [D, F]); the files transformers writes and the Hub
  holds keep one nn.Linear per expert, [out, in]: Mixtral's `experts.<id>.w1/w3.weight`
  [F, D] and `w2.weight` [D, F], the others' `gate_proj/up_proj/down_proj`. transformers 5
  fuses them in memory (`gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]) and writes the
  per-expert layout back on save; both are read here, the per-expert one is written.
- rotary embedding under MLA: moeyard rotates halves (pair j is dims j and j + R/2),
  DeepSeek's weights rotate interleaved pairs (2i, 2i + 1): the rotary rows of the query
  projection (per head) and of the shared rotary key (`kv_a_proj_with_mqa`'s last R rows)
  are permuted. Mixtral, Qwen3 and Llama rotate halves, as moeyard does.
- router: `ffn.router.weight` [E, D] is the MoE block's `gate.weight`, and DeepSeek-V3's
  `gate.e_score_correction_bias` is `ffn.router.expert_bias`; both stay fp32 whatever the
  export dtype.
- multi-token prediction (DeepSeek-V3): MTP depth k is written as the released checkpoints
  hold it, as layer num_layers + k - 1 after the last one (transformers' model skips it on
  load; its MtpModel reads it): `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the block's
  own tensors, and copies of the shared embedding (`embed_tokens`) and head
  (`shared_head.head`). On import the copies are checked equal to the main ones.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import torch
from torch import Tensor

from trainer.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig, RopeScalingConfig

MIXTRAL = "MixtralForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
DEEPSEEK_V2 = "DeepseekV2ForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
DENSE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# DeepSeek's modeling code builds q_a_layernorm / kv_a_layernorm with this epsilon whatever
# the config's rms_norm_eps; moeyard's latent norms use model.mla.norm_eps (0 = norm_eps).
DEEPSEEK_LATENT_EPS = 1e-6

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"

Transform = Literal["copy", "t", "rope_q", "rope_kv"]


class HFError(ValueError):
    """A Hugging Face checkpoint or a model config that cannot be mapped; the message names
    the file, the tensor or the config key."""


# --- the tables ------------------------------------------------------------------------


@dataclass(frozen=True)
class MTPNames:
    """Where an architecture keeps MTP depth k (0-based): at `model.layers.<L + k>.`, these
    tensors beside the block's own."""

    enorm: str = "enorm.weight"
    hnorm: str = "hnorm.weight"
    proj: str = "eh_proj.weight"
    norm: str = "shared_head.norm.weight"
    embed_copy: str = "embed_tokens.weight"
    head_copy: str = "shared_head.head.weight"


@dataclass(frozen=True)
class Arch:
    """One transformers architecture (see the module docstring).

    refuse(cfg): the settings of `cfg` this class does not compute, each naming its key
    (empty: it computes `cfg`). config_out(cfg): its `config.json` fields beyond the common
    ones. config_in(hf, where): the ModelConfig fields beyond the common ones (raises
    HFError on a setting moeyard does not compute).
    """

    cls: str
    model_type: str
    attention: Literal["gqa", "mla"]
    refuse: Callable[[ModelConfig], list[str]]
    config_out: Callable[[ModelConfig], dict[str, Any]]
    config_in: Callable[[dict[str, Any], str], dict[str, Any]]
    moe_block: str = "mlp."  # the MoE block's prefix in a layer
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # w1, w3, w2
    dense_mlp: str = "mlp."  # a dense layer's SwiGLU
    shared_experts: str | None = None  # inside the MoE block
    router_bias: str | None = None  # the selection bias, inside the MoE block
    mtp: MTPNames | None = None


def _softmax_routing(cfg: ModelConfig, name: str) -> list[str]:
    moe, why = cfg.moe, []
    if moe.score_func != "softmax":
        why.append(f"model.moe.score_func={moe.score_func} ({name} scores with softmax)")
    if moe.bias_update_rate > 0:
        why.append(
            f"model.moe.bias_update_rate={moe.bias_update_rate} (the selection bias has no "
            f"place in {name})"
        )
    return why


def _no_mtp(cfg: ModelConfig, name: str) -> list[str]:
    if cfg.mtp.depth:
        return [f"model.mtp.depth={cfg.mtp.depth} ({name} has no multi-token prediction)"]
    return []


def _normalized_top1(cfg: ModelConfig, name: str) -> list[str]:
    # moeyard leaves a single expert's weight as its score; transformers divides it by
    # itself (1.0).
    if cfg.moe.top_k == 1 and cfg.moe.norm_topk_prob:
        return [
            f"model.moe.top_k=1 with model.moe.norm_topk_prob=true ({name} would give the "
            "expert weight 1, moeyard its score)"
        ]
    return []


def _gqa_only(cfg: ModelConfig, name: str) -> list[str]:
    moe, why = cfg.moe, []
    if cfg.attention != "gqa":
        why.append(f"model.attention={cfg.attention} ({name} is grouped-query attention)")
    if moe.num_shared_experts:
        why.append(
            f"model.moe.num_shared_experts={moe.num_shared_experts} with GQA ({name} has no "
            "shared experts)"
        )
    if moe.n_group > 1:
        why.append(f"model.moe.n_group={moe.n_group} with GQA ({name} routes without groups)")
    if moe.route_scale != 1.0:
        why.append(f"model.moe.route_scale={moe.route_scale} ({name} has no scaling)")
    return why


def _mla_only(cfg: ModelConfig, name: str) -> list[str]:
    why = []
    if cfg.attention != "mla":
        why.append(f"model.attention={cfg.attention} ({name} is Multi-Head Latent Attention)")
    elif cfg.latent_norm_eps != DEEPSEEK_LATENT_EPS:
        why.append(
            f"model.mla.norm_eps={cfg.mla.norm_eps:g} (0: model.norm_eps={cfg.norm_eps:g}); "
            f"{name}'s latent norms are fixed at {DEEPSEEK_LATENT_EPS:g}"
        )
    if not cfg.moe.num_shared_experts:
        why.append(f"model.moe.num_shared_experts=0 ({name} always has shared experts)")
    return why


def _mixtral_refuse(cfg: ModelConfig) -> list[str]:
    moe, name = cfg.moe, "Mixtral"
    why = _gqa_only(cfg, name) + _softmax_routing(cfg, name)
    if cfg.num_dense_layers:
        why.append(f"model.num_dense_layers={cfg.num_dense_layers} with GQA and no q/k norm")
    if moe.top_k == 1 or not moe.norm_topk_prob:
        why.append(
            f"model.moe.top_k={moe.top_k}, model.moe.norm_topk_prob={moe.norm_topk_prob} "
            "(Mixtral always renormalizes the top-k weights, so it needs top_k > 1 and "
            "norm_topk_prob=true)"
        )
    if cfg.qk_norm:
        why.append("model.qk_norm=true (Mixtral has no q/k norm)")
    return why + _no_mtp(cfg, name)


def _qwen3_refuse(cfg: ModelConfig) -> list[str]:
    name = "Qwen3-MoE"
    why = _gqa_only(cfg, name) + _softmax_routing(cfg, name) + _normalized_top1(cfg, name)
    if not cfg.qk_norm:
        why.append("model.qk_norm=false (Qwen3-MoE normalizes each head's query and key)")
    return why + _no_mtp(cfg, name)


def _v2_refuse(cfg: ModelConfig) -> list[str]:
    name = "DeepSeek-V2"
    why = _mla_only(cfg, name) + _softmax_routing(cfg, name)
    if cfg.moe.norm_topk_prob and cfg.moe.top_k > 1:
        why.append(
            "model.moe.norm_topk_prob=true (transformers' DeepSeek-V2 never renormalizes "
            "the top-k weights)"
        )
    return why + _no_mtp(cfg, name)


def _v3_refuse(cfg: ModelConfig) -> list[str]:
    moe, name = cfg.moe, "DeepSeek-V3"
    why = _mla_only(cfg, name) + _normalized_top1(cfg, name)
    if moe.score_func != "sigmoid":
        why.append(f"model.moe.score_func={moe.score_func} (DeepSeek-V3 scores with sigmoid)")
    if moe.n_group > 1 and moe.num_experts // moe.n_group < 2:
        why.append(
            f"model.moe.n_group={moe.n_group} with {moe.num_experts} experts (DeepSeek-V3 ranks "
            "a group by its two best experts)"
        )
    if cfg.mtp.depth and not cfg.mtp.moe:
        why.append("model.mtp.moe=false (DeepSeek-V3's MTP block is an MoE block)")
    return why


def _gqa_out(cfg: ModelConfig) -> dict[str, Any]:
    return {"num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}


def _mixtral_out(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    return {
        **_gqa_out(cfg),
        "intermediate_size": moe.expert_hidden,
        "num_local_experts": moe.num_experts,
        "sliding_window": None,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def _qwen3_out(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    return {
        **_gqa_out(cfg),
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": moe.num_experts,
        "norm_topk_prob": moe.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.num_dense_layers)),
        "use_sliding_window": False,
        "sliding_window": None,
        "attention_bias": False,
        "router_aux_loss_coef": moe.aux_loss_coef,
    }


def _mla_out(cfg: ModelConfig) -> dict[str, Any]:
    m, moe = cfg.mla, cfg.moe
    return {
        "num_key_value_heads": cfg.num_heads,
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "first_k_dense_replace": cfg.num_dense_layers,
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank or None,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "routed_scaling_factor": moe.route_scale,
        "attention_bias": False,
    }


def _v2_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_mla_out(cfg),
        "topk_method": "group_limited_greedy" if cfg.moe.n_group > 1 else "greedy",
        "norm_topk_prob": False,
        "mlp_bias": False,
    }


def _v3_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_mla_out(cfg),
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": cfg.moe.norm_topk_prob,
        "rope_interleave": True,
        # The released configs' key; transformers maps it to num_mtp_layers.
        "num_nextn_predict_layers": cfg.mtp.depth,
    }


def _gqa_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if hf.get("attention_bias"):
        raise HFError(f"{where}: attention_bias=true (moeyard's projections have no bias)")
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", True):
        raise HFError(f"{where}: sliding_window={window} (moeyard attends to the whole sequence)")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or dim // heads)
    return {
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
    }


def _mixtral_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    return {
        **_gqa_in(hf, where),
        "moe": MoEConfig(
            num_experts=int(hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            expert_hidden=int(hf["intermediate_size"]),
            norm_topk_prob=True,
        ),
    }


def _qwen3_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if int(hf.get("decoder_sparse_step") or 1) != 1:
        raise HFError(
            f"{where}: decoder_sparse_step={hf['decoder_sparse_step']} (moeyard's dense layers "
            "are the first model.num_dense_layers; every later layer is MoE)"
        )
    dense = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))):
        raise HFError(
            f"{where}: mlp_only_layers={dense} (moeyard's dense layers are the first "
            "model.num_dense_layers, as [0, 1, ..., k-1])"
        )
    out: dict[str, Any] = {
        **_gqa_in(hf, where),
        "qk_norm": True,
        "num_dense_layers": len(dense),
        "moe": MoEConfig(
            # The released configs say num_experts; transformers 5 writes num_local_experts.
            num_experts=int(hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            expert_hidden=int(hf["moe_intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        ),
    }
    if dense:
        out["dense_hidden"] = int(hf["intermediate_size"])
    return out


def _mla_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if hf.get("attention_bias"):
        raise HFError(f"{where}: attention_bias=true (moeyard's projections have no bias)")
    out: dict[str, Any] = {
        "attention": "mla",
        "mla": MLAConfig(
            kv_lora_rank=int(hf["kv_lora_rank"]),
            q_lora_rank=int(hf.get("q_lora_rank") or 0),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
            norm_eps=DEEPSEEK_LATENT_EPS,
        ),
        "num_dense_layers": int(hf.get("first_k_dense_replace") or 0),
    }
    if out["num_dense_layers"]:
        out["dense_hidden"] = int(hf["intermediate_size"])
    return out


def _moe_in(hf: dict[str, Any], **kw: Any) -> MoEConfig:
    return MoEConfig(
        num_experts=int(hf["n_routed_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_hidden=int(hf["moe_intermediate_size"]),
        num_shared_experts=int(hf.get("n_shared_experts") or 0),
        route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        **kw,
    )


def _v2_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    n_group = int(hf.get("n_group") or 1)
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise HFError(f"{where}: topk_method={method!r} (moeyard routes greedy or group-limited)")
    if method == "greedy":
        n_group = 1
    if (hf.get("scoring_func") or "softmax") != "softmax":
        raise HFError(f"{where}: scoring_func={hf['scoring_func']!r} (DeepSeek-V2 is softmax)")
    return {
        **_mla_in(hf, where),
        "moe": _moe_in(
            hf,
            n_group=n_group,
            topk_group=int(hf.get("topk_group") or 1) if n_group > 1 else 1,
            norm_topk_prob=False,
        ),
    }


def _v3_in(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if (hf.get("scoring_func") or "sigmoid") != "sigmoid":
        raise HFError(f"{where}: scoring_func={hf['scoring_func']!r} (DeepSeek-V3 is sigmoid)")
    if hf.get("rope_interleave") is False:
        raise HFError(
            f"{where}: rope_interleave=false (moeyard maps DeepSeek's interleaved rotary rows "
            "only, as every released checkpoint holds them)"
        )
    n_group = int(hf.get("n_group") or 1)
    depth = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
    return {
        **_mla_in(hf, where),
        "moe": _moe_in(
            hf,
            score_func="sigmoid",
            n_group=n_group,
            topk_group=int(hf.get("topk_group") or 1) if n_group > 1 else 1,
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        ),
        "mtp": MTPConfig(depth=int(depth or 0)),
    }


ARCHS: tuple[Arch, ...] = (
    Arch(
        MIXTRAL,
        "mixtral",
        "gqa",
        _mixtral_refuse,
        _mixtral_out,
        _mixtral_in,
        moe_block="block_sparse_moe.",
        experts=("w1", "w3", "w2"),
    ),
    Arch(QWEN3_MOE, "qwen3_moe", "gqa", _qwen3_refuse, _qwen3_out, _qwen3_in),
    Arch(
        DEEPSEEK_V2,
        "deepseek_v2",
        "mla",
        _v2_refuse,
        _v2_out,
        _v2_in,
        shared_experts="shared_experts.",
    ),
    Arch(
        DEEPSEEK_V3,
        "deepseek_v3",
        "mla",
        _v3_refuse,
        _v3_out,
        _v3_in,
        shared_experts="shared_experts.",
        router_bias="gate.e_score_correction_bias",
        mtp=MTPNames(),
    ),
)
BY_CLASS = {a.cls: a for a in ARCHS}


def _no_config(cfg: ModelConfig) -> dict[str, Any]:
    raise AssertionError("dense checkpoints are read, never written")


def _no_model(hf: dict[str, Any], where: str) -> dict[str, Any]:
    raise AssertionError("dense checkpoints are upcycled, not mapped to a model config")


# The names of a dense Llama/Mistral/Qwen2 checkpoint (upcycling reads attention, norms,
# embeddings and the dense MLP, as a model whose every layer is dense).
DENSE_ARCH = Arch("dense", "llama", "gqa", lambda cfg: [], _no_config, _no_model)


def arch_of(cfg: ModelConfig) -> Arch:
    """The table of the transformers class that computes the same function as `cfg`.

    Raises:
        HFError: no class does; the message names, for each class of the same attention,
            every setting in the way.
    """
    family = [a for a in ARCHS if a.attention == cfg.attention]
    refusals = [(a, a.refuse(cfg)) for a in family]
    for a, why in refusals:
        if not why:
            return a
    raise HFError(
        "no transformers architecture computes this model: "
        + " | ".join(f"{a.cls} would need other settings for: {'; '.join(w)}" for a, w in refusals)
    )


def architecture(cfg: ModelConfig) -> str:
    """The transformers class name of `cfg` (raises HFError as `arch_of` does)."""
    return arch_of(cfg).cls


def _lookup(arch: str | Arch) -> Arch:
    if isinstance(arch, Arch):
        return arch
    return DENSE_ARCH if arch == "dense" else BY_CLASS[arch]


def hf_config(
    cfg: ModelConfig, *, dtype: torch.dtype, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The `config.json` of the export of `cfg` (raises HFError as `architecture` does)."""
    arch = arch_of(cfg)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    extra: dict[str, Any] = {}
    s = cfg.rope_scaling
    if s.type == "yarn":
        block: dict[str, Any] = {
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
        }
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(s, key):
                block[key] = getattr(s, key)
        if not s.truncate:
            block["truncate"] = False
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **block}
        extra["rope_scaling"] = {"type": "yarn", **block}  # what 4.x readers look for
    return {
        "architectures": [arch.cls],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key
        **extra,
        "num_experts_per_tok": cfg.moe.top_k,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
        **arch.config_out(cfg),
    }


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rope(hf: dict[str, Any], where: str) -> float:
    """rope_theta of a config.json; raises on any rope scaling (what upcycling a dense
    checkpoint needs: its model's rotary embedding without scaling)."""
    theta, scaling = rope_from_hf(hf, where)
    if scaling.type != "none":
        raise HFError(
            f"{where}: rope scaling {scaling.type!r} (rope_parameters / rope_scaling) is not "
            "upcycled; the dense model would differ"
        )
    return theta


def rope_from_hf(hf: dict[str, Any], where: str) -> tuple[float, RopeScalingConfig]:
    """rope_theta and the rotary scaling of a config.json: transformers 5's
    `rope_parameters` or the 4.x / released `rope_theta` and `rope_scaling` block.

    Raises:
        HFError: a rope type other than default and yarn.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind != "yarn":
        raise HFError(
            f"{where}: rope scaling {kind!r} (rope_parameters / rope_scaling) is not computed "
            "by moeyard's rotary embedding (default or yarn); the model would differ"
        )
    p = {**scaling, **params}
    if float(p.get("partial_rotary_factor") or 1.0) != 1.0:
        raise HFError(
            f"{where}: partial_rotary_factor={p['partial_rotary_factor']} (moeyard rotates "
            "every dim of the rotary head)"
        )
    # transformers' order: a top-level value (Phi-3 style), the block's, the context.
    original = int(
        hf.get("original_max_position_embeddings")
        or p.get("original_max_position_embeddings")
        or hf["max_position_embeddings"]
    )
    factor = p.get("factor")
    if factor is None:  # transformers' rule for DeepSeek-style configs without one
        factor = float(hf["max_position_embeddings"]) / original
    return theta, RopeScalingConfig(
        type="yarn",
        factor=float(factor),
        original_max_seq_len=original,
        beta_fast=float(p.get("beta_fast") or 32),
        beta_slow=float(p.get("beta_slow") or 1),
        mscale=float(p.get("mscale") or 0.0),
        mscale_all_dim=float(p.get("mscale_all_dim") or 0.0),
        attention_factor=float(p.get("attention_factor") or 0.0),
        truncate=bool(p.get("truncate", True)),
    )


def model_config_from_hf(hf: dict[str, Any], *, where: str) -> ModelConfig:
    """The moeyard model of a `config.json` of one of `ARCHS` (`where` names it).

    Raises:
        HFError: another architecture, or settings moeyard does not compute.
    """
    arch = _arch(hf, where)
    if arch not in BY_CLASS:
        raise HFError(
            f"{where}: architecture {arch} is not a moeyard MoE ({', '.join(BY_CLASS)}); "
            f"a dense {'/'.join(DENSE)} checkpoint starts an MoE with checkpoint.upcycle=true"
        )
    theta, scaling = rope_from_hf(hf, where)
    try:
        fields = BY_CLASS[arch].config_in(hf, where)
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **fields,
        )
    except KeyError as e:
        raise HFError(f"{where}: {arch} needs {e.args[0]!r}, which the file lacks") from None


def _arch(hf: dict[str, Any], where: str) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise HFError(f"{where}: 'architectures' must name one class, not {archs!r}")
    return str(archs[0])


# Settings that change the function a model computes (not its tensor shapes, which the
# tensor check compares): the preset's value must equal the checkpoint's.
_SEMANTIC = (
    "rope_theta",
    "rope_scaling",
    "norm_eps",
    "latent_norm_eps",
    "tie_embeddings",
    "attention",
    "qk_norm",
    "moe.top_k",
    "moe.score_func",
    "moe.norm_topk_prob",
    "moe.route_scale",
    "moe.n_group",
    "moe.topk_group",
)


def check_semantics(preset: ModelConfig, ckpt: ModelConfig, *, where: str) -> None:
    """Raises HFError naming the first model.* setting of the preset that differs from the
    checkpoint's config (shapes aside)."""
    for key in _SEMANTIC:
        a, b = _get(preset, key), _get(ckpt, key)
        if a != b:
            if key == "latent_norm_eps":
                key = "mla.norm_eps (effective latent-norm epsilon)"
            raise HFError(
                f"model.{key} ({a}) differs from {where} ({b}): the run would start from a "
                "different model than the checkpoint's"
            )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- tensor names and layouts ----------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    """One transformers tensor and the moeyard state-dict key it holds (no `model.` prefix).

    `shared`: the tensor repeats one another entry maps too (DeepSeek-V3's MTP layers hold
    copies of the embedding and the head): written on export, checked equal on import.
    """

    hf: str
    key: str
    transform: Transform = "copy"
    shared: bool = False


def tensor_map(cfg: ModelConfig, arch: str | Arch) -> list[TensorMap]:
    """Every tensor of the transformers model `arch` of `cfg`, all experts included (and the
    MTP layers where the architecture keeps them)."""
    a = _lookup(arch)
    out: list[TensorMap] = [TensorMap("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.num_layers):
        out += _layer(cfg, a, f"model.layers.{i}.", f"layers.{i}.", i >= cfg.num_dense_layers)
    out.append(TensorMap("model.norm.weight", "norm.weight"))
    head = "embed.weight" if cfg.tie_embeddings else "head.weight"
    if not cfg.tie_embeddings:
        out.append(TensorMap("lm_head.weight", head))
    if a.mtp is not None:
        n = a.mtp
        for k in range(cfg.mtp.depth):
            h, key = f"model.layers.{cfg.num_layers + k}.", f"mtp.{k}."
            out += [
                TensorMap(h + n.enorm, key + "enorm.weight"),
                TensorMap(h + n.hnorm, key + "hnorm.weight"),
                TensorMap(h + n.proj, key + "proj.weight"),
                TensorMap(h + n.norm, key + "norm.weight"),
                TensorMap(h + n.embed_copy, "embed.weight", shared=True),
                TensorMap(h + n.head_copy, head, shared=True),
            ]
            out += _layer(cfg, a, h, key + "block.", cfg.mtp.moe)
    return out


def _layer(cfg: ModelConfig, a: Arch, h: str, k: str, moe: bool) -> list[TensorMap]:
    """The tensors of one transformer block: file prefix `h`, moeyard prefix `k`."""
    out = [
        TensorMap(h + "input_layernorm.weight", k + "attn_norm.weight"),
        TensorMap(h + "post_attention_layernorm.weight", k + "ffn_norm.weight"),
    ]
    at, b = h + "self_attn.", k + "attn."
    if cfg.attention == "gqa":
        out += [TensorMap(at + f"{p}_proj.weight", b + f"w{p}.weight") for p in "qkvo"]
        if cfg.qk_norm:
            out += [TensorMap(at + f"{p}_norm.weight", b + f"{p}_norm.weight") for p in "qk"]
    else:
        if cfg.mla.q_lora_rank:
            out += [
                TensorMap(at + "q_a_proj.weight", b + "wq_a.weight"),
                TensorMap(at + "q_a_layernorm.weight", b + "q_norm.weight"),
                TensorMap(at + "q_b_proj.weight", b + "wq_b.weight", "rope_q"),
            ]
        else:
            out.append(TensorMap(at + "q_proj.weight", b + "wq.weight", "rope_q"))
        out += [
            TensorMap(at + "kv_a_proj_with_mqa.weight", b + "wkv_a.weight", "rope_kv"),
            TensorMap(at + "kv_a_layernorm.weight", b + "kv_norm.weight"),
            TensorMap(at + "kv_b_proj.weight", b + "wkv_b.weight"),
            TensorMap(at + "o_proj.weight", b + "wo.weight"),
        ]
    f = k + "ffn."
    if not moe:
        return out + _swiglu(h + a.dense_mlp, f)
    m = h + a.moe_block
    out.append(TensorMap(m + "gate.weight", f + "router.weight"))
    if a.router_bias is not None:
        out.append(TensorMap(m + a.router_bias, f + "router.expert_bias"))
    for e in range(cfg.moe.num_experts):
        for w, name in zip(("w1", "w3", "w2"), a.experts, strict=True):
            out.append(TensorMap(f"{m}experts.{e}.{name}.weight", f"{f}experts.{e}.{w}", "t"))
    if a.shared_experts is not None:
        out += _swiglu(m + a.shared_experts, f + "shared.")
    return out


def mtp_layer_of(name: str, cfg: ModelConfig, arch: str | Arch) -> int | None:
    """The MTP depth (0-based) a transformers tensor name belongs to, or None."""
    a = _lookup(arch)
    if a.mtp is None:
        return None
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m is None or int(m.group(1)) < cfg.num_layers:
        return None
    return int(m.group(1)) - cfg.num_layers


def _swiglu(hf_prefix: str, prefix: str) -> list[TensorMap]:
    return [
        TensorMap(hf_prefix + "gate_proj.weight", prefix + "w1.weight"),
        TensorMap(hf_prefix + "up_proj.weight", prefix + "w3.weight"),
        TensorMap(hf_prefix + "down_proj.weight", prefix + "w2.weight"),
    ]


def _rope_perm(R: int) -> Tensor:
    """moeyard's rotary row j comes from DeepSeek's row perm[j]: halves from pairs."""
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])


def _rope_rows(cfg: ModelConfig, transform: Transform, rows: int) -> Tensor:
    """The row order that turns a DeepSeek tensor's rows into moeyard's (for `rows` rows)."""
    m = cfg.mla
    R = m.qk_rope_head_dim
    perm = _rope_perm(R)
    idx = torch.arange(rows)
    if transform == "rope_kv":
        C = m.kv_lora_rank
        idx[C : C + R] = C + perm
        return idx
    head = m.qk_nope_head_dim + R
    idx = idx.view(-1, head).clone()
    N = m.qk_nope_head_dim
    idx[:, N:] = idx[:, N:][:, perm]
    return idx.reshape(-1)


def to_hf(t: Tensor, spec: TensorMap, cfg: ModelConfig) -> Tensor:
    """A moeyard tensor in transformers' layout (exact: a transpose or a row permutation)."""
    if spec.transform == "copy":
        return t
    if spec.transform == "t":
        return t.t().contiguous()
    order = _rope_rows(cfg, spec.transform, t.shape[0])
    return t[torch.argsort(order)].contiguous()


def from_hf(t: Tensor, spec: TensorMap, cfg: ModelConfig) -> Tensor:
    """A transformers tensor in moeyard's layout (the inverse of `to_hf`)."""
    if spec.transform == "copy":
        return t
    if spec.transform == "t":
        return t.t().contiguous()
    return t[_rope_rows(cfg, spec.transform, t.shape[0])].contiguous()


def hf_shape(shape: tuple[int, ...], spec: TensorMap) -> tuple[int, ...]:
    return tuple(reversed(shape)) if spec.transform == "t" else shape


# --- reading safetensors directories -----------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsDir:
    """A transformers checkpoint directory (local or any fsspec URL): `config.json` plus
    `model.safetensors` or shards named by `model.safetensors.index.json`.

    Only the headers are read up front (a few kB per shard); `read` fetches the bytes of one
    tensor (or of one row of its first dim) with a ranged read, so memory holds one tensor
    at a time, never a whole shard.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.fs.invalidate_cache()
        cfg_path = f"{self.path}/{CONFIG}"
        if not self.fs.exists(cfg_path):
            raise HFError(f"{self.url} is not a transformers checkpoint: {CONFIG} is missing")
        with self.fs.open(cfg_path, "r") as f:
            try:
                self.config: dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise HFError(f"{self.url}/{CONFIG} is not valid JSON: {e}") from None
        if self.fs.exists(f"{self.path}/{INDEX}"):
            with self.fs.open(f"{self.path}/{INDEX}", "r") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif self.fs.exists(f"{self.path}/{SINGLE}"):
            weight_map = {}
        else:
            raise HFError(f"{self.url} holds neither {INDEX} nor {SINGLE}")
        self.entries: dict[str, _Entry] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        for file in files:
            for name, entry in self._header(file, weight_map).items():
                if weight_map and weight_map.get(name) != file:
                    continue  # the index is the authority on which file holds a tensor
                self.entries[name] = entry
        lost = sorted(n for n in weight_map if n not in self.entries)
        if lost:
            raise HFError(
                f"{self.url}/{INDEX} maps {lost[0]} to {weight_map[lost[0]]}, which does not "
                f"hold it ({len(lost)} tensors in all)"
            )

    @property
    def where(self) -> str:
        return f"{self.url}/{CONFIG}"

    def _header(self, file: str, weight_map: dict[str, str]) -> dict[str, _Entry]:
        path = f"{self.path}/{file}"
        if not self.fs.exists(path):
            first = next((n for n, f in sorted(weight_map.items()) if f == file), "?")
            raise HFError(
                f"{self.url}: shard {file} named by {INDEX} is missing (it holds {first} and "
                "others)"
            )
        head = self.fs.cat_file(path, start=0, end=8)
        if len(head) < 8:
            raise HFError(f"{self.url}/{file} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(self.fs.cat_file(path, start=8, end=8 + n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFError(f"{self.url}/{file}: corrupt safetensors header ({e})") from None
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise HFError(f"{self.url}/{file}: {name} has dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            out[name] = _Entry(
                file, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end
            )
        return out

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise HFError(f"{self.url} has no tensor {name}")
        return self.entries[name]

    def read(self, name: str, *, row: int | None = None) -> Tensor:
        """The tensor `name` (or its slice [row] along the first dim), on the CPU."""
        e = self._entry(name)
        start, end, shape = e.start, e.end, e.shape
        if row is not None:
            step = (end - start) // shape[0]
            start, end, shape = start + row * step, start + (row + 1) * step, shape[1:]
        data = self.fs.cat_file(f"{self.path}/{e.file}", start=start, end=end)
        if len(data) != end - start:
            raise HFError(f"{self.url}/{e.file} is truncated: {name} lacks bytes")
        if not data:
            return torch.empty(shape, dtype=e.dtype)
        return torch.frombuffer(bytearray(data), dtype=e.dtype).reshape(shape)
