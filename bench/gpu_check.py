"""GPU check for a machine with a CUDA GPU (at most about 5 minutes); prints one table.

1. MoE layer forward+backward in bf16 (router, sort, grouped GEMM, combine) against a dense
   SwiGLU of the same active size (hidden = top_k x expert hidden) on the same tokens.
2. Grouped GEMM (`torch._grouped_mm`, the experts' kernel) TFLOP/s against one dense
   matmul of the same FLOPs.
3. A 100-step single-GPU run of the ~100M-parameter MoE preset (infra/runs/moe-100m-1gpu.yaml)
   through the real loop: tokens/s, MFU against the device's peak, and J/token from the
   NVML total-energy counter (deltas between logged steps), as the loop logs them.
4. The NVML sampler's cost per read against that run's step time.
5. The MoE path's GPU-only risks, which CPU tests can only simulate: the router's logits and
   weights fp32 under bf16 autocast; with capacity drops (the grouped GEMM leaves the rows
   past its last offset unwritten, and the caching allocator hands back dirty memory),
   input and weight gradients finite and equal to a per-expert reference over the kept pairs
   only; and `torch.cuda.set_sync_debug_mode("warn")` counting the synchronizing operations
   of one MoE layer forward and backward (budget 0 at EP=1; the all-to-all path's one copy
   needs two GPUs and is counted on CPU by tests/test_moe_gpu_path.py).
6. The 100M preset through the FSDP2 path on one GPU (a one-rank process group: bf16
   parameters, fp32 gradient reduction and master weights) with selective and with full
   activation checkpointing, 50 steps each: tokens/s, MFU, and the peak memory allocated
   against the dry run's estimate.

    python bench/gpu_check.py              # exits with a message where there is no CUDA GPU
    python bench/gpu_check.py --cpu-smoke  # part 5 on the CPU, small: checks the script only
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

    sys.path.insert(0, str(ROOT / "bench"))
    from moe_layer import titan_moe

    def step_titan() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = titan_moe(moe, x)
        y.backward(grad)

    t_moe = cuda_time_ms(lambda: step(moe, True))
    t_dense = cuda_time_ms(lambda: step(dense, False))
    t_titan = cuda_time_ms(step_titan)
    flops = 6.0 * tokens * 3 * dim * cfg.top_k * cfg.expert_hidden  # fwd + bwd, expert matmuls
    rows.append(
        (
            f"MoE layer fwd+bwd bf16 (T={tokens}, D={dim}, E={cfg.num_experts}, "
            f"top-{cfg.top_k}, F={cfg.expert_hidden})",
            f"{t_moe:.2f} ms  {flops / t_moe / 1e9:.0f} TFLOP/s",
            f"dense-active SwiGLU {t_dense:.2f} ms ({flops / t_dense / 1e9:.0f} TFLOP/s); "
            f"MoE/dense {t_moe / t_dense:.2f}x; torchtitan's algorithm {t_titan:.2f} ms "
            f"({t_titan / t_dense:.2f}x dense)",
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


def _kept_by_affinity(ids_TK: torch.Tensor, scores_TK: torch.Tensor, E: int, cap: int):
    """Per expert, its cap highest-scoring pairs (ties: lower token first), as a [T, K] mask;
    written independently of trainer.moe.drop_overflow."""
    keep = torch.zeros_like(ids_TK, dtype=torch.bool)
    flat_ids, flat_scores, flat_keep = ids_TK.reshape(-1), scores_TK.reshape(-1), keep.view(-1)
    for e in range(E):
        pairs = torch.nonzero(flat_ids == e).squeeze(1)
        best = torch.argsort(flat_scores[pairs], descending=True, stable=True)[:cap]
        flat_keep[pairs[best]] = True
    return keep


def moe_gpu_path(rows: list[tuple[str, str, str]], dev: torch.device, *, small: bool) -> None:
    import warnings

    import torch.nn.functional as F

    from trainer.config import MoEConfig
    from trainer.moe import MoE, capacity

    T, D = (256, 64) if small else (8192, 1024)
    cfg = MoEConfig(
        num_experts=16,
        top_k=4,
        expert_hidden=64 if small else 512,
        capacity_factor=1.0,
        aux_loss_coef=0.01,
    )
    torch.manual_seed(0)
    moe = MoE(D, cfg).to(dev)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
        moe.router.weight.normal_(0, 0.5)  # an uneven router, so that capacity drops
    moe.train()
    x = torch.randn(T, D, device=dev)

    # Router dtype under bf16 autocast.
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        r = moe.router(x)
    dtypes = {n: getattr(r, n).dtype for n in ("logits_TE", "scores_TE", "weights_TK")}
    ok = all(d == torch.float32 for d in dtypes.values())
    rows.append(
        (
            "router under bf16 autocast",
            "fp32" if ok else "NOT fp32",
            ", ".join(f"{n} {str(d).removeprefix('torch.')}" for n, d in dtypes.items()),
        )
    )

    # Drops: gradients against a per-expert loop over the kept pairs, in fp32 without TF32.
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        grad_out = torch.randn(T, D, device=dev)
        if dev.type == "cuda":
            # Dirty the caching allocator's blocks with NaN before the step.
            for n in (1 << 20, 1 << 22, 1 << 24):
                torch.full((n,), float("nan"), device=dev)
        xa = x.clone().requires_grad_()
        out, _ = moe(xa.unsqueeze(0))
        (out[0] * grad_out).sum().backward()
        w1_grad = moe.experts.w1.grad.clone()
        moe.zero_grad()
        xb = x.clone().requires_grad_()
        rr = moe.router(xb)
        keep = _kept_by_affinity(rr.ids_TK, rr.scores_TK, cfg.num_experts, capacity(T, cfg))
        ex = moe.experts
        ref = torch.zeros_like(xb)
        for e in range(cfg.num_experts):
            tok, k = torch.nonzero((rr.ids_TK == e) & keep, as_tuple=True)
            h = F.silu(xb[tok] @ ex.w1[e]) * (xb[tok] @ ex.w3[e])
            ref = ref.index_add(0, tok, (h @ ex.w2[e]) * rr.weights_TK[tok, k, None])
        (ref * grad_out).sum().backward()
        finite = bool(torch.isfinite(xa.grad).all()) and bool(torch.isfinite(w1_grad).all())
        err_x = ((xa.grad - xb.grad).abs().max() / xb.grad.abs().max()).item()
        err_w = ((w1_grad - ex.w1.grad).abs().max() / ex.w1.grad.abs().max()).item()
        dropped = int((~keep).sum())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    rows.append(
        (
            f"gradients with drops ({dropped} of {T * cfg.top_k} pairs dropped)",
            ("finite" if finite else "NON-FINITE") + f", max rel err x {err_x:.1e} w1 {err_w:.1e}",
            "against a per-expert loop over the kept pairs (fp32, TF32 off); want < 1e-4",
        )
    )

    # Synchronizing operations of one layer, forward and backward, bf16 autocast.
    if dev.type != "cuda":
        rows.append(("sync debug mode", "skipped", "CUDA only"))
        return
    for cf in (0.0, 1.0):
        moe.cfg.capacity_factor = cf
        xs = x.clone().requires_grad_()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out, losses = moe(xs.unsqueeze(0))
                (out.float().sum() + losses.aux_loss).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        where = "; ".join(sorted({f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in syncs}))
        rows.append(
            (
                f"host syncs, one MoE layer fwd+bwd at EP=1, capacity_factor {cf:g}",
                f"{len(syncs)}",
                f"budget 0{'; at ' + where if where else ''}",
            )
        )
    moe.cfg.capacity_factor = 1.0


def fsdp_ac_run(rows: list[tuple[str, str, str]]) -> None:
    """The 100M preset through the FSDP2 path on one GPU (a one-rank process group, so
    `parallelize` applies FSDP: bf16 parameters, fp32 gradient reduction and master weights),
    with selective and with full activation checkpointing: tokens/s, MFU, and the measured
    peak memory against the dry run's estimate."""
    import torch.distributed as dist

    from ops.sinks import read_metrics
    from trainer.config import load_config
    from trainer.dryrun import size_job
    from trainer.loop import run

    with tempfile.TemporaryDirectory() as out:
        store = dist.FileStore(f"{out}/store", 1)
        dist.init_process_group(
            "nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0)
        )
        try:
            for ac in ("selective", "full"):
                cfg = load_config(
                    PRESET,
                    [
                        f"run.output_dir={out}/{ac}",
                        "train.steps=50",
                        "run.log_every=10",
                        "ops.stdout=false",
                        "checkpoint.every=0",
                        f"train.activation_checkpoint={ac}",
                    ],
                )
                torch.cuda.reset_peak_memory_stats()
                run(cfg)
                peak = torch.cuda.max_memory_allocated()
                estimate = size_job(cfg, world_size=1).memory.total
                steady = read_metrics(f"{out}/{ac}/metrics.jsonl")[1:]
                tps = statistics.median(r["tokens_per_s"] for r in steady)
                mfus = [r["mfu"] for r in steady if "mfu" in r]
                mfu = f"MFU {statistics.median(mfus) * 100:.1f} %" if mfus else "MFU unknown"
                rows.append(
                    (
                        f"FSDP2 + activation checkpointing {ac}, bf16, 50 steps",
                        f"{tps:,.0f} tokens/s, {mfu}",
                        f"peak {peak / 2**30:.2f} GiB allocated; dry run {estimate / 2**30:.2f} GiB",
                    )
                )
                torch.cuda.empty_cache()
        finally:
            dist.destroy_process_group()


def main() -> int:
    if "--cpu-smoke" in sys.argv:
        rows: list[tuple[str, str, str]] = []
        moe_gpu_path(rows, torch.device("cpu"), small=True)
        for a, b, c in rows:
            print(f"{a:<60}  {b:<40}  {c}")
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); this "
            "check needs a machine with a CUDA GPU. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name(0)
    rows = [("device", name, f"torch {torch.__version__}")]
    t0 = time.perf_counter()
    moe_gpu_path(rows, torch.device("cuda"), small=False)
    torch.cuda.empty_cache()
    for part in (moe_vs_dense, grouped_vs_dense):
        part(rows)
        torch.cuda.empty_cache()
    step_s = training_run(rows)
    sampler_overhead(rows, step_s)
    torch.cuda.empty_cache()
    fsdp_ac_run(rows)
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
