"""The NVML sampler, the RAPL reader, the step and energy metrics, and the FLOPs-per-token
formula.

There is no GPU here, so the NVML tests use `FakeNvml`: a test double of the hardware that
implements the pynvml functions the sampler calls with NVML's documented semantics (the
total-energy counter in millijoules since driver load, power in milliwatts, handles looked
up by `GPU-` UUID only, `NVMLError` subclasses from the real pynvml for each failure). The
sampler also runs once against the real pynvml, which on this machine has no library.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from ops.config import OpsConfig
from ops.metrics import energy_metrics, lookup_peak_tflops, resolve_peak_tflops, step_metrics
from ops.nvml import GpuSampler, nvml_uuid
from ops.rapl import RaplReader
from ops.telemetry import Telemetry
from trainer.config import ModelConfig, MoEConfig
from trainer.flops import flops_per_token

UUID = "5b1e3c9a-0d4f-4a1e-9c2b-7e8f9a0b1c2d"  # as torch prints it


@dataclass
class FakeGpu:
    energy_mj: int = 1_000_000
    power_mw: int = 350_500
    util: int = 97
    mem_util: int = 40
    mem_used: int = 60 << 30
    mem_total: int = 80 << 30
    temp: int = 71
    sm_clock: int = 1980
    reasons: int = 0x4 | 0x40
    unsupported: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    """The pynvml functions GpuSampler calls, with NVML's semantics (see the module
    docstring). Errors are the real pynvml exception classes."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM

    def __init__(self, gpus: dict[str, FakeGpu], *, library: bool = True) -> None:
        self.gpus = gpus
        self.library = library
        self.refcount = 0

    def _check(self, handle: Any, fn: str) -> FakeGpu:
        if self.refcount == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle]
        gpu.calls[fn] = gpu.calls.get(fn, 0) + 1
        if fn in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        if not self.library:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        self.refcount += 1

    def nvmlShutdown(self) -> None:
        if self.refcount == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        self.refcount -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> str:
        if self.refcount == 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        if uuid not in self.gpus:  # NVML knows devices only as "GPU-<uuid>"
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return uuid

    def nvmlDeviceGetName(self, h: str) -> str:
        self._check(h, "name")
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, h: str) -> Any:
        g = self._check(h, "utilization")
        return SimpleNamespace(gpu=g.util, memory=g.mem_util)

    def nvmlDeviceGetMemoryInfo(self, h: str) -> Any:
        g = self._check(h, "memory")
        return SimpleNamespace(used=g.mem_used, total=g.mem_total, free=g.mem_total - g.mem_used)

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return self._check(h, "power").power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        return self._check(h, "energy").energy_mj

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._check(h, "temperature").temp

    def nvmlDeviceGetClockInfo(self, h: str, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self._check(h, "sm_clock").sm_clock

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int:
        return self._check(h, "clock_events").reasons


def make(gpu: FakeGpu | None = None, **kw: Any) -> tuple[GpuSampler, FakeGpu, FakeNvml]:
    gpu = gpu or FakeGpu()
    nvml = FakeNvml({"GPU-" + UUID: gpu}, **kw)
    return GpuSampler(UUID, nvml=nvml), gpu, nvml


def test_uuid_spelling() -> None:
    assert nvml_uuid(UUID) == "GPU-" + UUID
    assert nvml_uuid("GPU-" + UUID) == "GPU-" + UUID
    assert nvml_uuid("MIG-abc") == "MIG-abc"


def test_energy_is_the_counter_delta_and_units_are_converted() -> None:
    s, gpu, nvml = make()
    assert s.available and nvml.refcount == 1
    first = s.read()
    assert "energy_j" not in first  # a first read only sets the baseline
    assert first["power_w"] == pytest.approx(350.5)
    assert first["util_pct"] == 97 and first["mem_util_pct"] == 40
    assert first["mem_used_bytes"] == 60 << 30 and first["mem_total_bytes"] == 80 << 30
    assert first["temp_c"] == 71 and first["sm_clock_mhz"] == 1980
    assert first["clock_events"] == ["sw_power_cap", "hw_thermal_slowdown"]
    gpu.energy_mj += 250_500
    assert s.read()["energy_j"] == pytest.approx(250.5)
    gpu.energy_mj += 1
    assert s.read()["energy_j"] == pytest.approx(0.001)
    assert s.read()["energy_j"] == 0.0  # a measured zero (idle between reads) stays
    assert s.name() == "NVIDIA H100 80GB HBM3"
    s.close()
    assert nvml.refcount == 0


def test_energy_counter_reset_skips_one_window(caplog: pytest.LogCaptureFixture) -> None:
    s, gpu, _ = make()
    s.read()
    gpu.energy_mj = 5_000  # the driver was reloaded: the counter restarted
    with caplog.at_level(logging.WARNING, logger="moeyard.ops"):
        after_reset = s.read()
        gpu.energy_mj = 7_000
        nxt = s.read()
        gpu.energy_mj = 1_000
        s.read()
    assert "energy_j" not in after_reset
    assert nxt["energy_j"] == pytest.approx(2.0)
    assert "power_w" in after_reset  # the other values are still read
    assert sum("went back" in r.message for r in caplog.records) == 1  # logged once


def test_device_without_energy_counter(caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(unsupported={"energy", "clock_events"})
    with caplog.at_level(logging.WARNING, logger="moeyard.ops"):
        s, gpu, _ = make(gpu)
        reads = [s.read() for _ in range(3)]
        gpu.energy_mj += 10_000
        reads.append(s.read())
    for r in reads:
        assert "energy_j" not in r and "clock_events" not in r
        assert r["power_w"] == pytest.approx(350.5)
    assert gpu.calls["energy"] == 1  # NotSupported is permanent: not asked again
    msgs = [r.message for r in caplog.records if "energy not available" in r.message]
    assert len(msgs) == 1 and "Not Supported" in msgs[0]


def test_nvml_missing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moeyard.ops"):
        s, _, _ = make(library=False)
        assert s.read() == {} and s.read() == {}
    assert not s.available
    assert "NVML Shared Library Not Found" in s.reason
    assert sum("GPU telemetry unavailable" in r.message for r in caplog.records) == 1
    s.close()  # nothing to shut down


def test_real_pynvml_on_this_machine() -> None:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    except pynvml.NVMLError:
        pass
    s = GpuSampler(UUID)
    assert not s.available and s.read() == {}
    assert "NVML" in s.reason


def test_unknown_uuid_is_unavailable() -> None:
    nvml = FakeNvml({"GPU-other": FakeGpu()})
    s = GpuSampler(UUID, nvml=nvml)
    assert not s.available and "Not Found" in s.reason


def write_rapl(root: Path, packages: dict[int, tuple[int, int]]) -> None:
    """Fake powercap tree: package N -> (energy_uj, max_energy_range_uj), plus a core
    sub-domain and a psys domain that must be ignored."""
    for n, (energy, max_range) in packages.items():
        d = root / f"intel-rapl:{n}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "name").write_text(f"package-{n}\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = root / f"intel-rapl:{n}:0"
        sub.mkdir(exist_ok=True)
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("1\n")
    psys = root / "intel-rapl:9"
    psys.mkdir(exist_ok=True)
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("123\n")
    (psys / "max_energy_range_uj").write_text("1000\n")


def test_rapl_sums_packages_and_handles_wrap(tmp_path: Path) -> None:
    write_rapl(tmp_path, {0: (1_000_000, 262_143_328_850), 1: (262_143_000_000, 262_143_328_850)})
    r = RaplReader(str(tmp_path))
    assert r.available
    write_rapl(tmp_path, {0: (3_500_000, 262_143_328_850), 1: (1_671_150, 262_143_328_850)})
    # package 0: +2.5 J; package 1 wrapped: 328_850 + 1_671_150 uJ = 2.0 J
    assert r.read() == pytest.approx(4.5)
    assert r.read() == 0.0


def test_rapl_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="moeyard.ops"):
        r = RaplReader(str(tmp_path / "nope"))
    assert not r.available and r.read() is None
    assert "cannot be listed" in r.reason
    assert any("CPU package energy unavailable" in m.message for m in caplog.records)


def test_rapl_garbage_counter(tmp_path: Path) -> None:
    write_rapl(tmp_path, {0: (1, 100)})
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("n/a\n")
    r = RaplReader(str(tmp_path))
    assert not r.available and r.read() is None
    assert "intel-rapl:0/energy_uj" in r.reason


def test_rapl_unreadable_counter(caplog: pytest.LogCaptureFixture) -> None:
    """Since Linux 5.10 energy_uj is 0400 root: a non-root reader gets EACCES. Root reads
    anything, so as root the reader runs with the effective uid of `nobody` against a 0400
    file, which is what a training process of an ordinary user meets."""
    root = tempfile.mkdtemp(prefix="moeyard-rapl-")
    try:
        os.chmod(root, 0o755)
        write_rapl(Path(root), {0: (1_000, 100_000)})
        os.chmod(Path(root) / "intel-rapl:0" / "energy_uj", 0o400 if os.geteuid() == 0 else 0)
        with caplog.at_level(logging.WARNING, logger="moeyard.ops"):
            if os.geteuid() == 0:
                os.seteuid(65534)
                try:
                    r = RaplReader(root)
                finally:
                    os.seteuid(0)
            else:
                r = RaplReader(root)
            assert r.read() is None and r.read() is None
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not r.available
    assert "intel-rapl:0/energy_uj" in r.reason and "Permission denied" in r.reason
    assert sum("CPU package energy unavailable" in m.message for m in caplog.records) == 1


def test_peak_table_and_mfu() -> None:
    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert lookup_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert lookup_peak_tflops("NVIDIA H200") == 989.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert lookup_peak_tflops("NVIDIA L40S") == 362.0 and lookup_peak_tflops("NVIDIA L4") == 121.0
    assert lookup_peak_tflops(None) is None and lookup_peak_tflops("cpu") is None
    assert resolve_peak_tflops(0.0, None) is None  # CPU: absent unless configured
    assert resolve_peak_tflops(2.5, "NVIDIA H100") == 2.5
    m = step_metrics(
        window_s=2.0,
        window_steps=4,
        window_tokens=8192,
        window_data_wait_s=0.5,
        flops_per_token=1e9,
        peak_tflops=989.0,
        world_size=8,
    )
    # 4096 tokens/s x 1e9 FLOPs = 4.096 TFLOP/s over 8 x 989 TFLOP/s
    assert m["model_tflops_per_s"] == pytest.approx(4.096)
    assert m["mfu"] == pytest.approx(4.096 / (8 * 989))
    assert m["data_wait_share"] == pytest.approx(0.25)
    no_peak = step_metrics(
        window_s=1.0,
        window_steps=1,
        window_tokens=10,
        window_data_wait_s=0.0,
        flops_per_token=1.0,
        peak_tflops=None,
        world_size=1,
    )
    assert "mfu" not in no_peak


def test_energy_metrics() -> None:
    assert energy_metrics(gpu_j=None, cpu_j=None, window_tokens=100) == {}
    e = energy_metrics(gpu_j=3600.0, cpu_j=None, window_tokens=1000)
    assert e["energy_scope"] == "gpu" and e["energy_per_token_j"] == pytest.approx(3.6)
    assert e["tokens_per_kwh"] == pytest.approx(1000 / 0.001)
    both = energy_metrics(gpu_j=100.0, cpu_j=20.0, window_tokens=60)
    assert both["energy_scope"] == "gpu+cpu" and both["energy_per_token_j"] == pytest.approx(2.0)


def test_telemetry_job_energy_needs_every_gpu() -> None:
    """Two ranks: the job's energy is the sum of both GPUs' deltas; when one rank's counter
    gives no value, the job's energy for that window is absent, not half of it."""
    s, gpu, _ = make()
    t = Telemetry(
        OpsConfig(rapl_root="/nonexistent"),
        rank=0,
        local_rank=0,
        world_size=2,
        gpu_uuid=UUID,
        device_name="NVIDIA H100 80GB HBM3",
        flops_per_token=1e6,
        gpu=s,
        gather=None,
    )
    other = {"energy_j": 40.0, "power_w": 300.0}
    other_row: list[float] = []

    def gather(vec: list[float]) -> list[list[float]]:
        return [vec, other_row]

    t.gather = gather
    t.start()
    other_row[:] = t._vector(other)
    other_row[-1] = 0.0  # rank 1 is not local rank 0: no CPU read expected
    gpu.energy_mj += 60_000
    rec: dict[str, Any] = {}
    t.update(rec, window_s=1.0, window_steps=1, window_tokens=1000, window_data_wait_s=0.0)
    assert rec["gpu_energy_j"] == pytest.approx(100.0)
    assert rec["energy_per_token_j"] == pytest.approx(0.1)
    assert rec["energy_scope"] == "gpu"  # RAPL absent here
    assert [d["rank"] for d in rec["devices"]] == [0, 1]
    assert rec["devices"][1]["power_w"] == 300.0 and "util_pct" not in rec["devices"][1]
    assert rec["mfu"] == pytest.approx(1000 * 1e6 / (2 * 989e12))
    other_row[:] = t._vector({"power_w": 300.0})
    other_row[-1] = 0.0
    gpu.energy_mj += 60_000
    rec2: dict[str, Any] = {}
    t.update(rec2, window_s=1.0, window_steps=1, window_tokens=1000, window_data_wait_s=0.0)
    assert "gpu_energy_j" not in rec2 and "energy_per_token_j" not in rec2
    assert rec2["devices"][0]["energy_j"] == pytest.approx(60.0)
    assert t.energy_total_j == pytest.approx(100.0)
    assert not math.isnan(rec2["devices"][1]["power_w"])


def test_flops_per_token_hand_count() -> None:
    """vocab 10, dim 8, 2 layers (1 dense, 1 MoE), 2 heads of 4, 1 KV head; MoE: 4 experts,
    top-2, hidden 8, 1 shared expert; dense FFN hidden 16; untied head; seq_len 16.

    Per token, matmul weights used (multiply-adds):
      attention, per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; 2 layers = 384
      dense FFN (SwiGLU, 3 matrices): 3 x 8 x 16 = 384
      MoE layer: router 4 x 8 = 32, shared 3 x 8 x 8 = 192, 2 routed x 192 = 384 -> 608
      output head: 10 x 8 = 80        (the input embedding is a lookup: no FLOPs)
      total 1456 -> 6 x 1456 = 8736 training FLOPs
    Attention scores and values: 6 x layers 2 x heads 2 x (4 + 4) x seq 16 = 3072.
    """
    cfg = ModelConfig(
        vocab_size=10,
        dim=8,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        num_dense_layers=1,
        dense_hidden=16,
        max_seq_len=16,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1),
    )
    assert flops_per_token(cfg, 16) == 8736 + 3072


