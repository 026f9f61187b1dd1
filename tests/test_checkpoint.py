"""Checkpoints on a real S3 endpoint: exact resume, resharding across expert-parallel
layouts, crashes during a save, retention, export, and bad input.

Runs use the tiny preset shrunk further so that 30 steps take a second or two; the router's
auxiliary-loss-free bias is switched on so that its round trip is part of "exact".
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ops.sinks import read_metrics
from tests.distributed import run_ranks
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    consolidated_model_state,
    load_into,
    read_latest,
    read_metadata,
    read_objects,
    scan,
    step_url,
)
from trainer.config import JobConfig, load_config
from trainer.loop import run, setup

ROOT = Path(__file__).resolve().parents[1]
PRESET = str(ROOT / "infra" / "runs" / "tiny.yaml")

SMALL = [
    "model.dim=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.dense_hidden=64",
    "model.moe.expert_hidden=32",
    "model.moe.bias_update_rate=0.001",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    "data.corpus_max_bytes=60000",
    "ops.stdout=false",
    "ops.telemetry=false",
]


def small_cfg(out: str, *overrides: str) -> JobConfig:
    return load_config(
        PRESET,
        [*SMALL, f"run.output_dir={out}", *overrides],
        ignore_sections=("cluster",),
    )


class Stop(Exception):
    """Raised by a checkpoint hook to stop a run right after a checkpoint (a 'crash')."""


def stop_at(step: int):
    def hook(url: str, s: int, metrics: dict[str, Any]) -> None:
        if s == step:
            raise Stop(url)

    return hook


def split_run(out: str, *overrides: str, stop: int = 15) -> list[float]:
    """Trains to `stop`, dies after its checkpoint, then resumes to the end; returns the
    losses the resumed run logged."""
    with pytest.raises(Stop):
        run(small_cfg(out, *overrides), on_checkpoint=stop_at(stop))
    return run(small_cfg(out, *overrides)).losses


# --- exact resume --------------------------------------------------------------------


def test_exact_resume_one_process(s3_bucket: str) -> None:
    common = ("parallel.ep=1", "train.steps=30")
    straight = run(small_cfg(f"{s3_bucket}/straight", *common)).losses
    resumed = split_run(
        f"{s3_bucket}/split", *common, "checkpoint.every=5", "checkpoint.async_save=false"
    )
    assert len(straight) == 30 and len(resumed) == 15
    assert resumed == straight[15:]  # bit-identical, step 16 on
    # metrics.jsonl got the first attempt's steps, then the resumed ones appended.
    records = read_metrics(f"{s3_bucket}/split/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["loss"] for r in records[15:]] == straight[15:]
    assert read_latest(f"{s3_bucket}/split")["step"] == 30


def _exact_resume_ranks(rank: int, world: int, root: str) -> tuple[list[float], list[float]]:
    common = ("parallel.ep=2", "train.steps=30")
    straight = run(small_cfg(f"{root}/straight", *common)).losses
    resumed = split_run(
        f"{root}/split", *common, "checkpoint.every=5", "checkpoint.async_save=true"
    )
    return straight, resumed


def test_exact_resume_two_ranks_async(s3_bucket: str) -> None:
    results = run_ranks(_exact_resume_ranks, 2, s3_bucket)
    for straight, resumed in results:
        assert len(resumed) == 15
        assert resumed == straight[15:]
    # The async hook raised at step 15 in the background; the loop went on to step 20,
    # where it waited for that save and stopped. The resume still started at 15.
    assert scan(f"{s3_bucket}/split").complete[-1] == 30


# --- resharding ----------------------------------------------------------------------


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _slice_of(t: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that this rank's (possibly sharded) `t` holds."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def _reshard_ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    # 1 -> 4: the EP=1 checkpoint loads at DP=2 x EP=2, each rank taking its experts.
    cfg = small_cfg(f"{root}/ep1", "parallel.ep=2", "checkpoint.every=4", "train.steps=5")
    state = setup(cfg)
    ckpt = Checkpointer(cfg.checkpoint, cfg.run.output_dir, state.mesh)
    url = step_url(cfg.run.output_dir, 4)
    assert ckpt.resume(state) == 4
    full = consolidated_model_state(url)
    mine = state.model.state_dict()
    # Under FSDP each rank holds a shard of every tensor: it must equal that slice.
    loaded_ok = all(torch.equal(_local(mine[k]), _slice_of(mine[k], full[k])) for k in mine)
    held = sorted(k for k in mine if ".experts." in k)
    # 4 -> 1: train at DP=2 x EP=2 and save at step 4 (and 6).
    out = f"{root}/ep2"
    summary = run(small_cfg(out, "parallel.ep=2", "checkpoint.every=4", "train.steps=6"))
    return {"loaded_ok": loaded_ok, "held": held, "losses": summary.losses}


def test_reshard_between_ep1_and_dp2_ep2(s3_bucket: str) -> None:
    # An EP=1 run to step 4 in one process, for the 4 ranks to load.
    run(small_cfg(f"{s3_bucket}/ep1", "parallel.ep=1", "checkpoint.every=4", "train.steps=4"))
    results = run_ranks(_reshard_ranks, 4, s3_bucket)
    assert all(r["loaded_ok"] for r in results)
    # Each EP rank held (and loaded) a disjoint half of the experts; dp replicas the same.
    assert not set(results[0]["held"]) & set(results[1]["held"])
    assert results[0]["held"] == results[2]["held"] and results[1]["held"] == results[3]["held"]

    url = step_url(f"{s3_bucket}/ep2", 4)
    md = read_metadata(url)
    keys = md.state_dict_metadata
    for layer in (0, 1):
        for w in ("w1", "w2", "w3"):
            for e in range(8):
                assert f"model.layers.{layer}.ffn.experts.{e}.{w}" in keys
            assert f"model.layers.{layer}.ffn.experts.8.{w}" not in keys
    # Each item written once: FSDP shards every tensor over the ranks that hold it (dense
    # over 4, each expert over 2), and the shard files hold exactly the bytes .metadata
    # points at, one record per (key, chunk), every key's chunks together the whole tensor.
    records = md.storage_data
    assert {i.fqn for i in records} == set(keys)
    chunks = [(i.fqn, tuple(i.offset or ())) for i in records]
    assert len(chunks) == len(set(chunks))
    for k, m in keys.items():
        if isinstance(m, TensorStorageMetadata):
            assert sum(c.sizes.numel() for c in m.chunks) == m.size.numel(), k
    fs, path = fsspec.core.url_to_fs(url)
    shards = [p for p in fs.ls(path, detail=False) if p.endswith(".distcp")]
    assert 2 <= len(shards) <= 4  # the ranks shared the writing
    assert sum(fs.size(p) for p in shards) == sum(r.length for r in records.values())

    # Load at EP=1: the model equals the consolidated shards, the optimizer moments of each
    # expert equal the saved ones, and more steps match the 4-rank run's steps 5 and 6.
    # One rank reading 8 rows per step takes the same global batch as 4 ranks reading 2.
    cfg = small_cfg(
        f"{s3_bucket}/ep2",
        "parallel.ep=1",
        "checkpoint.load_step=4",
        "train.steps=6",
        "train.micro_batch_size=8",
    )
    state = setup(cfg)
    assert load_into(state, url) == 4
    full = consolidated_model_state(url)
    live = state.model.state_dict()
    assert set(live) == set(full)
    assert all(torch.equal(live[k], full[k]) for k in full)
    opt_keys = [k for k in keys if k.startswith("optim.layers.1.ffn.experts.")]
    saved = read_objects_tensors(url, opt_keys)
    experts = state.model.layers[1].ffn.experts
    moments = state.optimizer.state[experts.w13]
    F = experts.hidden
    for e in range(8):
        for w, half in (("w1", slice(None, F)), ("w3", slice(F, None))):
            for m in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(
                    moments[m][e][..., half], saved[f"optim.layers.1.ffn.experts.{e}.{w}.{m}"]
                )
    # Step 5 updates the loaded weights with the loaded moments; step 6's loss sees it.
    ep2_losses = results[0]["losses"]
    ep1_losses = run(cfg).losses
    assert len(ep1_losses) == 2
    assert ep1_losses == pytest.approx(ep2_losses[4:], rel=1e-5)


def read_objects_tensors(url: str, keys: list[str]) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    md = read_metadata(url).state_dict_metadata
    sd = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    dcp.load(sd, storage_reader=FsspecReader(url), no_dist=True)
    return sd


# --- crashes, retention, bad input ---------------------------------------------------

_CRASH = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch.distributed.checkpoint.filesystem as fsmod
from tests.test_checkpoint import small_cfg
from trainer.loop import run

real_finish = fsmod._FileSystemWriter.finish
def finish(self, metadata, results):
    # The shards of the second checkpoint are written; die before its .metadata is.
    if "step-00000010" in str(self.path):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_finish(self, metadata, results)
fsmod._FileSystemWriter.finish = finish
run(small_cfg({out!r}, "parallel.ep=1", "train.steps=12", "checkpoint.every=5",
              "checkpoint.async_save=true"))
"""


