"""FSDP on one rank against one process, on the CPU: what gathering each unit once a step and
reducing its gradients once a step (`trainer.loop.keeps_gathered`, at dp_shard 1) saves
against FSDP's default schedule (every micro-batch gathers, re-gathers in backward and
reduces), with one process as the reference, in the same run.

The tiny preset at dim 128, 4 layers, fp32, grad_accum 4, through trainer.loop's setup and
train_step; FSDP on a one-rank gloo group. Per repeat each variant (in a rotating order) is
set up, warmed up by 2 steps and timed over --steps steps; the medians of the repeats.

    python bench/fsdp_one_rank.py [--steps 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import trainer.loop as loop
from trainer.config import load_config

PRESET = os.path.join(os.path.dirname(__file__), "..", "infra", "runs", "tiny.yaml")
VARIANTS = ("one process", "FSDP 1 rank, once a step", "FSDP 1 rank, default schedule")


@contextlib.contextmanager
def variant(name: str, tmp: str) -> Iterator[None]:
    real = loop.keeps_gathered
    if name == "one process":
        yield
        return
    if name.endswith("default schedule"):
        loop.keeps_gathered = lambda mesh: False  # type: ignore[assignment]
    store = dist.FileStore(os.path.join(tmp, f"store-{time.monotonic_ns()}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        loop.keeps_gathered = real  # type: ignore[assignment]


def time_variant(name: str, steps: int, tmp: str) -> float:
    cfg = load_config(
        PRESET,
        [
            "parallel.ep=1",
            "model.dim=128",
            "model.num_layers=4",
            "train.grad_accum=4",
            "train.device=cpu",
            "ops.telemetry=false",
            "data.corpus_max_bytes=200000",
            f"run.output_dir={tmp}/{name.replace(' ', '_')}",
        ],
        ignore_sections=("cluster",),
    )
    with variant(name, tmp):
        state = loop.setup(cfg)
        try:
            for _ in range(2):
                loop.train_step(state)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loop.train_step(state)
                times.append(time.perf_counter() - t0)
        finally:
            state.source.close()
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    res: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for v in order:
                res[v].append(time_variant(v, args.steps, tmp))
            print("  repeat", r + 1, "  ".join(f"{v} {res[v][-1] * 1e3:.1f} ms" for v in VARIANTS))
    ref = statistics.median(res["one process"])
    for v in VARIANTS:
        m = statistics.median(res[v])
        # Each repeat against the one-process run of the same repeat: neighbours in time share
        # the machine's load, so on a shared machine this is the steadier figure.
        paired = statistics.median(a / b for a, b in zip(res[v], res["one process"], strict=True))
        print(
            f"{v:<32} median step {m * 1e3:7.1f} ms   x one process {m / ref:.3f}   "
            f"median of per-repeat ratios {paired:.3f}"
        )


if __name__ == "__main__":
    main()
