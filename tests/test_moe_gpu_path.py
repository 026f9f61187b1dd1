"""The MoE path as a GPU runs it, checked on CPU: token drops with unwritten grouped-GEMM rows,
the router under bf16 autocast, drops by affinity, the device-to-host sync budget, and load
counters under activation-checkpoint recompute.

`torch._grouped_mm` leaves the output rows past its last offset, and in backward the input
gradient rows past it, unwritten. On a GPU's caching allocator they hold whatever the memory
held; here `poisoned_grouped_mm` fills them with NaN so that any path that lets them reach a
token fails every time, not one run in four.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.distributed import run_ranks
from trainer.config import MoEConfig
from trainer.dispatch import AllToAllDispatcher, LocalDispatcher
from trainer.moe import MoE, Router, capacity, drop_overflow

torch.set_num_threads(1)

_real_grouped_mm = torch._grouped_mm


class _PoisonedGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        out = _real_grouped_mm(x, w, offs=offs)
        out[int(offs[-1]) :] = float("nan")
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        with torch.enable_grad():
            xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
            gx, gw = torch.autograd.grad(_real_grouped_mm(xr, wr, offs=offs), (xr, wr), grad)
        gx = gx.clone()
        gx[int(offs[-1]) :] = float("nan")
        return gx, gw, None


def poisoned_grouped_mm(x: torch.Tensor, w: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    return _PoisonedGroupedMM.apply(x, w, offs)


def _poison_freed_memory() -> None:
    # Freed NaN-filled blocks of the sizes the layer allocates, for the allocator to reuse.
    for n in (1 << 12, 1 << 14, 1 << 16):
        torch.full((n,), float("nan"))


D = 8
CFG = dict(num_experts=4, top_k=2, expert_hidden=16, aux_loss_coef=0.0)


def make_moe(**kw: Any) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, MoEConfig(**{**CFG, **kw}))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.5)
    return moe


def kept_by_affinity(ids_TK: torch.Tensor, scores_TK: torch.Tensor, E: int, cap: int):
    """Independent reference: per expert, keep the cap highest-scoring pairs (ties: lower
    token first). Returns a [T, K] bool mask."""
    T, K = ids_TK.shape
    keep = torch.zeros(T, K, dtype=torch.bool)
    for e in range(E):
        pairs = [(t, k) for t in range(T) for k in range(K) if int(ids_TK[t, k]) == e]
        pairs.sort(key=lambda tk: (-float(scores_TK[tk]), tk[0]))
        for t, k in pairs[:cap]:
            keep[t, k] = True
    return keep


def reference_with_drops(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The layer written as a per-pair loop over the kept pairs only, differentiable in x."""
    cfg = moe.cfg
    r = moe.router(x_TD)
    keep = kept_by_affinity(r.ids_TK, r.scores_TK, cfg.num_experts, capacity(len(x_TD), cfg))
    assert not keep.all(), "the test case must drop pairs"
    ex = moe.experts
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(D)
        for k in range(cfg.top_k):
            if keep[t, k]:
                e = int(r.ids_TK[t, k])
                h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
                acc = acc + r.weights_TK[t, k] * (h @ ex.w2[e])
        rows.append(acc)
    return torch.stack(rows)


def test_drops_at_ep1_give_finite_exact_input_gradients(monkeypatch):
    monkeypatch.setattr(torch, "_grouped_mm", poisoned_grouped_mm)
    moe = make_moe(capacity_factor=0.5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, D, generator=g)
    grad_out = torch.randn(12, D, generator=g)
    _poison_freed_memory()
    xa = x.clone().requires_grad_()
    out, _ = moe(xa.view(1, 12, D))
    (out.view(12, D) * grad_out).sum().backward()
    assert moe.dropped.item() > 0
    assert torch.isfinite(xa.grad).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)
    w1_grad = moe.experts.w13.grad.clone()
    moe.zero_grad()
    xb = x.clone().requires_grad_()
    ref = reference_with_drops(moe, xb)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out.view(12, D), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1_grad, moe.experts.w13.grad, rtol=1e-5, atol=1e-5)


