"""Layers both attention variants and the model use: RMS normalization and rotary embedding.

Shape legend: B batch, H heads, S sequence, Dh head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [S, Dh/2] for rotary embedding."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    """Rotates consecutive halves of the head dim (the GPT-NeoX layout)."""
    S = x_BHSDh.shape[-2]
    cos, sin = cos_SDh2[:S], sin_SDh2[:S]
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BHSDh.dtype)
