"""The token shard format: Parquet files of packed token rows plus `manifest.json`.

A dataset root holds `shard-NNNNN.parquet` files and a `manifest.json` written last (a root
without a manifest is not a dataset, so an interrupted `prepare` never looks complete).
Each shard has one non-null column, `tokens`, of type `fixed_size_binary(row_len * itemsize)`:
one row is `row_len` little-endian integers (uint16 when the vocabulary fits, else int32),
written in row groups of `rows_per_group` rows, no dictionary, no statistics. A fixed-size
binary column decodes as one copy; the same rows as a fixed-size *list* column carry Parquet
repetition and definition levels per token, which made them 2x larger uncompressed and about
10x slower to decode (measured with pyarrow on 1 MiB row groups). The file's key-value
metadata repeats `moeyard.dtype` and `moeyard.row_len` so a shard describes itself. The manifest records per shard its path, row count, byte size, SHA-256, and per
row group its byte range and CRC-32, so a reader can fetch one row group with one ranged
request and check it before use. The README's "Datasets" section documents the fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_NAME = "moeyard-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COLUMN = "tokens"


class ManifestError(ValueError):
    """A manifest that is missing, malformed, or disagrees with the config."""


@dataclass(frozen=True)
class RowGroupInfo:
    offset: int  # first byte of the row group's column chunk in the file
    length: int  # bytes of the column chunk
    rows: int
    crc32: int  # zlib.crc32 of those bytes


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    sha256: str  # of the whole file
    row_groups: tuple[RowGroupInfo, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["row_groups"] = [asdict(g) for g in self.row_groups]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> ShardInfo:
        return ShardInfo(
            path=str(d["path"]),
            rows=int(d["rows"]),
            bytes=int(d["bytes"]),
            sha256=str(d["sha256"]),
            row_groups=tuple(
                RowGroupInfo(**{k: int(v) for k, v in g.items()}) for g in d["row_groups"]
            ),
        )


@dataclass
class Manifest:
    seq_len: int  # training sequence length the rows were cut for
    row_len: int  # tokens per row: seq_len + 1 (inputs and shifted targets)
    dtype: str  # "uint16" or "int32"
    tokenizer: dict[str, Any]  # kind, name, vocab_size, eod_id (+ path, sha256 for "hf")
    rows_per_group: int
    compression: str
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer["vocab_size"])

    def fingerprint(self) -> str:
        """Identifies the dataset's content (shard checksums and layout), for resume checks."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.path}:{s.rows}:{s.sha256};".encode())
        h.update(f"{self.row_len}".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "version": self.version,
            "seq_len": self.seq_len,
            "row_len": self.row_len,
            "dtype": self.dtype,
            "tokenizer": self.tokenizer,
            "rows_per_group": self.rows_per_group,
            "compression": self.compression,
            "num_rows": self.num_rows,
            "num_tokens": self.num_rows * self.row_len,
            "shards": [s.to_json() for s in self.shards],
        }
        return json.dumps(d, indent=1)

    @staticmethod
    def from_json(text: str | bytes, *, url: str) -> Manifest:
        """Parses and checks a manifest; errors name `url` and the field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{url} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise ManifestError(f"{url} is not a {FORMAT_NAME} manifest (format field)")
        if d.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"{url} has format version {d.get('version')!r}; this reader knows {FORMAT_VERSION}"
            )
        try:
            m = Manifest(
                seq_len=int(d["seq_len"]),
                row_len=int(d["row_len"]),
                dtype=str(d["dtype"]),
                tokenizer=dict(d["tokenizer"]),
                rows_per_group=int(d["rows_per_group"]),
                compression=str(d["compression"]),
                shards=[ShardInfo.from_json(s) for s in d["shards"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{url}: missing or malformed field {e}") from None
        if m.dtype not in ("uint16", "int32"):
            raise ManifestError(f"{url}: dtype {m.dtype!r} must be 'uint16' or 'int32'")
        for s in m.shards:
            if sum(g.rows for g in s.row_groups) != s.rows:
                raise ManifestError(f"{url}: shard {s.path} row groups do not add up to its rows")
        return m


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def shard_schema(row_len: int, dtype: str) -> pa.Schema:
    width = row_len * np.dtype(dtype).itemsize
    return pa.schema(
        [pa.field(COLUMN, pa.binary(width), nullable=False)],
        metadata={"moeyard.dtype": dtype, "moeyard.row_len": str(row_len)},
    )


def rows_to_table(rows: np.ndarray, dtype: str) -> pa.Table:
    """Rows [n, row_len] as a one-column table of little-endian fixed-size binary rows."""
    data = np.ascontiguousarray(rows, dtype=np.dtype(dtype).newbyteorder("<"))
    schema = shard_schema(rows.shape[1], dtype)
    arr = pa.FixedSizeBinaryArray.from_buffers(
        schema.field(COLUMN).type, len(rows), [None, pa.py_buffer(data.tobytes())]
    )
    return pa.Table.from_arrays([arr], schema=schema)


def column_rows(col: pa.ChunkedArray | pa.Array, dtype: str, row_len: int) -> np.ndarray:
    """The rows [n, row_len] of a `tokens` column (zero-copy for a single chunk)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    dt = np.dtype(dtype).newbyteorder("<")
    width = row_len * dt.itemsize
    if not pa.types.is_fixed_size_binary(col.type) or col.type.byte_width != width:
        raise ValueError(f"column {COLUMN} is {col.type}, expected fixed_size_binary({width})")
    buf = col.buffers()[1]
    flat = np.frombuffer(buf, dtype=dt, count=len(col) * row_len, offset=col.offset * width)
    return flat.reshape(len(col), row_len)


