"""MoE layer speed against references measured in the same run.

Mode `layer` (default), fp32 on CPU, at each of `--threads` (default 1 and 2): forward+backward
of
  - the MoE layer (router, sort, one gather in, grouped GEMM, one weighted gather-sum out),
  - a dense SwiGLU with the same active size (hidden = top_k x expert hidden) on the same
    tokens: the reference that does the same matmul FLOPs with no routing,
  - torchtitan's algorithm (re-implemented here from its description, on the same router and
    the same grouped GEMM experts): histc counts, stable argsort, `torch.gather` of the rows,
    scores multiplied into the expert output in fp32, `scatter_add` back into the tokens,
  - a per-expert Python loop (gather each expert's tokens, three matmuls, index_add),
for a coarse (Mixtral-like: 8 experts, top-2, hidden 1024) and a fine-grained DeepSeekMoE-like
config (64 experts, top-6, hidden 256). Times are medians of interleaved repeats; peak memory
is the growth of the process's resident high-water mark (Linux VmHWM, reset before the step)
during one forward+backward, each variant in its own subprocess.

Mode `a2a`: EP=2 over two gloo processes. The achieved all-to-all bandwidth of the
dispatcher's functional all-to-all (what the `all_to_all` exchange calls, there and back)
against raw `dist.all_to_all_single` calls moving the same bytes with the same splits; and
the whole dispatch+combine (sort, gather, count exchange, the one host copy of the chunk
sizes, the row exchange both ways, weighted combine) with each `parallel.ep_exchange`
(`p2p` and `all_to_all`), expressed as the same bytes over its time. Printed as medians, and
as the median of the per-repeat ratios (each repeat against its own raw exchange).

Mode `fused` (issue 22, the layer's half): the layer as it is (w13 in one grouped GEMM, the
fused SwiGLU, the one-pass combine; Triton kernels on CUDA) against the layer it replaced
(tests/moe_legacy.py: two grouped GEMMs for w1 and w3, SwiGLU by autograd, the combine as K
gathers), both against a dense SwiGLU of the active size, forward+backward, in interleaved
rounds of one process. On CUDA: bf16 weights and rows, 8192 tokens, at the issue's shapes
(Mixtral: D 4096, F 14336, 8 experts, top-2; DeepSeek-V2-Lite: D 2048, F 1408, 64 experts,
top-6). With `--cpu` (or without a GPU): fp32 at reduced shapes of the same proportions
(D / 8, the same E and K), 2048 tokens.

    python bench/moe_layer.py            # modes layer and a2a, 1 and 2 threads
    python bench/moe_layer.py --mode layer --threads 2 --repeats 9
    python bench/moe_layer.py --mode fused --cpu --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_mod
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.config import MoEConfig
from trainer.moe import MoE, SwiGLU

VARIANTS = ("moe", "dense", "titan", "loop")
CONFIGS = {
    "coarse": dict(num_experts=8, top_k=2, expert_hidden=1024),
    "fine": dict(num_experts=64, top_k=6, expert_hidden=256),
}


def build(name: str, dim: int, tokens: int, variant: str):
    torch.manual_seed(0)
    cfg = MoEConfig(**CONFIGS[name], aux_loss_coef=0.01)
    x = torch.randn(tokens, dim)
    grad = torch.randn(tokens, dim)
    if variant == "dense":
        layer = SwiGLU(dim, cfg.top_k * cfg.expert_hidden)
    else:
        layer = MoE(dim, cfg)
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.02)
    return cfg, layer, x, grad


def loop_moe(moe: MoE, x_TD: torch.Tensor):
    """The per-expert Python loop a first implementation would write."""
    r = moe.router(x_TD)
    out = torch.zeros_like(x_TD)
    ex = moe.experts
    for e in range(moe.cfg.num_experts):
        tok, k = torch.where(r.ids_TK == e)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        h = F.silu(xe @ ex.w1[e]) * (xe @ ex.w3[e])
        out = out.index_add(0, tok, (h @ ex.w2[e]) * r.weights_TK[tok, k, None])
    return out


def titan_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """torchtitan's permutation and combine (scores applied to the expert output in fp32,
    scatter_add back into the tokens)."""
    cfg = moe.cfg
    r = moe.router(x_TD)
    top_TK, ids_TK = r.weights_TK, r.ids_TK
    counts_E = torch.histc(
        ids_TK.reshape(-1).float(), bins=cfg.num_experts, min=0, max=cfg.num_experts
    )
    order_P = torch.argsort(ids_TK.reshape(-1), stable=True)
    top_P = top_TK.reshape(-1)[order_P]
    idx_PD = (order_P // cfg.top_k).reshape(-1, 1).expand(-1, x_TD.shape[1])
    routed_PD = torch.gather(x_TD, 0, idx_PD)
    y_PD = moe.experts(routed_PD, counts_E.long())
    # score_before_experts=False: SwiGLU is not linear, so only scoring the output computes
    # the same function as our layer.
    y_PD = (y_PD.float() * top_P.reshape(-1, 1)).to(x_TD.dtype)
    return torch.zeros_like(x_TD).scatter_add(0, idx_PD, y_PD)


def step(variant: str, layer, x: torch.Tensor, grad: torch.Tensor) -> None:
    xi = x.detach().requires_grad_()
    if variant == "dense":
        out = layer(xi)
    elif variant == "moe":
        out, losses = layer(xi.unsqueeze(0))
        out = out.squeeze(0) + 0 * losses.aux_loss
    elif variant == "titan":
        out = titan_moe(layer, xi)
    else:
        out = loop_moe(layer, xi)
    out.backward(grad)


def time_variants(name: str, dim: int, tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and process-CPU seconds per variant over interleaved repeats."""
    layers = {v: build(name, dim, tokens, v) for v in VARIANTS}
    for v, (_, layer, x, g) in layers.items():
        step(v, layer, x, g)  # warm-up
    wall: dict[str, list[float]] = {v: [] for v in layers}
    cpu: dict[str, list[float]] = {v: [] for v in layers}
    for _ in range(repeats):
        for v, (_, layer, x, g) in layers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(v, layer, x, g)
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return {
        v: {"wall": statistics.median(wall[v]), "cpu": statistics.median(cpu[v])} for v in layers
    }


