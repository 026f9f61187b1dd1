"""The pure parts of the Ray launcher and the job commands, without a cluster: how many
workers fit on which nodes, where Ray Train keeps the run, what `moeyard submit` hands to
`ray job submit` (and what it must never put on a command line), how status reads a run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import cluster.jobs
from cluster.config import load_launch_config
from cluster.jobs import (
    AWS_ENV,
    EXCLUDES,
    HELD_BACK_ENV,
    JobsError,
    build_submit,
    format_status,
    job_env,
    looks_secret,
    progress,
    submit,
)
from cluster.launch import LaunchError, RayStorage, TaggedSink, check_reachable, worker_capacity

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "infra/runs/tiny.yaml")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("PACK", 5), ("SPREAD", 5), ("STRICT_PACK", 3), ("STRICT_SPREAD", 2)],
)
def test_worker_capacity_per_strategy(strategy, expected):
    # Nodes with 3, 2 and 0.5 CPUs; a worker takes 1 CPU.
    nodes = [{"CPU": 3.0}, {"CPU": 2.0}, {"CPU": 0.5}]
    assert worker_capacity(nodes, {"CPU": 1.0}, strategy) == expected


def test_worker_capacity_counts_the_scarcest_resource():
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}, {"CPU": 16.0}]
    assert worker_capacity(nodes, {"CPU": 1.0, "GPU": 1.0}, "PACK") == 2 + 1 + 0
    assert worker_capacity([], {"CPU": 1.0}, "PACK") == 0


def test_ray_run_lives_in_the_output_dir_by_default():
    cfg = load_launch_config(TINY, ["run.output_dir=s3://bucket/runs/exp1"])
    st = RayStorage.for_config(cfg)
    assert (st.storage_path, st.name, st.registers_checkpoints) == (
        "s3://bucket/runs",
        "exp1",
        True,
    )
    cfg = load_launch_config(
        TINY, ["run.output_dir=s3://bucket/runs/exp1", "cluster.storage_path=s3://other"]
    )
    assert RayStorage.for_config(cfg).registers_checkpoints is False
    cfg = load_launch_config(TINY, ["run.output_dir=exp1"])
    with pytest.raises(LaunchError, match="needs a parent folder"):
        RayStorage.for_config(cfg)


def test_tagged_sink_adds_the_restart_count():
    seen = []
    inner = SimpleNamespace(log=lambda m, step: seen.append((step, m)), close=lambda: None)
    TaggedSink(inner, {"restarts": 2}).log({"loss": 1.5}, 7)
    assert seen == [(7, {"loss": 1.5, "restarts": 2})]


def test_unreachable_address_fails_within_the_timeout():
    with pytest.raises(LaunchError, match=r"cluster.connect_timeout_s \(0.2 s\)"):
        check_reachable("127.0.0.1:1", timeout_s=0.2)
    with pytest.raises(LaunchError, match="is not host:port"):
        check_reachable("nohost", timeout_s=0.2)


def test_submit_passes_only_non_secret_aws_settings_in_the_runtime_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.chdir(tmp_path)
    cmd, runtime_env, job_id = build_submit(
        TINY, ["train.steps=5", "run.output_dir=runs/x"], address="127.0.0.1:8265", job_id=None
    )
    said = json.dumps(runtime_env) + " ".join(cmd)
    for value in ("key-id-value", "very-secret-value", "session-token-value"):
        assert value not in said
    # Ray shows a runtime env verbatim: the credentials come from the nodes instead.
    assert runtime_env["env_vars"] == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    assert runtime_env["excludes"] == EXCLUDES
    # The working dir is the project; the entrypoint is cluster.launch with the preset
    # relative to it, and a relative local output dir pinned to where the operator is.
    i = cmd.index("--working-dir")
    assert cmd[i + 1] == str(ROOT)
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265"
    assert "--no-wait" in cmd
    tail = cmd[cmd.index("--") + 1 :]
    assert tail[:4] == ["python", "-m", "cluster.launch", "infra/runs/tiny.yaml"]
    assert f"run.output_dir={tmp_path / 'runs/x'}" in tail
    meta = json.loads(cmd[cmd.index("--metadata-json") + 1])
    assert meta == {
        "output_dir": str(tmp_path / "runs/x"),
        "config": "infra/runs/tiny.yaml",
        "steps": "5",
    }
    assert job_id.startswith("moeyard-x-")


def test_job_env_keeps_only_the_storage_settings():
    env = {"AWS_REGION": "eu-west-1", "HOME": "/root", "AWS_ACCESS_KEY_ID": "", "PATH": "/bin"}
    assert job_env(env) == {"AWS_REGION": "eu-west-1"}
    env = {f"AWS_{k}": "v" for k in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY", "SESSION_TOKEN")}
    assert job_env(env) == {}


def test_secret_names_are_told_apart():
    for name in (*HELD_BACK_ENV, "HF_TOKEN", "WANDB_API_KEY", "GRAFANA_TOKEN", "DB_PASSWORD"):
        assert looks_secret(name), name
    for name in (*AWS_ENV, "TOKENIZERS_PARALLELISM", "NCCL_SOCKET_IFNAME", "KEY_ROTATION_DAYS"):
        assert not looks_secret(name), name


def _submitted(monkeypatch, *args: str) -> list[dict]:
    """Runs `moeyard submit` up to the `ray job submit` call, which is replaced by one that
    keeps the runtime env file the CLI would read, then fails."""
    seen = []

    def fake_ray_job_submit(cmd, *, timeout_s):
        seen.append(json.loads(Path(cmd[cmd.index("--runtime-env") + 1]).read_text()))
        return 1

    monkeypatch.setattr(cluster.jobs, "_submit_when_agent_ready", fake_ray_job_submit)
    # Set here so that submit's token-auth check leaves this process's environment alone.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert submit([TINY, "train.steps=2", *args, "--address", "127.0.0.1:1"]) == 1
    return seen


def test_submit_names_the_credentials_it_holds_back(monkeypatch, tmp_path, capsys):
    # Whatever an S3 fixture of another test left in this process's environment.
    for name in (*AWS_ENV, *HELD_BACK_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.chdir(tmp_path)
    (env,) = _submitted(monkeypatch, "run.output_dir=runs/x")
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    said = capsys.readouterr()
    (notice,) = [line for line in said.err.splitlines() if "not passing" in line]
    assert "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from this shell" in notice
    assert "AWS_SESSION_TOKEN" not in notice  # not set here: not named
    assert "`ray start`" in notice and "instance profile" in notice and "moeyard-s3" in notice
    assert "key-id-value" not in said.out + said.err
    assert "very-secret-value" not in said.out + said.err


def test_submit_without_credentials_says_nothing_of_them(monkeypatch, tmp_path, capsys):
    for name in HELD_BACK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    _submitted(monkeypatch, "run.output_dir=runs/x")
    assert "not passing" not in capsys.readouterr().err


def test_submit_takes_extra_variables_but_refuses_secret_ones(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    extra = json.dumps({"env_vars": {"NCCL_SOCKET_IFNAME": "eth0"}})
    (env,) = _submitted(monkeypatch, "run.output_dir=runs/x", "--runtime-env-json", extra)
    assert env["env_vars"]["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["excludes"] == EXCLUDES

    for bad, message in (
        ({"env_vars": {"HF_TOKEN": "hf-value", "X": "1"}}, "refusing HF_TOKEN: a secret"),
        ({"env_vars": {"AWS_SECRET_ACCESS_KEY": "v"}}, "refusing AWS_SECRET_ACCESS_KEY"),
        ({"working_dir": "."}, "takes only"),
        ({"env_vars": {"N": 1}}, "string values"),
    ):
        rc = submit([TINY, "--runtime-env-json", json.dumps(bad), "--address", "127.0.0.1:1"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, err
        assert "hf-value" not in err
    assert submit([TINY, "--runtime-env-json", "{", "--address", "127.0.0.1:1"]) == 2
    assert "--runtime-env-json is not JSON" in capsys.readouterr().err
    with pytest.raises(JobsError, match="refusing WANDB_API_KEY"):
        build_submit(TINY, [], address=None, job_id=None, extra_env={"WANDB_API_KEY": "k"})


def test_excludes_keep_the_presets_and_drop_local_runs():
    from ray._private.runtime_env.packaging import _get_excludes  # Ray's own matcher

    excluded = _get_excludes(ROOT, EXCLUDES)
    assert not excluded(ROOT / "infra/runs/tiny.yaml")
    assert not excluded(ROOT / "trainer/loop.py")
    assert excluded(ROOT / "runs/demo/metrics.jsonl")
    assert excluded(ROOT / ".venv/bin/python")
    assert excluded(ROOT / "trainer/__pycache__/loop.cpython-311.pyc")


def test_status_reads_the_last_logged_step(tmp_path):
    assert progress(str(tmp_path)) is None
    lines = [
        {"step": 1, "loss": 5.0, "tokens_per_s": 10.0},
        {"step": 2, "loss": 4.5, "tokens_per_s": 1234.4, "restarts": 1},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    last = progress(str(tmp_path))
    assert last is not None and last["step"] == 2
    info = SimpleNamespace(
        status="RUNNING", message="", metadata={"output_dir": str(tmp_path), "steps": "9"}
    )
    text = format_status("j1", info, last)
    assert text.splitlines() == [
        "job j1: RUNNING",
        f"  output: {tmp_path}",
        "  step 2/9  loss 4.5000  tokens/s 1234  restarts 1",
    ]
    assert "no step logged yet" in format_status("j1", info, None)


def test_ray_record_naming_deleted_checkpoints_is_reset(tmp_path):
    from cluster.launch import RAY_SNAPSHOT, reset_stale_ray_record

    assert reset_stale_ray_record(str(tmp_path)) == []  # no record yet
    (tmp_path / "checkpoints/step-00000009").mkdir(parents=True)
    record = {
        "checkpoint_results": [
            {"checkpoint_dir_name": "checkpoints/step-00000009", "metrics": {}},
        ],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoints/step-00000009"},
    }
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps(record))
    assert reset_stale_ray_record(str(tmp_path)) == []
    assert (tmp_path / RAY_SNAPSHOT).exists(), "a sound record is kept"

    record["checkpoint_results"].insert(0, {"checkpoint_dir_name": "checkpoints/step-00000003"})
    (tmp_path / RAY_SNAPSHOT).write_text(json.dumps(record))
    assert reset_stale_ray_record(str(tmp_path)) == ["checkpoints/step-00000003"]
    assert not (tmp_path / RAY_SNAPSHOT).exists()
