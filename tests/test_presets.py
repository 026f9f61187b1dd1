"""Run presets and the parameter counts: every preset loads, the published model shapes count
to their published sizes, the counts equal real (meta-device) models, and the DeepSeekMoE
parts (shared experts, dense first layers, group-limited routing) do what they say."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from trainer.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, load_config
from trainer.flops import (
    flops_per_token,
    kv_cache_elements_per_token,
    param_counts,
)
from trainer.model import RMSNorm, build_model
from trainer.moe import MoE, Router, SwiGLU

RUNS = os.path.join(os.path.dirname(__file__), "..", "infra", "runs")
PRESETS = sorted(glob.glob(os.path.join(RUNS, "*.yaml")))


def preset(pattern: str) -> str:
    (path,) = glob.glob(os.path.join(RUNS, pattern))
    return path


def test_every_preset_loads():
    names = {os.path.basename(p) for p in PRESETS}
    assert "tiny.yaml" in names
    for pattern in (
        "mixtral-8x7b-*",
        "deepseek-v2-h*",
        "deepseek-v2-lite-*",
        "deepseek-v3-*",
        "qwen3-30b-a3b-*",
        "moe-100m-*",
    ):
        assert glob.glob(os.path.join(RUNS, pattern + ".yaml")), pattern
    for path in PRESETS:
        cfg = load_config(path)
        if cfg.parallel.world_size:
            assert cfg.check_world(cfg.parallel.world_size) >= 1


# Published figures (billions): total, active per token, and whether the publisher's active
# figure counts the input embedding table (Qwen's does; the others' do not).
PUBLISHED = [
    ("mixtral-8x7b-*.yaml", 46.7, 12.9, False),
    ("deepseek-v2-h*.yaml", 236.0, 21.0, False),
    ("deepseek-v2-lite-*.yaml", 15.7, 2.4, False),
    ("deepseek-v3-*.yaml", 671.0, 37.0, False),
    ("qwen3-30b-a3b-*.yaml", 30.5, 3.3, True),
]


@pytest.mark.parametrize(("pattern", "total_b", "active_b", "with_embedding"), PUBLISHED)
def test_presets_count_to_the_published_sizes(pattern, total_b, active_b, with_embedding):
    """One convention for all (trainer/flops.py): total counts every weight once (MTP
    modules, training-only, aside); active counts what a token multiplies by, so the input
    embedding table is left out, and added back only to compare with a publisher who counts
    it (Qwen3-30B-A3B: 3.04B + 0.31B)."""
    counts = param_counts(load_config(preset(pattern)).model)
    assert counts.total / 1e9 == pytest.approx(total_b, rel=0.025)
    active = counts.active + (counts.embedding if with_embedding else 0)
    assert active / 1e9 == pytest.approx(active_b, rel=0.025)


def test_presets_have_the_published_shapes_and_a_node_local_ep_layout():
    mx = load_config(preset("mixtral-8x7b-*.yaml"))
    m = mx.model
    assert (m.num_layers, m.dim, m.num_heads, m.num_kv_heads, m.vocab_size) == (
        32,
        4096,
        32,
        8,
        32000,
    )
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden) == (8, 2, 14336)
    ds = load_config(preset("deepseek-v2-h*.yaml"))
    m = ds.model
    assert (m.num_layers, m.dim, m.num_heads, m.vocab_size, m.attention) == (
        60,
        5120,
        128,
        102400,
        "mla",
    )
    assert (m.mla.kv_lora_rank, m.mla.q_lora_rank, m.mla.qk_rope_head_dim) == (512, 1536, 64)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.num_shared_experts) == (160, 6, 2)
    assert (m.moe.n_group, m.moe.topk_group, m.num_dense_layers) == (8, 3, 1)
    lite = load_config(preset("deepseek-v2-lite-*.yaml")).model
    assert (lite.num_layers, lite.dim, lite.num_heads, lite.mla.q_lora_rank) == (27, 2048, 16, 0)
    assert (lite.moe.num_experts, lite.moe.top_k, lite.moe.expert_hidden) == (64, 6, 1408)
    for cfg in (mx, ds):
        # EP inside an 8-GPU node, DP across nodes.
        assert cfg.parallel.ep == 8
        assert cfg.parallel.world_size % 8 == 0 and cfg.parallel.world_size >= 16
    assert load_config(preset("deepseek-v2-lite-*.yaml")).parallel.world_size == 8  # one node
    # DeepSeek-V2 on the smallest H200 count it fits (4 nodes, FSDP + full checkpointing).
    assert ds.parallel.world_size == 32 and ds.train.activation_checkpoint == "full"
    v3 = load_config(preset("deepseek-v3-*.yaml"))
    m = v3.model
    assert (m.num_layers, m.dim, m.num_heads, m.vocab_size, m.num_dense_layers) == (
        61,
        7168,
        128,
        129280,
        3,
    )
    assert (m.mla.q_lora_rank, m.mla.kv_lora_rank, m.mtp.depth, m.mtp.moe) == (1536, 512, 1, True)
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, m.moe.score_func) == (
        256,
        8,
        2048,
        "sigmoid",
    )
    assert (m.moe.n_group, m.moe.topk_group, m.moe.route_scale, m.moe.norm_topk_prob) == (
        8,
        4,
        2.5,
        True,
    )
    assert v3.parallel.ep == 8 and v3.parallel.world_size == 96
    qw = load_config(preset("qwen3-30b-a3b-*.yaml"))
    m = qw.model
    assert (m.num_layers, m.dim, m.num_heads, m.num_kv_heads, m.head_dim, m.qk_norm) == (
        48,
        2048,
        32,
        4,
        128,
        True,
    )
    assert (m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, m.vocab_size) == (
        128,
        8,
        768,
        151936,
    )
    assert qw.parallel.world_size == 4 and qw.parallel.ep == 4
    small = load_config(preset("moe-100m-*.yaml"))
    assert small.parallel.world_size == 1
    assert 0.08e9 < param_counts(small.model).total < 0.125e9


def _configs() -> list[ModelConfig]:
    mla = MLAConfig(
        kv_lora_rank=24, q_lora_rank=40, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8
    )
    moe = MoEConfig(
        num_experts=8, top_k=3, expert_hidden=24, num_shared_experts=2, n_group=4, topk_group=2
    )
    return [
        ModelConfig(vocab_size=100, dim=64, num_layers=3, num_heads=4, num_kv_heads=2),
        ModelConfig(vocab_size=100, dim=64, num_layers=3, num_heads=4, tie_embeddings=True),
        # Qwen3-style: heads wider than dim / heads, q/k norms.
        ModelConfig(
            vocab_size=100,
            dim=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            qk_norm=True,
        ),
        ModelConfig(
            vocab_size=100,
            dim=64,
            num_layers=4,
            num_heads=4,
            attention="mla",
            mla=mla,
            num_dense_layers=2,
            dense_hidden=96,
            moe=moe,
        ),
        ModelConfig(
            vocab_size=100,
            dim=64,
            num_layers=2,
            num_heads=4,
            attention="mla",
            mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0),
            tie_embeddings=True,
            moe=moe,
        ),
    ]


@pytest.mark.parametrize(
    "cfg", _configs(), ids=["gqa", "tied", "qk-norm", "mla-dense-shared", "mla-tied"]
)
def test_counts_equal_the_meta_model(cfg):
    model = build_model(cfg)
    params = list(model.parameters())  # a tied table appears once
    counts = param_counts(cfg)
    assert sum(p.numel() for p in params) == counts.total
    norms = sum(
        p.numel() for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()
    )
    assert counts.norms == norms
    experts = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    assert counts.experts_total == experts
    # Active: everything but the input table (unless it is the head) and the routed
    # experts a token does not pick.
    K, E = cfg.moe.top_k, cfg.moe.num_experts
    inactive = experts - experts * K // E
    if not cfg.tie_embeddings:
        inactive += model.embed.weight.numel()
    assert counts.active == counts.total - inactive
    # FLOPs: 6 x matmul params + attention at this sequence length.
    qk, v = (
        (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim)
        if cfg.attention == "mla"
        else (cfg.head_dim, cfg.head_dim)
    )
    want = 6 * (counts.active - norms) + 6 * cfg.num_layers * cfg.num_heads * (qk + v) * 32
    assert flops_per_token(cfg, 32) == want


def test_kv_cache_of_deepseek_v2_against_mha_and_deepseek_67b():
    ds = load_config(preset("deepseek-v2-h*.yaml")).model
    # (kv_lora_rank 512 + rotary key 64) x 60 layers.
    assert kv_cache_elements_per_token(ds) == 576 * 60
    # DeepSeek 67B: 95 layers, 64 heads of dim 128, grouped-query with 8 key/value heads.
    ds67 = ModelConfig(vocab_size=102400, dim=8192, num_layers=95, num_heads=64, num_kv_heads=8)
    assert kv_cache_elements_per_token(ds67) == 2 * 8 * 128 * 95
    reduction_bf16 = 1 - kv_cache_elements_per_token(ds) / kv_cache_elements_per_token(ds67)
    assert reduction_bf16 == pytest.approx(0.822, abs=0.001)
    # The paper's 93.3% also counts its deployment's KV cache quantized to 6 bits on average
    # against a 16-bit cache for 67B.
    reduction_6bit = 1 - kv_cache_elements_per_token(ds) * 6 / (
        kv_cache_elements_per_token(ds67) * 16
    )
    assert reduction_6bit == pytest.approx(0.933, abs=0.001)


def test_group_limited_routing_picks_only_inside_the_best_groups():
    # 8 experts in 4 groups of 2; the inputs are one-hot so each token's logits are a column
    # of the router weight.
    logits = torch.tensor(
        [
            [2.0, 1.9, 1.95, -5.0, -5.0, -5.0, -5.0, -5.0],  # best pair spans groups 0 and 1
            [0.0, 3.0, -1.0, -1.0, 2.9, 2.8, 0.0, 0.0],  # top-2 overall: experts 1 and 4
        ]
    )
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=8, n_group=4, topk_group=1)
    router = Router(8, cfg)
    with torch.no_grad():
        router.weight.copy_(torch.cat([logits, torch.zeros(6, 8)]).T)
    ids = router(torch.eye(8)[:2]).ids_TK.sort(dim=1).values
    # Softmax (DeepSeek-V2) ranks groups by their best expert: token 0 -> group 0 only;
    # token 1 -> group 0 (expert 1 at 3.0) only.
    assert ids.tolist() == [[0, 1], [0, 1]]
    # Without the group limit the plain top-2 differs.
    plain = Router(8, MoEConfig(num_experts=8, top_k=2, expert_hidden=8))
    with torch.no_grad():
        plain.weight.copy_(router.weight)
    assert plain(torch.eye(8)[:2]).ids_TK.sort(dim=1).values.tolist() == [[0, 2], [1, 4]]
    # Sigmoid (DeepSeek-V3) ranks a group by the sum of its two best: token 1 -> group 2.
    v3 = Router(
        8,
        MoEConfig(
            num_experts=8, top_k=2, expert_hidden=8, n_group=4, topk_group=1, score_func="sigmoid"
        ),
    )
    with torch.no_grad():
        v3.weight.copy_(router.weight)
    assert v3(torch.eye(8)[:2]).ids_TK.sort(dim=1).values.tolist()[1] == [4, 5]


def test_shared_experts_and_dense_first_layers():
    cfg = ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=3,
        num_heads=4,
        num_dense_layers=1,
        dense_hidden=48,
        moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=16, num_shared_experts=2),
    )
    from trainer.model import materialize

    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    assert isinstance(model.layers[0].ffn, SwiGLU) and not model.layers[0].is_moe
    assert model.layers[0].ffn.w1.weight.shape == (48, 32)
    moe = model.layers[1].ffn
    assert isinstance(moe, MoE) and len(model.moe_layers()) == 2
    assert moe.shared is not None and moe.shared.w1.weight.shape == (2 * 16, 32)
    # Every token passes through the shared experts: the output is the routed part plus
    # shared(x), and with the routed experts zeroed only shared(x) is left.
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        y_full, _ = moe(x)
        for p in moe.experts.parameters():
            p.zero_()
        y_shared, _ = moe(x)
        torch.testing.assert_close(y_shared, moe.shared(x))
        assert (y_full - y_shared).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.moe.n_group=3"], ["model.moe.n_group", "model.moe.num_experts"]),
        (
            ["model.moe.n_group=4", "model.moe.topk_group=1", "model.moe.top_k=3"],
            ["model.moe.top_k", "model.moe.topk_group"],
        ),
        (["parallel.world_size=10"], ["parallel.world_size (10)", "parallel.ep (4)"]),
        (["parallel.world_size=-1"], ["parallel.world_size"]),
        (["parallel.device_memory_gib=-1"], ["parallel.device_memory_gib"]),
    ],
)
def test_bad_layouts_name_their_keys(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(RUNS, "tiny.yaml"), ["parallel.ep=4", *overrides])
    for n in names:
        assert n in str(e.value)


def test_preset_world_size_is_enforced_at_launch():
    path = preset("deepseek-v2-h*.yaml")
    with pytest.raises(
        ConfigError, match=r"parallel.world_size \(60\) must be divisible by parallel.ep \(8\)"
    ):
        load_config(path, ["parallel.world_size=60"])
    cfg = load_config(path)
    assert cfg.check_world(32) == 4
    with pytest.raises(
        ConfigError, match=r"launcher started 64 ranks but parallel.world_size is 32"
    ):
        cfg.check_world(64)


def test_heads_alone_mean_multi_head():
    """Setting only model.num_heads gives multi-head attention (num_kv_heads 0 = num_heads),
    not the key/value heads the schema's default model would have resolved."""
    cfg = load_config(None, ["model.num_heads=8", "model.dim=128"])
    assert cfg.model.num_kv_heads == 8


