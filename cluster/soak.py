"""Soak mode: a CPU run of a chosen length with faults injected at random steps, then the same
run without faults, and a report of what survived.

    python -m cluster.soak --minutes 15 --out runs/soak [--faults crash,preempt] [key=value ...]

Each attempt trains in this process (`trainer.loop.run`) until a fault stops it, then the next
attempt resumes from `run.output_dir`, as a restarted worker would:

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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="a fresh local folder for the soak's runs")
    ap.add_argument(
        "--preset", default=str(Path(__file__).resolve().parents[1] / "infra/runs/tiny.yaml")
    )
    ap.add_argument("--minutes", type=float, default=0.0, help="soak length (sets the steps)")
    ap.add_argument("--steps", type=int, default=0, help="steps instead of --minutes")
    ap.add_argument("--faults", default="crash,preempt", help=f"kinds among {','.join(KINDS)}")
    ap.add_argument("--mean-gap", type=float, default=0.0, help="mean steps between faults")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault schedule")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.faults.split(",") if k)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        print(f"--faults: unknown kind(s) {bad or '(none)'}; choose among {KINDS}", file=sys.stderr)
        return 2
    if (args.minutes > 0) == (args.steps > 0):
        print("give exactly one of --minutes and --steps", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"--out {out} is not empty: a soak starts from scratch", file=sys.stderr)
        return 2
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
