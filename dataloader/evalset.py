"""The evaluation set: fixed batches of a held-out dataset, the same at every world size.

Evaluation batch s (0-based) is rows [s * batch_size, (s + 1) * batch_size) of the dataset in
file order (no shuffle: the first rows of the first shards). The world size only decides
who computes which rows: rank r of W takes the r-th of W nearly equal contiguous parts
(`numpy.array_split`), so every row is evaluated exactly once per evaluation whatever W is.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from dataloader.config import DataConfig


class EvalSet:
    """This rank's rows of each evaluation batch, read once and kept (they never change).

    Raises (from the constructor):
        ValueError: fewer rows than steps x batch_size, or fewer rows per batch than ranks;
            the message names the keys (`eval.*`) and the numbers.
        ManifestError, ShardError, StorageUnreachable: as the shard reader raises them.
    """

    def __init__(
        self,
        data: DataConfig,
        *,
        path: str,
        steps: int,
        batch_size: int,
        seq_len: int,
        rank: int,
        world_size: int,
    ) -> None:
        from dataloader.reader import ShardSource

        if batch_size < world_size:
            raise ValueError(
                f"eval.batch_size ({batch_size}) must be at least the number of ranks "
                f"({world_size}): every rank evaluates part of each batch"
            )
        # The run's I/O settings; the eval set's own path, in file order, without limits
        # (and the defaults where a setting does not apply, so that none warns again).
        cfg = replace(
            data,
            source="shards",
            path=path,
            mix=[],
            shuffle=False,
            shuffle_window=DataConfig.shuffle_window,
            corpus_max_bytes=DataConfig.corpus_max_bytes,
            epochs=0,
            token_budget=0,
        )
        reader = ShardSource(
            cfg,
            seq_len=seq_len,
            micro_batch_size=1,
            rank=0,
            world_size=1,
            seed=0,
            prefetch=False,
            key="eval.path",
        )
        try:
            need = steps * batch_size
            if reader.order.num_rows < need:
                raise ValueError(
                    f"eval.path {path} holds {reader.order.num_rows} rows; eval.steps ({steps}) x "
                    f"eval.batch_size ({batch_size}) needs {need}"
                )
            self.vocab_size = reader.vocab_size
            self.fingerprint = reader.manifest.fingerprint()
            self.path = path
            self.batches: list[torch.Tensor] = []
            for s in range(steps):
                part = np.array_split(np.arange(s * batch_size, (s + 1) * batch_size), world_size)
                self.batches.append(torch.from_numpy(reader.read_samples(part[rank])))
        finally:
            reader.close()
