"""The fast step (issue 22): fused AdamW chosen on CUDA and equal to the foreach step, also on
FSDP's DTensor parameters; clipping folded into the fused kernel; FSDP at dp_shard 1
gathering and reducing once a step; one process in bf16 casting its weights once a step.

No GPU here: the CUDA choice is checked by the device it is made for, and the fused kernel
itself runs on the CPU, where torch has one too."""

from __future__ import annotations

import os

import pytest
import torch

from trainer.config import load_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "infra", "runs", "tiny.yaml")


def _cfg(out: str, *overrides: str):
    return load_config(
        TINY,
        [
            "ops.telemetry=false",
            "data.corpus_max_bytes=100000",
            f"run.output_dir={out}",
            "train.device=cpu",
            "parallel.ep=1",
            *overrides,
        ],
        ignore_sections=("cluster",),
    )


def _model(cfg):
    from trainer.model import build_model, materialize

    return materialize(build_model(cfg.model), device=torch.device("cpu"), seed=0)


def test_adamw_kernel_follows_the_device(tmp_path):
    from trainer.loop import build_optimizer

    cfg = _cfg(str(tmp_path))
    model = _model(cfg)
    on_cuda = build_optimizer(model, cfg, device=torch.device("cuda", 0))
    on_cpu = build_optimizer(model, cfg)
    for g in on_cuda.param_groups:
        assert g["fused"] is True and not g["foreach"]
    for g in on_cpu.param_groups:
        assert g["foreach"] is True and not g["fused"]
    # The meta device (a model not yet materialized) takes the CPU's kernel too.
    from trainer.model import build_model

    meta = build_optimizer(build_model(cfg.model), cfg)
    assert all(g["foreach"] and not g["fused"] for g in meta.param_groups)


