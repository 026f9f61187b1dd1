"""`moeyard export --format hf`: the directory transformers loads with no custom code gives
the logits of moeyard's own model (Mixtral-shaped, DeepSeek-V2-shaped, and from a real
checkpoint written at EP=2 on 2 ranks: `check_export_of_run`, called by the EP=2 test in
tests/test_hf_upcycle.py); a swapped expert or a missing rotary permutation would not;
configurations without an equivalent are refused naming the setting; the export's peak
memory stays far below the model's size."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_hf_common import (
    deepseek_cfg,
    hf_logits,
    job,
    make_model,
    mixtral_cfg,
    write_checkpoint,
)
from trainer import hf
from trainer.config import DataConfig, MoEConfig, load_config
from trainer.export import export_hf, main
from trainer.hf import INDEX, HFError, architecture
from trainer.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
MLA = ["model.attention=mla", "model.num_kv_heads=0", "model.mla.kv_lora_rank=32"]


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(seed))


def _logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


def test_mixtral_export_loads_in_transformers_with_the_same_logits(tmp_path):
    cfg = mixtral_cfg()
    model = make_model(cfg, seed=1)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    out = str(tmp_path / "hf")
    from cluster.cli import main as moeyard

    assert (
        moeyard(["export", ckpt, "--out", out, "--format", "hf", "--max-shard-size", "20KB"]) == 0
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    index = json.loads((tmp_path / "hf" / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    # The per-expert layout the Hub's Mixtral checkpoints use.
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index["weight_map"]

    tokens = _tokens(cfg.vocab_size)
    mine = _logits(model, tokens)
    torch.testing.assert_close(hf_logits(out, tokens), mine, rtol=0, atol=TOL)

    # The check has teeth: two experts swapped in the files move the logits far away.
    name = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    a, b = name.format(0), name.format(1)
    fa, fb = index["weight_map"][a], index["weight_map"][b]
    ta, tb = load_file(str(tmp_path / "hf" / fa)), load_file(str(tmp_path / "hf" / fb))
    wa, wb = ta[a].clone(), tb[b].clone()
    ta[a] = wb
    save_file(ta, str(tmp_path / "hf" / fa), metadata={"format": "pt"})
    tb = load_file(str(tmp_path / "hf" / fb))
    tb[b] = wa
    save_file(tb, str(tmp_path / "hf" / fb), metadata={"format": "pt"})
    assert (hf_logits(out, tokens) - mine).abs().max() > 100 * TOL


@pytest.mark.parametrize("q_lora_rank", [12, 0])
def test_deepseek_v2_export_loads_in_transformers_with_the_same_logits(
    tmp_path, monkeypatch, q_lora_rank
):
    """MLA, shared experts, one dense layer, group-limited routing, a routed scaling
    factor; without the rotary permutation the logits differ."""
    cfg = deepseek_cfg(q_lora_rank)
    assert architecture(cfg) == "DeepseekV2ForCausalLM"
    model = make_model(cfg, seed=2)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    done = export_hf(ckpt, str(tmp_path / "hf"), max_shard_bytes=30_000)
    assert done["architecture"] == "DeepseekV2ForCausalLM" and done["shards"] > 2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["topk_method"] == "group_limited_greedy"
    assert config["routed_scaling_factor"] == 2.5 and config["first_k_dense_replace"] == 1
    tokens = _tokens(cfg.vocab_size, seed=1)
    mine = _logits(model, tokens)
    torch.testing.assert_close(hf_logits(str(tmp_path / "hf"), tokens), mine, rtol=0, atol=TOL)

    R = cfg.mla.qk_rope_head_dim
    monkeypatch.setattr(hf, "_rope_perm", lambda r: torch.arange(R))
    export_hf(ckpt, str(tmp_path / "hf-unpermuted"))
    wrong = hf_logits(str(tmp_path / "hf-unpermuted"), tokens)
    assert (wrong - mine).abs().max() > 100 * TOL


def test_export_in_bf16_keeps_the_router_in_fp32(tmp_path):
    model = make_model(mixtral_cfg(), seed=3)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    export_hf(ckpt, str(tmp_path / "hf"), dtype="bf16")
    index = json.loads((tmp_path / "hf" / INDEX).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for f in set(index.values()):
        tensors.update(load_file(str(tmp_path / "hf" / f)))
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    want = model.layers[0].attn.wq.weight.detach().to(torch.bfloat16)
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], want)


def test_export_writes_the_runs_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "hello", "world", "moe"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_path = str(tmp_path / "tok.json")
    tok.save(tok_path)
    import hashlib

    data = tmp_path / "data"
    data.mkdir()
    record = {
        "kind": "hf",
        "name": "tok.json",
        "vocab_size": 5,
        "eod_id": 1,
        "path": tok_path,
        "sha256": hashlib.sha256(Path(tok_path).read_bytes()).hexdigest(),
    }
    (data / "manifest.json").write_text(json.dumps({"tokenizer": record}))
    model = make_model(mixtral_cfg(), seed=4)
    cfg = job(model.cfg, data=DataConfig(path=str(data)))
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"), cfg)
    assert export_hf(ckpt, str(tmp_path / "hf"))["tokenizer"] == "tok.json"
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert loaded("hello moe world")["input_ids"] == [2, 4, 3]
    assert loaded.eos_token == "</s>"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 1

    Path(tok_path).write_text(Path(tok_path).read_text().replace("hello", "howdy"))
    with pytest.raises(HFError, match="sha256"):
        export_hf(ckpt, str(tmp_path / "hf2"))


def test_export_goes_on_when_the_dataset_is_out_of_reach(tmp_path, capsys):
    """The demo's dataset lives on a local S3 endpoint that stops with it: the weights still
    export, and the output names the manifest it could not read."""
    data = tmp_path / "data"
    (data / "manifest.json").mkdir(parents=True)  # there, but not a file to read
    model = make_model(mixtral_cfg(), seed=4)
    cfg = job(model.cfg, data=DataConfig(path=str(data)))
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"), cfg)
    assert export_hf(ckpt, str(tmp_path / "hf"))["tokenizer"] is None
    out = capsys.readouterr().out
    assert f"could not read the dataset manifest {data}/manifest.json" in out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert (tmp_path / "hf" / "config.json").exists()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.moe.num_shared_experts=1"], "model.moe.num_shared_experts=1 with GQA"),
        (["model.moe.score_func=sigmoid"], "model.moe.score_func=sigmoid"),
        (["model.moe.bias_update_rate=0.001"], "model.moe.bias_update_rate"),
        (["model.moe.norm_topk_prob=false"], "norm_topk_prob"),
        (["model.num_dense_layers=1"], "model.num_dense_layers=1"),
        (
            [*MLA, "model.moe.num_shared_experts=1"],
            "model.norm_eps=1e-05",
        ),
        (MLA, "num_shared_experts=0"),
    ],
)
def test_models_without_a_transformers_equivalent_are_refused(tmp_path, capsys, overrides, named):
    base = ["model.moe.norm_topk_prob=true", "model.num_kv_heads=2"]
    cfg = load_config(ROOT / "infra" / "runs" / "tiny.yaml", [*base, *overrides])
    with pytest.raises(HFError, match="no transformers architecture") as e:
        architecture(cfg.model)
    assert named in str(e.value)
    model = make_model(cfg.model)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"), cfg)
    assert main([ckpt, "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def check_export_of_run(run_dir: str, out: str) -> None:
    """Exports the newest checkpoint of a run written at EP=2 on 2 ranks (by
    tests/test_hf_upcycle.py's EP=2 test, which runs the ranks once for several checks)
    and compares transformers' logits with the checkpoint's own model."""
    from trainer.checkpoint import consolidated_model_state, read_objects
    from trainer.export import _config_from_yaml

    done = export_hf(run_dir, out, max_shard_bytes=100_000)
    assert done["checkpoint"].endswith("step-00000001") and done["shards"] > 2
    layout = read_objects(done["checkpoint"], ["meta.layout"])["meta.layout"]
    assert layout["world_size"] == 2 and layout["ep"] == 2
    cfg = _config_from_yaml(read_objects(done["checkpoint"], ["meta.config"])["meta.config"])
    model = Transformer(cfg.model)
    model.load_state_dict(consolidated_model_state(done["checkpoint"]), strict=True)
    tokens = _tokens(cfg.model.vocab_size, seed=5)
    torch.testing.assert_close(hf_logits(out, tokens), _logits(model, tokens), rtol=0, atol=TOL)


_MEASURE = r"""
import json, sys
from trainer.export import export, export_hf

def run(out):
    if sys.argv[4] == "hf":
        return export_hf(sys.argv[1], out, max_shard_bytes=int(sys.argv[3]))["bytes"]
    export(sys.argv[1], out, max_group_bytes=int(sys.argv[3]))
    return None

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

run(sys.argv[2] + "/warm")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak to the current RSS
base = rss_kib()
written = run(sys.argv[2] + "/out")
peak = (hwm_kib() - base) * 1024
# The control (once): reading the whole model at once, as the export did before it
# streamed.
control = None
if sys.argv[4] == "moeyard":
    from trainer.checkpoint import consolidated_model_state
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kib()
    whole = consolidated_model_state(sys.argv[1])
    control = (hwm_kib() - base) * 1024
print(json.dumps({"peak_extra": peak, "bytes": written, "control": control}))
"""


@pytest.mark.parametrize("fmt", ["hf", "moeyard"])
def test_export_peak_memory_stays_far_below_the_model_size(tmp_path, fmt):
    """The export's peak RSS above its baseline, in a fresh process (torch's storages are
    invisible to tracemalloc), against the bound of the module docstring: about three
    shards plus the largest tensor."""
    cfg = dataclasses.replace(
        mixtral_cfg(),
        dim=256,
        num_layers=4,
        vocab_size=512,
        moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=512, norm_topk_prob=True),
    )
    model = make_model(cfg)
    ckpt = write_checkpoint(model, str(tmp_path / "ckpt"))
    # Parameters only: the routers' selection biases are not exported (they are zero).
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = 2 << 20
    largest = max(v.numel() * v.element_size() for v in model.state_dict().values())
    # A fixed mmap threshold: every large buffer is mapped and unmapped on free, so the
    # warm-up run's freed memory is not kept in the heap and reused unseen by the peak.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, ckpt, str(tmp_path), str(shard), fmt],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    got = json.loads(res.stdout.strip().splitlines()[-1])
    bound = 3 * shard + largest + (8 << 20)  # + allocator and import slack
    print(
        f"export --format {fmt}: model {model_bytes / 2**20:.1f} MiB, peak above baseline "
        f"{got['peak_extra'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB; reading the "
        f"whole model at once: {got['control'] and got['control'] / 2**20} MiB"
    )
    if fmt == "hf":
        assert got["bytes"] == model_bytes
    else:  # the one file holds every tensor of the checkpoint, byte for byte
        from safetensors.torch import load_file

        from trainer.checkpoint import consolidated_model_state

        back = load_file(str(tmp_path / "out" / "model.safetensors"))
        want = consolidated_model_state(ckpt)
        assert sorted(back) == sorted(want)
        assert all(torch.equal(back[k], want[k]) for k in want)
    assert bound < model_bytes / 3
    assert got["peak_extra"] < bound
    if got["control"] is not None:
        # The measure sees a whole-model read (so the bound is not met by accident).
        assert got["control"] > 0.9 * model_bytes


@pytest.mark.parametrize(
    ("pattern", "arch"),
    [
        ("mixtral-8x7b-*", "MixtralForCausalLM"),
        ("deepseek-v2-h*", "DeepseekV2ForCausalLM"),
        ("deepseek-v2-lite-*", "DeepseekV2ForCausalLM"),
    ],
)
def test_published_presets_export_as_transformers_models_of_the_same_size(pattern, arch):
    """The config.json of each published preset builds (on the meta device) a transformers
    model with exactly moeyard's parameter count: 46.7B, 236B, 15.7B."""
    import glob

    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.flops import param_counts
    from trainer.hf import hf_config

    (path,) = glob.glob(str(ROOT / "infra" / "runs" / f"{pattern}.yaml"))
    cfg = load_config(path, ignore_sections=("cluster",)).model
    config = hf_config(cfg, dtype=torch.bfloat16)
    assert config["architectures"] == [arch]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(config.pop("model_type"), **config)
        )
    assert type(model).__name__ == arch
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total


