"""Helpers the Hugging Face tests share (no tests here): tiny moeyard configs shaped like
Mixtral, DeepSeek-V2, DeepSeek-V3 and Qwen3-MoE, weights drawn large enough that a scrambled expert or rotary row
moves the logits far past the tolerance, single-process checkpoints, and transformers'
logits (DeepSeek-V3's MTP depths' through its own MtpModel)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from trainer.checkpoint import model_state
from trainer.config import (
    JobConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    MTPConfig,
    TrainConfig,
    to_yaml,
)
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
        fan_in = p.shape[-2] if name.endswith(("experts.w13", "experts.w2")) else p.shape[-1]
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


def deepseek_v3_cfg(*, depth: int = 1, vocab_size: int = 96, **moe: Any) -> ModelConfig:
    """DeepSeek-V3-shaped: MLA with query compression, a dense first layer, sigmoid scores
    with the selection bias, group-limited routing, normalized weights x2.5, a shared expert,
    MTP; model.norm_eps 1e-5 beside the latent norms' own 1e-6."""
    return ModelConfig(
        vocab_size=vocab_size,
        dim=32,
        num_layers=3,
        num_heads=4,
        attention="mla",
        mla=MLAConfig(
            kv_lora_rank=8,
            q_lora_rank=12,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            norm_eps=1e-6,
        ),
        max_seq_len=64,
        norm_eps=1e-5,
        num_dense_layers=1,
        dense_hidden=48,
        moe=MoEConfig(
            num_experts=8,
            top_k=3,
            expert_hidden=16,
            num_shared_experts=1,
            score_func="sigmoid",
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            route_scale=2.5,
            bias_update_rate=0.001,
            **moe,
        ),
        mtp=MTPConfig(depth=depth),
    )


def qwen3_cfg(*, vocab_size: int = 96) -> ModelConfig:
    """Qwen3-MoE-shaped: GQA with q/k norms and heads wider than dim / heads, a dense first
    layer (mlp_only_layers), softmax top-3 of 8 renormalized, no shared expert."""
    return ModelConfig(
        vocab_size=vocab_size,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qk_norm=True,
        max_seq_len=64,
        rope_theta=1e6,
        norm_eps=1e-6,
        num_dense_layers=1,
        dense_hidden=48,
        moe=MoEConfig(num_experts=8, top_k=3, expert_hidden=16, norm_topk_prob=True),
    )


@torch.no_grad()
def randomize_router_biases(model: Transformer, seed: int) -> None:
    """Selection biases large enough to change which experts sigmoid scores pick."""
    g = torch.Generator().manual_seed(seed)
    for m in model.moe_layers():
        b = m.router.expert_bias
        b.copy_(torch.empty(b.shape).normal_(0.0, 0.3, generator=g))


def hf_v3_config(vocab_size: int = 96, **over: Any) -> Any:
    from transformers import DeepseekV3Config

    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=1,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        num_mtp_layers=1,
        tie_word_embeddings=False,
    )
    kw.update(over)
    return DeepseekV3Config(**kw)


def tiny_hf_deepseek_v3(path: str, seed: int = 0, **over: Any) -> tuple[Any, Any]:
    """A DeepseekV3ForCausalLM saved with `save_pretrained`, random selection biases, and
    its MTP layers (built by transformers' own MtpModel) added in the released checkpoints'
    layout: layer num_hidden_layers + k, experts one tensor each, with the copies of the
    embedding and the head. Returns (the model, its MtpModel)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(seed)
    model = scramble_hf(DeepseekV3ForCausalLM(hf_v3_config(**over)).eval(), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.empty(b.shape).normal_(0.0, 0.3, generator=g))
    save_hf(model, path)
    n_mtp = model.config.num_mtp_layers
    if not n_mtp:
        return model, None
    mtp = MtpModel(model, n_mtp).eval()
    with torch.no_grad():
        own = {n: p for n, p in mtp.named_parameters() if n.startswith("layers.")}
        g = torch.Generator().manual_seed(seed + 2)
        for n, p in own.items():
            if p.ndim == 1:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            else:
                gain = 3.0 if n.endswith("gate.weight") else 1.0
                p.copy_(torch.empty(p.shape).normal_(0, gain / math.sqrt(p.shape[-1]), generator=g))
        for n, b in mtp.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.empty(b.shape).normal_(0.0, 0.3, generator=g))
    L = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    sd = mtp.state_dict()
    for k in range(n_mtp):
        h, src = f"model.layers.{L + k}.", f"layers.{k}."
        for name, released in (
            ("enorm.weight", "enorm.weight"),
            ("hnorm.weight", "hnorm.weight"),
            ("eh_proj.weight", "eh_proj.weight"),
            ("post_norm.weight", "shared_head.norm.weight"),
        ):
            out[h + released] = sd[src + name]
        out[h + "embed_tokens.weight"] = model.model.embed_tokens.weight
        out[h + "shared_head.head.weight"] = model.lm_head.weight
        blk = src + "mtp_block."
        for name, t in sd.items():
            if not name.startswith(blk):
                continue
            rest = name[len(blk) :]
            if rest.endswith("experts.gate_up_proj"):
                F = t.shape[1] // 2
                for e in range(t.shape[0]):
                    base = h + rest[: -len("gate_up_proj")] + f"{e}."
                    out[base + "gate_proj.weight"] = t[e, :F]
                    out[base + "up_proj.weight"] = t[e, F:]
            elif rest.endswith("experts.down_proj"):
                for e in range(t.shape[0]):
                    out[h + rest[: -len("down_proj")] + f"{e}.down_proj.weight"] = t[e]
            else:
                out[h + rest] = t
    add_files(path, {k: v.detach().clone().contiguous() for k, v in out.items()}, "mtp")
    return model, mtp


def add_files(path: str, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Writes `tensors` as one more shard of the checkpoint at `path`, named in its index."""
    import json
    import os

    from safetensors.torch import save_file

    file = f"model-{name}.safetensors"
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"].update({k: file for k in tensors})
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)


def hf_mtp_logits(path: str, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """transformers' logits of the main model and of each MTP depth k on `tokens_BS`: depth k
    at position i reads the main model's final hidden state chain and token i + k, at the
    position ids of the tokens it embeds, as its MtpModel drafts (loaded from the files by
    its own MTP weight mapping)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    main = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    L = main.config.num_hidden_layers
    # The class lists the released 61-layer checkpoint's MTP layer; this one's is at L.
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{L}.*"]
    mtp = MtpModel.from_pretrained(main).eval()
    S = tokens_BS.shape[1]
    with torch.no_grad():
        out = main(input_ids=tokens_BS, output_hidden_states=True)
        h = out.hidden_states[-1]
        depths = []
        for k in range(1, mtp.num_mtp_layers + 1):
            pos = torch.arange(k, S).unsqueeze(0)
            h = mtp.forward_layer(k - 1, h[:, : S - k], pos, None, input_ids=tokens_BS[:, k:S])
            depths.append(mtp._project_to_logits(h))
    return out.logits, depths


def tiny_hf_qwen3(path: str, seed: int = 0, **over: Any) -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    kw: dict[str, Any] = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        decoder_sparse_step=1,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    kw.update(over)
    torch.manual_seed(seed)
    model = scramble_hf(Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)).eval(), seed)
    save_hf(model, path)
    return model
