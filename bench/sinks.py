"""Per-step cost of the TensorBoard and W&B sinks at `run.log_every=1`, against the step time
measured in the same run.

Trains the tiny preset in this process (CPU here; a GPU where there is one), then replays its
last logged record (every scalar, the MoE layers' loads) through:
- `TensorBoardSink.log` into a local folder (what the loop waits for; nothing runs behind);
- TensorBoard's own record checksum (pure-Python CRC32C, as its `EventFileWriter` computes
  it) over the same event, the reason the sink frames records itself;
- `WandbSink.log` (offline): what the loop waits for (the record handed to the sender
  thread), and, timed apart, what the sender thread spends per record (`wandb`'s `run.log`)
  and per heat map (rendered every `ops.wandb_image_every` = 100 logged steps by default);
- then, end to end, one run of `--ab-steps` steps whose trackers are switched on and off in
  blocks of `BLOCK` steps: the median step time of the steps after an "on" block's logged
  steps against those after an "off" block's (the sender thread's share of the CPU shows
  there; alternating blocks within one run keeps a shared machine's load drift out of the
  comparison). The budget is 1% of step time.

    python bench/sinks.py [--steps 40] [--reps 300] [--ab-steps 800]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ops.config import OpsConfig
from ops.sinks import read_metrics
from ops.tb_sink import TensorBoardSink
from ops.trackers import expert_load, scalars
from ops.wandb_sink import WandbSink, heatmap
from trainer.config import load_config
from trainer.loop import make_sinks, run


def timed(fn: Callable[[], Any], reps: int) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def step_time(preset: str, out: str, steps: int, *extra: str) -> float:
    cfg = load_config(
        preset,
        [
            f"run.output_dir={out}",
            "parallel.ep=1",
            f"train.steps={steps}",
            "run.log_every=1",
            "ops.stdout=false",
            *extra,
        ],
        ignore_sections=("cluster",),
    )
    run(cfg)
    records = read_metrics(f"{out}/metrics.jsonl")
    return statistics.median(r["step_time_s"] for r in records[len(records) // 4 :])


BLOCK = 2


class Gate:
    """Forwards to `sinks` in alternate blocks of BLOCK steps; records which steps ran
    after a forwarded log."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks
        self.after_on: set[int] = set()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if (step // BLOCK) % 2 == 0:
            for s in self.sinks:
                s.log(metrics, step)
            self.after_on.add(step + 1)  # its step time holds this log's cost

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def alternating(
    preset: str, out: str, steps: int, which: tuple[str, ...]
) -> tuple[float, float, int]:
    """(median step time after an on block's logs, after an off block's, steps compared),
    with the trackers `which` (tensorboard, wandb) switched on and off."""
    cfg = load_config(
        preset,
        [
            f"run.output_dir={out}",
            "parallel.ep=1",
            f"train.steps={steps}",
            "run.log_every=1",
            "ops.stdout=false",
            *(f"ops.{w}=true" for w in which),
            *(["ops.wandb_mode=offline"] if "wandb" in which else []),
        ],
        ignore_sections=("cluster",),
    )
    sinks = make_sinks(cfg, 0)
    trackers = [s for s in sinks if isinstance(s, TensorBoardSink | WandbSink)]
    gate = Gate(trackers)
    run(cfg, sinks=[*(s for s in sinks if s not in trackers), gate])
    records = read_metrics(f"{out}/metrics.jsonl")[steps // 10 :]  # past the warm-up
    # The first step of a block follows the other kind's last log: left out.
    inside = [r for r in records if r["step"] % BLOCK != 0]
    on = [r["step_time_s"] for r in inside if r["step"] in gate.after_on]
    off = [r["step_time_s"] for r in inside if r["step"] not in gate.after_on]
    return statistics.median(on), statistics.median(off), min(len(on), len(off))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--ab-steps", type=int, default=800)
    p.add_argument("--preset", default="infra/runs/tiny.yaml")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    with tempfile.TemporaryDirectory() as tmp:
        step_s = step_time(args.preset, f"{tmp}/ref", args.steps)
        record = read_metrics(f"{tmp}/ref/metrics.jsonl")[-1]
        step = record.pop("step")

        tb = TensorBoardSink(f"{tmp}/tb", config_text="bench: true\n")
        counter = iter(range(step, 10**9))
        t_tb = timed(lambda: tb.log(record, next(counter)), args.reps)
        event_bytes = tb._size / (
            args.reps + 3
        )  # the file also holds a header, a purge marker, the config
        tb.close()
        event = b"x" * int(event_bytes)
        t_crc = timed(lambda: (masked_crc32c(event[:8]), masked_crc32c(event)), 50)

        ops = OpsConfig(wandb=True, wandb_mode="offline", wandb_dir=f"{tmp}/wandb")
        wb = WandbSink(ops, output_dir=f"{tmp}/wb", run_name="bench", config={})
        wb.image_every = 0  # images are timed apart
        counter = iter(range(step, 10**9))
        t_wb = timed(lambda: wb.log(record, next(counter)), args.reps)
        while not wb._queue.empty():  # the sender catches up before it is timed itself
            time.sleep(0.01)
        time.sleep(0.5)
        flat = scalars(record)
        t_send = timed(lambda: wb.run.log(dict(flat), step=next(counter)), args.reps)
        loads = expert_load(record)
        t_image = timed(lambda: wb._wandb.Image(heatmap(loads)), 20)
        wb.close()

        ends = {
            which: alternating(args.preset, f"{tmp}/ab-{'-'.join(which)}", args.ab_steps, which)
            for which in (("tensorboard", "wandb"), ("tensorboard",), ("wandb",))
        }

    def share(t: float) -> str:
        return f"{t * 1e6:8.1f} us  {t / step_s * 100:6.3f} % of a step"

    rows = [
        ("device", "cuda" if torch.cuda.is_available() else "cpu"),
        ("median step time (tiny preset, log_every=1)", f"{step_s * 1e3:.2f} ms"),
        ("scalars per record", f"{len(scalars(record))} + {len(loads)} histograms"),
        ("TensorBoardSink.log (local folder)", share(t_tb)),
        (f"  TensorBoard's own CRC for its {event_bytes:.0f} B", share(t_crc)),
        ("WandbSink.log (the loop's part)", share(t_wb)),
        ("  wandb run.log per record (sender thread)", share(t_send)),
        ("  heat map image (sender, every 100th)", share(t_image)),
        ("  sender thread, amortized", share(t_send + t_image / 100)),
        ("both sinks, the loop's part", share(t_tb + t_wb)),
    ]
    for which, (on, off, n) in ends.items():
        rows.append(
            (
                f"end to end, {' + '.join(which)}: on/off - 1 ({n} steps each)",
                f"{(on / off - 1) * 100:+.2f} % (on {on * 1e3:.2f} ms, off {off * 1e3:.2f} ms)",
            )
        )
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
