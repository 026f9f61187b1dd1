"""Every preset trains under its own settings: each preset in `infra/runs/`, shrunk to tiny
sizes but keeping every structural setting it has (attention kind, MLA query compression,
dense first layers, shared experts, group-limited routing, routed scaling, score function,
normalized weights, tied head, balance losses and bias, and whatever a new preset adds),
trains 3 steps through the real loop on the CPU, in one process and on 2 gloo ranks with
FSDP x EP=2, under each activation-checkpointing mode. Recompute changes nothing, so the
three modes' losses are bit-identical in each layout; the 2-rank runs equal the one-process
run of the same global batch within float tolerance.

A new preset joins the matrix by being in the folder. Only sizes are overridden (`shrink`):
a key that is not a size keeps the preset's value.
"""

from __future__ import annotations

import glob
import math
from pathlib import Path

import pytest

from tests.distributed import run_ranks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(glob.glob(str(ROOT / "infra" / "runs" / "*.yaml")))
MODES = ("none", "full", "selective")
STEPS = 3
MICRO = 2  # rows per rank per micro-step on 2 ranks; the one-process run takes 2 x MICRO


def shrink(path: str) -> list[str]:
    """Overrides that make the preset at `path` tiny: sizes only, structure untouched.

    Experts: at most 8 (fewer only when the preset has fewer), rounded up so that the
    preset's groups still hold its top-k (n_group x ceil(top_k / topk_group)) and EP=2
    divides them. Dense first layers: one if the preset has any, then two MoE layers.
    Attention: 4 query heads, the preset's query-to-key/value head ratio kept (GQA); MLA
    with small latents, query compression kept when the preset compresses queries.
    """
    from trainer.config import load_config

    m = load_config(path, ignore_sections=("cluster",)).model
    moe = m.moe
    per_group = math.ceil(moe.top_k / moe.topk_group)
    num_experts = max(min(moe.num_experts, 8), moe.n_group * per_group, moe.top_k)
    step = math.lcm(moe.n_group, 2)
    num_experts = -(-num_experts // step) * step
    dense = min(m.num_dense_layers, 1)
    out = [
        "model.dim=64",
        f"model.num_layers={dense + 2}",
        f"model.num_dense_layers={dense}",
        "model.vocab_size=320",  # the byte corpus's vocabulary
        "model.max_seq_len=64",
        "train.seq_len=32",
        f"model.moe.num_experts={num_experts}",
        "model.moe.expert_hidden=32",
    ]
    if dense:
        out.append("model.dense_hidden=64")
    if m.attention == "mla":
        out += [
            "model.num_heads=4",
            "model.mla.kv_lora_rank=16",
            f"model.mla.q_lora_rank={24 if m.mla.q_lora_rank else 0}",
            "model.mla.qk_nope_head_dim=8",
            "model.mla.qk_rope_head_dim=4",
            "model.mla.v_head_dim=8",
        ]
    else:
        ratio = m.num_heads // m.num_kv_heads
        heads = 4 if 4 % ratio == 0 else ratio
        out += [f"model.num_heads={heads}", f"model.num_kv_heads={heads // ratio}"]
        if m.head_dim != m.dim // m.num_heads:  # heads set apart from dim / heads (Qwen3)
            out.append(f"model.head_dim={2 * 64 // heads}")
    return out


# What makes a preset run on 1 or 2 CPU processes for a few steps, whatever it was written for.
ON_CPU = [
    "train.device=cpu",
    "train.dtype=fp32",
    "train.compile=false",
    f"train.steps={STEPS}",
    "train.grad_accum=2",
    "train.global_batch_size=0",
    "train.warmup_steps=1",
    "parallel.backend=gloo",
    "parallel.world_size=0",
    "parallel.dp_replicate=1",
    "parallel.dp_shard=-1",
    "parallel.device_memory_gib=0",
    "data.source=corpus",
    "data.path=''",
    "data.corpus_max_bytes=60000",
    "checkpoint.every=0",
    "checkpoint.async_save=false",
    "eval.every=0",
    "ops.stdout=false",
    "ops.jsonl=false",
    "ops.telemetry=false",
    "run.log_every=1",
]


def _losses(path: str, layout: list[str], mode: str, out: str, rank: int) -> list[float]:
    import warnings

    from trainer.config import load_config
    from trainer.loop import run

    overrides = [
        *shrink(path),
        *ON_CPU,
        *layout,
        f"train.activation_checkpoint={mode}",
        f"run.output_dir={out}",
    ]
    with warnings.catch_warnings():
        # Keys the CPU overrides make irrelevant (e.g. ep_exchange at ep 1) warn; expected.
        warnings.simplefilter("ignore")
        cfg = load_config(path, overrides, ignore_sections=("cluster",))
    return run(cfg, local_rank=rank).losses


def _matrix(rank: int, world: int, layout: list[str], out: str) -> dict[tuple[str, str], list]:
    return {
        (Path(p).stem, mode): _losses(p, layout, mode, f"{out}/{Path(p).stem}-{mode}", rank)
        for p in PRESETS
        for mode in MODES
    }


def test_every_preset_is_in_the_matrix():
    names = {Path(p).stem for p in PRESETS}
    assert {"tiny", "moe-100m-1gpu"} <= names and len(names) >= 5, names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: Path(p).stem)
