"""`checkpoint.init_from`: a transformers checkpoint (Mixtral, DeepSeek-V2; the per-expert
files transformers writes, or its fused in-memory layout) gives moeyard the logits
transformers computes; HF -> moeyard -> HF is bit-identical; a run started from one has the
first-step loss transformers computes on the same batch; a moeyard checkpoint gives its
weights only; bad input fails naming the file and the tensor."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_hf_common import (
    hf_logits,
    make_model,
    mixtral_cfg,
    tiny_hf_deepseek,
    tiny_hf_mixtral,
    write_checkpoint,
)
from trainer.config import CheckpointConfig, ConfigError, load_config
from trainer.export import export_hf
from trainer.hf import INDEX, HFError, SafetensorsDir, model_config_from_hf
from trainer.init_from import init_from, load_hf_weights
from trainer.model import Transformer, build_model, materialize

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _moeyard_from(path: str, **cfg_over) -> Transformer:
    reader = SafetensorsDir(path)
    cfg = model_config_from_hf(reader.config, where=reader.where)
    for k, v in cfg_over.items():
        setattr(cfg, k, v)
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, path)
    return model.eval()


def _all_tensors(path: str) -> dict[str, torch.Tensor]:
    index = json.loads(Path(path, INDEX).read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(index.values())):
        out.update(load_file(os.path.join(path, f)))
    return out


@pytest.mark.parametrize("make", [tiny_hf_mixtral, tiny_hf_deepseek], ids=["mixtral", "dsv2"])
def test_hf_to_moeyard_logits_and_round_trip_bit_identical(tmp_path, make):
    src = str(tmp_path / "hf")
    hf_model = make(src)
    model = _moeyard_from(src)
    vocab = model.cfg.vocab_size
    tokens = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model(tokens).logits
        theirs = hf_model(input_ids=tokens).logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)

    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    export_hf(ckpt, str(tmp_path / "back"), max_shard_bytes=30_000)
    a, b = _all_tensors(src), _all_tensors(str(tmp_path / "back"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_fused_expert_layout_loads_too(tmp_path):
    """transformers 5 holds experts fused ([E, 2F, D] gate_up_proj, [E, D, F] down_proj);
    a state dict saved as it is in memory loads to the same logits."""
    src = str(tmp_path / "hf")
    hf_model = tiny_hf_mixtral(src)
    fused = str(tmp_path / "fused")
    os.makedirs(fused)
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, os.path.join(fused, "model.safetensors"), metadata={"format": "pt"})
    Path(fused, "config.json").write_text(Path(src, "config.json").read_text())
    model = _moeyard_from(fused)
    tokens = torch.randint(0, 320, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, hf_model(input_ids=tokens).logits, rtol=0, atol=TOL
        )


def _tiny_overrides(out: str, init: str, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        *([f"checkpoint.init_from={init}"] if init else []),
        "model.dim=32",
        "model.moe.expert_hidden=32",
        "model.moe.norm_topk_prob=true",
        "model.moe.z_loss_coef=0",
        "train.seq_len=32",
        "train.micro_batch_size=2",
        "train.steps=1",
        "data.corpus_max_bytes=60000",
        "ops.stdout=false",
        "ops.telemetry=false",
        "parallel.ep=1",
        *extra,
    ]


def test_run_from_hf_checkpoint_first_loss_equals_transformers(tmp_path):
    from dataloader.source import build_source
    from ops.sinks import read_metrics
    from trainer.loop import run

    src = str(tmp_path / "hf")
    hf_model = tiny_hf_mixtral(src)
    out = str(tmp_path / "run")
    cfg = load_config(
        ROOT / "infra" / "runs" / "tiny.yaml",
        _tiny_overrides(out, src),
        ignore_sections=("cluster",),
    )
    summary = run(cfg)
    assert summary.steps == 1
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
    # Far from a fresh model's loss (log 320 = 5.77), so the weights did come in.
    fresh_out = str(tmp_path / "fresh")
    fresh = run(
        load_config(
            ROOT / "infra" / "runs" / "tiny.yaml",
            _tiny_overrides(fresh_out, ""),
            ignore_sections=("cluster",),
        )
    )
    assert abs(fresh.losses[0] - first["loss"]) > 0.1


def test_init_from_a_moeyard_checkpoint_takes_weights_only(tmp_path):
    from trainer.loop import setup

    donor = make_model(dataclasses.replace(mixtral_cfg(), vocab_size=320), seed=7)
    ckpt = write_checkpoint(donor, str(tmp_path / "ckpt"))
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"checkpoint.init_from={ckpt}",
            "model.vocab_size=320",
            "model.dim=32",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.max_seq_len=64",
            "model.moe.num_experts=4",
            "model.moe.expert_hidden=16",
            "model.moe.norm_topk_prob=true",
            "train.seq_len=32",
            "data.corpus_max_bytes=60000",
        ],
    )
    state = setup(cfg)
    try:
        assert state.step == 0 and not state.optimizer.state
        for (k, a), (_, b) in zip(
            donor.state_dict().items(), state.model.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), k
    finally:
        state.source.close()


def test_preset_that_does_not_match_the_checkpoint_names_the_tensor(tmp_path):
    src = str(tmp_path / "hf")
    tiny_hf_mixtral(src)
    reader = SafetensorsDir(src)
    cfg = model_config_from_hf(reader.config, where=reader.where)
    cfg.moe.expert_hidden = 48
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError) as e:
        load_hf_weights(model, src)
    msg = str(e.value)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight has shape (32, 32)" in msg
    assert "(48, 32)" in msg and "model.layers.0.ffn.experts.0.w1" in msg

    cfg = model_config_from_hf(reader.config, where=reader.where)
    cfg.num_layers = 1
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"tensor model\.layers\.1\.\S+ has no place"):
        load_hf_weights(model, src)

    cfg = model_config_from_hf(reader.config, where=reader.where)
    cfg.moe.top_k = 3
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"model\.moe\.top_k \(3\) differs from .*config\.json"):
        load_hf_weights(model, src)


def test_architectures_moeyard_cannot_take_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt)
    model = make_model(mixtral_cfg())
    with pytest.raises(HFError, match=r"gpt2/config\.json: architecture GPT2LMHeadModel"):
        load_hf_weights(model, gpt)

    from tests.test_hf_common import tiny_hf_dense

    llama = str(tmp_path / "llama")
    tiny_hf_dense(llama, "llama")
    with pytest.raises(HFError, match=r"checkpoint\.upcycle=true"):
        load_hf_weights(model, llama)

    cfg = json.loads(Path(tmp_path / "llama" / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}
    cfg["num_local_experts"], cfg["num_experts_per_tok"] = 4, 2
    Path(tmp_path / "llama" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError, match="rope scaling 'dynamic'"):
        load_hf_weights(model, llama)


def test_missing_index_shard_names_the_file_and_a_tensor(tmp_path):
    src = str(tmp_path / "hf")
    tiny_hf_mixtral(src)
    index = json.loads(Path(src, INDEX).read_text())["weight_map"]
    victim = sorted(set(index.values()))[1]
    held = sorted(n for n, f in index.items() if f == victim)[0]
    os.remove(os.path.join(src, victim))
    with pytest.raises(HFError) as e:
        SafetensorsDir(src)
    assert f"shard {victim}" in str(e.value) and held in str(e.value)


def test_init_from_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint\.upcycle=true needs checkpoint\.init_from"):
        load_config(None, ["checkpoint.upcycle=true"])
    model = make_model(mixtral_cfg())
    with pytest.raises(ConfigError, match=r"checkpoint\.init_from \(.*nowhere\) is neither"):
        init_from(
            model,
            CheckpointConfig(init_from=str(tmp_path / "nowhere")),
            output_dir=str(tmp_path / "run"),
            seed=0,
        )
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="is a moeyard checkpoint"):
        init_from(
            model,
            CheckpointConfig(init_from=ckpt, upcycle=True),
            output_dir=str(tmp_path / "run"),
            seed=0,
        )


def test_hf_logits_helper_reads_what_export_wrote(tmp_path):
    """The reader and transformers agree on one file: the same tensor, byte for byte."""
    src = str(tmp_path / "hf")
    hf_model = tiny_hf_mixtral(src)
    reader = SafetensorsDir(src)
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight"
    up = hf_model.model.layers[1].mlp.experts.gate_up_proj[5, 32:]
    assert torch.equal(reader.read(name), up)
    tokens = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            hf_logits(src, tokens), hf_model(input_ids=tokens).logits, rtol=0, atol=0
        )


def test_init_from_an_object_store_url(s3_bucket, tmp_path):
    """The same checkpoint on S3: headers and tensors come by ranged reads."""
    import fsspec

    src = str(tmp_path / "hf")
    hf_model = tiny_hf_mixtral(src)
    url = f"{s3_bucket}/hf/mixtral"
    fs, path = fsspec.core.url_to_fs(url)
    for f in sorted(os.listdir(src)):
        fs.put_file(os.path.join(src, f), f"{path}/{f}")
    model = _moeyard_from(url)
    tokens = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, hf_model(input_ids=tokens).logits, rtol=0, atol=TOL
        )
