"""transformers in and out for DeepseekV3ForCausalLM and Qwen3MoeForCausalLM: the export of a
DeepSeek-V3-shaped model (sigmoid scores with the selection bias, groups, MLA with query
compression, a dense layer, MTP in the files) and of a Qwen3-MoE-shaped one (q/k norms,
heads wider than dim / heads, a dense first layer) loads in transformers with moeyard's
logits, the MTP depth's through transformers' own MtpModel; HF -> moeyard -> HF is
bit-identical, MTP layers and the copies of the embedding and head included; a run started
from each has transformers' first-step loss (and, for V3, its MTP loss); what no class
computes is refused naming the settings of every candidate; the two presets count to the
published configs' transformers models."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.test_hf_common import (
    deepseek_v3_cfg,
    hf_logits,
    hf_mtp_logits,
    make_model,
    qwen3_cfg,
    randomize_router_biases,
    tiny_hf_deepseek_v3,
    tiny_hf_qwen3,
    write_checkpoint,
)
from trainer.config import load_config
from trainer.export import export_hf
from trainer.hf import INDEX, HFError, SafetensorsDir, architecture, model_config_from_hf
from trainer.init_from import load_hf_weights
from trainer.model import Transformer, build_model, materialize

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _tokens(vocab: int, seed: int = 0, length: int = 19) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


def _mine(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """moeyard's logits (eval) and each MTP depth's logits (train mode: MTP runs)."""
    with torch.no_grad():
        logits = model.eval()(tokens).logits
        out = model.train()(tokens)
        mtp = [model.head(h) for h in out.mtp_hidden]
    model.eval()
    return logits, mtp


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    index = json.loads(Path(path, INDEX).read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        out.update(load_file(os.path.join(path, f)))
    return out


def _rewrite(path: str, name: str, fn) -> None:
    """Replaces tensor `name` in the checkpoint at `path` by fn(tensor)."""
    index = json.loads(Path(path, INDEX).read_text())["weight_map"]
    file = os.path.join(path, index[name])
    tensors = load_file(file)
    tensors[name] = fn(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})


def test_deepseek_v3_export_loads_in_transformers_with_the_same_logits_and_mtp(tmp_path):
    cfg = deepseek_v3_cfg()
    assert architecture(cfg) == "DeepseekV3ForCausalLM"
    model = make_model(cfg, seed=2)
    randomize_router_biases(model, seed=2)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    done = export_hf(ckpt, out, max_shard_bytes=30_000)
    assert done["architecture"] == "DeepseekV3ForCausalLM" and done["shards"] > 2
    config = json.loads(Path(out, "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["n_group"] == 4
    assert config["rms_norm_eps"] == 1e-5 and config["routed_scaling_factor"] == 2.5
    names = set(json.loads(Path(out, INDEX).read_text())["weight_map"])
    # The MTP layer after the last one, as the released checkpoints hold it.
    for n in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert f"model.layers.3.{n}.weight" in names, n
    assert "model.layers.3.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in names

    tokens = _tokens(cfg.vocab_size, seed=1)
    logits, mtp = _mine(model, tokens)
    theirs, theirs_mtp = hf_mtp_logits(out, tokens)
    torch.testing.assert_close(theirs, logits, rtol=0, atol=TOL)
    assert len(theirs_mtp) == len(mtp) == 1
    torch.testing.assert_close(theirs_mtp[0], mtp[0], rtol=0, atol=TOL)

    # The selection bias decides: zeroed in the files, the logits move far.
    _rewrite(out, "model.layers.2.mlp.gate.e_score_correction_bias", torch.zeros_like)
    assert (hf_logits(out, tokens) - logits).abs().max() > 100 * TOL


def test_qwen3_moe_export_loads_in_transformers_with_the_same_logits(tmp_path):
    cfg = qwen3_cfg()
    assert architecture(cfg) == "Qwen3MoeForCausalLM"
    model = make_model(cfg, seed=3)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    export_hf(ckpt, out, max_shard_bytes=30_000)
    config = json.loads(Path(out, "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["head_dim"] == 16
    tokens = _tokens(cfg.vocab_size, seed=2)
    logits, _ = _mine(model, tokens)
    torch.testing.assert_close(hf_logits(out, tokens), logits, rtol=0, atol=TOL)
    # The q/k norms count: flattened in the files, the logits move far.
    _rewrite(out, "model.layers.1.self_attn.k_norm.weight", lambda t: torch.ones_like(t) * 3)
    assert (hf_logits(out, tokens) - logits).abs().max() > 100 * TOL


def _moeyard_from(path: str) -> Transformer:
    reader = SafetensorsDir(path)
    cfg = model_config_from_hf(reader.config, where=reader.where)
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, path)
    return model.eval()


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_hf_to_moeyard_logits_and_round_trip_bit_identical(tmp_path, kind):
    src = str(tmp_path / "hf")
    if kind == "deepseek_v3":
        hf_model, _ = tiny_hf_deepseek_v3(src)
    else:
        hf_model = tiny_hf_qwen3(src)
    model = _moeyard_from(src)
    assert model.cfg.mtp.depth == (1 if kind == "deepseek_v3" else 0)
    tokens = _tokens(model.cfg.vocab_size, seed=3, length=21)
    logits, mtp = _mine(model, tokens)
    with torch.no_grad():
        torch.testing.assert_close(logits, hf_model(input_ids=tokens).logits, rtol=0, atol=TOL)
    if kind == "deepseek_v3":
        # The MTP layer transformers' MtpModel reads from the files predicts as moeyard's.
        _, theirs_mtp = hf_mtp_logits(src, tokens)
        torch.testing.assert_close(mtp[0], theirs_mtp[0], rtol=0, atol=TOL)
        bias = model.layers[1].ffn.router.expert_bias
        assert torch.equal(bias, hf_model.model.layers[1].mlp.gate.e_score_correction_bias)

    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    export_hf(ckpt, str(tmp_path / "back"), max_shard_bytes=30_000)
    a, b = _all_tensors(src), _all_tensors(str(tmp_path / "back"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_mtp_layers_in_the_files_and_the_preset_depth(tmp_path, capsys):
    """The copies of the embedding and head must equal the main ones; a preset without MTP
    reads the rest and says it skips the MTP layer; one asking for more depths than the files
    hold is refused naming model.mtp.depth."""
    src = str(tmp_path / "hf")
    tiny_hf_deepseek_v3(src, seed=4)
    reader = SafetensorsDir(src)
    cfg = model_config_from_hf(reader.config, where=reader.where)

    cfg.mtp.depth = 0
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, src)
    assert "MTP layers; model.mtp.depth is 0" in capsys.readouterr().out

    cfg.mtp.depth = 2
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"model\.mtp\.depth \(2\) exceeds the MTP layers"):
        load_hf_weights(model, src)

    cfg.mtp.depth = 1
    _rewrite(src, "model.layers.3.shared_head.head.weight", lambda t: t + 1)
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"shared_head\.head\.weight differs from .*head\.weight"):
        load_hf_weights(model, src)


def _run_overrides(out: str, init: str, kind: str) -> list[str]:
    common = [
        f"run.output_dir={out}",
        f"checkpoint.init_from={init}",
        "model.vocab_size=320",
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
        "model.moe.z_loss_coef=0",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        "train.steps=1",
        "data.corpus_max_bytes=60000",
        "ops.stdout=false",
        "ops.telemetry=false",
        "parallel.ep=1",
    ]
    if kind == "deepseek_v3":
        return [
            *common,
            "model.attention=mla",
            "model.num_kv_heads=0",
            "model.mla.kv_lora_rank=8",
            "model.mla.q_lora_rank=12",
            "model.mla.qk_nope_head_dim=8",
            "model.mla.qk_rope_head_dim=8",
            "model.mla.v_head_dim=8",
            "model.mla.norm_eps=1e-6",
            "model.norm_eps=1e-5",
            "model.moe.num_shared_experts=1",
            "model.moe.score_func=sigmoid",
            "model.moe.n_group=4",
            "model.moe.topk_group=2",
            "model.moe.route_scale=2.5",
            "model.moe.bias_update_rate=0.001",
            "model.mtp.depth=1",
            "train.mtp_loss_weight=0.3",
        ]
    return [
        *common,
        "model.num_kv_heads=2",
        "model.head_dim=16",
        "model.qk_norm=true",
        "model.rope_theta=1e6",
        "model.norm_eps=1e-6",
    ]


@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe"])
def test_run_from_hf_checkpoint_first_loss_equals_transformers(tmp_path, kind):
    from dataloader.source import build_source
    from ops.sinks import read_metrics
    from trainer.loop import run

    src = str(tmp_path / "hf")
    if kind == "deepseek_v3":
        hf_model, _ = tiny_hf_deepseek_v3(src, vocab_size=320)
    else:
        hf_model = tiny_hf_qwen3(src, vocab_size=320)
    out = str(tmp_path / "run")
    cfg = load_config(
        ROOT / "infra" / "runs" / "tiny.yaml",
        _run_overrides(out, src, kind),
        ignore_sections=("cluster",),
    )
    assert run(cfg).steps == 1
    first = read_metrics(f"{out}/metrics.jsonl")[0]
    source = build_source(
        cfg.data,
        seq_len=cfg.train.seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        rank=0,
        world_size=1,
        seed=cfg.train.seed,
    )
    rows = source.next_batch()
    source.close()
    with torch.no_grad():
        want = hf_model(input_ids=rows, labels=rows).loss.item()
    assert abs(first["lm_loss"] - want) < TOL, (first["lm_loss"], want)
    if kind == "deepseek_v3":
        # The MTP loss too: transformers' MtpModel on the inputs, depth 1 predicting the
        # token two ahead.
        inputs, targets = rows[:, :-1], rows[:, 1:]
        _, (mtp_logits,) = hf_mtp_logits(src, inputs)
        want_mtp = F.cross_entropy(mtp_logits.flatten(0, 1), targets[:, 1:].flatten()).item()
        assert abs(first["mtp_loss_1"] - want_mtp) < TOL, (first["mtp_loss_1"], want_mtp)
        assert first["loss"] == pytest.approx(
            first["lm_loss"] + first["aux_loss"] + first["z_loss"] + 0.3 * first["mtp_loss_1"]
        )
    else:
        assert "mtp_loss_1" not in first


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # GQA with sigmoid scores: both GQA classes are named, each with its reasons.
        (
            ["model.moe.score_func=sigmoid"],
            [
                "MixtralForCausalLM would need",
                "Qwen3MoeForCausalLM would need",
                "model.qk_norm=false",
                "model.moe.score_func=sigmoid",
            ],
        ),
        (["model.qk_norm=true", "model.mtp.depth=1"], ["model.mtp.depth=1 (Qwen3-MoE"]),
        (
            ["model.qk_norm=true", "model.moe.top_k=1"],
            ["model.moe.top_k=1 with model.moe.norm_topk_prob=true"],
        ),
        (
            [
                "model.attention=mla",
                "model.num_kv_heads=0",
                "model.mla.kv_lora_rank=32",
                "model.mla.norm_eps=1e-6",
                "model.moe.num_shared_experts=1",
                "model.moe.score_func=sigmoid",
                "model.mtp.depth=1",
                "model.mtp.moe=false",
                "model.dense_hidden=64",
            ],
            ["model.mtp.moe=false (DeepSeek-V3", "DeepseekV2ForCausalLM would need"],
        ),
    ],
)
def test_models_without_a_transformers_equivalent_are_refused(overrides, named):
    base = ["model.moe.norm_topk_prob=true", "model.num_kv_heads=2"]
    cfg = load_config(ROOT / "infra" / "runs" / "tiny.yaml", [*base, *overrides])
    with pytest.raises(HFError, match="no transformers architecture") as e:
        architecture(cfg.model)
    for n in named:
        assert n in str(e.value), (n, str(e.value))


# The published config.json files (the fields that decide the parameter count), as released.
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "attention_bias": False,
}
QWEN3_30B_A3B_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "sliding_window": None,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "attention_bias": False,
}


@pytest.mark.parametrize(
    ("pattern", "published"),
    [("deepseek-v3-*", DEEPSEEK_V3_CONFIG), ("qwen3-30b-a3b-*", QWEN3_30B_A3B_CONFIG)],
)
def test_presets_count_as_the_published_configs_transformers_models(pattern, published):
    """transformers builds each published config.json on the meta device: its parameter
    count is the preset's total (MTP modules, which transformers leaves out, aside), the
    config moeyard reads from it has the preset's shapes, and the preset's own export config
    builds the same model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.flops import param_counts
    from trainer.hf import hf_config

    (path,) = glob.glob(str(ROOT / "infra" / "runs" / f"{pattern}.yaml"))
    preset = load_config(path, ignore_sections=("cluster",)).model
    counts = param_counts(preset)

    def meta_count(config: dict) -> int:
        config = dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                AutoConfig.for_model(config.pop("model_type"), **config)
            )
        assert type(model).__name__ == published["architectures"][0]
        return sum(p.numel() for p in model.parameters())

    assert meta_count(published) == counts.total
    assert meta_count(hf_config(preset, dtype=torch.bfloat16)) == counts.total
    theirs = model_config_from_hf(published, where=pattern)
    for key in (
        "vocab_size",
        "dim",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "qk_norm",
        "attention",
        "mla",
        "num_dense_layers",
        "tie_embeddings",
        "norm_eps",
        "rope_theta",
    ):
        assert getattr(preset, key) == getattr(theirs, key), key
    for key in ("num_experts", "top_k", "expert_hidden", "num_shared_experts", "score_func"):
        assert getattr(preset.moe, key) == getattr(theirs.moe, key), key
    for key in ("n_group", "topk_group", "norm_topk_prob", "route_scale"):
        assert getattr(preset.moe, key) == getattr(theirs.moe, key), key
    assert preset.mtp.depth == theirs.mtp.depth
    if theirs.num_dense_layers:
        assert preset.dense_hidden == theirs.dense_hidden
