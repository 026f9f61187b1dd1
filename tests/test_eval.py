"""Validation (`eval.*`, `moeyard prepare --val-fraction`): the held-out split is whole
documents, chosen deterministically; the val set never enters training (the sample ledger
and the rows it names prove it); val_loss is the same at world 1, 2 and 4 for the same
weights; evaluation leaves the router bias and the load counters alone; a resumed run's val
curve continues the uninterrupted one exactly; bad input names its key.

Documents carry a marker, `<D017>`, repeated, so a decoded row names the documents in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dataloader.evalset import EvalSet
from dataloader.prepare import is_val_document, main, prepare
from dataloader.reader import ShardSource
from tests.distributed import run_ranks
from trainer.config import ConfigError, JobConfig, load_config
from trainer.evaluate import EVALUATOR_KEY
from trainer.loop import begin, end, run, setup, train

PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"
NUM_DOCS = 40
FRACTION = 0.25
MARK = re.compile(rb"<D(\d{3})>")

SMALL = [
    "model.dim=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.dense_hidden=64",
    "model.moe.expert_hidden=32",
    "model.moe.bias_update_rate=0.001",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "ops.stdout=false",
    "ops.telemetry=false",
    "data.source=auto",
]


def write_docs(path: Path) -> None:
    with path.open("w") as f:
        for i in range(NUM_DOCS):
            body = (f"<D{i:03d}> " * (6 + i % 5)) + f"def f{i}(x):\n    return x * {i}\n"
            f.write(json.dumps({"text": body}) + "\n")


def docs_in(rows: np.ndarray | torch.Tensor) -> set[int]:
    found: set[int] = set()
    for row in np.asarray(rows):
        data = bytes(int(t) for t in row if int(t) < 256)  # byte ids; 256 ends a document
        found |= {int(m) for m in MARK.findall(data)}
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("evaldata")
    write_docs(root / "docs.jsonl")
    out = str(root / "ds")
    prepare(
        [str(root / "docs.jsonl")],
        out,
        seq_len=32,
        rows_per_group=16,
        progress=False,
        val_fraction=FRACTION,
    )
    return out


def cfg_for(data: str, out: str, *extra: str) -> JobConfig:
    return load_config(
        PRESET,
        [*SMALL, f"data.path={data}", f"run.output_dir={out}", *extra],
        ignore_sections=("cluster",),
    )


def test_prepare_holds_out_whole_documents_deterministically(data, tmp_path, capsys) -> None:
    val_docs = {i for i in range(NUM_DOCS) if is_val_document(i, FRACTION)}
    assert len(val_docs) == int(NUM_DOCS * FRACTION) == 10
    train = ShardSource(
        load_config(None, [f"data.path={data}"]).data,
        seq_len=32,
        micro_batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
        prefetch=False,
    )
    val = ShardSource(
        load_config(None, [f"data.path={data}/val"]).data,
        seq_len=32,
        micro_batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
        prefetch=False,
    )
    in_train = docs_in(train.read_samples(np.arange(train.order.num_rows)))
    in_val = docs_in(val.read_samples(np.arange(val.order.num_rows)))
    train.close()
    val.close()
    assert in_val <= val_docs and len(in_val) >= len(val_docs) - 1  # a last partial row drops
    assert in_train.isdisjoint(val_docs) and len(in_train) >= NUM_DOCS - len(val_docs) - 1
    # The same command again gives the same datasets, byte for byte (the manifests agree).
    src = str(Path(data).parent / "docs.jsonl")
    assert (
        main(
            [
                src,
                "--out",
                str(tmp_path / "again"),
                "--seq-len",
                "32",
                "--rows-per-group",
                "16",
                "--val-fraction",
                str(FRACTION),
                "--quiet",
            ]
        )
        == 0
    )
    assert "held out" in capsys.readouterr().out
    for sub in ("manifest.json", "val/manifest.json"):
        a = json.loads((Path(data) / sub).read_text())
        b = json.loads((tmp_path / "again" / sub).read_text())
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert main([src, "--out", str(tmp_path / "bad"), "--val-fraction", "1.5", "--quiet"]) == 2
    assert "--val-fraction (1.5) must be in [0, 1)" in capsys.readouterr().err


def test_the_val_set_never_enters_training_the_ledger_proves_it(data, tmp_path) -> None:
    cfg = cfg_for(
        data,
        str(tmp_path / "run"),
        "train.steps=40",
        "eval.every=20",
        "eval.steps=2",
        "eval.batch_size=4",
        "parallel.ep=1",
    )
    state = setup(cfg)
    session = begin(state, local_rank=0, sinks=[], on_checkpoint=None, placement=None)
    try:
        train(state, session)
    finally:
        end(state, session)
    ledger = state.source.ledger
    # 40 steps x 2 rows = 80 samples > the training rows: the epoch wraps, still no val row.
    assert ledger.intervals == [[0, 80]] and ledger.repeated == 0
    ids = np.concatenate([np.arange(a, b) for a, b in ledger.intervals])
    reader = ShardSource(
        cfg.data,
        seq_len=32,
        micro_batch_size=1,
        rank=0,
        world_size=1,
        seed=cfg.train.seed,
        prefetch=False,
    )
    trained = docs_in(reader.read_samples(ids))
    reader.close()
    val_docs = {i for i in range(NUM_DOCS) if is_val_document(i, FRACTION)}
    assert trained and trained.isdisjoint(val_docs)
    evaluated = docs_in(torch.cat(state.extra[EVALUATOR_KEY].evalset.batches))
    assert evaluated and evaluated <= val_docs


def _val_at(rank: int, world: int, data: str, out: str, ep: int) -> dict[str, Any]:
    cfg = cfg_for(
        data, out, f"parallel.ep={ep}", "eval.every=1", "eval.steps=3", "eval.batch_size=6"
    )
    state = setup(cfg)
    ev = state.extra[EVALUATOR_KEY]
    bias = [m.router.expert_bias.clone() for m in state.model.moe_layers()]
    for m in state.model.moe_layers():
        m.routed_E.fill_(3.0)  # load counted by a training step, not yet used by the bias
    first = ev.evaluate(state.model)
    second = ev.evaluate(state.model)
    same_bias = all(
        torch.equal(b, m.router.expert_bias)
        for b, m in zip(bias, state.model.moe_layers(), strict=True)
    )
    counters = all(bool((m.routed_E == 3.0).all()) for m in state.model.moe_layers())
    state.source.close()
    return {
        "first": first,
        "second": second,
        "bias": same_bias,
        "counters": counters,
        "training": state.model.training,
    }


@pytest.mark.slow
def test_val_loss_is_the_same_at_world_1_2_and_4(data, tmp_path) -> None:
    one = _val_at(0, 1, data, str(tmp_path / "w1"), 1)  # one process, no process group
    two = run_ranks(_val_at, 2, data, str(tmp_path / "w2"), 2)
    four = run_ranks(_val_at, 4, data, str(tmp_path / "w4"), 4)
    ref = one["first"]
    # 6 rows a batch: 3 + 3 rows on 2 ranks, 2 + 2 + 1 + 1 on 4 (uneven parts).
    assert ref["val_tokens"] == 3 * 6 * 32
    assert ref["val_ppl"] == pytest.approx(np.exp(ref["val_loss"]))
    assert 4.0 < ref["val_loss"] < 7.0  # an untrained model on a 257-token vocabulary: ~ln 320
    for r in [one, *two, *four]:
        assert r["first"]["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5, abs=1e-6)
        assert r["first"]["val_tokens"] == ref["val_tokens"]
        assert r["second"] == r["first"]  # the same fixed batches every time
        assert r["bias"] and r["counters"] and r["training"]


class Crash(Exception):
    pass


class Record:
    """A sink that keeps the records (and crashes at `crash_at`, a process dying)."""

    def __init__(self, crash_at: int = 0) -> None:
        self.records: list[dict[str, Any]] = []
        self.crash_at = crash_at

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.records.append({"step": step, **metrics})
        if step == self.crash_at:
            raise Crash(step)

    def close(self) -> None:
        pass


def val_curve(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def test_a_resumed_runs_val_curve_continues_the_uninterrupted_one(data, tmp_path) -> None:
    common = (
        "parallel.ep=1",
        "train.steps=8",
        "eval.every=2",
        "eval.steps=2",
        "eval.batch_size=4",
        "checkpoint.every=4",
        "checkpoint.async_save=false",
        "run.log_every=4",
    )
    straight = Record()
    run(cfg_for(data, str(tmp_path / "a"), *common), sinks=[straight])
    curve = val_curve(straight.records)
    # Evaluation steps are logged even off the log_every grid.
    assert sorted(curve) == [2, 4, 6, 8] and curve[8] < curve[2]
    assert all(r["val_time_s"] >= 0 for r in straight.records if "val_loss" in r)
    crashed = Record(crash_at=6)
    with pytest.raises(Crash):
        run(cfg_for(data, str(tmp_path / "b"), *common), sinks=[crashed])
    resumed = Record()
    run(cfg_for(data, str(tmp_path / "b"), *common), sinks=[resumed])
    assert val_curve(crashed.records) == {k: curve[k] for k in (2, 4, 6)}
    assert val_curve(resumed.records) == {6: curve[6], 8: curve[8]}  # bit-identical


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["eval.every=-1"], r"eval\.every \(-1\) must be >= 0"),
        (["eval.steps=0"], r"eval\.steps \(0\) must be >= 1"),
        (["eval.batch_size=0"], r"eval\.batch_size \(0\) must be >= 1"),
        (["eval.every=5"], r"eval\.every \(5\) needs eval\.path"),
        (["eval.evry=5"], r"evry"),
    ],
)
def test_bad_eval_settings_are_errors_naming_the_key(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_an_eval_set_too_small_or_split_too_thin_is_an_error(data, tmp_path) -> None:
    with pytest.raises(
        ConfigError, match=r"eval\.steps \(500\) x eval\.batch_size \(8\) needs 4000"
    ):
        setup(cfg_for(data, str(tmp_path / "r"), "parallel.ep=1", "eval.every=1", "eval.steps=500"))
    with pytest.raises(ConfigError, match=r"no manifest\.json at eval\.path .*nowhere"):
        setup(
            cfg_for(
                data,
                str(tmp_path / "r"),
                "parallel.ep=1",
                "eval.every=1",
                f"eval.path={tmp_path / 'nowhere'}",
            )
        )
    with pytest.raises(
        ValueError,
        match=r"eval\.batch_size \(2\) must be at least the number of "
        r"ranks \(4\)",
    ):
        EvalSet(
            load_config(None, []).data,
            path=f"{data}/val",
            steps=1,
            batch_size=2,
            seq_len=32,
            rank=0,
            world_size=4,
        )
    with pytest.warns(UserWarning, match=r"eval\.path .* is ignored: eval\.every is 0"):
        load_config(None, ["eval.path=somewhere"])
    with pytest.warns(UserWarning, match=r"eval\.steps \(3\) is ignored: eval\.every is 0"):
        load_config(None, ["eval.steps=3"])
