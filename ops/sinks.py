"""Metric sinks. The loop builds a dict of metrics per logged step; a sink decides where it
goes. Every sink has `log(metrics, step)` and `close()`."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Protocol, TextIO

import fsspec


class MetricSink(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class StdoutSink:
    """One line per logged step with the scalar metrics in `keys` (those present)."""

    def __init__(
        self,
        *,
        keys: tuple[str, ...] = (
            "loss",
            "lm_loss",
            "aux_loss",
            "grad_norm",
            "lr",
            "tokens_per_s",
            "mfu",
            "energy_per_token_j",
        ),
        stream: TextIO | None = None,
    ) -> None:
        self.keys = keys
        self.stream = stream or sys.stdout

    def log(self, metrics: dict[str, Any], step: int) -> None:
        parts = [f"step {step}"] + [f"{k} {_fmt(metrics[k])}" for k in self.keys if k in metrics]
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


class JsonlSink:
    """Appends one JSON object per logged step to a file on any fsspec URL.

    Object stores cannot append, so for a remote URL the lines are kept and the object is
    rewritten at most every `flush_every_s` seconds and at close. A local file is appended
    and flushed line by line, so a reader sees each step as it is logged.
    """

    def __init__(self, url: str, *, flush_every_s: float = 10.0) -> None:
        self.url = url
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.flush_every_s = flush_every_s
        self._lines: list[str] = []
        self._last_flush = 0.0
        if self.local:
            self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        elif self.fs.exists(self.path):
            # A resumed run keeps the lines its earlier attempts wrote.
            with self.fs.open(self.path, "r") as f:
                self._lines = [line for line in f.read().splitlines() if line]

    def log(self, metrics: dict[str, Any], step: int) -> None:
        line = json.dumps(_jsonable({"step": step, **metrics}), sort_keys=False)
        if self.local:
            self._fh.write(line + "\n")
            self._fh.flush()
            return
        self._lines.append(line)
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self._rewrite()

    def _rewrite(self) -> None:
        with self.fs.open(self.path, "w") as f:
            f.write("\n".join(self._lines) + ("\n" if self._lines else ""))
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.local:
            self._fh.close()
        else:
            self._rewrite()


def read_metrics(url: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl on any fsspec URL (used by tests, status and report)."""
    with fsspec.open(url, "r") as f:
        return [json.loads(line) for line in f if line.strip()]
