"""Layers both attention variants and the model use: RMS normalization and rotary embedding
(plain, or YaRN-scaled as the released DeepSeek-V2/V3 configs use it).

Shape legend: B batch, H heads, S sequence, Dh head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainer.config import RopeScalingConfig


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
    head_dim: int,
    max_seq_len: int,
    theta: float,
    device: torch.device | None = None,
    *,
    scaling: RopeScalingConfig | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [S, Dh/2] for rotary embedding; with YaRN `scaling` the frequencies
    are YaRN's and both tables carry its attention factor (`yarn_attention_factor`)."""
    yarn = scaling is not None and scaling.type == "yarn"
    pos_freqs = theta ** (
        torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    inv_freq = 1.0 / pos_freqs
    if yarn:
        assert scaling is not None
        inv_freq = _yarn_inv_freq(pos_freqs, head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    if not yarn:
        return angles.cos(), angles.sin()
    assert scaling is not None
    factor = yarn_attention_factor(scaling)
    return angles.cos() * factor, angles.sin() * factor


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction, 0.1 mscale ln(scale) + 1 (1 when scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScalingConfig) -> float:
    """The factor YaRN multiplies cos and sin by (so every rotary product by its square)."""
    if s.attention_factor:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def yarn_softmax_scale(qk_head_dim: int, s: RopeScalingConfig) -> float | None:
    """MLA's attention softmax scale under YaRN: 1/sqrt(qk_head_dim) x mscale(factor,
    mscale_all_dim)^2, as DeepSeek's reference and transformers compute it; None (the plain
    1/sqrt(qk_head_dim)) without YaRN or without mscale_all_dim."""
    if s.type != "yarn" or not s.mscale_all_dim:
        return None
    m = yarn_mscale(s.factor, s.mscale_all_dim)
    return qk_head_dim**-0.5 * m * m


def _yarn_inv_freq(pos_freqs: Tensor, dim: int, theta: float, s: RopeScalingConfig) -> Tensor:
    """YaRN's frequencies: dims turning more than beta_fast times over the original context
    keep theirs (extrapolation), those turning fewer than beta_slow times are divided by
    `factor` (interpolation), with a linear ramp in between (the same float operations as
    transformers' `_compute_yarn_parameters`, so the tables are bit-identical)."""

    def correction_dim(turns: float) -> float:
        return (dim * math.log(s.original_max_seq_len / (turns * 2 * math.pi))) / (
            2 * math.log(theta)
        )

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = torch.clamp(
        (torch.arange(dim // 2, dtype=torch.float32, device=pos_freqs.device) - low) / (high - low),
        0,
        1,
    )
    keep = 1 - ramp  # 1: extrapolate (unchanged), 0: interpolate (divided by factor)
    return (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def apply_rope(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    """Rotates consecutive halves of the head dim (the GPT-NeoX layout)."""
    S = x_BHSDh.shape[-2]
    cos, sin = cos_SDh2[:S], sin_SDh2[:S]
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BHSDh.dtype)
