"""Multi-token prediction (`model.mtp.depth`, `train.mtp_loss_weight`): depth k at position i
sees exactly the tokens up to i + k and is scored on token i + k + 1; with
mtp_loss_weight=0 the gradient of the main loss is what it is without MTP modules; the
modules are training-only and counted by the parameter and FLOP counts; a short run trains
at EP 1 and 2 (2 gloo ranks, FSDP) with one process's losses, resumes from an EP=2
checkpoint in one process with the uninterrupted run's losses (MTP losses included, so the
MTP weights came back), and its EP=2 checkpoint exports to transformers with moeyard's
logits, the MTP depth's through transformers' MtpModel; a Qwen3-MoE-shaped run's EP=2
checkpoint too."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_ranks
from tests.test_hf_common import deepseek_v3_cfg, make_model
from trainer.config import ConfigError, MTPConfig, load_config
from trainer.flops import flops_per_token, param_counts
from trainer.model import RMSNorm, Transformer, build_model, materialize, mtp_cross_entropy
from trainer.moe import GroupedExperts

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _grads(model: Transformer, tokens: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """Gradients of lm + weight x mean(MTP losses), as train_step forms it (aux and z
    losses aside: they are the MoE layers' own)."""
    model.zero_grad(set_to_none=True)
    out = model.train()(tokens[:, :-1])
    targets = tokens[:, 1:]
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    mtp = mtp_cross_entropy(model.head, out.mtp_hidden, targets)
    loss = lm + weight * mtp.mean() if mtp.numel() else lm
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mtp_loss_weight_zero_leaves_the_main_gradient_unchanged():
    with_mtp = make_model(deepseek_v3_cfg(depth=1), seed=1)
    without = materialize(
        build_model(dataclasses.replace(with_mtp.cfg, mtp=MTPConfig(depth=0))),
        device=torch.device("cpu"),
        seed=1,
    )
    missing, unexpected = without.load_state_dict(with_mtp.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("mtp.") for k in unexpected)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))

    ref = _grads(without, tokens, 0.0)
    zero = _grads(with_mtp, tokens, 0.0)
    for name, g in ref.items():
        assert torch.equal(zero[name], g), name
    # The MTP parameters get no gradient from a zero weight...
    assert all(not g.any() for n, g in zero.items() if n.startswith("mtp."))
    # ...and with a weight, the term trains them and reaches the shared embedding and head.
    some = _grads(with_mtp, tokens, 0.3)
    assert some["mtp.0.proj.weight"].abs().sum() > 0
    for name in ("embed.weight", "head.weight", "layers.0.attn.wq_a.weight"):
        assert not torch.allclose(some[name], ref[name]), name


def test_depth_k_sees_tokens_up_to_i_plus_k_and_predicts_i_plus_k_plus_1():
    """Changing input token p moves depth k's output at positions >= p - k only (it embeds
    token i + k at position i, causally), and its loss is scored on targets[:, k:]."""
    model = make_model(deepseek_v3_cfg(depth=2), seed=3).train()
    tokens = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    p = 10
    changed = tokens.clone()
    changed[0, p] = (tokens[0, p] + 7) % 96
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    for k, (ha, hb) in enumerate(zip(a.mtp_hidden, b.mtp_hidden, strict=True), start=1):
        assert ha.shape[1] == tokens.shape[1] - k
        diff = (ha - hb).abs().amax(dim=(0, 2))
        # Earlier positions move by float noise only (the changed token reroutes later ones,
        # and the experts' grouped products are summed in other blocks).
        assert torch.all(diff[: p - k] < 1e-5), (k, diff)
        assert diff[p - k] > 1e-2, (k, diff)
    targets = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        losses = mtp_cross_entropy(model.head, a.mtp_hidden, targets)
        for k, h in enumerate(a.mtp_hidden, start=1):
            logp = model.head(h).log_softmax(-1)[0]
            want = -logp[torch.arange(16 - k), targets[0, k:]].mean()
            torch.testing.assert_close(losses[k - 1], want)


