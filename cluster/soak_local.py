"""The in-process soak: attempts of `trainer.loop.run` in this process, each stopped by an
injected fault (a crash between checkpoints, a SIGTERM, a non-finite loss) and resumed from
`run.output_dir` by the next, as a restarted worker would; then the same run without faults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cluster.rss import rss_bytes
from cluster.soak_report import SoakReport
from trainer.config import ConfigError, JobConfig, load_config

KINDS = ("crash", "preempt", "nan")


class InjectedCrash(RuntimeError):
    """The soak's stand-in for a process dying between checkpoints."""


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

    cfg: JobConfig = load_config(
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


def run_local_soak(args: argparse.Namespace, kinds: tuple[str, ...], out: Path) -> int:
    """The in-process mode of `python -m cluster.soak` (arguments already checked): the
    calibration (--minutes), the faulty run, the fault-free run, the report."""
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
        cfg: JobConfig = load_config(
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
