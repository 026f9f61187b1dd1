"""`moeyard submit` / `status` / `stop` against a real local head started with `ray start`.

The head runs with its dashboard (the job server) on free ports in its own temporary folder
and process group. Like a real node it holds the S3 credentials in the environment `ray start`
was given, which the job's driver and Ray Train's workers inherit; the endpoint is not there:
the job reaches the local S3 endpoint only if `moeyard submit` passes the shell's endpoint
through the runtime environment, and only if it holds back the shell's keys, as it must. The
job is submitted through the real `ray job submit` CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.ray_cluster import RAY_TEST_ENV
from tests.s3_server import TEST_KEY_ID, TEST_SECRET, S3Server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.corpus_max_bytes=300000", "ops.telemetry=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_head(node_env: dict[str, str]) -> Iterator[str]:
    """`ray start --head --block` in its own session, with `node_env` (and no other AWS or Ray
    variable of this process) in its environment; yields the job server URL."""
    temp = tempfile.mkdtemp(prefix="moeyard-ray-")
    dash = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(node_env)
    env.update(RAY_TEST_ENV)  # tests/ray_cluster.py: Ray's settings for test clusters
    # A head bound to this machine for one module: no token auth (the clients below, run
    # with this same setting, then send none).
    env["RAY_AUTH_MODE"] = "disabled"
    # The job's entrypoint runs `python` from the head's PATH: this environment's.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--num-cpus=2",
        "--object-store-memory=100000000",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--temp-dir={temp}",
    ]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    saved_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process's job client, as the head runs
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (Path(temp) / "head.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        # Only what this fixture started: the head's process group. On SIGTERM it stops
        # within seconds (no drain, RAY_TEST_ENV); what is left after a grace period gets
        # SIGKILL.
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(proc):
                time.sleep(0.2)
        proc.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if saved_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_mode


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether any process of `proc`'s process group is left (`proc` itself reaped first)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def node_credentials(key_id: str, secret: str) -> dict[str, str]:
    """What a node of the cluster holds: the S3 credentials, not the endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def ray_head(s3_server: S3Server) -> Iterator[str]:
    """A local head holding the S3 endpoint's credentials; yields the job server URL."""
    with local_head(node_credentials(TEST_KEY_ID, TEST_SECRET)) as url:
        yield url


def moeyard(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=ROOT,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_runs_to_succeeded_with_outputs_on_s3(ray_head, s3_bucket):
    import s3fs

    out = f"{s3_bucket}/runs/tiny"
    sub = moeyard(
        "submit",
        "infra/runs/tiny.yaml",
        "train.steps=3",
        "checkpoint.every=2",
        *FAST,
        f"run.output_dir={out}",
        "--address",
        ray_head,
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1].removeprefix("job id: ")
    assert job_id.startswith("moeyard-tiny-")
    assert TEST_SECRET not in sub.stdout + sub.stderr
    # The shell's keys were held back, by name; the job used the head's.
    assert "not passing AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from this shell" in sub.stderr

    from ray.job_submission import JobSubmissionClient

    # Polled here, in-process: a `moeyard status` process per poll would take the CPUs the
    # job runs on.
    client = JobSubmissionClient(ray_head)
    env_vars = client.get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env_vars), sorted(env_vars)
    deadline = time.monotonic() + 300
    while str(client.get_job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    st = moeyard("status", job_id, "--address", ray_head)
    assert st.returncode == 0, st.stderr
    state = st.stdout.splitlines()[0]
    logs = client.get_job_logs(job_id)
    assert state == f"job {job_id}: SUCCEEDED", st.stdout + logs[-4000:]
    assert "step 3/3" in st.stdout and "loss " in st.stdout and "tokens/s " in st.stdout
    assert f"output: {out}" in st.stdout
    assert "done: 3 steps" in logs
    assert TEST_SECRET not in logs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    base = out.removeprefix("s3://")
    for name in ("metrics.jsonl", "placement.json", "summary.json", "config.yaml"):
        assert fs.exists(f"{base}/{name}"), name
    assert fs.exists(f"{base}/checkpoints/step-00000002/.metadata")
    summary = json.loads(fs.cat(f"{base}/summary.json"))
    assert summary["steps"] == 3 and summary["world_size"] == 2
    plan = json.loads(fs.cat(f"{base}/placement.json"))
    assert plan["ep"] == 2 and len(plan["workers"]) == 2


def test_stop_ends_a_running_job(ray_head, tmp_path):
    sub = moeyard(
        "submit",
        "infra/runs/tiny.yaml",
        "train.steps=100000",
        *FAST,
        f"run.output_dir={tmp_path / 'long'}",
        "--address",
        ray_head,
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1].removeprefix("job id: ")
    stop = moeyard("stop", job_id, "--address", ray_head)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == f"job {job_id}: STOPPED"
    st = moeyard("status", job_id, "--address", ray_head)
    assert st.stdout.splitlines()[0] == f"job {job_id}: STOPPED"


def test_status_of_an_unknown_job_names_it(ray_head):
    st = moeyard("status", "no-such-job", "--address", ray_head)
    assert st.returncode == 2
    assert "no job 'no-such-job'" in st.stderr


def test_submit_checks_the_config_before_submitting(ray_head):
    sub = moeyard("submit", "infra/runs/tiny.yaml", "cluster.num_workers=3", "--address", ray_head)
    assert sub.returncode == 2
    assert "cluster.num_workers (3) must be divisible by parallel.ep (2)" in sub.stderr
    assert "ray job submit" not in sub.stdout
