"""GPU check for a machine with a CUDA GPU (at most about 5 minutes); prints one table.

1. MoE layer forward+backward in bf16 (router, sort, grouped GEMM, combine) against a dense
   SwiGLU of the same active size (hidden = top_k x expert hidden) on the same tokens.
2. Grouped GEMM (`torch._grouped_mm`, the experts' kernel) TFLOP/s against one dense
   matmul of the same FLOPs.
3. A 100-step single-GPU run of the ~100M-parameter MoE preset (infra/runs/moe-100m-1gpu.yaml)
   through the real loop: tokens/s, MFU against the device's peak, and J/token from the
   NVML total-energy counter (deltas between logged steps), as the loop logs them.
4. The NVML sampler's cost per read against that run's step time.

    python bench/gpu_check.py            # exits with a message where there is no CUDA GPU
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PRESET = ROOT / "infra" / "runs" / "moe-100m-1gpu.yaml"


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of `fn` on the current stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def moe_vs_dense(rows: list[tuple[str, str, str]]) -> None:
    from trainer.config import MoEConfig
    from trainer.moe import MoE, SwiGLU

    dim, tokens = 2048, 16384
    cfg = MoEConfig(num_experts=64, top_k=6, expert_hidden=768, aux_loss_coef=0.01)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, dim, device=dev, dtype=torch.bfloat16)
    moe = MoE(dim, cfg).to(dev)
    dense = SwiGLU(dim, cfg.top_k * cfg.expert_hidden).to(dev)
    for m in (moe, dense):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
    moe.train()

    def step(layer: torch.nn.Module, is_moe: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = layer(x.unsqueeze(0))
            y = out[0] if is_moe else out
        y.squeeze(0).backward(grad)

    t_moe = cuda_time_ms(lambda: step(moe, True))
    t_dense = cuda_time_ms(lambda: step(dense, False))
    flops = 6.0 * tokens * 3 * dim * cfg.top_k * cfg.expert_hidden  # fwd + bwd, expert matmuls
    rows.append(
        (
            f"MoE layer fwd+bwd bf16 (T={tokens}, D={dim}, E={cfg.num_experts}, "
            f"top-{cfg.top_k}, F={cfg.expert_hidden})",
            f"{t_moe:.2f} ms  {flops / t_moe / 1e9:.0f} TFLOP/s",
            f"dense-active SwiGLU {t_dense:.2f} ms ({flops / t_dense / 1e9:.0f} TFLOP/s); "
            f"MoE/dense {t_moe / t_dense:.2f}x",
        )
    )


def grouped_vs_dense(rows: list[tuple[str, str, str]]) -> None:
    dev = torch.device("cuda")
    experts, per_expert, dim, hidden = 64, 1536, 2048, 768
    rows_total = experts * per_expert
    x = torch.randn(rows_total, dim, device=dev, dtype=torch.bfloat16)
    w = torch.randn(experts, dim, hidden, device=dev, dtype=torch.bfloat16)
    offs = torch.arange(1, experts + 1, device=dev, dtype=torch.int32) * per_expert
    w_dense = torch.randn(dim, hidden, device=dev, dtype=torch.bfloat16)
    flops = 2.0 * rows_total * dim * hidden
    try:
        t_grouped = cuda_time_ms(lambda: torch._grouped_mm(x, w, offs=offs))
        grouped = f"{flops / t_grouped / 1e9:.0f} TFLOP/s ({t_grouped:.3f} ms)"
    except RuntimeError as e:  # e.g. a GPU generation the kernel does not support
        t_grouped, grouped = float("nan"), f"unsupported: {str(e).splitlines()[0]}"
    t_dense = cuda_time_ms(lambda: x @ w_dense)
    rows.append(
        (
            f"grouped GEMM bf16 ({experts} groups x {per_expert} rows, {dim}x{hidden})",
            grouped,
            f"dense matmul same FLOPs {flops / t_dense / 1e9:.0f} TFLOP/s; "
            f"grouped/dense time {t_grouped / t_dense:.2f}x",
        )
    )


def training_run(rows: list[tuple[str, str, str]]) -> float:
    """Returns the run's median step time in seconds."""
    from ops.sinks import read_metrics
    from trainer.config import load_config
    from trainer.flops import param_counts
    from trainer.loop import run

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            PRESET,
            [
                f"run.output_dir={out}",
                "train.steps=100",
                "run.log_every=10",
                "ops.stdout=false",
                "checkpoint.every=0",
            ],
        )
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        records = read_metrics(f"{out}/metrics.jsonl")
    steady = records[1:]  # the first window holds the warm-up (allocator, kernel selection)
    counts = param_counts(cfg.model)
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    step_s = statistics.median(r["step_time_s"] for r in steady)
    rows.append(
        (
            f"100-step run, {counts.total / 1e6:.0f}M params ({counts.active / 1e6:.0f}M active), "
            f"{cfg.train.micro_batch_size}x{cfg.train.seq_len} tokens/step",
            f"{tps:,.0f} tokens/s  ({step_s * 1e3:.1f} ms/step)",
            f"wall {wall:.0f} s incl. set-up",
        )
    )
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    rows.append(
        (
            "MFU (model FLOPs incl. attention / device peak)",
            f"{statistics.median(mfus) * 100:.1f} %" if mfus else "not measured (peak unknown)",
            f"{steady[-1].get('model_tflops_per_s', float('nan')):.0f} TFLOP/s achieved",
        )
    )
    jpt = [r["energy_per_token_j"] for r in steady if "energy_per_token_j" in r]
    joules = sum(r["energy_j"] for r in steady if "energy_j" in r)
    scope = next((r["energy_scope"] for r in steady if "energy_scope" in r), None)
    if jpt:
        rows.append(
            (
                f"energy per token (NVML counter deltas; scope {scope})",
                f"{statistics.median(jpt) * 1e3:.3f} mJ/token",
                f"{joules:.0f} J over {len(jpt)} windows; "
                f"{steady[-1].get('tokens_per_kwh', float('nan')):.3g} tokens/kWh",
            )
        )
    else:
        rows.append(("energy per token", "not measured", "no NVML energy counter on this GPU"))
    power = [d["power_w"] for r in steady for d in r.get("devices", ()) if "power_w" in d]
    if power:
        rows.append(("GPU power during the run (NVML)", f"{statistics.median(power):.0f} W", ""))
    return step_s


def sampler_overhead(rows: list[tuple[str, str, str]], step_s: float) -> None:
    from ops.nvml import GpuSampler

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    sampler = GpuSampler(uuid)
    if not sampler.available:
        rows.append(("NVML sampler", "unavailable", sampler.reason))
        return
    sampler.read()
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        sampler.read()
        times.append(time.perf_counter() - t0)
    sampler.close()
    t = statistics.median(times)
    rows.append(
        (
            "NVML sampler read (all metrics, one GPU)",
            f"{t * 1e6:.0f} us",
            f"{t / step_s * 100:.3f} % of a step at log_every=1 (budget 1 %)",
        )
    )


def main() -> int:
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this "
            "check needs a machine with a CUDA GPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name(0)
    rows: list[tuple[str, str, str]] = [("device", name, f"torch {torch.__version__}")]
    t0 = time.perf_counter()
    for part in (moe_vs_dense, grouped_vs_dense):
        part(rows)
        torch.cuda.empty_cache()
    step_s = training_run(rows)
    sampler_overhead(rows, step_s)
    rows.append(("total check time", f"{time.perf_counter() - t0:.0f} s", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'check':<{w0}}  {'result':<{w1}}  reference / notes")
    print("-" * (w0 + w1 + 40))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