def _fake_grads(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


@pytest.mark.parametrize("scale", [1e-3, 10.0])  # below the clip norm, and far above it
def test_fused_step_with_folded_clip_equals_foreach_clip_then_step(tmp_path, scale):
    from trainer.loop import build_optimizer
    from trainer.mesh import Mesh
    from trainer.parallelize import clip_grad_norm_

    cfg = _cfg(str(tmp_path))
    mesh = Mesh(world_size=1, rank=0, ep=1)
    ref, fused = _model(cfg), _model(cfg)
    opt_ref = build_optimizer(ref, cfg)
    opt_fused = build_optimizer(fused, cfg, device=torch.device("cuda"))  # fused, on the CPU
    for step in range(3):
        _fake_grads(ref, step, scale)
        _fake_grads(fused, step, scale)
        unclipped = [p.grad.clone() for p in fused.parameters()]
        n_ref = clip_grad_norm_(ref, mesh, 1.0, optimizer=opt_ref)
        n_fused = clip_grad_norm_(fused, mesh, 1.0, optimizer=opt_fused)
        assert float(n_fused) == pytest.approx(float(n_ref), rel=1e-6)
        # One pass: under the fused kernel the gradients are not rewritten.
        assert all(
            torch.equal(p.grad, u) for p, u in zip(fused.parameters(), unclipped, strict=True)
        )
        if scale > 1:
            assert float(n_ref) > 1.0 and float(opt_fused.grad_scale) == pytest.approx(
                float(n_ref), rel=1e-5
            )
        opt_ref.step()
        opt_fused.step()
    for a, b in zip(ref.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # Without clipping the scale is cleared, never left over from the step before.
    clip_grad_norm_(fused, mesh, 0.0, optimizer=opt_fused)
    assert opt_fused.grad_scale is None


def test_clip_norm_is_one_foreach_norm_over_uncopied_grads(tmp_path, monkeypatch):
    from trainer.mesh import Mesh
    from trainer.parallelize import clip_grad_norm_

    cfg = _cfg(str(tmp_path))
    model = _model(cfg)
    _fake_grads(model, 0, 1.0)
    calls: list[list[torch.Tensor]] = []
    real = torch._foreach_norm

    def spy(tensors, *a, **kw):
        calls.append(list(tensors))
        return real(tensors, *a, **kw)

    monkeypatch.setattr(torch, "_foreach_norm", spy)
    norm = clip_grad_norm_(model, Mesh(world_size=1, rank=0, ep=1), 0.0)
    assert len(calls) == 1
    grads = [p.grad for p in model.parameters()]
    # The very gradient tensors, not fp32 copies of them.
    assert [t.data_ptr() for t in calls[0]] == [g.data_ptr() for g in grads]
    want = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    assert float(norm) == pytest.approx(float(want), rel=1e-5)


def _fsdp_steps(rank: int, world: int, out: str, overrides: list[str], patch: str) -> dict:
    """Steps the tiny preset under FSDP on this group; counts FSDP's gathers (unshards that
    did work) and gradient reductions per step."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg

    import trainer.loop as loop
    from trainer.model import local_of

    if patch == "default_schedule":
        loop.keeps_gathered = lambda mesh: False  # type: ignore[assignment]
    if patch == "fused":
        loop.optimizer_kernel = lambda device: {"fused": True}  # type: ignore[assignment]
    counts = {"gathers": 0, "reduces": 0}
    real_unshard, real_reduce = pg.FSDPParamGroup.unshard, pg.foreach_reduce

    def unshard(self, *a, **kw):
        if not self.is_unsharded and self._all_gather_result is None:
            counts["gathers"] += 1
        return real_unshard(self, *a, **kw)

    def reduce(*a, **kw):
        counts["reduces"] += 1
        return real_reduce(*a, **kw)

    pg.FSDPParamGroup.unshard = unshard  # type: ignore[method-assign]
    pg.foreach_reduce = reduce
    state = loop.setup(_cfg(f"{out}/{rank}", *overrides))
    try:
        assert state.mesh.fsdp
        fused = {bool(g.get("fused")) for g in state.optimizer.param_groups}
        losses = []
        per_step = []
        for _ in range(2):
            before = dict(counts)
            losses.append(float(loop.train_step(state)["lm_loss"]))
            per_step.append({k: counts[k] - before[k] for k in counts})
        params = [local_of(p).detach().clone() for p in state.model.parameters()]
        units = sum(1 for m in state.model.modules() if hasattr(m, "_get_fsdp_state"))
        return {
            "losses": losses,
            "params": params,
            "per_step": per_step,
            "units": units,
            "fused": fused,
        }
    finally:
        state.source.close()


@pytest.mark.slow
def test_fsdp_at_dp_shard_1_gathers_and_reduces_once_a_step(tmp_path):
    from tests.distributed import run_ranks

    common = ["train.grad_accum=4", "train.activation_checkpoint=selective"]
    (once,) = run_ranks(_fsdp_steps, 1, str(tmp_path / "once"), common, "")
    (default,) = run_ranks(_fsdp_steps, 1, str(tmp_path / "default"), common, "default_schedule")
    units = once["units"]
    assert units >= 4  # blocks, embedding, head, root
    for s in once["per_step"]:
        assert s == {"gathers": units, "reduces": units}, (s, units)
    for s in default["per_step"]:
        # By default: four forwards, re-gathers in backward, a reduction per micro-batch.
        assert s["reduces"] == 4 * units and s["gathers"] > 4 * units
    assert once["losses"] == pytest.approx(default["losses"], rel=1e-6)
    for a, b in zip(once["params"], default["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fused_adamw_on_dtensor_parameters_equals_foreach(tmp_path):
    """FSDP over 2 gloo ranks at EP 2: the fused kernel (and the clip folded into it) takes
    the DTensor parameters and steps as foreach does."""
    from tests.distributed import run_ranks

    common = ["parallel.ep=2", "train.grad_clip=0.05"]  # small: the clip acts at every step
    fused = run_ranks(_fsdp_steps, 2, str(tmp_path / "fused"), common, "fused")
    ref = run_ranks(_fsdp_steps, 2, str(tmp_path / "ref"), common, "")
    for f, r in zip(fused, ref, strict=True):
        assert f["fused"] == {True} and r["fused"] == {False}
        assert f["losses"] == pytest.approx(r["losses"], rel=1e-6)
        for a, b in zip(f["params"], r["params"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_one_process_bf16_casts_the_weights_once_a_step(tmp_path):
    from trainer.loop import COMPUTE_COPIES_KEY, setup, train_step

    state = setup(_cfg(str(tmp_path), "train.dtype=bf16", "train.grad_accum=4"))
    try:
        copies = state.extra[COMPUTE_COPIES_KEY]
        moe = state.model.moe_layers()[0]
        seen = []
        # The experts' weights reach the grouped GEMM already in bf16: the layer's own
        # `.to(dtype)` has nothing to do.
        hook = moe.experts.register_forward_pre_hook(
            lambda m, args: seen.append((m.w1.dtype, args[0].dtype))
        )
        for step in range(1, 3):
            train_step(state)
            assert copies.casts == step  # one cast of the whole model a step, not four
        hook.remove()
        assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
        # Outside the step: fp32 parameters (what the optimizer, checkpoints and evaluation
        # see), no gradient left.
        for p in state.model.parameters():
            assert p.dtype == torch.float32 and p.grad is None
    finally:
        state.source.close()


def test_compute_copies_accumulate_fp32_gradients_as_autocast_did():
    """Over micro-batches the bf16 weight gradients add up in fp32: the same sum autocast's
    cast-back gave, to fp32 rounding of the same bf16 terms."""
    from trainer.precision import ComputeCopies

    torch.manual_seed(0)
    w = torch.nn.Linear(16, 8, bias=False)
    xs = [torch.randn(4, 16) for _ in range(3)]
    ref = torch.nn.Linear(16, 8, bias=False)
    ref.weight.data.copy_(w.weight.data)
    for x in xs:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref(x).float().square().sum().backward()
    copies = ComputeCopies(w)
    copies.begin()
    assert w.weight.dtype == torch.bfloat16
    for x in xs:
        w(x.bfloat16()).float().square().sum().backward()
        assert w.weight.grad is None  # moved into the fp32 accumulator at once
    copies.end()
    assert w.weight.dtype == torch.float32 and w.weight.grad.dtype == torch.float32
    torch.testing.assert_close(w.weight.grad, ref.weight.grad, rtol=1e-2, atol=1e-2)
    # A step that stopped half-way leaves no gradient behind.
    w.weight.grad = None
    copies.begin()
    w(xs[0].bfloat16()).sum().backward()
    copies.end(keep_grads=False)
    assert w.weight.grad is None and w.weight.dtype == torch.float32


def _one_rank_bf16(rank: int, world: int, out: str) -> list[float]:
    from trainer.loop import setup, train_step

    state = setup(_cfg(out, "train.dtype=bf16", "train.grad_accum=2"))
    try:
        return [float(train_step(state)["lm_loss"]) for _ in range(3)]
    finally:
        state.source.close()


@pytest.mark.slow
def test_one_process_bf16_trains_as_fsdp_bf16_on_one_rank(tmp_path):
    """Both compute in bf16 weights over fp32 masters and fp32 gradient accumulation: the
    same losses, to bf16's rounding of the same computation."""
    from tests.distributed import run_ranks

    (fsdp,) = run_ranks(_one_rank_bf16, 1, str(tmp_path / "fsdp"))
    one = _one_rank_bf16(0, 1, str(tmp_path / "one"))
    assert one == pytest.approx(fsdp, rel=2e-3)
