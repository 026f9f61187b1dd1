"""Byte access to a dataset root on any fsspec URL, through fsspec or pyarrow's native
filesystem, with bounded retries.

The reader needs four things from storage: a file's size, a byte range of it, a whole small
file, and the sizes of everything under the root (one listing instead of a request per
shard). Both backends give exactly these, so the reader and the benchmark can swap them.

Client-side retries are turned off in s3fs/botocore and in pyarrow so that `data.retries`
and `data.backoff_s` alone decide how often a request is repeated. Credentials are never
read here: s3fs and pyarrow take them from the environment (`AWS_ACCESS_KEY_ID`, ...), and
nothing in this module prints them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import fsspec

T = TypeVar("T")

# Errors that repeating the request cannot fix: answer at once.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
)


_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http.client")


def _transient(e: BaseException) -> bool:
    """A network or service error that a later attempt may not meet."""
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    return any(c.__module__.startswith(_CLIENT_MODULES) for c in type(e).__mro__)


class DataError(RuntimeError):
    """A data problem a user can fix; the message names the URL."""


class DataExhausted(DataError):
    """The configured epochs or token budget are used up."""


class StorageUnreachable(DataError):
    """A storage request kept failing after all retries."""


def endpoint_from(endpoint_url: str = "") -> str:
    """The S3 endpoint: `data.endpoint_url`, else AWS_ENDPOINT_URL, else "" (AWS itself)."""
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    )


def with_retries(
    fn: Callable[[], T], *, url: str, retries: int, backoff_s: float, what: str = "read"
) -> T:
    """Calls `fn`, repeating it up to `retries` more times with exponential backoff.

    Raises:
        FileNotFoundError, PermissionError, ...: at once, for errors a retry cannot fix.
        StorageUnreachable: every attempt failed; the message names `url`.
    """
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if not _transient(e):
                raise
            if attempt == retries:
                raise StorageUnreachable(
                    f"cannot {what} {url} after {retries + 1} attempts: {type(e).__name__}: {e}"
                ) from e
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class Storage(Protocol):
    """Bytes under one dataset root. Paths are relative to the root."""

    root: str
    kind: str

    def url(self, rel: str) -> str: ...

    def size(self, rel: str) -> int: ...

    def read_range(self, rel: str, start: int, end: int) -> bytes: ...

    def read_bytes(self, rel: str) -> bytes: ...

    def list_sizes(self) -> dict[str, int]:
        """Every file under the root, relative path -> size in bytes."""
        ...


def _join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel.lstrip("/")


class FsspecStorage:
    """Reads through fsspec (s3fs for s3://), one ranged GET per `read_range`."""

    kind = "fsspec"

    def __init__(self, root: str, *, endpoint_url: str = "", timeout_s: float = 30.0) -> None:
        self.root = root.rstrip("/")
        options: dict = {}
        protocol = urlparse(root).scheme
        if protocol in ("s3", "s3a"):
            endpoint = endpoint_from(endpoint_url)
            # fsspec caches the client per set of options: ranks in one process (and
            # readers reopened on resume) share it instead of paying a new session each.
            options = {
                "config_kwargs": {
                    "retries": {"max_attempts": 1, "mode": "standard"},
                    "connect_timeout": timeout_s,
                    "read_timeout": timeout_s,
                },
            }
            if endpoint:
                options["endpoint_url"] = endpoint
        self.fs, self.path = fsspec.core.url_to_fs(root, **options)
        if protocol in ("s3", "s3a"):
            self.fs.retries = 1  # one attempt per call: with_retries owns the policy

    def url(self, rel: str) -> str:
        return _join(self.root, rel)

    def _p(self, rel: str) -> str:
        return _join(self.path, rel)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._p(rel)))

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        return self.fs.cat_file(self._p(rel), start=start, end=end)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def list_sizes(self) -> dict[str, int]:
        found = self.fs.find(self.path, detail=True)
        base = self.fs._strip_protocol(self.path).rstrip("/") + "/"
        out = {}
        for name, info in found.items():
            name = self.fs._strip_protocol(name)
            if name.startswith(base):
                out[name[len(base) :]] = int(info["size"])
        return out


class ArrowStorage:
    """Reads through pyarrow's native filesystem (its own S3 client for s3://)."""

    kind = "arrow"

    def __init__(self, root: str, *, endpoint_url: str = "", timeout_s: float = 30.0) -> None:
        import pyarrow.fs as pafs

        self.root = root.rstrip("/")
        parsed = urlparse(root)
        if parsed.scheme in ("s3", "s3a"):
            endpoint = endpoint_from(endpoint_url)
            kwargs: dict = {
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=1),
                "connect_timeout": timeout_s,
                "request_timeout": timeout_s,
            }
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if endpoint:
                ep = urlparse(endpoint)
                kwargs["endpoint_override"] = ep.netloc or ep.path
                kwargs["scheme"] = ep.scheme or "https"
                kwargs["region"] = region or "us-east-1"
            else:
                # On AWS itself a bucket lives in one region; ask it rather than guess.
                kwargs["region"] = region or with_retries(
                    lambda: pafs.resolve_s3_region(parsed.netloc),
                    url=root,
                    retries=2,
                    backoff_s=0.5,
                    what="find the region of",
                )
            self.fs = pafs.S3FileSystem(**kwargs)
            self.path = (parsed.netloc + parsed.path).rstrip("/")
        elif parsed.scheme in ("", "file", "local"):
            self.fs = pafs.LocalFileSystem()
            self.path = os.path.abspath(parsed.path if parsed.scheme else root).rstrip("/")
        else:
            fs, path = fsspec.core.url_to_fs(root)
            self.fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
            self.path = path.rstrip("/")

    def url(self, rel: str) -> str:
        return _join(self.root, rel)

    def _p(self, rel: str) -> str:
        return _join(self.path, rel)

    def size(self, rel: str) -> int:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._p(rel))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.url(rel))
        return int(info.size)

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with self.fs.open_input_file(self._p(rel)) as f:
            data = f.read_at(end - start, start)
        return data if isinstance(data, bytes) else data.to_pybytes()

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def list_sizes(self) -> dict[str, int]:
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        base = self.path + "/"
        return {
            i.path[len(base) :]: int(i.size)
            for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(base)
        }


# Measured by bench/data_stream.py against the local S3 endpoint: pyarrow's reader was
# 1.17-1.35x faster than s3fs in 3 runs of 4 (see bench/README.md).
AUTO_IO = "arrow"


def open_storage(
    root: str, *, io: str = "auto", endpoint_url: str = "", timeout_s: float = 30.0
) -> Storage:
    """The storage backend named by `data.io` for the dataset root `root`."""
    kind = AUTO_IO if io == "auto" else io
    if kind == "arrow":
        return ArrowStorage(root, endpoint_url=endpoint_url, timeout_s=timeout_s)
    if kind == "fsspec":
        return FsspecStorage(root, endpoint_url=endpoint_url, timeout_s=timeout_s)
    raise ValueError(f"data.io ({io!r}) must be one of 'auto', 'fsspec', 'arrow'")
