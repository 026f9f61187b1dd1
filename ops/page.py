"""The built-in ops page for a laptop: `moeyard dashboard serve RUN_DIR` serves, on 127.0.0.1
by default, one self-contained HTML page (no CDN, no network) that plots a run's
`metrics.jsonl` and polls for new lines while the run goes on.

Endpoints: `/` the page; `/api/metrics?offset=N` the records after byte offset N (local
files) or line N (other fsspec URLs) with the next offset; `/api/status` whether the run has
finished (its summary.json exists).
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fsspec
import yaml

log = logging.getLogger("moeyard.ops")

PAGE_FILE = Path(__file__).resolve().parent / "page.html"


class MetricsTail:
    """Reads the records a metrics.jsonl gained since an offset, whole lines only."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir.rstrip("/")
        self.url = f"{self.run_dir}/metrics.jsonl"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        self.summary_path = fsspec.core.url_to_fs(f"{self.run_dir}/summary.json")[1]

    def read(self, offset: int) -> tuple[list[dict[str, Any]], int]:
        """(records after `offset`, the offset to ask from next)."""
        if not self.fs.exists(self.path):
            return [], offset
        if self.local:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written waits for next time
            lines = data[:end].decode("utf-8").splitlines()
            return _parse(lines, self.url), offset + end
        with self.fs.open(self.path, "r") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        return _parse(lines[offset:], self.url), len(lines)

    def finished(self) -> bool:
        return self.fs.exists(self.summary_path)


def _parse(lines: list[str], url: str) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a malformed line in %s: %.80s", url, line)
    return out


def run_name(run_dir: str) -> str:
    """`run.name` from the run's config.yaml, else the directory's name."""
    url = f"{run_dir.rstrip('/')}/config.yaml"
    try:
        with fsspec.open(url, "r") as f:
            name = (yaml.safe_load(f) or {}).get("run", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        name = None
    return str(name) if name else run_dir.rstrip("/").rsplit("/", 1)[-1]


def make_server(run_dir: str, *, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """The page's HTTP server, bound but not yet serving (port 0 picks a free port).

    Raises:
        ValueError: the address cannot be bound; the message names host and port.
    """
    tail = MetricsTail(run_dir)
    page = PAGE_FILE.read_bytes()
    name = run_name(run_dir)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if parts.path in ("/", "/index.html"):
                self._send(page, "text/html; charset=utf-8")
            elif parts.path == "/api/metrics":
                try:
                    offset = int(query.get("offset", ["0"])[0])
                except ValueError:
                    self._send(
                        b'{"error": "offset must be an integer"}',
                        "application/json",
                        HTTPStatus.BAD_REQUEST,
                    )
                    return
                records, nxt = tail.read(max(0, offset))
                body = json.dumps({"run": name, "records": records, "offset": nxt})
                self._send(body.encode(), "application/json")
            elif parts.path == "/api/status":
                self._send(
                    json.dumps({"run": name, "finished": tail.finished()}).encode(),
                    "application/json",
                )
            else:
                self._send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("ops page: " + format, *args)

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise ValueError(f"cannot serve the ops page on {host}:{port}: {e.strerror or e}") from None


def serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serves the page until interrupted."""
    server = make_server(run_dir, host=host, port=port)
    h, p = str(server.server_address[0]), server.server_port
    print(f"ops page for {run_dir}: http://{h}:{p}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(
    run_dir: str, *, host: str = "127.0.0.1", port: int = 0
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Starts the page in a daemon thread (tests, notebooks); stop with `server.shutdown()`."""
    server = make_server(run_dir, host=host, port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="ops-page")
    thread.start()
    return server, thread
