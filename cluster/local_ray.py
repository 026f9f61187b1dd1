"""A one-node Ray cluster on this machine, started and stopped by a tool (the Ray soak).

It lives in a temporary folder of its own and binds every port it needs to a free one, so
it never becomes the cluster that `ray_address=auto` finds and never clashes with another
Ray cluster on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A one-node Ray cluster on this machine for the soak: `ray start --head --block` in a
    temporary folder of its own (so it never becomes the cluster that `ray_address=auto`
    finds), stopped on exit: SIGTERM makes `ray start --block` stop every process it
    started; its process group is killed if it does not within `stop_timeout_s`."""

    def __init__(self, num_cpus: int, log: Path, *, start_timeout_s: float = 180.0) -> None:
        self.num_cpus = num_cpus
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.temp = ""
        self.proc: subprocess.Popen[bytes] | None = None

    # A cluster bound to 127.0.0.1 for the soak alone: no token auth (its clients, the
    # launchers, run with the same setting and send none).
    env: ClassVar[dict[str, str]] = {"RAY_AUTH_MODE": "disabled"}

    def __enter__(self) -> str:
        import tempfile

        # Short: Ray's socket paths live in it and are limited to 107 bytes.
        self.temp = tempfile.mkdtemp(prefix="moeyard-soak-")
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            # Other Ray clusters may run on this machine: no fixed port of Ray's defaults.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--temp-dir={self.temp}",
            f"--object-store-memory={100 * 2**20}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                # Nothing to drain when the soak is over: stop at once.
                env={**os.environ, **self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        address_file = Path(self.temp, "ray_current_cluster")
        deadline = time.monotonic() + self.start_timeout_s
        while not (address_file.exists() and address_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"the local Ray cluster did not start (log {self.log}):\n{tail}")
            time.sleep(0.2)
        return address_file.read_text().strip()

    def __exit__(self, *exc: object) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its processes
                self.proc.wait()
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)
