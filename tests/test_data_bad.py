"""Bad data and bad storage against the local S3 endpoint: a missing manifest, shards whose
checksum, size, row count or footer do not match the manifest, a shard deleted after the
manifest was written, and an endpoint that does not answer. By default each is an error
naming the shard or URL; with data.on_bad_shard=skip the shard is left out (or its rows
replaced), counted in metrics(), and the run goes on."""

from __future__ import annotations

import json
import socket
import warnings

import numpy as np
import pytest
import s3fs

from dataloader.format import ManifestError
from dataloader.reader import ShardError
from dataloader.storage import StorageUnreachable
from tests.s3_server import TEST_SECRET
from tests.test_data_reader import NUM_ROWS, cfg_for, close, global_steps, make_dataset, readers


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def manifest(url: str) -> dict:
    return json.loads(s3().cat_file(url + "/manifest.json"))


def put_manifest(url: str, m: dict) -> None:
    s3().pipe_file(url + "/manifest.json", json.dumps(m).encode())


def epoch_ids(cfg, world: int = 1, micro: int = 10, rows=None, steps: int | None = None) -> list:
    srcs = readers(cfg, world, micro)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = steps if steps is not None else NUM_ROWS // (world * micro)
        ids = np.concatenate(global_steps(srcs, n, rows))[:, 0].tolist()
    metrics = srcs[0].metrics()
    close(srcs)
    return ids, metrics


def read_until_error(cfg) -> None:
    [src] = readers(cfg, 1, 10)
    try:
        for _ in range(30):
            src.next_batch()
    finally:
        src.close()


def test_missing_manifest_names_the_path(s3_bucket) -> None:
    url = f"{s3_bucket}/ds"
    make_dataset(url)
    s3().rm_file(url + "/manifest.json")
    with pytest.raises(ManifestError, match=rf"no manifest.json at data.path {url}"):
        readers(cfg_for(url), 1, 2)