# glibc returns freed blocks above its mmap threshold (at most 32 MiB) to the kernel, so each
# new [T * K, D] tensor of the fine-grained layer (48 MiB at the defaults) is page-faulted in
# again on every step, while the dense layer's tensors stay under the threshold and are
# reused. A GPU's caching allocator reuses every block; "reuse" makes glibc do the same.
ALLOCATORS = {
    "glibc": {},
    "reuse": {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)},
}


def layer_rows(args) -> list[dict]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in ("coarse", "fine"):
            t = time_variants(name, args.dim, args.tokens, args.repeats)
            cfg = CONFIGS[name]
            rows.append(
                {
                    "threads": threads,
                    "config": f"{name}: E={cfg['num_experts']} top-{cfg['top_k']} "
                    f"F={cfg['expert_hidden']}",
                    **{f"{v}_ms": t[v]["wall"] * 1e3 for v in VARIANTS},
                    "moe/dense": t["moe"]["wall"] / t["dense"]["wall"],
                    "titan/dense": t["titan"]["wall"] / t["dense"]["wall"],
                    "loop/moe": t["loop"]["wall"] / t["moe"]["wall"],
                    "moe/dense cpu": t["moe"]["cpu"] / t["dense"]["cpu"],
                    "titan/dense cpu": t["titan"]["cpu"] / t["dense"]["cpu"],
                }
            )
    return rows


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, dim: int, tokens: int, variant: str) -> None:
    _, layer, x, g = build(name, dim, tokens, variant)
    # Linux resets the resident high-water mark (VmHWM) when 5 is written to clear_refs, so
    # the peak below is that of one forward+backward alone.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    step(variant, layer, x, g)
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - base) / 1024}))


