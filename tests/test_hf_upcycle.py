"""Sparse upcycling (`checkpoint.upcycle=true`): an MoE built from a dense Llama, Mistral or
Qwen2 checkpoint has the dense model's logits at step 0 (every expert a copy of the MLP, or
granular slices of it with the scaling that keeps the output), a short run from it at EP=2
trains, and what cannot be upcycled is refused naming the setting or tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.distributed import run_ranks
from tests.test_hf_common import tiny_hf_dense
from trainer.config import MoEConfig, load_config
from trainer.hf import HFError
from trainer.init_from import load_hf_weights
from trainer.model import build_model, materialize

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _moe_cfg(num_experts: int, top_k: int, expert_hidden: int, **moe):
    cfg = load_config(
        ROOT / "infra" / "runs" / "tiny.yaml",
        ["model.dim=32", "model.dense_hidden=64"],
        ignore_sections=("cluster",),
    ).model
    cfg.moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        expert_hidden=expert_hidden,
        norm_topk_prob=True,
        **moe,
    )
    return cfg


@pytest.mark.parametrize(
    ("kind", "experts", "top_k", "hidden", "moe"),
    [
        ("llama", 4, 2, 64, {}),  # every expert a copy of the MLP
        ("mistral", 8, 4, 32, {}),  # granular: 2 slices per copy, top-4 = 2 whole copies
        ("qwen2", 4, 2, 64, {"route_scale": 2.0}),  # zero q/k/v biases; w2 undoes the scale
        ("llama", 8, 4, 16, {}),  # 4 slices per copy, top-4 = 1 copy
    ],
)
def test_upcycled_logits_equal_the_dense_models(tmp_path, kind, experts, top_k, hidden, moe):
    src = str(tmp_path / kind)
    dense = tiny_hf_dense(src, kind)
    cfg = _moe_cfg(experts, top_k, hidden, **moe)
    cfg.num_dense_layers = 0
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=3)
    load_hf_weights(model, src, upcycle=True, seed=3)
    tokens = torch.randint(0, 320, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = model.eval()(tokens).logits
        want = dense(input_ids=tokens).logits
    torch.testing.assert_close(mine, want, rtol=0, atol=TOL)
    # The experts are not all alike when slicing (G > 1), and the routers are not zero:
    # equality does not come from a degenerate router.
    w1 = model.layers[0].ffn.experts.w1
    assert (model.layers[0].ffn.router.weight.abs().sum(-1) > 0).all()
    G = 64 // hidden
    assert torch.equal(w1[0], w1[G]) and (G == 1 or not torch.equal(w1[0], w1[1]))


def test_upcycling_keeps_a_dense_first_layer(tmp_path):
    src = str(tmp_path / "llama")
    dense = tiny_hf_dense(src, "llama")
    cfg = _moe_cfg(4, 2, 64)
    cfg.num_dense_layers = 1
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, src, upcycle=True)
    assert torch.equal(model.layers[0].ffn.w2.weight, dense.model.layers[0].mlp.down_proj.weight)
    tokens = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(tokens).logits, dense(input_ids=tokens).logits, rtol=0, atol=TOL
        )


def test_what_cannot_be_upcycled_is_refused(tmp_path, capsys):
    src = str(tmp_path / "qwen2")
    tiny_hf_dense(src, "qwen2")
    files = sorted(Path(src).glob("model*.safetensors"))
    for f in files:
        sd = load_file(str(f))
        name = "model.layers.1.self_attn.k_proj.bias"
        if name in sd:
            sd[name] = torch.full_like(sd[name], 0.5)
            save_file(sd, str(f), metadata={"format": "pt"})
    model = materialize(build_model(_moe_cfg(4, 2, 64)), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"k_proj\.bias is not zero"):
        load_hf_weights(model, src, upcycle=True)

    llama = str(tmp_path / "llama")
    tiny_hf_dense(llama, "llama", intermediate=48)
    model = materialize(build_model(_moe_cfg(4, 2, 32)), device=torch.device("cpu"), seed=0)
    with pytest.raises(HFError, match=r"intermediate_size \(48\) is not a multiple of .*\(32\)"):
        load_hf_weights(model, llama, upcycle=True)

    model = materialize(
        build_model(_moe_cfg(4, 2, 48, num_shared_experts=1)), device=torch.device("cpu"), seed=0
    )
    with pytest.raises(HFError, match="num_shared_experts=1"):
        load_hf_weights(model, llama, upcycle=True)

    # Top-1 without normalization: accepted, with a warning that step 0 differs.
    model = materialize(build_model(_moe_cfg(4, 1, 48)), device=torch.device("cpu"), seed=0)
    load_hf_weights(model, llama, upcycle=True)
    assert "does not start equal to the dense one" in capsys.readouterr().out


def _overrides(out: str, src: str, steps: int, *extra: str) -> list[str]:
    return [
        f"run.output_dir={out}",
        f"checkpoint.init_from={src}",
        "model.dim=32",
        "model.moe.expert_hidden=32",
        "model.moe.norm_topk_prob=true",
        f"train.steps={steps}",
        "train.warmup_steps=2",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "data.corpus_max_bytes=60000",
        "ops.stdout=false",
        "ops.telemetry=false",
        "parallel.ep=2",
        *extra,
    ]


def _train_from_hf(
    rank: int, world: int, llama: str, mixtral: str, out: str
) -> tuple[list[float], list[float]]:
    """Two runs at EP=2: 12 steps from the upcycled Llama (4 experts of half the MLP each),
    and one step from the Mixtral checkpoint. Returns both runs' logged lm losses."""
    from ops.sinks import read_metrics
    from trainer.loop import run

    tiny = ROOT / "infra" / "runs" / "tiny.yaml"
    up = load_config(
        tiny,
        _overrides(f"{out}/up", llama, 12, "checkpoint.upcycle=true", "model.moe.num_experts=4"),
        ignore_sections=("cluster",),
    )
    run(up)
    # Its checkpoint, written by both ranks, is what the export test below reads.
    mx = load_config(
        tiny,
        _overrides(f"{out}/mx", mixtral, 1, "checkpoint.every=1", "checkpoint.async_save=false"),
        ignore_sections=("cluster",),
    )
    run(mx)
    # A moeyard checkpoint (the one just written) as init_from at EP=2: each rank's local
    # shards equal the slices of the consolidated tensors.
    from trainer.checkpoint import consolidated_model_state, model_state, resolve_checkpoint
    from trainer.init_from import copy_full_into
    from trainer.loop import setup

    again = load_config(
        tiny, _overrides(f"{out}/again", f"{out}/mx", 1), ignore_sections=("cluster",)
    )
    state = setup(again)
    state.source.close()
    full = consolidated_model_state(resolve_checkpoint(f"{out}/mx"))
    for key, t in model_state(state.model).items():
        want = torch.empty_like(t)
        copy_full_into(want, full[key[len("model.") :]])
        local = t.to_local() if hasattr(t, "to_local") else t
        wl = want.to_local() if hasattr(want, "to_local") else want
        assert torch.equal(local, wl), key
    return tuple(  # type: ignore[return-value]
        [r["lm_loss"] for r in read_metrics(f"{out}/{name}/metrics.jsonl")] for name in ("up", "mx")
    )


