"""The Ray soak: the real launcher (`python -m cluster.launch`, a subprocess) on a Ray
cluster, its worker processes signalled from outside as real faults come (`RunWatch`, on a
seeded `FaultPlan`), their memory sampled, then the same run without faults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.local_ray import LocalRayCluster
from cluster.rss import RssSample, WorkerLife, proc_memory, rss_verdict
from cluster.soak_report import compare_losses, final_lineage, ray_report_table
from trainer.config import ConfigError

RAY_KINDS = ("kill", "term")

ROOT = Path(__file__).resolve().parents[1]

# Seconds between looks at the run's files (metrics, checkpoints, placement).
_POLL_S = 0.1


class MetricsTail:
    """The records a run appends to its local metrics.jsonl, read as they come; a line is
    taken once complete, and a line that does not parse (cut by a kill mid-write) is left
    out."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                new.append(json.loads(line))
            except ValueError:
                continue
        self.records += new
        return new


class FaultPlan:
    """When, what and whom, seeded: for each fault an exponential gap (seconds of training
    in the current worker group) and a phase in the checkpoint interval, then, when it
    fires, a kind among `kinds` and a worker rank.

    The phase p (0 <= p < checkpoint.every) makes the fault wait, after its gap, until the
    newest logged step lies p or more steps past a checkpoint step, so that most faults
    lose steps trained since the newest checkpoint (they are trained again after the
    restart); p = 0 fires at once, often while a checkpoint is written, where a run on a
    small model spends most of its time."""

    def __init__(
        self, kinds: tuple[str, ...], *, mean_gap_s: float, seed: int, max_faults: int = 0
    ) -> None:
        self.kinds = kinds
        self.mean_gap_s = mean_gap_s
        self.max_faults = max_faults
        self.rng = random.Random(seed)

    def next(self, every: int) -> tuple[float, int]:
        """(gap in seconds, phase in steps) of the next fault."""
        gap = self.rng.expovariate(1 / self.mean_gap_s) if self.mean_gap_s > 0 else 0.0
        return gap, self.rng.randrange(every)

    def choose(self, ranks: list[int]) -> tuple[str, int]:
        return self.rng.choice(self.kinds), self.rng.choice(sorted(ranks))


@dataclass
class Watched:
    """What the soak saw of one launched run."""

    returncode: int
    wall_s: float
    log: Path
    records: list[dict[str, Any]]
    first_seen: dict[tuple[int, int], float]  # (restarts, step) -> seconds since launch
    faults: list[dict[str, Any]]
    lives: list[WorkerLife]
    summary: dict[str, Any]


class RaySoak:
    """Launches `cluster.launch` runs on a Ray cluster (`start`) and watches them from
    outside until they end (`watch`)."""

    def __init__(
        self,
        *,
        preset: str,
        overrides: list[str],
        address: str,
        workers: int,
        every: int,
        rss_every_s: float,
        log_dir: Path,
        env: dict[str, str],
    ) -> None:
        self.preset, self.overrides, self.address = preset, overrides, address
        self.env = env
        self.workers, self.every = workers, every
        self.rss_every_s = rss_every_s
        self.log_dir = log_dir

    def command(self, out: Path, steps: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cluster.launch",
            self.preset,
            *self.overrides,
            f"train.steps={steps}",
            f"run.output_dir={out}",
            f"cluster.num_workers={self.workers}",
            # Every fault restarts the worker group; the soak decides how many there are.
            "cluster.max_failures=-1",
            f"cluster.ray_address={self.address}",
        ]

    def start(self, out: Path, steps: int, plan: FaultPlan | None) -> RunWatch:
        log = self.log_dir / f"{out.name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                self.command(out, steps),
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        return RunWatch(proc, out, log, steps=steps, every=self.every, plan=plan)

    def watch(self, runs: list[RunWatch]) -> list[Watched]:
        """Looks at every run until each has ended; stops those still going if the soak
        itself is stopped."""
        next_rss = 0.0
        t0 = time.monotonic()
        try:
            while any(r.proc.poll() is None for r in runs):
                rss = time.monotonic() - t0 >= next_rss
                if rss:
                    next_rss += self.rss_every_s
                for r in runs:
                    if r.proc.poll() is None:
                        r.tick(sample_rss=rss)
                time.sleep(_POLL_S)
        finally:
            for r in runs:
                r.stop()
        return [r.result() for r in runs]

    def failed(self, w: Watched) -> str:
        log = w.log.read_text(errors="replace")
        return f"the launcher exited with {w.returncode} (log {w.log}):\n{log[-3000:]}"


