"""The decoder-only MoE transformer. It runs on one device and knows nothing of parallelism.

Shape legend: B batch, S sequence, D model dim, H query heads, Hkv key/value heads,
Dh head dim, V vocabulary.

Build on the meta device, `parallelize`, then `materialize`: weights are drawn per parameter
(and per expert, by global id) from the seed, so the initial model does not depend on the
parallel layout.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from trainer.attention import Attention
from trainer.config import ModelConfig
from trainer.layers import RMSNorm, apply_rope, rope_tables
from trainer.loss import LossKernel, linear_cross_entropy
from trainer.mla import MLAttention
from trainer.moe import GroupedExperts, MoE, Router, SwiGLU

__all__ = ["Attention", "RMSNorm", "Transformer", "apply_rope", "build_model", "materialize"]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.attention == "mla":
            self.attn: nn.Module = MLAttention(cfg)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.num_dense_layers
        self.ffn: nn.Module = (
            MoE(cfg.dim, cfg.moe) if self.is_moe else SwiGLU(cfg.dim, cfg.dense_hidden)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, losses = self.ffn(h)
            return x + y, losses.aux_loss, losses.z_loss
        zero = x.new_zeros((), dtype=torch.float32)
        return x + self.ffn(h), zero, zero


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor | None  # [B, S, V]; None when the forward was given targets
    aux_loss: Tensor  # summed over MoE layers, coefficient applied
    z_loss: Tensor
    lm_loss: Tensor | None = None  # mean next-token cross-entropy, when given targets


class OutputHead(nn.Module):
    """The output projection to the vocabulary; given targets, it returns the loss instead
    of the logits (`trainer.loss.linear_cross_entropy`), computed inside this module's
    forward, where FSDP has gathered the weight."""

    weight: Tensor  # [V, D]; tied embeddings assign the embedding's

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(
        self,
        h_BSD: Tensor,
        targets_BS: Tensor | None = None,
        *,
        chunk_tokens: int = 0,
        kernel: LossKernel = "torch",
    ) -> Tensor:
        """Logits [B, S, V] of `h_BSD`; with `targets_BS`, their mean cross-entropy (fp32
        scalar) computed `chunk_tokens` tokens at a time (0 = all) with `kernel`."""
        if targets_BS is None:
            return F.linear(h_BSD, self.weight)
        return linear_cross_entropy(
            h_BSD, self.weight, targets_BS, chunk_tokens=chunk_tokens, kernel=kernel
        )


class Transformer(nn.Module):
    rope_cos: Tensor  # buffers, [S, Dh/2]
    rope_sin: Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = OutputHead(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def moe_layers(self) -> list[MoE]:
        # Through modules(), not the blocks' attributes: parallelize may wrap the blocks.
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self,
        tokens_BS: Tensor,
        targets_BS: Tensor | None = None,
        *,
        loss_chunk_tokens: int = 0,
        loss_kernel: LossKernel = "torch",
    ) -> ModelOutput:
        """Logits of `tokens_BS` [B, S]; given `targets_BS` [B, S], the mean next-token
        loss instead (`lm_loss`, no logits kept: `train.loss_chunk_tokens`,
        `train.loss_kernel`)."""
        x = self.embed(tokens_BS)
        aux = z = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, a, zl = block(x, self.rope_cos, self.rope_sin)
            aux, z = aux + a, z + zl
        h = self.norm(x)
        if targets_BS is None:
            return ModelOutput(self.head(h), aux, z)
        lm = self.head(h, targets_BS, chunk_tokens=loss_chunk_tokens, kernel=loss_kernel)
        return ModelOutput(None, aux, z, lm_loss=lm)


def _generator(seed: int, name: str) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(f"{seed}/{name}".encode()) + (seed << 32))
    return g


def _fill(p: Tensor, full: Tensor) -> None:
    """Copies this rank's part of the full tensor `full` into `p` (a DTensor or not)."""
    if isinstance(p, DTensor):
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        p.to_local().copy_(full[index])
    else:
        p.copy_(full)


def local_of(t: Tensor) -> Tensor:
    """The local shard of a DTensor; a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


# Wrappers that parallelize puts around a block add these to parameter names; the seed's
# draw is keyed by the name the parameter has in the plain model.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name without the activation-checkpoint and compile wrappers' parts."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Draws every parameter from the seed and its name; each expert from its global id.

    Linear and embedding weights ~ N(0, 0.02); output projections of attention and
    feed-forward (wo, w2) are scaled by 1/sqrt(2 * num_layers) as in GPT-2; router gates
    ~ N(0, 1/dim), so that their logits start with unit variance; norms are ones; router
    biases zero. Draws happen on the CPU, whole, so the result is the same on any
    device and any layout (an FSDP shard takes its slice of the whole draw).
    """
    cfg = model.cfg
    std = 0.02
    out_std = std / math.sqrt(2 * cfg.num_layers)
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = plain_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if isinstance(module, RMSNorm) or p_name.endswith("norm_weight"):
                local_of(p).fill_(1.0)
                continue
            s = out_std if p_name in ("w2",) or mod_name.endswith((".wo", ".w2")) else std
            if isinstance(module, Router):
                # Unit-variance gate logits at any width (the input is RMS-normalized): at
                # 0.02 a narrow model's router starts almost uniform, its top-k decided by
                # hair-breadth margins that one step flips for whole token types at once.
                s = p.shape[-1] ** -0.5
            if isinstance(module, GroupedExperts):
                draws = []
                for i in range(p.shape[0]):
                    g = _generator(seed, f"{full}.{module.expert_offset + i}")
                    draws.append(torch.empty(p.shape[1:]).normal_(0.0, s, generator=g))
                _fill(p, torch.stack(draws).to(local_of(p).device))
            else:
                g = _generator(seed, full)
                _fill(p, torch.empty(p.shape).normal_(0.0, s, generator=g).to(local_of(p).device))
    for moe in model.moe_layers():
        moe.router.expert_bias.zero_()
        moe.routed_E.zero_()
        moe.dropped.zero_()
    rope_dim = cfg.mla.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
    cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)


def materialize(model: Transformer, *, device: torch.device, seed: int) -> Transformer:
    """Allocates a meta-built (and parallelized) model on `device` and initializes it."""
    model.to_empty(device=device)
    if model.cfg.tie_embeddings and not isinstance(model.head.weight, DTensor):
        model.head.weight = model.embed.weight
    init_weights(model, seed)
    return model


def build_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device (no memory), ready for `parallelize` and `materialize`."""
    with torch.device("meta"):
        return Transformer(cfg)
