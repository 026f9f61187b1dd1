"""The decoder-only MoE transformer. It runs on one device and knows nothing of parallelism.

Shape legend: B batch, S sequence, D model dim, H query heads, Hkv key/value heads,
Dh head dim, V vocabulary.

Multi-token prediction (`model.mtp.depth` > 0; DeepSeek-V3, section 2.2): after the main
model, `depth` MTP modules run in sequence during training. Module k (1-based) combines, at
each position i, the previous depth's representation h^{k-1}_i (h^0: the main model's final
normalized hidden state) with the embedding of token t_{i+k}:
h'_i = W [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)], then one transformer block and its own
final norm give h^k_i, and the shared output head predicts t_{i+k+1}. The embedding and the
head are the main model's own parameters. Depth k has S - k positions (the last k have no
target) and its rotary positions are those of the tokens it embeds, i + k. The projection's
input order (embedding first) and the use of the normalized h^0 are those of the released
DeepSeek-V3 weights as transformers' MtpModel, vLLM and SGLang run them. The modules are
training-only: in eval mode the forward skips them.

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
from trainer.moe import EXPERT_PARTS, GroupedExperts, MoE, Router, SwiGLU

__all__ = [
    "Attention",
    "MTPModule",
    "RMSNorm",
    "Transformer",
    "apply_rope",
    "build_model",
    "materialize",
    "mtp_cross_entropy",
]


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense SwiGLU or an MoE feed-forward
    (MoE from layer model.num_dense_layers on, unless `moe` says)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, *, moe: bool | None = None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.attention == "mla":
            self.attn: nn.Module = MLAttention(cfg)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_id >= cfg.num_dense_layers if moe is None else moe
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


class MTPModule(nn.Module):
    """One multi-token prediction depth (see the module docstring).

    Parameters: enorm, hnorm [D] (the token embedding's and the hidden state's norms), proj
    [D, 2D] (DeepSeek's eh_proj, embedding half first), block (a transformer block: MoE, or
    dense with model.mtp.moe false), norm [D] (the final norm before the shared head).
    """

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        D = cfg.dim
        self.enorm = RMSNorm(D, cfg.norm_eps)
        self.hnorm = RMSNorm(D, cfg.norm_eps)
        self.proj = nn.Linear(2 * D, D, bias=False)
        # nn.Module: parallelize may wrap it (activation checkpointing, compile).
        self.block: nn.Module = Block(cfg, cfg.num_layers + depth - 1, moe=cfg.mtp.moe)
        self.norm = RMSNorm(D, cfg.norm_eps)

    def forward(
        self, h_BSD: Tensor, e_BSD: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """h_BSD: the previous depth's normalized output; e_BSD: the embeddings of the tokens
        k ahead, aligned with it; cos, sin: rotary tables from position k on. Returns this
        depth's normalized output [B, S, D] and its block's aux and z losses."""
        x = self.proj(torch.cat([self.enorm(e_BSD), self.hnorm(h_BSD)], dim=-1))
        x, aux, z = self.block(x, cos, sin)
        return self.norm(x), aux, z


@dataclass(frozen=True)
class ModelOutput:
    logits: Tensor | None  # [B, S, V]; None when the forward was given targets
    aux_loss: Tensor  # summed over MoE layers (the MTP blocks' included), coefficient applied
    z_loss: Tensor
    lm_loss: Tensor | None = None  # mean next-token cross-entropy, when given targets
    hidden: Tensor | None = None  # [B, S, D] the final normalized hidden state
    # Training only: depth k's normalized output [B, S - k, D], k = 1 .. model.mtp.depth.
    mtp_hidden: tuple[Tensor, ...] = ()
    # Given targets in training: each MTP depth's mean cross-entropy, fp32 [depth].
    mtp_loss: Tensor | None = None


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
        # Training-only multi-token prediction; an empty list (no parameters) when off.
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp.depth + 1))
        cos, sin = rope_tables(
            cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def mtp_modules(self) -> list[MTPModule]:
        """The MTP modules, depth 1 first (none when model.mtp.depth is 0)."""
        return [m for m in self.mtp if isinstance(m, MTPModule)]

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
        """tokens_BS [B, S] -> logits [B, S, V], the MoE losses, the final normalized hidden
        state and (training, model.mtp.depth > 0) each MTP depth's output. Given targets_BS
        [B, S], the mean next-token loss instead of the logits (`lm_loss`, no logits kept:
        `train.loss_chunk_tokens`, `train.loss_kernel`) and each MTP depth's (`mtp_loss`),
        computed here, where FSDP has gathered the shared head."""
        e_BSD = self.embed(tokens_BS)
        x = e_BSD
        aux = z = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, a, zl = block(x, self.rope_cos, self.rope_sin)
            aux, z = aux + a, z + zl
        h_BSD = self.norm(x)
        mtp_hidden: list[Tensor] = []
        if self.training and len(self.mtp):
            S = tokens_BS.shape[1]
            assert len(self.mtp) < S, f"a sequence of {S} tokens has no target at MTP depth {S}"
            h = h_BSD
            for k, module in enumerate(self.mtp, start=1):
                # Positions 0 .. S-k-1 of depth k: h^{k-1} there, the embeddings of tokens
                # k .. S-1 (all among the inputs), rotary positions k .. S-1.
                h, a, zl = module(h[:, : S - k], e_BSD[:, k:], self.rope_cos[k:], self.rope_sin[k:])
                aux, z = aux + a, z + zl
                mtp_hidden.append(h)
        if targets_BS is None:
            return ModelOutput(self.head(h_BSD), aux, z, hidden=h_BSD, mtp_hidden=tuple(mtp_hidden))
        chunk, kernel = loss_chunk_tokens, loss_kernel
        return ModelOutput(
            None,
            aux,
            z,
            lm_loss=self.head(h_BSD, targets_BS, chunk_tokens=chunk, kernel=kernel),
            hidden=h_BSD,
            mtp_hidden=tuple(mtp_hidden),
            mtp_loss=mtp_cross_entropy(
                self.head, tuple(mtp_hidden), targets_BS, chunk_tokens=chunk, kernel=kernel
            ),
        )


def mtp_cross_entropy(
    head: nn.Module,
    mtp_hidden: tuple[Tensor, ...],
    targets_BS: Tensor,
    *,
    chunk_tokens: int = 0,
    kernel: LossKernel = "torch",
) -> Tensor:
    """Each MTP depth's mean next-token cross-entropy, fp32 [depth] ([0] when MTP is off).

    mtp_hidden: `ModelOutput.mtp_hidden` (depth k's [B, S - k, D]); targets_BS: the main
    model's targets (token i + 1 for input position i). Depth k's position i predicts
    targets_BS[:, i + k], the token k + 1 ahead of input i, through the shared `head`
    (an `OutputHead`: chunked as the main loss is).
    """
    losses = [
        head(h, targets_BS[:, k:], chunk_tokens=chunk_tokens, kernel=kernel)
        for k, h in enumerate(mtp_hidden, start=1)
    ]
    if not losses:
        return targets_BS.new_zeros(0, dtype=torch.float32)
    return torch.stack(losses)


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
                # Each expert's saved weight (w13 holds w1 and w3) from its own name, so the
                # draws are those of separate w1/w3 parameters at any layout.
                parts = EXPERT_PARTS[p_name]
                shape = (*p.shape[1:-1], p.shape[-1] // len(parts))
                base = full[: -len(p_name)]
                draws = []
                for i in range(p.shape[0]):
                    gid = module.expert_offset + i
                    halves = [
                        torch.empty(shape).normal_(
                            0.0, s, generator=_generator(seed, f"{base}{saved}.{gid}")
                        )
                        for saved, _ in parts
                    ]
                    draws.append(torch.cat(halves, dim=-1))
                _fill(p, torch.stack(draws).to(local_of(p).device))
            else:
                g = _generator(seed, full)
                _fill(p, torch.empty(p.shape).normal_(0.0, s, generator=g).to(local_of(p).device))
    for moe in model.moe_layers():
        moe.router.expert_bias.zero_()
        moe.routed_E.zero_()
        moe.dropped.zero_()
    cos, sin = rope_tables(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, scaling=cfg.rope_scaling)
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
