"""Per-rank telemetry for the training loop: samples this rank's GPU (NVML) and, on local
rank 0, the node's CPU package energy (RAPL) at every logged step, gathers the samples of
all ranks, and adds the step metrics (MFU, data-wait share, energy per token) to the
loop's record. The GPU's energy counter, a slow call, is read by a thread of its own
(`ops.energy_interval_s`, ops/nvml.py); the logged step takes its newest value.

The loop owns the collectives: it passes a `gather` function (one small all-gather of a
float vector per logged step). ops imports neither trainer nor torch.distributed.

Record keys added (each absent when its inputs were not measured):
- `tokens_window`, `window_steps`, `flops_per_token`, `model_tflops_per_s`,
  `data_wait_share`, `mfu`;
- `devices`: one entry per rank, `{"rank", "util_pct", "mem_util_pct", "mem_used_bytes",
  "mem_total_bytes", "power_w", "energy_j", "temp_c", "sm_clock_mhz", "clock_event_mask",
  "clock_events", "cpu_energy_j"}` with the keys that rank measured;
- `gpu_energy_j`, `cpu_energy_j` (the job's, this window), `energy_j`, `energy_scope`,
  `energy_per_token_j`, `tokens_per_kwh`, `energy_total_j`, `kwh_total`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ops.config import OpsConfig
from ops.metrics import energy_metrics, resolve_peak_tflops, step_metrics
from ops.nvml import GpuSampler, clock_event_names
from ops.rapl import RaplReader

# The per-rank vector that travels in the gather; NaN marks a value not measured.
FIELDS = (
    "util_pct",
    "mem_util_pct",
    "mem_used_bytes",
    "mem_total_bytes",
    "power_w",
    "energy_j",
    "temp_c",
    "sm_clock_mhz",
    "clock_event_mask",
    "cpu_energy_j",
    "gpu_expected",  # 1 on a rank with a GPU: the job's GPU energy needs its counter
    "cpu_expected",  # 1 on local rank 0: the node's CPU energy needs its RAPL read
)

log = logging.getLogger("moeyard.ops")

Gather = Callable[[list[float]], list[list[float]]]


class Telemetry:
    """Adds device samples and step metrics to each logged record.

    Args:
        cfg: the `ops` config section.
        rank, local_rank, world_size: this process's place in the job.
        gpu_uuid: this rank's GPU UUID (from torch), or None on a CPU rank.
        device_name: the device's name for the peak table (torch's spelling), or None.
        flops_per_token: training FLOPs per token of the model at the run's seq_len.
        gather: all-gathers one float vector per rank (None in a single process).
        gpu, rapl: samplers to use instead of the real ones (tests).
    """

    def __init__(
        self,
        cfg: OpsConfig,
        *,
        rank: int,
        local_rank: int,
        world_size: int,
        gpu_uuid: str | None,
        device_name: str | None,
        flops_per_token: float,
        gather: Gather | None = None,
        gpu: GpuSampler | None = None,
        rapl: RaplReader | None = None,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.gather = gather
        self.has_gpu = gpu_uuid is not None
        self.reads_cpu = local_rank == 0
        self.gpu: GpuSampler | None = None
        self.rapl: RaplReader | None = None
        if cfg.telemetry:
            if gpu is None and gpu_uuid:
                gpu = GpuSampler(gpu_uuid, energy_interval_s=cfg.energy_interval_s)
            self.gpu = gpu
            if self.gpu is None and local_rank == 0:
                log.warning(
                    "GPU telemetry unavailable: this process trains on the CPU (no CUDA "
                    "device), so no GPU metrics are reported"
                )
            if self.reads_cpu:
                self.rapl = rapl if rapl is not None else RaplReader(cfg.rapl_root)
        name = device_name or (self.gpu.name() if self.gpu is not None else None)
        self.device_name = name
        self.peak_tflops = resolve_peak_tflops(cfg.peak_tflops, name)
        self.energy_total_j = 0.0
        self.overhead_s = 0.0  # time spent sampling and gathering, for the overhead bench
        self.samples = 0

    def start(self) -> None:
        """Takes the baseline reads, so that the first window has energy values (and starts
        the GPU's energy-counter thread, off the step's path)."""
        if self.gpu is not None:
            self.gpu.read()

    def sample(self) -> dict[str, Any]:
        """This rank's measured values (see the module docstring for keys)."""
        out: dict[str, Any] = {}
        if self.gpu is not None:
            out.update(self.gpu.read())
        if self.rapl is not None:
            cpu = self.rapl.read()
            if cpu is not None:
                out["cpu_energy_j"] = cpu
        return out

    def _vector(self, own: dict[str, Any]) -> list[float]:
        v = [float(own[k]) if k in own else math.nan for k in FIELDS[:-2]]
        gpu_expected = self.cfg.telemetry and self.has_gpu
        return [*v, float(gpu_expected), float(self.cfg.telemetry and self.reads_cpu)]

    def update(
        self,
        record: dict[str, Any],
        *,
        window_s: float,
        window_steps: int,
        window_tokens: int,
        window_data_wait_s: float,
    ) -> None:
        """Adds the step metrics and device samples to `record` (on every rank; a collective
        when `gather` is set, so every rank calls it at the same steps)."""
        t0 = time.perf_counter()
        record.update(
            step_metrics(
                window_s=window_s,
                window_steps=window_steps,
                window_tokens=window_tokens,
                window_data_wait_s=window_data_wait_s,
                flops_per_token=self.flops_per_token,
                peak_tflops=self.peak_tflops,
                world_size=self.world_size,
            )
        )
        record["window_steps"] = window_steps
        if not self.cfg.telemetry:
            return
        own = self.sample()
        vec = self._vector(own)
        rows = self.gather(vec) if self.gather is not None else [vec]
        devices: list[dict[str, Any]] = []
        gpu_parts: list[float] = []
        cpu_parts: list[float] = []
        gpu_ok = cpu_ok = True
        num_gpu = num_cpu = 0
        for r, row in enumerate(rows):
            entry: dict[str, Any] = {"rank": r}
            for k, x in zip(FIELDS[:-2], row[:-2], strict=True):
                if not math.isnan(x):
                    entry[k] = x
            if "clock_event_mask" in entry:
                entry["clock_event_mask"] = int(entry["clock_event_mask"])
                entry["clock_events"] = clock_event_names(entry["clock_event_mask"])
            devices.append(entry)
            if row[-2]:
                num_gpu += 1
                if "energy_j" in entry:
                    gpu_parts.append(entry["energy_j"])
                else:
                    gpu_ok = False
            if row[-1]:
                num_cpu += 1
                if "cpu_energy_j" in entry:
                    cpu_parts.append(entry["cpu_energy_j"])
                else:
                    cpu_ok = False
        if any(len(d) > 1 for d in devices):
            record["devices"] = devices
        gpu_j = math.fsum(gpu_parts) if num_gpu and gpu_ok else None
        cpu_j = math.fsum(cpu_parts) if num_cpu and cpu_ok else None
        if gpu_j is not None:
            record["gpu_energy_j"] = gpu_j
        if cpu_j is not None:
            record["cpu_energy_j"] = cpu_j
        energy = energy_metrics(gpu_j=gpu_j, cpu_j=cpu_j, window_tokens=window_tokens)
        if energy:
            self.energy_total_j += energy["energy_j"]
            energy["energy_total_j"] = self.energy_total_j
            energy["kwh_total"] = self.energy_total_j / 3.6e6
            record.update(energy)
        self.overhead_s += time.perf_counter() - t0
        self.samples += 1

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
