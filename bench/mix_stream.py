"""Mixture reading rate: `data.mix` over three datasets against the single-dataset reader.

Writes three local datasets of synthetic token rows, then times, in the same process and
run, (a) the shard reader (`data.source=shards`, its prefetch thread) on one dataset of all
the rows and (b) the mixture source (`data.mix`, weights 0.7/0.2/0.1, reading one
micro-batch ahead) over the three, both serving the same number of micro-batches to one
rank. Prints rows/s of each and the ratio mixture / single. No pass/fail: the figure goes in
bench/README.md.

    python bench/mix_stream.py [--rows 20000] [--seq-len 1024] [--micro 8] [--steps 400]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from dataloader.config import DataConfig, MixEntry
from dataloader.format import write_dataset
from dataloader.mix import MixSource
from dataloader.reader import ShardSource

TOKENIZER = {"kind": "test", "name": "bench", "vocab_size": 32_000, "eod_id": 0}


def rate(src: ShardSource | MixSource, steps: int, micro: int) -> float:
    src.next_batch()  # the first batch pays for opening; not timed
    t0 = time.perf_counter()
    for _ in range(steps):
        src.next_batch()
    dt = time.perf_counter() - t0
    src.close()
    return steps * micro / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="rows per dataset")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        names = ("web", "code", "math")
        parts = []
        for name in names:
            rows = rng.integers(1, 32_000, size=(a.rows, a.seq_len + 1), dtype=np.int32)
            write_dataset(
                f"{d}/{name}", rows, tokenizer=TOKENIZER, rows_per_group=256, rows_per_shard=4096
            )
            parts.append(rows)
        write_dataset(
            f"{d}/all",
            np.concatenate(parts),
            tokenizer=TOKENIZER,
            rows_per_group=256,
            rows_per_shard=4096,
        )
        kw = {
            "seq_len": a.seq_len,
            "micro_batch_size": a.micro,
            "rank": 0,
            "world_size": 1,
            "seed": 0,
        }
        single = rate(ShardSource(DataConfig(path=f"{d}/all"), **kw), a.steps, a.micro)
        mix = DataConfig(
            mix=[
                MixEntry(name=n, path=f"{d}/{n}", weight=w)
                for n, w in zip(names, (0.7, 0.2, 0.1), strict=True)
            ]
        )
        mixed = rate(MixSource(mix, **kw), a.steps, a.micro)
    print(
        f"rows of {a.seq_len + 1} tokens, micro-batch {a.micro}, {a.steps} micro-batches, "
        "local files, one rank"
    )
    print(f"single dataset (shard reader): {single:,.0f} rows/s")
    print(f"mixture of 3 (data.mix):       {mixed:,.0f} rows/s")
    print(f"ratio mixture / single:        {mixed / single:.2f}")


if __name__ == "__main__":
    main()
