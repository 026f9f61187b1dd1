"""Soak mode: a CPU run of a chosen length with faults injected at random, then the same run
without faults, and a report of what survived.

    python -m cluster.soak --minutes 15 --out runs/soak [--faults crash,preempt] [key=value ...]
    python -m cluster.soak --ray --minutes 15 --out runs/soak-ray [--workers 2]
        [--faults kill,term] [key=value ...]

In-process (the default), each attempt trains in this process (`trainer.loop.run`) until a
fault stops it, then the next attempt resumes from `run.output_dir`, as a restarted worker
would:

- `crash`: the process "dies" between checkpoints (an exception out of the loop; the steps
  after the newest checkpoint are lost and trained again);
- `preempt`: SIGTERM to this process; the loop checkpoints and stops within
  `train.preempt_grace_s`;
- `nan`: the next step's loss is made non-finite, through the config hook an operator
  uses (`faults.nonfinite_loss_steps`, `trainer/fault_hook.py`); the loss guard skips it
  (this changes the model, so a soak with `nan` is not expected to match the fault-free loss).

The report: faults injected by kind, restarts, samples consumed / repeated / skipped (from the
sample ledger of the final summary), resident memory of the process over time (the first and
last quarter of the samples, and the peak: growth shows a leak across restarts), and the final
loss against the fault-free run of the same seed. Step count: `--steps`, or what fits in
`--minutes` after timing a few steps.

`--ray` runs the preset through the real launcher (`python -m cluster.launch`, a subprocess,
`cluster.max_failures=-1`, a checkpoint every `checkpoint.every` steps, 5 by default) with
`--workers` Ray Train workers, on `cluster.ray_address` when given, else on a one-node Ray
cluster it starts (`ray start --head` in a temporary folder of its own) and stops. From
outside, as real faults come, it signals a random worker process (its pid from the run's
placement.json, which each restarted worker group rewrites) at seeded exponential gaps
(`--mean-gap` seconds of training), only once the current worker group has written a
checkpoint after the one it resumed from, so the run always progresses:

- `kill`: SIGKILL (a worker lost to the OOM killer or a crash);
- `term`: SIGTERM. Under Ray Train the loop runs in a worker thread and cannot take the
  signal; Ray's worker exits on it, so Ray Train restarts the group as after a kill (the
  report says after how long each signalled process had exited).

It samples every `--rss-every` seconds the resident memory (VmRSS, and VmHWM for the peak)
of each worker process, keyed by rank and pid: a restart brings new processes, so growth is
judged within each worker's lifetime (first- against last-quarter median, while its group
trains). At the end the same config runs without faults (same seed, steps and workers), and
the report (printed, and in OUT/soak_report.json; every RSS sample in OUT/rss_samples.jsonl)
gives faults by kind, restarts, the sample ledger, RSS per worker lifetime with the verdict,
and the final loss and the per-step `lm_loss` of the final lineage against the fault-free
run's. `--minutes` sizes the faulty run from a short calibration run with one kill (launch,
step and restart times on this cluster).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from trainer.config import ConfigError, JobConfig, load_config

KINDS = ("crash", "preempt", "nan")


class InjectedCrash(RuntimeError):
    """The soak's stand-in for a process dying between checkpoints."""


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class SoakReport:
    steps: int
    wall_s: float
    faults: dict[str, int]
    restarts: int
    samples_consumed: int
    samples_repeated: int
    samples_skipped: int
    samples_guard_skipped: int
    final_loss: float
    reference_loss: float
    rss_first_quarter_mib: float
    rss_last_quarter_mib: float
    rss_peak_mib: float
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "rss_samples"}

    def table(self) -> str:
        diff = abs(self.final_loss - self.reference_loss)
        rows = [
            ("steps", f"{self.steps}"),
            ("wall time", f"{self.wall_s / 60:.1f} min"),
            ("faults injected", ", ".join(f"{k} {v}" for k, v in self.faults.items()) or "none"),
            ("restarts (resumes)", f"{self.restarts}"),
            ("samples consumed", f"{self.samples_consumed}"),
            ("samples repeated", f"{self.samples_repeated}"),
            ("samples skipped (lost)", f"{self.samples_skipped}"),
            ("samples skipped by the loss guard", f"{self.samples_guard_skipped}"),
            (
                "RSS first quarter / last quarter",
                f"{self.rss_first_quarter_mib:.0f} MiB / {self.rss_last_quarter_mib:.0f} MiB",
            ),
            ("RSS peak", f"{self.rss_peak_mib:.0f} MiB"),
            ("final loss (soak)", f"{self.final_loss:.6f}"),
            ("final loss (fault-free, same seed)", f"{self.reference_loss:.6f}"),
            ("difference", f"{diff:.3g}"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


class _Injector:
    """A metric sink that fires the planned fault when the run logs its step, and samples
    the process's RSS at every logged step."""

    def __init__(self, soak: Soak, at_step: int, cfg: JobConfig) -> None:
        self.soak, self.cfg = soak, cfg
        self.at_step, self.kind = at_step, soak.rng.choice(soak.kinds)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.soak.rss.append((time.monotonic() - self.soak.t0, rss_bytes()))
        if step != self.at_step:
            return
        kind = self.kind
        self.soak.faults[kind] = self.soak.faults.get(kind, 0) + 1
        # The run goes on after a skipped step: plan its next fault now.
        self.at_step, self.kind = step + self.soak.gap(), self.soak.rng.choice(self.soak.kinds)
        if kind == "crash":
            raise InjectedCrash(f"injected crash at step {step}")
        if kind == "preempt":
            os.kill(os.getpid(), signal.SIGTERM)
        elif kind == "nan":
            # The loop reads faults.* at every step: adding the next step to the running
            # config injects it there, as a preset listing it would.
            self.cfg.faults.nonfinite_loss_steps.append(step + 1)

    def close(self) -> None:
        pass


class Soak:
    def __init__(
        self,
        cfg: JobConfig,
        overrides: list[str],
        preset: str,
        *,
        kinds: tuple[str, ...],
        mean_gap_steps: float,
        seed: int,
    ) -> None:
        self.cfg, self.overrides, self.preset = cfg, overrides, preset
        self.kinds = kinds
        self.mean_gap = mean_gap_steps
        self.rng = random.Random(seed)
        self.faults: dict[str, int] = {}
        self.rss: list[tuple[float, int]] = []
        self.t0 = time.monotonic()

    def gap(self) -> int:
        """Steps to the next fault: exponential with the configured mean, at least 1."""
        return max(1, round(self.rng.expovariate(1 / self.mean_gap)))

    def _config(self, out: str) -> JobConfig:
        return load_config(
            self.preset, [*self.overrides, f"run.output_dir={out}"], ignore_sections=("cluster",)
        )

    def run(self, out: str, reference_out: str) -> SoakReport:
        import trainer.loop as loop

        steps = self.cfg.train.steps
        every = max(1, self.cfg.checkpoint.every)
        restarts = 0
        done_at, stuck = 0, False
        summary = None
        while summary is None or summary.steps < steps:
            # After a crash that lost every step since the newest checkpoint, give the
            # next attempt room to reach another one, so the soak always progresses.
            at = done_at + self.gap() + (every if stuck else 0)
            cfg = self._config(out)
            try:
                summary = loop.run(cfg, sinks=[_Injector(self, at, cfg), *loop.make_sinks(cfg, 0)])
            except InjectedCrash:
                summary = None
            if summary is None or summary.steps < steps:
                restarts += 1
            newest = self._progress(out)
            stuck, done_at = newest == done_at, newest
        wall = time.monotonic() - self.t0
        # The faulty part's figures are kept before the (as long) fault-free run starts, so
        # a soak cut short there still leaves them.
        Path(out, "soak-partial.json").write_text(
            json.dumps(
                {
                    **summary.to_dict(),
                    "faults": self.faults,
                    "restarts": restarts,
                    "soak_wall_s": wall,
                    "rss_samples": self.rss,
                }
            )
        )
        reference = loop.run(self._config(reference_out))
        rss = [b for _, b in self.rss] or [0]
        q = max(1, len(rss) // 4)
        mib = 1 / 2**20
        return SoakReport(
            steps=summary.steps,
            wall_s=wall,
            faults=dict(sorted(self.faults.items())),
            restarts=restarts,
            samples_consumed=summary.samples_consumed,
            samples_repeated=summary.samples_repeated,
            samples_skipped=summary.samples_skipped,
            samples_guard_skipped=summary.samples_guard_skipped,
            final_loss=summary.final_loss,
            reference_loss=reference.final_loss,
            rss_first_quarter_mib=sum(rss[:q]) / q * mib,
            rss_last_quarter_mib=sum(rss[-q:]) / q * mib,
            rss_peak_mib=max(rss) * mib,
            rss_samples=list(self.rss),
        )

    @staticmethod
    def _progress(out: str) -> int:
        """The newest complete checkpoint's step (where the next attempt resumes)."""
        from trainer.checkpoint import scan

        return scan(out).newest or 0


def calibrate_steps(preset: str, overrides: list[str], out: str, minutes: float) -> int:
    """How many steps fit in `minutes` for the soak and its fault-free twin, from a timed
    30-step run (the last 20 steps: the first ones warm up). The soak gets half the time,
    less its restarts (about 16 starts) and the steps they train again."""
    from trainer.loop import run

    cfg = load_config(
        preset,
        [*overrides, "train.steps=30", "checkpoint.every=0", f"run.output_dir={out}"],
        ignore_sections=("cluster",),
    )
    stamps: list[float] = []

    class Clock:
        def log(self, metrics: dict[str, Any], step: int) -> None:
            stamps.append(time.monotonic())

        def close(self) -> None:
            pass

    t0 = time.monotonic()
    run(cfg, sinks=[Clock()])
    setup_s = stamps[0] - t0  # paid again by every attempt
    per_step = (stamps[-1] - stamps[9]) / (len(stamps) - 10)
    budget = minutes * 60 / 2 - 16 * setup_s
    # Each restart trains again up to checkpoint.every steps; count half of those on average.
    return max(10, int(budget / per_step * 0.9))


# --- Ray mode: the real launcher on a Ray cluster, faults from outside --------------------

RAY_KINDS = ("kill", "term")
ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# Seconds between looks at the run's files (metrics, checkpoints, placement).
_POLL_S = 0.1


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a live process in bytes, from /proc/PID/status; None when the
    process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("State", "VmRSS", "VmHWM"):
            fields[key] = value.split()
    if fields.get("State", ["Z"])[0] in ("Z", "X") or not fields.get("VmRSS"):
        return None
    rss = int(fields["VmRSS"][0]) * 1024
    hwm = int(fields.get("VmHWM", fields["VmRSS"])[0]) * 1024
    return rss, hwm


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


def final_lineage(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Step -> the record of the attempt the final model descends from. An attempt after a
    restart logs again the steps after the checkpoint it resumed from, so the last record
    of each step (in file order) is the one that counts."""
    return {int(r["step"]): r for r in records if "step" in r}


def compare_losses(
    run: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], key: str = "lm_loss"
) -> dict[str, Any]:
    """Per-step `key` of two lineages: the steps both logged, the largest |difference| and
    whether every value is bit-identical."""
    steps = sorted(set(run) & set(reference))
    diffs = [abs(float(run[s][key]) - float(reference[s][key])) for s in steps]
    return {
        "key": key,
        "steps_compared": len(steps),
        "steps_run": len(run),
        "steps_reference": len(reference),
        "max_abs_diff": max(diffs, default=0.0),
        "bit_identical": bool(steps) and all(run[s][key] == reference[s][key] for s in steps),
    }


def _median(xs: list[int]) -> float:
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def _slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute (0 with fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mt) * (r - mr) for t, r in points)
    return cov / var * 60 / MIB


@dataclass
class RssSample:
    t: float  # seconds since the soak's run started
    step: int  # the newest step the run had logged
    lineage: int  # the run's restart count at that time
    rss: int
    hwm: int


@dataclass
class WorkerLife:
    """One worker process (a world rank and a pid): its RSS from its first sample to its
    death. A restarted worker group has new processes, so each lifetime is judged alone."""

    rank: int
    pid: int
    group: int  # which worker group (0: the first; n: after n restarts)
    samples: list[RssSample] = field(default_factory=list)

    def summary(self, *, min_samples: int) -> dict[str, Any]:
        """First- and last-quarter medians of RSS, taken over the samples after its group
        logged its first step (setup, model build and data load come before), the peak
        (VmHWM, over its whole life) and the slope over the second half."""
        train = [s for s in self.samples if s.lineage >= self.group] or self.samples
        rss = [s.rss for s in train]
        q = max(1, len(rss) // 4)
        first, last = _median(rss[:q]), _median(rss[-q:])
        half = train[len(train) // 2 :]
        return {
            "rank": self.rank,
            "pid": self.pid,
            "group": self.group,
            "start_s": round(self.samples[0].t, 1),
            "end_s": round(self.samples[-1].t, 1),
            "lifetime_s": round(self.samples[-1].t - self.samples[0].t, 1),
            "steps": [train[0].step, train[-1].step],
            "samples": len(self.samples),
            "samples_training": len(train),
            "judged": len(train) >= min_samples,
            "rss_first_quarter_mib": round(first / MIB, 1),
            "rss_last_quarter_mib": round(last / MIB, 1),
            "growth_mib": round((last - first) / MIB, 1),
            "growth_pct": round((last - first) / first * 100, 2) if first else 0.0,
            "slope_second_half_mib_per_min": round(
                _slope_mib_per_min([(s.t, s.rss) for s in half]), 2
            ),
            "rss_peak_mib": round(max(s.hwm for s in self.samples) / MIB, 1),
        }


def rss_verdict(
    lives: list[WorkerLife], *, min_samples: int, tolerance_pct: float
) -> dict[str, Any]:
    """Per worker lifetime figures and the verdict: the largest growth within one lifetime
    (among those with at least `min_samples` samples while training) against
    `tolerance_pct`."""
    rows = [w.summary(min_samples=min_samples) for w in lives if w.samples]
    judged = [r for r in rows if r["judged"]]
    verdict: dict[str, Any] = {
        "lifetimes": len(rows),
        "judged_lifetimes": len(judged),
        "min_samples": min_samples,
        "tolerance_pct": tolerance_pct,
        "rss_peak_mib": max((r["rss_peak_mib"] for r in rows), default=0.0),
    }
    if judged:
        worst = max(judged, key=lambda r: r["growth_pct"])
        longest = max(judged, key=lambda r: r["lifetime_s"])
        verdict |= {
            "max_growth_mib": worst["growth_mib"],
            "max_growth_pct": worst["growth_pct"],
            "max_growth_worker": {"rank": worst["rank"], "pid": worst["pid"]},
            "longest_lifetime": {
                k: longest[k]
                for k in (
                    "rank",
                    "pid",
                    "lifetime_s",
                    "growth_mib",
                    "growth_pct",
                    "slope_second_half_mib_per_min",
                    "rss_peak_mib",
                )
            },
            "growth": worst["growth_pct"] > tolerance_pct,
        }
    else:
        verdict["growth"] = None  # no lifetime long enough to tell
    return {"verdict": verdict, "workers": rows}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A one-node Ray cluster on this machine for the soak: `ray start --head --block` in a
    temporary folder of its own (so it never becomes the cluster that `ray_address=auto`
    finds), stopped on exit: SIGTERM makes `ray start --block` stop every process it
    started; its process group is killed if it does not within `stop_timeout_s`."""

    def __init__(self, num_cpus: int, log: Path, *, start_timeout_s: float = 180.0) -> None:
        self.num_cpus = num_cpus
        self.log = log
        self.start_timeout_s = start_timeout_s
        self.temp = ""
        self.proc: subprocess.Popen[bytes] | None = None

    # A cluster bound to 127.0.0.1 for the soak alone: no token auth (its clients, the
    # launchers, run with the same setting and send none).
    env: ClassVar[dict[str, str]] = {"RAY_AUTH_MODE": "disabled"}

    def __enter__(self) -> str:
        import tempfile

        # Short: Ray's socket paths live in it and are limited to 107 bytes.
        self.temp = tempfile.mkdtemp(prefix="moeyard-soak-")
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--num-cpus={self.num_cpus}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            # Other Ray clusters may run on this machine: no fixed port of Ray's defaults.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--temp-dir={self.temp}",
            f"--object-store-memory={100 * MIB}",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                # Nothing to drain when the soak is over: stop at once.
                env={**os.environ, **self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        address_file = Path(self.temp, "ray_current_cluster")
        deadline = time.monotonic() + self.start_timeout_s
        while not (address_file.exists() and address_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"the local Ray cluster did not start (log {self.log}):\n{tail}")
            time.sleep(0.2)
        return address_file.read_text().strip()

    def __exit__(self, *exc: object) -> None:
        import shutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its processes
                self.proc.wait()
        if self.temp:
            shutil.rmtree(self.temp, ignore_errors=True)


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
            newest = Soak._progress(str(self.out))
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


def ray_report_table(r: dict[str, Any]) -> str:
    loss, rss = r["loss_curve"], r["rss"]["verdict"]
    faults = ", ".join(f"{k} {v}" for k, v in r["faults"].items()) or "none"
    rows = [
        ("mode", f"Ray, {r['workers']} workers, seed {r['seed']}"),
        ("faulty run", f"{r['minutes']:.1f} min, {r['steps']} steps"),
        ("fault-free run", f"{r['reference_minutes']:.1f} min"),
        ("faults injected", faults),
        ("restarts (worker groups started again)", f"{r['restarts']}"),
        (
            "faults between checkpoints",
            f"{r['faults_between_checkpoints']} ({r['steps_trained_again']} steps trained again)",
        ),
        ("samples consumed", f"{r['samples_consumed']}"),
        ("samples repeated", f"{r['samples_repeated']}"),
        ("samples skipped (lost)", f"{r['samples_skipped']}"),
        ("final loss (soak)", f"{r['final_loss']:.6f}"),
        ("final loss (fault-free, same seed)", f"{r['reference_loss']:.6f}"),
        (
            f"{loss['key']} per step vs fault-free",
            f"{loss['steps_compared']} steps, max |diff| {loss['max_abs_diff']:.3g}, "
            f"bit-identical: {loss['bit_identical']}",
        ),
        (
            "worker lifetimes (judged)",
            f"{rss['lifetimes']} ({rss['judged_lifetimes']} with >= {rss['min_samples']} "
            "samples while training)",
        ),
        ("RSS peak (VmHWM), any worker", f"{rss['rss_peak_mib']:.0f} MiB"),
    ]
    if rss["judged_lifetimes"]:
        lg = rss["longest_lifetime"]
        rows += [
            (
                "RSS growth within a lifetime, max",
                f"{rss['max_growth_mib']:+.1f} MiB ({rss['max_growth_pct']:+.2f} %); "
                f"growth over {rss['tolerance_pct']:g} %: {rss['growth']}",
            ),
            (
                "longest lifetime",
                f"rank {lg['rank']} pid {lg['pid']}: {lg['lifetime_s'] / 60:.1f} min, "
                f"{lg['growth_mib']:+.1f} MiB ({lg['growth_pct']:+.2f} %), second half "
                f"{lg['slope_second_half_mib_per_min']:+.2f} MiB/min, peak {lg['rss_peak_mib']:.0f} MiB",
            ),
        ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("per worker lifetime (group rank pid: minutes, RSS q1 -> q4 median, peak):")
    lines += [
        f"  {x['group']} {x['rank']} {x['pid']}: {x['lifetime_s'] / 60:.1f} min, "
        f"{x['rss_first_quarter_mib']:.0f} -> {x['rss_last_quarter_mib']:.0f} MiB "
        f"({x['growth_mib']:+.1f}), peak {x['rss_peak_mib']:.0f} MiB"
        + ("" if x["judged"] else " (too short to judge)")
        for x in r["rss"]["workers"]
    ]
    return "\n".join(lines)


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
    for f in faulty.faults:
        by_kind[f["kind"]] = by_kind.get(f["kind"], 0) + 1
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="a fresh local folder for the soak's runs")
    ap.add_argument(
        "--preset", default=str(Path(__file__).resolve().parents[1] / "infra/runs/tiny.yaml")
    )
    ap.add_argument("--minutes", type=float, default=0.0, help="soak length (sets the steps)")
    ap.add_argument("--steps", type=int, default=0, help="steps instead of --minutes")
    ap.add_argument(
        "--faults",
        default="",
        help=f"kinds among {','.join(KINDS)} (default crash,preempt); with --ray among "
        f"{','.join(RAY_KINDS)} (default kill)",
    )
    ap.add_argument(
        "--mean-gap",
        type=float,
        default=0.0,
        help="mean steps between faults; with --ray, mean seconds of training between faults",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ray = ap.add_argument_group("Ray mode: the real launcher on a Ray cluster")
    ray.add_argument("--ray", action="store_true", help="run through python -m cluster.launch")
    ray.add_argument("--workers", type=int, default=2, help="cluster.num_workers")
    ray.add_argument(
        "--reference",
        choices=("after", "alongside"),
        default="after",
        help="the fault-free run after the faulty one, or at the same time (twice the CPUs)",
    )
    ray.add_argument("--max-faults", type=int, default=0, help="inject at most N (0: no limit)")
    ray.add_argument("--rss-every", type=float, default=2.0, help="seconds between RSS samples")
    ray.add_argument(
        "--rss-min-samples",
        type=int,
        default=8,
        help="samples a worker lifetime needs (while training) to be judged for growth",
    )
    ray.add_argument(
        "--rss-tolerance",
        type=float,
        default=5.0,
        help="RSS growth within a worker lifetime, in %%, above which the report says growth",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    known = RAY_KINDS if args.ray else KINDS
    kinds = tuple(k for k in (args.faults or ("kill" if args.ray else "crash,preempt")).split(","))
    bad = [k for k in kinds if k not in known]
    if bad or not all(kinds):
        print(f"--faults: unknown kind(s) {bad or '(none)'}; choose among {known}", file=sys.stderr)
        return 2
    if (args.minutes > 0) == (args.steps > 0):
        print("give exactly one of --minutes and --steps", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"--out {out} is not empty: a soak starts from scratch", file=sys.stderr)
        return 2
    if args.ray:
        if args.workers < 1 or args.rss_every <= 0 or args.max_faults < 0:
            print(
                f"--workers ({args.workers}) must be >= 1, --rss-every ({args.rss_every}) > 0 "
                f"and --max-faults ({args.max_faults}) >= 0",
                file=sys.stderr,
            )
            return 2
        return run_ray_soak(args, kinds, out.resolve())
    base = [
        "parallel.ep=1",
        "checkpoint.async_save=false",
        "ops.telemetry=false",
        "ops.stdout=false",
    ]
    if not any(o.startswith("checkpoint.every=") for o in args.overrides):
        base.append("checkpoint.every=5")
    overrides = [*base, *args.overrides]
    try:
        steps = args.steps or calibrate_steps(
            args.preset, overrides, str(out / "calibrate"), args.minutes
        )
        overrides.append(f"train.steps={steps}")
        cfg = load_config(
            args.preset,
            [*overrides, f"run.output_dir={out / 'soak'}"],
            ignore_sections=("cluster",),
        )
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    gap = args.mean_gap or max(3.0, steps / 16)
    report = Soak(cfg, overrides, args.preset, kinds=kinds, mean_gap_steps=gap, seed=args.seed).run(
        str(out / "soak"), str(out / "reference")
    )
    (out / "soak-report.json").write_text(
        json.dumps({**report.to_dict(), "rss_samples": report.rss_samples}, indent=1)
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
