"""The `data` section of the job config."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal


@dataclass
class MixEntry:
    """One dataset of a mixture (`data.mix`): a prepared dataset and its share of samples.

    Exhaustion (dataloader/mix.py): `epochs` 0 repeats the dataset as often as its weight
    asks, each pass in a new seeded order; `epochs` N > 0 lets it serve N passes, and the
    run ends (like `data.epochs`) at the first step that would need a sample beyond them.
    """

    name: str = ""
    path: str = ""  # dataset root URL, as data.path
    weight: float = 0.0  # relative share; the weights of the mix are normalized to sum 1
    epochs: int = 0


@dataclass
class DataConfig:
    # "corpus": the Python standard library's own source files as a byte corpus (real
    # text, no download). "shards": a prepared Parquet dataset at `path`. "mix": the
    # datasets of `mix`, blended by weight. "auto" (the default) follows from the keys
    # that are set: `mix` -> "mix", `path` -> "shards", neither -> "corpus"; the resolved
    # source is what the run's config.yaml records.
    source: Literal["auto", "corpus", "shards", "mix"] = "auto"
    path: str = ""  # dataset root URL (s3://..., file://..., a local path) for "shards"
    # Datasets blended by weight (source "mix"), e.g. [{name: web, path: s3://..., weight:
    # 0.7}, {name: code, path: ..., weight: 0.3}]; see dataloader/mix.py for the order.
    mix: list[MixEntry] = field(default_factory=list)
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
        self._resolve_source()
        self._check_mix()
        self._warn_ignored()
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

    def _resolve_source(self) -> None:
        if self.source == "auto":
            if self.mix and self.path:
                raise ValueError(
                    f"data.path ({self.path!r}) and data.mix ({len(self.mix)} datasets) are both "
                    "set: a run reads one of them; give the path as a data.mix entry, or drop "
                    "data.mix"
                )
            self.source = "mix" if self.mix else "shards" if self.path else "corpus"
            return
        if self.source == "corpus" and self.path:
            raise ValueError(
                f"data.path ({self.path!r}) is set but data.source is 'corpus', which would "
                "ignore it: set data.source=shards to train on the path, or leave data.source "
                "unset (it then follows from data.path)"
            )
        if self.source != "mix" and self.mix:
            raise ValueError(
                f"data.mix ({len(self.mix)} datasets) is set but data.source is "
                f"{self.source!r}, which would ignore it: set data.source=mix or leave it unset"
            )
        if self.source == "shards" and not self.path:
            raise ValueError("data.path must be set when data.source is 'shards'")
        if self.source == "mix":
            if not self.mix:
                raise ValueError(
                    "data.mix must list at least one dataset when data.source is 'mix'"
                )
            if self.path:
                raise ValueError(
                    f"data.path ({self.path!r}) is set but data.source is 'mix', which reads "
                    "the paths of data.mix: give it as a data.mix entry, or drop data.mix"
                )

    def _check_mix(self) -> None:
        seen: set[str] = set()
        for i, e in enumerate(self.mix):
            where = f"data.mix[{i}]"
            if not e.name:
                raise ValueError(f"{where}.name must be set (it names the dataset in the metrics)")
            if e.name in seen:
                raise ValueError(f"{where}.name ({e.name!r}) is used twice in data.mix")
            seen.add(e.name)
            if not e.path:
                raise ValueError(f"{where}.path must be set (dataset {e.name!r})")
            if not (math.isfinite(e.weight) and e.weight > 0):
                raise ValueError(
                    f"{where}.weight ({e.weight}) must be a finite number > 0 (dataset {e.name!r})"
                )
            if e.epochs < 0:
                raise ValueError(f"{where}.epochs ({e.epochs}) must be >= 0 (dataset {e.name!r})")

    def _warn_ignored(self) -> None:
        """Settings the resolved source does not read: a warning names each one set."""
        defaults = {f.name: f.default for f in fields(DataConfig) if f.name not in ("mix",)}
        if self.source == "corpus":
            ignored = [
                "shuffle_window",
                "prefetch_depth",
                "prefetch_batches",
                "io_threads",
                "coalesce",
                "io",
                "on_bad_shard",
                "retries",
                "backoff_s",
                "timeout_s",
                "endpoint_url",
            ]
        else:
            ignored = ["corpus_max_bytes"]
        if self.source == "mix":
            # Each entry has its own epochs; data.epochs would be a second, unclear limit.
            ignored.append("epochs")
        if not self.shuffle and self.source != "corpus":
            ignored.append("shuffle_window")  # the window only shuffles
        for key in ignored:
            if getattr(self, key) != defaults[key]:
                why = (
                    "data.shuffle is false"
                    if key == "shuffle_window" and self.source != "corpus"
                    else f"data.source is {self.source!r}"
                )
                warnings.warn(
                    f"data.{key} ({getattr(self, key)!r}) is ignored: {why}", stacklevel=3
                )
