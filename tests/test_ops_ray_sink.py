"""The Prometheus sink's Ray backend: series recorded with `ray.util.metrics` in a Ray actor
come out of this node's metrics export port under the names the dashboard matches
(`ray_` + ours), with our labels, and nothing for a GPU that was not measured."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.prometheus_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out.append((labels, float(m.group(2))))
    return out


def test_ray_backend_series_reach_the_metrics_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    port = free_port()
    # Workers inherit this environment: they import ops from the repo and report every 1 s.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    # A cluster of its own ("local"), never the session's mini-cluster that other tests
    # started (ray.init() alone would join it, as the newest cluster on this machine).
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        _metrics_export_port=port,
        log_to_driver=False,
    )
    try:

        @ray.remote(num_cpus=0)
        class Worker:
            def emit(self) -> None:
                from ops.config import OpsConfig
                from ops.prometheus import build_prometheus_sink

                sink = build_prometheus_sink(
                    OpsConfig(prometheus="ray"),
                    run="ray-run",
                    node="node-a",
                    rank=0,
                    local_rank=0,
                    gpu=None,
                )
                assert sink is not None
                base = {"loss": 2.5, "tokens_per_s": 1000.0, "step_time_s": 0.2}
                sink.log(
                    {**base, "tokens_window": 512, "flops_per_token": 10.0, "window_steps": 2}, 2
                )
                sink.log({**base, "loss": 2.0, "tokens_window": 256, "flops_per_token": 10.0}, 3)

        w = Worker.remote()
        ray.get(w.emit.remote())
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = _scrape(port)
            if _samples(text, "ray_moeyard_tokens_total") and _samples(text, "ray_moeyard_loss"):
                break
            time.sleep(0.5)
    finally:
        ray.shutdown()
    tokens = [
        v
        for labels, v in _samples(text, "ray_moeyard_tokens_total")
        if labels.get("run") == "ray-run"
    ]
    assert tokens == [768.0], text[-3000:]
    loss = _samples(text, "ray_moeyard_loss")
    assert [v for _, v in loss] == [2.0]
    labels = loss[0][0]
    assert labels["run"] == "ray-run" and labels["node"] == "node-a" and labels["rank"] == "0"
    steps = [v for _, v in _samples(text, "ray_moeyard_steps_total")]
    assert steps == [3.0]
    # The dashboard's selectors match Ray's names.
    assert re.fullmatch(r"(ray_)?moeyard_tokens_total", "ray_moeyard_tokens_total")
    assert "ray_moeyard_step_seconds_bucket" in text
    # Nothing for the GPU that was not measured.
    assert "moeyard_gpu_" not in "\n".join(
        line for line in text.splitlines() if not line.startswith("#")
    )
