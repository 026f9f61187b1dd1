"""Data mixtures (`data.mix`): several prepared datasets blended by weight into one order.

The order is a function of (seed, global sample index) and the weights alone, so a resume at
any world size continues at the same sample, as for one dataset (dataloader/source.py):

1. The weights are normalized and turned into integers w_d out of M = 2^20 (largest
   remainder, so they sum to M exactly).
2. Global samples come in rounds of about R = 256. Dataset d has Q_d(b) = floor(b * R * w_d
   / M) samples in rounds 0..b-1, so round b holds q_d(b) = Q_d(b+1) - Q_d(b) of them and
   starts at global sample sum_d Q_d(b). Both are closed forms: no state but the cursor.
3. Inside a round the datasets are interleaved evenly: dataset d's i-th sample of the round
   sits at key (i + 1/2) / q_d(b), keys sorted (ties by dataset order). Global sample g of
   round b at offset o is therefore the k-th sample of dataset d, k = Q_d(b) + its
   occurrence number in the round.
4. Dataset d's k-th sample is its own global sample k (dataloader/reader.py): epoch
   k div N_d of its N_d rows, in its own seeded order (the run's seed and the dataset's
   name), each epoch reshuffled.

So over any n consecutive samples dataset d gets n * w_d / M of them within 2 (the floor and
the interleave each cost at most one): 1,000 samples hold a 0.1 weight at 10 +- 0.2 %.

Exhaustion: a dataset with `epochs` 0 repeats, each pass in a new order, as often as its
weight asks (a small set at a large weight is seen many times; its epoch count is in the
metrics). A dataset with `epochs` N serves at most N passes: the mix's data limit is the
global index of its first sample beyond them, and the run ends at the first step whose
global batch would reach it, as `data.epochs` ends a single dataset (DataExhausted, with a
checkpoint). `data.token_budget` applies to the mix as a whole.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import zlib
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from dataloader.config import DataConfig, MixEntry
from dataloader.storage import DataExhausted

WEIGHT_RESOLUTION = 1 << 20  # M: weights become integers out of this
ROUND = 256  # R: samples per round, about


def integer_weights(weights: list[float]) -> np.ndarray:
    """Weights as int64 summing to WEIGHT_RESOLUTION (largest remainder, ties to the first).

    Raises:
        ValueError: a weight is not finite and > 0, or a dataset would get no share.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"mixture weights ({weights}) must be finite and > 0")
    exact = w / w.sum() * WEIGHT_RESOLUTION
    out = np.floor(exact).astype(np.int64)
    short = WEIGHT_RESOLUTION - int(out.sum())
    out[np.argsort(-(exact - out), kind="stable")[:short]] += 1
    if np.any(out == 0):
        raise ValueError(
            f"mixture weights ({weights}): a weight below 1/{WEIGHT_RESOLUTION} of the total "
            "gives its dataset no samples"
        )
    return out


class MixOrder:
    """Global sample index -> (dataset, that dataset's sample index); see the module doc."""

    def __init__(self, weights: list[float]) -> None:
        self.w_D = integer_weights(weights)
        self.num_datasets = len(self.w_D)
        if self.num_datasets >= ROUND:
            raise ValueError(f"a mixture holds at most {ROUND - 1} datasets")
        self._rounds: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def quota(self, b: np.ndarray | int) -> np.ndarray:
        """Q [..., D]: samples of each dataset in rounds 0..b-1."""
        b_arr = np.asarray(b, dtype=np.int64)
        return (b_arr[..., None] * ROUND * self.w_D) // WEIGHT_RESOLUTION

    def round_start(self, b: np.ndarray | int) -> np.ndarray:
        return self.quota(b).sum(axis=-1)

    def round_layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each position, its occurrence number in the round) for round b."""
        with self._lock:
            got = self._rounds.get(b)
            if got is not None:
                return got
        q_D = self.quota(b + 1) - self.quota(b)
        ds = np.repeat(np.arange(self.num_datasets), q_D)
        occ = np.concatenate([np.arange(q) for q in q_D]) if len(ds) else ds
        keys = (occ + 0.5) / np.maximum(q_D[ds], 1)
        order = np.lexsort((ds, keys))
        got = (ds[order], occ[order])
        with self._lock:
            self._rounds[b] = got
            if len(self._rounds) > 64:
                self._rounds.popitem(last=False)
        return got

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset index, dataset-local sample index) of each global sample in `g`."""
        g = np.asarray(g, dtype=np.int64)
        # round_start(b) = b*R - r(b) with 0 <= r(b) < D < R, so g lies in round g//R or the next.
        b = g // ROUND
        b = np.where(g >= self.round_start(b + 1), b + 1, b)
        off = g - self.round_start(b)
        ds = np.empty_like(g)
        local = np.empty_like(g)
        for rb in np.unique(b).tolist():
            sel = b == rb
            layout_ds, layout_occ = self.round_layout(rb)
            d = layout_ds[off[sel]]
            ds[sel] = d
            local[sel] = self.quota(rb)[d] + layout_occ[off[sel]]
        return ds, local

    def counts_before(self, n: int) -> np.ndarray:
        """Samples of each dataset among global samples [0, n)."""
        if n <= 0:
            return np.zeros(self.num_datasets, dtype=np.int64)
        b = n // ROUND
        if n >= int(self.round_start(b + 1)):
            b += 1
        out = self.quota(b).copy()
        off = n - int(self.round_start(b))
        layout_ds, _ = self.round_layout(b)
        out += np.bincount(layout_ds[:off], minlength=self.num_datasets)
        return out

    def global_index(self, d: int, k: int) -> int:
        """The global sample that is dataset d's k-th (the inverse of `locate`)."""
        # Smallest round b with Q_d(b + 1) > k, by bisection over the monotone quota.
        lo, hi = 0, max(1, (k + 1) * WEIGHT_RESOLUTION // (ROUND * int(self.w_D[d])) + 2)
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.quota(mid + 1)[d]) > k:
                hi = mid
            else:
                lo = mid + 1
        layout_ds, layout_occ = self.round_layout(lo)
        want = k - int(self.quota(lo)[d])
        pos = int(np.flatnonzero((layout_ds == d) & (layout_occ == want))[0])
        return int(self.round_start(lo)) + pos


