"""A Ray node lost mid-run (cluster/faults.py `remove_node`, a replacement node joining): the
job started by `cluster.launch` restarts its worker group, resumes from the newest
checkpoint and finishes with the fault-free run's final loss, every sample trained once.

The session's mini-cluster (tests/ray_cluster.py): a head and one worker node of 2 CPUs each,
whose GCS notices a lost node within seconds; the two workers are spread one per node, so
removing the worker node kills rank 1's node for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.faults import read_placement, remove_node, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = ["data.corpus_max_bytes=300000", "ops.telemetry=false", "ops.stdout=false"]
STEPS = 12


@pytest.fixture(scope="module")
def ray_cluster(ray_mini_cluster):
    """The session's mini-cluster (tests/ray_cluster.py) as a head and one worker node."""
    import ray

    try:
        yield ray_mini_cluster.two_nodes()
    finally:
        ray.shutdown()  # this process's connection; the cluster stays for the next module


def _steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x), default=0)


def _launch(ray_cluster, out: Path, overrides: list[str]) -> subprocess.Popen:
    """`python -m cluster.launch` of the tiny preset on the mini-cluster, a checkpoint every
    3 steps (written synchronously) to `out`, one restart allowed."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.launch",
            "infra/runs/tiny.yaml",
            *overrides,
            "checkpoint.every=3",
            "checkpoint.async_save=false",
            f"run.output_dir={out}",
            "cluster.max_failures=1",
            f"cluster.ray_address={ray_cluster.address}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _worker_node_of(ray_cluster, out: Path, proc: subprocess.Popen) -> str:
    """Waits for step 4, then names a node (not the head) that holds a worker of the run."""
    wait_for(lambda: _steps(out) >= 4 or proc.poll() is not None, timeout_s=240, what="step 4")
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    head = ray_cluster.head_node.node_id
    return next(w["node_id"] for w in read_placement(str(out))["workers"] if w["node_id"] != head)


def _reference(rank: int, world: int, overrides: list[str]) -> float:
    from trainer.config import load_config
    from trainer.loop import run

    cfg = load_config(ROOT / "infra/runs/tiny.yaml", overrides, ignore_sections=("cluster",))
    return run(cfg, local_rank=rank).final_loss


def test_lost_node_restarts_and_loses_no_sample(ray_cluster, ray_mini_cluster, tmp_path) -> None:
    from tests.distributed import run_ranks

    common = [f"train.steps={STEPS}", "parallel.ep=1", *FAST]
    out = tmp_path / "run"
    proc = _launch(
        ray_cluster,
        out,
        [*common, "cluster.num_workers=2", "cluster.placement_strategy=STRICT_SPREAD"],
    )
    try:
        victim = _worker_node_of(ray_cluster, out, proc)
        lost_after = _steps(out)
        remove_node(ray_cluster, victim)
        ray_mini_cluster.add_node()  # the replacement machine
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert lost_after < STEPS, "the run ended before the node was lost; nothing was tested"
    assert "restart 1:" in log

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumes"] >= 1
    mb = 4  # tiny preset's micro_batch_size
    assert summary["samples_consumed"] == STEPS * mb * 2
    assert summary["samples_repeated"] == 0 and summary["samples_skipped"] == 0
    plan = read_placement(str(out))
    assert victim not in {w["node_id"] for w in plan["workers"]}

    ref = run_ranks(_reference, 2, [*common, f"run.output_dir={tmp_path / 'ref'}"])
    assert summary["final_loss"] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)


def test_lost_node_without_replacement_continues_on_fewer_replicas(ray_cluster, tmp_path) -> None:
    """Elastic continuation: 4 workers (2 per node, EP=2, so DP=2) lose the worker node and no
    node replaces it. With cluster.min_workers=2 the run goes on at DP=1 from the newest
    checkpoint (resharded), grad_accum doubled, and ends with the fault-free 4-rank run's
    loss, every global sample trained once."""
    from tests.distributed import run_ranks

    # aux_loss_coef=0: the load-balancing loss is the one term computed per micro-step over
    # the ranks present, so its value depends on the size (cluster/elastic.py).
    common = [f"train.steps={STEPS}", "parallel.ep=2", "model.moe.aux_loss_coef=0", *FAST]
    out = tmp_path / "run"
    proc = _launch(
        ray_cluster,
        out,
        [
            *common,
            "cluster.num_workers=4",
            "cluster.min_workers=2",
            "cluster.placement_strategy=PACK",
        ],
    )
    try:
        victim = _worker_node_of(ray_cluster, out, proc)
        assert len(read_placement(str(out))["workers"]) == 4
        lost_after = _steps(out)
        remove_node(ray_cluster, victim)  # and no replacement
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert lost_after < STEPS, "the run ended before the node was lost; nothing was tested"
    assert "elastic: 2 of 4 workers (1 data-parallel replicas of parallel.ep=2)" in log, log[-4000:]
    assert "train.grad_accum 1 -> 2 keeps the global batch at 16 rows" in log

    after = read_placement(str(out))
    assert len(after["workers"]) == 2 and victim not in {w["node_id"] for w in after["workers"]}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    sizes = [r["workers"] for r in records if "workers" in r]
    assert sizes[0] == 4 and sizes[-1] == 2, sizes

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumes"] >= 1
    mb = 4  # tiny preset's micro_batch_size; the global batch stays 4 workers' worth
    assert summary["samples_consumed"] == STEPS * mb * 4
    assert summary["samples_repeated"] == 0 and summary["samples_skipped"] == 0

    ref = run_ranks(_reference, 4, [*common, f"run.output_dir={tmp_path / 'ref'}"])
    assert summary["final_loss"] == pytest.approx(ref[0], rel=1e-4)
    assert summary["final_loss"] != pytest.approx(records[0]["lm_loss"], rel=1e-3)


def test_wait_for_names_what_did_not_happen() -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the impossible did not happen within 0\.2 s"):
        wait_for(lambda: False, timeout_s=0.2, what="the impossible")
    assert time.monotonic() - t0 < 5