def test_prometheus_sink_exports_own_gpu_and_step_series_on_rank_zero_only() -> None:
    """Rank 1's sink exports rank 1's GPU (from the gathered `devices`) and no step series;
    rank 0's exports its GPU and the step series. Read back from the client endpoints."""
    import urllib.request

    from ops.prometheus import PrometheusSink, build_prometheus_sink
    from tests.prometheus_server import free_port

    record = {
        "loss": 2.0,
        "tokens_per_s": 100.0,
        "step_time_s": 0.5,
        "tokens_window": 50,
        "flops_per_token": 4.0,
        "window_steps": 1,
        "moe": [{"layer": 0, "max_over_mean": 1.5, "cv": 0.25}],
        "devices": [
            {"rank": 0, "power_w": 300.0, "energy_j": 12.5, "util_pct": 90.0},
            {
                "rank": 1,
                "power_w": 310.0,
                "energy_j": 13.0,
                "clock_event_mask": 0x4,
                "cpu_energy_j": 2.0,
            },
        ],
    }
    texts = {}
    for rank in (0, 1):
        port = free_port()
        sink = build_prometheus_sink(
            OpsConfig(prometheus="client", prometheus_port=port),
            run="r",
            node="n",
            rank=rank,
            local_rank=0,
            gpu=UUID,
        )
        assert isinstance(sink, PrometheusSink)
        sink.log(record, 1)
        sink.log(record, 2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
            texts[rank] = r.read().decode()
        sink.close()
    gpu = f'gpu="GPU-{UUID}",node="n",rank="{{}}",run="r"'
    assert f"moeyard_gpu_power_watts{{{gpu.format(0)}}} 300.0" in texts[0]
    assert f"moeyard_gpu_energy_joules_total{{{gpu.format(0)}}} 25.0" in texts[0]
    assert f"moeyard_gpu_utilization_percent{{{gpu.format(0)}}} 90.0" in texts[0]
    assert 'moeyard_tokens_total{node="n",rank="0",run="r"} 100.0' in texts[0]
    assert 'moeyard_model_flops_total{node="n",rank="0",run="r"} 400.0' in texts[0]
    assert 'moeyard_expert_load_max_over_mean{layer="0",node="n",rank="0",run="r"} 1.5' in texts[0]
    assert f"moeyard_gpu_power_watts{{{gpu.format(1)}}} 310.0" in texts[1]
    assert f"moeyard_gpu_energy_joules_total{{{gpu.format(1)}}} 26.0" in texts[1]
    assert 'moeyard_cpu_energy_joules_total{node="n",rank="1",run="r"} 4.0' in texts[1]
    assert 'reason="sw_power_cap",run="r"} 1.0' in texts[1]
    assert 'reason="hw_slowdown",run="r"} 0.0' in texts[1]
    # Not measured on rank 1: no utilization series; no step series off rank 0.
    samples1 = [line for line in texts[1].splitlines() if not line.startswith("#")]
    assert not any(line.startswith("moeyard_gpu_utilization") for line in samples1)
    assert not any(line.startswith(("moeyard_loss", "moeyard_tokens_total")) for line in samples1)
