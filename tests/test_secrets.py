"""No credential leaks: a run that reads shards from S3 and writes its outputs to S3 with the
test endpoint's keys (and a Grafana token and a W&B API key in its environment) is searched,
byte for byte, in every object it wrote (its TensorBoard event files among them), every file
of its W&B offline run, its stdout and stderr, the ops page and API served for its run
directory, and the text of its Prometheus endpoint; none holds a credential. The servers
bind to 127.0.0.1 by default."""

from __future__ import annotations

import socket
import sysconfig
import threading
import urllib.request
from pathlib import Path

import fsspec

from dataloader.prepare import prepare
from ops.page import serve_in_thread
from tests.s3_server import TEST_KEY_ID, TEST_SECRET
from trainer.config import load_config
from trainer.loop import run

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"
GRAFANA_TOKEN = "glsa_moeyard-test-grafana-token"
WANDB_API_KEY = "moeyard0test0wandb0api0key0d41d8cd98f00b2"  # 40 characters, as W&B's
SECRETS = (TEST_KEY_ID, TEST_SECRET, GRAFANA_TOKEN, WANDB_API_KEY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listen_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on `port` (from /proc/net/tcp)."""
    out = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if state == "0A" and int(p, 16) == port:  # 0A = LISTEN
            out.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return out


def leaks(blob: bytes, where: str) -> list[str]:
    return [f"{where} holds {s!r}" for s in SECRETS if s.encode() in blob]


class Scraper:
    """Polls a Prometheus endpoint every `interval_s` while the run goes on; keeps every body
    it got and the addresses the port listens on."""

    def __init__(self, port: int, interval_s: float = 0.1) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.port, self.interval_s = port, interval_s
        self.bodies: list[bytes] = []
        self.addresses: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    self.bodies.append(r.read())
                self.addresses |= listen_addresses(self.port)
            except OSError:
                pass
            self.stop.wait(self.interval_s)

    def close(self) -> list[bytes]:
        self.stop.set()
        self.thread.join()
        return self.bodies


def test_no_credential_in_any_artifact(s3_bucket, tmp_path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", GRAFANA_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_API_KEY)
    wandb_dir = tmp_path / "wandb"
    data = f"{s3_bucket}/data"
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        data,
        seq_len=64,
        rows_per_group=32,
        progress=False,
    )
    out = f"{s3_bucket}/run"
    port = free_port()
    cfg = load_config(
        PRESET,
        [
            "parallel.ep=1",
            "train.steps=4",
            "checkpoint.every=2",
            "data.source=shards",
            f"data.path={data}",
            f"run.output_dir={out}",
            "ops.prometheus=client",
            f"ops.prometheus_port={port}",
            "ops.prometheus_linger_s=1.0",
            "ops.tensorboard=true",
            "ops.wandb=true",
            "ops.wandb_mode=offline",
            f"ops.wandb_dir={wandb_dir}",
        ],
        ignore_sections=("cluster",),
    )
    scraper = Scraper(port)
    try:
        summary = run(cfg)
    finally:
        scraper.close()
    assert summary.steps == 4
    found: list[str] = []

    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    objects = fs.find(root)
    names = {o.rsplit("/", 1)[-1] for o in objects}
    # What the run is contracted to write is all there, so the search covered it.
    assert {
        "metrics.jsonl",
        "config.yaml",
        "placement.json",
        "summary.json",
        ".metadata",
        "wandb_run.json",
    } <= names
    assert any("tfevents" in n for n in names), names
    for obj in objects:
        found += leaks(fs.cat_file(obj), obj)
    # The W&B offline run: its transaction log, config, logs and media.
    wandb_files = [p for p in wandb_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in wandb_files), wandb_files
    assert any(p.name == "debug-internal.log" for p in wandb_files), wandb_files
    for p in wandb_files:
        found += leaks(p.read_bytes(), str(p))

    said = capfd.readouterr()
    assert "step 4" in said.out  # the captured output is the run's
    found += leaks(said.out.encode(), "stdout") + leaks(said.err.encode(), "stderr")

    assert scraper.bodies and b"moeyard_steps" in scraper.bodies[-1]
    for body in scraper.bodies:
        found += leaks(body, "the Prometheus endpoint")
    assert scraper.addresses == {"127.0.0.1"}, scraper.addresses

    server, _thread = serve_in_thread(out)
    try:
        host, page_port = server.server_address[:2]
        assert host == "127.0.0.1"
        for path in ("/", "/api/metrics?offset=0", "/api/status"):
            with urllib.request.urlopen(f"http://127.0.0.1:{page_port}{path}", timeout=5) as r:
                body = r.read()
            assert body
            found += leaks(body, f"ops page {path}")
    finally:
        server.shutdown()
        server.server_close()
    assert not found, found
