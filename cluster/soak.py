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

The rooms: cluster/soak_local.py (the in-process soak), cluster/soak_ray.py (the Ray soak),
cluster/local_ray.py (the Ray cluster it starts), cluster/rss.py (memory sampling) and
cluster/soak_report.py (the reports); this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.soak_local import KINDS, run_local_soak
from cluster.soak_ray import RAY_KINDS, run_ray_soak


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
    return run_local_soak(args, kinds, out)


if __name__ == "__main__":
    sys.exit(main())