def _ep_drop_rank(rank: int, world: int, exchange: str) -> dict[str, torch.Tensor]:
    torch._grouped_mm = poisoned_grouped_mm  # this spawned process only
    moe = make_moe(num_experts=4, capacity_factor=0.5)
    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(12, D, generator=g)
    grad_out = torch.randn(12, D, generator=g)
    full = {n: getattr(moe.experts, n).detach().clone() for n in ("w1", "w3", "w2")}
    L = 4 // world
    moe.experts.shard(expert_offset=rank * L, num_local=L)
    with torch.no_grad():
        for n, w in full.items():
            getattr(moe.experts, n).copy_(w[rank * L : (rank + 1) * L])
    moe.dispatcher = AllToAllDispatcher(
        4, ep_group=torch.distributed.group.WORLD, batch_group=None, exchange=exchange
    )
    _poison_freed_memory()
    xa = x.clone().requires_grad_()
    out, _ = moe(xa.view(1, 12, D))
    (out.view(12, D) * grad_out).sum().backward()
    ref_moe = make_moe(num_experts=4, capacity_factor=0.5)  # the same seed: the same weights
    xb = x.clone().requires_grad_()
    ref = reference_with_drops(ref_moe, xb)
    (ref * grad_out).sum().backward()
    return {
        "out": out.view(12, D).detach(),
        "ref": ref.detach(),
        "x_grad": xa.grad,
        "ref_x_grad": xb.grad,
        "dropped": moe.dropped.clone(),
    }


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["p2p", "all_to_all"])
def test_drops_at_ep2_give_finite_exact_input_gradients(exchange):
    for r in run_ranks(_ep_drop_rank, 2, exchange):
        assert r["dropped"].item() > 0
        assert torch.isfinite(r["x_grad"]).all()
        torch.testing.assert_close(r["out"], r["ref"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["x_grad"], r["ref_x_grad"], rtol=1e-5, atol=1e-5)


def test_router_is_fp32_under_bf16_autocast():
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=16, bias_update_rate=1e-3)
    router = Router(D, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
        # A bias step below bf16's resolution around the scores must still select.
        router.expert_bias.copy_(torch.arange(8) * 1e-3)
    x = torch.randn(32, D)
    want = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x)
    for name in ("logits_TE", "scores_TE", "weights_TK", "scores_TK"):
        t = getattr(got, name)
        assert t.dtype == torch.float32, name
        torch.testing.assert_close(t, getattr(want, name), rtol=0, atol=0, msg=name)
    assert torch.equal(got.ids_TK, want.ids_TK)
    # The whole layer under autocast: fp32 out for fp32 in, finite gradients.
    moe = make_moe()
    xg = torch.randn(1, 10, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = moe(xg)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_drops_by_affinity_by_hand():
    # E = 3, top-2, capacity 2. Expert 0 is wanted by all three tokens:
    #   token 0: e0 0.3 (its second choice), e1 0.7
    #   token 1: e0 0.4 (second), e2 0.6
    #   token 2: e0 0.9 (first), e1 0.1
    # By score expert 0 drops token 0's 0.3; by token order it would drop token 2's 0.9,
    # that token's first choice.
    ids = torch.tensor([[0, 1], [0, 2], [0, 1]])
    scores = torch.tensor([[0.3, 0.7], [0.4, 0.6], [0.9, 0.1]])
    assert drop_overflow(ids, 3, 2, scores_TK=scores).tolist() == [[3, 1], [0, 2], [0, 1]]
    assert drop_overflow(ids, 3, 2).tolist() == [[0, 1], [0, 2], [3, 1]]
    # Random routing: every expert keeps exactly its cap best pairs (the loop reference).
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(40)])
    scores = torch.rand(40, 3, generator=g)
    kept = drop_overflow(ids, 6, 15, scores_TK=scores) < 6
    assert torch.equal(kept, kept_by_affinity(ids, scores, 6, 15))
    assert not kept.all()


def test_drop_policy_reaches_the_layer():
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(2))
    by_score, by_order = (
        make_moe(capacity_factor=0.5),
        make_moe(capacity_factor=0.5, drop_policy="token_order"),
    )
    a, _ = by_score(x)
    b, _ = by_order(x)
    assert by_score.dropped.item() == by_order.dropped.item() > 0
    assert not torch.allclose(a, b)


_SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.bincount",
    "aten.unique",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.masked_select",
    "aten.item",
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that force a device-to-host sync when they run on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            self.syncs.append(name + " without output_size")
        elif name == "aten._to_copy" and getattr(kwargs.get("device"), "type", None) == "cpu":
            self.syncs.append("copy to host")
        elif name == "aten.index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.syncs.append("boolean-mask index")
        return func(*args, **kwargs)


def test_sync_counter_sees_the_ops_that_sync():
    x = torch.arange(6)
    with SyncCounter() as c:
        torch.bincount(x)
        x.sum().item()
        x[x > 2]
        x.to("cpu", copy=True)
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=15)  # not a sync
        x.float()  # not a sync
    assert len(c.syncs) == 5, c.syncs


@pytest.mark.parametrize("cf", [0.0, 1.0])
def test_sync_budget_at_ep1_is_zero(cf):
    moe = make_moe(capacity_factor=cf, aux_loss_coef=0.01, bias_update_rate=1e-3)
    moe.train()
    x = torch.randn(1, 16, D, requires_grad=True)
    with SyncCounter() as fwd:
        out, losses = moe(x)
    with SyncCounter() as bwd:
        (out.sum() + losses.aux_loss).backward()
    assert fwd.syncs == [] and bwd.syncs == []