class RunWatch:
    """One launched run seen from outside: its metrics, checkpoints and placement (worker
    pids) in run.output_dir, its workers' memory in /proc and, with a `plan`, signals to
    its worker processes.

    A fault is injected when the plan's gap has passed in the current worker group, that
    group has written a checkpoint after the one it resumed from (so the run always
    progresses), every worker of the group is alive, and the run is not in its last
    `checkpoint.every` steps."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        out: Path,
        log: Path,
        *,
        steps: int,
        every: int,
        plan: FaultPlan | None,
    ) -> None:
        self.proc, self.out, self.log = proc, out, log
        self.steps, self.every, self.plan = steps, every, plan
        self.t0 = time.monotonic()
        self.tail = MetricsTail(out / "metrics.jsonl")
        self.first_seen: dict[tuple[int, int], float] = {}
        self.lives: dict[tuple[int, int], WorkerLife] = {}
        self.groups: list[frozenset[int]] = []  # the pid sets placement.json has named
        self.faults: list[dict[str, Any]] = []
        self.terms: list[dict[str, Any]] = []  # SIGTERMs whose process has not exited yet
        self.last_step, self.lineage = 0, -1
        self.lineage_t, self.resumed_at = 0.0, 0  # when the current group logged first
        self.hit = -1  # the lineage the last fault hit; the next one waits for a newer group
        self.due, self.phase = plan.next(every) if plan else (0.0, 0)
        self.wall_s = 0.0

    def tick(self, *, sample_rss: bool) -> None:
        now = time.monotonic() - self.t0
        for r in self.tail.poll():
            step, restarts = int(r.get("step", 0)), int(r.get("restarts", 0))
            self.first_seen.setdefault((restarts, step), now)
            self.last_step = step
            if restarts > self.lineage:
                self.lineage, self.lineage_t, self.resumed_at = restarts, now, step - 1
        workers = _workers(self.out)
        pids = frozenset(pid for _, pid in workers)
        if pids and (not self.groups or self.groups[-1] != pids):
            self.groups.append(pids)
        if sample_rss:
            for rank, pid in workers:
                mem = proc_memory(pid)
                if mem is not None:
                    life = self.lives.get((rank, pid))
                    if life is None:
                        group = next(g for g, p in enumerate(self.groups) if pid in p)
                        life = self.lives[rank, pid] = WorkerLife(rank, pid, group)
                    life.samples.append(RssSample(now, self.last_step, self.lineage, *mem))
        for t in list(self.terms):
            if proc_memory(t["pid"]) is None:
                t["exited_after_s"] = round(now - t["t_s"], 2)
                self.terms.remove(t)
        plan = self.plan
        if (
            plan is not None
            and (plan.max_faults <= 0 or len(self.faults) < plan.max_faults)
            and self.lineage > self.hit
            and now >= self.lineage_t + self.due
            and self.last_step % self.every >= self.phase
            and self.last_step < self.steps - self.every
            and workers
            and all(proc_memory(pid) is not None for pid in pids)
        ):
            newest = newest_checkpoint(self.out)
            if newest > self.resumed_at:
                self._inject(plan, workers, newest, now)

    def _inject(
        self, plan: FaultPlan, workers: list[tuple[int, int]], newest: int, now: float
    ) -> None:
        kind, rank = plan.choose([r for r, _ in workers])
        pid = dict(workers)[rank]
        os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        fault = {
            "t_s": round(now, 2),
            "kind": kind,
            "rank": rank,
            "pid": pid,
            "lineage": self.lineage,
            "last_step": self.last_step,
            "newest_checkpoint": newest,
            "phase": self.phase,
        }
        self.faults.append(fault)
        if kind == "term":
            self.terms.append(fault)
        self.hit = self.lineage
        self.due, self.phase = plan.next(self.every)

    def stop(self) -> None:
        """Stops the launcher if it still runs (the soak itself was stopped)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.wall_s:
            self.wall_s = time.monotonic() - self.t0

    def result(self) -> Watched:
        self.tail.poll()
        summary: dict[str, Any] = {}
        if self.proc.returncode == 0:
            summary = json.loads((self.out / "summary.json").read_text())
        return Watched(
            returncode=int(self.proc.returncode),
            wall_s=self.wall_s,
            log=self.log,
            records=self.tail.records,
            first_seen=self.first_seen,
            faults=self.faults,
            lives=list(self.lives.values()),
            summary=summary,
        )


