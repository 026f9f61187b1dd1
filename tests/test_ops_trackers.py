"""The TensorBoard and Weights & Biases sinks (`ops.tensorboard`, `ops.wandb`), read back
with the real packages and no network:

- TensorBoard's own reader (`EventAccumulator`, and the raw summary iterator) finds every
  scalar of `metrics.jsonl` at its step, exactly (as float32, TensorBoard's scalar type), each
  MoE layer's expert-load histogram, and the config text, each step once after a run is
  stopped and resumed from its checkpoint, on a local dir and on S3; a killed writer's cut
  record and a loss-guard rollback's repeated steps leave no trace either;
- a W&B offline run's `.wandb` files (W&B's LevelDB-log framing, its own protobuf records)
  hold the config as the run config and every scalar exactly; the resumed job writes to the
  same run id from the step after its checkpoint; the expert-load heat map is a PNG whose
  cells are the logged loads;
- switching a tracker on without its package is an error naming the key and the package;
  neither package is imported while both are off, and `moeyard report` works without them.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import yaml

from ops.config import OpsConfigError
from ops.sinks import read_metrics
from ops.tb_sink import CONFIG_TAG, TensorBoardSink
from ops.trackers import load_share, scalars
from trainer.config import JobConfig, load_config
from trainer.loop import make_sinks, run

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "infra" / "runs" / "tiny.yaml"
STEPS, CKPT, CRASH = 6, 3, 5  # checkpoint at 3, stopped after logging 4 and 5, resumed


class Crash(Exception):
    pass


class CrashAt:
    """A sink that raises at `step`: the process dies there (after the other sinks logged)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step == self.step:
            raise Crash(step)

    def close(self) -> None:
        pass


def tiny(out: str, *extra: str) -> JobConfig:
    return load_config(
        PRESET,
        [
            f"run.output_dir={out}",
            "parallel.ep=1",
            f"train.steps={STEPS}",
            f"checkpoint.every={CKPT}",
            "checkpoint.async_save=false",
            "ops.stdout=false",
            "ops.telemetry=false",
            "data.corpus_max_bytes=200000",
            *extra,
        ],
        ignore_sections=("cluster",),
    )


def stop_and_resume(cfg: JobConfig) -> None:
    """Runs to CRASH (dying there), then again from the checkpoint at CKPT to the end."""
    with pytest.raises(Crash):
        run(cfg, sinks=[*make_sinks(cfg, 0), CrashAt(CRASH)])
    summary = run(cfg)
    assert summary.steps == STEPS and summary.resumes == 1


