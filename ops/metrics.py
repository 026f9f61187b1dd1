"""Step metrics derived from what the loop measured: model FLOP/s, MFU against the device's
peak, data-wait share, and energy per token over the logging window.

Everything here is arithmetic on measured numbers. A quantity whose inputs were not
measured (no energy counter, a device whose peak is unknown) is left out of the record,
never set to zero.
"""

from __future__ import annotations

import math
from typing import Any

# Peak dense bf16 tensor-core TFLOP/s per device (vendor datasheets, without sparsity).
# Matched against the device name in order, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)

# Keys the loop's record may carry that this module reads or writes.
CHECKPOINT_TIME_KEY = "checkpoint_s"  # seconds the last checkpoint save blocked training


def lookup_peak_tflops(device_name: str | None) -> float | None:
    """Peak dense bf16 TFLOP/s of a device by its name (torch or NVML spelling), or None."""
    if not device_name:
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def resolve_peak_tflops(configured: float, device_name: str | None) -> float | None:
    """`ops.peak_tflops` when set (> 0), else the table's entry for the device, else None."""
    if configured > 0:
        return configured
    return lookup_peak_tflops(device_name)


def step_metrics(
    *,
    window_s: float,
    window_steps: int,
    window_tokens: int,
    window_data_wait_s: float,
    flops_per_token: float,
    peak_tflops: float | None,
    world_size: int,
) -> dict[str, float]:
    """Throughput metrics over one logging window.

    Args:
        window_s: wall seconds of the window (after a device sync).
        window_steps: optimizer steps in the window.
        window_tokens: global tokens trained on in the window.
        window_data_wait_s: seconds this rank waited for its batches in the window.
        flops_per_token: training FLOPs per token (forward + backward, attention included).
        peak_tflops: one device's peak, or None when unknown (then MFU is absent).
        world_size: devices sharing the work.

    Returns:
        `tokens_window`, `flops_per_token`, `model_tflops_per_s`, `data_wait_share`, and
        `mfu` when the peak is known.
    """
    if window_s <= 0 or window_steps <= 0:
        raise ValueError(f"window_s ({window_s}) and window_steps ({window_steps}) must be > 0")
    tokens_per_s = window_tokens / window_s
    achieved = tokens_per_s * flops_per_token
    out: dict[str, float] = {
        "tokens_window": window_tokens,
        "flops_per_token": flops_per_token,
        "model_tflops_per_s": achieved / 1e12,
        "data_wait_share": min(1.0, window_data_wait_s / window_s),
    }
    if peak_tflops:
        out["mfu"] = achieved / (peak_tflops * 1e12 * world_size)
    return out


def energy_metrics(
    *, gpu_j: float | None, cpu_j: float | None, window_tokens: int
) -> dict[str, Any]:
    """Energy of one logging window for the whole job.

    Args:
        gpu_j: joules all GPUs drew in the window (None when not measured on every GPU).
        cpu_j: joules all CPU packages drew (None when not measured on every node).
        window_tokens: global tokens trained on in the window.

    Returns:
        `energy_j`, `energy_scope` ("gpu", "cpu" or "gpu+cpu": what was measured),
        `energy_per_token_j` and `tokens_per_kwh`; empty when nothing was measured.
    """
    parts = {k: v for k, v in (("gpu", gpu_j), ("cpu", cpu_j)) if v is not None}
    if not parts:
        return {}
    joules = math.fsum(parts.values())
    out: dict[str, Any] = {"energy_j": joules, "energy_scope": "+".join(parts)}
    if window_tokens > 0:
        out["energy_per_token_j"] = joules / window_tokens
    if joules > 0:
        out["tokens_per_kwh"] = window_tokens / (joules / 3.6e6)
    return out
