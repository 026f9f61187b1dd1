"""Single-process MoE math: routing, losses, dispatch, capacity, initialization, config errors.

Expected values are worked out by hand in the comments or computed by a per-expert loop
written independently here.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, JobConfig, ModelConfig, MoEConfig, load_config
from trainer.dispatch import LocalDispatcher
from trainer.model import build_model, materialize
from trainer.moe import MoE, Router, capacity, drop_overflow

torch.set_num_threads(1)


def make_moe(**kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_hidden": 16, **kw})
    torch.manual_seed(0)
    moe = MoE(8, cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def loop_reference(
    moe: MoE, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * SwiGLU_{ids[t,k]}(x[t]), one token and one expert at a time."""
    ex = moe.experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e >= moe.cfg.num_experts:
                continue
            h = F.silu(x_TD[t] @ ex.w1[e]) * (x_TD[t] @ ex.w3[e])
            out[t] += w_TK[t, k] * (h @ ex.w2[e])
    return out


def test_moe_layer_matches_per_expert_loop():
    moe = make_moe()
    x = torch.randn(2, 5, 8)
    out, _ = moe(x)
    r = moe.router(x.view(-1, 8))
    ref = loop_reference(moe, x.view(-1, 8), r.ids_TK, r.weights_TK)
    torch.testing.assert_close(out.view(-1, 8), ref, rtol=1e-5, atol=1e-5)


def test_dispatch_then_combine_with_unit_weights_returns_input():
    T, D, E, K = 7, 8, 4, 2
    x = torch.randn(T, D)
    ids = torch.tensor([[0, 3], [1, 2], [3, 0], [2, 2 - 1], [0, 1], [3, 2], [1, 0]])
    d = LocalDispatcher(E)
    rows, counts, meta = d.dispatch(x, ids, torch.full((T, K), 1.0 / K))
    assert counts.tolist() == torch.bincount(ids.flatten(), minlength=E).tolist()
    # rows arrive grouped by expert: every row of expert e is a copy of one of e's tokens
    torch.testing.assert_close(d.combine(rows, meta, x.dtype), x)
    rows1, _, meta1 = d.dispatch(x, ids[:, :1], torch.ones(T, 1))
    torch.testing.assert_close(d.combine(rows1, meta1, x.dtype), x)


def test_expert_with_no_token_and_all_tokens_on_one_expert():
    moe = make_moe(top_k=1)
    x = torch.randn(6, 8)
    ids = torch.full((6, 1), 2)  # experts 0, 1, 3 get nothing
    w = torch.rand(6, 1)
    rows, counts, meta = moe.dispatcher.dispatch(x, ids, w)
    assert counts.tolist() == [0, 0, 6, 0]
    y = moe.dispatcher.combine(moe.experts(rows, counts), meta, x.dtype)
    torch.testing.assert_close(y, loop_reference(moe, x, ids, w), rtol=1e-5, atol=1e-5)
    # and gradients reach the one busy expert only
    y.sum().backward()
    assert moe.experts.w13.grad[2].abs().sum() > 0
    assert moe.experts.w13.grad[[0, 1, 3]].abs().sum() == 0