def test_mtp_is_training_only_and_counted():
    cfg = deepseek_v3_cfg(depth=2)
    model = make_model(cfg, seed=4)
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model.eval()(tokens).mtp_hidden == ()
        assert len(model.train()(tokens).mtp_hidden) == 2
    counts = param_counts(cfg)
    plain = param_counts(dataclasses.replace(cfg, mtp=MTPConfig(depth=0)))
    assert counts.total == plain.total and counts.active == plain.active
    assert sum(p.numel() for p in model.parameters()) == counts.trained_total
    mtp_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    assert counts.mtp_total == mtp_params
    mtp_norms = sum(
        p.numel()
        for n, m in model.named_modules()
        if n.startswith("mtp.") and isinstance(m, RMSNorm)
        for p in m.parameters()
    )
    assert counts.mtp_norms == mtp_norms
    experts = sum(
        p.numel()
        for m in model.mtp.modules()
        if isinstance(m, GroupedExperts)
        for p in m.parameters()
    )
    assert counts.mtp_experts == experts
    # Per depth: its matmuls (one block, the projection), the shared head again, its block's
    # attention products.
    K, E = cfg.moe.top_k, cfg.moe.num_experts
    active_mtp = counts.mtp_total - counts.mtp_experts + counts.mtp_experts * K // E
    qk, v = cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim
    extra = 6 * (active_mtp - mtp_norms + 2 * cfg.vocab_size * cfg.dim)
    extra += 6 * 2 * cfg.num_heads * (qk + v) * 32
    plain_flops = flops_per_token(dataclasses.replace(cfg, mtp=MTPConfig(depth=0)), 32)
    assert flops_per_token(cfg, 32) == plain_flops + extra


def test_mtp_config_errors_name_the_keys():
    tiny = ROOT / "infra" / "runs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"train\.seq_len \(2\) must exceed model\.mtp\.depth"):
        load_config(tiny, ["model.mtp.depth=2", "train.seq_len=2"])
    with pytest.raises(ConfigError, match=r"train\.mtp_loss_weight \(-1\.0\)"):
        load_config(tiny, ["model.mtp.depth=1", "train.mtp_loss_weight=-1"])
    with pytest.warns(UserWarning, match=r"train\.mtp_loss_weight \(0\.5\) is ignored"):
        load_config(tiny, ["train.mtp_loss_weight=0.5"])
    with pytest.raises(ConfigError, match=r"model\.mtp\.depth \(-1\)"):
        load_config(tiny, ["model.mtp.depth=-1"])


STEPS = 4
FAST = [
    f"train.steps={STEPS}",
    "train.seq_len=32",
    "train.warmup_steps=2",
    "ops.stdout=false",
    "ops.telemetry=false",
    "data.corpus_max_bytes=60000",
    "checkpoint.async_save=false",
    "model.dim=32",
    "model.num_layers=3",
    "model.num_heads=4",
    "model.max_seq_len=64",
    "model.num_dense_layers=1",
    "model.dense_hidden=48",
    "model.moe.num_experts=8",
    "model.moe.top_k=3",
    "model.moe.expert_hidden=16",
    "model.moe.norm_topk_prob=true",
]
V3 = [
    *FAST,
    "model.attention=mla",
    "model.num_kv_heads=0",
    "model.mla.kv_lora_rank=8",
    "model.mla.q_lora_rank=12",
    "model.mla.qk_nope_head_dim=8",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=8",
    "model.mla.norm_eps=1e-6",
    "model.moe.num_shared_experts=1",
    "model.moe.score_func=sigmoid",
    "model.moe.n_group=4",
    "model.moe.topk_group=2",
    "model.moe.route_scale=2.5",
    "model.moe.bias_update_rate=0.01",
    "model.mtp.depth=1",
    "train.mtp_loss_weight=0.3",
]
QWEN3 = [
    *FAST,
    "train.steps=2",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.qk_norm=true",
    "model.rope_theta=1e6",
    "model.norm_eps=1e-6",
]


def _cfg(out: str, overrides: list[str]):
    return load_config(
        ROOT / "infra" / "runs" / "tiny.yaml",
        [*overrides, f"run.output_dir={out}"],
        ignore_sections=("cluster",),
    )


