"""Data mixtures (`data.mix`): the blended order's proportions, exact resume at the same and at
another world size, per-dataset exhaustion, the metrics, and bad input.

Datasets are synthetic rows whose first token is (dataset + 1) * 10_000 + row id, so every
sample a source returns names its dataset and its row; the rest of the row checks it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataloader.config import DataConfig, MixEntry
from dataloader.format import write_dataset
from dataloader.mix import MixOrder, MixSource
from dataloader.storage import DataExhausted
from trainer.config import ConfigError, load_config

TOKENIZER = {"kind": "test", "name": "ids", "vocab_size": 40_000, "eod_id": 0}
ROW_LEN = 9
SIZES = {"web": 120, "code": 40, "math": 17}
WEIGHTS = {"web": 0.7, "code": 0.2, "math": 0.1}
PRESET = Path(__file__).resolve().parents[1] / "infra" / "runs" / "tiny.yaml"


def rows_for(d: int, n: int) -> np.ndarray:
    rows = (np.arange(n)[:, None] * 3 + np.arange(ROW_LEN)[None, :] + d) % 997 + 100
    rows[:, 0] = (d + 1) * 10_000 + np.arange(n)
    return rows.astype(np.int32)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for d, (name, n) in enumerate(SIZES.items()):
        rows = rows_for(d, n)
        url = str(root / name)
        write_dataset(url, rows, tokenizer=TOKENIZER, rows_per_group=8, rows_per_shard=32)
        out[name] = (url, rows)
    return out


def mix_cfg(datasets, *, epochs: dict[str, int] | None = None, **kw) -> DataConfig:
    entries = [
        MixEntry(name=n, path=datasets[n][0], weight=WEIGHTS[n], epochs=(epochs or {}).get(n, 0))
        for n in SIZES
    ]
    return DataConfig(mix=entries, shuffle_window=16, **kw)


def sources(cfg: DataConfig, world: int, micro: int, seed: int = 5) -> list[MixSource]:
    return [
        MixSource(
            cfg, seq_len=ROW_LEN - 1, micro_batch_size=micro, rank=r, world_size=world, seed=seed
        )
        for r in range(world)
    ]


def take(srcs: list[MixSource], steps: int, datasets) -> list[tuple[int, int]]:
    """(dataset, row id) of every global sample of `steps` steps, in global order; each row
    checked against its dataset."""
    names = list(SIZES)
    out = []
    for _ in range(steps):
        batch = np.concatenate([s.next_batch().numpy() for s in srcs])
        for row in batch:
            d, i = int(row[0]) // 10_000 - 1, int(row[0]) % 10_000
            np.testing.assert_array_equal(row, datasets[names[d]][1][i])
            out.append((d, i))
    return out


def close(srcs: list[MixSource]) -> None:
    for s in srcs:
        s.close()


def test_order_is_a_bijection_and_holds_the_weights_over_any_1000_samples() -> None:
    w = np.array([0.7, 0.2, 0.1])
    order = MixOrder(list(w))
    g = np.arange(50_000)
    ds, local = order.locate(g)
    for d in range(3):
        # Each dataset's samples are its indices 0, 1, 2, ... in order: nothing skipped or twice.
        np.testing.assert_array_equal(local[ds == d], np.arange(int((ds == d).sum())))
        for k in (0, 7, 1234):
            assert order.global_index(d, k) == int(np.flatnonzero((ds == d) & (local == k))[0])
    worst = 0.0
    for start in range(0, 49_000, 97):
        share = np.bincount(ds[start : start + 1000], minlength=3) / 1000
        worst = max(worst, float(np.abs(share - w).max()))
    assert worst <= 0.02, worst
    # A pure function of the index: another instance, asked out of order, agrees.
    pick = np.array([40_001, 3, 977, 12_345])
    ds2, local2 = MixOrder(list(w)).locate(pick)
    np.testing.assert_array_equal(ds2, ds[pick])
    np.testing.assert_array_equal(local2, local[pick])
    np.testing.assert_array_equal(
        order.counts_before(31_337), np.bincount(ds[:31_337], minlength=3)
    )


def test_world_sizes_see_the_same_global_order(datasets) -> None:
    cfg = mix_cfg(datasets)
    got = {}
    for world, micro in ((1, 4), (2, 2), (4, 1)):
        srcs = sources(cfg, world, micro)
        got[world] = take(srcs, 30, datasets)
        close(srcs)
    assert got[1] == got[2] == got[4]
    counts = np.bincount([d for d, _ in got[1]], minlength=3) / len(got[1])
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.02)


@pytest.mark.parametrize(("world_a", "world_b"), [(2, 2), (2, 4), (4, 1)])
def test_resume_at_the_same_or_another_world_size_counts_every_sample_once(
    datasets, world_a, world_b
) -> None:
    cfg = mix_cfg(datasets)
    ref = sources(cfg, 1, 4)
    expected = take(ref, 40, datasets)  # 160 samples: math (17 rows) wraps into epoch 1
    close(ref)
    a = sources(cfg, world_a, 4 // world_a)
    first = take(a, 15, datasets)
    state = a[0].state_dict()
    assert all(s.state_dict() == state for s in a)  # every rank holds the same cursor
    close(a)
    b = sources(cfg, world_b, 4 // world_b)
    for s in b:
        s.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    rest = take(b, 25, datasets)
    close(b)
    assert first + rest == expected
    # Every (dataset, sample index) exactly once: each dataset's samples are its global
    # indices 0..n-1, which map onto its rows epoch by epoch.
    src = sources(cfg, 1, 1)[0]
    names, local = src.samples_of(np.arange(160))
    # A ledger with a gap (samples 50..69 passed over) names each dataset's own ranges.
    ranges = src.dataset_ranges([[0, 50], [70, 160]])
    src.close()
    for name in SIZES:
        picked = local[np.isin(np.arange(160), np.r_[0:50, 70:160]) & (np.array(names) == name)]
        flat = np.concatenate([np.arange(a, b) for a, b in ranges[name]])
        np.testing.assert_array_equal(flat, picked)
    for d, name in enumerate(SIZES):
        mine = np.flatnonzero(np.array(names) == name)
        np.testing.assert_array_equal(local[mine], np.arange(len(mine)))
        rows = [i for dd, i in expected if dd == d]
        n = SIZES[name]
        for e in range(len(rows) // n):  # every whole epoch covers every row once
            assert sorted(rows[e * n : (e + 1) * n]) == list(range(n))


def test_a_small_dataset_repeats_or_ends_the_run_as_documented(datasets) -> None:
    # epochs 0: math (17 rows at 10 %) repeats, each pass in a new order, its epoch counted.
    src = sources(mix_cfg(datasets), 1, 10)[0]
    got = take([src], 50, datasets)
    m = src.metrics()["data_mix"]
    math_rows = [i for d, i in got if d == 2]
    assert m["math"]["samples"] == len(math_rows) == 50 and m["math"]["epoch"] == 50 // 17
    assert m["math"]["tokens"] == 50 * (ROW_LEN - 1)
    assert math_rows[:17] != math_rows[17:34]  # reshuffled
    assert sorted(math_rows[17:34]) == list(range(17))
    assert abs(m["web"]["share"] - 0.7) <= 0.02 and m["web"]["weight"] == pytest.approx(0.7)
    src.close()
    # epochs 1: the run ends at the first step that would need math's 18th sample.
    src = sources(mix_cfg(datasets, epochs={"math": 1}), 1, 10)[0]
    limit = src.order.global_index(2, 17)
    assert src.limit == limit
    served = 0
    with pytest.raises(DataExhausted, match=r"data\.mix\[2\]\.epochs=1"):
        while True:
            src.next_batch()
            served += 10
    assert served == limit // 10 * 10 and served + 10 > limit
    src.close()


def test_a_missing_dataset_is_an_error_naming_its_entry(datasets, tmp_path) -> None:
    cfg = mix_cfg(datasets)
    cfg.mix[1].path = str(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"no manifest\.json at data\.mix\[1\]\.path .*gone"):
        sources(cfg, 1, 2)


def test_resume_with_other_weights_is_an_error_naming_data_mix(datasets) -> None:
    a = sources(mix_cfg(datasets), 1, 2)[0]
    a.next_batch()
    state = a.state_dict()
    a.close()
    other = mix_cfg(datasets)
    other.mix[0].weight = 0.6
    b = sources(other, 1, 2)[0]
    with pytest.raises(ValueError, match=r"data\.mix .* differs from the mixture"):
        b.load_state_dict(state)
    b.close()


def test_the_loop_trains_on_a_mixture_and_reports_tokens_per_dataset(datasets, tmp_path) -> None:
    # The tiny preset pins data.source=corpus; the mixture needs it unset (auto) or "mix".
    mix = ",".join(
        f"{{name: {n}, path: '{datasets[n][0]}', weight: {WEIGHTS[n]}}}" for n in ("web", "code")
    )
    out = tmp_path / "run"
    from trainer.loop import run

    cfg = load_config(
        PRESET,
        [
            "data.source=auto",
            f"data.mix=[{mix}]",
            "model.vocab_size=40000",
            "parallel.ep=1",
            "train.steps=3",
            "train.seq_len=8",
            "train.micro_batch_size=8",
            f"run.output_dir={out}",
            "ops.stdout=false",
            "ops.telemetry=false",
        ],
        ignore_sections=("cluster",),
    )
    assert cfg.data.source == "mix"
    run(cfg)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["data_mix"]
    total = last["web"]["samples"] + last["code"]["samples"]
    assert total == 3 * 8 == records[-1]["data_samples"]
    assert last["web"]["tokens"] == last["web"]["samples"] * 8
    assert last["web"]["samples"] / total == pytest.approx(0.7 / 0.9, abs=0.05)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.mix=[{name: a, path: x, weight: 0}]"], r"data\.mix\[0\]\.weight \(0\.0\)"),
        (["data.mix=[{name: a, path: x, weight: -1}]"], r"data\.mix\[0\]\.weight"),
        (["data.mix=[{name: a, path: x, weight: .nan}]"], r"data\.mix\[0\]\.weight"),
        (["data.mix=[{path: x, weight: 1}]"], r"data\.mix\[0\]\.name must be set"),
        (["data.mix=[{name: a, weight: 1}]"], r"data\.mix\[0\]\.path must be set"),
        (
            ["data.mix=[{name: a, path: x, weight: 1},{name: a, path: y, weight: 1}]"],
            r"data\.mix\[1\]\.name \('a'\) is used twice",
        ),
        (
            ["data.mix=[{name: a, path: x, weight: 1, epochs: -1}]"],
            r"data\.mix\[0\]\.epochs \(-1\)",
        ),
        (["data.mix=[{name: a, path: x, weight: 1}]", "data.path=y"], r"data\.path .* data\.mix"),
        (
            ["data.source=shards", "data.mix=[{name: a, path: x, weight: 1}]", "data.path=y"],
            r"data\.mix",
        ),
        (["data.source=mix"], r"data\.mix must list at least one dataset"),
        (["data.mix=[{name: a, path: x, wieght: 1}]"], r"wieght"),
    ],
)
def test_bad_mix_settings_are_errors_naming_the_key(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def _mix_run(rank: int, world: int, overrides: list[str]) -> dict[str, Any]:
    from trainer.loop import run

    cfg = load_config(PRESET, overrides, ignore_sections=("cluster",))
    s = run(cfg)
    return {"steps": s.steps, "accounting": s.accounting}


@pytest.mark.slow
def test_a_mixed_run_resumed_at_another_world_size_reads_every_sample_once(
    datasets, tmp_path
) -> None:
    from tests.distributed import run_ranks

    mix = ", ".join(f"{{name: {n}, path: '{datasets[n][0]}', weight: {WEIGHTS[n]}}}" for n in SIZES)
    out = tmp_path / "run"
    common = [
        "data.source=auto",
        f"data.mix=[{mix}]",
        "model.vocab_size=40000",
        "model.dim=32",
        "model.dense_hidden=64",
        "model.moe.expert_hidden=32",
        "parallel.ep=1",
        "train.seq_len=8",
        "train.micro_batch_size=4",
        "checkpoint.every=3",
        "checkpoint.async_save=false",
        f"run.output_dir={out}",
        "ops.stdout=false",
        "ops.telemetry=false",
    ]
    # 2 ranks x 4 rows for 3 steps, then 1 rank x 4 rows to step 9 (the global batch halves).
    first = run_ranks(_mix_run, 2, [*common, "train.steps=3"])
    assert first[0]["steps"] == 3
    resumed = _mix_run(0, 1, [*common, "train.steps=9"])
    acc = resumed["accounting"]
    assert acc["samples_repeated"] == 0 and acc["samples_skipped"] == 0
    assert acc["samples_end"] == 3 * 8 + 6 * 4 and acc["resumed_at_steps"] == [3]
    # Each sample of the ledger's range names its dataset and that dataset's own index:
    # every dataset's indices 0..n-1 once (math, 17 rows, starts its second epoch).
    cfg = load_config(PRESET, [*common, "train.steps=9"], ignore_sections=("cluster",))
    src = MixSource(cfg.data, seq_len=8, micro_batch_size=1, rank=0, world_size=1, seed=0)
    names, local = src.samples_of(np.arange(acc["samples_end"]))
    src.close()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ranges = src.dataset_ranges([[0, acc["samples_end"]]])
    for name in SIZES:
        mine = local[np.array(names) == name]
        np.testing.assert_array_equal(mine, np.arange(len(mine)))
        assert records[-1]["data_mix"][name]["samples"] == len(mine)
        assert ranges[name] == [[0, len(mine)]]
