"""The streaming reader: token shards from object storage to every data-parallel rank.

The global order (the contract of dataloader/source.py) is a function of (seed, epoch,
global sample index) alone:

1. An epoch is one pass over the N rows of the dataset's good shards. Global sample g is
   position p = g mod N of epoch e = g div N.
2. The epoch's stream is the shards in a seeded order (seed, e), each shard's rows in file
   order.
3. The stream is cut into windows of `data.shuffle_window` rows; position p reads stream row
   w*window + perm_(seed, e, w)[p - w*window], a seeded permutation within its window.

No world size enters the order. Rank r of W takes samples [cursor + r*mb, cursor + (r+1)*mb)
each micro-step and every rank advances the cursor by W*mb, so the world size only decides
who reads which sample. A rank fetches only the row groups its own samples lie in (adjacent
groups of a shard in one ranged request, each checked against the manifest's CRC-32), from a
background thread that walks the rank's future samples and keeps about `data.prefetch_depth`
decoded row groups and `data.prefetch_batches` assembled micro-batches.

Bad shards: missing or wrongly sized shards are found by one listing at start; a row group
whose bytes, checksum or footer fail is found when read. With `data.on_bad_shard=error`
either stops the run naming the shard. With `skip`, shards bad at start are left out of the
order, and a sample whose row group turns out bad reads the same row of the next good row
group in the epoch's stream instead (a function of the data alone, so every rank and every
resume agrees); both are counted in `metrics()`.
"""

from __future__ import annotations

import queue
import threading
import warnings
import zlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pyarrow.parquet as pq
import torch

from dataloader.config import DataConfig
from dataloader.format import (
    FOOTER_PROBE,
    MANIFEST,
    Manifest,
    ManifestError,
    RowGroupInfo,
    ShardInfo,
    chunk_range,
    decode_row_group,
    parse_footer,
)
from dataloader.storage import DataError, DataExhausted, Storage, open_storage, with_retries

__all__ = ["DataExhausted", "GlobalOrder", "ShardError", "ShardSource"]

Key = tuple[int, int]  # (shard index in the manifest, row group index)
T = TypeVar("T")


class ShardError(DataError):
    """A shard that is missing, truncated, or does not match its manifest entry."""


class GlobalOrder:
    """Global sample index -> (shard, row group, row), the same for every world size."""

    def __init__(
        self,
        shards: list[ShardInfo],
        shard_ids: list[int],
        *,
        seed: int,
        shuffle: bool,
        window: int,
    ) -> None:
        self.shard_ids = np.asarray(shard_ids, dtype=np.int64)
        self.shard_rows = np.array([shards[i].rows for i in shard_ids], dtype=np.int64)
        self.num_rows = int(self.shard_rows.sum())
        self.group_rows = {i: np.array([g.rows for g in shards[i].row_groups]) for i in shard_ids}
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._positions: dict[int, dict[int, int]] = {}
        self._lock = threading.Lock()

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64([self.seed, *key]))

    def epoch_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's stream as row groups: (shard, row group, first stream row) arrays."""
        with self._lock:
            if epoch not in self._epochs:
                k = len(self.shard_ids)
                perm = self._rng(epoch, 1).permutation(k) if self.shuffle else np.arange(k)
                order = self.shard_ids[perm]
                shard = np.concatenate([np.full(len(self.group_rows[s]), s) for s in order])
                rg = np.concatenate([np.arange(len(self.group_rows[s])) for s in order])
                rows = np.concatenate([self.group_rows[s] for s in order])
                starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
                self._epochs[epoch] = (shard, rg, starts)
                if len(self._epochs) > 2:
                    self._epochs.popitem(last=False)
            return self._epochs[epoch]

    def shard_position(self, epoch: int, shard: int) -> int:
        """Where `shard` comes in the epoch's shard order."""
        with self._lock:
            pos = self._positions.get(epoch)
        if pos is None:
            order, _, _ = self.epoch_blocks(epoch)
            pos = {}
            for s in order.tolist():
                pos.setdefault(s, len(pos))
            with self._lock:
                self._positions[epoch] = pos
                if len(self._positions) > 2:
                    self._positions.pop(min(self._positions))
        return pos[shard]

    def _window_perm(self, epoch: int, w: int) -> np.ndarray:
        with self._lock:
            perm = self._windows.get((epoch, w))
            if perm is None:
                size = min(self.window, self.num_rows - w * self.window)
                perm = self._rng(epoch, 2, w).permutation(size)
                self._windows[(epoch, w)] = perm
                if len(self._windows) > 64:
                    self._windows.popitem(last=False)
            return perm

    def locate_many(self, g: np.ndarray) -> list[tuple[int, Key, int]]:
        """(epoch, (shard, row group), row in group) of each global sample in `g`."""
        epochs, p = np.divmod(np.asarray(g, dtype=np.int64), self.num_rows)
        shard_of = np.empty_like(p)
        rg_of = np.empty_like(p)
        row_of = np.empty_like(p)
        for epoch in np.unique(epochs).tolist():
            sel_e = epochs == epoch
            q = p[sel_e]
            if self.shuffle:
                w, off = np.divmod(q, self.window)
                for wi in np.unique(w).tolist():
                    sel = w == wi
                    q[sel] = wi * self.window + self._window_perm(epoch, wi)[off[sel]]
            shard, rg, starts = self.epoch_blocks(epoch)
            b = np.searchsorted(starts, q, side="right") - 1
            shard_of[sel_e], rg_of[sel_e], row_of[sel_e] = shard[b], rg[b], q - starts[b]
        return [
            (e, (s, r), x)
            for e, s, r, x in zip(
                epochs.tolist(), shard_of.tolist(), rg_of.tolist(), row_of.tolist(), strict=True
            )
        ]

    def locate(self, start: int, count: int) -> list[tuple[int, Key, int]]:
        """(epoch, (shard, row group), row in group) of global samples [start, start+count)."""
        return self.locate_many(np.arange(start, start + count, dtype=np.int64))

    def blocks_after(self, epoch: int, key: Key) -> Iterator[Key]:
        """Every other row group of the epoch's stream, starting after `key`, wrapping."""
        shard, rg, _ = self.epoch_blocks(epoch)
        i = int(np.flatnonzero((shard == key[0]) & (rg == key[1]))[0])
        n = len(shard)
        for j in range(1, n):
            yield int(shard[(i + j) % n]), int(rg[(i + j) % n])


