"""A local S3-compatible endpoint for tests: moto's server in its own process on 127.0.0.1.

The server binds a free port chosen by the OS (port 0) and reports it on stdout, so tests
never guess a port. Clients reach it over HTTP through the real s3fs / pyarrow / botocore
clients, configured by the standard environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

_SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()  # runs until the parent closes our stdin or kills us
"""

TEST_KEY_ID = "moeyard-test-key-id"
TEST_SECRET = "moeyard-test-secret-value"


class S3Server:
    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment a client (or a spawned rank) needs to reach this endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"moto server did not start (printed {line!r})")
        self.port = int(line)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2)
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One endpoint for the whole session, its variables set in os.environ."""
    server = S3Server().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: S3Server, request) -> str:
    """A fresh bucket per test; returns its `s3://name` URL."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip(
        "-"
    )
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists(name):
        fs.mkdir(name)
    return f"s3://{name}"
