"""The operator's job commands: `moeyard submit`, `moeyard status`, `moeyard stop`.

    moeyard submit infra/runs/tiny.yaml train.steps=100 [--address URL] [--wait]
    moeyard status JOB_ID
    moeyard stop JOB_ID

`submit` validates the config here, then calls the real `ray job submit` with the project
directory as the working dir and `python -m cluster.launch CONFIG ...` as the entrypoint. The
non-secret S3 settings of this shell (endpoint, region) go to every process of the job as
runtime-environment `env_vars`, written to a private temporary file for the CLI to read.
Credentials never do: Ray writes a job's runtime env into its runtime-env agent's log and
serves it from its job and state APIs (`ray job list`, `ray list tasks --detail`), so the job
uses the nodes' own credentials instead (the environment `ray start` was given, which the
job's driver and Ray's workers inherit on that node; the instance profile; the Kubernetes
secret `moeyard-s3`). `submit` names the credentials of this shell it held back, and refuses
extra runtime-env variables (`--runtime-env-json`) that look like secrets. `status` reads
the job's state from the Ray job server and the progress from `metrics.jsonl` in the run's
output dir (recorded in the job's metadata at submit time).

The job server's address: `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else
http://127.0.0.1:8265 (the dashboard of a local `ray start --head`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.config import load_launch_config
from trainer.config import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Where the job finds object storage: passed on when set here. Not one of them is a secret.
AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
# Credentials this shell may hold that are never passed on: Ray shows a runtime env verbatim
# (its runtime-env agent's log, /api/jobs/, the state API). The job reads the nodes' own.
HELD_BACK_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
# Where the job's processes get their credentials instead; said when keys are held back.
NODE_CREDENTIALS = (
    "the nodes' own: the environment `ray start` was run with, an instance profile, "
    "or the Kubernetes secret moeyard-s3"
)
# A variable name with one of these words (split at "_") holds a secret.
_SECRET_WORDS = {"SECRET", "TOKEN", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "CREDENTIALS"}
_SECRET_PAIRS = {("ACCESS", "KEY"), ("API", "KEY"), ("PRIVATE", "KEY"), ("AUTH", "KEY")}
# Never uploaded with the working dir: environments, outputs, caches. Gitignore syntax: a
# leading "/" anchors at the project root (infra/runs/ must travel, ./runs/ must not).
EXCLUDES = [
    "/.venv",
    "/runs",
    "/.git",
    "/.hypothesis",
    "/.artifacts",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """An operator action that cannot go ahead; the message says why."""


def use_ray_auth_token() -> None:
    """Sends the Ray auth token when there is one, as `ray start` does.

    A head started with a token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN)
    and no RAY_AUTH_MODE turns token auth on; Ray's clients send the token only when
    RAY_AUTH_MODE is `token`. An explicit RAY_AUTH_MODE is left as it is.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def job_server_address(address: str | None) -> str:
    addr = (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )
    if "://" not in addr:
        addr = "http://" + addr
    return addr


def job_env(environ: dict[str, str] | os._Environ[str] | None = None) -> dict[str, str]:
    """The non-secret storage settings of this shell that the job's processes need."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in AWS_ENV if env.get(k)}


def held_back(environ: dict[str, str] | os._Environ[str] | None = None) -> list[str]:
    """The names of the credentials set in this shell that the job does not get."""
    env = os.environ if environ is None else environ
    return [k for k in HELD_BACK_ENV if env.get(k)]


def held_back_notice(names: list[str]) -> str:
    """One line naming the held-back credentials (never their values), and why."""
    return (
        f"moeyard submit: not passing {', '.join(names)} from this shell to the job: Ray logs "
        "a job's runtime-env variables and shows them in `ray job list`; the job uses "
        f"{NODE_CREDENTIALS}"
    )


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (`HF_TOKEN`,
    `AWS_SECRET_ACCESS_KEY`, `WANDB_API_KEY`; not `TOKENIZERS_PARALLELISM`)."""
    words = name.upper().split("_")
    return bool(_SECRET_WORDS.intersection(words)) or any(
        pair in _SECRET_PAIRS for pair in itertools.pairwise(words)
    )