class ShardSource:
    """Streams a prepared dataset (dataloader/format.py) as this rank's micro-batches.

    Opening reads the manifest, checks the row length against `seq_len` and lists the root
    once, then starts the prefetch thread at global sample 0 (`load_state_dict` moves it).

    Raises (from the constructor):
        ManifestError: no manifest at data.path, or a malformed one.
        ValueError: the rows are shorter than seq_len + 1.
        ShardError: a shard is missing or of the wrong size (data.on_bad_shard=error).
        StorageUnreachable: storage kept failing after data.retries retries.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        seq_len: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        storage: Storage | None = None,
        prefetch: bool = True,
        key: str = "data.path",
    ) -> None:
        self.cfg = cfg
        self.key = key  # the config key `cfg.path` came from, as messages name it
        self.row_len = seq_len + 1
        self.seq_len = seq_len
        self.micro = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.storage = storage or open_storage(
            cfg.path, io=cfg.io, endpoint_url=cfg.endpoint_url, timeout_s=cfg.timeout_s
        )
        self.manifest = self._read_manifest()
        m = self.manifest
        if m.row_len < self.row_len:
            raise ValueError(
                f"{self.key} {cfg.path}: rows hold {m.row_len} tokens but train.seq_len "
                f"({seq_len}) needs seq_len + 1 = {self.row_len}; prepare the data with "
                f"--seq-len {seq_len} or lower train.seq_len"
            )
        if m.row_len > self.row_len:
            warnings.warn(
                f"{self.key} {cfg.path}: rows hold {m.row_len} tokens; train.seq_len ({seq_len}) "
                f"uses the first {self.row_len} of each row and drops the rest",
                stacklevel=2,
            )
        self.vocab_size = m.vocab_size
        self.bad_shards: dict[str, str] = {}  # shard path -> why
        good = self._check_listing()
        if not good:
            raise ShardError(f"{self.key} {cfg.path}: no usable shard ({len(m.shards)} listed)")
        self.order = GlobalOrder(
            m.shards, good, seed=seed, shuffle=cfg.shuffle, window=cfg.shuffle_window
        )
        limits = []
        if cfg.epochs:
            limits.append(cfg.epochs * self.order.num_rows)
        if cfg.token_budget:
            limits.append(cfg.token_budget // seq_len)
        self.limit: int | None = min(limits) if limits else None
        self.cursor = 0
        self._footers: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._bad_blocks: set[Key] = set()
        self._substitute: tuple[Key, np.ndarray] | None = None  # see substitute()
        self.bytes_read = 0
        self.requests = 0  # ranged reads issued (footers included)
        self.row_groups_read = 0
        self.substituted_rows = 0
        self.mem_bytes = 0
        self.mem_peak_bytes = 0
        self._pf: _Prefetcher | None = None
        stored = np.dtype(m.dtype).itemsize
        max_group = self.max_group_rows = max(g.rows for s in m.shards for g in s.row_groups)
        max_chunk = max(g.length for s in m.shards for g in s.row_groups)
        # What the reader may hold at once: decoded row groups with their raw bytes (at
        # most prefetch_depth, plus those of the micro-batch being assembled when it spans
        # more, plus one being read to replace a bad one) and assembled int64 batches.
        groups = cfg.prefetch_depth + micro_batch_size + 1
        self.memory_bound_bytes = (
            groups * (max_group * self.row_len * stored + max_chunk)
            + (cfg.prefetch_batches + 1) * micro_batch_size * self.row_len * 8
        )
        self._cache: OrderedDict[Key, np.ndarray | None] = OrderedDict()  # see read_samples
        # Reading starts now, so the first batches are ready by the time the model is built.
        if prefetch:
            self._pf = _Prefetcher(self, self.cursor)

    # ---- opening ----

    def _retry(self, fn: Callable[[], T], *, url: str, what: str = "read") -> T:
        return with_retries(
            fn, url=url, retries=self.cfg.retries, backoff_s=self.cfg.backoff_s, what=what
        )

    def _read_manifest(self) -> Manifest:
        url = self.storage.url(MANIFEST)
        try:
            raw = self._retry(lambda: self.storage.read_bytes(MANIFEST), url=url)
        except FileNotFoundError:
            raise ManifestError(
                f"no {MANIFEST} at {self.key} {self.cfg.path}: not a prepared dataset, or its "
                f"`moeyard prepare` did not finish (the manifest is written last)"
            ) from None
        return Manifest.from_json(raw, url=url)

    def _bad(self, shard: ShardInfo, why: str) -> None:
        url = self.storage.url(shard.path)
        if self.cfg.on_bad_shard == "error":
            raise ShardError(f"bad shard {url}: {why} (set data.on_bad_shard=skip to leave it out)")
        if shard.path not in self.bad_shards:
            self.bad_shards[shard.path] = why
            warnings.warn(f"skipping bad shard {url}: {why}", stacklevel=3)

    def _check_listing(self) -> list[int]:
        """Indices of shards present with their manifest size; one listing of the root."""
        try:
            sizes = self._retry(self.storage.list_sizes, url=self.storage.root, what="list")
        except FileNotFoundError:
            sizes = {}
        good = []
        for i, s in enumerate(self.manifest.shards):
            if s.path not in sizes:
                self._bad(s, "missing (deleted after the manifest was written?)")
            elif sizes[s.path] != s.bytes:
                self._bad(s, f"is {sizes[s.path]} bytes, the manifest says {s.bytes}")
            else:
                good.append(i)
        return good

    # ---- reading ----

    def _footer(self, shard_idx: int) -> pq.FileMetaData:
        """The shard's Parquet footer, checked against the manifest; one request per shard
        however many threads ask at once."""
        with self._lock:
            found = self._footers.get(shard_idx)
            if found is None:
                fut: Future = Future()
                self._footers[shard_idx] = fut
                if len(self._footers) > 1024:
                    self._footers.popitem(last=False)
            else:
                self._footers.move_to_end(shard_idx)
        if found is not None:
            return found.result()
        try:
            meta = self._read_footer(shard_idx)
        except BaseException as e:
            with self._lock:
                self._footers.pop(shard_idx, None)
            fut.set_exception(e)
            raise
        fut.set_result(meta)
        return meta

    def _read_footer(self, shard_idx: int, tail: bytes | None = None) -> pq.FileMetaData:
        """Parses (from `tail`, the file's last bytes, when given) and checks the footer."""
        s = self.manifest.shards[shard_idx]
        url = self.storage.url(s.path)
        if tail is None:
            tail = self._read(s, s.bytes - min(s.bytes, FOOTER_PROBE), s.bytes)
        try:
            meta = parse_footer(tail, s.bytes)
            if isinstance(meta, int):
                meta = parse_footer(self._read(s, s.bytes - meta, s.bytes), s.bytes)
        except Exception as e:
            raise ShardError(f"bad shard {url}: unreadable Parquet footer ({e})") from None
        assert not isinstance(meta, int)
        if meta.num_rows != s.rows or meta.num_row_groups != len(s.row_groups):
            raise ShardError(
                f"bad shard {url}: {meta.num_rows} rows in {meta.num_row_groups} row groups, "
                f"the manifest says {s.rows} in {len(s.row_groups)}"
            )
        for i, g in enumerate(s.row_groups):
            if chunk_range(meta, i) != (g.offset, g.length):
                raise ShardError(f"bad shard {url}: row group {i} is not where the manifest says")
        return meta

    def _footer_cached(self, shard_idx: int) -> bool:
        with self._lock:
            return shard_idx in self._footers

    def _install_footer(self, shard_idx: int, meta: pq.FileMetaData) -> None:
        with self._lock:
            if shard_idx not in self._footers:
                fut: Future = Future()
                fut.set_result(meta)
                self._footers[shard_idx] = fut

    def _read(self, s: ShardInfo, start: int, end: int) -> bytes:
        url = self.storage.url(s.path)
        try:
            data = self._retry(lambda: self.storage.read_range(s.path, start, end), url=url)
        except FileNotFoundError:
            raise ShardError(
                f"bad shard {url}: missing (deleted after the manifest was written?)"
            ) from None
        if len(data) != end - start:
            raise ShardError(
                f"bad shard {url}: got {len(data)} bytes at offset {start}, expected "
                f"{end - start} (truncated?)"
            )
        with self._lock:
            self.bytes_read += len(data)
            self.requests += 1
        return data

    def _mem(self, delta: int) -> None:
        with self._lock:
            self.mem_bytes += delta
            self.mem_peak_bytes = max(self.mem_peak_bytes, self.mem_bytes)

    def fetch_block(self, key: Key) -> np.ndarray:
        """Decoded rows [rows, seq_len + 1] of one row group (stored dtype), checked.

        Raises:
            ShardError: the bytes, footer or checksum do not match the manifest.
            StorageUnreachable: storage kept failing after data.retries retries.
        """
        got = self.fetch_run(key[0], [key[1]])[key]
        if isinstance(got, BaseException):
            raise got
        return got

    def fetch_run(self, shard_idx: int, rgs: list[int]) -> dict[Key, np.ndarray | ShardError]:
        """Adjacent row groups of one shard, fetched with one ranged request.

        Returns per row group its rows or the ShardError it failed with (a checksum failure
        spoils one group, not its neighbours).

        Raises:
            ShardError: the shard itself (footer, size, presence) is bad.
            StorageUnreachable: storage kept failing after data.retries retries.
        """
        s = self.manifest.shards[shard_idx]
        groups = [s.row_groups[rg] for rg in rgs]
        start = min(g.offset for g in groups)
        end = max(g.offset + g.length for g in groups)
        if rgs[-1] == len(s.row_groups) - 1 and not self._footer_cached(shard_idx):
            # The run ends at the shard's last group: the footer follows it, so one
            # request brings both (saves a request per shard on a first visit).
            raw = self._read(s, start, s.bytes)
            meta = self._read_footer(shard_idx, tail=raw[end - start :])
            self._install_footer(shard_idx, meta)
        else:
            meta = self._footer(shard_idx)
            raw = self._read(s, start, end)
        self._mem(len(raw))
        out: dict[Key, np.ndarray | ShardError] = {}
        try:
            for rg, g in zip(rgs, groups, strict=True):
                chunk = raw[g.offset - start : g.offset - start + g.length]
                try:
                    rows = self._decode(s, meta, rg, g, chunk)
                except ShardError as e:
                    out[(shard_idx, rg)] = e
                    continue
                self._mem(rows.nbytes)
                out[(shard_idx, rg)] = rows
        finally:
            self._mem(-len(raw))
        with self._lock:
            self.row_groups_read += len(rgs)
        return out

    def _decode(
        self, s: ShardInfo, meta: pq.FileMetaData, rg: int, g: RowGroupInfo, chunk: bytes
    ) -> np.ndarray:
        url = self.storage.url(s.path)
        if zlib.crc32(chunk) != g.crc32:
            raise ShardError(f"bad shard {url}: row group {rg} fails its checksum")
        try:
            rows = decode_row_group(
                meta,
                rg,
                offset=g.offset,
                data=chunk,
                file_size=s.bytes,
                row_len=self.manifest.row_len,
                dtype=self.manifest.dtype,
            )
        except Exception as e:
            raise ShardError(f"bad shard {url}: row group {rg} does not decode ({e})") from None
        if len(rows) != g.rows:
            raise ShardError(
                f"bad shard {url}: row group {rg} has {len(rows)} rows, the manifest says {g.rows}"
            )
        if self.manifest.row_len > self.row_len:
            rows = np.ascontiguousarray(rows[:, : self.row_len])
        return rows

    def release_block(self, rows: np.ndarray) -> None:
        self._mem(-rows.nbytes)

    def plan_steps(self, cursor: int, steps: int) -> list[list[tuple[int, Key, int]]]:
        """(epoch, row group, row) of this rank's samples for `steps` micro-steps from
        `cursor`, one list per micro-step, in one vectorized pass."""
        g = (
            cursor
            + self.rank * self.micro
            + np.arange(steps, dtype=np.int64)[:, None] * self.step_samples
            + np.arange(self.micro, dtype=np.int64)[None, :]
        )
        flat = self.order.locate_many(g.reshape(-1))
        return [flat[i * self.micro : (i + 1) * self.micro] for i in range(steps)]

    def block_or_none(self, fut: Future, key: Key) -> np.ndarray | None:
        """The row group's rows, or None if it is bad and data.on_bad_shard is 'skip'."""
        if key in self._bad_blocks:
            return None
        try:
            return fut.result()
        except ShardError as e:
            if self.cfg.on_bad_shard == "error":
                raise
            self._bad_blocks.add(key)
            s = self.manifest.shards[key[0]]
            with self._lock:  # metrics() reads it from the loop's thread
                first = s.path not in self.bad_shards
                self.bad_shards.setdefault(s.path, str(e))
            if first:
                warnings.warn(f"skipping {e}", stacklevel=2)
            return None

    def substitute(self, epoch: int, key: Key, row: int) -> np.ndarray:
        """The same row of the next good row group after bad `key` in the epoch's stream."""
        for k in self.order.blocks_after(epoch, key):
            if k in self._bad_blocks:
                continue
            # The substitute group is kept (one at a time) for the bad group's other rows.
            rows: np.ndarray | None
            if self._substitute is not None and self._substitute[0] == k:
                rows = self._substitute[1]
            else:
                fut: Future = Future()
                try:
                    fut.set_result(self.fetch_block(k))
                except ShardError as e:
                    fut.set_exception(e)
                rows = self.block_or_none(fut, k)
                if rows is None:
                    continue
                if self._substitute is not None:
                    self.release_block(self._substitute[1])
                self._substitute = (k, rows)
            return rows[row % len(rows)]
        raise ShardError(f"{self.key} {self.cfg.path}: every row group is bad")

    def read_samples(self, g: np.ndarray) -> np.ndarray:
        """The rows [len(g), seq_len + 1] (int64) of global samples `g`, in this order.

        A synchronous read for callers that own their order (a mixture, the evaluation
        set): row groups are fetched through the same checked path as the prefetcher, the
        missing ones of one call together, and the last `data.prefetch_depth` are kept for
        the next call. Bad row groups follow `data.on_bad_shard` (substituted under skip).
        """
        plan = self.order.locate_many(np.asarray(g, dtype=np.int64))
        need = sorted({k for _, k, _ in plan if k not in self._cache})
        if need:
            pool = ThreadPoolExecutor(self.cfg.io_threads, thread_name_prefix="moeyard-data-io")
            try:
                futs = {k: pool.submit(self.fetch_block, k) for k in need}
                for k, fut in futs.items():
                    self._cache[k] = self.block_or_none(fut, k)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        out = np.empty((len(plan), self.row_len), dtype=np.int64)
        for j, (epoch, k, row) in enumerate(plan):
            self._cache.move_to_end(k)
            block = self._cache[k]
            if block is None:
                out[j] = self.substitute(epoch, k, row)
                self.substituted_rows += 1
            else:
                out[j] = block[row]
        while len(self._cache) > max(self.cfg.prefetch_depth, len({k for _, k, _ in plan})):
            _, old = self._cache.popitem(last=False)
            if old is not None:
                self.release_block(old)
        return out

    # ---- the TokenSource interface ----

    @property
    def step_samples(self) -> int:
        return self.world_size * self.micro

    def next_batch(self) -> torch.Tensor:
        if self.limit is not None and self.cursor + self.step_samples > self.limit:
            raise DataExhausted(
                f"{self.key} {self.cfg.path}: the data limit (data.epochs={self.cfg.epochs}, "
                f"data.token_budget={self.cfg.token_budget}) is reached at global sample "
                f"{self.cursor} of {self.limit}"
            )
        if self._pf is None:
            self._pf = _Prefetcher(self, self.cursor)
        cursor, batch, substituted = self._pf.get()
        assert cursor == self.cursor, (cursor, self.cursor)
        self.cursor += self.step_samples
        # Counted when the loop takes the batch, not when it is prefetched.
        self.substituted_rows += substituted
        return torch.from_numpy(batch)

    @property
    def epoch(self) -> int:
        return self.cursor // self.order.num_rows

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "epoch": self.epoch,
            "seed": self.seed,
            "dataset": self.manifest.fingerprint(),
            "num_rows": self.order.num_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data cursor was saved with seed {state['seed']} but train.seed is {self.seed}"
            )
        fp = state.get("dataset")
        if fp is not None and fp != self.manifest.fingerprint():
            raise ValueError(
                f"data cursor was saved for dataset {fp} but {self.key} {self.cfg.path} holds "
                f"dataset {self.manifest.fingerprint()}"
            )
        if int(state.get("num_rows", self.order.num_rows)) != self.order.num_rows:
            warnings.warn(
                f"data cursor was saved over {state['num_rows']} usable rows, {self.key} now has "
                f"{self.order.num_rows} (skipped shards changed); the order after resume differs",
                stacklevel=2,
            )
        self._stop_prefetch()
        self.cursor = int(state["cursor"])
        self._pf = _Prefetcher(self, self.cursor)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data_epoch": self.epoch,
            "data_samples": self.cursor,
            "data_bytes_read": self.bytes_read,
            "data_row_groups_read": self.row_groups_read,
            "data_substituted_rows": self.substituted_rows,
            "data_mem_peak_bytes": self.mem_peak_bytes,
        }
        with self._lock:
            names = sorted(self.bad_shards)
        out["data_bad_shards"] = len(names)
        if names:
            out["data_bad_shard_names"] = names
        return out

    def _stop_prefetch(self) -> None:
        if self._pf is not None:
            self._pf.close()
            self._pf = None

    def close(self) -> None:
        self._stop_prefetch()
        for block in self._cache.values():
            if block is not None:
                self.release_block(block)
        self._cache.clear()