def final_records(url: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl's record of each step (as the loop built it: without `step`); a step
    logged again after the resume is the resumed attempt's."""
    return {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_metrics(url)}


def f32(x: float) -> float:
    return float(np.float32(x))


def accumulator(path: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def raw_events(path: Path) -> list[Any]:
    """Every event of every file, in the order TensorBoard reads them (the summary
    iterator: no purge, no dedup)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for f in sorted(p for p in path.iterdir() if "tfevents" in p.name):
        events += list(EventFileLoader(str(f)).Load())
    return events


def check_tensorboard(tb_dir: Path, records: dict[int, dict[str, Any]], config: str) -> None:
    """TensorBoard finds each record's every scalar and histogram at its step, once; the
    config text once per attempt."""
    acc = accumulator(tb_dir)
    tags = acc.Tags()
    expected: dict[str, dict[int, float]] = {}
    for step, r in records.items():
        for tag, v in scalars(r).items():
            expected.setdefault(tag, {})[step] = v
    assert set(tags["scalars"]) == set(expected), set(tags["scalars"]) ^ set(expected)
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == sorted(want), (tag, got)  # each step once, in order
        for step, value in got:
            assert value == f32(want[step]) or (math.isnan(value) and math.isnan(want[step])), (
                tag,
                step,
                value,
                want[step],
            )
    layers = len(records[STEPS]["moe"])
    assert sorted(tags["histograms"]) == [f"moe/layer{i}/expert_load" for i in range(layers)]
    for i in range(layers):
        got = acc.Histograms(f"moe/layer{i}/expert_load")
        assert [h.step for h in got] == sorted(records)
        for h in got:
            tokens = records[h.step]["moe"][i]["tokens"]
            assert list(h.histogram_value.bucket) == tokens
            assert h.histogram_value.num == sum(tokens)
            assert list(h.histogram_value.bucket_limit) == [e + 0.5 for e in range(len(tokens))]
    texts = acc.Tensors(CONFIG_TAG)
    assert [t.step for t in texts] == [1, CKPT + 1]  # the first step of each attempt
    for t in texts:
        assert t.tensor_proto.string_val[0].decode() == f"```yaml\n{config}```"
    # The raw files too: every (tag, step) once, nothing left for a purge to hide.
    seen: dict[tuple[str, int], int] = {}
    for ev in raw_events(tb_dir):
        for v in ev.summary.value:
            seen[(v.tag, ev.step)] = seen.get((v.tag, ev.step), 0) + 1
    assert seen and max(seen.values()) == 1, [k for k, n in seen.items() if n > 1]


# W&B's transaction log (run-ID.wandb): LevelDB's log format behind a 7-byte header.
WANDB_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` file, each chunk's CRC-32 checked."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == WANDB_HEADER, data[:7]
    pos, out, parts = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the rest of a block too small for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, n, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7 : pos + 7 + n]
        assert len(chunk) == n, "a record cut short"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at {pos}"
        pos += 7 + n
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            out.append(parts + chunk)
    return [wandb_internal_pb2.Record.FromString(r) for r in out]


def wandb_attempts(wandb_dir: Path) -> list[tuple[Path, list[Any]]]:
    """Each offline run folder (one per attempt) with its records, oldest first."""
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    return [(r, wandb_records(next(r.glob("run-*.wandb")))) for r in runs]


def history(records: list[Any]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item
            }
            step = row["_step"]
            assert step not in out, f"step {step} twice in one attempt"
            out[step] = row
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, JobConfig]:
    """A run with both trackers on (W&B offline), stopped after step CRASH and resumed from
    the checkpoint at CKPT. The TensorBoard files as the stopped attempt left them are kept
    in `tensorboard-stopped/`. The resumed attempt's sinks are made before the run starts,
    as the Ray launcher makes them: they learn where the run resumed from its steps."""
    out = tmp_path_factory.mktemp("tracked")
    cfg = tiny(
        str(out),
        "ops.tensorboard=true",
        "ops.wandb=true",
        "ops.wandb_mode=offline",
        "ops.wandb_image_every=2",
        "eval.every=0",
    )
    with pytest.raises(Crash):
        run(cfg, sinks=[*make_sinks(cfg, 0), CrashAt(CRASH)])
    fs = fsspec.filesystem("file")
    fs.copy(str(out / "tensorboard"), str(out / "tensorboard-stopped"), recursive=True)
    summary = run(cfg, sinks=make_sinks(cfg, 0))
    assert summary.steps == STEPS and summary.resumes == 1
    return out, cfg


def test_tensorboard_finds_every_scalar_once_after_a_stop_and_resume(tracked_run) -> None:
    out, _cfg = tracked_run
    jsonl = read_metrics(str(out / "metrics.jsonl"))
    # metrics.jsonl holds steps 4 and 5 twice (both attempts); the stopped attempt's
    # TensorBoard files held them too, so the check below can fail.
    assert [r["step"] for r in jsonl] == [1, 2, 3, 4, 5, 4, 5, 6]
    stopped = accumulator(out / "tensorboard-stopped")
    assert [e.step for e in stopped.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert jsonl[3]["step_time_s"] != jsonl[5]["step_time_s"]  # the two step 4s differ
    records = final_records(str(out / "metrics.jsonl"))
    check_tensorboard(out / "tensorboard", records, (out / "config.yaml").read_text())


def test_tensorboard_on_s3_after_a_stop_and_resume(s3_bucket, tmp_path) -> None:
    out = f"{s3_bucket}/run"
    cfg = tiny(out, "ops.tensorboard=true")
    stop_and_resume(cfg)
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    local = tmp_path / "tb"
    local.mkdir()
    for path in fs.ls(f"{root}/tensorboard", detail=False):
        fs.get_file(path, str(local / path.rsplit("/", 1)[-1]))
    assert len(list(local.iterdir())) == 2  # one file per attempt
    with fs.open(f"{root}/config.yaml", "r") as f:
        config = f.read()
    check_tensorboard(local, final_records(f"{out}/metrics.jsonl"), config)


def _record(step: int, tokens: list[int]) -> dict[str, Any]:
    return {
        "loss": 5.0 - step * 0.1,
        "lr": 1e-3,
        "tokens": 256 * step,
        "step_skipped": False,
        "moe": [{"layer": 0, "tokens": tokens, "cv": 0.5, "max_over_mean": 1.5}],
        # Rank 0's record holds every rank's GPU samples.
        "devices": [
            {"rank": 0, "power_w": 400.0 + step, "util_pct": 97.0},
            {"rank": 1, "power_w": 390.0 + step, "util_pct": 95.0},
        ],
        "data_mix": {"code": {"tokens": 100 * step, "share": 0.25}},
        "energy_scope": "gpu",
    }


def test_scalar_tags_name_each_rank_layer_and_dataset() -> None:
    got = scalars(_record(3, [1, 2]))
    assert got == {
        "train/loss": 5.0 - 0.30000000000000004,
        "train/lr": 1e-3,
        "train/tokens": 768.0,
        "train/step_skipped": 0.0,
        "moe/layer0/cv": 0.5,
        "moe/layer0/max_over_mean": 1.5,
        "devices/rank0/power_w": 403.0,
        "devices/rank0/util_pct": 97.0,
        "devices/rank1/power_w": 393.0,
        "devices/rank1/util_pct": 95.0,
        "data_mix/code/tokens": 300.0,
        "data_mix/code/share": 0.25,
    }
    assert scalars({"val_loss": 2.5, "val_ppl": 12.0}) == {"val/val_loss": 2.5, "val/val_ppl": 12.0}


def test_a_killed_writers_cut_record_and_a_rollback_leave_each_step_once(tmp_path) -> None:
    tb = tmp_path / "tb"
    first = TensorBoardSink(str(tb), config_text="a: 1\n")
    for step in range(1, 6):
        first.log(_record(step, [step, 10]), step)
    # Killed mid-write: no close, and half a record at the end of its file.
    (events,) = (p for p in tb.iterdir() if "tfevents" in p.name)
    with events.open("ab") as f:
        f.write(struct.pack("<Q", 500) + b"\x00" * 30)
    # Resumed from the checkpoint at step 3.
    second = TensorBoardSink(str(tb), config_text="a: 2\n")
    for step in range(4, 8):
        second.log(_record(step, [step, 20]), step)
    assert second.dropped == 2  # the first attempt's steps 4 and 5
    # A loss-guard rollback to step 5's checkpoint: 6 and 7 are trained and logged again.
    for step in range(6, 9):
        second.log(_record(step, [step, 30]), step)
    assert second.dropped == 4  # and this attempt's 6 and 7
    second.close()
    acc = accumulator(tb)
    assert [(e.step, e.value) for e in acc.Scalars("devices/rank1/power_w")] == [
        (s, 390.0 + s) for s in range(1, 9)
    ]
    loads = {
        h.step: list(h.histogram_value.bucket) for h in acc.Histograms("moe/layer0/expert_load")
    }
    assert loads == {s: [s, 10 if s < 4 else 20 if s < 6 else 30] for s in range(1, 9)}
    assert [t.step for t in acc.Tensors(CONFIG_TAG)] == [1, 4, 6]
    seen: dict[tuple[str, int], int] = {}
    for ev in raw_events(tb):
        for v in ev.summary.value:
            seen[(v.tag, ev.step)] = seen.get((v.tag, ev.step), 0) + 1
    assert sorted(step for tag, step in seen if tag == "train/loss") == list(range(1, 9))
    assert set(seen.values()) == {1}, [k for k, n in seen.items() if n > 1]


def test_a_remote_dir_gets_rolled_files_and_the_last_events_at_close(s3_bucket, tmp_path) -> None:
    url = f"{s3_bucket}/tb"
    sink = TensorBoardSink(url, config_text="a: 1\n", flush_every_s=0.0, roll_bytes=600)
    for step in range(1, 11):
        sink.log(_record(step, [step, 1]), step)
    sink.close()
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    names = fs.ls(root, detail=False)
    assert len(names) >= 3, names  # rolled at 600 bytes
    for path in names:
        fs.get_file(path, str(tmp_path / path.rsplit("/", 1)[-1]))
    acc = accumulator(tmp_path)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))


def test_wandb_offline_holds_the_config_and_every_scalar_and_resumes_the_same_run(
    tracked_run,
) -> None:
    out, _cfg = tracked_run
    attempts = wandb_attempts(out)
    assert len(attempts) == 2
    run_ids = {r.run.run_id for _, recs in attempts for r in recs if r.HasField("run")}
    assert run_ids == {json.loads((out / "wandb_run.json").read_text())["id"]}
    stopped, resumed = (history(recs) for _, recs in attempts)
    assert sorted(stopped) == [1, 2, 3, 4, 5]
    assert sorted(resumed) == [4, 5, 6]  # from the step after the checkpoint
    # The stopped attempt finished as failed, the resumed one as succeeded.
    exits = [[r.exit.exit_code for r in recs if r.HasField("exit")] for _, recs in attempts]
    assert exits == [[1], [0]]
    records = final_records(str(out / "metrics.jsonl"))
    merged = {**stopped, **resumed}
    for step, r in records.items():
        row = merged[step]
        for tag, v in scalars(r).items():
            assert row[tag] == v, (step, tag, row[tag], v)  # float64, exact
    # The config: the run's resolved config, as config.yaml has it.
    config = yaml.safe_load((out / "config.yaml").read_text())
    for _, recs in attempts:
        (run_rec,) = [r.run for r in recs if r.HasField("run")]
        got = {u.key: json.loads(u.value_json) for u in run_rec.config.update}
        got.pop("_wandb", None)
        assert got == config


def test_wandb_heat_map_cells_are_the_logged_expert_load(tracked_run) -> None:
    from matplotlib import colormaps
    from PIL import Image

    out, _cfg = tracked_run
    records = final_records(str(out / "metrics.jsonl"))
    images = 0
    for run_dir, recs in wandb_attempts(out):
        for step, row in history(recs).items():
            # W&B keeps the image's description as nested keys under its own.
            meta = {
                k.rsplit("/", 1)[1]: v for k, v in row.items() if k.startswith("moe/expert_load/")
            }
            if not meta:
                continue
            images += 1
            assert meta["_type"] == "image-file"
            img = np.asarray(Image.open(run_dir / "files" / meta["path"]).convert("RGB"))
            loads = records[step]["moe"]
            assert img.shape == (16 * len(loads), 16 * len(loads[0]["tokens"]), 3)
            for i, layer in enumerate(loads):
                for e, share in enumerate(load_share(layer["tokens"])):
                    want = np.round(np.asarray(colormaps["viridis"](min(share / 2, 1.0))[:3]) * 255)
                    assert (img[16 * i + 8, 16 * e + 8] == want).all(), (step, i, e)
    # wandb_image_every=2: the 2nd and 4th logged step of the first attempt, the 2nd of
    # the resumed one.
    assert images == 3


@pytest.mark.parametrize(
    ("key", "module", "package"),
    [
        ("ops.tensorboard", "tensorboard", "tensorboard"),
        ("ops.tensorboard", "google_crc32c", "google-crc32c"),
        ("ops.wandb", "wandb", "wandb"),
    ],
)
def test_a_tracker_without_its_package_is_an_error_naming_key_and_package(
    key, module, package, tmp_path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as when absent
    extra = ["ops.wandb_mode=offline"] if key == "ops.wandb" else []
    cfg = tiny(str(tmp_path), f"{key}=true", *extra)
    with pytest.raises(OpsConfigError, match=rf"{key} is true but the package '{package}'"):
        make_sinks(cfg, 0)
    assert not (tmp_path / "wandb_run.json").exists()


def test_online_wandb_without_an_api_key_in_the_environment_is_an_error(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = tiny(str(tmp_path), "ops.wandb=true")
    with pytest.raises(OpsConfigError, match=r"ops\.wandb_mode is 'online' but WANDB_API_KEY"):
        make_sinks(cfg, 0)


def test_wandb_settings_are_ignored_with_a_warning_when_wandb_is_off() -> None:
    with pytest.warns(
        UserWarning, match=r"ops.wandb_project \('x'\) is ignored: ops.wandb is false"
    ):
        tiny("/tmp/unused", "ops.wandb_project=x")
    with pytest.raises(ValueError, match=r"ops.wandb_image_every \(-1\) must be >= 0"):
        tiny("/tmp/unused", "ops.wandb_image_every=-1")


def test_neither_package_is_imported_while_both_are_off_and_report_works_without_them(
    tracked_run, tmp_path
) -> None:
    out, _cfg = tracked_run
    script = f"""
import sys
sys.modules["tensorboard"] = None  # as if not installed
sys.modules["wandb"] = None
from trainer.config import load_config
from trainer.loop import make_sinks
from ops.report import main
cfg = load_config({str(PRESET)!r}, ["run.output_dir={tmp_path}", "ops.stdout=false"],
                  ignore_sections=("cluster",))
for s in make_sinks(cfg, 0):
    s.close()
assert main([{str(out)!r}, "--out", {str(tmp_path / "report")!r}]) == 0
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final loss" in done.stdout.lower(), done.stdout