def extra_env_vars(runtime_env_json: str | None) -> dict[str, str]:
    """The operator's own runtime-env variables (`--runtime-env-json '{"env_vars": {...}}'`).

    Raises:
        JobsError: not a JSON object holding only `env_vars` of strings, or a variable whose
            name looks like a secret (Ray would log it and serve it from its APIs).
    """
    if runtime_env_json is None:
        return {}
    try:
        extra = json.loads(runtime_env_json)
    except json.JSONDecodeError as e:
        raise JobsError(f"--runtime-env-json is not JSON: {e}") from None
    if not isinstance(extra, dict) or set(extra) - {"env_vars"}:
        keys = sorted(extra) if isinstance(extra, dict) else type(extra).__name__
        raise JobsError(
            f'--runtime-env-json takes only {{"env_vars": {{...}}}} (got {keys}): moeyard sets '
            "the job's working dir and excludes itself"
        )
    env = extra.get("env_vars", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise JobsError("--runtime-env-json: env_vars must map names to string values")
    refuse_secrets(env, "--runtime-env-json")
    return env


def refuse_secrets(env_vars: dict[str, str], where: str) -> None:
    """Raises JobsError naming (never showing) every variable of `env_vars` that is or looks
    like a credential: nothing secret travels in a runtime env."""
    secret = sorted(k for k in env_vars if k in HELD_BACK_ENV or looks_secret(k))
    if secret:
        raise JobsError(
            f"{where}: refusing {', '.join(secret)}: a secret must not travel in the runtime "
            "env (Ray writes it to its runtime-env agent's log and serves it from its job and "
            "state APIs); give it to the nodes instead (the environment `ray start` is run "
            "with, an instance profile, or a Kubernetes secret)"
        )


def _ray_cli() -> str:
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise JobsError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def _config_in_project(path: str) -> str:
    p = Path(path).resolve()
    if not p.is_file():
        raise JobsError(f"config file not found: {path}")
    try:
        return p.relative_to(PROJECT_DIR).as_posix()
    except ValueError:
        raise JobsError(
            f"config {path} is outside the project directory {PROJECT_DIR}, which is the job's "
            "working dir: put the preset under infra/runs/"
        ) from None


def submission_id(run_name: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return "moeyard-" + re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:40] + "-" + stamp


def build_submit(
    config: str,
    overrides: list[str],
    *,
    address: str | None,
    job_id: str | None,
    extra_env: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, Any], str]:
    """The `ray job submit` command line, its runtime env and the job id. The runtime env
    holds the non-secret storage settings of this shell and `extra_env`, never a credential.

    Raises:
        ConfigError: the config does not load or validate (checked before submitting).
        JobsError: the config lies outside the project directory, or `extra_env` holds a
            variable that looks like a secret.
    """
    overrides = list(overrides)
    cfg = load_launch_config(config, overrides)
    out = cfg.run.output_dir
    if "://" not in out and not os.path.isabs(out):
        # The job runs in an unpacked copy of the working dir: pin a relative local path to
        # where it means something to the operator (a local cluster).
        out = os.path.abspath(out)
        overrides.append(f"run.output_dir={out}")
    rel = _config_in_project(config)
    job_id = job_id or submission_id(cfg.cluster.run_name or out.rstrip("/").rpartition("/")[2])
    env_vars = {**job_env(), **(extra_env or {})}
    refuse_secrets(env_vars, "the job's runtime env")
    runtime_env = {"excludes": EXCLUDES, "env_vars": env_vars}
    metadata = {"output_dir": out, "config": rel, "steps": str(cfg.train.steps)}
    cmd = [
        _ray_cli(),
        "job",
        "submit",
        "--address",
        job_server_address(address),
        "--working-dir",
        str(PROJECT_DIR),
        "--submission-id",
        job_id,
        "--metadata-json",
        json.dumps(metadata),
    ]
    # Always returns at once; `--wait` follows with `ray job logs --follow`, so a submission
    # that meets a head still starting can be tried again.
    cmd.append("--no-wait")
    cmd += ["--", "python", "-m", "cluster.launch", rel, *overrides]
    return cmd, runtime_env, job_id


