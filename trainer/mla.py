"""Multi-Head Latent Attention (DeepSeek-V2, section 2.1): `model.attention: mla`.

Shape legend: B batch, S sequence, D model dim, H heads, C kv_lora_rank (the latent),
Cq q_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Keys and values of every head are rebuilt from one low-rank latent per token,
c_kv = W_DKV x (C wide, normalized), k_nope = W_UK c_kv, v = W_UV c_kv. Rotary position
cannot pass through that compression (it would have to be absorbed into W_UK at every
position), so a separate rotary key k_rope = RoPE(W_KR x) of R dims is computed once per
token and shared by all heads; each query head gets its own non-rotary part (N dims) and
rotary part (R dims). Queries may be compressed the same way (q_lora_rank > 0):
q = W_UQ norm(W_DQ x). The attention score of a head is
(q_nope . k_nope + q_rope . k_rope) / sqrt(N + R), causal, through
`scaled_dot_product_attention`; under YaRN rope scaling with `mscale_all_dim` the scale is
multiplied by mscale^2 (`trainer.layers.yarn_softmax_scale`), as DeepSeek's reference does.
The latent norms use their own epsilon, `model.mla.norm_eps` (0 = `model.norm_eps`):
DeepSeek's released models fix it at 1e-6 whatever their rms_norm_eps.

What inference caches per token and layer: c_kv and k_rope, C + R elements (576 for
DeepSeek-V2), against 2 x H x Dh for multi-head attention and 2 x Hkv x Dh for
grouped-query attention (`trainer.flops.kv_cache_elements_per_token`). This module computes
the training form (keys and values materialized per head); the absorbed inference form
multiplies W_UK into the query instead and is the same function.

Rotary embedding here rotates halves (`trainer.layers.apply_rope`), where DeepSeek's released
weights rotate interleaved pairs: the two differ by a fixed permutation of W_QR's and W_KR's
output rows, so the model class is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ModelConfig
from trainer.layers import RMSNorm, apply_rope, yarn_softmax_scale


class MLAttention(nn.Module):
    """Causal Multi-Head Latent Attention.

    Parameters (names are what `init_weights` and checkpoints see):
      wq [H*(N+R), D] when q_lora_rank is 0; else wq_a [Cq, D], q_norm [Cq], wq_b [H*(N+R), Cq];
      wkv_a [C+R, D] (latent and shared rotary key), kv_norm [C], wkv_b [H*(N+V), C],
      wo [D, H*V].
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mla
        self.num_heads = cfg.num_heads
        self.kv_lora_rank = m.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = (
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
        )
        qk_head = self.nope_dim + self.rope_dim
        H = cfg.num_heads
        self.q_lora_rank = m.q_lora_rank
        if m.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, m.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(m.q_lora_rank, cfg.latent_norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, H * qk_head, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, H * qk_head, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, m.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(m.kv_lora_rank, cfg.latent_norm_eps)
        self.wkv_b = nn.Linear(m.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, cfg.dim, bias=False)
        self.softmax_scale = yarn_softmax_scale(qk_head, cfg.rope_scaling)

    def forward(self, x_BSD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x_BSD [B, S, D]; cos, sin [>=S, R/2] rotary tables. Returns [B, S, D]."""
        B, S, _ = x_BSD.shape
        H, N, R, V = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = self.wq_b(self.q_norm(self.wq_a(x_BSD))) if self.q_lora_rank else self.wq(x_BSD)
        q_BHSQ = q.view(B, S, H, N + R).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSQ.split([N, R], dim=-1)
        q_rope_BHSR = apply_rope(q_rope_BHSR, cos, sin)

        # The latent and the shared rotary key: what an inference cache would hold.
        c_BSC, k_rope_BSR = self.wkv_a(x_BSD).split([self.kv_lora_rank, R], dim=-1)
        k_rope_B1SR = apply_rope(k_rope_BSR.unsqueeze(1), cos, sin)
        kv_BHSX = self.wkv_b(self.kv_norm(c_BSC)).view(B, S, H, N + V).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSX.split([N, V], dim=-1)

        q_BHSQ = torch.cat([q_nope_BHSN, q_rope_BHSR.to(q_nope_BHSN.dtype)], dim=-1)
        k_BHSQ = torch.cat(
            [k_nope_BHSN, k_rope_B1SR.to(k_nope_BHSN.dtype).expand(B, H, S, R)], dim=-1
        )
        # SDPA's default scale is 1/sqrt(q's last dim) = 1/sqrt(N + R), the paper's scale;
        # YaRN's mscale changes it.
        o_BHSV = F.scaled_dot_product_attention(
            q_BHSQ, k_BHSQ, v_BHSV, is_causal=True, scale=self.softmax_scale
        )
        return self.wo(o_BHSV.transpose(1, 2).reshape(B, S, H * V))
