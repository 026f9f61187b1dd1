"""Preemption: SIGTERM makes the loop finish its step, write a complete checkpoint and stop;
the resumed run ends where the fault-free run ends, with no sample lost or repeated. Two ranks
stop at the same step when only one is signalled, and a grace time too short for the save
ends the process with 143 and no checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.distributed import run_ranks
from tests.test_checkpoint import small_cfg
from trainer.checkpoint import scan
from trainer.loop import run
from trainer.resilience import PREEMPT_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
MB = 2  # train.micro_batch_size of small_cfg

_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.test_checkpoint import small_cfg
from trainer.loop import run
run(small_cfg({out!r}, "parallel.ep=1", "train.steps={steps}", "ops.stdout=true", *{extra!r}))
"""


def start(out: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _RUN.format(root=str(ROOT), out=out, steps=STEPS, extra=extra)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_after(proc: subprocess.Popen[str], step: int) -> list[str]:
    """Reads the run's stdout until it logged `step`, then sends SIGTERM; returns the lines."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step} "):
            proc.send_signal(signal.SIGTERM)
            break
    return lines


def test_sigterm_checkpoints_and_resume_matches_fault_free(tmp_path) -> None:
    out = str(tmp_path / "pre")
    proc = start(out)
    said = signal_after(proc, 3)
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    said_all = "".join(said) + rest
    assert "preempted: stopped after step" in said_all, said_all[-2000:]
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] is True and 3 <= stopped < STEPS
    assert scan(out).complete == [stopped]  # the preemption checkpoint, complete

    resumed = run(small_cfg(out, "parallel.ep=1", f"train.steps={STEPS}"))
    straight = run(small_cfg(str(tmp_path / "straight"), "parallel.ep=1", f"train.steps={STEPS}"))
    assert resumed.losses == straight.losses[stopped:]
    assert resumed.samples_consumed == STEPS * MB
    assert (resumed.samples_repeated, resumed.samples_skipped, resumed.resumes) == (0, 0, 1)
    assert not resumed.preempted


def test_grace_too_short_exits_143_without_checkpoint(tmp_path) -> None:
    out = str(tmp_path / "short")
    proc = start(out, "train.preempt_grace_s=0.001")
    signal_after(proc, 2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPT_EXIT_CODE, err[-2000:]
    assert "train.preempt_grace_s (0.001 s) ran out" in err
    assert scan(out).complete == []


class SignalSelfAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        pass


def _one_rank_signalled(rank: int, world: int, out: str) -> tuple[int, bool, int, int, int]:
    sinks = [SignalSelfAt(3)] if rank == 1 else None
    s = run(small_cfg(out, "parallel.ep=2", f"train.steps={STEPS}"), sinks=sinks)
    return s.steps, s.preempted, s.samples_consumed, s.samples_repeated, s.samples_skipped


def test_one_rank_signalled_all_ranks_stop_together(tmp_path) -> None:
    out = str(tmp_path / "two")
    # Rank 1 is signalled after step 3's all-reduce: its flag travels in step 4's.
    # 4 steps x 2 ranks x MB samples each, the same ledger on both ranks.
    assert run_ranks(_one_rank_signalled, 2, out) == [(4, True, 4 * 2 * MB, 0, 0)] * 2
    assert scan(out).complete == [4]