def submit(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moeyard submit", description="Submit a training job to a Ray cluster."
    )
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--address", default=None, help=f"job server (default {DEFAULT_ADDRESS})")
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends")
    p.add_argument("--submission-id", default=None, help="the job id (default: generated)")
    p.add_argument(
        "--agent-timeout-s",
        type=float,
        default=120.0,
        help="how long to keep submitting while a fresh head's job agent starts",
    )
    p.add_argument(
        "--runtime-env-json",
        default=None,
        metavar="JSON",
        help='extra variables for the job, \'{"env_vars": {"NAME": "value"}}\'; no secrets '
        "(Ray logs them): credentials come from the nodes",
    )
    args = p.parse_args(argv)
    try:
        cmd, runtime_env, job_id = build_submit(
            args.config,
            args.overrides,
            address=args.address,
            job_id=args.submission_id,
            extra_env=extra_env_vars(args.runtime_env_json),
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except JobsError as e:
        print(f"moeyard submit: {e}", file=sys.stderr)
        return 2
    names = held_back()
    if names:
        print(held_back_notice(names), file=sys.stderr, flush=True)
    # A private file outside the working dir (so it is not uploaded with it), removed as soon
    # as the CLI has read it.
    fd, env_file = tempfile.mkstemp(prefix="moeyard-runtime-env-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(runtime_env, f)  # JSON is YAML
        cmd[3:3] = ["--runtime-env", env_file]
        shown = [c if c != env_file else "<runtime env>" for c in cmd]
        print("$ " + shlex.join(shown), flush=True)
        use_ray_auth_token()
        rc = _submit_when_agent_ready(cmd, timeout_s=args.agent_timeout_s)
    finally:
        os.unlink(env_file)
    if rc != 0:
        print(f"moeyard submit: `ray job submit` failed (exit {rc})", file=sys.stderr)
        return rc
    print(f"job id: {job_id}", flush=True)
    if not args.wait:
        return 0
    address = job_server_address(args.address)
    subprocess.call(
        [_ray_cli(), "job", "logs", "--address", address, "--follow", job_id], cwd=PROJECT_DIR
    )
    try:
        info = _info(_client(args.address), job_id)
    except JobsError as e:
        print(f"moeyard submit: {e}", file=sys.stderr)
        return 2
    print(f"job {job_id}: {info.status}", flush=True)
    return 0 if str(info.status) == "SUCCEEDED" else 1


# What the job server answers while its node's agent is still starting (a fresh head).
_AGENT_NOT_READY = ("No available agent to submit job", "Timed out waiting for an available job")


def _submit_when_agent_ready(cmd: list[str], *, timeout_s: float) -> int:
    """Runs `ray job submit` (with --no-wait), again while the server says its agent is not
    up yet; prints the CLI's output. Returns its exit status."""
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        p = subprocess.run(cmd, cwd=PROJECT_DIR, capture_output=True, text=True)
        text = p.stdout + p.stderr
        not_ready = p.returncode and any(m in text for m in _AGENT_NOT_READY)
        if not_ready and time.monotonic() < deadline:
            if not said:
                print("the job server's agent is not up yet; submitting again", flush=True)
                said = True
            time.sleep(2)
            continue
        sys.stdout.write(text)
        sys.stdout.flush()
        return p.returncode


def _client(address: str | None) -> Any:
    use_ray_auth_token()  # before ray is imported: it reads RAY_AUTH_MODE once
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(job_server_address(address))
    except (ConnectionError, RuntimeError, OSError, AuthenticationError) as e:
        raise JobsError(
            f"cannot reach the Ray job server at {job_server_address(address)}: {e}"
        ) from None


def _info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        raise JobsError(f"no job {job_id!r} on this cluster ({str(e).splitlines()[0]})") from None


def progress(output_dir: str) -> dict[str, Any] | None:
    """The last record of `metrics.jsonl` in `output_dir`, or None before the first step."""
    from ops.sinks import read_metrics

    try:
        records = read_metrics(output_dir.rstrip("/") + "/metrics.jsonl")
    except FileNotFoundError:
        return None
    return records[-1] if records else None


def format_status(job_id: str, info: Any, last: dict[str, Any] | None) -> str:
    meta = info.metadata or {}
    lines = [f"job {job_id}: {info.status}"]
    if info.message:
        lines.append(f"  {info.message}")
    if meta.get("output_dir"):
        lines.append(f"  output: {meta['output_dir']}")
    if last is None:
        lines.append("  no step logged yet")
    else:
        steps = meta.get("steps")
        lines.append(
            f"  step {last.get('step')}{'/' + steps if steps else ''}  "
            f"loss {last.get('loss', float('nan')):.4f}  "
            f"tokens/s {last.get('tokens_per_s', 0.0):.0f}  "
            f"restarts {last.get('restarts', 0)}"
        )
    return "\n".join(lines)


def status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moeyard status", description="A job's state and its last logged step."
    )
    p.add_argument("job_id")
    p.add_argument("--address", default=None)
    args = p.parse_args(argv)
    try:
        info = _info(_client(args.address), args.job_id)
    except JobsError as e:
        print(f"moeyard status: {e}", file=sys.stderr)
        return 2
    out = (info.metadata or {}).get("output_dir")
    last = progress(out) if out else None
    print(format_status(args.job_id, info, last), flush=True)
    return 0


def stop(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moeyard stop", description="Stop a running job.")
    p.add_argument("job_id")
    p.add_argument("--address", default=None)
    p.add_argument("--timeout-s", type=float, default=60.0, help="how long to wait for it")
    args = p.parse_args(argv)
    try:
        client = _client(args.address)
        info = _info(client, args.job_id)
        if str(info.status) in TERMINAL:
            print(f"job {args.job_id}: already {info.status}")
            return 0
        client.stop_job(args.job_id)
        deadline = time.monotonic() + args.timeout_s
        while str(info.status) not in TERMINAL:
            if time.monotonic() > deadline:
                raise JobsError(
                    f"job {args.job_id} is still {info.status} after --timeout-s "
                    f"({args.timeout_s:g} s)"
                )
            time.sleep(0.5)
            info = _info(client, args.job_id)
    except JobsError as e:
        print(f"moeyard stop: {e}", file=sys.stderr)
        return 2
    print(f"job {args.job_id}: {info.status}", flush=True)
    return 0
