"""The runbooks' commands run as written: every ```bash block of every runbook is executed, in
the order an operator would meet them (prepare, launch, watch, resume, export, ...), against
one local Ray cluster (with its job server) and the local S3 endpoint, with the tiny preset
and a few steps. A runbook that drifts from the CLI or the config keys fails here.

Blocks marked ```bash cluster-only: REASON need a real cluster and are not run, but every
`python -m cluster.launch` and `moeyard submit` line in them (and in every other block) is
loaded through the config schema with the runbook's own variables, so a renamed key fails
too. ```bash env blocks hold the operator's example values; the test sets its own.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.prometheus_server import free_port
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parent.parent
RUNBOOKS = ROOT / "runbooks"
BIN = Path(sys.executable).parent

# The order an operator meets them in; each later one works on the run the launch made.
ORDER = [
    "prepare-a-dataset.md",
    "launch-a-run.md",
    "watch-a-healthy-run.md",
    "resume-after-failure.md",
    "restore-or-export-a-checkpoint.md",
    "loss-spike-or-nan.md",
    "expert-load-collapse.md",
    "energy-anomalies.md",
    "straggler-or-slow-gpu.md",
    "node-or-gpu-dies.md",
    "scale-the-cluster.md",
    "rotate-s3-credentials.md",
]

FENCE = re.compile(r"^```([\w-]*)[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    runbook: str
    line: int
    lang: str
    tag: str  # "" (run it), "env", "cluster-only"
    reason: str
    code: str


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang, info, code = m.group(1), m.group(2).strip(), m.group(3)
        tag, _, reason = info.partition(":")
        out.append(
            Block(
                path.name,
                text.count("\n", 0, m.start()) + 1,
                lang,
                tag.strip(),
                reason.strip(),
                code,
            )
        )
    return out


def env_defaults(path: Path) -> dict[str, str]:
    """The operator's example values from the runbook's ```bash env block."""
    found: dict[str, str] = {}
    for b in blocks(path):
        if b.lang == "bash" and b.tag == "env":
            for name, value in re.findall(r"^export (\w+)=(.*)$", b.code, re.M):
                found[name] = shlex.split(value)[0] if value else ""
    return found


# ---- cheap checks: structure, index, config keys of every launch line --------------------


def test_every_runbook_is_indexed_tagged_and_ordered() -> None:
    files = sorted(p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md")
    assert sorted(ORDER) == files, "a runbook is missing from ORDER (or ORDER names a gone one)"
    index = (RUNBOOKS / "README.md").read_text()
    for name in files:
        assert f"]({name})" in index, f"runbooks/README.md does not link {name}"
        text = (RUNBOOKS / name).read_text()
        assert re.search(r"\*\*What you (see|want)", text), f"{name}: no 'What you see'"
        assert "**Why" in text or "**How" in text, f"{name}: no 'Why' / 'How'"
        bs = blocks(RUNBOOKS / name)
        assert any(b.lang == "bash" and b.tag == "" for b in bs), f"{name}: nothing runnable"
        for b in bs:
            if b.lang != "bash":
                continue
            assert b.tag in ("", "env", "cluster-only"), f"{name}:{b.line}: unknown tag {b.tag!r}"
            if b.tag == "cluster-only":
                assert len(b.reason) >= 10, f"{name}:{b.line}: cluster-only block without a reason"


def _logical_lines(code: str) -> list[str]:
    return [line.strip() for line in code.replace("\\\n", " ").splitlines()]


def launch_argvs(code: str, variables: dict[str, str]) -> list[list[str]]:
    """The `[PRESET, key=value, ...]` of every `python -m cluster.launch` / `moeyard submit`
    command in a block, with the variables substituted."""
    out = []
    for line in _logical_lines(code):
        m = re.search(r"(?:python -m cluster\.launch|moeyard submit) (.*)", line)
        if not m:
            continue
        rest = re.sub(r"\s*\|.*$", "", m.group(1))  # drop a pipe (`| tail`)
        expanded = re.sub(
            r"\$\{?(\w+)\}?|\$\([^)]*\)",
            lambda v: variables.get(v.group(1) or "", "0") if v.group(1) else "0",
            rest,
        )
        argv, skip = [], False
        for a in shlex.split(expanded):
            if skip:
                skip = False
            elif a in ("--submission-id", "--address"):
                skip = True
            elif not a.startswith("--"):
                argv.append(a)
        out.append(argv)
    return out


def test_launch_argvs_reads_commands() -> None:
    code = 'moeyard submit "$PRESET" a.b=1 $OVERRIDES \\\n  --submission-id "$JOB-$(date +%s)" --wait\n'
    assert launch_argvs(code, {"PRESET": "p.yaml", "OVERRIDES": "c=2 d=3"}) == [
        ["p.yaml", "a.b=1", "c=2", "d=3"]
    ]


def test_every_launch_line_loads_with_the_runbooks_values() -> None:
    from cluster.config import load_launch_config

    checked = 0
    for name in ORDER:
        path = RUNBOOKS / name
        variables = {"STEP": "4000", **env_defaults(path)}
        for b in blocks(path):
            if b.lang != "bash" or b.tag == "env":
                continue
            for argv in launch_argvs(b.code, variables):
                preset, *overrides = argv
                assert (ROOT / preset).is_file(), f"{name}:{b.line}: no preset {preset}"
                try:
                    load_launch_config(ROOT / preset, overrides)
                except ValueError as e:
                    raise AssertionError(f"{name}:{b.line}: {shlex.join(argv)}: {e}") from None
                checked += 1
    assert checked >= 12, checked


# ---- the runbooks, executed --------------------------------------------------------------


@dataclass
class Local:
    env: dict[str, str]
    bucket: str
    outputs: dict[str, str]


@pytest.fixture(scope="module")
def local(s3_server: S3Server) -> Iterator[Local]:
    """One Ray head with its job server on free ports, and the session's S3 endpoint.

    The head is `ray start --head --block` in its own process group (stopped by that group
    at the end, never by `ray stop`, which would stop every Ray on the machine). It records
    its address in its own temp dir, which is where a job's driver looks for it
    (`cluster.ray_address=auto`), so other Ray clusters on the machine are never picked up.
    """
    import s3fs

    s3 = s3_server  # the session's endpoint; its variables are in os.environ
    # Ray's socket paths must stay under 107 bytes: a short directory, not pytest's.
    tmp = Path(tempfile.mkdtemp(prefix="rb-"))
    dashboard = free_port()
    # The cluster's processes (and so the jobs) inherit this environment: the S3 endpoint and
    # its credentials, which a job gets from its node alone (`moeyard submit` passes on no
    # key), this interpreter's bin/ first on PATH (`python`, `moeyard`, `ray`), the repository
    # importable, no Ray token auth on a cluster bound to 127.0.0.1.
    env = {
        **os.environ,
        **s3.env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RAY_AUTH_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=3",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=100000000",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={tmp / 'ray'}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=open(tmp / "head.log", "w"),  # noqa: SIM115  (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_job_server(f"http://127.0.0.1:{dashboard}", head, tmp / "head.log")
        bucket = f"s3://runbooks-{uuid.uuid4().hex[:8]}"
        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(bucket)
        # A small text corpus to prepare: the trainer's own sources.
        for src in sorted((ROOT / "trainer").glob("*.py"))[:8]:
            fs.pipe(f"{bucket}/raw/{src.name}.txt", src.read_bytes())
        env.update(
            {
                "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
                "PRESET": "infra/runs/tiny.yaml",
                "RUN": f"{bucket}/runs/rb",
                "JOB": "rb-launch",
                "TEXT": f"{bucket}/raw/",
                "DATA": f"{bucket}/datasets/tiny",
                "TOKENIZER": "bytes",
                "SEQ_LEN": "64",
                "EXPORT": f"{bucket}/exports/rb",
            }
        )
        env["OVERRIDES"] = (
            f"train.steps=4 checkpoint.every=2 cluster.num_workers=2 data.source=shards "
            f"data.path={env['DATA']} train.seq_len=64 cluster.start_timeout_s=60"
        )
        yield Local(env, bucket, {})
    finally:
        _stop_group(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_job_server(url: str, head: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited ({head.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray job server at {url} did not answer:\n{log.read_text()[-3000:]}")


def _stop_group(head: subprocess.Popen[bytes]) -> None:
    """Stops the head and every process it started (its process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The group may outlive its leader for a moment (workers shutting down).
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(head.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run_runbook(local: Local, name: str, **extra: str) -> str:
    """Runs the runnable blocks of one runbook as one bash script; returns its output."""
    code = [b.code for b in blocks(RUNBOOKS / name) if b.lang == "bash" and b.tag == ""]
    script = "set -euo pipefail\n" + "\n".join(code)
    r = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**local.env, **extra},
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = r.stdout + r.stderr
    local.outputs[name] = out
    assert r.returncode == 0, f"{name} failed (exit {r.returncode}):\n{out[-6000:]}"
    return out


def _records(url: str) -> list[dict[str, Any]]:
    from ops.sinks import read_metrics

    return read_metrics(url + "/metrics.jsonl")


def _fs() -> Any:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.invalidate_cache()
    return fs


@pytest.mark.slow
def test_runbook_prepare_a_dataset(local: Local) -> None:
    out = run_runbook(local, "prepare-a-dataset.md")
    assert re.search(r"wrote \d+ shards, [\d,]+ rows of 65 tokens", out), out[-2000:]
    with _fs().open(local.env["DATA"] + "/manifest.json") as f:
        assert json.load(f)["row_len"] == 65


@pytest.mark.slow
def test_runbook_launch_a_run(local: Local) -> None:
    out = run_runbook(local, "launch-a-run.md")
    run = local.env["RUN"]
    assert "done: 4 steps" in out, out[-4000:]
    assert f"job {local.env['JOB']}: SUCCEEDED" in out, out[-2000:]
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]
    assert _fs().exists(run + "/checkpoints/step-00000004/.metadata")


@pytest.mark.slow
def test_runbook_watch_a_healthy_run(local: Local) -> None:
    out = run_runbook(local, "watch-a-healthy-run.md")
    assert f"job {local.env['JOB']}: SUCCEEDED" in out
    assert re.search(r"step 4 \| loss [\d.]+", out) and "done: 4 steps" in out, out[-3000:]
    assert re.search(r"steps\s+4", out) and "tokens/s" in out  # moeyard report


@pytest.mark.slow
def test_runbook_resume_after_failure(local: Local) -> None:
    # The launch ran 4 steps; the same command for a 6-step run is a run that stopped at 4.
    overrides = local.env["OVERRIDES"].replace("train.steps=4", "train.steps=6")
    out = run_runbook(local, "resume-after-failure.md", OVERRIDES=overrides)
    assert "complete checkpoints: [2, 4]; newest: 4" in out, out[-3000:]
    assert re.search(r"checkpoint: resumed from \S+step-00000004 \(step 4,", out), out[-4000:]
    assert [r["step"] for r in _records(local.env["RUN"])] == [1, 2, 3, 4, 5, 6]
    assert re.search(r"job rb-launch-resume-\d+: SUCCEEDED", out)


@pytest.mark.slow
def test_runbook_restore_or_export_a_checkpoint(local: Local) -> None:
    out = run_runbook(local, "restore-or-export-a-checkpoint.md")
    assert "complete: [2, 4, 6]" in out or "complete: [4, 6]" in out, out[-3000:]
    assert re.search(r"exported \S+step-00000006 -> \S+/model.safetensors", out), out[-3000:]
    assert re.search(r"\d+ parameters loaded from", out)
    assert _fs().exists(local.env["EXPORT"] + "/model.safetensors")


@pytest.mark.slow
def test_runbook_loss_spike_or_nan(local: Local) -> None:
    out = run_runbook(local, "loss-spike-or-nan.md")
    assert "6 records, last step 6, skipped steps so far: 0" in out, out[-2000:]


@pytest.mark.slow
def test_runbook_expert_load_collapse(local: Local) -> None:
    out = run_runbook(local, "expert-load-collapse.md")
    assert re.search(
        r"layer [01]: max/mean [\d.]+ cv [\d.]+ idle \d+ dropped 0.000; expert \d", out
    )
    assert "on EP rank" in out


@pytest.mark.slow
def test_runbook_energy_anomalies(local: Local) -> None:
    out = run_runbook(local, "energy-anomalies.md")
    # A CPU run: no energy counter, and nothing is made up.
    assert re.search(r"energy\s+not measured", out), out[-2000:]
    assert "no clock event other than gpu_idle in 6 records" in out


@pytest.mark.slow
def test_runbook_straggler_or_slow_gpu(local: Local) -> None:
    out = run_runbook(local, "straggler-or-slow-gpu.md")
    assert "no GPU clocks in this run" in out and "GPU -" in out


@pytest.mark.slow
def test_runbook_node_or_gpu_dies(local: Local) -> None:
    out = run_runbook(local, "node-or-gpu-dies.md")
    assert re.search(r"rank +0 .* EP rank 0 +experts 0\.\.3", out), out[-2000:]
    assert re.search(r"rank +1 .* EP rank 1 +experts 4\.\.7", out)


@pytest.mark.slow
def test_runbook_scale_the_cluster(local: Local) -> None:
    out = run_runbook(local, "scale-the-cluster.md")
    # The dry run laid out 32 ranks: EP 2 groups of 16 data-parallel ranks on 4 nodes of 8.
    assert "ep 1: experts 4..7 -> ranks 1..31 step 2" in out, out[-2000:]


@pytest.mark.slow
def test_runbook_rotate_s3_credentials(local: Local) -> None:
    out = run_runbook(local, "rotate-s3-credentials.md")
    assert f"read, write and delete under {local.env['RUN']} work" in out, out[-2000:]
