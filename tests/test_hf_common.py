"""Helpers the Hugging Face tests share (no tests here): tiny moeyard configs shaped like
Mixtral and DeepSeek-V2, weights drawn large enough that a scrambled expert or rotary row
moves the logits far past the tolerance, single-process checkpoints, and transformers'
logits."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from trainer.checkpoint import model_state
from trainer.config import JobConfig, MLAConfig, ModelConfig, MoEConfig, TrainConfig, to_yaml
from trainer.model import Transformer, build_model, materialize
from trainer.moe import GroupedExperts


def mixtral_cfg(**moe: Any) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        rope_theta=1e4,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, norm_topk_prob=True, **moe),
    )


def deepseek_cfg(q_lora_rank: int = 12) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        dim=32,
        num_layers=3,
        num_heads=4,
        attention="mla",
        mla=MLAConfig(
            kv_lora_rank=8,
            q_lora_rank=q_lora_rank,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
        ),
        max_seq_len=64,
        norm_eps=1e-6,
        num_dense_layers=1,
        dense_hidden=48,
        moe=MoEConfig(
            num_experts=8,
            top_k=3,
            expert_hidden=16,
            num_shared_experts=1,
            n_group=4,
            topk_group=2,
            route_scale=2.5,
        ),
    )


@torch.no_grad()
def scramble(model: Transformer, seed: int) -> Transformer:
    """Draws every weight at ~unit gain (norms around 1, routers sharp), so that the
    logits depend strongly on every tensor: a swapped expert or rotary row shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            continue
        fan_in = (
            p.shape[-2]
            if name.endswith(("experts.w1", "experts.w3", "experts.w2"))
            else p.shape[-1]
        )
        gain = 3.0 if "router" in name else 1.0
        p.copy_(torch.empty(p.shape).normal_(0.0, gain / math.sqrt(fan_in), generator=g))
    return model


def make_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    return scramble(materialize(build_model(cfg), device=torch.device("cpu"), seed=seed), seed)


def job(cfg: ModelConfig, **sections: Any) -> JobConfig:
    sections.setdefault("train", TrainConfig(seq_len=min(32, cfg.max_seq_len)))
    return JobConfig(model=cfg, **sections)


def write_checkpoint(model: Transformer, url: str, config: JobConfig | None = None) -> str:
    """A one-process moeyard checkpoint of `model` (model weights and the config)."""
    sd: dict[str, Any] = dict(model_state(model))
    sd["meta.config"] = to_yaml(config if config is not None else job(model.cfg))
    dcp.save(sd, storage_writer=FsspecWriter(url), no_dist=True)
    return url


def hf_logits(path: str, tokens_BS: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=tokens_BS).logits


def experts_of(model: Transformer) -> list[GroupedExperts]:
    return [m.experts for m in model.moe_layers()]


@torch.no_grad()
def scramble_hf(model: Any, seed: int) -> Any:
    """`scramble` for a transformers model (its weights are [.., out, in]); biases stay
    zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            continue
        if p.ndim == 1:
            p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            continue
        gain = 3.0 if name.endswith("gate.weight") else 1.0
        p.copy_(torch.empty(p.shape).normal_(0.0, gain / math.sqrt(p.shape[-1]), generator=g))
    return model


def save_hf(model: Any, path: str, shard: str = "40KB") -> str:
    """save_pretrained in small shards, so that the index and several files are used."""
    model.save_pretrained(path, max_shard_size=shard)
    return path


def tiny_hf_mixtral(path: str, seed: int = 0, **over: Any) -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    kw: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
    )
    kw.update(over)
    torch.manual_seed(seed)
    model = scramble_hf(MixtralForCausalLM(MixtralConfig(**kw)).eval(), seed)
    save_hf(model, path)
    return model


def tiny_hf_deepseek(path: str, seed: int = 0) -> Any:
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.5,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    model = scramble_hf(DeepseekV2ForCausalLM(cfg).eval(), seed)
    save_hf(model, path)
    return model


def tiny_hf_dense(path: str, kind: str, *, intermediate: int = 64, seed: int = 0) -> Any:
    """A dense Llama / Mistral / Qwen2 model of the tiny preset's attention shapes."""
    import transformers

    cls_cfg, cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[kind]
    kw: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if kind == "mistral":
        kw["sliding_window"] = None
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_cfg)(**kw)
    model = scramble_hf(getattr(transformers, cls)(cfg).eval(), seed)
    save_hf(model, path)
    return model
