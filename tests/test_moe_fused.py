"""The fused MoE layer (one grouped GEMM for w1 and w3, fused SwiGLU, one-pass combine)
against the layer it replaced (tests/moe_legacy.py): outputs and every gradient, fp32 and bf16,
with capacity drops, shared experts and activation checkpointing; the Triton kernels against
their torch twins (through Triton's interpreter on a CPU); checkpoints saved by the old layer
loading into the new one."""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tests.moe_legacy import LegacyMoE
from trainer.checkpoint import model_state
from trainer.config import MoEConfig
from trainer.kernels import combine, swiglu
from trainer.moe import MoE

torch.set_num_threads(1)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (the test extra has it on Linux x86_64 only)",
)
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]

D = 16
CFG = dict(num_experts=4, top_k=2, expert_hidden=24, aux_loss_coef=0.01, z_loss_coef=1e-3)


def pair(backend: str, dtype: torch.dtype, **kw: Any) -> tuple[MoE, LegacyMoE]:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**CFG, **kw})
    new = MoE(D, cfg)
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0, 0.3)
    new.experts.backend = backend
    new.dispatcher.kernel_backend = backend
    old = LegacyMoE(D, cfg)
    old.load_from(new)
    return new.to(dtype), old.to(dtype)


def run(moe: MoE, x: torch.Tensor, g: torch.Tensor, *, ac: str = "none") -> dict[str, torch.Tensor]:
    """Output and gradients (x, router, w1, w3, w2, shared) of one forward+backward."""
    xi = x.clone().requires_grad_()
    if ac == "none":
        out, losses = moe(xi)
    else:
        kw: dict[str, Any] = {"use_reentrant": False}
        if ac == "selective":
            from trainer.parallelize import _selective_context

            kw["context_fn"] = _selective_context
        out, losses = checkpoint(moe, xi, **kw)
    ((out.float() * g).sum() + losses.aux_loss + losses.z_loss).backward()
    ex = moe.experts
    if hasattr(ex, "w13"):
        F_ = ex.hidden
        w1g, w3g = ex.w13.grad[..., :F_], ex.w13.grad[..., F_:]
    else:
        w1g, w3g = ex.w1.grad, ex.w3.grad
    res = {
        "out": out,
        "x": xi.grad,
        "router": moe.router.weight.grad,
        "w1": w1g,
        "w3": w3g,
        "w2": ex.w2.grad,
    }
    if moe.shared is not None:
        res["shared_w1"] = moe.shared.w1.weight.grad
    return res


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dtype: torch.dtype):
    assert set(a) == set(b)
    for k in a:
        ta, tb = a[k].float(), b[k].float()
        assert torch.isfinite(ta).all(), k
        scale = tb.abs().max().item()
        assert scale > 0, f"{k}: the reference gradient is zero; the test checks nothing"
        if dtype == torch.float32:
            torch.testing.assert_close(ta, tb, rtol=1e-6, atol=1e-6 * scale, msg=k)
        else:
            torch.testing.assert_close(ta, tb, rtol=2e-2, atol=2e-2 * scale, msg=k)


CASES = {
    "dropless": {},
    "drops": dict(capacity_factor=0.5),
    "drops_token_order": dict(capacity_factor=0.5, drop_policy="token_order"),
    "shared": dict(num_shared_experts=1),
    "sigmoid_topk3": dict(score_func="sigmoid", top_k=3, num_shared_experts=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_new_layer_equals_legacy(case: str, dtype: torch.dtype, backend: str) -> None:
    new, old = pair(backend, dtype, **CASES[case])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 10, D, generator=gen).to(dtype)
    g = torch.randn(2, 10, D, generator=gen)
    a, b = run(new, x, g), run(old, x, g)
    if "drops" in case:
        assert new.dropped.item() > 0, "the case must drop pairs"
    assert_same(a, b, dtype)


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_new_layer_equals_legacy_under_activation_checkpointing(ac: str) -> None:
    new, old = pair("torch", torch.float32, capacity_factor=0.5, num_shared_experts=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, D, generator=gen)
    g = torch.randn(1, 12, D, generator=gen)
    assert_same(run(new, x, g, ac=ac), run(old, x, g), torch.float32)


@pytest.mark.parametrize("case", ["shared", "drops"])
def test_new_layer_under_compile_equals_eager(case: str) -> None:
    """The custom ops trace (fake kernels, registered autograd) and compute the same. bf16:
    compiled, the grouped GEMM takes only bf16 (as `apply_compile` requires). With capacity
    drops: on torch 2.11 dynamo got x's gradient wrong while the gather-in zeroed the dropped
    rows in place (every element off by up to 80% of the gradient's scale)."""
    new, _ = pair("torch", torch.bfloat16, **CASES[case])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, D, generator=gen).bfloat16()
    g = torch.randn(1, 8, D, generator=gen)
    eager = run(new, x, g)
    assert case != "drops" or new.dropped.item() > 0, "the case must drop pairs"
    new.zero_grad(set_to_none=True)
    compiled = torch.compile(new, backend="aot_eager", fullgraph=False)
    got = run(compiled, x, g)  # type: ignore[arg-type]
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], rtol=0, atol=0, msg=k)


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("c++") is None,
    reason="inductor compiles C++ on a CPU and no C++ compiler is on PATH",
)
def test_new_layer_under_inductor_equals_legacy() -> None:
    """Compiled by inductor (generated C++ on a CPU; Triton on a GPU), the bf16 layer with
    shared experts and capacity drops equals the legacy layer as eager bf16 equals it
    (inductor keeps fused elementwise intermediates in fp32, so not bit-identical)."""
    new, old = pair("torch", torch.bfloat16, num_shared_experts=1, capacity_factor=0.5)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 12, D, generator=gen).bfloat16()
    g = torch.randn(2, 12, D, generator=gen)
    compiled = torch.compile(new, backend="inductor", fullgraph=False)
    got = run(compiled, x, g)  # type: ignore[arg-type]
    assert new.dropped.item() > 0, "the case must drop pairs"
    assert_same(got, run(old, x, g), torch.bfloat16)


