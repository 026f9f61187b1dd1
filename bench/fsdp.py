"""FSDP2 x EP on CPU gloo ranks: step time against the replicated layout, memory per rank
against the dry run's estimate.

    python bench/fsdp.py [--steps 12] [--repeat 3] [--set key=value ...]

1. Step time at world 2, in one run, interleaved: FSDP (parallel.dp_shard=2: weights,
   gradients and AdamW state sharded, each block gathered in forward and again in backward),
   FSDP with parallel.reshard_after_forward=never (gathered once, kept to the backward: the
   all-reduce's traffic), against the replicated layout of the same world
   (parallel.dp_replicate=2, dp_shard=1: every rank holds the whole model and gradients are
   all-reduced). Median step time of each, after one warm-up step, per repeat (the order
   rotates); the ratios to replicated (target <= 1.15).
2. Memory: the per-rank parameters + gradients + AdamW state at dp_shard 1, 2 and 4 (one
   process, then 2 and 4 ranks, EP 1): the bytes of the local tensors a rank holds when the
   optimizer steps in a real training step, beside the dry run's estimate; they fall as
   1/dp_shard.
3. The whole per-rank peak against the dry run's estimate, per activation-checkpointing mode.

Model: the tiny preset at dim 128, 4 layers (set with --set), fp32, seq 64, micro-batch 4.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed import run_ranks  # noqa: E402

BASE = [
    "model.dim=128",
    "model.num_layers=4",
    "model.dense_hidden=512",
    "model.moe.expert_hidden=256",
    "train.device=cpu",
    "train.micro_batch_size=4",
    "ops.telemetry=false",
    "ops.stdout=false",
    "ops.jsonl=false",
    "data.corpus_max_bytes=200000",
    "checkpoint.every=0",
]


def _cfg(overrides: list[str]):
    from trainer.config import load_config

    out = tempfile.mkdtemp(prefix="moeyard-bench-fsdp-")
    return load_config(
        ROOT / "infra/runs/tiny.yaml",
        [*BASE, f"run.output_dir={out}", *overrides],
        ignore_sections=("cluster",),
    )


def _step_times(rank: int, world: int, layouts: list[list[str]], steps: int) -> list[float]:
    """Median step time of each layout, run one after the other in the same processes."""
    import torch.distributed as dist

    from trainer.loop import setup, train_step

    medians = []
    for overrides in layouts:
        state = setup(_cfg(overrides), local_rank=rank)
        train_step(state)  # warm-up: allocations, first gathers
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            m = train_step(state)
            float(m["lm_loss"])
            times.append(time.perf_counter() - t0)
        state.source.close()
        medians.append(statistics.median(times))
    return medians


def _memory(rank: int, world: int, overrides: list[str]) -> dict[str, float]:
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainer.dryrun import size_job
    from trainer.loop import setup, train_step
    from trainer.parallelize import local

    cfg = _cfg(overrides)
    est = size_job(cfg, world_size=world).memory
    state = setup(cfg, local_rank=rank)
    train_step(state)
    tracker: MemTracker
    if world > 1:
        tracker = FSDPMemTracker(state.model, state.optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(state.model, state.optimizer)
    # Parameters, gradients and AdamW state as this rank holds them when the optimizer steps
    # (the gradients complete, the moments not yet freed): the bytes of its local tensors.
    held: list[int] = []

    def count(opt: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        tensors = [p for g in opt.param_groups for p in g["params"]]
        tensors += [p.grad for p in tensors if p.grad is not None]
        tensors += [v for st in opt.state.values() for v in st.values() if v.dim() > 0]
        held.append(sum(local(t).numel() * t.element_size() for t in tensors))

    hook = state.optimizer.register_step_pre_hook(count)
    with tracker:
        train_step(state)
    hook.remove()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    state_bytes = held[-1]
    state.source.close()
    return {
        "peak": peak["Total"],
        "estimate": est.total,
        "state": state_bytes,
        "state_estimate": est.params + est.grads + est.optimizer,
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    BASE.extend(args.set)

    print("== step time at world 2 (ep 1), medians of", args.steps, "steps per repeat")
    layouts = {
        "FSDP": ["parallel.ep=1", "parallel.dp_shard=2"],
        "FSDP, no reshard after forward": [
            "parallel.ep=1",
            "parallel.dp_shard=2",
            "parallel.reshard_after_forward=never",
        ],
        "replicated": ["parallel.ep=1", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
    }
    names = list(layouts)
    ratios: dict[str, list[float]] = {n: [] for n in names[:-1]}
    for i in range(args.repeat):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who runs first
        got = dict(
            zip(
                order,
                run_ranks(_step_times, 2, [layouts[n] for n in order], args.steps, timeout_s=900)[
                    0
                ],
                strict=True,
            )
        )
        line = "   ".join(f"{n} {got[n] * 1e3:6.1f} ms" for n in names)
        for n in ratios:
            ratios[n].append(got[n] / got["replicated"])
        print(f"  repeat {i + 1}: {line}", flush=True)
    for n, r in ratios.items():
        print(f"  median ratio {n} / replicated: {statistics.median(r):.3f} (target <= 1.15)")

    print("== parameters + gradients + AdamW state per rank (ep 1), measured vs dry run")
    base = None
    for world in (1, 2, 4):
        ov = ["parallel.ep=1", f"train.micro_batch_size={8 // world}"]
        r = run_ranks(_memory, world, ov, timeout_s=900)[0] if world > 1 else _memory(0, 1, ov)
        base = base or r["state"]
        print(
            f"  dp_shard {world}: measured {_mib(r['state'])} ({base / r['state']:.2f}x less than "
            f"dp_shard 1)   dry run {_mib(r['state_estimate'])}",
            flush=True,
        )

    print("== whole per-rank peak, measured vs dry run (world 2, ep 2)")
    for ac in ("none", "full", "selective"):
        ov = ["parallel.ep=2", "train.micro_batch_size=4", f"train.activation_checkpoint={ac}"]
        r = run_ranks(_memory, 2, ov, timeout_s=900)[0]
        print(
            f"  activation_checkpoint={ac:<9} measured {_mib(r['peak'])}   dry run "
            f"{_mib(r['estimate'])}   estimate / measured {r['estimate'] / r['peak']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