def peak_memory(name: str, dim: int, tokens: int, variant: str) -> float:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-mem",
            name,
            variant,
            "--dim",
            str(dim),
            "--tokens",
            str(tokens),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def mode_layer(args) -> list[dict]:
    rows = []
    for alloc in args.allocators:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-layer",
                *("--dim", str(args.dim), "--tokens", str(args.tokens)),
                *("--repeats", str(args.repeats)),
                *("--threads", ",".join(map(str, args.threads))),
            ],
            env={**os.environ, **ALLOCATORS[alloc]},
            check=True,
            capture_output=True,
            text=True,
        )
        rows += [{"alloc": alloc, **r} for r in json.loads(out.stdout.strip().splitlines()[-1])]
    mem = {
        name: {v: peak_memory(name, args.dim, args.tokens, v) for v in VARIANTS}
        for name in ("coarse", "fine")
    }
    print(
        f"\nMoE layer fwd+bwd, fp32 CPU, dim {args.dim}, {args.tokens} tokens, "
        f"median of {args.repeats} interleaved repeats"
    )
    print(
        f"{'alloc':<6} {'thr':>3} {'config':<28} {'moe ms':>8} {'dense ms':>9} {'titan ms':>9} "
        f"{'loop ms':>8} {'moe/dense':>10} {'titan/dense':>12} {'loop/moe':>9}"
        "   cpu-time moe/dense titan/dense"
    )
    for r in rows:
        print(
            f"{r['alloc']:<6} {r['threads']:>3} {r['config']:<28} {r['moe_ms']:>8.1f} "
            f"{r['dense_ms']:>9.1f} {r['titan_ms']:>9.1f} {r['loop_ms']:>8.1f} "
            f"{r['moe/dense']:>10.2f} {r['titan/dense']:>12.2f} {r['loop/moe']:>9.2f}"
            f"   {r['moe/dense cpu']:>18.2f} {r['titan/dense cpu']:>11.2f}"
        )
    print(
        "peak MiB (1 thread), moe/dense/titan/loop: "
        + "; ".join(f"{n} " + "/".join(f"{m[v]:.0f}" for v in VARIANTS) for n, m in mem.items())
    )
    print("targets: moe/dense <= 1.08 (coarse), <= 1.5 (fine), at 2 threads")
    return rows


def _a2a_rank(
    rank: int, world: int, store: str, dim: int, tokens: int, repeats: int, queue
) -> None:
    import torch.distributed as dist

    from trainer.dispatch import AllToAllDispatcher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    E, K = 8, 2
    group = dist.group.WORLD
    disp = {
        ex: AllToAllDispatcher(E, ep_group=group, batch_group=group, exchange=ex)
        for ex in ("p2p", "all_to_all")
    }
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, dim)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    w = torch.rand(tokens, K)

    def exchange_with(d):
        def moe_exchange():
            rows, _, meta = d.dispatch(x, ids, w, may_drop=False)
            d.combine(rows, meta, x.dtype)
            return meta

        return moe_exchange

    meta = exchange_with(disp["p2p"])()
    L = E // 2
    send = [sum(meta.send_SL[p * L : (p + 1) * L]) for p in range(2)]
    recv = [sum(meta.recv_SL[p * L : (p + 1) * L]) for p in range(2)]
    buf_send = torch.randn(sum(send), dim)

    from torch.distributed._functional_collectives import all_to_all_single_autograd

    def funcol_exchange():
        a = all_to_all_single_autograd(buf_send, recv, send, group=group)
        b = all_to_all_single_autograd(a, send, recv, group=group)
        b.sum()  # waits on the collective

    def raw_exchange():
        a = torch.empty(sum(recv), dim)
        dist.all_to_all_single(a, buf_send, recv, send)
        b = torch.empty(sum(send), dim)
        dist.all_to_all_single(b, a, send, recv)

    fns = {
        "raw": raw_exchange,
        "funcol": funcol_exchange,
        "p2p": exchange_with(disp["p2p"]),
        "all_to_all": exchange_with(disp["all_to_all"]),
    }
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    # bytes this rank sent in both directions
    nbytes = (sum(send) + sum(recv)) * dim * 4
    if rank == 0:
        res = {name + "_s": statistics.median(t) for name, t in times.items()}
        # Each repeat's ratio against the raw exchange of the same repeat: neighbours in time
        # share the machine's state, so on a noisy machine this is the steadier figure.
        paired = {
            name + "_paired": statistics.median(
                r / t for r, t in zip(times["raw"], ts, strict=True)
            )
            for name, ts in times.items()
        }
        queue.put({**res, **paired, "bytes": nbytes})
    dist.destroy_process_group()


