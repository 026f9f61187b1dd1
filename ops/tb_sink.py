"""The TensorBoard sink (`ops.tensorboard`): event files under `run.output_dir/tensorboard/`
on any fsspec URL, written by rank 0.

Each logged step is one event holding every scalar of the record (tags in ops/trackers.py)
and, per MoE layer, the histogram of the routed (token, expert) pairs over the expert ids
(`moe/layer{i}/expert_load`: bucket e holds expert e's tokens, so the bars are the layer's
load, step by step). The resolved config is a text summary (`config`) at the step the
attempt starts from.

Scalars are TensorBoard's float32 `simple_value`, the only scalar type its data server
reads; TensorBoard shows each value of `metrics.jsonl` rounded to float32.

The events are TensorBoard's protos (`tensorboard.compat.proto`) in TensorBoard's record
framing; the sink frames them itself with a compiled CRC32C (google-crc32c): TensorBoard's
own writer computes the checksums in pure Python, which costs more than the whole step
budget of a small model (bench/README.md).

A restart or resume never leaves a step twice: at the first step an attempt logs (a resumed
run logs the steps after its checkpoint), the sink rewrites the event files of earlier
attempts without their events from that step on, and begins its own file with TensorBoard's
purge marker (a `SessionLog.START` event at that step) so that a TensorBoard already showing
the stale steps drops them too. A loss-guard rollback within the run (a step logged again)
does the same from the step it goes back to. The sink needs no word from the loop about
where the run resumed, so a launcher may build it before the run starts.

A local output dir is written in place, each event flushed as it is logged. An object
store cannot append: the sink writes to a local staging folder and uploads the current file
at most every `flush_every_s` seconds and at close, and starts a new file every
`roll_bytes` so that an upload never rewrites more than that.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fsspec

from ops.trackers import import_tracker, is_local, scalars

CONFIG_TAG = "config"
EXPERT_LOAD_TAG = "moe/layer{layer}/expert_load"
EVENTS_MARK = "tfevents"  # TensorBoard reads the files whose name holds this
_HEADER = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _masked(crc32c: Callable[[bytes], int], data: bytes) -> int:
    """TFRecord's masked CRC32C of `data`."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes, crc32c: Callable[[bytes], int]) -> bytes:
    """One TFRecord: length, its checksum, the data, its checksum."""
    header = _HEADER.pack(len(data))
    return header + _CRC.pack(_masked(crc32c, header)) + data + _CRC.pack(_masked(crc32c, data))


def split_records(blob: bytes) -> tuple[list[bytes], bool]:
    """The complete records of an event file, framing included, and whether the file ends
    in a record cut short (a writer killed mid-write), which is left out."""
    records = []
    pos = 0
    while pos + 12 <= len(blob):
        (length,) = _HEADER.unpack_from(blob, pos)
        end = pos + 12 + length + 4
        if end > len(blob):
            break
        records.append(blob[pos:end])
        pos = end
    return records, pos != len(blob)