def _curve(out: str) -> list[tuple[float, float]]:
    from ops.sinks import read_metrics

    return [(r["lm_loss"], r.get("mtp_loss_1", 0.0)) for r in read_metrics(f"{out}/metrics.jsonl")]


def _two_ranks(rank: int, world: int, out: str) -> dict[str, list[tuple[float, float]]]:
    """The runs of this test on 2 ranks, in turn (the ranks start once)."""
    from trainer.loop import run

    runs = {
        "v3-ep2": [*V3, "parallel.ep=2", "checkpoint.every=2"],
        "v3-ep1": [*V3, "parallel.ep=1", "train.activation_checkpoint=full"],
        "qwen3-ep2": [*QWEN3, "parallel.ep=2", "checkpoint.every=2"],
    }
    for name, overrides in runs.items():
        run(_cfg(f"{out}/{name}", overrides), local_rank=rank)
    return {name: _curve(f"{out}/{name}") for name in runs}


def _same(a: list[tuple[float, float]], b: list[tuple[float, float]], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for u, w in zip(x, y, strict=True):
            assert abs(u - w) <= TOL * abs(w), f"{what}: step {i + 1}: {x} vs {y}"


@pytest.mark.slow
def test_mtp_trains_alike_at_ep1_and_ep2_resumes_at_another_layout_and_exports(tmp_path):
    from tests.test_hf_common import hf_logits, hf_mtp_logits
    from trainer.checkpoint import consolidated_model_state, read_objects
    from trainer.export import _config_from_yaml, export_hf
    from trainer.loop import run

    got = run_ranks(_two_ranks, 2, str(tmp_path))[0]
    # One process, the same global batch (both ranks' rows in one micro-batch).
    one = str(tmp_path / "one")
    run(_cfg(one, [*V3, "parallel.ep=1", "train.micro_batch_size=8"]))
    ref = _curve(one)
    assert len(ref) == STEPS and all(m > 0 for _, m in ref)
    assert ref[-1][1] < ref[0][1]  # the MTP loss falls
    _same(got["v3-ep2"], ref, "EP 2 on 2 ranks")
    _same(got["v3-ep1"], ref, "EP 1 on 2 ranks, full activation checkpointing")

    # The EP=2 checkpoint of step 2, resumed in one process: steps 3 and 4 as uninterrupted.
    saved = tmp_path / "v3-ep2" / "checkpoints" / "step-00000002"
    state = consolidated_model_state(str(saved))
    assert "mtp.0.proj.weight" in state and "mtp.0.block.ffn.experts.7.w2" in state
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(saved, resumed / "checkpoints" / saved.name)
    run(_cfg(str(resumed), [*V3, "parallel.ep=1", "train.micro_batch_size=8"]))
    _same(_curve(str(resumed)), got["v3-ep2"][2:], "resumed in one process")

    # Each EP=2 run's final checkpoint, exported: transformers' logits are the checkpoint's.
    for name, arch in (("v3-ep2", "DeepseekV3ForCausalLM"), ("qwen3-ep2", "Qwen3MoeForCausalLM")):
        out = str(tmp_path / f"{name}-hf")
        done = export_hf(str(tmp_path / name), out, max_shard_bytes=40_000)
        assert done["architecture"] == arch and done["checkpoint"].endswith(
            "step-00000002" if "qwen" in name else "step-00000004"
        )
        layout = read_objects(done["checkpoint"], ["meta.layout"])["meta.layout"]
        assert layout["world_size"] == 2 and layout["ep"] == 2
        cfg = _config_from_yaml(read_objects(done["checkpoint"], ["meta.config"])["meta.config"])
        model = Transformer(cfg.model)
        model.load_state_dict(consolidated_model_state(done["checkpoint"]), strict=True)
        tokens = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            mine = model.eval()(tokens).logits
            mtp = [model.head(h) for h in model.train()(tokens).mtp_hidden]
        if cfg.model.mtp.depth:
            theirs, theirs_mtp = hf_mtp_logits(out, tokens)
            torch.testing.assert_close(theirs_mtp[0], mtp[0], rtol=0, atol=TOL)
        else:
            theirs = hf_logits(out, tokens)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=TOL)
