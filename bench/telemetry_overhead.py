"""Cost of telemetry and metric export per logged step, against the step time measured in
the same run.

Trains the tiny preset in this process (CPU here; a GPU where there is one), then replays
its last logged record through what the loop does at each logged step besides training:
`Telemetry.update` (NVML and RAPL reads where the machine has them, step and energy
metrics) and the sinks' `log` (the Prometheus client endpoint and metrics.jsonl). With
`run.log_every=1` (the worst case) that cost is paid every step; the budget is 1%.

    python bench/telemetry_overhead.py [--steps 40] [--reps 300]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from ops.config import OpsConfig
from ops.prometheus import build_prometheus_sink
from ops.sinks import JsonlSink, read_metrics
from ops.telemetry import Telemetry
from trainer.config import load_config
from trainer.flops import flops_per_token
from trainer.loop import device_identity, run


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--preset", default="infra/runs/tiny.yaml")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            args.preset,
            [
                f"run.output_dir={out}",
                "parallel.ep=1",
                f"train.steps={args.steps}",
                "ops.stdout=false",
            ],
        )
        run(cfg)
        records = read_metrics(f"{out}/metrics.jsonl")
        step_s = statistics.median(r["step_time_s"] for r in records[len(records) // 4 :])
        record = records[-1]

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        uuid, name = device_identity(device)
        ops = OpsConfig(prometheus="client", prometheus_port=free_port())
        telemetry = Telemetry(
            ops,
            rank=0,
            local_rank=0,
            world_size=1,
            gpu_uuid=uuid,
            device_name=name,
            flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
        )
        telemetry.start()
        prom = build_prometheus_sink(ops, run="bench", node="local", rank=0, local_rank=0, gpu=uuid)
        assert prom is not None
        jsonl = JsonlSink(f"{out}/bench.jsonl")

        def timed(fn) -> float:  # type: ignore[no-untyped-def]
            samples = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            return statistics.median(samples)

        base = {k: v for k, v in record.items() if k not in ("devices",)}

        def update() -> None:
            telemetry.update(
                copy.copy(base),
                window_s=step_s,
                window_steps=1,
                window_tokens=record["tokens_window"],
                window_data_wait_s=0.0,
            )

        full = copy.copy(base)
        update_rec = copy.copy(base)
        telemetry.update(
            update_rec,
            window_s=step_s,
            window_steps=1,
            window_tokens=record["tokens_window"],
            window_data_wait_s=0.0,
        )
        full.update(update_rec)
        t_update = timed(update)
        t_prom = timed(lambda: prom.log(full, record["step"]))
        t_jsonl = timed(lambda: jsonl.log(full, record["step"]))
        prom.close()
        jsonl.close()
        telemetry.close()

    total = t_update + t_prom
    rows = [
        ("device", name or "cpu"),
        ("GPU telemetry", "NVML" if telemetry.gpu and telemetry.gpu.available else "absent"),
        ("CPU energy", "RAPL" if telemetry.rapl and telemetry.rapl.available else "absent"),
        ("median step time (tiny preset)", f"{step_s * 1e3:.2f} ms"),
        ("Telemetry.update (sample + metrics)", f"{t_update * 1e6:.1f} us"),
        ("Prometheus client sink log", f"{t_prom * 1e6:.1f} us"),
        ("metrics.jsonl sink log (was there before)", f"{t_jsonl * 1e6:.1f} us"),
        ("sampling + export per logged step", f"{total * 1e6:.1f} us"),
        ("share of step time at log_every=1", f"{total / step_s * 100:.3f} % (budget 1 %)"),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
