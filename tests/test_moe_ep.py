"""Expert parallelism on gloo ranks against a single-process reference.

The reference runs the whole global batch (every rank's tokens) through one MoE layer in one
process. Each rank then runs its own tokens through the expert-parallel layer; its outputs,
its input gradients and (summed as the loop's gradient sync would, before scaling) the router
and expert gradients must equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks
from trainer.config import MoEConfig, load_config
from trainer.dispatch import AllToAllDispatcher, LocalDispatcher
from trainer.mesh import build_mesh
from trainer.moe import MoE

D, T = 16, 12
MOE = dict(num_experts=8, top_k=2, expert_hidden=16, aux_loss_coef=0.1, z_loss_coef=0.01)


def _weights_and_data(world: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    E, F = MOE["num_experts"], MOE["expert_hidden"]
    w = {
        "router": torch.randn(E, D, generator=g) * 0.5,
        "w1": torch.randn(E, D, F, generator=g) * 0.3,
        "w3": torch.randn(E, D, F, generator=g) * 0.3,
        "w2": torch.randn(E, F, D, generator=g) * 0.3,
    }
    x = torch.randn(world * T, D, generator=g)
    grad_out = torch.randn(world * T, D, generator=g)
    return w, x, grad_out


def _layer(w: dict[str, torch.Tensor], offset: int, num_local: int, **kw) -> MoE:
    moe = MoE(D, MoEConfig(**{**MOE, **kw}))
    with torch.no_grad():
        moe.router.weight.copy_(w["router"])
        moe.experts.shard(expert_offset=offset, num_local=num_local)
        for name in ("w1", "w3", "w2"):
            getattr(moe.experts, name).copy_(w[name][offset : offset + num_local])
        if moe.shared is not None:
            g = torch.Generator().manual_seed(11)
            for p in moe.shared.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    moe.train()
    return moe


def _reference(world: int, **kw):
    w, x, grad_out = _weights_and_data(world)
    moe = _layer(w, 0, MOE["num_experts"], **kw)
    x = x.clone().requires_grad_()
    out, losses = moe(x.view(1, -1, D))
    # The ranks' losses are each rank's local aux; their sum is world x the global-batch aux.
    ((out.view(-1, D) * grad_out).sum() + world * (losses.aux_loss + losses.z_loss)).backward()
    return {
        "out": out.view(-1, D).detach(),
        "x_grad": x.grad,
        "router_grad": moe.router.weight.grad,
        "w1_grad": moe.experts.w13.grad,
        "w2_grad": moe.experts.w2.grad,
        "aux": losses.aux_loss.detach(),
    }


def _ep_rank(rank: int, world: int, ep: int, kw: dict, exchange: str = "auto"):
    torch.manual_seed(1234 + rank)  # nothing in the layer may depend on the rank's RNG
    mesh = build_mesh(world_size=world, rank=rank, ep=ep)
    w, x, grad_out = _weights_and_data(world)
    L = MOE["num_experts"] // ep
    moe = _layer(w, mesh.ep_rank * L, L, **kw)
    if ep > 1:
        moe.dispatcher = AllToAllDispatcher(
            MOE["num_experts"],
            ep_group=mesh.group("ep"),
            batch_group=mesh.group("world"),
            exchange=exchange,
        )
    else:
        moe.dispatcher = LocalDispatcher(MOE["num_experts"], batch_group=mesh.group("world"))
    xs = x[rank * T : (rank + 1) * T].clone().requires_grad_()
    out, losses = moe(xs.view(1, T, D))
    (
        (out.view(-1, D) * grad_out[rank * T : (rank + 1) * T]).sum()
        + losses.aux_loss
        + losses.z_loss
    ).backward()
    router_grad = moe.router.weight.grad.clone()
    dist.all_reduce(router_grad)
    w1_grad, w2_grad = moe.experts.w13.grad.clone(), moe.experts.w2.grad.clone()
    if mesh.dp > 1:
        dist.all_reduce(w1_grad, group=mesh.group("dp"))
        dist.all_reduce(w2_grad, group=mesh.group("dp"))
    aux = losses.aux_loss.detach().clone()
    dist.all_reduce(aux)
    return {
        "offset": mesh.ep_rank * L,
        "out": out.view(-1, D).detach(),
        "x_grad": xs.grad,
        "router_grad": router_grad,
        "w1_grad": w1_grad,
        "w2_grad": w2_grad,
        "aux_mean": aux / world,
    }


@pytest.mark.parametrize(
    ("world", "ep", "exchange"),
    [
        (1, 1, "auto"),
        (2, 2, "p2p"),
        (2, 2, "all_to_all"),
        (2, 1, "auto"),
        (4, 4, "p2p"),
        (4, 2, "p2p"),
    ],
)
def test_ep_layer_matches_single_process_reference(world, ep, exchange):
    ref = _reference(world)
    results = run_ranks(_ep_rank, world, ep, {}, exchange)
    L = MOE["num_experts"] // ep
    tol = dict(rtol=1e-5, atol=1e-5)
    for rank, r in enumerate(results):
        torch.testing.assert_close(r["out"], ref["out"][rank * T : (rank + 1) * T], **tol)
        torch.testing.assert_close(r["x_grad"], ref["x_grad"][rank * T : (rank + 1) * T], **tol)
        torch.testing.assert_close(r["router_grad"], ref["router_grad"], **tol)
        o = r["offset"]
        torch.testing.assert_close(r["w1_grad"], ref["w1_grad"][o : o + L], **tol)
        torch.testing.assert_close(r["w2_grad"], ref["w2_grad"][o : o + L], **tol)
        # the mean of the ranks' aux losses is the global-batch aux loss
        torch.testing.assert_close(r["aux_mean"], ref["aux"], **tol)


def test_ep_layer_with_shared_experts_and_sigmoid_groups():
    kw = {
        "num_shared_experts": 1,
        "score_func": "sigmoid",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
    }
    ref = _reference(2, **kw)
    results = run_ranks(_ep_rank, 2, 2, kw)
    for rank, r in enumerate(results):
        torch.testing.assert_close(
            r["out"], ref["out"][rank * T : (rank + 1) * T], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(r["router_grad"], ref["router_grad"], rtol=1e-5, atol=1e-5)


def _train(rank: int, world: int, overrides: list[str]):
    from trainer.loop import run

    cfg = load_config("infra/runs/tiny.yaml", overrides)
    summary = run(cfg, sinks=[])
    return summary.losses


def test_same_seed_same_loss_curve_at_ep1_and_ep2(tmp_path):
    """20 steps: one process with the whole global batch, 2 ranks at EP=1 (DP=2) and 2 ranks
    at EP=2 follow the same loss curve, and the loss falls on the byte corpus."""
    common = ["train.steps=20", "train.warmup_steps=3", "model.moe.bias_update_rate=0.001"]
    one = _train(
        0, 1, [*common, "parallel.ep=1", "train.micro_batch_size=4", f"run.output_dir={tmp_path}/a"]
    )
    dp2 = run_ranks(
        _train,
        2,
        [*common, "parallel.ep=1", "train.micro_batch_size=2", f"run.output_dir={tmp_path}/b"],
    )
    ep2 = run_ranks(
        _train,
        2,
        [*common, "parallel.ep=2", "train.micro_batch_size=2", f"run.output_dir={tmp_path}/c"],
    )
    assert len(one) == 20
    torch.testing.assert_close(torch.tensor(dp2[0]), torch.tensor(one), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(ep2[0]), torch.tensor(one), rtol=1e-4, atol=1e-4)
    assert ep2[0] == ep2[1]  # every rank reports the same global-batch loss
    assert sum(one[-3:]) / 3 < one[0] - 0.5


def _grads_after_sync(rank: int, world: int, ep: int):
    from trainer.loop import setup, train_step

    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            f"parallel.ep={ep}",
            f"train.micro_batch_size={4 // world}",
            "train.grad_clip=0",
            "train.lr=1e-9",
        ],
    )
    state = setup(cfg)
    # Capture gradients just before the optimizer step.
    captured = {}

    def hook(opt, args, kwargs):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        for name, p in state.model.named_parameters():
            g = p.grad
            if isinstance(g, DTensor):
                # FSDP: this rank's shard of the gradient, and where it sits in the whole.
                shape, offset = compute_local_shape_and_global_offset(
                    g.shape, g.device_mesh, g.placements
                )
                captured[name + "@slice"] = [(o, o + n) for o, n in zip(offset, shape, strict=True)]
                g = g.to_local()
            captured[name] = g.clone()
            if name.endswith(("experts.w13", "experts.w2")):
                off = state.model.moe_layers()[0].experts.expert_offset
                captured[name + "@offset"] = torch.tensor(off)

    state.optimizer.register_step_pre_hook(hook)
    train_step(state)
    return captured


def test_gradient_scale_at_ep2_equals_ep1():
    """After the loop's gradient sync, every gradient at EP=2 (dense averaged over the world,
    experts summed over dp and divided by the world) equals the one-process gradient."""
    ref = _grads_after_sync(0, 1, 1)
    for rank, got in enumerate(run_ranks(_grads_after_sync, 2, 2)):
        for name, g in got.items():
            if name.endswith(("@offset", "@slice")):
                continue
            want = ref[name]
            if name.endswith(("experts.w13", "experts.w2")):
                off = int(got[name + "@offset"])
                want = want[off : off + got[name + "@slice"][0][1] - got[name + "@slice"][0][0]]
            if name + "@slice" in got:
                want = want[tuple(slice(a, b) for a, b in got[name + "@slice"])]
            torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")


def test_chunk_starts_in_both_orders():
    from trainer.dispatch import _chunk_starts

    # 2 ranks x 3 local experts; counts[p * L + j]
    counts = [1, 0, 2, 3, 4, 5]
    assert _chunk_starts(counts, 2, 3, expert_major=False) == [0, 1, 1, 3, 6, 10]
    # expert-major: (0,0) at 0, (1,0) at 1, (0,1) at 4 (empty), (1,1) at 4, (0,2) at 8,
    # (1,2) at 10; listed by p * L + j
    assert _chunk_starts(counts, 2, 3, expert_major=True) == [0, 4, 8, 1, 4, 10]


def _exchange_rank(rank: int, world: int, ep: int):
    from trainer.dispatch import ep_exchange

    mesh = build_mesh(world_size=world, rank=rank, ep=ep)
    group = mesh.group("ep")
    me, L = mesh.ep_rank, 3
    # Rows rank q sends to rank p's local expert j: (q + 2p + j) % 3 (some chunks empty).
    n = [[[(q + 2 * p + j) % 3 for j in range(L)] for p in range(ep)] for q in range(ep)]
    send_SL = [n[me][p][j] for p in range(ep) for j in range(L)]
    recv_SL = [n[q][me][j] for q in range(ep) for j in range(L)]
    # Row value encodes (source rank, destination rank, local expert, row within chunk).
    rows = [
        [1000 * me + 100 * p + 10 * j + i, -1.0]
        for p in range(ep)
        for j in range(L)
        for i in range(n[me][p][j])
    ]
    x = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    out = ep_exchange(x, send_SL, recv_SL, group.group_name, True)
    # grouped by local expert, then by source rank, each chunk in the sender's order
    want = [
        1000 * q + 100 * me + 10 * j + i
        for j in range(L)
        for q in range(ep)
        for i in range(n[q][me][j])
    ]
    back = ep_exchange(out, send_SL, recv_SL, group.group_name, False)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()
    # the backward is the way back: <exchange(x), g> = <x, exchange^T(g)>
    gx = ep_exchange(g, send_SL, recv_SL, group.group_name, False)
    return {
        "got": out[:, 0].tolist(),
        "want": want,
        "round_trip": torch.equal(back.detach(), x.detach()),
        "grad_is_way_back": torch.equal(x.grad, gx),
    }


@pytest.mark.parametrize(("world", "ep"), [(2, 2), (4, 2)])
def test_ep_exchange_places_rows_by_local_expert_and_back(world, ep):
    for r in run_ranks(_exchange_rank, world, ep):
        assert r["got"] == r["want"]
        assert r["round_trip"] and r["grad_is_way_back"]


def _count_exchanges_rank(rank: int, world: int, mode: str) -> int:
    from torch.utils.checkpoint import checkpoint

    from trainer.parallelize import _selective_context

    calls = []
    inner = dist.batch_isend_irecv

    def counting(ops):
        calls.append(len(ops))
        return inner(ops)

    dist.batch_isend_irecv = counting  # this spawned process only
    w, x, _ = _weights_and_data(world)
    moe = _layer(w, rank * 4, 4)
    group = dist.group.WORLD
    moe.dispatcher = AllToAllDispatcher(8, ep_group=group, batch_group=group, exchange="p2p")
    xs = x[rank * T : (rank + 1) * T].clone().requires_grad_()

    def run(x):
        return moe(x.view(1, T, D))[0]

    if mode == "none":
        out = run(xs)
    elif mode == "full":
        out = checkpoint(run, xs, use_reentrant=False)
    else:
        out = checkpoint(run, xs, use_reentrant=False, context_fn=_selective_context)
    out.sum().backward()
    return len(calls)


@pytest.mark.parametrize(("mode", "exchanges"), [("none", 4), ("selective", 4), ("full", 6)])
def test_selective_checkpointing_keeps_the_row_exchange(mode, exchanges):
    # Two exchanges in the forward, two in the backward; a full recompute repeats the
    # forward's two, a selective one reuses their outputs.
    assert run_ranks(_count_exchanges_rank, 2, mode) == [exchanges, exchanges]