def _workers(out: Path) -> list[tuple[int, int]]:
    """(world rank, pid) of the workers in a run's placement.json (the newest worker
    group's: each group writes it when it starts)."""
    try:
        plan = json.loads((out / "placement.json").read_text())
        return [(int(w["world_rank"]), int(w["pid"])) for w in plan["workers"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # not written yet, or being rewritten


def newest_checkpoint(out: Path) -> int:
    """The step of a run's newest complete checkpoint (where a restarted group resumes)."""
    from trainer.checkpoint import scan

    return scan(str(out)).newest or 0


def training_rate(w: Watched) -> tuple[float, float, float]:
    """(seconds from launch to the first step, seconds per step, seconds from each fault
    to the restarted group's first step) of a watched run, from when its steps appeared."""
    by_lineage: dict[int, list[tuple[int, float]]] = {}
    for (lineage, step), t in w.first_seen.items():
        by_lineage.setdefault(lineage, []).append((step, t))
    startup = min(w.first_seen.values())
    span, steps = 0.0, 0
    for pts in by_lineage.values():
        pts.sort()
        if len(pts) > 1:
            span += pts[-1][1] - pts[0][1]
            steps += pts[-1][0] - pts[0][0]
    restarts = [
        min(by_lineage[f["lineage"] + 1], key=lambda p: p[1])[1] - f["t_s"]
        for f in w.faults
        if f["lineage"] + 1 in by_lineage
    ]
    return startup, span / max(1, steps), max(restarts, default=startup)


def plan_steps(
    minutes: float, *, startup_s: float, step_s: float, restart_s: float, gap_s: float, every: int
) -> int:
    """Steps for a faulty run of about `minutes`: between faults a group trains for about
    the mean gap (at least to its next checkpoint) after a restart of `restart_s`, and
    redoes about half a checkpoint interval of steps."""
    train_s = max(gap_s, every * step_s)
    cycles = max(0.0, minutes * 60 - startup_s) / (train_s + restart_s)
    new_per_cycle = max(1.0, train_s / step_s - every / 2)
    return max(2 * every, int(cycles * new_per_cycle))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_ray_soak(args: argparse.Namespace, kinds: tuple[str, ...], out: Path) -> int:
    """The Ray mode of main(): arguments checked, cluster up, calibration (--minutes), the
    faulty run, the fault-free run, the report."""
    from cluster.config import load_launch_config

    base = ["checkpoint.async_save=false", "ops.telemetry=false", "ops.stdout=false"]
    if not any(o.startswith("checkpoint.every=") for o in args.overrides):
        base.append("checkpoint.every=5")
    overrides = [*base, *args.overrides]
    try:
        cfg = load_launch_config(
            args.preset,
            [
                *overrides,
                f"train.steps={max(args.steps, 1)}",
                f"run.output_dir={out / 'soak'}",
                f"cluster.num_workers={args.workers}",
                "cluster.max_failures=-1",
            ],
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    every = cfg.checkpoint.every
    if every <= 0:
        print(
            "checkpoint.every must be > 0 for a soak: faults wait for a checkpoint", file=sys.stderr
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    given = next(
        (o.split("=", 1)[1] for o in args.overrides if o.startswith("cluster.ray_address=")), ""
    )
    gap = args.mean_gap or (args.minutes * 60 / 12 if args.minutes else 30.0)
    alongside = args.reference == "alongside"
    with contextlib.ExitStack() as stack:
        # A soak stopped by SIGTERM stops its launchers and the cluster it started, as on
        # Ctrl-C: the handler turns the signal into an exception that unwinds this block.
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        stack.callback(signal.signal, signal.SIGTERM, previous)
        cpus = args.workers * max(1, math.ceil(cfg.cluster.cpus_per_worker))
        address = given or stack.enter_context(
            LocalRayCluster(cpus * (2 if alongside else 1), out / "ray-head.log")
        )
        soak = RaySoak(
            preset=args.preset,
            overrides=[o for o in overrides if not o.startswith("cluster.ray_address=")],
            address=address,
            workers=args.workers,
            every=every,
            rss_every_s=args.rss_every,
            log_dir=out,
            env={} if given else LocalRayCluster.env,
        )
        calibration = None
        steps = args.steps
        if not steps:
            # A short run with one kill: the launch time, the step time and the restart
            # time on this cluster, to size the faulty run to --minutes.
            cal_steps = 8 * every
            one_kill = FaultPlan(("kill",), mean_gap_s=0.0, seed=args.seed, max_faults=1)
            (w,) = soak.watch([soak.start(out / "calibrate", cal_steps, one_kill)])
            if w.returncode != 0:
                print(soak.failed(w), file=sys.stderr)
                return 1
            startup, step_s, restart_s = training_rate(w)
            steps = plan_steps(
                args.minutes,
                startup_s=startup,
                step_s=step_s,
                restart_s=restart_s,
                gap_s=gap,
                every=every,
            )
            calibration = {
                "steps": cal_steps,
                "startup_s": round(startup, 1),
                "step_s": round(step_s, 4),
                "restart_s": round(restart_s, 1),
                "planned_steps": steps,
            }
            print(f"calibration: {json.dumps(calibration)}", flush=True)
        plan = FaultPlan(kinds, mean_gap_s=gap, seed=args.seed, max_faults=args.max_faults)
        runs = [soak.start(out / "soak", steps, plan)]
        if alongside:
            runs.append(soak.start(out / "reference", steps, None))
        watched = soak.watch(runs)
        faulty = watched[0]
        if faulty.returncode != 0:
            print(soak.failed(faulty), file=sys.stderr)
            return 1
        if not alongside:
            # The faulty part's figures are kept before the fault-free run starts, so a
            # soak cut short there still leaves them.
            (out / "soak-partial.json").write_text(
                json.dumps(
                    {"summary": faulty.summary, "faults": faulty.faults, "wall_s": faulty.wall_s}
                )
            )
            watched += soak.watch([soak.start(out / "reference", steps, None)])
        reference = watched[1]
        if reference.returncode != 0:
            print(soak.failed(reference), file=sys.stderr)
            return 1
    s, ref = faulty.summary, reference.summary
    by_kind: dict[str, int] = {}
    for fault in faulty.faults:
        by_kind[fault["kind"]] = by_kind.get(fault["kind"], 0) + 1
    verdict = dict(min_samples=args.rss_min_samples, tolerance_pct=args.rss_tolerance)
    rel = abs(s["final_loss"] - ref["final_loss"]) / max(abs(ref["final_loss"]), 1e-12)
    report = {
        "mode": "ray",
        "command": " ".join(["python -m cluster.soak", *args.argv]),
        "workers": args.workers,
        "seed": args.seed,
        "steps": s["steps"],
        "checkpoint_every": every,
        "mean_gap_s": round(gap, 2),
        "reference_run": args.reference,
        "minutes": round(faulty.wall_s / 60, 2),
        "reference_minutes": round(reference.wall_s / 60, 2),
        "faults": dict(sorted(by_kind.items())),
        "restarts": max((int(r.get("restarts", 0)) for r in faulty.records), default=0),
        "resumes": s.get("resumes"),
        "resumed_at_steps": s.get("accounting", {}).get("resumed_at_steps"),
        "faults_between_checkpoints": sum(
            f["last_step"] > f["newest_checkpoint"] for f in faulty.faults
        ),
        # Steps logged more than once: those after the newest checkpoint when a fault hit.
        "steps_trained_again": len(faulty.records) - len(final_lineage(faulty.records)),
        "samples_consumed": s["samples_consumed"],
        "samples_repeated": s["samples_repeated"],
        "samples_skipped": s["samples_skipped"],
        "reference_samples_consumed": ref["samples_consumed"],
        "final_loss": s["final_loss"],
        "reference_loss": ref["final_loss"],
        "final_loss_rel_diff": rel,
        "loss_curve": compare_losses(
            final_lineage(faulty.records), final_lineage(reference.records)
        ),
        "rss": rss_verdict(faulty.lives, **verdict),
        "rss_reference": rss_verdict(reference.lives, **verdict),
        "fault_log": faulty.faults,
        "calibration": calibration,
    }
    (out / "soak_report.json").write_text(json.dumps(report, indent=1))
    with open(out / "rss_samples.jsonl", "w") as f:
        for name, w in (("soak", faulty), ("reference", reference)):
            for life in w.lives:
                for x in life.samples:
                    f.write(
                        json.dumps(
                            {"run": name, "group": life.group, "rank": life.rank, "pid": life.pid}
                            | x.__dict__
                        )
                        + "\n"
                    )
    print(json.dumps(report, indent=1) if args.json else ray_report_table(report), flush=True)
    return 0