def _first_global_batch(out: str) -> torch.Tensor:
    """Both ranks' first micro-batch of the run in `out` (the same data config)."""
    from dataloader.source import build_source

    cfg = load_config(
        ROOT / "infra" / "runs" / "tiny.yaml",
        _overrides(out, "", 1)[2:],
        ignore_sections=("cluster",),
    )
    rows = []
    for rank in range(2):
        source = build_source(
            cfg.data,
            seq_len=cfg.train.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            rank=rank,
            world_size=2,
            seed=cfg.train.seed,
        )
        rows.append(source.next_batch())
        source.close()
    return torch.cat(rows)


@pytest.mark.slow
def test_runs_from_hf_at_ep2_start_at_transformers_loss_and_train(tmp_path):
    """EP=2 (each rank holds half the experts, dense weights FSDP-sharded): the upcycled
    run's first loss is the dense model's on the same global batch, and it falls; a Mixtral
    checkpoint's is Mixtral's; and the checkpoint that run wrote at EP=2 exports to a
    directory transformers loads with the trained model's logits."""
    from tests.test_hf_common import tiny_hf_mixtral

    llama, mixtral = str(tmp_path / "llama"), str(tmp_path / "mixtral")
    dense = tiny_hf_dense(llama, "llama")
    moe = tiny_hf_mixtral(mixtral, intermediate_size=32)
    results = run_ranks(_train_from_hf, 2, llama, mixtral, str(tmp_path / "run"))
    up, mx = results[0]
    rows = _first_global_batch(str(tmp_path / "run"))
    with torch.no_grad():
        want_dense = dense(input_ids=rows, labels=rows).loss.item()
        want_moe = moe(input_ids=rows, labels=rows).loss.item()
    assert abs(up[0] - want_dense) < TOL, (up[0], want_dense)
    assert abs(mx[0] - want_moe) < TOL, (mx[0], want_moe)
    assert len(up) == 12
    assert min(up[-3:]) < 0.8 * up[0], up

    from tests.test_hf_export import check_export_of_run

    check_export_of_run(str(tmp_path / "run" / "mx"), str(tmp_path / "export"))
