"""`cluster.launch` on a local Ray mini-cluster: two nodes of two CPUs, gloo.

The session's mini-cluster serves the module (tests/ray_cluster.py; no dashboard: nothing
here needs it). Each test starts a real Ray Train V2 worker group through `cluster.launch`,
the job entrypoint:

- the loss it logs equals the same job run by `trainer.loop.run` on gloo ranks outside Ray
  (what torchrun runs), and placement.json puts each expert-parallel group on one node;
- a training worker killed by its pid mid-run makes Ray restart the worker group, which
  resumes from the newest checkpoint and finishes, with the restart in the metrics;
- bad input fails with a message that names the setting: an unreachable Ray address, more
  workers than the cluster can hold, an ep that does not divide the world size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# A small slice of the corpus: each worker tokenizes it at start, on shared cores.
FAST = ["data.corpus_max_bytes=300000", "ops.telemetry=false", "ops.stdout=false"]


@pytest.fixture(scope="module")
def ray_cluster(ray_mini_cluster):
    """The session's mini-cluster (tests/ray_cluster.py) as a head and one worker node."""
    import ray

    try:
        yield ray_mini_cluster.two_nodes()
    finally:
        ray.shutdown()  # this process's connection; the cluster stays for the next module


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def _reference(rank: int, world: int, overrides: list[str]) -> list[float]:
    """trainer.loop.run on a gloo rank set up by tests/distributed.py, as torchrun would."""
    from trainer.config import load_config
    from trainer.loop import run

    cfg = load_config(ROOT / "infra/runs/tiny.yaml", overrides, ignore_sections=("cluster",))
    return run(cfg, local_rank=rank).losses


