"""`--dry-run`: sizing a job on the meta device. The per-rank arithmetic is checked against
models really parallelized on a fake process group, the activation estimate against the
tensors a real forward saves, the whole per-rank peak against the peak measured in real CPU
training steps (one process and FSDP ranks, every activation-checkpointing mode), and the
DeepSeek-V2 preset is sized for the 32 ranks it is written for."""

from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import ConfigError, load_config
from trainer.dryrun import GIB, activation_bytes, activation_parts, main, size_job
from trainer.flops import param_counts

ROOT = os.path.join(os.path.dirname(__file__), "..")
RUNS = os.path.join(ROOT, "infra", "runs")
TINY = os.path.join(RUNS, "tiny.yaml")
MLA_TINY = [
    "model.attention=mla",
    "model.num_kv_heads=0",
    "model.mla.kv_lora_rank=32",
    "model.mla.q_lora_rank=48",
    "model.mla.qk_nope_head_dim=16",
    "model.mla.qk_rope_head_dim=8",
    "model.mla.v_head_dim=16",
    "model.num_dense_layers=1",
    "model.moe.num_shared_experts=1",
]


def run_json(cfg, **kw) -> tuple[int, dict]:
    buf = io.StringIO()
    rc = main(cfg, json_out=True, out=buf, **kw)
    return rc, json.loads(buf.getvalue())


