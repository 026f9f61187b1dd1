"""Causal multi-head / grouped-query attention (`model.attention: gqa`); Multi-Head Latent
Attention (`mla`) sits beside it in `trainer/mla.py`, and the block picks one.

Shape legend: B batch, S sequence, D model dim, H query heads, Hkv key/value heads, Dh head
dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.layers import RMSNorm, apply_rope


class Attention(nn.Module):
    """Causal multi-head / grouped-query attention through scaled_dot_product_attention.

    Parameters: wq [H*Dh, D], wk and wv [Hkv*Dh, D], wo [D, H*Dh]; with `model.qk_norm`
    (Qwen3) q_norm and k_norm [Dh], RMSNorms over each head's query and key applied before
    rotary embedding. Dh is `model.head_dim` (dim / heads unless set apart). YaRN scales the
    rotary tables only (`trainer/layers.py`); the softmax scale stays 1/sqrt(Dh), as
    transformers' Mixtral and Qwen3-MoE compute it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.wq = nn.Linear(cfg.dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.num_heads, self.head_dim)
        k = self.wk(x_BSD).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))
