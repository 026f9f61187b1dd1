"""Reads one GPU through NVML (`nvidia-ml-py`, module `pynvml`).

The GPU is found by its UUID: NVML numbers devices as the driver does and ignores
`CUDA_VISIBLE_DEVICES`, so an index from torch could name another process's GPU. The trainer
takes the UUID from `torch.cuda.get_device_properties(i).uuid` and passes it in.

Energy is the difference between two reads of the device's total-energy counter
(millijoules since the driver loaded), not integrated power samples. A counter that went
backwards (the driver was reloaded) gives no value for that window. A value NVML cannot
give (no NVML, a device without the counter) is absent from the sample, and the reason is
logged once.

The energy call is slow (`nvmlDeviceGetTotalEnergyConsumption`: 3.2 ms median, 17.8 ms
max on an H200; every other call takes microseconds), so with `energy_interval_s` > 0 it
is made off the training step's path: an `EnergyCounter` thread reads the counter every
`energy_interval_s` seconds (NVML is thread-safe, and the binding releases the GIL inside
the call), and `read()` takes the newest value it has. Each window's energy is the
difference between two of the counter's own values, so the windows still add up exactly
(in integer millijoules) to the counter's change from the first read to the last; a window's
boundaries are those of the thread's reads, at most `energy_interval_s` after the step's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
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


class EnergyCounter:
    """Reads a cumulative counter on a thread of its own; `latest()` is the newest value.

    Args:
        read: one read of the counter (an int, or None when the read failed: the last good
            value stands).
        interval_s: seconds between reads.
    """

    def __init__(self, read: Callable[[], int | None], interval_s: float) -> None:
        self._read = read
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._latest: int | None = None
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeyard-energy", daemon=True)

    def start(self) -> None:
        """Takes the first read on the calling thread (the baseline), then starts the thread."""
        self.sample()
        self._thread.start()

    def sample(self) -> None:
        value = self._read()
        if value is not None:
            with self._lock:
                self._latest = int(value)
                self.reads += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def latest(self) -> int | None:
        with self._lock:
            return self._latest

    def close(self) -> None:
        """Stops the thread and takes a last read, so that the run's total reaches its end."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.sample()


class GpuSampler:
    """One GPU's telemetry. `read()` returns what was measured since the last read.

    Args:
        uuid: the GPU's UUID (torch or NVML spelling), or None on a rank without a GPU.
        nvml: the NVML binding; None imports `pynvml`. Tests pass an object with the same
            functions and error classes.
        energy_interval_s: > 0 reads the energy counter on a thread every this many
            seconds, off the caller's path (`ops.energy_interval_s`; see the module
            docstring); 0 reads it in `read()`.
    """

    def __init__(
        self, uuid: str | None, *, nvml: Any | None = None, energy_interval_s: float = 0.0
    ) -> None:
        self.uuid = nvml_uuid(uuid) if uuid else None
        self.available = False
        self.reason = ""
        self._nvml: Any = nvml  # pynvml or a stand-in; duck-typed, set before any call
        self._handle: Any = None
        self._last_energy_mj: int | None = None
        self.energy_interval_s = energy_interval_s
        self._energy: EnergyCounter | None = None
        self._first_energy_mj: int | None = None
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
        energy_mj = self._energy_mj()
        if energy_mj is not None:
            if self._first_energy_mj is None:
                self._first_energy_mj = int(energy_mj)
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

    def _read_energy_counter(self) -> int | None:
        mj = self._get("energy", "nvmlDeviceGetTotalEnergyConsumption")
        return None if mj is None else int(mj)

    def _energy_mj(self) -> int | None:
        """The energy counter's value for this read: the thread's newest (started on the
        first read) or, without a thread, a read now."""
        if self.energy_interval_s <= 0:
            return self._read_energy_counter()
        if self._energy is None:
            self._energy = EnergyCounter(self._read_energy_counter, self.energy_interval_s)
            self._energy.start()
        return self._energy.latest()

    def energy_total_j(self) -> float | None:
        """The counter's change from the first value `read()` used to the newest value there
        is (after `close()`, the thread's last read): the windows' energies plus the tail
        after the last window. None before any value, or across a counter reset."""
        last = self._energy.latest() if self._energy is not None else self._last_energy_mj
        first = self._first_energy_mj
        if last is None or first is None or last < first:
            return None
        return (last - first) / 1000.0

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
        if self._energy is not None:
            self._energy.close()  # before NVML shuts down under it
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                log.warning("NVML shutdown failed: %s", e)
