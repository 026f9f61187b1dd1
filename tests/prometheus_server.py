"""A real Prometheus for tests: Debian's `prometheus` binary in its own process on
127.0.0.1 and a free port, with a short scrape interval.

Targets come from file service discovery, so one server serves a whole module: a test
writes its targets with `set_targets([...])` (Prometheus re-reads the file on change), or
passes extra `file_sd` files (e.g. the service-discovery file Ray's head node writes for
its metrics export ports) to `start_prometheus`.

Fixture: `prometheus` (module scope; import `prometheus_fixture` to register it). Helpers: `query`, `query_range`, `wait_for_target`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    def __init__(
        self, proc: subprocess.Popen[bytes], url: str, workdir: str, targets_file: str
    ) -> None:
        self.proc = proc
        self.url = url
        self.workdir = workdir
        self.targets_file = targets_file

    def set_targets(
        self, targets: list[str], labels: dict[str, str] | None = None, timeout_s: float = 30.0
    ) -> None:
        """Replaces the scraped targets (`host:port`), atomically, and waits until Prometheus
        has discovered them (so scraping starts as soon as they are up)."""
        tmp = self.targets_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump([{"targets": targets, "labels": labels or {}}], f)
        os.replace(tmp, self.targets_file)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            active = {t["labels"].get("instance") for t in self.targets()}
            if set(targets) <= active:
                return
            time.sleep(0.05)
        raise TimeoutError(f"Prometheus did not discover {targets} within {timeout_s}s")

    def api(self, path: str, **params: Any) -> Any:
        q = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{q}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"Prometheus {path} {params}: {e.code} {e.read()[:500]!r}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; the result vector (an empty list means no data)."""
        return self.api("query", query=expr, time=at)["result"]

    def query_range(
        self, expr: str, start: float, end: float, step: float = 0.5
    ) -> list[dict[str, Any]]:
        """Range query; one entry per series with its `values` [[t, "v"], ...]."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]

    def wait_for_target(self, address: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Waits until the target at `address` was scraped successfully once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t in self.targets():
                if t["labels"].get("instance") == address and t["health"] == "up":
                    return t
            time.sleep(0.1)
        raise TimeoutError(
            f"Prometheus did not scrape {address} within {timeout_s}s: {self.targets()}"
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_prometheus(
    *, scrape_interval: str = "250ms", sd_files: list[str] = (), timeout_s: float = 30.0
) -> PrometheusServer:
    """Starts Prometheus on 127.0.0.1 and a free port and waits until it is ready.

    Raises:
        RuntimeError: the binary is missing (scripts/setup.sh installs it) or did not start.
    """
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("the prometheus binary is not installed; run scripts/setup.sh")
    workdir = tempfile.mkdtemp(prefix="moeyard-prometheus-")
    targets_file = os.path.join(workdir, "targets.json")
    with open(targets_file, "w") as f:
        json.dump([], f)
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "moeyard",
                "file_sd_configs": [{"files": [targets_file, *sd_files], "refresh_interval": "1s"}],
            }
        ],
    }
    config_file = os.path.join(workdir, "prometheus.yml")
    with open(config_file, "w") as f:
        json.dump(config, f)  # JSON is YAML
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(workdir, "prometheus.log"), "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={os.path.join(workdir, 'data')}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = PrometheusServer(proc, url, workdir, targets_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(os.path.join(workdir, "prometheus.log")) as f:
                out = f.read()
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"prometheus exited with {proc.returncode}: {out[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"prometheus did not become ready on {url} within {timeout_s}s")


@pytest.fixture(scope="module", name="prometheus")
def prometheus_fixture() -> Iterator[PrometheusServer]:
    """One Prometheus per test module; import `prometheus_fixture` to use `prometheus`."""
    server = start_prometheus()
    yield server
    server.stop()
