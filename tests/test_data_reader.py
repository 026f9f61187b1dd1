"""The streaming reader against the local S3 endpoint: the global order is the same at world
size 1, 2 and 4, resume is exact (same and other world size), epochs reshuffle and cover
every row once, both I/O backends agree, and memory stays within the configured bound.

Datasets here are synthetic rows whose first token is the row's id, so every sample a
reader returns names itself, and the rest of the row checks that the whole row is right.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dataloader.config import DataConfig
from dataloader.format import write_dataset
from dataloader.reader import DataExhausted, ShardSource
from dataloader.source import build_source

NUM_ROWS = 250
ROW_LEN = 9  # seq_len 8
TOKENIZER = {"kind": "test", "name": "ids", "vocab_size": 1 << 20, "eod_id": 0}


def id_rows(num_rows: int = NUM_ROWS, row_len: int = ROW_LEN) -> np.ndarray:
    rows = (np.arange(num_rows)[:, None] * 7 + np.arange(row_len)[None, :]) % 1000 + 1000
    rows[:, 0] = np.arange(num_rows)
    return rows.astype(np.int32)


def make_dataset(url: str, rows: np.ndarray | None = None, **kw) -> np.ndarray:
    """Writes the id rows at `url`: shards of 64 rows in groups of 16 (last ones short)."""
    rows = id_rows() if rows is None else rows
    write_dataset(
        url,
        rows,
        tokenizer=TOKENIZER,
        rows_per_group=kw.get("rows_per_group", 16),
        rows_per_shard=kw.get("rows_per_shard", 64),
    )
    return rows


def cfg_for(url: str, **kw) -> DataConfig:
    base = {"source": "shards", "path": url, "shuffle_window": 40, "backoff_s": 0.01}
    base.update(kw)
    return DataConfig(**base)


def readers(cfg: DataConfig, world: int, micro: int, seed: int = 3) -> list[ShardSource]:
    return [
        ShardSource(
            cfg,
            seq_len=ROW_LEN - 1,
            micro_batch_size=micro,
            rank=r,
            world_size=world,
            seed=seed,
        )
        for r in range(world)
    ]


def global_steps(srcs: list[ShardSource], steps: int, rows: np.ndarray | None) -> list[np.ndarray]:
    """Each step's global batch: the ranks' micro-batches in rank order; rows checked."""
    out = []
    for _ in range(steps):
        parts = [s.next_batch().numpy() for s in srcs]
        batch = np.concatenate(parts)
        if rows is not None:
            np.testing.assert_array_equal(batch, rows[batch[:, 0]])
        out.append(batch)
    return out


def close(srcs: list[ShardSource]) -> None:
    for s in srcs:
        s.close()


@pytest.fixture(scope="module")
def dataset(s3_server) -> tuple[str, np.ndarray]:
    """One read-only dataset for the module (tests that damage data make their own)."""
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("t-data-reader")
    url = "s3://t-data-reader/ds"
    return url, make_dataset(url)


def test_world_sizes_1_2_4_see_the_same_global_batches(dataset) -> None:
    url, rows = dataset
    cfg = cfg_for(url)
    seen = {}
    for world in (1, 2, 4):
        srcs = readers(cfg, world, 12 // world)
        seen[world] = global_steps(srcs, 30, rows)  # 360 samples: into the second epoch
        close(srcs)
    for world in (2, 4):
        for a, b in zip(seen[1], seen[world], strict=True):
            np.testing.assert_array_equal(a, b)
    ids = np.concatenate(seen[1])[:, 0]
    assert sorted(ids[:NUM_ROWS].tolist()) == list(range(NUM_ROWS))
    assert not np.array_equal(ids[:NUM_ROWS], np.arange(NUM_ROWS))  # shuffled


def test_resume_at_step_k_matches_uninterrupted_run(dataset) -> None:
    url, rows = dataset
    cfg = cfg_for(url)
    srcs = readers(cfg, 2, 5)
    full = global_steps(srcs, 30, rows)  # crosses the epoch boundary at step 25
    close(srcs)

    first = readers(cfg, 2, 5)
    global_steps(first, 20, rows)
    states = [s.state_dict() for s in first]
    close(first)
    assert states[0] == states[1]
    assert states[0]["cursor"] == 200 and states[0]["epoch"] == 0 and states[0]["seed"] == 3

    resumed = readers(cfg, 2, 5)
    for s in resumed:
        s.load_state_dict(states[0])
    rest = global_steps(resumed, 10, rows)
    close(resumed)
    for a, b in zip(full[20:], rest, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("world", "micro"), [(4, 3), (1, 6)])
def test_resume_at_another_world_size_loses_and_repeats_nothing(dataset, world, micro) -> None:
    url, rows = dataset
    cfg = cfg_for(url)
    first = readers(cfg, 2, 5)
    ids = np.concatenate(global_steps(first, 13, rows))[:, 0].tolist()  # 130 samples
    state = first[0].state_dict()
    close(first)

    resumed = readers(cfg, world, micro)
    for s in resumed:
        s.load_state_dict(state)
    steps = (NUM_ROWS - 130) // (world * micro)  # exactly to the end of epoch 0
    ids += np.concatenate(global_steps(resumed, steps, rows))[:, 0].tolist()
    close(resumed)
    assert len(ids) == NUM_ROWS
    assert sorted(ids) == list(range(NUM_ROWS))  # every sample exactly once

    ref = readers(cfg, 1, 10)
    ref_ids = np.concatenate(global_steps(ref, 25, None))[:, 0].tolist()
    close(ref)
    assert ids == ref_ids  # and in the order of the uninterrupted run


def test_epochs_reshuffle_and_cover_every_row_once(dataset) -> None:
    url, rows = dataset
    srcs = readers(cfg_for(url, epochs=2), 1, 10)
    ids = np.concatenate(global_steps(srcs, 50, rows))[:, 0]
    e0, e1 = ids[:NUM_ROWS], ids[NUM_ROWS:]
    assert sorted(e0.tolist()) == list(range(NUM_ROWS))
    assert sorted(e1.tolist()) == list(range(NUM_ROWS))
    assert (e0 != e1).mean() > 0.5  # the second epoch has its own order
    assert srcs[0].state_dict()["epoch"] == 2
    with pytest.raises(DataExhausted, match=r"data.epochs=2"):
        srcs[0].next_batch()
    close(srcs)


def test_other_seed_other_order_same_rows(dataset) -> None:
    url, _ = dataset
    a, b = readers(cfg_for(url), 1, 10, seed=1), readers(cfg_for(url), 1, 10, seed=2)
    ia = np.concatenate(global_steps(a, 25, None))[:, 0]
    ib = np.concatenate(global_steps(b, 25, None))[:, 0]
    close(a + b)
    assert sorted(ia.tolist()) == sorted(ib.tolist()) and not np.array_equal(ia, ib)


def test_no_shuffle_reads_rows_in_order(tmp_path) -> None:
    rows = make_dataset(str(tmp_path / "ds"))
    srcs = readers(cfg_for(str(tmp_path / "ds"), shuffle=False), 2, 5)
    ids = np.concatenate(global_steps(srcs, 25, rows))[:, 0]
    close(srcs)
    np.testing.assert_array_equal(ids, np.arange(NUM_ROWS))


def test_token_budget_stops_at_a_whole_global_batch(dataset) -> None:
    url, _ = dataset
    # 100 samples of seq_len 8 = 800 tokens; global batch 12 -> 8 full steps (96 samples).
    srcs = readers(cfg_for(url, token_budget=800), 2, 6)
    global_steps(srcs, 8, None)
    for s in srcs:
        with pytest.raises(DataExhausted, match="token_budget=800"):
            s.next_batch()
    close(srcs)


def test_fsspec_and_arrow_backends_read_the_same_batches(dataset) -> None:
    url, rows = dataset
    out = {}
    for io in ("fsspec", "arrow"):
        srcs = readers(cfg_for(url, io=io), 2, 4)
        out[io] = global_steps(srcs, 12, rows)
        assert srcs[0].storage.kind == io
        close(srcs)
    for a, b in zip(out["fsspec"], out["arrow"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_memory_stays_within_the_configured_bound(dataset) -> None:
    url, rows = dataset
    cfg = cfg_for(url, prefetch_depth=2, prefetch_batches=2, io_threads=2)
    srcs = readers(cfg, 1, 2)
    global_steps(srcs, 130, rows)  # more than an epoch
    src = srcs[0]
    m = src.metrics()
    close(srcs)
    dataset_bytes = rows.nbytes
    assert 0 < m["data_mem_peak_bytes"] <= src.memory_bound_bytes < dataset_bytes
    assert m["data_bytes_read"] > 0 and m["data_row_groups_read"] >= 16


def test_build_source_returns_the_reader_and_checks_lengths(dataset) -> None:
    url, rows = dataset
    src = build_source(
        cfg_for(url), seq_len=ROW_LEN - 1, micro_batch_size=2, rank=0, world_size=1, seed=0
    )
    assert isinstance(src, ShardSource) and src.vocab_size == TOKENIZER["vocab_size"]
    src.close()
    with pytest.raises(ValueError, match=rf"data.path {url}: rows hold 9 tokens .*seq_len \(9\)"):
        build_source(cfg_for(url), seq_len=9, micro_batch_size=2, rank=0, world_size=1, seed=0)
    # Longer rows are cut to seq_len + 1 tokens, with a warning that says so.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = build_source(
            cfg_for(url), seq_len=4, micro_batch_size=3, rank=0, world_size=1, seed=0
        )
    assert any("first 5 of each row" in str(w.message) for w in caught)
    batch = short.next_batch().numpy()
    short.close()
    assert batch.shape == (3, 5)
    np.testing.assert_array_equal(batch, rows[batch[:, 0]][:, :5])


def test_seed_and_dataset_mismatch_on_resume_are_errors(dataset, s3_bucket) -> None:
    url, _ = dataset
    [src] = readers(cfg_for(url), 1, 4, seed=3)
    state = src.state_dict()
    src.close()
    [other] = readers(cfg_for(url), 1, 4, seed=4)
    with pytest.raises(ValueError, match=r"seed 3 but train\.seed is 4"):
        other.load_state_dict(state)
    other.close()
    make_dataset(f"{s3_bucket}/other", id_rows(100))
    [third] = readers(cfg_for(f"{s3_bucket}/other"), 1, 4, seed=3)
    with pytest.raises(ValueError, match="saved for dataset"):
        third.load_state_dict(state)
    third.close()