def mode_a2a(args) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_a2a_rank, args=(r, 2, store, args.dim, args.tokens, args.repeats, q)
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        res = None
        while res is None:
            try:
                res = q.get(timeout=5)
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"mode a2a: a rank exited with {dead[0]}") from None
        for p in procs:
            p.join()
    bw = {
        name: res["bytes"] / res[name + "_s"] / 1e9
        for name in ("raw", "funcol", "p2p", "all_to_all")
    }
    print(
        f"\nEP=2 on gloo, {args.tokens} tokens x dim {args.dim} per rank, 8 experts top-2, "
        f"median of {args.repeats} interleaved repeats; GB/s and ratio to raw all_to_all"
    )
    print(
        f"{'raw all_to_all':>16} {'dispatcher a2a':>16} {'whole, p2p':>16} {'whole, all_to_all':>18}"
    )
    print(
        f"{bw['raw']:>10.2f} GB/s "
        + " ".join(
            f"{bw[n]:>6.2f} ({bw[n] / bw['raw']:.2f})".rjust(w)
            for n, w in (("funcol", 16), ("p2p", 16), ("all_to_all", 18))
        )
        + "   (target: whole dispatch+combine / raw >= 0.6)"
    )
    print(
        f"per exchange (there and back, {res['bytes'] / 1e6:.1f} MB): raw {res['raw_s'] * 1e3:.1f} ms, "
        f"dispatcher a2a {res['funcol_s'] * 1e3:.1f} ms, whole dispatch+combine "
        f"{res['p2p_s'] * 1e3:.1f} ms (p2p) / {res['all_to_all_s'] * 1e3:.1f} ms (all_to_all)"
    )
    print(
        "median of the per-repeat ratios (raw time / time, each repeat against its own raw "
        f"exchange): dispatcher a2a {res['funcol_paired']:.2f}, whole p2p "
        f"{res['p2p_paired']:.2f}, whole all_to_all {res['all_to_all_paired']:.2f}"
    )
    return {
        "p2p_paired": res["p2p_paired"],
        "all_to_all_paired": res["all_to_all_paired"],
        "raw_GBps": bw["raw"],
        "a2a_GBps": bw["funcol"],
        "p2p_GBps": bw["p2p"],
        "all_to_all_GBps": bw["all_to_all"],
    }


FUSED_SHAPES = {
    "mixtral": dict(dim=4096, hidden=14336, experts=8, top_k=2, norm_topk_prob=True),
    "deepseek-v2-lite": dict(dim=2048, hidden=1408, experts=64, top_k=6, norm_topk_prob=False),
}
FUSED_SHAPES_CPU = {
    "mixtral / 8": dict(dim=512, hidden=1792, experts=8, top_k=2, norm_topk_prob=True),
    "deepseek-v2-lite / 8": dict(dim=256, hidden=176, experts=64, top_k=6, norm_topk_prob=False),
}


def _fused_layers(shape: dict, dev: torch.device, dtype: torch.dtype):
    from tests.moe_legacy import LegacyMoE

    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=shape["experts"],
        top_k=shape["top_k"],
        expert_hidden=shape["hidden"],
        norm_topk_prob=shape["norm_topk_prob"],
        aux_loss_coef=0.01,
    )
    D = shape["dim"]
    new = MoE(D, cfg)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, D**-0.5)
    old = LegacyMoE(D, cfg)
    old.load_from(new)
    dense = SwiGLU(D, cfg.top_k * cfg.expert_hidden)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, D**-0.5)
    return {
        "dense-active": dense.to(dev, dtype),
        "legacy": old.to(dev, dtype).train(),
        "new": new.to(dev, dtype).train(),
    }


def _fused_step(name: str, layer, x: torch.Tensor, grad: torch.Tensor) -> None:
    xi = x.detach().requires_grad_()
    if name == "dense-active":
        layer(xi).backward(grad)
        return
    out, losses = layer(xi.unsqueeze(0))
    torch.autograd.backward(
        [out.squeeze(0), losses.aux_loss], [grad, torch.ones_like(losses.aux_loss)]
    )


