"""Router health on hand-built routings: the sequence-wise balance loss, router entropy,
routing churn on the probe, window load percentiles, the collapse warning, and bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch

from trainer.config import ConfigError, MoEConfig, load_config
from trainer.moe import MoE
from trainer.router_health import RouterHealth

torch.set_num_threads(1)


def two_expert_layer(**kw) -> MoE:
    """2 experts whose gate logits are [x0, 0]: p(expert 0) = sigmoid(x0)."""
    cfg = MoEConfig(**{"num_experts": 2, "top_k": 1, "expert_hidden": 8, **kw})
    moe = MoE(8, cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.zero_()
        moe.router.weight[0, 0] = 1.0
    moe.train()
    return moe


def test_sequence_wise_balance_loss_by_hand():
    # Two sequences of two tokens; log 3 gives p0 = 3/4, -log 3 gives p0 = 1/4.
    #   sequence 0: both p0 = 3/4, both pick expert 0: f = 2/(1*2) * [2, 0] = [2, 0],
    #     P = [3/4, 1/4], sum f P = 1.5
    #   sequence 1: p0 = 3/4 and 1/4, picks 0 and 1: f = [1, 1], P = [1/2, 1/2], sum = 1
    # mean over sequences: 1.25. The batch-wide loss of the same tokens is 1.125
    # (test_moe_math.test_aux_loss_by_hand).
    x = torch.zeros(2, 2, 8)
    x[0, :, 0] = math.log(3)
    x[1, :, 0] = torch.tensor([math.log(3), -math.log(3)])
    seq = two_expert_layer(aux_loss_coef=1.0, aux_loss_scope="sequence")
    _, losses = seq(x)
    assert losses.aux_loss.item() == pytest.approx(1.25, rel=1e-6)
    batch = two_expert_layer(aux_loss_coef=1.0)
    _, losses = batch(x)
    assert losses.aux_loss.item() == pytest.approx(1.125, rel=1e-6)
    # One sequence: both scopes are the same loss.
    _, a = seq(x[:1])
    _, b = batch(x[:1])
    assert a.aux_loss.item() == pytest.approx(b.aux_loss.item(), rel=1e-6)


def test_entropy_by_hand():
    moe = two_expert_layer()
    x = torch.zeros(1, 4, 8)
    x[0, :, 0] = math.log(3)  # p = (3/4, 1/4) for every token
    moe(x)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    got = moe.pop_health()
    assert got["entropy"] == pytest.approx(h, rel=1e-5)
    assert got["entropy_norm"] == pytest.approx(h / math.log(2), rel=1e-5)
    uniform = MoE(8, MoEConfig(num_experts=4, top_k=1, expert_hidden=8))
    with torch.no_grad():
        uniform.router.weight.zero_()
    uniform.train()
    uniform(torch.randn(1, 5, 8))
    assert uniform.pop_health()["entropy_norm"] == pytest.approx(1.0, rel=1e-6)
    # eval forwards are not training: nothing accumulates
    uniform.eval()
    uniform(torch.randn(1, 5, 8))
    assert "entropy" not in uniform.pop_health()


def test_churn_on_the_probe_by_hand():
    # x0 = 2, 1, -1, -2: p0 = .88 .73 .27 .12, top-1 = 0 0 1 1.
    moe = two_expert_layer(bias_update_rate=1e-3, churn_probe_tokens=4)
    x = torch.zeros(1, 6, 8)
    x[0, :, 0] = torch.tensor([2.0, 1.0, -1.0, -2.0, 5.0, 5.0])  # tokens 4, 5 not probed
    moe(x)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.5, 0.0]))
    # With +0.5 on expert 0: token 2 selects 0 (.77 > .73), token 3 stays on 1 (.62 < .88).
    assert moe.pop_health()["churn"] == pytest.approx(0.25)
    moe(x * 1.0)  # the new window's probe, under the new bias
    assert moe.pop_health()["churn"] == 0.0
    assert "churn" not in moe.pop_health()  # no forward in that window: no probe


def test_window_percentiles_and_collapse_warning_by_hand():
    h = RouterHealth(
        MoEConfig(num_experts=4, collapse_idle_logs=2, collapse_cv=0.0, collapse_warmup_steps=0)
    )
    h.observe(torch.tensor([[4.0, 4, 0, 0]]))  # max/mean 4 / 2 = 2
    h.observe(torch.tensor([[6.0, 2, 0, 0]]))  # 3
    (w,) = h.window([], 2)
    assert w["max_over_mean_p50"] == pytest.approx(2.5)
    assert w["max_over_mean_p90"] == pytest.approx(2.9)
    assert w["max_over_mean_max"] == pytest.approx(3.0)
    assert w["idle_logs"] == 1 and not w["collapse"] and w["warning"] is None
    h.observe(torch.tensor([[5.0, 5, 0, 2]]))  # expert 2 idle again, expert 3 not
    (w,) = h.window([], 3)
    assert w["idle_logs"] == 2 and w["collapse"]
    assert "expert(s) [2] got no token for 2 logged steps" in w["warning"]
    h.observe(torch.tensor([[5.0, 5, 0, 2]]))
    (w,) = h.window([], 4)
    assert w["collapse"] and w["idle_logs"] == 3 and w["warning"] is None  # said once
    # CV: load [8, 0, 0, 0]: mean 2, std sqrt((36 + 3 * 4) / 4) = sqrt(12), CV 1.73.
    cv = RouterHealth(
        MoEConfig(num_experts=4, collapse_idle_logs=0, collapse_cv=1.5, collapse_warmup_steps=0)
    )
    cv.observe(torch.tensor([[8.0, 0, 0, 0]]))
    (w,) = cv.window([], 1)
    assert w["window_cv"] == pytest.approx(math.sqrt(12) / 2)
    assert (
        w["collapse"]
        and "load CV over the window 1.73 > model.moe.collapse_cv (1.5)" in (w["warning"])
    )


def test_the_warmup_holds_the_warning_back_and_idle_runs_count_from_the_start():
    """Windows ending at or before step collapse_warmup_steps never collapse; the first one
    after names the expert idle since step 1 with its whole run."""
    h = RouterHealth(MoEConfig(num_experts=4, collapse_idle_logs=2, collapse_warmup_steps=4))
    for step in (2, 4):
        h.observe(torch.tensor([[8.0, 0, 0, 0]]))  # CV 1.73 > 1, experts 1-3 idle
        (w,) = h.window([], step)
        assert not w["collapse"] and w["warning"] is None, step
        assert w["window_cv"] > 1
    h.observe(torch.tensor([[8.0, 0, 0, 0]]))
    (w,) = h.window([], 6)
    assert w["collapse"] and w["idle_logs"] == 3
    assert "expert(s) [1, 2, 3] got no token for 3 logged steps" in w["warning"]


def test_run_logs_router_health_and_warns_in_the_job_log(tmp_path, capsys):
    from ops.sinks import read_metrics
    from trainer.loop import run

    cfg = load_config(
        "infra/runs/tiny.yaml",
        [
            "parallel.ep=1",
            "train.steps=4",
            "run.log_every=2",
            f"run.output_dir={tmp_path}",
            "ops.stdout=false",
            "model.moe.collapse_cv=0.0001",  # any uneven load counts as collapse here
            "model.moe.collapse_warmup_steps=1",
        ],
    )
    run(cfg)
    recs = read_metrics(f"{tmp_path}/metrics.jsonl")
    layer = recs[-1]["moe"][0]
    E = len(layer["tokens"])
    assert 0 < layer["entropy"] <= math.log(E) + 1e-6
    assert 0 <= layer["churn"] <= 1
    assert (
        1 <= layer["max_over_mean_p50"] <= layer["max_over_mean_p90"] <= layer["max_over_mean_max"]
    )
    assert layer["collapse"] is True
    log = capsys.readouterr().out
    assert "step 2: router collapse: MoE layer 0: load CV over the window" in log
    assert "step 4: router collapse: MoE layer 0" not in log  # once per episode


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.moe.aux_loss_scope=token"], "model.moe.aux_loss_scope"),
        (["model.moe.collapse_cv=-1"], "model.moe.collapse_cv (-1.0) must be >= 0"),
        (["model.moe.collapse_idle_logs=-2"], "model.moe.collapse_idle_logs (-2) must be >= 0"),
        (
            ["model.moe.collapse_warmup_steps=-1"],
            "model.moe.collapse_warmup_steps (-1) must be >= 0",
        ),
        (["model.moe.churn_probe_tokens=-1"], "model.moe.churn_probe_tokens (-1) must be >= 0"),
        (["model.moe.drop_policy=random"], "model.moe.drop_policy"),
    ],
)
def test_bad_router_health_keys_name_themselves(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("infra/runs/tiny.yaml", overrides)
    assert needle in str(e.value)


def test_drop_policy_without_capacity_warns():
    with pytest.warns(UserWarning, match=r"model.moe.drop_policy \(token_order\) is ignored"):
        load_config("infra/runs/tiny.yaml", ["model.moe.drop_policy=token_order"])


def _tiny(tmp_path, overrides: list[str]):
    return load_config(
        "infra/runs/tiny.yaml",
        [
            "parallel.ep=1",
            "train.micro_batch_size=8",  # the demo's global batch: 2 workers x 4 rows
            f"run.output_dir={tmp_path}",
            "ops.stdout=false",
            "ops.telemetry=false",
            *overrides,
        ],
    )


def test_a_fresh_router_is_quiet_for_the_warmup_and_a_collapsed_one_fires(tmp_path, capsys):
    """The same uneven start (a threshold every fresh window exceeds) warns with the warm-up
    off and stays quiet under it; a router forced to collapse (gates zeroed, so every token
    ties and takes experts 0 and 1) is named after the warm-up, in the job log and in the
    record's `collapse` flag (the moeyard_router_collapse series that MoeyardRouterCollapse
    alerts on; the rule's own promtool test is in test_ops_prometheus.py)."""
    from ops.sinks import read_metrics
    from trainer.loop import begin, end, run, setup, train

    uneven = ["train.steps=4", "model.moe.collapse_cv=0.2", "model.moe.collapse_idle_logs=0"]
    run(_tiny(tmp_path / "on", [*uneven, "model.moe.collapse_warmup_steps=0"]))
    assert "step 1: router collapse" in capsys.readouterr().out
    run(_tiny(tmp_path / "quiet", uneven))  # the default warm-up, 20 steps
    assert "router collapse" not in capsys.readouterr().out
    recs = read_metrics(f"{tmp_path}/quiet/metrics.jsonl")
    assert all(layer["window_cv"] > 0.2 and not layer["collapse"] for layer in recs[0]["moe"])

    cfg = _tiny(
        tmp_path / "collapsed",
        [
            "train.steps=6",
            "train.lr=1e-12",
            "model.moe.collapse_warmup_steps=3",
            "model.moe.collapse_idle_logs=3",
        ],
    )
    state = setup(cfg)
    with torch.no_grad():
        for moe in state.model.moe_layers():
            moe.router.weight.zero_()
    session = begin(state, local_rank=0, sinks=None, on_checkpoint=None, placement=None)
    try:
        train(state, session)
    finally:
        end(state, session)
    log = capsys.readouterr().out
    assert "step 3: router collapse" not in log
    # Ties go to two experts (which two is top-k's business); the other six starve.
    idle = re.search(
        r"step 4: router collapse: MoE layer 0: expert\(s\) \[([\d, ]+)\] got no token for 4 "
        r"logged steps \(model.moe.collapse_idle_logs = 3\); load CV over the window 1.73",
        log,
    )
    assert idle is not None, log
    assert len(idle.group(1).split(",")) == 6
    recs = read_metrics(f"{tmp_path}/collapsed/metrics.jsonl")
    assert [r["moe"][0]["collapse"] for r in recs] == [False] * 3 + [True] * 3


def test_the_tiny_preset_trains_balanced(tmp_path, capsys):
    """What `make demo` trains (its global batch, 50 steps) keeps every expert in use: no
    collapse line, and at the last step (the report's heat map) every expert has at least a
    tenth of the mean load."""
    from ops.sinks import read_metrics
    from trainer.loop import run

    run(_tiny(tmp_path, []))
    assert "router collapse" not in capsys.readouterr().out
    recs = read_metrics(f"{tmp_path}/metrics.jsonl")
    assert recs[-1]["step"] == 50
    for layer in recs[-1]["moe"]:
        tokens = layer["tokens"]
        assert min(tokens) >= 0.1 * sum(tokens) / len(tokens), tokens