class TensorBoardSink:
    """A metric sink (`log`, `close`) writing TensorBoard event files.

    Args:
        url: the folder for the event files (any fsspec URL).
        config_text: the resolved config (YAML), written as the `config` text summary at the
            first step each attempt logs.
        flush_every_s: at most this long between uploads to a remote URL.
        roll_bytes: a new event file once the current one holds this many bytes (remote).

    Raises:
        OpsConfigError: tensorboard or google-crc32c is not installed.
    """

    def __init__(
        self,
        url: str,
        *,
        config_text: str,
        flush_every_s: float = 10.0,
        roll_bytes: int = 16 << 20,
    ) -> None:
        import_tracker("tensorboard", key="ops.tensorboard", package="tensorboard")
        crc = import_tracker("google_crc32c", key="ops.tensorboard", package="google-crc32c")
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )
        from tensorboard.plugins.text import metadata as text_metadata

        self._pb = event_pb2
        self._summary = summary_pb2
        self._crc32c: Callable[[bytes], int] = crc.value
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = is_local(self.fs)
        self.flush_every_s = flush_every_s
        self.roll_bytes = roll_bytes
        self.dropped = 0  # events of earlier attempts (or before a rollback) dropped
        # Where this attempt's files are written: in place, or staged for upload.
        self.dir = self.root if self.local else tempfile.mkdtemp(prefix="moeyard-tensorboard-")
        self._files: list[str] = []
        self._fh: Any = None
        self._size = 0
        self._last_upload = time.monotonic()
        self._last_step: int | None = None
        self._config = summary_pb2.Summary.Value(
            tag=CONFIG_TAG,
            metadata=text_metadata.create_summary_metadata(
                display_name="config", description="The run's resolved config (config.yaml)"
            ),
            tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                string_val=[f"```yaml\n{config_text}```".encode()],
            ),
        )

    def drop_from(self, step: int) -> int:
        """Rewrites the event files under the URL without the events at or after `step`;
        removes a file left with no summary. Returns how many events it dropped."""
        try:
            names = [p for p in self.fs.ls(self.root, detail=False) if EVENTS_MARK in p]
        except FileNotFoundError:
            return 0
        dropped = 0
        for path in sorted(names):
            blob = self.fs.cat_file(path)
            records, cut = split_records(blob)
            kept = []
            summaries = 0
            for rec in records:
                event = self._pb.Event.FromString(rec[12:-4])
                if event.step >= step:
                    dropped += 1
                    continue
                kept.append(rec)
                summaries += event.HasField("summary")
            if len(kept) == len(records) and not cut:
                continue
            if summaries:
                self.fs.pipe_file(path, b"".join(kept))
            else:
                self.fs.rm(path)
        return dropped

    def _begin(self, step: int) -> None:
        """Starts writing at `step`, the first step of an attempt or after a rollback: what
        earlier files hold from `step` on goes, and a new file starts with TensorBoard's
        purge marker and the config."""
        self._close_file()
        if not self.local and self._files:
            self._upload(self._files[-1:])
        self.dropped += self.drop_from(step)
        os.makedirs(self.dir, exist_ok=True)
        now = time.time()
        self._open()
        # TensorBoard drops every event it holds at or after this step (a reader that loaded
        # an earlier attempt's steps before they were rewritten).
        self._write(
            self._pb.Event(
                wall_time=now,
                step=step,
                session_log=self._pb.SessionLog(status=self._pb.SessionLog.START),
            )
        )
        self._write(
            self._pb.Event(
                wall_time=now, step=step, summary=self._summary.Summary(value=[self._config])
            )
        )

    def _open(self) -> None:
        now = time.time()
        name = (
            f"events.out.{EVENTS_MARK}.{int(now):010d}.{int(now % 1 * 1e6):06d}."
            f"{socket.gethostname()}.{os.getpid()}"
        )
        path = os.path.join(self.dir, name)
        self._fh = open(path, "ab")  # noqa: SIM115 - closed in _close_file()
        self._files.append(path)
        self._size = 0
        self._write(self._pb.Event(wall_time=now, file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        data = frame(event.SerializeToString(), self._crc32c)
        self._fh.write(data)
        self._fh.flush()  # a reader (and a killed process) sees every event logged
        self._size += len(data)

    def _remote(self, path: str) -> str:
        return f"{self.root}/{os.path.basename(path)}"

    def _upload(self, paths: list[str]) -> None:
        for path in paths:
            self.fs.put_file(path, self._remote(path))
        self._last_upload = time.monotonic()

    def _histogram(self, tokens: list[int]) -> Any:
        return self._summary.HistogramProto(
            min=-0.5,
            max=len(tokens) - 0.5,
            num=float(sum(tokens)),
            sum=float(sum(e * t for e, t in enumerate(tokens))),
            sum_squares=float(sum(e * e * t for e, t in enumerate(tokens))),
            bucket_limit=[e + 0.5 for e in range(len(tokens))],
            bucket=[float(t) for t in tokens],
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._last_step is None or step <= self._last_step:
            # The attempt's first step (a resumed run logs the steps after its checkpoint),
            # or a rollback's: what an earlier attempt wrote from here on is trained again.
            self._begin(step)
        self._last_step = step
        Value = self._summary.Summary.Value
        values = [Value(tag=t, simple_value=v) for t, v in scalars(metrics).items()]
        for layer in metrics.get("moe", ()):
            values.append(
                Value(
                    tag=EXPERT_LOAD_TAG.format(layer=layer["layer"]),
                    histo=self._histogram(layer["tokens"]),
                )
            )
        self._write(
            self._pb.Event(
                wall_time=time.time(), step=step, summary=self._summary.Summary(value=values)
            )
        )
        if self.local:
            return
        if self._size >= self.roll_bytes:
            self._close_file()
            self._upload(self._files[-1:])
            self._open()
        elif time.monotonic() - self._last_upload >= self.flush_every_s:
            self._upload(self._files[-1:])

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        self._close_file()
        if not self.local:
            try:
                if self._files:
                    self._upload(self._files[-1:])
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)