def test_a_deepseek_v2_shaped_training_run_exports(tmp_path):
    """A real run (3 steps, MLA with query compression, a dense first layer, shared
    experts, group-limited routing, route_scale) and its checkpoint, exported."""
    from trainer.loop import run

    out = str(tmp_path / "run")
    run(
        load_config(
            ROOT / "infra" / "runs" / "tiny.yaml",
            [
                f"run.output_dir={out}",
                *MLA,
                "model.dim=32",
                "model.mla.kv_lora_rank=16",
                "model.mla.q_lora_rank=24",
                "model.mla.qk_nope_head_dim=8",
                "model.mla.qk_rope_head_dim=8",
                "model.mla.v_head_dim=8",
                "model.norm_eps=1e-6",
                "model.num_dense_layers=1",
                "model.num_layers=3",
                "model.moe.expert_hidden=16",
                "model.moe.num_shared_experts=1",
                "model.moe.n_group=4",
                "model.moe.topk_group=2",
                "model.moe.route_scale=2.5",
                # DeepSeek-V2 leaves the top-k weights as they are (tiny.yaml normalizes).
                "model.moe.norm_topk_prob=false",
                "train.steps=3",
                "train.seq_len=32",
                "train.micro_batch_size=2",
                "checkpoint.every=3",
                "checkpoint.async_save=false",
                "data.corpus_max_bytes=60000",
                "ops.stdout=false",
                "ops.telemetry=false",
                "parallel.ep=1",
            ],
            ignore_sections=("cluster",),
        )
    )
    from trainer.checkpoint import consolidated_model_state, read_objects
    from trainer.export import _config_from_yaml

    done = export_hf(out, str(tmp_path / "hf"), max_shard_bytes=50_000)
    assert done["architecture"] == "DeepseekV2ForCausalLM"
    cfg = _config_from_yaml(read_objects(done["checkpoint"], ["meta.config"])["meta.config"])
    model = Transformer(cfg.model)
    model.load_state_dict(consolidated_model_state(done["checkpoint"]), strict=True)
    tokens = _tokens(cfg.model.vocab_size, seed=6)
    torch.testing.assert_close(
        hf_logits(str(tmp_path / "hf"), tokens), _logits(model, tokens), rtol=0, atol=TOL
    )


