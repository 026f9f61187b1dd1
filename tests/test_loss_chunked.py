"""The chunked next-token loss (trainer/loss.py): the same loss and gradients as the whole
micro-batch's logits, at the function, the model and the training step (one process under
each activation-checkpointing mode, and FSDP with EP 2 on two gloo ranks), a lower measured
CPU peak by what the dry run says, and the optional fused kernel asked for where it cannot
run."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, load_config
from trainer.loss import linear_cross_entropy

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY = os.path.join(ROOT, "infra", "runs", "tiny.yaml")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _grads(loss_fn, hidden, weight, targets, scale=1.0):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = loss_fn(h, w, targets)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_chunked_equals_whole_in_fp32(chunk):
    g = torch.Generator().manual_seed(0)
    T, D, V = 200, 32, 300
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.3
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::17] = -100  # ignored, as F.cross_entropy ignores them

    def ref(h, w, t):
        return F.cross_entropy(h @ w.t(), t)

    def chunked(h, w, t):
        return linear_cross_entropy(h, w, t, chunk_tokens=chunk)

    # A scale on the loss (1 / grad_accum, a fault) reaches the gradients through backward.
    want = _grads(ref, hidden, weight, targets, scale=0.37)
    got = _grads(chunked, hidden, weight, targets, scale=0.37)
    # Against the exact answer (the whole loss in fp64): within 1e-6 relative, or no farther
    # than the whole fp32 loss itself is (two fp32 sums in different orders differ by about
    # that much: 1.1e-6 between them on one CPU, each under 1.05e-6 from fp64).
    exact = _grads(ref, hidden.double(), weight.double(), targets, scale=0.37)
    for w_, g_, x_ in zip(want, got, exact, strict=True):
        x_ = x_.float()
        assert _rel(g_, x_) < max(1e-6, 1.5 * _rel(w_, x_))
    # Not a loose check: a wrong chunk boundary or scale moves these by far more.
    assert _rel(got[1], exact[1].float()) < 2e-6 and want[1].abs().max() > 1e-3


def test_chunked_under_bf16_autocast_rounds_as_the_whole_does():
    g = torch.Generator().manual_seed(1)
    T, D, V = 96, 64, 512
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.1
    targets = torch.randint(0, V, (T,), generator=g)

    def run(chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(
                lambda h, w, t: linear_cross_entropy(h, w, t, chunk_tokens=chunk),
                hidden,
                weight,
                targets,
            )

    whole, chunked = run(0), run(16)
    assert chunked[0] == pytest.approx(float(whole[0]), rel=1e-6)  # the same bf16 logits
    assert chunked[1].dtype == whole[1].dtype == torch.float32
    assert _rel(chunked[1], whole[1]) < 1e-2 and _rel(chunked[2], whole[2]) < 1e-2


def test_no_grad_chunked_loss_equals_whole():
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (50,), generator=g)
    with torch.no_grad():
        assert float(linear_cross_entropy(h, w, t, chunk_tokens=8)) == pytest.approx(
            float(F.cross_entropy(h @ w.t(), t)), rel=1e-6
        )


def _tiny_model(overrides: list[str]):
    from trainer.model import build_model, materialize
    from trainer.parallelize import apply_activation_checkpoint

    cfg = load_config(TINY, ["parallel.ep=1", *overrides], ignore_sections=("cluster",))
    model = materialize(build_model(cfg.model), device=torch.device("cpu"), seed=0)
    return cfg, model, apply_activation_checkpoint


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_model_loss_and_every_gradient_equal_the_logits_path(ac):
    cfg, model, apply_ac = _tiny_model(["model.num_dense_layers=1"])
    apply_ac(model, ac)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (3, 41), generator=torch.Generator().manual_seed(3)
    )
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def whole():
        out = model(inputs)
        return F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())

    want = grads(whole)
    got = grads(lambda: model(inputs, targets, loss_chunk_tokens=16).lm_loss)
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
    assert want[1].keys() == got[1].keys()
    for n in want[1]:
        assert _rel(got[1][n], want[1][n]) < 1e-6, n
    # The logits path through the head's own forward is bit-identical to the old one.
    same = grads(lambda: model(inputs, targets).lm_loss)
    assert torch.equal(same[0], want[0])
    assert all(torch.equal(same[1][n], want[1][n]) for n in want[1])


def _steps(out: str, overrides: list[str], steps: int = 2) -> list[float]:
    from trainer.loop import setup, train_step
    from trainer.model import local_of

    cfg = load_config(
        TINY,
        [
            "ops.telemetry=false",
            "data.corpus_max_bytes=100000",
            f"run.output_dir={out}",
            "train.device=cpu",
            *overrides,
        ],
        ignore_sections=("cluster",),
    )
    state = setup(cfg)
    try:
        losses = [float(train_step(state)["lm_loss"]) for _ in range(steps)]
        # The parameters after the steps carry every gradient of the way there.
        params = torch.cat([local_of(p).detach().reshape(-1) for p in state.model.parameters()])
        return [*losses, float(params.double().square().sum())]
    finally:
        state.source.close()


@pytest.mark.parametrize("ac", ["none", "selective"])
def test_training_steps_equal_the_whole_loss(tmp_path, ac):
    base = ["parallel.ep=1", "train.grad_accum=2", f"train.activation_checkpoint={ac}"]
    whole = _steps(str(tmp_path / "whole"), base)
    chunked = _steps(str(tmp_path / "chunked"), [*base, "train.loss_chunk_tokens=48"])
    assert chunked == pytest.approx(whole, rel=1e-5)


def _rank_steps(rank: int, world: int, out: str, chunk: int) -> list[float]:
    return _steps(f"{out}/{chunk}", ["parallel.ep=2", f"train.loss_chunk_tokens={chunk}"])


@pytest.mark.slow
def test_fsdp_ep2_steps_equal_the_whole_loss(tmp_path):
    from tests.distributed import run_ranks

    whole = run_ranks(_rank_steps, 2, str(tmp_path), 0)
    chunked = run_ranks(_rank_steps, 2, str(tmp_path), 40)
    for w, c in zip(whole, chunked, strict=True):
        assert c == pytest.approx(w, rel=1e-5)


def _measured_peak(out: str, overrides: list[str]) -> tuple[int, int]:
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainer.dryrun import size_job
    from trainer.loop import setup, train_step

    cfg = load_config(
        TINY,
        [
            "ops.telemetry=false",
            "data.corpus_max_bytes=100000",
            f"run.output_dir={out}",
            "train.device=cpu",
            "parallel.ep=1",
            "model.vocab_size=8192",
            "train.micro_batch_size=8",
            *overrides,
        ],
        ignore_sections=("cluster",),
    )
    estimate = size_job(cfg, world_size=1).memory.total
    state = setup(cfg)
    try:
        train_step(state)  # the AdamW moments exist from here on
        tracker = MemTracker()
        tracker.track_external(state.model, state.optimizer)
        with tracker:
            train_step(state)
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    finally:
        state.source.close()
    return peak, estimate


def test_chunked_loss_lowers_the_measured_peak_as_the_dry_run_says(tmp_path):
    whole, whole_est = _measured_peak(str(tmp_path / "w"), [])
    chunked, chunked_est = _measured_peak(str(tmp_path / "c"), ["train.loss_chunk_tokens=64"])
    assert whole_est == pytest.approx(whole, rel=0.05), (whole_est, whole)
    assert chunked_est == pytest.approx(chunked, rel=0.05), (chunked_est, chunked)
    # The drop itself, measured against predicted: the loss's share of this peak is large
    # (vocabulary 8192, 512 tokens), so a wrong loss term misses by far more than this.
    assert whole - chunked > 0.3 * whole
    assert whole_est - chunked_est == pytest.approx(whole - chunked, rel=0.05)


def test_liger_is_imported_only_when_asked_and_errors_name_the_key():
    assert "liger_kernel" not in sys.modules
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    t = torch.randint(0, 16, (4,))
    with pytest.raises(ConfigError, match=r"train.loss_kernel='liger'"):
        linear_cross_entropy(h, w, t, kernel="liger")
    with pytest.raises(ConfigError, match=r"train.loss_kernel \('triton'\)"):
        linear_cross_entropy(h, w, t, kernel="triton")  # type: ignore[arg-type]


def test_config_keys():
    with pytest.raises(ConfigError, match=r"train.loss_chunk_tokens \(-1\) must be >= 0"):
        load_config(TINY, ["train.loss_chunk_tokens=-1"], ignore_sections=("cluster",))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(
            TINY,
            ["train.loss_kernel=liger", "train.loss_chunk_tokens=64"],
            ignore_sections=("cluster",),
        )
    assert any("train.loss_chunk_tokens (64) is ignored" in str(w.message) for w in caught)