# The issue asks for under a minute on a CPU machine; it takes a few seconds.
@pytest.mark.timeout(60)
def test_deepseek_v2_sized_for_32_ranks(capsys):
    (path,) = glob.glob(os.path.join(RUNS, "deepseek-v2-h*.yaml"))
    cfg = load_config(path)
    rc, out = run_json(cfg)
    assert "does not fit" not in capsys.readouterr().err
    c = param_counts(cfg.model)
    assert out["total_params"] == c.total and out["active_params"] == c.active
    assert out["world_size"] == 32 and out["ep"] == 8 and out["dp"] == 4
    assert out["dp_shard"] == 32 and out["dp_replicate"] == 1
    dense = c.total - c.experts_total
    assert out["params_per_rank"] == dense + c.experts_total // 8
    mem = out["memory_per_rank"]
    # fp32 weight + grad + two AdamW moments of the rank's FSDP shard: a 32nd of the model.
    shard = -(-dense // 32) + -(-(c.experts_total // 8) // 4)
    assert mem["params"] == mem["grads"] == 4 * shard
    assert mem["optimizer"] == 8 * shard
    assert 4 * shard == pytest.approx(4 * c.total / 32, rel=1e-6)
    assert out["bytes_per_rank"] == mem["total"] == mem["allocated"] + mem["allocator"]
    assert mem["allocated"] == max(mem["forward_peak"], mem["backward_peak"], mem["optimizer_peak"])
    assert out["flops_per_token"] > 6 * c.active  # attention adds to 6N
    # Sharded, with full activation checkpointing, it fits an H200; at 24 ranks it does not.
    assert rc == 0 and out["fits"] is True and out["bytes_per_rank"] < 139 * GIB
    rc24, out24 = run_json(load_config(path, ["parallel.world_size=24"]))
    assert rc24 == 1 and out24["fits"] is False
    assert (
        "parallel.device_memory_gib" in out24["error"] and "does not fit" in capsys.readouterr().err
    )
    # KV cache: (512 + 64) x 60 layers in bf16; MHA with the same heads and dims caches
    # 128 x (192 + 128) per layer.
    kv = out["kv_cache"]
    assert out["kv_cache_bytes_per_token"] == kv["bytes_per_token"] == 576 * 60 * 2
    assert kv["mha_bytes_per_token"] == 128 * 320 * 60 * 2
    assert kv["reduction_vs_mha"] == pytest.approx(1 - 576 / 40960)
    # Placement: EP rank e holds experts [20e, 20e + 20) on GPU e of every node.
    assert len(out["placement"]) == 8
    for p in out["placement"]:
        e = p["ep_rank"]
        assert p["first_expert"] == 20 * e and p["num_experts"] == 20
        assert p["ranks"] == [8 * n + e for n in range(4)]
        assert p["nodes"] == list(range(4)) and set(p["gpus"]) == {e}


def _rank_params(rank: int, world: int, overrides: list[str]) -> tuple[int, list[int]]:
    """The real path on a fake process group: build on meta, parallelize for this rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from trainer.mesh import build_mesh
    from trainer.model import build_model
    from trainer.parallelize import parallelize

    cfg = load_config(TINY, overrides)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = build_mesh(world_size=world, rank=rank, ep=cfg.parallel.ep)
        model = parallelize(build_model(cfg.model), mesh)
        offsets = [m.experts.expert_offset for m in model.moe_layers()]
        # FSDP shards every parameter: count what this rank holds.
        return sum(p.to_local().numel() for p in model.parameters()), offsets
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("world", "ep", "extra"),
    [(4, 2, []), (4, 4, MLA_TINY), (8, 8, ["model.tie_embeddings=true"])],
)
def test_per_rank_arithmetic_equals_parallelized_models(world, ep, extra):
    overrides = [f"parallel.ep={ep}", f"parallel.world_size={world}", *extra]
    report = size_job(load_config(TINY, overrides))
    by_ep_rank = {p.ep_rank: p for p in report.placement}
    held = []
    for rank in range(world):
        n, offsets = _rank_params(rank, world, overrides)
        held.append(n)
        # The estimate rounds each shard up (FSDP pads the last); a rank holds no more.
        assert n <= report.memory.params // 4, rank
        p = by_ep_rank[rank % ep]
        assert rank in p.ranks
        assert set(offsets) == {p.first_expert}
    # Every parameter is held once over the world (dp_replicate 1), and evenly.
    assert sum(held) == report.counts.total
    assert max(held) - min(held) <= report.counts.total // world // 10


def _saved_bytes(overrides: list[str], batch: int, seq: int) -> tuple[int, int]:
    """(bytes a real fp32 forward + loss saves for backward, the estimate)."""
    from trainer.model import build_model, materialize

    cfg = load_config(TINY, overrides).model
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens[:, :-1])
        F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    # The logits stay alive (held by the model output) through backward.
    measured = sum(v for k, v in storages.items() if k not in weights)
    measured += out.logits.numel() * out.logits.element_size()
    return measured, activation_bytes(cfg, tokens=batch * seq, bf16=False)


@pytest.mark.parametrize("extra", [[], MLA_TINY], ids=["gqa", "mla"])
def test_activation_estimate_matches_saved_tensors(extra):
    torch.manual_seed(0)
    measured, estimate = _saved_bytes(["model.num_dense_layers=1", *extra], 2, 48)
    assert estimate == pytest.approx(measured, rel=0.1)


def test_memory_check_fails_with_a_clear_message(capsys):
    small = load_config(TINY, ["parallel.device_memory_gib=0.001"])
    rc = main(small, out=io.StringIO())
    assert rc == 1
    err = capsys.readouterr().err
    assert "parallel.device_memory_gib is 0.001" in err and "GiB" in err
    fits = load_config(TINY, ["parallel.device_memory_gib=1"])
    text = io.StringIO()
    assert main(fits, out=text) == 0
    assert "fits" in text.getvalue() and "expert placement" in text.getvalue()


def test_a_job_must_leave_the_estimates_error_spare(capsys):
    """A peak at 97% of the device memory does not fit (5% is kept for the estimate's
    error); at 94% it does."""
    need = size_job(load_config(TINY)).memory.total / GIB
    for share, rc in ((0.97, 1), (0.94, 0)):
        cfg = load_config(TINY, [f"parallel.device_memory_gib={need / share}"])
        assert main(cfg, out=io.StringIO()) == rc, share
    err = capsys.readouterr().err
    assert "of which the dry run lets a job plan on" in err and "(95%;" in err


def test_memory_follows_dtype_and_micro_batch():
    one = ["parallel.ep=1"]  # one process: no FSDP, bf16 is autocast over fp32 weights
    base = size_job(load_config(TINY, [*one, "train.dtype=fp32"]))
    assert base.memory.weight_copies == 0
    bf16 = size_job(load_config(TINY, [*one, "train.dtype=bf16"]))
    assert bf16.memory.weight_copies > 0 and bf16.memory.activations < base.memory.activations
    double = size_job(load_config(TINY, [*one, "train.dtype=fp32", "train.micro_batch_size=8"]))
    assert double.memory.activations == 2 * base.memory.activations
    assert double.memory.params == base.memory.params
    # Under FSDP the bf16 compute copies are the gathered units, not autocast copies.
    fsdp = size_job(load_config(TINY, ["train.dtype=bf16"]), world_size=2)
    assert fsdp.memory.weight_copies == 0 and fsdp.memory.gathered_backward > 0


def test_sharded_state_falls_as_one_over_dp_shard_and_checkpointing_cuts_activations():
    cpu = ["train.device=cpu", "parallel.ep=1"]
    state = [size_job(load_config(TINY, cpu), world_size=n).memory for n in (1, 2, 4)]
    for m, n in zip(state, (1, 2, 4), strict=True):
        assert m.params + m.grads + m.optimizer == pytest.approx(
            (state[0].params + state[0].grads + state[0].optimizer) / n, rel=0.01
        )
    by_mode = {
        ac: size_job(load_config(TINY, [*cpu, f"train.activation_checkpoint={ac}"])).memory
        for ac in ("none", "selective", "full")
    }
    assert by_mode["full"].activations < by_mode["selective"].activations
    assert by_mode["selective"].activations < by_mode["none"].activations
    assert by_mode["none"].recompute == 0 < by_mode["full"].recompute


def _measured_peak(rank: int, world: int, overrides: list[str], out: str) -> tuple[int, int]:
    """(peak bytes of a real training step as torch's memory tracker counts them, the dry
    run's estimate for the same config)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    from trainer.loop import setup, train_step

    cfg = load_config(
        TINY,
        [
            "ops.telemetry=false",
            "data.corpus_max_bytes=100000",
            f"run.output_dir={out}",
            "train.device=cpu",
            *overrides,
        ],
    )
    estimate = size_job(cfg, world_size=world).memory.total
    state = setup(cfg, local_rank=rank)
    train_step(state)  # the AdamW moments exist from here on
    if world > 1:
        tracker = FSDPMemTracker(state.model, state.optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(state.model, state.optimizer)
    with tracker:
        train_step(state)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    state.source.close()
    return peak, estimate


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_peak_estimate_within_15_percent_of_a_measured_step(ac, tmp_path):
    peak, estimate = _measured_peak(
        0,
        1,
        ["parallel.ep=1", "train.micro_batch_size=8", f"train.activation_checkpoint={ac}"],
        str(tmp_path),
    )
    assert estimate == pytest.approx(peak, rel=0.15), (estimate, peak)


@pytest.mark.slow
def test_peak_estimate_within_15_percent_under_fsdp_and_ep(tmp_path):
    from tests.distributed import run_ranks

    for ac in ("none", "selective"):
        results = run_ranks(
            _measured_peak,
            2,
            ["parallel.ep=2", "train.micro_batch_size=4", f"train.activation_checkpoint={ac}"],
            str(tmp_path / ac),
        )
        for peak, estimate in results:
            assert estimate == pytest.approx(peak, rel=0.15), (ac, estimate, peak)


def test_world_size_given_to_main_must_match_the_preset():
    cfg = load_config(TINY, ["parallel.world_size=4"])
    with pytest.raises(ConfigError, match=r"launcher started 6 ranks"):
        size_job(cfg, world_size=6)
    rc, out = run_json(load_config(TINY), world_size=6)
    assert out["world_size"] == 6 and out["dp"] == 3 and rc == 0


def test_cli_dry_run_json():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer.train", TINY, "parallel.world_size=4", "--dry-run"]
    r = subprocess.run([*cmd, "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("total_params", "active_params", "flops_per_token", "bytes_per_rank"):
        assert key in out
    assert out["world_size"] == 4 and out["dp"] == 2


def test_cli_flags(capsys):
    from trainer.train import main as train_main

    assert train_main([TINY, "parallel.world_size=3", "--dry-run"]) == 2
    assert "parallel.world_size (3) must be divisible by parallel.ep (2)" in capsys.readouterr().err
    assert train_main([TINY, "--json"]) == 2
    assert "--json goes with --dry-run" in capsys.readouterr().err
    assert train_main(["--dry-run", TINY, "parallel.device_memory_gib=1"]) == 0
    assert "expert placement" in capsys.readouterr().out


def _moe_block_saved(cfg, dtype: torch.dtype, tokens: int, *, legacy: bool) -> int:
    """Bytes the second block's MoE half (its norm, router, experts, combine, shared experts)
    saves for backward in one real forward in `dtype`; `legacy`: with the layer of
    tests/moe_legacy.py (two grouped GEMMs for w1 and w3, SwiGLU by autograd) swapped in."""
    from tests.moe_legacy import LegacyMoE
    from trainer.model import build_model, materialize

    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=0).to(dtype)
    block = model.layers[1]
    if legacy:
        old = LegacyMoE(cfg.dim, cfg.moe)
        old.load_from(block.ffn)
        block.ffn = old.to(dtype)
    inside = [False]
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if inside[0]:
            storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    block.ffn_norm.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    block.ffn.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    x = torch.randint(0, cfg.vocab_size, (4, tokens // 4))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return sum(v for k, v in storages.items() if k not in weights)


MOE_SHAPE = [
    "model.dim=128",
    "model.moe.expert_hidden=96",
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.num_shared_experts=1",
    "model.num_dense_layers=0",
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moe_block_estimate_matches_saved_tensors(dtype):
    """A MoE block's part of the estimate (norm with its fp32 copy, the router's fp32 input,
    dispatched rows, w13's output, SwiGLU's output, the expert outputs the combine keeps,
    shared experts) against what the layer really saves, in fp32 and in bf16 compute."""
    cfg = load_config(TINY, MOE_SHAPE).model
    tokens = 256
    b = 2 if dtype == torch.bfloat16 else 4
    parts = activation_parts(cfg, a=b, r=b)
    measured = _moe_block_saved(cfg, dtype, tokens, legacy=False)
    assert parts.moe_ffn_full * tokens == pytest.approx(measured, rel=0.03)


def _legacy_extra_per_token(m) -> int:
    return m.moe.top_k * (2 * m.moe.expert_hidden - 8)


def test_legacy_layer_saved_one_more_hidden_per_routed_row():
    """The layer the H200 rows were measured with (tests/moe_legacy.py) saved, without
    checkpointing, w1's and w3's outputs, silu's output and their product: one bf16 [rows, F]
    more per (token, k) than the fused layer's [rows, 2F] and product, and one int64 index
    per row fewer."""
    cfg = load_config(TINY, MOE_SHAPE).model
    tokens = 256
    new = _moe_block_saved(cfg, torch.bfloat16, tokens, legacy=False)
    old = _moe_block_saved(cfg, torch.bfloat16, tokens, legacy=True)
    assert old - new == tokens * _legacy_extra_per_token(cfg)


# Measured on one H200 (torch 2.11 + CUDA 13, bf16, micro-batch 2 x 4096 unless said):
# torch.cuda.max_memory_allocated / max_memory_reserved after a shortened preset run, in
# GiB. The code then ran bf16 in one process under autocast, FSDP at one rank with its own
# schedule (a unit gathered per forward and backward), AdamW foreach, the whole-logit loss and
# the MoE layer of tests/moe_legacy.py; the rows are sized for that code (fsdp,
# keep_gathered=False, fused_optimizer=False, train.loss_chunk_tokens=0, and the
# `_then_code_extra` below for the layer and autocast).
# Reserved is given where it was measured with expandable segments.
H200_PEAKS = [
    # preset, overrides, FSDP at one rank, allocated, reserved
    ("mixtral-8x7b-*", ["model.num_layers=2", "train.grad_accum=4"], True, 60.36, 69.39),
    (
        "mixtral-8x7b-*",
        ["model.num_layers=2", "train.grad_accum=4", "train.activation_checkpoint=none"],
        True,
        61.37,
        None,
    ),
    ("mixtral-8x7b-*", ["model.num_layers=2", "train.grad_accum=4"], False, 59.51, None),
    (
        "deepseek-v2-lite-*",
        ["model.num_layers=4", "train.grad_accum=4", "train.activation_checkpoint=none"],
        True,
        52.28,
        None,
    ),
    (
        "deepseek-v2-lite-*",
        ["model.num_layers=4", "train.grad_accum=1", "train.activation_checkpoint=full"],
        True,
        43.64,
        None,
    ),
    ("moe-100m-*", [], False, 17.41, 18.15),
    ("moe-100m-*", [], True, 16.03, None),
]


def _then_code_extra(cfg, *, autocast: bool) -> int:
    """Activation bytes the measured code held beyond what the dry run counts for today's.

    The legacy MoE layer (without checkpointing): one [rows, F] more per (token, k)
    (`test_legacy_layer_saved_one_more_hidden_per_routed_row`). One process under autocast:
    the residual stream and the norms in fp32 (r = 4) where today's bf16 compute copies keep
    them in bf16; the parts are recomputed with r = 4 for the blocks the mode saves whole.
    """
    m, t = cfg.model, cfg.train
    if t.activation_checkpoint != "none":
        return 0  # selective saves w13's output as legacy saved w1's and w3's; full, inputs
    tokens = t.micro_batch_size * t.seq_len
    moe_layers = m.num_layers - m.num_dense_layers
    extra = moe_layers * _legacy_extra_per_token(m)
    if autocast:
        lo, hi = activation_parts(m, a=2, r=2), activation_parts(m, a=2, r=4)
        extra += m.num_layers * (hi.attn_full - lo.attn_full)
        extra += m.num_dense_layers * (hi.dense_ffn_full - lo.dense_ffn_full)
        extra += moe_layers * (hi.moe_ffn_full - lo.moe_ffn_full)
    return extra * tokens


@pytest.mark.parametrize(("pattern", "overrides", "fsdp", "allocated", "reserved"), H200_PEAKS)
def test_dry_run_against_the_h200_measurements(pattern, overrides, fsdp, allocated, reserved):
    """Allocated within 5% of the measured peak; reserved (allocated plus the modelled
    allocator reserve) within 5% where measured, else within 5% of the measured allocated
    figure plus the modelled reserve (the GPU could not be measured again)."""
    (path,) = glob.glob(os.path.join(RUNS, pattern + ".yaml"))
    one = ["parallel.ep=1", "parallel.world_size=1", "data.source=corpus", "data.path=''"]
    one.append("train.loss_chunk_tokens=0")  # the whole-logit loss, as measured
    cfg = load_config(path, [*overrides, *one], ignore_sections=("cluster",))
    m = size_job(cfg, world_size=1, fsdp=fsdp, keep_gathered=False, fused_optimizer=False).memory
    then = _then_code_extra(cfg, autocast=not fsdp)
    assert (m.allocated + then) / GIB == pytest.approx(allocated, rel=0.05)
    want = reserved if reserved is not None else allocated + m.allocator / GIB
    assert (m.total + then) / GIB == pytest.approx(want, rel=0.05)


def test_the_loop_sets_expandable_segments_unless_the_user_chose(monkeypatch):
    import trainer.loop as loop

    applied: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert loop.configure_cuda_allocator() == "expandable_segments:True"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert applied == ["expandable_segments:True"]  # CUDA had started: applied again
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    assert loop.configure_cuda_allocator() == "max_split_size_mb:512"
    assert applied == ["expandable_segments:True"]