def test_the_demo_run_exports_as_mixtral(tmp_path):
    """The next step after `make demo`: a run of the tiny preset with its own routing
    settings exports with --format hf, and transformers computes the same logits."""
    from cluster.cli import main as moeyard
    from trainer.checkpoint import consolidated_model_state, read_objects
    from trainer.export import _config_from_yaml
    from trainer.loop import run

    out = str(tmp_path / "run")
    run(
        load_config(
            ROOT / "infra" / "runs" / "tiny.yaml",
            [
                f"run.output_dir={out}",
                "train.steps=2",
                "checkpoint.every=2",
                "checkpoint.async_save=false",
                "data.corpus_max_bytes=60000",
                "ops.stdout=false",
                "ops.telemetry=false",
                "parallel.ep=1",
            ],
            ignore_sections=("cluster",),
        )
    )
    hf = str(tmp_path / "hf")
    assert moeyard(["export", out, "--format", "hf", "--out", hf]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    ckpt = f"{out}/checkpoints/step-00000002"
    cfg = _config_from_yaml(read_objects(ckpt, ["meta.config"])["meta.config"])
    model = Transformer(cfg.model)
    model.load_state_dict(consolidated_model_state(ckpt), strict=True)
    tokens = _tokens(cfg.model.vocab_size, seed=7)
    torch.testing.assert_close(hf_logits(hf, tokens), _logits(model, tokens), rtol=0, atol=TOL)
