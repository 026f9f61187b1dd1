"""The interface between the training loop and any data source, and the local corpus source.

A source owns a deterministic global order of packed token rows. Global sample g of the run
is a function of (seed, g) alone, whatever the world size; at each micro-step rank r of W
takes the `micro_batch_size` samples starting at cursor + r * micro_batch_size, and every rank
advances the cursor by W * micro_batch_size. The cursor is counted in global samples, so a
resume at another world size continues at the same sample.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dataloader.config import DataConfig
from dataloader.storage import DataExhausted
from dataloader.tokenizer import ByteTokenizer


class TokenSource(Protocol):
    """What the loop needs from a data source."""

    vocab_size: int

    def next_batch(self) -> torch.Tensor:
        """This rank's rows for the next micro-step: int64 [micro_batch_size, seq_len + 1]."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The cursor: global samples consumed, epoch and seed."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """Counters the loop adds to each logged step (e.g. bytes read, shards skipped)."""
        ...

    def close(self) -> None: ...


def epoch_permutation(num_rows: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of rows in one epoch, a function of (seed, epoch) only."""
    if not shuffle:
        return np.arange(num_rows)
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x6D6F65]))
    return rng.permutation(num_rows)


class CorpusSource:
    """Rows of `seq_len + 1` tokens cut from the standard library's source, byte-tokenized.

    Documents (files, in sorted path order) are separated by the end-of-document token and
    packed; the trailing partial row is dropped. Each epoch reshuffles the rows.
    `data.epochs` and `data.token_budget` end it as they end the shard reader: at the first
    micro-step whose global batch would pass the limit, `next_batch` raises DataExhausted.
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
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.row_len = seq_len + 1
        self.micro = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = cfg.shuffle
        self.rows = self._load_rows(cfg.corpus_max_bytes)
        self.cfg = cfg
        limits = []
        if cfg.epochs:
            limits.append(cfg.epochs * self.num_rows)
        if cfg.token_budget:
            limits.append(cfg.token_budget // seq_len)
        self.limit: int | None = min(limits) if limits else None
        self.cursor = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _load_rows(self, max_bytes: int) -> np.ndarray:
        root = Path(sysconfig.get_paths()["stdlib"])
        chunks: list[np.ndarray] = []
        total = 0
        eod = np.array([self.tokenizer.eod_id], dtype=np.int32)
        for path in sorted(root.rglob("*.py")):
            if "site-packages" in path.parts or total >= max_bytes:
                continue
            try:
                data = path.read_bytes()[: max_bytes - total]
            except OSError:
                continue
            chunks += [self.tokenizer.encode(data), eod]
            total += len(data)
        if total == 0:
            raise RuntimeError(f"no Python source found under {root} for the corpus source")
        tokens = np.concatenate(chunks)
        num_rows = len(tokens) // self.row_len
        return tokens[: num_rows * self.row_len].reshape(num_rows, self.row_len)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def row_ids(self, start: int, count: int) -> np.ndarray:
        """Row indices of global samples [start, start + count)."""
        out = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(start, start + count)):
            epoch, pos = divmod(g, self.num_rows)
            if epoch != self._perm_epoch:
                self._perm = epoch_permutation(
                    self.num_rows, seed=self.seed, epoch=epoch, shuffle=self.shuffle
                )
                self._perm_epoch = epoch
            out[i] = self._perm[pos]
        return out

    def next_batch(self) -> torch.Tensor:
        step = self.world_size * self.micro
        if self.limit is not None and self.cursor + step > self.limit:
            raise DataExhausted(
                f"data.source corpus: the data limit (data.epochs={self.cfg.epochs}, "
                f"data.token_budget={self.cfg.token_budget}) is reached at global sample "
                f"{self.cursor} of {self.limit}"
            )
        ids = self.row_ids(self.cursor + self.rank * self.micro, self.micro)
        self.cursor += self.world_size * self.micro
        return torch.from_numpy(self.rows[ids].astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "seed": self.seed, "epoch": self.cursor // self.num_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data cursor was saved with seed {state['seed']} but train.seed is {self.seed}"
            )
        self.cursor = int(state["cursor"])

    def metrics(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


def build_source(
    cfg: DataConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
) -> TokenSource:
    """The source named by `data.source`, positioned at global sample 0."""
    if cfg.source == "corpus":
        cls: type = CorpusSource
    elif cfg.source == "shards":
        from dataloader.reader import ShardSource

        cls = ShardSource
    elif cfg.source == "mix":
        from dataloader.mix import MixSource

        cls = MixSource
    else:
        raise ValueError(f"data.source ({cfg.source!r}) must be 'corpus', 'shards' or 'mix'")
    return cls(
        cfg,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