def test_launch_matches_torchrun_and_keeps_ep_groups_on_nodes(ray_cluster, tmp_path, capsys):
    import ray

    from cluster.launch import main
    from tests.distributed import run_ranks

    common = ["train.steps=4", "parallel.ep=2", "checkpoint.every=0", *FAST]
    out = tmp_path / "ray"
    rc = main(
        [
            "infra/runs/tiny.yaml",
            *common,
            f"run.output_dir={out}",
            "cluster.num_workers=4",
            f"cluster.ray_address={ray_cluster.address}",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "done: 4 steps" in printed.out

    ray_losses = [r["loss"] for r in _metrics(out)]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4]
    ref = run_ranks(_reference, 4, [*common, f"run.output_dir={tmp_path / 'ref'}"])
    assert ref[0] == pytest.approx(ray_losses, rel=1e-6, abs=1e-6)

    plan = json.loads((out / "placement.json").read_text())
    assert (plan["world_size"], plan["ep"], plan["dp"]) == (4, 2, 2)
    assert len(plan["nodes"]) == 2, "the mini-cluster's two nodes"
    ids = {n["node_id"] for n in plan["nodes"]}
    assert ids == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    for g in plan["ep_groups"]:
        assert len(g["nodes"]) == 1 and not g["spans_nodes"], g
    assert plan["ep_groups"][0]["nodes"] != plan["ep_groups"][1]["nodes"]
    assert plan["warnings"] == []
    # Expert 0 is on EP rank 0 of both groups: ranks 0 and 2, one on each node.
    e0 = plan["experts"][0]
    assert e0["ranks"] == [0, 2] and sorted(e0["nodes"]) == [0, 1]
    pids = {w["pid"] for w in plan["workers"]}
    assert len(pids) == 4 and os.getpid() not in pids


def test_killed_worker_restarts_and_resumes_from_checkpoint(ray_cluster, tmp_path):
    out = tmp_path / "run"
    steps = 16
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.launch",
            "infra/runs/tiny.yaml",
            f"train.steps={steps}",
            "checkpoint.every=3",
            "checkpoint.async_save=false",
            *FAST,
            f"run.output_dir={out}",
            "cluster.num_workers=2",
            "cluster.max_failures=1",
            f"cluster.ray_address={ray_cluster.address}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Wait for a step after the first checkpoint, then kill rank 1 by its pid.
        deadline = time.monotonic() + 180
        victim = None
        while victim is None:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no step 4 within 180 s"
            try:
                done = max((r["step"] for r in _metrics(out)), default=0)
            except FileNotFoundError:
                done = 0
            if done >= 4:
                plan = json.loads((out / "placement.json").read_text())
                victim = next(w["pid"] for w in plan["workers"] if w["world_rank"] == 1)
            else:
                time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        killed_after = max(r["step"] for r in _metrics(out))
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert killed_after < steps, "the run ended before the kill; nothing was tested"
    assert "restart 1:" in log

    records = _metrics(out)
    first = [r for r in records if r["restarts"] == 0]
    second = [r for r in records if r["restarts"] == 1]
    assert first and second
    assert second[-1]["step"] == steps
    # The new worker group resumed from a checkpoint (every 3 steps), not from step 0, and
    # continued exactly: the steps both attempts logged have the same loss.
    resumed_at = second[0]["step"] - 1
    assert resumed_at >= 3 and resumed_at % 3 == 0
    before = {r["step"]: r["loss"] for r in first}
    again = [(before[r["step"]], r["loss"]) for r in second if r["step"] in before]
    for a, b in again:
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps
    assert "1 restart(s)" in log
    # A new placement was written by the new worker group: rank 1 is a new process.
    plan = json.loads((out / "placement.json").read_text())
    assert victim not in {w["pid"] for w in plan["workers"]}

    # Submitting the job again on the same output dir (the same Ray run name) continues the
    # run from its last checkpoint (step 30) instead of starting over.
    from cluster.launch import main

    rc = main(
        [
            "infra/runs/tiny.yaml",
            f"train.steps={steps + 2}",
            "checkpoint.every=3",
            *FAST,
            f"run.output_dir={out}",
            "cluster.num_workers=2",
            f"cluster.ray_address={ray_cluster.address}",
        ]
    )
    assert rc == 0
    more = _metrics(out)[len(records) :]
    assert [r["step"] for r in more] == [steps + 1, steps + 2]
    assert json.loads((out / "summary.json").read_text())["steps"] == steps + 2


def test_more_workers_than_the_cluster_holds_fails_after_the_timeout(ray_cluster, tmp_path, capsys):
    from cluster.launch import main

    rc = main(
        [
            "infra/runs/tiny.yaml",
            f"run.output_dir={tmp_path / 'big'}",
            "cluster.num_workers=8",
            "cluster.start_timeout_s=1",
            f"cluster.ray_address={ray_cluster.address}",
        ]
    )
    err = capsys.readouterr()
    assert rc == 3
    assert "waiting for resources" in err.out
    assert "cluster.num_workers (8)" in err.err
    assert "room for 4" in err.err
    assert "cluster.start_timeout_s (1 s)" in err.err
    assert not (tmp_path / "big" / "metrics.jsonl").exists()


def test_unreachable_ray_address_is_a_clear_error(tmp_path, capsys):
    from cluster.launch import main

    t0 = time.monotonic()
    rc = main(
        [
            "infra/runs/tiny.yaml",
            f"run.output_dir={tmp_path / 'x'}",
            "cluster.ray_address=127.0.0.1:1",
            "cluster.connect_timeout_s=0.5",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3
    assert "cannot reach the Ray cluster at" in err and ":1 (cluster.ray_address)" in err
    assert "cluster.connect_timeout_s (0.5 s)" in err
    assert time.monotonic() - t0 < 30  # not ray.init's minutes of retries


def test_ep_that_does_not_divide_the_world_is_a_config_error(tmp_path, capsys):
    from cluster.launch import main

    rc = main(["infra/runs/tiny.yaml", "cluster.num_workers=3", "parallel.ep=2"])
    assert rc == 2
    assert "cluster.num_workers (3) must be divisible by parallel.ep (2)" in capsys.readouterr().err


def test_world_size_pinned_in_the_config_must_match_the_workers(capsys):
    from cluster.launch import main

    rc = main(["infra/runs/tiny.yaml", "cluster.num_workers=4", "parallel.world_size=2"])
    assert rc == 2
    assert "parallel.world_size (2) does not match cluster.num_workers (4)" in (
        capsys.readouterr().err
    )


def test_dry_run_sizes_the_job_for_the_cluster_world(capsys):
    from cluster.launch import main

    rc = main(["infra/runs/tiny.yaml", "cluster.num_workers=4", "--dry-run", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["world_size"], report["ep"], report["dp"]) == (4, 2, 2)