def chunk_range(meta: pq.FileMetaData, rg: int) -> tuple[int, int]:
    """(offset, length) of row group `rg`'s single column chunk."""
    col = meta.row_group(rg).column(0)
    start = col.data_page_offset
    if col.dictionary_page_offset is not None and col.dictionary_page_offset > 0:
        start = min(start, col.dictionary_page_offset)
    return int(start), int(col.total_compressed_size)


def write_shard(
    fs: fsspec.AbstractFileSystem,
    path: str,
    rows: np.ndarray,
    *,
    rel: str,
    dtype: str,
    rows_per_group: int,
    compression: str,
) -> ShardInfo:
    """Writes rows [n, row_len] as one shard at `path` and returns its manifest entry.

    The file is built in a local temporary file, checksummed, then uploaded in one put, so
    an interrupted write leaves at worst a shard that no manifest names.
    """
    table = rows_to_table(rows, dtype)
    fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(
            table,
            tmp,
            row_group_size=rows_per_group,
            compression=compression,
            use_dictionary=False,
            write_statistics=False,
        )
        with open(tmp, "rb") as f:
            data = f.read()
        meta = pq.read_metadata(io.BytesIO(data))
        groups = []
        for i in range(meta.num_row_groups):
            off, length = chunk_range(meta, i)
            groups.append(
                RowGroupInfo(
                    offset=off,
                    length=length,
                    rows=meta.row_group(i).num_rows,
                    crc32=zlib.crc32(data[off : off + length]),
                )
            )
        fs.put_file(tmp, path)
    finally:
        os.unlink(tmp)
    return ShardInfo(
        path=rel,
        rows=len(rows),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        row_groups=tuple(groups),
    )


class _RangeFile(io.RawIOBase):
    """A read-only file of `size` bytes of which only [offset, offset + len(data)) is known.

    Lets pyarrow decode one row group from the bytes of one ranged request: with the footer
    passed separately, the Parquet reader touches only that column chunk.
    """

    def __init__(self, size: int, offset: int, data: bytes) -> None:
        self._size, self._off, self._data, self._pos = size, offset, data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = base + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        start = self._pos - self._off
        stop = len(self._data) if n < 0 else min(len(self._data), start + n)
        if start < 0 or start > len(self._data):
            raise OSError(f"read at byte {self._pos} outside the fetched range")
        out = self._data[start:stop]
        self._pos += len(out)
        return out

    def size(self) -> int:
        return self._size


FOOTER_PROBE = 64 * 1024  # bytes fetched from a shard's tail: the footer fits in most


def parse_footer(tail: bytes, file_size: int) -> pq.FileMetaData | int:
    """The Parquet footer from the last bytes of a file, or the number of tail bytes needed
    when `tail` is too short.

    Raises:
        ValueError: the bytes are not a Parquet file's end.
    """
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        raise ValueError("no Parquet footer magic at the end of the file")
    footer_len = int.from_bytes(tail[-8:-4], "little")
    if footer_len + 8 > file_size:
        raise ValueError(f"footer length {footer_len} exceeds the file size {file_size}")
    if footer_len + 8 > len(tail):
        return footer_len + 8
    # A stand-in file of magic + footer: the metadata is all that is parsed here, and its
    # offsets still refer to the real file.
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(footer_len + 8) :]))


def decode_row_group(
    meta: pq.FileMetaData,
    rg: int,
    *,
    offset: int,
    data: bytes,
    file_size: int,
    row_len: int,
    dtype: str,
) -> np.ndarray:
    """Rows [rows, row_len] of row group `rg` from the bytes of its column chunk."""
    pf = pq.ParquetFile(_RangeFile(file_size, offset, data), metadata=meta)
    table = pf.read_row_group(rg, columns=[COLUMN], use_threads=False)
    return column_rows(table.column(0), dtype, row_len)


def read_manifest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest:
    """Reads `manifest.json` under an fsspec path (used by tools, not the streaming reader)."""
    path = root.rstrip("/") + "/" + MANIFEST
    with fs.open(path, "rb") as f:
        return Manifest.from_json(f.read(), url=path)


