"""The `data` section of the job config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    # "corpus": the Python standard library's own source files as a byte corpus (real
    # text, no download). "shards": a prepared Parquet dataset at `path`.
    source: Literal["corpus", "shards"] = "corpus"
    path: str = ""  # dataset root URL (s3://..., file://..., a local path) for "shards"
    # Shuffles the shard order each epoch and the rows inside each shuffle window.
    shuffle: bool = True
    corpus_max_bytes: int = 8_000_000  # how much of the stdlib the corpus source reads

    # --- "shards" only ---
    # Rows mixed together by the in-window shuffle. Larger mixes more; each rank then
    # touches more row groups per window (see the README's "Datasets" section).
    shuffle_window: int = 1024
    # Decoded row groups a rank holds at once (its memory bound, with prefetch_batches).
    prefetch_depth: int = 16
    # Assembled micro-batches kept ready ahead of the loop.
    prefetch_batches: int = 4
    io_threads: int = 4  # concurrent range reads per rank
    coalesce: int = 8  # adjacent row groups of a shard fetched in one request, at most
    # How bytes are read: "fsspec" (s3fs for s3://), "arrow" (pyarrow's native filesystem),
    # "auto" (the one bench/data_stream.py measured faster: see bench/README.md).
    io: Literal["auto", "fsspec", "arrow"] = "auto"
    epochs: int = 0  # passes over the data; 0 = no limit
    token_budget: int = 0  # training tokens the source serves; 0 = no limit
    # A shard that is missing, truncated, or fails its checksum: "error" stops the run
    # naming it; "skip" leaves it out, records it in the metrics and carries on.
    on_bad_shard: Literal["error", "skip"] = "error"
    retries: int = 3  # extra attempts after a failed storage request
    backoff_s: float = 0.5  # wait before the first retry; doubles each time
    timeout_s: float = 30.0  # connect / read timeout of one storage request
    # S3-compatible endpoint; empty = the AWS_ENDPOINT_URL environment variable, else AWS.
    # Credentials come only from the environment (or the instance's role), never the config.
    endpoint_url: str = ""

    def __post_init__(self) -> None:
        if self.source == "shards" and not self.path:
            raise ValueError("data.path must be set when data.source is 'shards'")
        if self.corpus_max_bytes < 1:
            raise ValueError(f"data.corpus_max_bytes ({self.corpus_max_bytes}) must be >= 1")
        for key in (
            "shuffle_window",
            "prefetch_depth",
            "prefetch_batches",
            "io_threads",
            "coalesce",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} ({getattr(self, key)}) must be >= 1")
        for key in ("epochs", "token_budget", "retries"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} ({getattr(self, key)}) must be >= 0")
        if self.backoff_s < 0:
            raise ValueError(f"data.backoff_s ({self.backoff_s}) must be >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"data.timeout_s ({self.timeout_s}) must be > 0")