def test_shrink_keeps_the_structure(path):
    """Only sizes change: every structural setting is the preset's own."""
    from trainer.config import load_config

    full = load_config(path, ignore_sections=("cluster",)).model
    tiny = load_config(path, shrink(path), ignore_sections=("cluster",)).model
    assert tiny.attention == full.attention
    assert tiny.num_kv_heads * full.num_heads == tiny.num_heads * full.num_kv_heads
    assert (tiny.mla.q_lora_rank > 0) == (full.mla.q_lora_rank > 0)
    assert (tiny.num_dense_layers > 0) == (full.num_dense_layers > 0)
    assert tiny.num_layers > tiny.num_dense_layers
    assert tiny.tie_embeddings == full.tie_embeddings
    assert tiny.qk_norm == full.qk_norm and tiny.mtp == full.mtp
    assert (tiny.head_dim == tiny.dim // tiny.num_heads) == (
        full.head_dim == full.dim // full.num_heads
    )
    sizes = {"num_experts", "expert_hidden"}
    for key in vars(full.moe):
        if key not in sizes:
            assert getattr(tiny.moe, key) == getattr(full.moe, key), key
    assert tiny.moe.num_experts % 2 == 0


def test_presets_train_alike_in_every_checkpointing_mode_in_one_process_and_fsdp_ep2(tmp_path):
    """About a minute on two cores: one process, then one spawn of 2 ranks for everything."""
    one = _matrix(0, 1, ["parallel.ep=1", f"train.micro_batch_size={2 * MICRO}"], f"{tmp_path}/1")
    two = run_ranks(
        _matrix, 2, ["parallel.ep=2", f"train.micro_batch_size={MICRO}"], f"{tmp_path}/2"
    )[0]
    for p in PRESETS:
        name = Path(p).stem
        for layout, got in (("one process", one), ("FSDP x EP=2", two)):
            ref = got[(name, "none")]
            assert len(ref) == STEPS and all(math.isfinite(x) for x in ref), (name, ref)
            for mode in MODES[1:]:
                assert got[(name, mode)] == ref, (
                    f"{name}, {layout}: {mode} checkpointing changed the losses: "
                    f"{got[(name, mode)]} vs {ref} without"
                )
        for a, b in zip(two[(name, "none")], one[(name, "none")], strict=True):
            assert abs(a - b) <= 1e-4 * abs(b), f"{name}: FSDP x EP=2 {a} vs one process {b}"
