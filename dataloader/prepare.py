"""`moeyard prepare INPUT... --out URL`: tokenizes raw text into token shards plus a manifest.

Inputs are text files (one document each), JSONL files with a `text` field (one document a
line), Parquet files with a `text` column (one document a row), or folders of them, on any
fsspec URL; `.gz`/`.bz2`/`.xz`/`.zst` text and JSONL are decompressed by suffix. Documents
are tokenized, each followed by the end-of-document token, concatenated in input order and
packed into rows of `seq_len + 1` tokens (see dataloader/format.py).

`--val-fraction F` holds documents out for validation: document i (0-based, in input order;
a text file is one document) goes to the held-out split when floor((i + 1) * F) > floor(i *
F), so exactly floor(n * F) of n documents, spread evenly, the same on every run. The split
is its own dataset in `OUT/val` (manifest and shards), beside the training shards, and
`eval.path` defaults to it; no row ever holds tokens of both splits.

The manifest is written last, so an interrupted run never leaves a dataset that looks
complete; running the same command again rebuilds it (tokenization is deterministic) and
removes the shards the interrupted run left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq

from dataloader.format import DatasetWriter, token_dtype
from dataloader.tokenizer import HFTokenizer, load_tokenizer

_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
TEXT_BLOCK = 8 << 20  # text files are tokenized in blocks of this many bytes, cut at newlines
VAL_DIR = "val"  # the held-out split's dataset, under the training dataset's root


def is_val_document(i: int, fraction: float) -> bool:
    """Whether document i (0-based, input order) is held out at `fraction`."""
    return int((i + 1) * fraction) > int(i * fraction)


@dataclass(frozen=True)
class InputFile:
    fs: fsspec.AbstractFileSystem
    path: str
    url: str
    size: int
    kind: str  # "text", "jsonl", "parquet"


def _kind(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def list_inputs(specs: list[str]) -> list[InputFile]:
    """Expands files, folders (recursively, hidden names skipped) and globs, in sorted order.

    Raises:
        FileNotFoundError: an input matches nothing; the message names it.
    """
    out: list[InputFile] = []
    for spec in specs:
        fs, path = fsspec.core.url_to_fs(spec)
        protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
        if fs.isdir(path):
            found = fs.find(path, detail=True)
            items = sorted(
                (p, info)
                for p, info in found.items()
                if not any(part.startswith((".", "_")) for part in p[len(path) :].split("/"))
            )
        else:
            paths = fs.glob(path) if any(c in path for c in "*?[") else [path]
            if not paths or not fs.exists(paths[0]):
                raise FileNotFoundError(f"input {spec} does not exist")
            items = [(p, fs.info(p)) for p in sorted(paths)]
        if not items:
            raise FileNotFoundError(f"input {spec} holds no files")
        for p, info in items:
            if info.get("type") == "directory":
                continue
            url = protocol + fs._strip_protocol(p) if protocol else p
            out.append(InputFile(fs, p, url, int(info.get("size") or 0), _kind(p)))
    return out


def iter_documents(inp: InputFile, *, text_field: str, progress: Progress) -> Iterator[str | bytes]:
    """The documents of one input file, reporting bytes read to `progress`."""
    if inp.kind == "parquet":
        with inp.fs.open(inp.path, "rb") as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise ValueError(
                    f"{inp.url} has no {text_field!r} column (columns: {pf.schema_arrow.names})"
                )
            for i in range(pf.num_row_groups):
                col = pf.read_row_group(i, columns=[text_field]).column(0)
                progress.add_bytes(pf.metadata.row_group(i).total_byte_size)
                for s in col.to_pylist():
                    if s:
                        yield s
        return
    with inp.fs.open(inp.path, "rb", compression="infer") as f:
        if inp.kind == "jsonl":
            for lineno, line in enumerate(f, 1):
                progress.add_bytes(len(line))
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{inp.url}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    raise ValueError(f"{inp.url}:{lineno}: no {text_field!r} field")
                if rec[text_field]:
                    yield rec[text_field]
            return
        # A text file is one document, read in blocks cut after a newline so that a
        # subword tokenizer never sees a block boundary inside a line.
        carry = b""
        while True:
            block = f.read(TEXT_BLOCK)
            progress.add_bytes(len(block))
            if not block:
                break
            data = carry + block
            cut = data.rfind(b"\n") + 1 or len(data)
            carry = data[cut:]
            yield _Part(data[:cut])
        if carry:
            yield _Part(carry)
        yield _END


class _Part(bytes):
    """A block of a text file: documents continue until _END."""


_END = _Part(b"")


class Progress:
    """A one-line progress bar on stderr: bytes read of the total, tokens, tokens/s."""

    def __init__(self, total_bytes: int, *, enabled: bool = True) -> None:
        self.total = max(total_bytes, 1)
        self.bytes = 0
        self.tokens = 0
        self.shards = 0
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def add_bytes(self, n: int) -> None:
        self.bytes += n
        self.show()

    def add_tokens(self, n: int) -> None:
        self.tokens += n

    def show(self, *, final: bool = False) -> None:
        now = time.perf_counter()
        # A terminal gets a redrawn bar; a log file a line every few seconds.
        if not self.enabled or (not final and now - self._last < (0.2 if self.tty else 5.0)):
            return
        self._last = now
        frac = min(1.0, self.bytes / self.total)
        bar = "#" * int(frac * 30)
        dt = max(now - self.t0, 1e-9)
        line = (
            f"[{bar:<30}] {frac * 100:5.1f}% {self.bytes / 1e6:,.2f}/{self.total / 1e6:,.2f} MB "
            f"{self.tokens:,} tokens {self.tokens / dt:,.0f} tokens/s {self.shards} shards"
        )
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def prepare(
    inputs: list[str],
    out: str,
    *,
    seq_len: int = 2048,
    tokenizer: str = "bytes",
    eod_token: str | None = None,
    text_field: str = "text",
    rows_per_group: int = 0,
    row_group_mb: float = 1.0,
    shard_mb: float = 128.0,
    compression: str = "zstd",
    overwrite: bool = False,
    progress: bool = True,
    val_fraction: float = 0.0,
) -> dict:
    """Tokenizes `inputs` into a dataset at `out`; returns the manifest as a dict (with
    `val`, the held-out split's manifest, when `val_fraction` > 0).

    Raises:
        FileExistsError: `out` already holds a complete dataset and `overwrite` is False.
        FileNotFoundError, ValueError: a bad input, named in the message; a val_fraction
            outside [0, 1); a held-out split with no whole row.
    """
    if seq_len < 1:
        raise ValueError(f"--seq-len ({seq_len}) must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction ({val_fraction}) must be in [0, 1)")
    tok = load_tokenizer(tokenizer, eod_token=eod_token)
    desc = tok.describe()
    row_bytes = (seq_len + 1) * np.dtype(token_dtype(tok.vocab_size)).itemsize
    rpg = rows_per_group or max(1, int(row_group_mb * (1 << 20)) // row_bytes)
    rps = max(rpg, int(shard_mb * (1 << 20)) // row_bytes)
    writer = DatasetWriter(
        out,
        seq_len=seq_len,
        tokenizer=desc,
        rows_per_group=rpg,
        rows_per_shard=rps,
        compression=compression,
    )
    val_writer = (
        DatasetWriter(
            out.rstrip("/") + "/" + VAL_DIR,
            seq_len=seq_len,
            tokenizer=desc,
            rows_per_group=rpg,
            rows_per_shard=rps,
            compression=compression,
        )
        if val_fraction > 0
        else None
    )
    for w in (writer, val_writer):
        if w is None or not w.manifest_exists():
            continue
        if not overwrite:
            raise FileExistsError(
                f"{w.url} already holds a complete dataset (manifest.json); pass --overwrite to "
                "rebuild it"
            )
        w.fs.rm_file(w.root + "/manifest.json")
    files = list_inputs(inputs)
    bar = Progress(sum(f.size for f in files), enabled=progress)
    eod = np.array([tok.eod_id], dtype=np.int32)
    doc_index = 0
    target = writer
    batches: dict[int, list[str]] = {id(writer): [], id(val_writer): []}

    def pick() -> DatasetWriter:
        nonlocal doc_index
        held_out = val_writer is not None and is_val_document(doc_index, val_fraction)
        doc_index += 1
        return val_writer if held_out and val_writer is not None else writer

    for inp in files:
        in_text = False  # inside a text file's parts: the document was placed at its start
        for doc in iter_documents(inp, text_field=text_field, progress=bar):
            if isinstance(doc, _Part):
                if not in_text:
                    target, in_text = pick(), True
                if doc is _END:
                    target.add(eod)
                    in_text = False
                else:
                    _emit(target, bar, tok.encode(bytes(doc)))
                continue
            w = pick()
            if isinstance(tok, HFTokenizer):
                # Batches amortize the Rust tokenizer's per-call cost.
                batch = batches[id(w)]
                batch.append(doc if isinstance(doc, str) else doc.decode("utf-8", "replace"))
                if len(batch) >= 256:
                    _emit_batch(w, bar, tok, batch, eod)
                    batch.clear()
            else:
                _emit(w, bar, np.concatenate([tok.encode(doc), eod]))
        for w in (writer, val_writer):
            if w is not None and batches[id(w)] and isinstance(tok, HFTokenizer):
                _emit_batch(w, bar, tok, batches[id(w)], eod)
                batches[id(w)].clear()
        bar.shards = len(writer.manifest.shards)
    if val_writer is not None and doc_index * val_fraction < 1:
        raise ValueError(
            f"--val-fraction {val_fraction} of {doc_index} documents holds out none; raise it "
            "or give more documents"
        )
    manifest = writer.finish()
    result = json.loads(manifest.to_json())
    if val_writer is not None:
        try:
            result["val"] = json.loads(val_writer.finish().to_json())
        except ValueError as e:
            raise ValueError(f"the held-out split ({VAL_DIR}/): {e}") from None
    bar.shards = len(manifest.shards)
    bar.show(final=True)
    return result


def _emit(writer: DatasetWriter, bar: Progress, ids: np.ndarray) -> None:
    writer.add(ids)
    bar.add_tokens(len(ids))
    bar.shards = len(writer.manifest.shards)


def _emit_batch(
    writer: DatasetWriter,
    bar: Progress,
    tok: HFTokenizer,
    texts: list[str],
    eod: np.ndarray,
) -> None:
    for ids in tok.encode_batch(texts):
        _emit(writer, bar, np.concatenate([ids, eod]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="moeyard prepare",
        description="Tokenize text (files, folders, JSONL, Parquet; local or any fsspec URL) "
        "into Parquet token shards plus manifest.json.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", required=True, help="dataset root URL (s3://..., a local path)")
    p.add_argument("--seq-len", type=int, default=2048, help="training seq_len; rows hold +1")
    p.add_argument(
        "--tokenizer", default="bytes", help="'bytes' or a Hugging Face tokenizer.json path/URL"
    )
    p.add_argument("--eod-token", default=None, help="end-of-document token (HF tokenizers)")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    p.add_argument("--rows-per-group", type=int, default=0, help="0 = from --row-group-mb")
    p.add_argument("--row-group-mb", type=float, default=1.0)
    p.add_argument("--shard-mb", type=float, default=128.0)
    p.add_argument("--compression", default="zstd", choices=["zstd", "snappy", "none"])
    p.add_argument("--overwrite", action="store_true", help="rebuild a complete dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="documents held out for validation, written to OUT/val (0 = none)",
    )
    args = p.parse_args(argv)
    try:
        m = prepare(
            args.inputs,
            args.out,
            seq_len=args.seq_len,
            tokenizer=args.tokenizer,
            eod_token=args.eod_token,
            text_field=args.text_field,
            rows_per_group=args.rows_per_group,
            row_group_mb=args.row_group_mb,
            shard_mb=args.shard_mb,
            compression=args.compression,
            overwrite=args.overwrite,
            progress=not args.quiet,
            val_fraction=args.val_fraction,
        )
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"moeyard prepare: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(m['shards'])} shards, {m['num_rows']:,} rows of {m['row_len']} tokens "
        f"({m['num_tokens']:,} tokens) to {args.out}",
        flush=True,
    )
    if "val" in m:
        v = m["val"]
        print(
            f"held out {v['num_rows']:,} rows ({v['num_tokens']:,} tokens) for validation in "
            f"{args.out.rstrip('/')}/{VAL_DIR}",
            flush=True,
        )
    return 0
