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
    shuffle: bool = True
    corpus_max_bytes: int = 8_000_000  # how much of the stdlib the corpus source reads

    def __post_init__(self) -> None:
        if self.source == "shards" and not self.path:
            raise ValueError("data.path must be set when data.source is 'shards'")
        if self.corpus_max_bytes < 1:
            raise ValueError(f"data.corpus_max_bytes ({self.corpus_max_bytes}) must be >= 1")
