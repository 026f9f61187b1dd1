"""Reads one GPU through NVML (`nvidia-ml-py`, module `pynvml`).

The GPU is found by its UUID: NVML numbers devices as the driver does and ignores
`CUDA_VISIBLE_DEVICES`, so an index from torch could name another process's GPU. The trainer
takes the UUID from `torch.cuda.get_device_properties(i).uuid` and passes it in.

Energy is the difference between two reads of the device's total-energy counter
(millijoules since the driver loaded), not integrated power samples. A counter that went
backwards (the driver was reloaded) gives no value for that window. A value NVML cannot
give (no NVML, a device without the counter) is absent from the sample, and the reason is
logged once.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("moeyard.ops")

# Clock event ("throttle") reason bits, as in nvml.h, with the names we report.
CLOCK_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
)


def nvml_uuid(uuid: str) -> str:
    """The UUID as NVML spells it: torch prints `xxxxxxxx-...`, NVML wants `GPU-xxxxxxxx-...`
    (or `MIG-...` for a MIG instance)."""
    uuid = uuid.strip()
    if uuid.startswith(("GPU-", "MIG-")):
        return uuid
    return "GPU-" + uuid


def clock_event_names(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_EVENT_REASONS if mask & bit]


class GpuSampler:
    """One GPU's telemetry. `read()` returns what was measured since the last read.

    Args:
        uuid: the GPU's UUID (torch or NVML spelling), or None on a rank without a GPU.
        nvml: the NVML binding; None imports `pynvml`. Tests pass an object with the same
            functions and error classes.
    """

    def __init__(self, uuid: str | None, *, nvml: Any | None = None) -> None:
        self.uuid = nvml_uuid(uuid) if uuid else None
        self.available = False
        self.reason = ""
        self._nvml: Any = nvml  # pynvml or a stand-in; duck-typed, set before any call
        self._handle: Any = None
        self._last_energy_mj: int | None = None
        self._disabled: dict[str, str] = {}  # metric -> why it is not read any more
        self._warned: set[tuple[str, str]] = set()
        self._initialized = False
        if self.uuid is None:
            self.reason = "this rank has no CUDA device"
            return
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as e:
                self._unavailable(f"nvidia-ml-py is not installed ({e})")
                return
            self._nvml = pynvml
        n = self._nvml
        try:
            n.nvmlInit()
            self._initialized = True
            self._handle = n.nvmlDeviceGetHandleByUUID(self.uuid)
        except n.NVMLError as e:
            self._unavailable(f"NVML: {e}")
            return
        self.available = True

    def _unavailable(self, why: str) -> None:
        self.reason = why
        log.warning(
            "GPU telemetry unavailable for %s: %s; no GPU metrics are reported",
            self.uuid,
            why,
        )

    def _get(self, metric: str, fn: str, *args: Any) -> Any:
        """One NVML call; None when it failed. A metric the device does not support is not
        asked for again; any failure is logged once per metric and error."""
        if metric in self._disabled:
            return None
        n = self._nvml
        try:
            return getattr(n, fn)(self._handle, *args)
        except n.NVMLError as e:
            permanent = isinstance(
                e,
                (n.NVMLError_NotSupported, n.NVMLError_NoPermission, n.NVMLError_FunctionNotFound),
            )
            if permanent:
                self._disabled[metric] = str(e)
            key = (metric, type(e).__name__)
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "GPU %s: %s not available (%s)%s",
                    self.uuid,
                    metric,
                    e,
                    "; it is left out of the metrics" if permanent else "; skipped this read",
                )
            return None

    def read(self) -> dict[str, Any]:
        """The measured values; keys (each absent when not measured):
        `util_pct`, `mem_util_pct`, `mem_used_bytes`, `mem_total_bytes`, `power_w`,
        `energy_j` (since the previous read; absent on the first read and after a counter
        reset), `temp_c`, `sm_clock_mhz`, `clock_event_mask` and `clock_events` (names).
        """
        if not self.available:
            return {}
        n = self._nvml
        out: dict[str, Any] = {}
        util = self._get("utilization", "nvmlDeviceGetUtilizationRates")
        if util is not None:
            out["util_pct"] = float(util.gpu)
            out["mem_util_pct"] = float(util.memory)
        mem = self._get("memory", "nvmlDeviceGetMemoryInfo")
        if mem is not None:
            out["mem_used_bytes"] = float(mem.used)
            out["mem_total_bytes"] = float(mem.total)
        power_mw = self._get("power", "nvmlDeviceGetPowerUsage")
        if power_mw is not None:
            out["power_w"] = power_mw / 1000.0
        energy_mj = self._get("energy", "nvmlDeviceGetTotalEnergyConsumption")
        if energy_mj is not None:
            prev, self._last_energy_mj = self._last_energy_mj, int(energy_mj)
            if prev is not None:
                if energy_mj >= prev:
                    out["energy_j"] = (energy_mj - prev) / 1000.0
                else:
                    key = ("energy", "reset")
                    if key not in self._warned:
                        self._warned.add(key)
                        log.warning(
                            "GPU %s: the energy counter went back (%d -> %d mJ; driver "
                            "reloaded?); that window has no energy value",
                            self.uuid,
                            prev,
                            energy_mj,
                        )
        temp = self._get("temperature", "nvmlDeviceGetTemperature", n.NVML_TEMPERATURE_GPU)
        if temp is not None:
            out["temp_c"] = float(temp)
        clock = self._get("sm_clock", "nvmlDeviceGetClockInfo", n.NVML_CLOCK_SM)
        if clock is not None:
            out["sm_clock_mhz"] = float(clock)
        fn = (
            "nvmlDeviceGetCurrentClocksEventReasons"
            if hasattr(n, "nvmlDeviceGetCurrentClocksEventReasons")
            else "nvmlDeviceGetCurrentClocksThrottleReasons"
        )
        mask = self._get("clock_events", fn)
        if mask is not None:
            out["clock_event_mask"] = int(mask)
            out["clock_events"] = clock_event_names(int(mask))
        return out

    def name(self) -> str | None:
        """The device's name as NVML reports it, or None."""
        if not self.available:
            return None
        name = (
            self._get("name", "nvmlDeviceGetName")
            if hasattr(self._nvml, "nvmlDeviceGetName")
            else None
        )
        return name.decode() if isinstance(name, bytes) else name

    def close(self) -> None:
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                log.warning("NVML shutdown failed: %s", e)
