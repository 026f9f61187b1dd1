"""Fault injection for tests and for operators rehearsing a failure: break a run on purpose at
chosen steps and check that it keeps going, loses nothing and repeats nothing.

The pieces:

- `EndpointProxy`: a TCP proxy on 127.0.0.1 in front of an S3-compatible endpoint. Point the
  run's `AWS_ENDPOINT_URL` at it; `down()` resets every open connection and every new one
  (the endpoint "stops": clients see connection resets, as when a server process dies and
  its port is closed by the kernel), `up()` serves again. `outage(seconds)` is down-then-up
  in the background. Each connection refused while down is counted, so a test can prove the
  outage met real requests.
- `StepFaults`: a metric sink that runs actions when the run logs given steps (the loop logs
  a step before it checkpoints it, so an action at a checkpoint step lands during the save).
- `corrupt_object`: overwrites bytes of a stored object (a shard) in place.
- `kill_pid`, `kill_worker`, `remove_node`: a worker process or a whole Ray node, by the ids
  the run wrote in `placement.json`.

Nothing here is imported by the training loop: faults come from outside, as real ones do.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import fsspec

Action = Callable[[], None]


class EndpointProxy:
    """Forwards 127.0.0.1:`port` to `target` ("host:port" or "http://host:port") until told
    to go down."""

    def __init__(self, target: str, *, port: int = 0) -> None:
        hostport = target.split("://", 1)[-1].rstrip("/")
        host, _, p = hostport.rpartition(":")
        self.target = (host, int(p))
        self.refused = 0  # connections reset while down
        self.outages: list[int] = []  # connections reset during each outage() that ended
        self.served = 0  # connections forwarded
        self._up = threading.Event()
        self._up.set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port), reuse_port=False)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="s3-proxy")
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # Linger 0: close() sends RST, the client sees "connection reset", not a clean EOF.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # shutdown() first: close() alone does not wake a pump thread blocked in recv() on
        # this socket, and the kernel keeps the connection open until that call returns.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                self.refused += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                self._reset(client)
                continue
            self.served += 1
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def down(self) -> None:
        """Resets every open connection and every new one until `up()`."""
        self._up.clear()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            self._reset(s)

    def up(self) -> None:
        self._up.set()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def outage(self, seconds: float) -> threading.Thread:
        """Down now, up again after `seconds`, without blocking the caller."""
        self.down()
        before = self.refused

        def end() -> None:
            self.up()
            self.outages.append(self.refused - before)

        t = threading.Timer(seconds, end)
        t.daemon = True
        t.start()
        return t

    def close(self) -> None:
        self._closed = True
        self.down()
        with contextlib.suppress(OSError):
            self._listener.close()


class StepFaults:
    """A metric sink that runs `actions[step]` when the run logs `step` (once each).

    Give it to `trainer.loop.run(..., sinks=[...])` next to the usual sinks. `fired` lists
    the steps whose action ran.
    """

    def __init__(self, actions: dict[int, Action]) -> None:
        self.actions = dict(actions)
        self.fired: list[int] = []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        action = self.actions.pop(step, None)
        if action is not None:
            self.fired.append(step)
            action()

    def close(self) -> None:
        pass


def corrupt_object(url: str, *, offset: int = 0, length: int = 64) -> None:
    """Overwrites `length` bytes at `offset` of the object at `url` with 0xFF (its size is
    kept, so only a checksum or a decode can tell)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    data = bytearray(fs.cat_file(path))
    end = min(len(data), offset + length)
    if offset >= end:
        raise ValueError(f"{url} has {len(data)} bytes; cannot corrupt at offset {offset}")
    data[offset:end] = b"\xff" * (end - offset)
    with fs.open(path, "wb") as f:
        f.write(bytes(data))


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    """Sends `sig` to one process (a training worker), as the kernel's OOM killer would."""
    os.kill(pid, sig)


def read_placement(output_dir: str) -> dict[str, Any]:
    with fsspec.open(f"{output_dir.rstrip('/')}/placement.json", "r") as f:
        return json.load(f)


def kill_worker(output_dir: str, rank: int, sig: int = signal.SIGKILL) -> int:
    """Kills the worker process of world rank `rank`, found in the run's placement.json (the
    launcher writes each worker's pid there). Returns the pid."""
    plan = read_placement(output_dir)
    pid = next(int(w["pid"]) for w in plan["workers"] if int(w.get("world_rank", -1)) == rank)
    kill_pid(pid, sig)
    return pid


def remove_node(cluster: Any, node_id: str) -> None:
    """Removes the node whose Ray node id is `node_id` from a `ray.cluster_utils.Cluster`
    (its raylet and every worker on it die at once, as when a machine is lost)."""
    for node in list(cluster.worker_nodes):
        if node.node_id == node_id:
            cluster.remove_node(node, allow_graceful=False)
            return
    raise ValueError(f"no removable worker node {node_id} in the cluster (the head stays)")


def wait_for(cond: Callable[[], bool], *, timeout_s: float, what: str) -> None:
    """Polls `cond` every 50 ms; raises TimeoutError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:g} s")
        time.sleep(0.05)