def test_checksum_mismatch_is_an_error_or_skipped(s3_bucket) -> None:
    url = f"{s3_bucket}/ds"
    rows = make_dataset(url)
    g = manifest(url)["shards"][1]["row_groups"][1]  # rows 80..95
    path = url + "/shard-00001.parquet"
    data = bytearray(s3().cat_file(path))
    data[g["offset"] + g["length"] // 2] ^= 0xFF  # same size: only the checksum can tell
    s3().pipe_file(path, bytes(data))

    with pytest.raises(ShardError, match=r"shard-00001.parquet: row group 1 fails its checksum"):
        read_until_error(cfg_for(url))

    ids, m = epoch_ids(cfg_for(url, on_bad_shard="skip"), rows=rows)
    assert len(ids) == NUM_ROWS
    assert not set(ids) & set(range(80, 96))  # the bad group's rows never appear...
    assert set(ids) == set(range(NUM_ROWS)) - set(range(80, 96))  # ...all others do
    assert m["data_bad_shards"] == 1 and m["data_bad_shard_names"] == ["shard-00001.parquet"]
    assert m["data_substituted_rows"] == 16
    # The substitutes depend on the data alone: another world size gets the same samples.
    ids2, _ = epoch_ids(cfg_for(url, on_bad_shard="skip"), world=2, micro=5, rows=rows)
    assert ids2 == ids


def test_size_or_row_count_unlike_the_manifest(s3_bucket) -> None:
    url = f"{s3_bucket}/ds"
    make_dataset(url)
    good = manifest(url)
    m = json.loads(json.dumps(good))
    m["shards"][2]["bytes"] += 5
    put_manifest(url, m)
    size = good["shards"][2]["bytes"]
    with pytest.raises(
        ShardError, match=rf"shard-00002.parquet: is {size} bytes, the manifest says {size + 5}"
    ):
        readers(cfg_for(url), 1, 2)

    m = json.loads(json.dumps(good))
    m["shards"][0]["rows"] -= 1
    m["shards"][0]["row_groups"][-1]["rows"] -= 1
    put_manifest(url, m)
    with pytest.raises(
        ShardError, match=r"shard-00000.parquet: 64 rows in 4 row groups, the manifest says 63"
    ):
        read_until_error(cfg_for(url))


def test_truncated_parquet(s3_bucket) -> None:
    url = f"{s3_bucket}/ds"
    rows = make_dataset(url)
    path = url + "/shard-00003.parquet"  # rows 192..249
    data = s3().cat_file(path)
    s3().pipe_file(path, data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-00003.parquet: is \d+ bytes, the manifest says"):
        readers(cfg_for(url), 1, 2)

    # Skipped: the epoch is the other shards' rows, each exactly once.
    with pytest.warns(UserWarning, match=r"skipping bad shard .*shard-00003.parquet"):
        srcs = readers(cfg_for(url, on_bad_shard="skip"), 1, 8)
    ids = np.concatenate(global_steps(srcs, 24, rows))[:, 0].tolist()
    m = srcs[0].metrics()
    close(srcs)
    assert sorted(ids) == list(range(192))
    assert m["data_bad_shards"] == 1 and m["data_bad_shard_names"] == ["shard-00003.parquet"]

    # A manifest that agrees with the short file: the footer itself is unreadable.
    mf = manifest(url)
    mf["shards"][3]["bytes"] = len(data) // 2
    put_manifest(url, mf)
    with pytest.raises(ShardError, match=r"shard-00003.parquet: unreadable Parquet footer"):
        read_until_error(cfg_for(url))


def test_shard_deleted_after_the_manifest(s3_bucket) -> None:
    url = f"{s3_bucket}/ds"
    rows = make_dataset(url)
    # The reader starts prefetching when it opens: a small depth, and the shard that comes
    # last in the epoch, so that it is deleted before the reader gets to it.
    cfg = cfg_for(url, prefetch_depth=2, prefetch_batches=1)
    [src] = readers(cfg, 1, 10)  # opened while the shard was there
    last = int(src.order.epoch_blocks(0)[0][-1])
    name = f"shard-{last:05d}.parquet"
    gone = set(range(last * 64, min(NUM_ROWS, (last + 1) * 64)))
    path = f"{url}/{name}"
    original = s3().cat_file(path)
    s3().rm_file(path)
    with pytest.raises(ShardError, match=rf"{name}: missing"):
        for _ in range(30):
            src.next_batch()
    src.close()
    with pytest.raises(ShardError, match=rf"{name}: missing"):
        readers(cfg, 1, 10)

    # Skipped while running: its rows are replaced, the run goes on.
    s3().pipe_file(path, original)
    [src] = readers(cfg_for(url, on_bad_shard="skip", prefetch_depth=2, prefetch_batches=1), 1, 10)
    s3().rm_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = np.concatenate(global_steps([src], 25, rows))[:, 0].tolist()
    m = src.metrics()
    src.close()
    assert len(ids) == NUM_ROWS and not set(ids) & gone
    assert set(ids) == set(range(NUM_ROWS)) - gone
    assert m["data_substituted_rows"] == len(gone) and m["data_bad_shards"] == 1


def test_unreachable_endpoint_retries_with_backoff_then_names_the_url(monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    monkeypatch.setattr("dataloader.storage.time.sleep", waits.append)
    url = "s3://nowhere/ds"
    for io in ("fsspec", "arrow"):
        waits.clear()
        cfg = cfg_for(
            url, endpoint_url=f"http://127.0.0.1:{port}", retries=3, backoff_s=0.25, io=io
        )
        with pytest.raises(StorageUnreachable) as e:
            readers(cfg, 1, 2)
        msg = str(e.value)
        assert f"cannot read {url}/manifest.json after 4 attempts" in msg, msg
        assert TEST_SECRET not in msg
        assert waits == [0.25, 0.5, 1.0]  # exponential backoff between the 4 attempts