def read_shard_rows(
    fs: fsspec.AbstractFileSystem, root: str, shard: ShardInfo, m: Manifest
) -> np.ndarray:
    """All rows of a shard, read whole (for tests and tools)."""
    with fs.open(root.rstrip("/") + "/" + shard.path, "rb") as f:
        table = pq.read_table(f, columns=[COLUMN])
    return column_rows(table.column(0), m.dtype, m.row_len)


class DatasetWriter:
    """Packs a token stream into rows of `row_len`, rows into shards, and writes the manifest
    last. Tokens that do not fill a last row are dropped (at most row_len - 1 of them)."""

    def __init__(
        self,
        out_url: str,
        *,
        seq_len: int,
        tokenizer: dict[str, Any],
        rows_per_group: int,
        rows_per_shard: int,
        compression: str = "zstd",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if rows_per_group < 1 or rows_per_shard < 1:
            raise ValueError("rows per group and rows per shard must be >= 1")
        self.fs, self.root = fsspec.core.url_to_fs(out_url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.url = out_url.rstrip("/")
        self.row_len = seq_len + 1
        self.manifest = Manifest(
            seq_len=seq_len,
            row_len=self.row_len,
            dtype=token_dtype(int(tokenizer["vocab_size"])),
            tokenizer=tokenizer,
            rows_per_group=rows_per_group,
            compression=compression,
        )
        # Round shards to whole row groups so that only a shard's last group is short.
        self.rows_per_shard = max(rows_per_group, rows_per_shard // rows_per_group * rows_per_group)
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.tokens_in = 0
        self.fs.makedirs(self.root, exist_ok=True)

    def manifest_exists(self) -> bool:
        return self.fs.exists(self.root + "/" + MANIFEST)

    def add(self, tokens: np.ndarray) -> None:
        """Appends tokens to the stream; writes every shard that fills up."""
        self.tokens_in += len(tokens)
        self._pending.append(np.asarray(tokens))
        self._pending_tokens += len(tokens)
        shard_tokens = self.rows_per_shard * self.row_len
        if self._pending_tokens >= shard_tokens:
            flat = np.concatenate(self._pending)
            n_full = len(flat) // shard_tokens
            for i in range(n_full):
                chunk = flat[i * shard_tokens : (i + 1) * shard_tokens]
                self._write(chunk.reshape(self.rows_per_shard, self.row_len))
            rest = flat[n_full * shard_tokens :]
            self._pending, self._pending_tokens = [rest], len(rest)

    def add_rows(self, rows: np.ndarray) -> None:
        """Appends whole rows [n, row_len] (for tests and tools that build rows directly)."""
        if rows.ndim != 2 or rows.shape[1] != self.row_len:
            raise ValueError(f"rows must be [n, {self.row_len}], got {list(rows.shape)}")
        self.add(rows.reshape(-1))

    def _write(self, rows: np.ndarray) -> None:
        rel = f"shard-{len(self.manifest.shards):05d}.parquet"
        info = write_shard(
            self.fs,
            self.root + "/" + rel,
            rows,
            rel=rel,
            dtype=self.manifest.dtype,
            rows_per_group=self.manifest.rows_per_group,
            compression=self.manifest.compression,
        )
        self.manifest.shards.append(info)

    @property
    def bytes_written(self) -> int:
        return sum(s.bytes for s in self.manifest.shards)

    def finish(self) -> Manifest:
        """Writes the last (short) shard, removes stale shards of an interrupted earlier run,
        then writes the manifest."""
        flat = np.concatenate(self._pending) if self._pending else np.empty(0, np.int32)
        n_rows = len(flat) // self.row_len
        if n_rows:
            self._write(flat[: n_rows * self.row_len].reshape(n_rows, self.row_len))
        self._pending, self._pending_tokens = [], 0
        if not self.manifest.shards:
            raise ValueError(
                f"no complete row of {self.row_len} tokens: the input is too short for "
                f"seq_len {self.manifest.seq_len}"
            )
        ours = {s.path for s in self.manifest.shards}
        for p in self.fs.glob(self.root + "/shard-*.parquet"):
            if p.rsplit("/", 1)[-1] not in ours:
                self.fs.rm_file(p)
        with self.fs.open(self.root + "/" + MANIFEST, "w") as f:
            f.write(self.manifest.to_json())
        return self.manifest


def write_dataset(
    out_url: str,
    rows: np.ndarray,
    *,
    tokenizer: dict[str, Any],
    rows_per_group: int,
    rows_per_shard: int,
    compression: str = "zstd",
) -> Manifest:
    """Writes rows [n, row_len] as a dataset (rows stay in order, no packing loss)."""
    w = DatasetWriter(
        out_url,
        seq_len=rows.shape[1] - 1,
        tokenizer=tokenizer,
        rows_per_group=rows_per_group,
        rows_per_shard=rows_per_shard,
        compression=compression,
    )
    w.add_rows(rows)
    return w.finish()