def dataset_seed(seed: int, name: str) -> int:
    """The seed of one dataset's own order: the run's seed and the dataset's name."""
    return (seed << 32) ^ zlib.crc32(name.encode())


class MixSource:
    """The TokenSource of `data.source=mix`: this rank's rows of the blended global order.

    Each dataset is read by its own ShardSource (no prefetch thread; rows by sample index);
    the next `data.prefetch_batches` micro-batches are read by one background thread while
    the loop trains on this one.

    Raises (from the constructor): what ShardSource raises for any of the datasets, and
    ValueError when their tokenizers differ.
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
    ) -> None:
        from dataloader.reader import ShardSource

        self.cfg = cfg
        self.entries: list[MixEntry] = list(cfg.mix)
        self.seq_len = seq_len
        self.micro = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.order = MixOrder([e.weight for e in self.entries])
        self.sources: list[ShardSource] = []
        try:
            for i, e in enumerate(self.entries):
                sub = replace(
                    cfg,
                    source="shards",
                    path=e.path,
                    mix=[],
                    epochs=0,
                    token_budget=0,
                    corpus_max_bytes=DataConfig.corpus_max_bytes,
                )
                self.sources.append(
                    ShardSource(
                        sub,
                        seq_len=seq_len,
                        micro_batch_size=1,
                        rank=0,
                        world_size=1,
                        seed=dataset_seed(seed, e.name),
                        prefetch=False,
                        key=f"data.mix[{i}].path",
                    )
                )
        except BaseException:
            self.close()
            raise
        toks = {
            e.name: s.manifest.tokenizer for e, s in zip(self.entries, self.sources, strict=True)
        }
        if len({repr(t) for t in toks.values()}) > 1:
            self.close()
            raise ValueError(
                f"data.mix datasets were prepared with different tokenizers: {toks}; a mixture "
                "needs one vocabulary"
            )
        self.vocab_size = max(s.vocab_size for s in self.sources)
        self.rows_D = np.array([s.order.num_rows for s in self.sources], dtype=np.int64)
        limits = []
        for d, e in enumerate(self.entries):
            if e.epochs:
                limits.append(self.order.global_index(d, e.epochs * int(self.rows_D[d])))
        if cfg.token_budget:
            limits.append(cfg.token_budget // seq_len)
        self.limit: int | None = min(limits) if limits else None
        self.cursor = 0
        self._window_start = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeyard-mix")
        # Micro-batches being read ahead, in cursor order, at most data.prefetch_batches.
        # One reading thread: the readers' caches are never used by two threads at once.
        self._ahead: deque[tuple[int, Future]] = deque()

    @property
    def step_samples(self) -> int:
        return self.world_size * self.micro

    def samples_of(self, g: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(dataset name, dataset-local sample index) of each global sample in `g`: what a
        ledger range [start, end) of the run read, by dataset."""
        ds, local = self.order.locate(np.asarray(g, dtype=np.int64))
        return [self.entries[d].name for d in ds.tolist()], local

    def dataset_ranges(self, intervals: list[list[int]]) -> dict[str, list[list[int]]]:
        """Per dataset, the ranges of its own sample indices that global ranges
        (`SampleLedger.intervals`, half-open) hold. A dataset's index grows with the global
        one, so each global range is one contiguous range of each dataset's."""
        out: dict[str, list[list[int]]] = {e.name: [] for e in self.entries}
        for start, end in intervals:
            lo, hi = self.order.counts_before(start), self.order.counts_before(end)
            for d, e in enumerate(self.entries):
                if hi[d] > lo[d]:
                    out[e.name].append([int(lo[d]), int(hi[d])])
        return out

    def _read(self, cursor: int) -> np.ndarray:
        g = cursor + self.rank * self.micro + np.arange(self.micro, dtype=np.int64)
        ds, local = self.order.locate(g)
        out = np.empty((self.micro, self.seq_len + 1), dtype=np.int64)
        for d in np.unique(ds).tolist():
            sel = ds == d
            out[sel] = self.sources[d].read_samples(local[sel])
        return out

    def _top_up(self) -> None:
        """Queues reads of the micro-batches after the last queued one (or the cursor)."""
        nxt = self._ahead[-1][0] + self.step_samples if self._ahead else self.cursor
        while len(self._ahead) < self.cfg.prefetch_batches:
            if self.limit is not None and nxt + self.step_samples > self.limit:
                return
            self._ahead.append((nxt, self._pool.submit(self._read, nxt)))
            nxt += self.step_samples

    def next_batch(self) -> torch.Tensor:
        if self.limit is not None and self.cursor + self.step_samples > self.limit:
            raise DataExhausted(
                f"data.mix: the data limit ({self._limit_reason()}) is reached at global sample "
                f"{self.cursor} of {self.limit}"
            )
        if not self._ahead or self._ahead[0][0] != self.cursor:
            self._drop_ahead()
            self._top_up()
        rows = self._ahead.popleft()[1].result()
        self.cursor += self.step_samples
        self._top_up()
        return torch.from_numpy(rows)

    def _limit_reason(self) -> str:
        parts = [f"data.mix[{i}].epochs={e.epochs}" for i, e in enumerate(self.entries) if e.epochs]
        if self.cfg.token_budget:
            parts.append(f"data.token_budget={self.cfg.token_budget}")
        return ", ".join(parts)

    def _drop_ahead(self) -> None:
        while self._ahead:
            # Waited for, not cancelled: the readers' caches are not shared across threads.
            # Its error, if any, belongs to a batch nobody asked for.
            with contextlib.suppress(Exception):
                self._ahead.popleft()[1].result()

    def state_dict(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "mix": [
                {
                    "name": e.name,
                    "weight": float(e.weight),
                    "dataset": s.manifest.fingerprint(),
                    "num_rows": s.order.num_rows,
                }
                for e, s in zip(self.entries, self.sources, strict=True)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data cursor was saved with seed {state['seed']} but train.seed is {self.seed}"
            )
        saved = state.get("mix")
        if saved is None:
            raise ValueError(
                "data cursor was saved by a run without data.mix; a mixture cannot continue it "
                "(the global order differs)"
            )
        now = [(e.name, float(e.weight)) for e in self.entries]
        was = [(m["name"], float(m["weight"])) for m in saved]
        if now != was:
            raise ValueError(
                f"data.mix (names and weights {now}) differs from the mixture the checkpoint was "
                f"saved with ({was}): the global order would change under the cursor; resume "
                "with the saved mixture, or start a new run"
            )
        for e, s, m in zip(self.entries, self.sources, saved, strict=True):
            if m.get("dataset") not in (None, s.manifest.fingerprint()):
                raise ValueError(
                    f"data cursor was saved for dataset {m['dataset']} but data.mix entry "
                    f"{e.name!r} ({e.path}) holds dataset {s.manifest.fingerprint()}"
                )
            if int(m.get("num_rows", s.order.num_rows)) != s.order.num_rows:
                warnings.warn(
                    f"data.mix entry {e.name!r}: the cursor was saved over {m['num_rows']} "
                    f"usable rows, it now has {s.order.num_rows} (skipped shards changed); its "
                    "order after resume differs",
                    stacklevel=2,
                )
        self._drop_ahead()
        self.cursor = int(state["cursor"])
        self._window_start = self.cursor
        self._top_up()

    def metrics(self) -> dict[str, Any]:
        """Per dataset (global, all ranks): samples and tokens served through the cursor,
        passes started, and its share of the samples since the previous call."""
        now = self.order.counts_before(self.cursor)
        before = self.order.counts_before(self._window_start)
        window = int((now - before).sum())
        self._window_start = self.cursor
        per: dict[str, Any] = {}
        for d, e in enumerate(self.entries):
            n = int(now[d])
            per[e.name] = {
                "samples": n,
                "tokens": n * self.seq_len,
                "epoch": n // int(self.rows_D[d]),
                "weight": float(self.order.w_D[d]) / WEIGHT_RESOLUTION,
                "share": (int(now[d] - before[d]) / window) if window else 0.0,
            }
        substituted = sum(s.substituted_rows for s in self.sources)
        bad = sorted(
            {
                f"{e.name}:{p}"
                for e, s in zip(self.entries, self.sources, strict=True)
                for p in s.bad_shards
            }
        )
        out: dict[str, Any] = {
            "data_samples": self.cursor,
            "data_bytes_read": sum(s.bytes_read for s in self.sources),
            "data_substituted_rows": substituted,
            "data_bad_shards": len(bad),
            "data_mix": per,
        }
        if bad:
            out["data_bad_shard_names"] = bad
        return out

    def close(self) -> None:
        if hasattr(self, "_pool"):
            self._drop_ahead()
            self._pool.shutdown(wait=True)
        for s in self.sources:
            s.close()
