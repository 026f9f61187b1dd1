"""Elastic continuation on a Ray mini-cluster: what losing a node and getting it back costs,
against the run's own step time, and what the run loses (nothing, it must say).

A head and one worker node of `--cpus` CPUs each; the tiny preset at EP=2 on 4 workers, two
per node (DP=2), `cluster.min_workers=2`, a checkpoint every `--every` steps. At step
`--lose-at` the worker node is removed (no replacement): the run must go on at 2 workers
(DP=1, grad_accum 2). After `--regrow-after` steps at that size a node joins again: the run
must grow back to 4 workers (checked every `cluster.resize_check_s`). Then the same config
runs fault-free at 4 workers for the reference loss.

It prints, measured in this run:

- seconds from the node's removal to the first step logged at 2 workers, and from the new
  node's arrival to the first step at 4, each also in steps of the full-size run's median
  step time;
- the median step time at 2 workers over that at 4 (with grad_accum doubled, a step does
  the same work on half the workers);
- steps trained again after each restart (those after the newest checkpoint);
- samples consumed / repeated / skipped from the run's sample ledger;
- the final loss against the fault-free run's (aux loss off: the one term whose value
  depends on the size).

    python bench/elastic.py [--steps 60] [--lose-at 5] [--regrow-after 6] [--every 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from cluster.faults import read_placement, remove_node, wait_for  # noqa: E402


def _records(out: Path) -> list[dict[str, Any]]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in lines if x]


def _seen_at(
    out: Path, workers: int, skip: int, proc: subprocess.Popen, timeout_s: float = 300.0
) -> float:
    """Waits for a record at `workers` past the first `skip` records of the file and returns
    when it was seen (time.monotonic). The file is a local one, written line by line as the
    run logs, polled every 0.1 s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r.get("workers") == workers for r in _records(out)[skip:]):
            return time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before that")
        time.sleep(0.1)
    raise TimeoutError(f"no step at {workers} workers within {timeout_s:g} s")


def _reference(rank: int, world: int, overrides: list[str]) -> float:
    from trainer.config import load_config
    from trainer.loop import run

    cfg = load_config(ROOT / "infra/runs/tiny.yaml", overrides, ignore_sections=("cluster",))
    return run(cfg, local_rank=rank).final_loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lose-at", type=int, default=5)
    p.add_argument("--regrow-after", type=int, default=6)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    a = p.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from tests.distributed import run_ranks

    node = {"num_cpus": a.cpus, "object_store_memory": 80 * 1024**2}
    tmp = Path(tempfile.mkdtemp(prefix="moeyard-elastic-"))
    out = tmp / "run"
    common = [
        f"train.steps={a.steps}",
        "parallel.ep=2",
        "model.moe.aux_loss_coef=0",
        "data.corpus_max_bytes=300000",
        "ops.telemetry=false",
        "ops.stdout=false",
    ]
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.launch",
            "infra/runs/tiny.yaml",
            *common,
            f"checkpoint.every={a.every}",
            "checkpoint.async_save=false",
            f"run.output_dir={out}",
            "cluster.num_workers=4",
            "cluster.min_workers=2",
            "cluster.max_failures=-1",
            "cluster.resize_check_s=5",
            "cluster.placement_strategy=PACK",
            f"cluster.ray_address={cluster.address}",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def steps() -> int:
        return max((r["step"] for r in _records(out)), default=0)

    try:
        wait_for(
            lambda: steps() >= a.lose_at or proc.poll() is not None,
            timeout_s=300,
            what=f"step {a.lose_at}",
        )
        head = cluster.head_node.node_id
        victim = next(
            w["node_id"] for w in read_placement(str(out))["workers"] if w["node_id"] != head
        )
        skip = len(_records(out))
        t_lost = time.monotonic()
        remove_node(cluster, victim)
        shrink_s = _seen_at(out, 2, skip, proc) - t_lost
        shrunk_at = steps()
        wait_for(
            lambda: steps() >= shrunk_at + a.regrow_after or proc.poll() is not None,
            timeout_s=300,
            what="steps at 2 workers",
        )
        skip = len(_records(out))
        t_back = time.monotonic()
        cluster.add_node(**node)
        grow_s = _seen_at(out, 4, skip, proc) - t_back
        log, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        ray.shutdown()
        cluster.shutdown()
    if proc.returncode != 0:
        print(log[-4000:], file=sys.stderr)
        return 1

    recs = _records(out)
    summary = json.loads((out / "summary.json").read_text())
    ref = run_ranks(_reference, 4, [*common, f"run.output_dir={tmp / 'ref'}"])[0]
    step_s = {
        n: statistics.median(r["step_time_s"] for r in recs if r.get("workers") == n)
        for n in (4, 2)
    }
    # Steps trained again: a record whose step is not above the previous record's.
    redone, prev = [], 0
    for r in recs:
        if r["step"] <= prev:
            redone.append(prev - r["step"] + 1)
        prev = r["step"]
    print(f"run                         {a.steps} steps, tiny preset, EP=2, 4 -> 2 -> 4 workers")
    print(
        f"node lost -> step at 2      {shrink_s:.1f} s = {shrink_s / step_s[4]:.0f} full-size "
        f"steps ({step_s[4] * 1e3:.0f} ms each)"
    )
    print(
        f"node back -> step at 4      {grow_s:.1f} s = {grow_s / step_s[4]:.0f} full-size "
        "steps (resize checked every 5 s)"
    )
    print(f"step time at 2 / at 4       {step_s[2] / step_s[4]:.2f} (grad_accum 2 vs 1)")
    print(f"steps trained again         {redone} (after each restart)")
    print(
        f"samples                     consumed {summary['samples_consumed']}, repeated "
        f"{summary['samples_repeated']}, skipped {summary['samples_skipped']}, "
        f"resumes {summary['resumes']}"
    )
    print(
        f"final loss                  {summary['final_loss']:.6f} vs fault-free 4 workers "
        f"{ref:.6f} (|diff| {abs(summary['final_loss'] - ref):.2e})"
    )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
