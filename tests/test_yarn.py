"""YaRN rope scaling (`model.rope_scaling`) as the released DeepSeek-V2, V2-Lite and V3
configs use it: a directory holding the released config.json format (the 4.x `rope_scaling`
block, `rope_theta` beside it, DeepSeek's other keys) with tiny weights written by
`save_pretrained` gives moeyard transformers' logits at positions beyond
original_max_position_embeddings, the latent norms keeping their own epsilon; moeyard's
rotary tables are transformers' bit for bit; an export of a YaRN model carries it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.test_hf_common import save_hf, scramble_hf, write_checkpoint
from trainer.config import RopeScalingConfig
from trainer.export import export_hf
from trainer.hf import SafetensorsDir, model_config_from_hf, rope_from_hf
from trainer.init_from import load_hf_weights
from trainer.layers import rope_tables, yarn_attention_factor
from trainer.model import build_model, materialize

TOL = 1e-4
ORIGINAL = 4096
# The rope_scaling blocks of the released config.json files.
V2_LITE_ROPE = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": ORIGINAL,
    "type": "yarn",
}
V3_ROPE = {**V2_LITE_ROPE, "mscale": 1.0, "mscale_all_dim": 1.0}
# Keys of the released DeepSeek-V2-Lite config.json that the tiny shapes do not replace.
V2_LITE_KEYS = {
    "aux_loss_alpha": 0.001,
    "ep_size": 1,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "seq_aux": True,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
}


def _tiny_hf(path: str, arch: str, rope: dict) -> torch.nn.Module:
    """A tiny DeepSeek model with the released rope block, saved, then its config.json
    rewritten in the released format (the block as `rope_scaling`, no `rope_parameters`)."""
    import transformers

    block = {k: v for k, v in rope.items() if k != "type"}
    kw = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        # One MoE layer: each attention over 4k+ positions costs seconds on a CPU.
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=0,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=163840,
        # Not DeepSeek's latent-norm epsilon: those norms keep their own 1e-6.
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **block},
    )
    if arch == "v2":
        kw.update(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1)
        cls, cfg_cls = transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config
    else:
        kw.update(q_lora_rank=12, n_group=2, topk_group=1, num_mtp_layers=0)
        cls, cfg_cls = transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config
    torch.manual_seed(0)
    model = scramble_hf(cls(cfg_cls(**kw)).eval(), 0)
    save_hf(model, path)
    config = json.loads(Path(path, "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_scaling"] = dict(rope)
    if arch == "v2":
        config.update(V2_LITE_KEYS)
    else:
        config.update(rope_theta=10000, num_nextn_predict_layers=0, scoring_func="sigmoid")
    Path(path, "config.json").write_text(json.dumps(config))
    return model


def _moeyard_from(path: str):
    reader = SafetensorsDir(path)
    cfg = model_config_from_hf(reader.config, where=reader.where)
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, path)
    return model.eval()


@pytest.mark.parametrize(("arch", "rope"), [("v2", V2_LITE_ROPE), ("v3", V3_ROPE)])
def test_released_rope_block_gives_transformers_logits_beyond_the_original_context(
    tmp_path, arch, rope
):
    from transformers import AutoModelForCausalLM

    src = str(tmp_path / "hf")
    in_memory = _tiny_hf(src, arch, rope)
    model = _moeyard_from(src)
    cfg = model.cfg
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 40
    assert cfg.norm_eps == 1e-5 and cfg.latent_norm_eps == 1e-6
    S = ORIGINAL + 40
    tokens = torch.randint(0, 96, (1, S), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        mine = model(tokens).logits
        theirs = loaded(input_ids=tokens).logits
        # transformers reads the released block as the model it was saved from.
        torch.testing.assert_close(
            in_memory(input_ids=tokens[:, -64:]).logits,
            loaded(input_ids=tokens[:, -64:]).logits,
            rtol=0,
            atol=0,
        )
    torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)
    beyond = slice(ORIGINAL, S)
    assert (mine[:, beyond] - theirs[:, beyond]).abs().max() < TOL

    # Without the scaling (frequencies, attention factor and softmax scale) they differ.
    plain_cfg = dataclasses.replace(cfg, rope_scaling=RopeScalingConfig())
    plain = materialize(build_model(plain_cfg), device=torch.device("cpu"), seed=0).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong = plain(tokens[:, : ORIGINAL + 8]).logits
    assert (wrong[:, ORIGINAL:] - theirs[:, ORIGINAL : ORIGINAL + 8]).abs().max() > 100 * TOL


@pytest.mark.parametrize("rope", [V2_LITE_ROPE, V3_ROPE, {**V3_ROPE, "beta_fast": 16}])
def test_rope_tables_are_transformers_bit_for_bit(rope):
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    block = {k: v for k, v in rope.items() if k != "type"}
    hf = DeepseekV2Config(
        hidden_size=64,
        num_attention_heads=4,
        qk_rope_head_dim=64,
        max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **block},
    )
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    theta, scaling = rope_from_hf({"rope_theta": 10000, "rope_scaling": rope}, where="test")
    assert yarn_attention_factor(scaling) == factor
    positions = torch.arange(163840, dtype=torch.float32)
    want = torch.outer(positions, inv_freq)
    cos, sin = rope_tables(64, 163840, theta, scaling=scaling)
    assert torch.equal(cos, want.cos() * factor) and torch.equal(sin, want.sin() * factor)


def test_yarn_model_exports_with_its_rope_block(tmp_path):
    """A moeyard model with YaRN exports a config.json transformers reads to the same
    logits (both the 5.x rope_parameters and the 4.x rope_scaling block are written)."""
    from tests.test_hf_common import deepseek_cfg, hf_logits, make_model

    cfg = deepseek_cfg()
    cfg.rope_scaling = RopeScalingConfig(
        type="yarn", factor=8, original_max_seq_len=16, mscale=0.707, mscale_all_dim=0.707
    )
    model = make_model(cfg, seed=5)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    export_hf(ckpt, str(tmp_path / "hf"))
    config = json.loads(Path(tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_scaling"]["factor"] == 8
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = model.eval()(tokens).logits
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), tokens), mine, rtol=0, atol=TOL)