def test_crash_during_save_resumes_from_previous(s3_bucket: str, capsys) -> None:
    out = f"{s3_bucket}/crash"
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH.format(root=str(ROOT), out=out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    listing = scan(out)
    assert listing.complete == [5] and listing.partial == [10]
    fs, path = fsspec.core.url_to_fs(step_url(out, 10))
    assert any(p.endswith(".distcp") for p in fs.ls(path, detail=False))  # shards were there

    summary = run(small_cfg(out, "parallel.ep=1", "train.steps=12", "checkpoint.every=5"))
    said = capsys.readouterr().out
    assert "ignoring incomplete checkpoint" in said and "step-00000010" in said
    assert f"resumed from {step_url(out, 5)}" in said
    assert len(summary.losses) == 7  # steps 6..12
    assert scan(out).complete == [5, 10, 12] and scan(out).partial == []
    straight = run(small_cfg(f"{s3_bucket}/straight", "parallel.ep=1", "train.steps=12")).losses
    assert summary.losses == straight[5:]


def test_retention_keeps_what_config_says(s3_bucket: str) -> None:
    out = f"{s3_bucket}/keep"
    run(
        small_cfg(
            out,
            "parallel.ep=1",
            "train.steps=11",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            "checkpoint.keep_every=4",
        )
    )
    listing = scan(out)
    assert listing.complete == [4, 8, 10, 11] and listing.partial == []
    fs, root = fsspec.core.url_to_fs(f"{out}/checkpoints")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    assert names == ["latest", "step-00000004", "step-00000008", "step-00000010", "step-00000011"]


def test_load_step_and_objects_round_trip(s3_bucket: str) -> None:
    out = f"{s3_bucket}/objs"
    cfg = small_cfg(out, "parallel.ep=1", "train.steps=6", "checkpoint.every=3")
    run(cfg)
    objs = read_objects(step_url(out, 3), ["meta.progress", "meta.data", "meta.config"])
    assert objs["meta.progress"]["step"] == 3
    assert objs["meta.data"]["cursor"] == 3 * cfg.train.micro_batch_size
    assert "bias_update_rate: 0.001" in objs["meta.config"]
    state = setup(small_cfg(out, "parallel.ep=1", "checkpoint.load_step=3"))
    ck = Checkpointer(state.cfg.checkpoint, out, state.mesh)
    assert ck.resume(state) == 3
    assert state.source.state_dict()["cursor"] == 3 * cfg.train.micro_batch_size
    assert state.scheduler.last_epoch == 3
    bias = state.model.layers[0].ffn.router.expert_bias
    assert bias.abs().sum() > 0  # the router bias came back, not the zero init
    bad = setup(small_cfg(out, "parallel.ep=1", "checkpoint.load_step=4"))
    with pytest.raises(CheckpointError, match=r"checkpoint.load_step \(4\) is not a complete"):
        Checkpointer(bad.cfg.checkpoint, out, bad.mesh).resume(bad)


def test_checkpoint_of_another_model_shape_names_keys(s3_bucket: str) -> None:
    out = f"{s3_bucket}/shape"
    run(small_cfg(out, "parallel.ep=1", "train.steps=2", "checkpoint.every=2"))
    with pytest.raises(CheckpointError) as err:
        run(small_cfg(out, "parallel.ep=1", "train.steps=4", "model.moe.expert_hidden=48"))
    msg = str(err.value)
    assert "does not match the model" in msg
    assert "layers.0.ffn.experts.0.w1 (checkpoint (32, 32), model (32, 48))" in msg
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: .*experts\.8\.w1"):
        run(small_cfg(out, "parallel.ep=1", "train.steps=4", "model.moe.num_experts=12"))


def test_missing_and_corrupt_metadata(s3_bucket: str) -> None:
    out = f"{s3_bucket}/meta"
    run(small_cfg(out, "parallel.ep=1", "train.steps=4", "checkpoint.every=2"))
    fs, _ = fsspec.core.url_to_fs(out)
    with pytest.raises(CheckpointError, match=r"step-00000002 is incomplete: .metadata is missing"):
        fs.rm(f"{step_url(out, 2)}/.metadata")
        read_metadata(step_url(out, 2))
    with fs.open(f"{step_url(out, 4)}/.metadata", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"step-00000004: .metadata is corrupt"):
        run(small_cfg(out, "parallel.ep=1", "train.steps=6"))


_UNREACHABLE = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from tests.test_checkpoint import small_cfg
from trainer.checkpoint import CheckpointError
from trainer.loop import run

class Steps:
    seen = []
    def log(self, metrics, step):
        self.seen.append(step)
    def close(self):
        pass

def hook(url, step, metrics):
    if step == 2:
        os.kill({server_pid}, signal.SIGKILL)  # the endpoint goes away after checkpoint 2

sink = Steps()
t0 = time.monotonic()
try:
    run(small_cfg({out!r}, "parallel.ep=1", "train.steps=40", "checkpoint.every=2",
                  "checkpoint.retries=2", "checkpoint.backoff_s=0.2", "ops.jsonl=false"),
        sinks=[sink], on_checkpoint=hook)
except CheckpointError as e:
    print("ERROR", e)
print("STEPS", max(sink.seen), "SECONDS", round(time.monotonic() - t0, 1))
"""


def test_unreachable_endpoint_retries_then_fails(tmp_path) -> None:
    from tests.s3_server import S3Server

    server = S3Server().start()
    try:
        env = {**os.environ, **server.env(), "AWS_MAX_ATTEMPTS": "1", "OMP_NUM_THREADS": "1"}
        import s3fs

        fs = s3fs.S3FileSystem(
            skip_instance_cache=True,
            endpoint_url=server.endpoint,
            key=env["AWS_ACCESS_KEY_ID"],
            secret=env["AWS_SECRET_ACCESS_KEY"],
        )
        fs.mkdir("down")
        script = _UNREACHABLE.format(
            root=str(ROOT), out="s3://down/run", server_pid=server.proc.pid
        )
        proc = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.stop()
    said = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "ERROR checkpoint s3://down/run/checkpoints/step-00000004 failed after 3 attempts" in said
    )
    assert "retrying in 0.2s" in said and "retrying in 0.4s" in said
    # Training went on while the save retried in the background; the error came at the
    # next save (step 6), not at the end.
    steps = int(said.split("STEPS ")[1].split()[0])
    assert steps == 6, said


# --- export --------------------------------------------------------------------------


def test_export_single_file_loads_without_distributed(s3_bucket: str, tmp_path, capsys) -> None:
    from cluster.cli import main as cli
    from trainer.export import load_exported

    out = f"{s3_bucket}/export"
    run(small_cfg(out, "parallel.ep=1", "train.steps=3", "checkpoint.every=3"))
    dest = tmp_path / "exported"
    assert cli(["export", step_url(out, 3), "--out", str(dest)]) == 0
    assert (dest / "model.safetensors").exists() and (dest / "config.yaml").exists()
    model = load_exported(str(dest))
    full = consolidated_model_state(step_url(out, 3))
    live = model.state_dict()
    assert set(live) == set(full)
    assert all(torch.equal(live[k], full[k]) for k in full)
    # The run directory works too (newest checkpoint), and a non-checkpoint is an error.
    assert cli(["export", out, "--out", str(tmp_path / "again")]) == 0
    assert cli(["export", f"{s3_bucket}/nothing", "--out", str(tmp_path / "x")]) == 2
    with fsspec.open(f"{s3_bucket}/no-ckpt/config.yaml", "w") as f:
        f.write("run: {}\n")  # a run directory that never checkpointed
    capsys.readouterr()
    assert cli(["export", f"{s3_bucket}/no-ckpt", "--out", str(tmp_path / "x")]) == 2
    assert "is neither a complete checkpoint" in capsys.readouterr().err


def test_rng_state_round_trips() -> None:
    from trainer.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1)
    blob = rng_state()
    a = torch.rand(4)
    torch.rand(10)
    set_rng_state(blob)
    assert torch.equal(torch.rand(4), a)
    assert pickle.loads(blob)["python"] is not None


_NO_PERMISSION = """
import sys
sys.path.insert(0, {root!r})
from tests.test_checkpoint import small_cfg
from trainer.checkpoint import CheckpointError
from trainer.loop import run
try:
    run(small_cfg({out!r}, "parallel.ep=1", "train.steps=4", "checkpoint.every=2",
                  "checkpoint.async_save=false", "checkpoint.backoff_s=5"))
except CheckpointError as e:
    print("ERROR", e)
"""


def test_no_write_permission_fails_without_retrying(monkeypatch) -> None:
    import json

    import boto3

    from tests.s3_server import S3Server

    # moto checks signatures and IAM policies after its first 4 requests, which set up a
    # user who may write the run's outputs but not under checkpoints/.
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")
    server = S3Server().start()
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    try:
        env = server.env()
        admin = {
            "endpoint_url": server.endpoint,
            "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": "us-east-1",
        }
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="trainer")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {
                    "Effect": "Deny",
                    "Action": "s3:PutObject",
                    "Resource": "arn:aws:s3:::locked/run/checkpoints/*",
                },
            ],
        }
        iam.put_user_policy(UserName="trainer", PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        env.update(
            AWS_ACCESS_KEY_ID=key["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"],
            OMP_NUM_THREADS="1",
        )
        proc = subprocess.run(
            [sys.executable, "-c", _NO_PERMISSION.format(root=str(ROOT), out="s3://locked/run")],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    said = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ERROR cannot write checkpoint s3://locked/run/checkpoints/step-00000002" in said
    assert "PermissionError" in said
    assert "retrying" not in said  # a permission does not fix itself


def test_adamw_step_stays_on_the_cpu_after_resume_and_the_next_step_is_the_same(tmp_path):
    """PyTorch keeps AdamW's `step` on the CPU on the non-capturable path (a device `step`
    costs a host sync per parameter on every step); a resume must put it back there, and the
    optimizer step after the resume must be the uninterrupted run's, to the bit."""
    from trainer.checkpoint import Checkpointer
    from trainer.loop import train_step

    def params(state) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in state.model.named_parameters()}

    whole = setup(small_cfg(str(tmp_path / "a"), "parallel.ep=1"))
    for _ in range(3):
        train_step(whole)
    cfg = small_cfg(str(tmp_path / "b"), "parallel.ep=1", "checkpoint.async_save=false")
    first = setup(cfg)
    for _ in range(2):
        train_step(first)
    Checkpointer(cfg.checkpoint, cfg.run.output_dir, first.mesh).save(first)
    resumed = setup(cfg)
    assert Checkpointer(cfg.checkpoint, cfg.run.output_dir, resumed.mesh).resume(resumed) == 2
    steps = [st["step"] for st in resumed.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" and s.dim() == 0 for s in steps)
    assert all(float(s) == 2.0 for s in steps)
    train_step(resumed)
    want, got = params(whole), params(resumed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert all(st["step"].device.type == "cpu" for st in resumed.optimizer.state.values())


def test_loaded_adamw_step_is_allocated_on_the_cpu_whatever_the_parameter_device(tmp_path):
    """The load targets themselves: with the parameters on another device (the meta device
    stands in for a GPU here), the moments are allocated beside them and `step` on the CPU."""
    from trainer.checkpoint import Checkpointer, _optimizer_targets
    from trainer.loop import build_optimizer, train_step
    from trainer.model import build_model

    cfg = small_cfg(str(tmp_path), "parallel.ep=1", "checkpoint.async_save=false")
    state = setup(cfg)
    train_step(state)
    Checkpointer(cfg.checkpoint, cfg.run.output_dir, state.mesh).save(state)
    md = read_metadata(step_url(cfg.run.output_dir, 1))
    meta_model = build_model(cfg.model)  # parameters on the meta device
    targets, installs = _optimizer_targets(meta_model, build_optimizer(meta_model, cfg), md)
    steps = {k: v for k, v in targets.items() if k.endswith(".step")}
    moments = {k: v for k, v in targets.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert steps and moments and installs
    assert all(v.device.type == "cpu" for v in steps.values())
    assert all(v.device.type == "meta" for v in moments.values())
