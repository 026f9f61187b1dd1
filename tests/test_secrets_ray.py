"""No credential leaks on the Ray path. Two jobs go through `moeyard submit` (the real `ray job
submit`, whose entrypoint `python -m cluster.launch` runs a Ray Train V2 TorchTrainer) to a
local head: one succeeds, writing to the local S3 endpoint; one fails, its data on an S3
endpoint where nothing listens. S3 keys made up for this run are the head's own (the
environment `ray start` was given, which the jobs' processes inherit) and are in the
submitting shell too, and every process of the head has a Grafana token and a W&B API key in
its environment.
Searched byte for byte:

- every object the jobs wrote on S3 (metrics.jsonl, summary.json, placement.json, config.yaml
  beside the checkpoints, the checkpoint files, the TensorBoard event files, Ray Train's
  records) and every file of the W&B offline run the succeeding job wrote;
- the output of `moeyard submit`, both driver logs, the failing job's message;
- every file in the head's session folder (worker, driver, raylet, GCS, dashboard, job-agent
  logs, the unpacked working dir);
- the head's Prometheus text (Ray's metrics export port), scraped while the jobs ran;
- the job server's answers about the jobs, as a browser gets them;
- where Ray itself shows a job's runtime env verbatim: its runtime-env agent's log, and the
  job and state APIs as any other client (`ray job list`, `ray list tasks --detail`) gets
  them (`test_no_credential_in_rays_views_of_the_job`).

None holds a credential: `moeyard submit` never puts one in the runtime env, and says which
of the shell's it held back.

The values are random, so no source file in the uploaded working dir holds them; each is also
looked for in base64 at every alignment.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.test_cluster_submit import local_head, moeyard, node_credentials
from tests.test_secrets import Scraper

pytestmark = pytest.mark.slow

FAST = ["data.corpus_max_bytes=300000", "ops.telemetry=false"]
ONE_WORKER = ["cluster.num_workers=1", "parallel.ep=1", "cluster.max_failures=0"]


@dataclass(frozen=True)
class Creds:
    key_id: str
    secret: str
    grafana: str
    wandb: str

    def named(self) -> dict[str, str]:
        return {
            "the S3 key id": self.key_id,
            "the S3 secret key": self.secret,
            "the Grafana token": self.grafana,
            "the W&B API key": self.wandb,
        }


def needles(value: str) -> list[bytes]:
    """`value` as bytes and as it reads inside any base64 text: for each of the three
    alignments, the encoded characters that depend on `value` alone."""
    raw = value.encode()
    out = [raw]
    for shift in range(3):
        enc = base64.b64encode(b"\0" * shift + raw)
        # Characters that mix the prefix bytes or the padding with the value's are dropped.
        total = shift + len(raw)
        start = (0, 2, 3)[shift]
        end = 4 * (total // 3) + (0, 1, 2)[total % 3]
        out.append(enc[start:end])
    return [n for n in out if len(n) >= 16]


class Finder:
    """Searches blobs for the credentials; counts what it searched."""

    def __init__(self, creds: Creds) -> None:
        self.patterns = {name: needles(v) for name, v in creds.named().items()}
        self.found: list[str] = []
        self.blobs = 0
        self.bytes = 0

    def search(self, blob: bytes, where: str) -> None:
        self.blobs += 1
        self.bytes += len(blob)
        for name, forms in self.patterns.items():
            hit = next((n for n in forms if n in blob), None)
            if hit is not None:
                form = "as is" if hit == forms[0] else "in base64"
                self.found.append(f"{where} holds {name} {form}")


def read_tree(root: Path) -> dict[str, bytes]:
    """Every plain file under `root` by its relative path (sockets and links left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                out[str(p.relative_to(root))] = p.read_bytes()
            except OSError:
                continue  # removed meanwhile
    return out


@pytest.fixture(scope="module")
def creds() -> Iterator[Creds]:
    """Made-up keys (the local endpoint takes any) and a Grafana token in this process's
    environment, which the head started next inherits: every process on the node has it."""
    c = Creds(
        key_id="AKIA" + secrets.token_hex(8).upper(),
        secret="moeyardS3" + secrets.token_hex(16),
        grafana="glsa_" + secrets.token_hex(16),
        wandb=secrets.token_hex(20),  # 40 characters, as W&B's keys
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAFANA_TOKEN", c.grafana)
    mp.setenv("WANDB_API_KEY", c.wandb)
    try:
        yield c
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def ray_head(creds: Creds, s3_server) -> Iterator[str]:
    """A local head whose S3 credentials are this run's made-up keys (the S3 endpoint takes
    any); it inherits the Grafana token from this process."""
    with local_head(node_credentials(creds.key_id, creds.secret)) as url:
        yield url


def _get_json(url: str, *, browser: bool = False) -> tuple[bytes, Any]:
    # The job server masks env_vars for a browser (it goes by the User-Agent) only.
    headers = {"User-Agent": "Mozilla/5.0"} if browser else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        body = r.read()
    return body, json.loads(body)


def _find_key(node: Any, key: str) -> list[Any]:
    if isinstance(node, dict):
        here = [v for k, v in node.items() if k == key]
        return here + [x for v in node.values() for x in _find_key(v, key)]
    if isinstance(node, list):
        return [x for v in node for x in _find_key(v, key)]
    return []


def _head_node(url: str) -> tuple[Path, int]:
    """The head's session folder and metrics export port, from the job server."""
    deadline = time.monotonic() + 30
    while True:  # the job server learns of the node a moment after it answers
        body, nodes = _get_json(url + "/nodes?view=summary")
        sessions = {s for s in _find_key(nodes, "sessionDir") if s}
        ports = {p for p in _find_key(nodes, "metricsExportPort") if p}
        if sessions and ports:
            break
        assert time.monotonic() < deadline, body[:3000]
        time.sleep(0.5)
    assert len(sessions) == 1 and len(ports) == 1, (sessions, ports)
    return Path(sessions.pop()), int(ports.pop())


def _node_processes_with(session: Path, entry: bytes) -> int:
    """How many processes of the head (their command line names its session folder) have
    `entry` (NAME=value) in their environment."""
    n = 0
    for proc in Path("/proc").iterdir():
        try:
            if str(session).encode() in (proc / "cmdline").read_bytes():
                n += entry in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # not a process, gone, or not ours
    return n


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


def _submit(url: str, *overrides: str) -> tuple[str, str]:
    sub = moeyard("submit", "infra/runs/tiny.yaml", *overrides, "--address", url)
    said = sub.stdout + sub.stderr
    assert sub.returncode == 0, said
    return sub.stdout.strip().splitlines()[-1].removeprefix("job id: "), said


def _wait(client: Any, job_id: str, timeout_s: float = 240) -> str:
    deadline = time.monotonic() + timeout_s
    while (state := str(client.get_job_status(job_id))) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(0.5)
    return state


def test_finder_finds_a_planted_value(creds: Creds, tmp_path: Path) -> None:
    """The search can fail: a value planted as is, or base64-encoded at any offset inside
    other text, is found; text without it is not."""
    f = Finder(creds)
    for i, prefix in enumerate((b"", b"x", b"xy", b"xyz")):
        (tmp_path / f"b64-{i}.txt").write_bytes(
            b"data: " + base64.b64encode(prefix + creds.secret.encode() + b"!tail")
        )
    (tmp_path / "raw.log").write_text(f"token={creds.grafana}\n")
    (tmp_path / "clean.log").write_text("nothing here\n" * 100)
    for where, blob in read_tree(tmp_path).items():
        f.search(blob, where)
    assert f.blobs == 6
    assert len(f.found) == 5, f.found
    assert not any("clean.log" in x for x in f.found)


@dataclass
class JobArtifacts:
    """Everything the two jobs left that a person can read, by where it was found."""

    # What moeyard writes or prints, and Ray's logs of the jobs. Not in the repr: a failing
    # assert names the places, not the bytes.
    moeyard: dict[str, bytes] = field(repr=False)
    ray_views: dict[str, bytes] = field(repr=False)  # where Ray shows a job's runtime env
    s3_objects: int
    session_files: int
    scrapes: int
    moeyard_series: bool  # the run's own series reached the head's Prometheus text
    job_ids: tuple[str, str]


# Ray's own views of a job's runtime env: its job record and state API, and the runtime-env
# agent's log, which records every runtime env it creates, env_vars included.
RAY_VIEWS = (
    "/api/jobs/",
    "/api/v0/actors?detail=1&limit=10000",
    "/api/v0/tasks?detail=1&limit=10000",
)
RUNTIME_ENV_AGENT_LOG = "logs/runtime_env_agent"


@pytest.fixture(scope="module")
def jobs(creds: Creds, ray_head: str, s3_server, tmp_path_factory) -> Iterator[JobArtifacts]:
    """One job that succeeds (TensorBoard and W&B offline on) and one whose S3 endpoint is
    unreachable, submitted with `moeyard submit` from a shell that holds the keys too; then
    everything they left."""
    import s3fs

    wandb_dir = tmp_path_factory.mktemp("wandb-ray")
    from ray.job_submission import JobSubmissionClient

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", creds.key_id)
    mp.setenv("AWS_SECRET_ACCESS_KEY", creds.secret)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        bucket = "t-secrets-ray"
        fs.mkdir(bucket)
        session, metrics_port = _head_node(ray_head)
        assert session.is_dir(), session
        # The token and the keys are really there for the job's processes to leak.
        for entry in (
            f"GRAFANA_TOKEN={creds.grafana}",
            f"WANDB_API_KEY={creds.wandb}",
            f"AWS_ACCESS_KEY_ID={creds.key_id}",
            f"AWS_SECRET_ACCESS_KEY={creds.secret}",
        ):
            assert _node_processes_with(session, entry.encode()), entry.split("=")[0]
        scraper = Scraper(metrics_port, interval_s=1.0)
        client = JobSubmissionClient(ray_head)
        moeyard_blobs: dict[str, bytes] = {}

        ok_id, said = _submit(
            ray_head,
            "train.steps=2",
            "checkpoint.every=2",
            *ONE_WORKER,
            *FAST,
            f"run.output_dir=s3://{bucket}/runs/secret",
            "ops.tensorboard=true",
            "ops.wandb=true",
            "ops.wandb_mode=offline",
            f"ops.wandb_dir={wandb_dir}",
        )
        moeyard_blobs["moeyard submit's output"] = said.encode()
        assert "not passing AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY from this shell" in said
        # The same job with its data on an S3 endpoint where nothing listens: it fails. The
        # head has room for both workers, so the two jobs run side by side.
        bad_id, said = _submit(
            ray_head,
            "train.steps=2",
            *ONE_WORKER,
            *FAST,
            "data.source=shards",
            f"data.path=s3://{bucket}/no-data",
            f"data.endpoint_url=http://127.0.0.1:{_closed_port()}",
            "data.retries=0",
            f"run.output_dir=s3://{bucket}/runs/failing",
        )
        moeyard_blobs["moeyard submit's output (failing job)"] = said.encode()
        ok_state, bad_state = _wait(client, ok_id), _wait(client, bad_id)
        bodies = scraper.close()

        ok_log = client.get_job_logs(ok_id)
        assert ok_state == "SUCCEEDED", ok_log[-4000:]
        assert "done: 2 steps" in ok_log
        moeyard_blobs["the driver log"] = ok_log.encode()
        bad_log = client.get_job_logs(bad_id)
        assert bad_state == "FAILED", bad_log[-4000:]
        # The error is the S3 read's, and it reached the driver's output.
        assert "training failed" in bad_log and "no-data" in bad_log, bad_log[-4000:]
        moeyard_blobs["the failing job's driver log"] = bad_log.encode()
        moeyard_blobs["the failing job's message"] = str(
            client.get_job_info(bad_id).message
        ).encode()

        fs.invalidate_cache()
        objects = fs.find(bucket)
        names = {o.rsplit("/", 1)[-1] for o in objects}
        # What the run is contracted to write is all there, so the search covered it.
        assert {"metrics.jsonl", "config.yaml", "placement.json", "summary.json", ".metadata"} <= (
            names
        ), names
        for obj in objects:
            moeyard_blobs[f"s3://{obj}"] = fs.cat_file(obj)
        assert any("tfevents" in n for n in names), names
        # The W&B offline run the job wrote on this node (the head is its only node).
        wandb_files = read_tree(wandb_dir)
        assert any(n.endswith(".wandb") for n in wandb_files), sorted(wandb_files)
        for where, data in wandb_files.items():
            moeyard_blobs[f"the job's W&B files: {where}"] = data

        assert bodies and b"ray_" in bodies[-1], "no Prometheus text from the head"
        for i, body in enumerate(bodies):
            moeyard_blobs[f"the head's Prometheus text, scrape {i}"] = body

        ray_views = {}
        for path in (f"/api/jobs/{ok_id}", f"/api/jobs/{bad_id}", *RAY_VIEWS):
            ray_views[f"the job server's {path}"] = _get_json(ray_head + path)[0]
            # The dashboard page: what an operator's browser is shown.
            body = _get_json(ray_head + path, browser=True)[0]
            assert b"<redacted>" in body, (path, body[:2000])
            moeyard_blobs[f"the dashboard's {path} (browser)"] = body

        logs = [p.name for p in (session / "logs").iterdir()]
        assert any(n.startswith(f"job-driver-{ok_id}") for n in logs), logs
        for part in ("raylet", "gcs_server", "dashboard", "worker-", "runtime_env"):
            assert any(n.startswith(part) for n in logs), (part, logs)
        tree = read_tree(session)
        for where, data in tree.items():
            (ray_views if where.startswith(RUNTIME_ENV_AGENT_LOG) else moeyard_blobs)[where] = data
        yield JobArtifacts(
            moeyard_blobs,
            ray_views,
            len(objects),
            len(tree),
            len(bodies),
            any(b"moeyard_" in b for b in bodies),
            (ok_id, bad_id),
        )
    finally:
        mp.undo()


def _search(creds: Creds, blobs: dict[str, bytes]) -> Finder:
    f = Finder(creds)
    for where, blob in blobs.items():
        f.search(blob, where)
    return f


def test_no_credential_in_what_a_ray_job_writes_or_logs(creds: Creds, jobs: JobArtifacts) -> None:
    f = _search(creds, jobs.moeyard)
    print(
        f"searched {f.blobs} blobs, {f.bytes} bytes: {jobs.s3_objects} S3 objects, "
        f"{jobs.session_files} files in the head's session folder, {jobs.scrapes} scrapes "
        f"(moeyard series in them: {jobs.moeyard_series})"
    )
    assert jobs.s3_objects >= 8 and jobs.session_files > 50 and f.bytes > 1_000_000
    assert not f.found, "\n".join(f.found)


def test_no_credential_in_rays_views_of_the_job(creds: Creds, jobs: JobArtifacts) -> None:
    """Ray shows a runtime env verbatim: its runtime-env agent logs it at INFO into
    logs/runtime_env_agent.log, and the job server returns it unmasked to any client but a
    browser (/api/jobs/ runtime_env, the state API's actors serialized_runtime_env and tasks
    runtime_env_info). So nothing secret may be in it."""
    assert len(jobs.ray_views) >= 6  # the job server's answers and the agent's log
    # The views do show the jobs' runtime env variables (so a key among them would be found).
    for job_id in jobs.job_ids:
        assert b"AWS_ENDPOINT_URL" in jobs.ray_views[f"the job server's /api/jobs/{job_id}"]
    agent_log = b"".join(
        v for k, v in jobs.ray_views.items() if k.startswith(RUNTIME_ENV_AGENT_LOG)
    )
    assert b"AWS_ENDPOINT_URL" in agent_log
    f = _search(creds, jobs.ray_views)
    assert not f.found, "\n".join(f.found)
