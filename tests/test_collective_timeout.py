"""A rank that stops answering inside a collective: the other rank ends the run within
parallel.timeout_s (plus the watchdog's margin) with an error naming the collective, the step
and the rank that never arrived. Never a hang.

Two gloo ranks in their own processes, rendezvous through a file store. Rank 1 stops at step
3 before the gradient-norm all-reduce (over the mesh's dp_shard group, created with
parallel.timeout_s): asleep at EP=1 (gloo raises its own timeout, re-raised with context), or
SIGSTOPped at EP=2 (gloo usually raises first; the watchdog ends rank 0 when nothing does).
Gradients themselves are reduced inside backward by FSDP, in the forward/backward phase."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from trainer.resilience import WATCHDOG_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 3

_RANK = """
import datetime, os, signal, sys, time
sys.path.insert(0, {root!r})
rank = int(sys.argv[1])
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds={timeout}))
import trainer.loop as loop
from tests.test_checkpoint import small_cfg

if rank == 1:
    real = getattr(loop, {target!r})
    calls = [0]
    def stall(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # step 3
            if {how!r} == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            time.sleep(3600)
        return real(*args, **kwargs)
    setattr(loop, {target!r}, stall)
loop.run(small_cfg({out!r}, "parallel.ep={ep}", "train.steps=8",
                   "parallel.timeout_s={timeout}"))
print("finished", flush=True)
"""


def run_pair(tmp_path: Path, *, target: str, how: str, ep: int) -> tuple[int, str, float]:
    """Starts both ranks; returns rank 0's exit code, its stderr and its wall time."""
    script = _RANK.format(
        root=str(ROOT),
        store=str(tmp_path / "store"),
        timeout=TIMEOUT_S,
        target=target,
        how=how,
        ep=ep,
        out=str(tmp_path / "run"),
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    t0 = time.monotonic()
    try:
        # Generous bound for a loaded machine; a hang would run into it and fail the test.
        _, err = procs[0].communicate(timeout=120)
        return procs[0].returncode, err, time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL ends a stopped process too
                p.wait()


def test_sleeping_rank_in_grad_norm_all_reduce_is_named(tmp_path) -> None:
    rc, err, _ = run_pair(tmp_path, target="clip_grad_norm_", how="sleep", ep=1)
    assert rc != 0 and "finished" not in err
    assert "CollectiveTimeout" in err, err[-3000:]
    assert "in the gradient-norm all-reduce (clip_grad_norm_) at step 3" in err, err[-3000:]
    assert "not answering: rank 1 (entered it and stopped answering in it)" in err, err[-3000:]
    assert f"parallel.timeout_s ({TIMEOUT_S} s)" in err


def test_stopped_rank_at_ep2_ends_run_naming_it(tmp_path) -> None:
    # The mesh's groups carry parallel.timeout_s too, so gloo usually raises first (exit 1
    # with the named error); the watchdog (exit 124) is the backstop when nothing raises.
    rc, err, _ = run_pair(tmp_path, target="clip_grad_norm_", how="stop", ep=2)
    assert rc in (1, WATCHDOG_EXIT_CODE), err[-3000:]
    assert "in the gradient-norm all-reduce (clip_grad_norm_) at step 3" in err, err[-3000:]
    assert "not answering: rank 1 (entered it and stopped answering in it)" in err, err[-3000:]