# --- kernels against their twins and autograd ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu_matches_autograd(backend: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    h = (torch.randn(37, 2 * 24, generator=gen) * 3).to(dtype)  # F not a power of two
    g = torch.randn(37, 24, generator=gen).to(dtype)
    hr = h.float().clone().requires_grad_()
    a, b = hr.chunk(2, dim=-1)
    ref = F.silu(a) * b
    ref.backward(g.float())
    hk = h.clone().requires_grad_()
    out = swiglu(hk, backend)
    out.backward(g)
    assert out.dtype == dtype and hk.grad is not None and hk.grad.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.float(), ref.detach(), **tol)
    torch.testing.assert_close(hk.grad.float(), hr.grad, **tol)


@needs_triton
def test_swiglu_triton_equals_twin_many_blocks() -> None:
    """More than one column block per row (F > 1024 columns) and the mask of the last."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(3, 2 * 1100, generator=gen)
    g = torch.randn(3, 1100, generator=gen)
    outs = {}
    for backend in ("torch", "triton"):
        hk = h.clone().requires_grad_()
        out = swiglu(hk, backend)
        out.backward(g)
        outs[backend] = (out, hk.grad)
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs["triton"][1], outs["torch"][1], rtol=1e-6, atol=1e-6)


def _combine_case(dtype: torch.dtype, drops: bool):
    from trainer.dispatch import DispatchMeta, sort_pairs

    T, K, E, Dm = 9, 3, 4, 40
    gen = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if drops:
        ids[1, 2] = ids[4, 0] = ids[7, 1] = E
    order, pos, _ = sort_pairs(ids, E)
    keep = ids.reshape(-1) < E
    w = torch.where(keep.view(T, K), torch.rand(T, K, generator=gen), 0.0)
    meta = DispatchMeta(order_S=order, pos_P=pos, weights_TK=w, keep_P=keep if drops else None)
    y = torch.randn(T * K, Dm, generator=gen).to(dtype)
    if drops:
        y[int(keep.sum()) :] = float("nan")  # dropped rows: never read
    return meta, y, torch.randn(T, Dm, generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("drops", [False, True], ids=["dropless", "drops"])
def test_combine_matches_reference(backend: str, dtype: torch.dtype, drops: bool) -> None:
    meta, y, g = _combine_case(dtype, drops)
    T, K = meta.weights_TK.shape
    # Reference: a per-pair loop in fp32 over the kept pairs.
    yr = y.float().clone().requires_grad_()
    wr = meta.weights_TK.clone().requires_grad_()
    rows = []
    for t in range(T):
        acc = torch.zeros(y.shape[1])
        for k in range(K):
            p = t * K + k
            if meta.keep_P is None or meta.keep_P[p]:
                acc = acc + wr[t, k] * yr[int(meta.pos_P[p])]
        rows.append(acc)
    ref = torch.stack(rows)
    (ref * g).sum().backward()
    yk = y.clone().requires_grad_()
    wk = meta.weights_TK.clone().requires_grad_()
    kw = dict(token_S=meta.token_S, order_S=meta.order_S, pos_TK=meta.pos_TK)
    out = combine(yk, wk, **kw, keep_TK=meta.keep_TK, out_dtype=dtype, backend=backend)
    (out.float() * g).sum().backward()
    assert out.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref.detach(), **tol)
    assert yk.grad is not None and wk.grad is not None
    n = int(meta.keep_P.sum()) if meta.keep_P is not None else T * K
    torch.testing.assert_close(yk.grad[:n].float(), yr.grad[:n], **tol)
    assert torch.isfinite(wk.grad).all()
    torch.testing.assert_close(wk.grad, wr.grad, **tol)


def test_backend_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="'cuda_only'"):
        swiglu(torch.zeros(2, 4), "cuda_only")
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        swiglu(torch.zeros(2, 5), "torch")


# --- checkpoints of the old layer -------------------------------------------------------


def test_state_dict_format_unchanged_and_old_checkpoint_loads(tmp_path) -> None:
    new, old = pair("torch", torch.float32, num_shared_experts=1)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert set(old_sd) == set(new_sd)
    assert "experts.3.w1" in new_sd and "experts.w13" not in new_sd
    assert all(torch.equal(old_sd[k], new_sd[k]) for k in old_sd)

    # The old layer's state dict (per-expert w1/w3/w2) into a fresh new layer.
    fresh = MoE(D, new.cfg)
    fresh.load_state_dict(old_sd)
    torch.testing.assert_close(fresh.experts.w13, new.experts.w13, rtol=0, atol=0)

    # A DCP checkpoint written by the old layer, loaded in place into the new one's views
    # (what resume does: `model_state` hands DCP views of w13's halves).
    dcp.save(
        {f"model.{k}": v for k, v in old_sd.items()}, checkpoint_id=str(tmp_path), no_dist=True
    )
    fresh = MoE(D, new.cfg)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    dcp.load(model_state(fresh), checkpoint_id=str(tmp_path), no_dist=True)
    torch.testing.assert_close(fresh.experts.w13, new.experts.w13, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 6, D, generator=gen)
    torch.testing.assert_close(fresh(x)[0], old(x)[0], rtol=1e-6, atol=1e-6)


def test_old_optimizer_state_loads_into_w13_and_saves_in_the_old_keys(tmp_path) -> None:
    """AdamW's moments saved per expert as w1/w3/w2 (and the step counters per weight), as
    trainer/checkpoint.py wrote them before w13, load into w13's halves; saving again gives
    the same keys and values."""
    from torch.distributed.checkpoint import FileSystemReader

    from trainer.checkpoint import _optimizer_targets, optimizer_state

    new, old = pair("torch", torch.float32)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 10, D, generator=gen)
    opt_old = torch.optim.AdamW(old.experts.parameters(), lr=1e-2)
    out, _ = old(x)
    out.square().sum().backward()
    opt_old.step()
    saved: dict[str, Any] = {}
    for w in ("w1", "w3", "w2"):
        st = opt_old.state[getattr(old.experts, w)]
        for k in ("exp_avg", "exp_avg_sq"):
            for i in range(CFG["num_experts"]):
                saved[f"optim.experts.{i}.{w}.{k}"] = st[k][i].clone()
        saved[f"optim.experts.{w}.step"] = st["step"].clone()
    dcp.save(saved, checkpoint_id=str(tmp_path), no_dist=True)

    holder = torch.nn.Module()
    holder.experts = new.experts
    opt_new = torch.optim.AdamW(holder.parameters(), lr=1e-2)
    md = FileSystemReader(str(tmp_path)).read_metadata()
    targets, installs = _optimizer_targets(holder, opt_new, md)
    dcp.load(targets, checkpoint_id=str(tmp_path), no_dist=True)
    for p, st in installs:
        opt_new.state[p] = st
    st13 = opt_new.state[new.experts.w13]
    for k in ("exp_avg", "exp_avg_sq"):
        want = torch.cat([opt_old.state[old.experts.w1][k], opt_old.state[old.experts.w3][k]], -1)
        torch.testing.assert_close(st13[k], want, rtol=0, atol=0)
    assert float(st13["step"]) == 1.0

    again = optimizer_state(holder, opt_new)
    again.pop("meta.param_groups")
    assert set(again) == set(saved)
    for k, v in saved.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)


def _ep_rank_with(rank: int, world: int, ep: int, kw: dict, exchange: str, backend: str):
    """tests/test_moe_ep.py's EP rank with both kernels' `backend` (Triton is interpreted on
    the CPU)."""
    from tests.test_moe_ep import _ep_rank
    from trainer.dispatch import TokenDispatcher
    from trainer.moe import GroupedExperts

    GroupedExperts.backend = backend
    TokenDispatcher.kernel_backend = backend
    return _ep_rank(rank, world, ep, kw, exchange)


@needs_triton
@pytest.mark.parametrize("exchange", ["p2p", "all_to_all"])
def test_triton_kernels_at_ep2_equal_the_twins(exchange: str) -> None:
    """At EP 2 the combine sees only the kept rows (a prefix of the sorted order): with
    capacity drops, the kernels' outputs and gradients equal the twins' at the same layout
    (each rank drops by its own tokens' capacity, so one process is no reference here)."""
    from tests.distributed import run_ranks

    kw = {"capacity_factor": 0.5}
    twins = run_ranks(_ep_rank_with, 2, 2, kw, exchange, "torch")
    kernels = run_ranks(_ep_rank_with, 2, 2, kw, exchange, "triton")
    for rank, (a, b) in enumerate(zip(kernels, twins, strict=True)):
        for k in ("out", "x_grad", "router_grad", "w1_grad", "w2_grad"):
            scale = b[k].abs().max().item()
            assert scale > 0, (rank, k)
            torch.testing.assert_close(
                a[k], b[k], rtol=1e-5, atol=1e-6 * scale, msg=f"rank {rank} {k}"
            )