def test_aux_loss_by_hand():
    # 2 experts, top-1, softmax. Router weight picks logits [l, 0] with l = x0.
    cfg = MoEConfig(num_experts=2, top_k=1, expert_hidden=8, aux_loss_coef=1.0)
    moe = MoE(8, cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.zeros(4, 8)
    x[:, 0] = torch.tensor([math.log(3), math.log(3), math.log(3), -math.log(3)])
    # p(expert 0) = 3/4 for three tokens and 1/4 for one; choices: 0, 0, 0, 1.
    # f = [3/4, 1/4]; P = [(3*0.75 + 0.25)/4, (3*0.25 + 0.75)/4] = [0.625, 0.375]
    # aux = E * sum f*P = 2 * (0.75*0.625 + 0.25*0.375) = 1.125
    moe.train()
    _, losses = moe(x.view(1, 4, 8))
    assert losses.aux_loss.item() == pytest.approx(1.125, rel=1e-6)


def test_z_loss_by_hand():
    cfg = MoEConfig(num_experts=2, top_k=1, expert_hidden=8, aux_loss_coef=0.0, z_loss_coef=0.5)
    moe = MoE(8, cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.zero_()
        moe.router.weight[0, 0] = 1.0
    x = torch.zeros(2, 8)
    x[:, 0] = torch.tensor([0.0, math.log(3)])
    # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log 4
    expected = 0.5 * (math.log(2) ** 2 + math.log(4) ** 2) / 2
    moe.train()
    _, losses = moe(x.view(1, 2, 8))
    assert losses.z_loss.item() == pytest.approx(expected, rel=1e-6)


def test_bias_update_by_hand_and_bias_selects_but_does_not_weight():
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, bias_update_rate=0.1)
    moe = MoE(8, cfg)
    with torch.no_grad():
        moe.router.expert_bias.zero_()
    moe.update_bias(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    # A large bias on expert 3 makes it chosen, yet its weight is still its plain score.
    r = Router(8, cfg)
    with torch.no_grad():
        r.weight.normal_()
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.randn(5, 8)
    out = r(x)
    assert (out.ids_TK == 3).all()
    torch.testing.assert_close(out.weights_TK[:, 0], torch.softmax(x @ r.weight.T, -1)[:, 3])


def test_group_limited_routing_by_hand():
    # 4 experts in 2 groups of 2, topk_group=1, top_k=2: each token picks inside one group.
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, n_group=2, topk_group=1)
    r = Router(4, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = torch.tensor([[0.0, 3.0, 2.5, 2.9], [5.0, 0.0, 1.0, 4.0]])
    # token 0: group max {3.0, 2.9} -> group 0 wins -> experts {0, 1} although 3 outscores 0.
    # token 1: group max {5.0, 4.0} -> group 0 -> experts {0, 1}.
    ids = sorted(r(x).ids_TK[0].tolist()), sorted(r(x).ids_TK[1].tolist())
    assert ids == ([0, 1], [0, 1])


def test_capacity_drops_exactly_the_overflow():
    # 8 tokens, top-1, 2 experts, cf 1.0 -> capacity ceil(1 * 8 * 1 / 2) = 4 per expert.
    cfg = MoEConfig(num_experts=2, top_k=1, expert_hidden=8, capacity_factor=1.0)
    assert capacity(8, cfg) == 4
    ids = torch.tensor([[0], [0], [1], [0], [0], [0], [1], [0]])
    kept = drop_overflow(ids, 2, 4)
    # expert 0 gets tokens 0,1,3,4 kept and 5,7 dropped (first come, first served)
    assert kept.flatten().tolist() == [0, 0, 1, 0, 0, 2, 1, 2]
    moe = make_moe(num_experts=2, top_k=1, capacity_factor=1.0)
    x = torch.randn(1, 8, 8)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0
    x[0, :, 0] = torch.tensor([1.0, 1, -1, 1, 1, 1, -1, 1])
    out, _ = moe(x)
    assert moe.dropped.item() == 2
    assert out[0, 5].abs().sum() == 0 and out[0, 7].abs().sum() == 0
    assert out[0, 0].abs().sum() > 0


def test_init_does_not_depend_on_layout():
    cfg = load_config("infra/runs/tiny.yaml").model
    full = materialize(build_model(cfg), device=torch.device("cpu"), seed=3)
    half = build_model(cfg)
    for moe in half.moe_layers():
        moe.experts.shard(expert_offset=4, num_local=4)
    materialize(half, device=torch.device("cpu"), seed=3)
    for a, b in zip(full.moe_layers(), half.moe_layers(), strict=True):
        torch.testing.assert_close(a.experts.w1[4:], b.experts.w1, rtol=0, atol=0)
        torch.testing.assert_close(a.router.weight, b.router.weight, rtol=0, atol=0)
    other = materialize(build_model(cfg), device=torch.device("cpu"), seed=4)
    assert not torch.equal(full.embed.weight, other.embed.weight)


def test_state_dict_names_experts_by_global_id_and_loads_at_another_layout():
    cfg = load_config("infra/runs/tiny.yaml").model
    full = materialize(build_model(cfg), device=torch.device("cpu"), seed=1)
    sd = full.state_dict()
    assert "layers.0.ffn.experts.7.w2" in sd and "layers.0.ffn.experts.w2" not in sd
    half = build_model(cfg)
    for moe in half.moe_layers():
        moe.experts.shard(expert_offset=4, num_local=4)
    materialize(half, device=torch.device("cpu"), seed=99)
    half.load_state_dict(sd)
    torch.testing.assert_close(half.moe_layers()[1].experts.w3, full.moe_layers()[1].experts.w3[4:])
    assert set(half.state_dict()) == {
        k for k in sd if ".experts." not in k or int(k.split(".")[4]) >= 4
    }


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["model.moe.num_experts=6", "parallel.ep=4"],
            "model.moe.num_experts (6) must be divisible by parallel.ep (4)",
        ),
        (["model.moe.top_k=9"], "model.moe.top_k (9)"),
        (["model.moe.n_group=3"], "model.moe.n_group (3)"),
        (["train.stepz=3"], "train.stepz"),
        (["train.steps=abc"], "train.steps"),
        (["model.dim=100", "model.num_heads=2"], "model.dim (100)"),
    ],
)
def test_config_errors_name_keys_and_values(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("infra/runs/tiny.yaml", overrides)
    assert needle in str(e.value)


def test_world_size_not_divisible_by_ep_fails_before_work():
    cfg = load_config("infra/runs/tiny.yaml", ["parallel.ep=2"])
    with pytest.raises(
        ConfigError, match=r"world size \(3\) must be divisible by parallel.ep \(2\)"
    ):
        cfg.check_world(3)


def test_defaults_are_valid():
    assert isinstance(load_config(None), JobConfig)
    assert ModelConfig().num_kv_heads == ModelConfig().num_heads


def _imported_after(packages: str, forbidden: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {packages.split(',')!r}:\n"
        "    pkg = importlib.import_module(name)\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(name + '.' + m.name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return eval(out.stdout.strip().splitlines()[-1])


def test_trainer_never_imports_ray():
    assert _imported_after("trainer", ("ray",)) == []


def test_dataloader_and_ops_import_neither_trainer_nor_cluster():
    assert _imported_after("dataloader,ops", ("trainer", "cluster", "ray")) == []


def test_one_process_training_loss_falls(tmp_path):
    from trainer.loop import run

    cfg = load_config(
        "infra/runs/tiny.yaml",
        ["parallel.ep=1", "train.steps=30", f"run.output_dir={tmp_path}", "ops.stdout=false"],
    )
    s = run(cfg)
    assert s.steps == 30 and len(s.losses) == 30
    assert sum(s.losses[-5:]) / 5 < sum(s.losses[:5]) / 5 - 0.5


def test_metrics_jsonl_holds_the_step_record_and_expert_load(tmp_path):
    from ops.sinks import read_metrics
    from trainer.loop import run

    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            "parallel.ep=1",
            "train.steps=3",
            f"run.output_dir={tmp_path}",
            "ops.stdout=false",
            "model.moe.capacity_factor=1.0",
        ],
    )
    run(cfg)
    recs = read_metrics(f"{tmp_path}/metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    r = recs[-1]
    for key in (
        "loss",
        "lm_loss",
        "aux_loss",
        "z_loss",
        "grad_norm",
        "lr",
        "tokens",
        "tokens_per_s",
        "data_wait_s",
    ):
        assert key in r, key
    assert r["tokens"] == 3 * 4 * 64
    assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"] + r["z_loss"])
    layer = r["moe"][0]
    # every routed (token, k) pair of the step is counted once
    assert sum(layer["tokens"]) == 4 * 64 * 2 and len(layer["tokens"]) == 8
    mean = sum(layer["tokens"]) / 8
    assert layer["max_over_mean"] == pytest.approx(max(layer["tokens"]) / mean)
    assert layer["idle_experts"] == sum(t == 0 for t in layer["tokens"])
    assert 0 <= layer["dropped_frac"] < 1


def test_gradient_accumulation_equals_one_big_micro_batch(tmp_path):
    from trainer.loop import run

    common = [
        "parallel.ep=1",
        "train.steps=4",
        "ops.stdout=false",
        "model.moe.aux_loss_coef=0",
        "model.moe.z_loss_coef=0",
    ]
    big = run(
        load_config(
            "infra/runs/tiny.yaml",
            [*common, "train.micro_batch_size=4", f"run.output_dir={tmp_path}/a"],
        )
    )
    acc = run(
        load_config(
            "infra/runs/tiny.yaml",
            [
                *common,
                "train.micro_batch_size=2",
                "train.grad_accum=2",
                f"run.output_dir={tmp_path}/b",
            ],
        )
    )
    torch.testing.assert_close(
        torch.tensor(acc.losses), torch.tensor(big.losses), rtol=1e-5, atol=1e-5
    )
    assert acc.tokens == big.tokens


def test_loss_guard_skips_non_finite_steps_and_stops_after_too_many(tmp_path):
    from trainer.guard import LossGuard, TrainingDiverged
    from trainer.loop import setup, train_step

    g = LossGuard(spike_factor=2.0, max_bad_steps=2)
    assert g.is_bad(3.0, 1.0) is None
    assert "non-finite" in g.is_bad(float("nan"), 1.0)
    assert "running mean" in g.is_bad(7.0, 1.0)  # 7 > 2 x 3
    assert g.is_bad(5.0, 1.0) is None

    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            "parallel.ep=1",
            "train.max_bad_steps=2",
            f"run.output_dir={tmp_path}",
            "checkpoint.every=0",
        ],
    )
    state = setup(cfg)
    train_step(state)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    bias_before = state.model.moe_layers()[0].router.expert_bias.clone()
    with torch.no_grad():
        state.model.norm.weight[0] = float("nan")
    m = train_step(state)
    assert bool(m["skipped"]) and state.guard.skipped == 1 and state.step == 2
    after = state.model.state_dict()
    # nothing moved except the poisoned entry itself
    for k, v in before.items():
        if k != "norm.weight":
            torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(state.model.moe_layers()[0].router.expert_bias, bias_before)
    with pytest.raises(TrainingDiverged, match="2 steps in a row were skipped"):
        train_step(state)