_DONE = object()


class _Prefetcher:
    """A thread that walks the rank's future micro-steps, fetches their row groups through a
    small pool (at most data.prefetch_depth held), and queues assembled batches.

    Fetches go out in rounds: when there is room for data.coalesce more row groups (at most
    half the depth), or the next micro-step lacks one, the next ones in the epoch's stream
    order are requested up to the depth, adjacent row groups of a shard sharing one ranged
    request (up to data.coalesce of them).
    Fewer, larger requests are what object stores serve fastest.
    """

    def __init__(self, src: ShardSource, cursor: int) -> None:
        self.src = src
        self.cursor = cursor
        self.queue: queue.Queue = queue.Queue(maxsize=src.cfg.prefetch_batches)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(src.cfg.io_threads, thread_name_prefix="moeyard-data-io")
        self.batch_bytes = src.micro * src.row_len * 8
        self.thread = threading.Thread(target=self._run, name="moeyard-data", daemon=True)
        self.thread.start()

    def get(self) -> tuple[int, np.ndarray, int]:
        while True:
            try:
                item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise DataError("the data prefetch thread stopped unexpectedly") from None
        if isinstance(item, BaseException):
            raise item
        if item is _DONE:
            raise DataExhausted(f"{self.src.key} {self.src.cfg.path}: no more samples")
        self.src._mem(-self.batch_bytes)
        return item

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _issue(self, keys: list[Key], held: dict[Key, Future]) -> None:
        """Requests `keys`, runs of adjacent row groups of one shard together."""
        runs: list[list[Key]] = []
        for k in sorted(keys):
            last = runs[-1][-1] if runs else None
            if (
                last is not None
                and last[0] == k[0]
                and last[1] + 1 == k[1]
                and len(runs[-1]) < self.src.cfg.coalesce
            ):
                runs[-1].append(k)
            else:
                runs.append([k])
        for run in runs:
            children: dict[Key, Future] = {k: Future() for k in run}
            parent = self.pool.submit(self.src.fetch_run, run[0][0], [k[1] for k in run])

            def done(f: Future, children: dict[Key, Future] = children) -> None:
                try:
                    got = f.result()
                except BaseException as e:
                    for c in children.values():
                        c.set_exception(e)
                    return
                for k, c in children.items():
                    r = got[k]
                    if isinstance(r, BaseException):
                        c.set_exception(r)
                    else:
                        c.set_result(r)

            parent.add_done_callback(done)
            held.update(children)

    def _run(self) -> None:
        src = self.src
        depth = src.cfg.prefetch_depth
        # Enough micro-steps to span `depth` row groups even when one group feeds many steps,
        # capped: a group that feeds hundreds of steps leaves time to fetch the next anyway.
        max_plans = min(1024, max(64, -(-depth * src.max_group_rows // src.micro) + 1))
        plans: deque[tuple[int, list[tuple[int, Key, int]]]] = deque()
        planned: Counter[Key] = Counter()  # row group -> uses in the planned micro-steps
        pending: dict[Key, tuple[int, int, int]] = {}  # planned, not requested -> stream order
        held: dict[Key, Future] = {}
        next_cursor = self.cursor
        try:
            while not self.stop.is_set():
                # Plan far enough ahead to see the next `depth` row groups this rank needs.
                while len(plans) < max_plans and len(planned) <= depth:
                    n = 16  # micro-steps planned per vectorized pass
                    if src.limit is not None:
                        n = min(n, (src.limit - next_cursor) // src.step_samples)
                    if n <= 0:
                        break
                    for p in src.plan_steps(next_cursor, n):
                        plans.append((next_cursor, p))
                        for e, k, _ in p:
                            planned[k] += 1
                            if k not in held and k not in pending:
                                pending[k] = (e, src.order.shard_position(e, k[0]), k[1])
                        next_cursor += src.step_samples
                if not plans:
                    self._put(_DONE)
                    return
                must = {k for _, k, _ in plans[0][1] if k not in held}
                # Top up as soon as a full coalesced request fits, so several are in flight.
                if must or (pending and len(held) <= depth - min(src.cfg.coalesce, depth // 2)):
                    # The next groups in the epoch's stream order (not first-use order,
                    # which the window shuffle scatters), so that runs stay adjacent.
                    room = max(0, depth - len(held) - len(must))
                    ordered = [k for k in sorted(pending, key=pending.__getitem__) if k not in must]
                    chosen = [*must, *ordered[:room]]
                    for k in chosen:
                        pending.pop(k, None)
                    self._issue(chosen, held)
                cursor, p = plans.popleft()
                out, substituted = self._assemble(p, held)
                src._mem(self.batch_bytes)
                if not self._put((cursor, out, substituted)):
                    return
                for _, k, _ in p:
                    planned[k] -= 1
                    if planned[k] == 0:
                        del planned[k]
                        pending.pop(k, None)
                        fut = held.pop(k, None)
                        if fut is not None and fut.done() and fut.exception() is None:
                            src.release_block(fut.result())
        except BaseException as e:
            self._put(e)
        finally:
            for fut in held.values():
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    src.release_block(fut.result())
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _assemble(
        self, plan: list[tuple[int, Key, int]], held: dict[Key, Future]
    ) -> tuple[np.ndarray, int]:
        """This micro-step's rows as int64, copied group by group; bad groups substituted."""
        src = self.src
        out = np.empty((src.micro, src.row_len), dtype=np.int64)
        by_key: dict[Key, tuple[list[int], list[int]]] = {}
        for j, (_, k, row) in enumerate(plan):
            idx, rows = by_key.setdefault(k, ([], []))
            idx.append(j)
            rows.append(row)
        substituted = 0
        for k, (idx, rows) in by_key.items():
            block = src.block_or_none(held[k], k)
            if block is not None:
                out[idx] = block[rows]
                continue
            for j, row in zip(idx, rows, strict=True):
                out[j] = src.substitute(plan[j][0], k, row)
                substituted += 1
        return out, substituted

    def close(self) -> None:
        self.stop.set()
        while True:  # unblock a put waiting on a full queue
            try:
                item = self.queue.get_nowait()
                if isinstance(item, tuple):
                    self.src._mem(-self.batch_bytes)
            except queue.Empty:
                break
        self.thread.join(timeout=30)
