"""The tiny preset trains on shards streamed from the local S3 endpoint: the loop reports its
data wait and the reader's counters in metrics.jsonl, and the data cursor advances by the
global batch each step. (How small the wait is goes in bench/README.md, not in an assert.)"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from dataloader.prepare import prepare
from trainer.config import load_config
from trainer.loop import run

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"


def test_tiny_preset_trains_from_s3_shards(tmp_path, s3_bucket) -> None:
    data = f"{s3_bucket}/json-src"
    # Real text: the standard library's json package, byte-tokenized.
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        data,
        seq_len=64,
        rows_per_group=32,
        progress=False,
    )
    out = tmp_path / "run"
    cfg = load_config(
        PRESET,
        [
            "parallel.ep=1",
            "train.steps=6",
            "data.source=shards",
            f"data.path={data}",
            f"run.output_dir={out}",
            "ops.stdout=false",
        ],
    )
    summary = run(cfg)
    assert summary.steps == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert r["data_wait_s"] >= 0 and r["step_time_s"] > 0
        assert r["data_samples"] == r["step"] * cfg.train.micro_batch_size
        assert r["data_bytes_read"] > 0 and r["data_bad_shards"] == 0


def test_token_budget_ends_the_run_cleanly_at_a_whole_batch(tmp_path, s3_bucket) -> None:
    data = f"{s3_bucket}/budget-src"
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        data,
        seq_len=64,
        rows_per_group=32,
        progress=False,
    )
    out = tmp_path / "run"
    tokens_per_step = 4 * 64
    cfg = load_config(
        PRESET,
        [
            "parallel.ep=1",
            "train.steps=50",
            "data.source=shards",
            f"data.path={data}",
            f"data.token_budget={3 * tokens_per_step + 10}",
            f"run.output_dir={out}",
            "ops.stdout=false",
            "checkpoint.every=100",
        ],
    )
    summary = run(cfg)
    # the budget covers 3 whole global batches; the 4th would exceed it
    assert summary.steps == 3 and summary.tokens == 3 * tokens_per_step
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    # the end of data is a checkpoint too, so a later run with more budget continues from it
    assert (out / "checkpoints" / "step-00000003" / ".metadata").exists()
