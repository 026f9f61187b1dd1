"""Nothing ignored silently in the data section: data.source follows from data.path (or
data.mix) when it is not set, a path beside an explicit corpus is an error naming both keys,
keys the resolved source does not read warn, and the corpus source honours data.epochs and
data.token_budget as the shard reader does."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from dataloader.config import DataConfig
from dataloader.prepare import prepare
from dataloader.source import CorpusSource
from dataloader.storage import DataExhausted
from trainer.config import ConfigError, load_config
from trainer.loop import run

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"
SMALL = [
    "model.dim=32",
    "model.num_heads=4",
    "model.dense_hidden=64",
    "model.moe.expert_hidden=32",
    "model.max_seq_len=64",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "ops.stdout=false",
    "ops.telemetry=false",
]


def test_data_path_without_data_source_trains_on_that_path(tmp_path) -> None:
    data = str(tmp_path / "json")
    prepare(
        [str(Path(sysconfig.get_paths()["stdlib"]) / "json")],
        data,
        seq_len=32,
        rows_per_group=16,
        progress=False,
    )
    out = tmp_path / "run"
    cfg = load_config(None, [*SMALL, f"data.path={data}", "train.steps=2", f"run.output_dir={out}"])
    assert cfg.data.source == "shards"
    run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # The shard reader's counters, which the corpus source does not have.
    assert records[-1]["data_bytes_read"] > 0 and records[-1]["data_samples"] == 4
    assert "source: shards" in (out / "config.yaml").read_text()


def test_a_path_beside_an_explicit_corpus_source_is_an_error_naming_both_keys() -> None:
    # The tiny preset says data.source: corpus.
    with pytest.raises(
        ConfigError, match=r"data\.path \('s3://b/d'\) is set but data\.source is 'corpus'"
    ):
        load_config(PRESET, ["data.path=s3://b/d"], ignore_sections=("cluster",))
    assert load_config(None, []).data.source == "corpus"
    cfg = load_config(
        PRESET, ["data.path=s3://b/d", "data.source=auto"], ignore_sections=("cluster",)
    )
    assert cfg.data.source == "shards"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["data.shuffle_window=7"],
            r"data\.shuffle_window \(7\) is ignored: data\.source is 'corpus'",
        ),
        (["data.on_bad_shard=skip"], r"data\.on_bad_shard \('skip'\) is ignored"),
        (["data.endpoint_url=http://x"], r"data\.endpoint_url .* is ignored"),
        (
            ["data.path=p", "data.shuffle=false", "data.shuffle_window=3"],
            r"data\.shuffle_window \(3\) is ignored: data\.shuffle is false",
        ),
        (
            ["data.path=p", "data.corpus_max_bytes=10"],
            r"data\.corpus_max_bytes \(10\) is ignored: data\.source is 'shards'",
        ),
        (
            ["data.mix=[{name: a, path: p, weight: 1}]", "data.epochs=2"],
            r"data\.epochs \(2\) is ignored: data\.source is 'mix'",
        ),
    ],
)
def test_keys_the_source_does_not_read_warn(overrides, match) -> None:
    with pytest.warns(UserWarning, match=match):
        load_config(None, overrides)


def test_the_corpus_source_honours_epochs_and_token_budget() -> None:
    def source(**kw) -> CorpusSource:
        cfg = DataConfig(corpus_max_bytes=20_000, **kw)
        return CorpusSource(cfg, seq_len=31, micro_batch_size=4, rank=0, world_size=2, seed=0)

    rows = source().num_rows
    src = source(epochs=1)
    steps = 0
    with pytest.raises(DataExhausted, match=r"data\.epochs=1"):
        while True:
            src.next_batch()
            steps += 1
    assert steps == rows // 8  # whole global batches of 2 ranks x 4 rows within one epoch
    src = source(token_budget=31 * 8 * 3 + 5)
    for _ in range(3):
        src.next_batch()
    with pytest.raises(DataExhausted, match=r"data\.token_budget=749"):
        src.next_batch()