def mode_fused(args) -> list[dict]:
    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = FUSED_SHAPES if cuda else FUSED_SHAPES_CPU
    tokens = 8192 if cuda else 2048
    if not cuda:
        torch.set_num_threads(max(args.threads))
    rows = []
    for name, shape in shapes.items():
        layers = _fused_layers(shape, dev, dtype)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(tokens, shape["dim"], generator=gen).to(dev, dtype)
        g = torch.randn(tokens, shape["dim"], generator=gen).to(dev, dtype)
        for v, layer in layers.items():
            for _ in range(2):  # warm-up (Triton compiles its kernels here)
                _fused_step(v, layer, x, g)
        times: dict[str, list[float]] = {v: [] for v in layers}
        for _ in range(args.repeats):
            for v, layer in layers.items():
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _fused_step(v, layer, x, g)
                if cuda:
                    torch.cuda.synchronize()
                times[v].append(time.perf_counter() - t0)
        ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        # Each round's ratio against its own dense-active step: the steadier figure on a
        # shared machine.
        paired = {
            v: statistics.median(
                a / d for a, d in zip(times[v], times["dense-active"], strict=True)
            )
            for v in ("legacy", "new")
        }
        rows.append(
            {
                "shape": name,
                **{f"{v}_ms": t for v, t in ms.items()},
                **{f"{v}/dense": r for v, r in paired.items()},
                "new/legacy": statistics.median(
                    a / b for a, b in zip(times["new"], times["legacy"], strict=True)
                ),
            }
        )
        del layers
    kind = "bf16 CUDA" if cuda else f"fp32 CPU, {max(args.threads)} threads"
    print(
        f"\nMoE layer fwd+bwd, legacy against new, {kind}, {tokens} tokens, median of "
        f"{args.repeats} interleaved rounds (ratios: median of the per-round ratios)"
    )
    print(
        f"{'shape':<22} {'dense ms':>9} {'legacy ms':>10} {'new ms':>8} "
        f"{'legacy/dense':>13} {'new/dense':>10} {'new/legacy':>11}"
    )
    for r in rows:
        print(
            f"{r['shape']:<22} {r['dense-active_ms']:>9.1f} {r['legacy_ms']:>10.1f} "
            f"{r['new_ms']:>8.1f} {r['legacy/dense']:>13.2f} {r['new/dense']:>10.2f} "
            f"{r['new/legacy']:>11.2f}"
        )
    if cuda:
        print("targets (issue 22, H200): new/dense <= 1.15 (Mixtral), <= 1.9 (DeepSeek-V2-Lite)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mode", choices=["layer", "a2a", "fused", "all"], default="all")
    ap.add_argument(
        "--cpu", action="store_true", help="mode fused: on the CPU at reduced shapes, even on a GPU"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (use 25 for --mode a2a)")
    ap.add_argument(
        "--threads",
        type=lambda v: [int(t) for t in v.split(",")],
        default=[1, 2],
        help="torch intra-op thread counts for mode layer, comma-separated (mode a2a and the "
        "memory children use one thread per process)",
    )
    ap.add_argument(
        "--allocators",
        type=lambda v: v.split(","),
        default=["glibc", "reuse"],
        help="mode layer: glibc (default settings) and/or reuse (freed blocks kept for reuse, "
        "as a caching allocator does), comma-separated",
    )
    ap.add_argument("--child-mem", nargs=2, metavar=("CONFIG", "VARIANT"))
    ap.add_argument("--child-layer", action="store_true")
    args = ap.parse_args()
    for a in args.allocators:
        if a not in ALLOCATORS:
            ap.error(f"--allocators: {a!r} is not one of {sorted(ALLOCATORS)}")
    torch.set_num_threads(1)
    if args.child_layer:
        print(json.dumps(layer_rows(args)))
        return
    if args.child_mem:
        peak_memory_child(args.child_mem[0], args.dim, args.tokens, args.child_mem[1])
        return
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f} at start")
    if args.mode in ("layer", "all"):
        mode_layer(args)
    if args.mode in ("a2a", "all"):
        mode_a2a(args)
    if args.mode == "fused":
        mode_fused(args)


if __name__ == "__main__":
    main()
