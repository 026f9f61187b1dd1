"""Faults met by one training process reading shards from S3 and checkpointing to S3, through
cluster/faults.py: the endpoint stopping and coming back (during data reads, during a
checkpoint save), a corrupt shard (skip policy: reported as substituted; error policy: a clear
error naming it), and a non-finite loss (the step is skipped and counted).

The restartable faults end with the fault-free run's losses, bit for bit, and the sample
accounting shows nothing repeated and nothing skipped."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import fsspec
import pytest
import s3fs
import torch

from cluster.faults import EndpointProxy, StepFaults, corrupt_object
from dataloader.format import MANIFEST
from dataloader.prepare import prepare
from dataloader.reader import ShardError
from trainer.config import JobConfig, load_config
from trainer.loop import run

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"
STEPS = 10
MB = 2


@pytest.fixture
def dataset(s3_bucket: str) -> str:
    data = f"{s3_bucket}/data"
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        data,
        seq_len=32,
        rows_per_group=16,
        progress=False,
    )
    return data


def cfg_for(out: str, data: str, *extra: str) -> JobConfig:
    return load_config(
        PRESET,
        [
            "parallel.ep=1",
            f"train.steps={STEPS}",
            "train.seq_len=32",
            f"train.micro_batch_size={MB}",
            "model.dim=32",
            "model.dense_hidden=64",
            "model.moe.expert_hidden=32",
            "data.source=shards",
            f"data.path={data}",
            "data.io=fsspec",
            "data.prefetch_batches=1",
            "data.prefetch_depth=2",
            "data.backoff_s=0.5",
            "data.retries=4",
            "checkpoint.every=5",
            "checkpoint.async_save=false",
            "checkpoint.backoff_s=0.5",
            "checkpoint.retries=4",
            "ops.stdout=false",
            "ops.telemetry=false",
            f"run.output_dir={out}",
            *extra,
        ],
        ignore_sections=("cluster",),
    )


def test_endpoint_outages_during_reads_and_save(s3_server, s3_bucket, dataset, monkeypatch):
    straight = run(cfg_for(f"{s3_bucket}/straight", dataset, "checkpoint.every=0"))
    proxy = EndpointProxy(s3_server.endpoint)
    try:
        # From here on every S3 client of the run goes through the proxy.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        # Step 2: the reader is mid-stream. Step 5 is logged just before its checkpoint is
        # saved, so that outage meets the save.
        faults = StepFaults({2: lambda: proxy.outage(1.5), 5: lambda: proxy.outage(1.5)})
        out = f"{s3_bucket}/faulty"
        faulty = run(cfg_for(out, dataset), sinks=[faults])
    finally:
        proxy.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert faults.fired == [2, 5]
    # Both outages met real requests (the clients' retries rode them out).
    assert len(proxy.outages) == 2 and min(proxy.outages) > 0, proxy.outages
    assert faulty.losses == straight.losses
    assert (faulty.samples_consumed, faulty.samples_repeated, faulty.samples_skipped) == (
        STEPS * MB,
        0,
        0,
    )


def _first_shard(data: str) -> str:
    fs, root = fsspec.core.url_to_fs(data)
    fs.invalidate_cache()
    shards = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    assert shards and not any(p.endswith(MANIFEST) for p in shards)
    return f"s3://{shards[0]}"


def test_corrupt_shard_skip_policy_is_reported(s3_bucket, dataset) -> None:
    shard = _first_shard(dataset)
    corrupt_object(shard, offset=8, length=4096)
    summary = run(cfg_for(f"{s3_bucket}/skip", dataset, "data.on_bad_shard=skip"))
    assert summary.steps == STEPS
    assert summary.samples_repeated == 0 and summary.samples_skipped == 0
    # The bad row groups' samples were served from good ones, on purpose, and said so.
    assert summary.samples_substituted > 0
    assert summary.samples_consumed == STEPS * MB


def test_corrupt_shard_error_policy_names_it(s3_bucket, dataset) -> None:
    shard = _first_shard(dataset)
    corrupt_object(shard, offset=8, length=4096)
    with pytest.raises(ShardError, match=re.escape(shard.rsplit("/", 1)[-1])):
        run(cfg_for(f"{s3_bucket}/err", dataset, "data.on_bad_shard=error"))


def test_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch, dataset) -> None:
    import trainer.loop as loop

    real = loop.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * torch.nan if calls["n"] == 4 else out  # step 4's loss

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    summary = run(cfg_for(str(tmp_path / "nan"), dataset, "checkpoint.every=0"))
    assert summary.steps == STEPS
    assert summary.samples_guard_skipped == MB
    assert summary.accounting["guard_skipped_steps"] == [4]
    assert summary.samples_repeated == 0 and summary.samples_skipped == 0
