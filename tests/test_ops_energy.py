"""The GPU energy counter read off the step's path (ops/nvml.py `EnergyCounter`): a thread
reads it, the logged step takes the newest value, and the windows' energies still add up
exactly to the counter's change over the run.

The counter is `FakeNvml` of tests/test_ops_telemetry.py (NVML's semantics: millijoules since
driver load), made slow like the real call and advancing at every read, injected through the
sampler's real `nvml` argument."""

from __future__ import annotations

import threading
import time
import warnings
from typing import Any

import pytest

from ops.config import OpsConfig, OpsConfigError
from ops.nvml import EnergyCounter, GpuSampler
from ops.telemetry import Telemetry
from tests.test_ops_telemetry import UUID, FakeGpu, FakeNvml


class SlowCounterNvml(FakeNvml):
    """The energy call takes `delay_s` and the counter advances by a new amount at each
    read; every call is recorded with the thread it ran on."""

    def __init__(self, gpu: FakeGpu, *, delay_s: float = 0.003) -> None:
        super().__init__({"GPU-" + UUID: gpu})
        self.gpu = gpu
        self.delay_s = delay_s
        self.energy_threads: list[int] = []
        self.lock = threading.Lock()
        self.step = 0

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        time.sleep(self.delay_s)
        with self.lock:
            self.energy_threads.append(threading.get_ident())
            self.step += 1
            # Uneven increments (1..997 mJ) so that a lost or double-counted read shows.
            self.gpu.energy_mj += (self.step * 7919) % 997 + 1
            return super().nvmlDeviceGetTotalEnergyConsumption(h)


def _telemetry(nvml: FakeNvml, interval_s: float) -> Telemetry:
    gpu = GpuSampler(UUID, nvml=nvml, energy_interval_s=interval_s)
    return Telemetry(
        OpsConfig(rapl_root="/nonexistent", energy_interval_s=interval_s),
        rank=0,
        local_rank=0,
        world_size=1,
        gpu_uuid=UUID,
        device_name="NVIDIA H100 80GB HBM3",
        flops_per_token=1e6,
        gpu=gpu,
    )


def test_step_path_never_calls_the_energy_counter_and_windows_add_up_exactly():
    gpu = FakeGpu()
    nvml = SlowCounterNvml(gpu)
    t = _telemetry(nvml, interval_s=0.005)
    main = threading.get_ident()
    baseline_before = gpu.energy_mj
    t.start()  # the baseline read (at the run's start, not a step)
    start_calls = len(nvml.energy_threads)
    assert start_calls == 1 and nvml.energy_threads[0] == main
    first = gpu.energy_mj
    assert first > baseline_before
    windows_mj: list[int] = []
    step_s: list[float] = []
    for i in range(25):
        time.sleep(0.002 * (i % 4))  # windows shorter and longer than the read interval
        rec: dict[str, Any] = {}
        t0 = time.perf_counter()
        t.update(rec, window_s=0.01, window_steps=1, window_tokens=100, window_data_wait_s=0.0)
        step_s.append(time.perf_counter() - t0)
        windows_mj.append(round(rec["gpu_energy_j"] * 1000))
    assert t.gpu is not None
    threads_in_steps = nvml.energy_threads[start_calls:]
    # The counter kept being read, by the thread alone: the logged steps never called it.
    assert len(threads_in_steps) > 5 and main not in threads_in_steps
    # And a logged step does not wait for it (the call takes 3 ms here).
    assert sorted(step_s)[len(step_s) // 2] < nvml.delay_s
    last_seen = t.gpu._last_energy_mj
    assert last_seen is not None
    # Each window is the difference of two of the counter's values: they add up exactly.
    assert all(w >= 0 for w in windows_mj) and sum(windows_mj) > 0
    assert sum(windows_mj) == last_seen - first
    assert t.energy_total_j == pytest.approx(sum(windows_mj) / 1000, rel=1e-12)
    t.close()  # stops the thread with a last read: the total reaches the run's end
    final = gpu.energy_mj
    assert t.gpu.energy_total_j() == (final - first) / 1000
    calls = len(nvml.energy_threads)
    time.sleep(0.03)
    assert len(nvml.energy_threads) == calls  # stopped


def test_without_a_thread_the_step_reads_the_counter_itself():
    """ops.energy_interval_s=0: the old way, for comparison; exact all the same."""
    gpu = FakeGpu()
    nvml = SlowCounterNvml(gpu, delay_s=0.0)
    t = _telemetry(nvml, interval_s=0.0)
    main = threading.get_ident()
    t.start()
    first = gpu.energy_mj
    total = 0
    for _ in range(5):
        rec: dict[str, Any] = {}
        t.update(rec, window_s=1.0, window_steps=1, window_tokens=10, window_data_wait_s=0.0)
        total += round(rec["gpu_energy_j"] * 1000)
    assert set(nvml.energy_threads) == {main} and len(nvml.energy_threads) == 6
    assert total == gpu.energy_mj - first
    assert t.gpu is not None and t.gpu.energy_total_j() == total / 1000
    t.close()


def test_counter_thread_keeps_the_last_good_value_through_failed_reads():
    values = iter([10, None, None, 25])
    c = EnergyCounter(lambda: next(values), interval_s=3600)
    c.start()
    assert c.latest() == 10
    c.sample()
    c.sample()
    assert c.latest() == 10 and c.reads == 1
    c.close()  # the last read on close
    assert c.latest() == 25 and c.reads == 2


def test_counter_reset_under_the_thread_skips_one_window():
    gpu = FakeGpu()
    s = GpuSampler(UUID, nvml=FakeNvml({"GPU-" + UUID: gpu}), energy_interval_s=3600)
    s.read()  # baseline; the thread now sleeps an hour between reads
    assert s._energy is not None
    gpu.energy_mj = 500  # the driver was reloaded
    s._energy.sample()
    assert "energy_j" not in s.read()
    gpu.energy_mj = 1_500
    s._energy.sample()
    assert s.read()["energy_j"] == pytest.approx(1.0)
    assert s.energy_total_j() is None  # across a reset there is no run total
    s.close()


def test_config():
    with pytest.raises(OpsConfigError, match=r"ops.energy_interval_s \(-1.0\) must be >= 0"):
        OpsConfig(energy_interval_s=-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OpsConfig(telemetry=False, energy_interval_s=1.0)
    assert any("ops.energy_interval_s (1.0) is ignored" in str(w.message) for w in caught)