def _sync_rank(rank: int, world: int, cf: float, exchange: str) -> tuple[list[str], list[str]]:
    moe = make_moe(num_experts=4, capacity_factor=cf, aux_loss_coef=0.01)
    moe.experts.shard(expert_offset=rank * 2, num_local=2)
    group = torch.distributed.group.WORLD
    moe.dispatcher = AllToAllDispatcher(4, ep_group=group, batch_group=group, exchange=exchange)
    moe.train()
    x = torch.randn(1, 16, D, requires_grad=True)
    with SyncCounter() as fwd:
        out, losses = moe(x)
    with SyncCounter() as bwd:
        (out.sum() + losses.aux_loss).backward()
    return fwd.syncs, bwd.syncs


@pytest.mark.slow
@pytest.mark.parametrize("exchange", ["p2p", "all_to_all"])
def test_sync_budget_at_ep2_is_one_copy_per_layer(exchange):
    for cf in (0.0, 1.0):
        for fwd, bwd in run_ranks(_sync_rank, 2, cf, exchange):
            assert fwd == ["copy to host"] and bwd == [], (cf, fwd, bwd)


def test_load_counters_count_the_first_forward_only_under_checkpointing():
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(1, 20, D, generator=torch.Generator().manual_seed(4))
    plain, ckpt = make_moe(capacity_factor=0.5), make_moe(capacity_factor=0.5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, _ = plain(xa)
    out_a.sum().backward()
    out_b, _ = checkpoint(ckpt, xb, use_reentrant=False)
    out_b.sum().backward()
    assert plain.routed_E.sum().item() == 20 * 2 and plain.dropped.item() > 0
    torch.testing.assert_close(ckpt.routed_E, plain.routed_E, rtol=0, atol=0)
    torch.testing.assert_close(ckpt.dropped, plain.dropped, rtol=0, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)


def test_dispatch_combine_is_deterministic_and_matches_index_add():
    # The combine's backward is a gather, not an index_add: two runs agree bit for bit and
    # equal the scatter-add formulation.
    T, E, K = 30, 5, 3
    g = torch.Generator().manual_seed(8)
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    d = LocalDispatcher(E)
    grads = []
    for _ in range(2):
        xi = x.clone().requires_grad_()
        rows, _, meta = d.dispatch(xi, ids, w, may_drop=False)
        out = d.combine(rows * 2.0, meta, x.dtype)
        out.pow(2).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    want = torch.zeros(T, D).index_add_(
        0,
        torch.arange(T).repeat_interleave(K),
        (2.0 * w.reshape(-1, 1)) * x.repeat_interleave(K, 0),
    )
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], 2 * want * 2.0 * w.sum(1, keepdim=True))


def test_dispatch_and_combine_functions_pass_gradcheck():
    from trainer.dispatch import DispatchMeta, replicate_rows, sort_pairs, weighted_combine

    T, E, K, Dg = 5, 3, 2, 3
    ids = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 1]])  # id 3 = dropped
    order, pos, _ = sort_pairs(ids, E)
    keep = ids.reshape(-1) < E
    x = torch.randn(T, Dg, dtype=torch.float64, requires_grad=True)
    meta = DispatchMeta(order_S=order, pos_P=pos, weights_TK=torch.zeros(T, K), keep_P=keep)
    assert torch.autograd.gradcheck(lambda x: replicate_rows(x, meta), (x,))
    y = torch.randn(T * K, Dg, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64).masked_fill(~keep.view(T, K), 0).requires_grad_()

    def combine(y, w):
        meta = DispatchMeta(order_S=order, pos_P=pos, weights_TK=w, keep_P=keep)
        return weighted_combine(y, meta, torch.float64)

    # The combine accumulates in fp32 by contract; gradcheck in float64 needs loose tolerances.
    assert torch.autograd.gradcheck(combine, (y, w), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_watchdog_message_is_true_on_both_backends():
    from trainer.resilience import CollectiveWatch

    gloo = CollectiveWatch(rank=0, world_size=1, timeout_s=5, backend="gloo")
    msg = gloo.describe("gradient all-reduce", 3, [0, 1])
    assert "waited over parallel.timeout_s (5 s) in the gradient all-reduce at step 3" in msg
    assert "asynchronously" not in msg
    nccl = CollectiveWatch(rank=1, world_size=1, timeout_s=5, backend="cpu:gloo,cuda:nccl")
    msg = nccl.describe("gradient all-reduce", 3, [0, 1])
    assert "rank 1's host waited" in msg and "in the gradient all-reduce at step 3" in msg
    assert "launched in an earlier phase" in msg and "TORCH_NCCL_TRACE_BUFFER_SIZE" in msg