@pytest.mark.parametrize(
    ("pattern", "fewer", "mtp_b"),
    [
        (
            "deepseek-v3-*.yaml",
            ["parallel.world_size=88", "train.global_batch_size=3872"],
            11.61,
        ),
        ("qwen3-30b-a3b-*.yaml", ["parallel.world_size=3", "parallel.ep=1"], 0.0),
    ],
)
def test_new_presets_are_sized_for_the_fewest_h200_the_dry_run_fits(pattern, fewer, mtp_b):
    """The dry run fits each at the GPU count its name says (96 = 12x8, 4 = 1x4) on 139 GiB
    H200s, counting the MTP module it trains (DeepSeek-V3's 11.6B), and not at the next
    smaller layout."""
    from trainer.dryrun import size_job

    cfg = load_config(preset(pattern))
    nodes, per_node = os.path.basename(preset(pattern)).split("-h200-")[1][:-5].split("x")
    assert cfg.parallel.world_size == int(nodes) * int(per_node)
    assert cfg.parallel.device_memory_gib == 139
    report = size_job(cfg)
    assert report.fits, report.error()
    assert report.counts.mtp_total / 1e9 == pytest.approx(mtp_b, rel=0.01)
    c = report.counts
    experts = c.experts_total + c.mtp_experts
    assert report.params_per_rank == c.trained_total - experts + experts // cfg.parallel.ep
    assert not size_job(load_config(preset(pattern), fewer)).fits
