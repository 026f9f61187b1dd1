"""FSDP2 x expert parallelism on gloo ranks against a one-process reference of the same
global batch (fp32).

Layouts (world = dp_replicate x dp_shard, ep divides dp_shard): at world 4 (dp_shard 4,
ep 2), (dp_shard 4, ep 4) and (dp_replicate 2, dp_shard 2, ep 2); at world 2 (dp_shard 2,
ep 1), (dp_replicate 2, dp_shard 1: whole replicas, gradients all-reduced) and (dp_shard 2,
ep 2) with activation checkpointing none, full and selective. For
each: the gradients of the first micro-batch, gathered whole and keyed as in a checkpoint
(experts by global id), equal the reference's; AdamW is invariant to a gradient's scale, so
this is where an expert gradient divided by the wrong factor (dp or ep) shows; after one
step every parameter equals the reference's; the 20-step loss curve is within 1e-4 relative.
A checkpoint written at (dp_shard 4, ep 2) resumes in one process and at (dp_shard 2,
ep 2), and the next steps' losses equal the uninterrupted run's.

One spawn per world size runs every layout of that size in turn (each builds its own mesh
over the same process group): the ranks start once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed import run_ranks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
MICRO = 2
FAST = [
    f"train.steps={STEPS}",
    "train.seq_len=32",
    "ops.stdout=false",
    "ops.telemetry=false",
    "ops.jsonl=false",
    "data.corpus_max_bytes=120000",
    "checkpoint.async_save=false",
]


def _cfg(out: str, overrides: list[str]):
    from trainer.config import load_config

    return load_config(
        ROOT / "infra/runs/tiny.yaml",
        [*FAST, f"run.output_dir={out}", *overrides],
        ignore_sections=("cluster",),
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _gathered(named: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Whole tensors from every rank's checkpoint-keyed dict (experts by global id)."""
    import torch.distributed as dist

    mine = {k: _full(v) for k, v in named.items()}
    if world == 1:
        return mine
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    dist.all_gather_object(parts, mine)
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        merged.update(p)
    return merged


def _first_grads(state) -> dict[str, torch.Tensor]:
    """Gradients of the first micro-batch's loss, keyed as in a checkpoint (experts by global
    id), as this rank holds them."""
    import torch.nn.functional as F

    from trainer.model import plain_name
    from trainer.moe import EXPERT_PARTS, GroupedExperts, expert_slice
    from trainer.parallelize import blocks

    model = state.model
    rows = state.source.next_batch()
    out = model(rows[:, :-1])
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), rows[:, 1:].flatten())
    (lm + out.aux_loss + out.z_loss).backward()
    keyed: dict[str, torch.Tensor] = {}
    expert_ids = set()
    for i, block in enumerate(blocks(model)):
        experts = getattr(block.ffn, "experts", None)
        if not isinstance(experts, GroupedExperts):
            continue
        for name, parts in EXPERT_PARTS.items():
            p = getattr(experts, name)
            expert_ids.add(id(p))
            for j in range(experts.num_local_experts):
                gid = experts.expert_offset + j
                for w, part in parts:
                    keyed[f"layers.{i}.ffn.experts.{gid}.{w}"] = expert_slice(p.grad, j, part)
    for name, p in model.named_parameters():
        if id(p) not in expert_ids and p.grad is not None:
            keyed[plain_name(name)] = p.grad
    model.zero_grad(set_to_none=True)
    return keyed


def _run_layout(rank: int, world: int, overrides: list[str], out: str) -> dict:
    """First-micro-batch gradients, the parameters after one step, and the loss curve."""
    from trainer.checkpoint import Checkpointer, model_state
    from trainer.config import to_yaml
    from trainer.loop import setup, train_step

    cfg = _cfg(out, overrides)
    state = setup(cfg, local_rank=rank)
    grads = _gathered(_first_grads(state), world)
    # The reference's data order: start again from the same cursor.
    state = setup(cfg, local_rank=rank)
    ckpt = Checkpointer(cfg.checkpoint, out, state.mesh, config_yaml=to_yaml(cfg))
    losses, norms = [], []
    params = None
    for step in range(STEPS):
        m = train_step(state)
        losses.append(float(m["lm_loss"] + m["aux_loss"] + m["z_loss"]))
        norms.append(float(m["grad_norm"]))
        if step == 0:
            params = _gathered(model_state(state.model), world)
        ckpt.maybe_save(state, {}, final_step=STEPS)
    ckpt.close()
    # What an async save copies to host memory: this rank's shards only.
    from trainer.checkpoint import full_state, snapshot
    from trainer.parallelize import local

    copy = snapshot(full_state(state, ""))
    copied = sum(
        local(v).numel() * v.element_size() for v in copy.values() if isinstance(v, torch.Tensor)
    )
    state.source.close()
    return {
        "grads": grads,
        "params": params,
        "losses": losses,
        "norms": norms,
        "snapshot_bytes": copied,
    }


def _layouts(rank: int, world: int, layouts: list[list[str]], outs: list[str]) -> list[dict]:
    return [_run_layout(rank, world, ov, out) for ov, out in zip(layouts, outs, strict=True)]


def _reference(rows: int, out: str, overrides: list[str] = ()) -> dict:
    return _run_layout(0, 1, ["parallel.ep=1", f"train.micro_batch_size={rows}", *overrides], out)


def _close(a: dict, b: dict, what: str, *, atol: float, keep=lambda k, t: None) -> int:
    """Each tensor of `a` close to `b`'s, where `keep(key, tensor)` (a mask, or None for
    all) says; returns how many elements were left out."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:6]}"
    left_out = 0
    for k in a:
        x, y, mask = a[k], b[k], keep(k, b[k])
        if mask is not None:
            left_out += int((~mask).sum())
            x, y = x[mask], y[mask]
        torch.testing.assert_close(
            x, y, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}"
        )
    return left_out


# AdamW's first update is lr * g / (|g| + eps): where |g| is nonzero but within ten eps (1e-8)
# of zero it turns on g's last bits, which a different summation order moves (one element
# in 2048 moved 8.5e-6 at |g| near eps on one CPU). There the step is not compared; the
# gradient is, everywhere.
ILL_CONDITIONED_GRAD = 1e-7


def _same_run(got: dict, ref: dict, layout: list[str]) -> None:
    _close(got["grads"], ref["grads"], f"gradient at {layout}", atol=1e-6)

    def well_conditioned(k: str, p: torch.Tensor) -> torch.Tensor | None:
        g = ref["grads"].get(k.removeprefix("model."))
        if g is None or g.shape != p.shape:
            return None
        return (g == 0) | (g.abs() >= ILL_CONDITIONED_GRAD)  # 0: no update at all

    what = f"parameter after one step at {layout}"
    skipped = _close(got["params"], ref["params"], what, atol=1e-6, keep=well_conditioned)
    total = sum(v.numel() for v in ref["params"].values())
    assert skipped < total // 1000, f"{what}: {skipped} of {total} elements not compared"
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"{layout}: step {i + 1} loss {a} vs {b}"
    assert got["norms"][0] == pytest.approx(ref["norms"][0], rel=1e-5), layout


def test_world4_layouts_match_one_process_and_checkpoint_resumes_at_other_layouts(tmp_path):
    layouts = [
        ["parallel.ep=2", "parallel.dp_shard=4", "checkpoint.every=10"],
        ["parallel.ep=4", "parallel.dp_shard=4"],
        ["parallel.ep=2", "parallel.dp_replicate=2", "parallel.dp_shard=2"],
    ]
    micro = [f"train.micro_batch_size={MICRO}"]
    outs = [str(tmp_path / f"w4-{i}") for i in range(len(layouts))]
    got = run_ranks(_layouts, 4, [[*ov, *micro] for ov in layouts], outs, timeout_s=600)[0]
    ref = _reference(4 * MICRO, str(tmp_path / "ref"))
    for layout, g in zip(layouts, got, strict=True):
        _same_run(g, ref, layout)

    # Resume the (dp_shard 4, ep 2) run from its step-10 checkpoint in one process and at
    # (dp_shard 2, ep 2): the next ten steps are the uninterrupted run's.
    saved = tmp_path / "w4-0" / "checkpoints" / "step-00000010"
    assert (saved / ".metadata").exists()
    tail = got[0]["losses"][10:]

    def resumed(out: Path) -> Path:
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(saved, out / "checkpoints" / saved.name)
        return out

    one = _resume_losses(
        0,
        1,
        ["parallel.ep=1", f"train.micro_batch_size={4 * MICRO}"],
        str(resumed(tmp_path / "r1")),
    )
    two = run_ranks(
        _resume_losses,
        2,
        ["parallel.ep=2", "parallel.dp_shard=2", f"train.micro_batch_size={2 * MICRO}"],
        str(resumed(tmp_path / "r2")),
    )[0]
    for name, curve in (("one process", one), ("dp_shard 2, ep 2", two)):
        assert len(curve) == len(tail)
        for i, (a, b) in enumerate(zip(curve, tail, strict=True)):
            assert abs(a - b) <= 1e-4 * abs(b), f"resumed in {name}: step {11 + i}: {a} vs {b}"


def _resume_losses(rank: int, world: int, overrides: list[str], out: str) -> list[float]:
    from trainer.loop import run

    cfg = _cfg(out, [*overrides, "checkpoint.every=0"])
    return run(cfg, local_rank=rank).losses


def test_world2_fsdp_and_activation_checkpointing_match_one_process(tmp_path):
    layouts = [
        ["parallel.ep=1", "parallel.dp_shard=2"],
        ["parallel.ep=2"],
        ["parallel.ep=1", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
        ["parallel.ep=2", "train.activation_checkpoint=full"],
        ["parallel.ep=2", "train.activation_checkpoint=selective"],
        ["parallel.ep=2", "parallel.reshard_after_forward=never"],
        ["parallel.ep=2", "parallel.reshard_after_forward=always"],
    ]
    micro = [f"train.micro_batch_size={MICRO}"]
    outs = [str(tmp_path / f"w2-{i}") for i in range(len(layouts))]
    got = run_ranks(_layouts, 2, [[*ov, *micro] for ov in layouts], outs, timeout_s=600)[0]
    ref = _reference(2 * MICRO, str(tmp_path / "ref"))
    for layout, g in zip(layouts, got, strict=True):
        _same_run(g, ref, layout)
    # An async save's CPU copy holds the rank's own shards: half the model's state here
    # (all of it with dp_shard 1, where every rank holds a whole replica).
    for layout, g in zip(layouts, got, strict=True):
        share = 1.0 if "parallel.dp_shard=1" in layout else 0.55
        assert g["snapshot_bytes"] <= share * ref["snapshot_bytes"], layout
    # Recompute changes nothing: the same losses to the last bit as without checkpointing.
    assert got[3]["losses"] == got[1]["losses"]
    assert got[4]["losses"] == got[1]["losses"]


@pytest.mark.parametrize(
    ("overrides", "world", "needle"),
    [
        (
            ["parallel.ep=4", "parallel.dp_shard=2"],
            None,
            "parallel.ep (4) must divide parallel.dp_shard (2)",
        ),
        (
            ["parallel.ep=2", "parallel.dp_replicate=2", "parallel.dp_shard=4"],
            4,
            "parallel.dp_replicate (2) x parallel.dp_shard (4) = 8 must equal the world size (4)",
        ),
        (
            ["parallel.ep=4", "parallel.dp_replicate=2"],
            4,
            "parallel.ep (4) must divide parallel.dp_shard (2 = world size 4 / "
            "parallel.dp_replicate 2)",
        ),
        (
            ["parallel.dp_replicate=3"],
            4,
            "world size (4) must be divisible by parallel.dp_replicate (3)",
        ),
        (["parallel.dp_shard=0"], None, "parallel.dp_shard (0) must be >= 1, or -1"),
        (
            ["parallel.ep=2", "parallel.world_size=6", "parallel.dp_replicate=2"],
            None,
            "parallel.ep (2) must divide parallel.dp_shard (3",
        ),
        (["train.activation_checkpoint=partial"], None, "train.activation_checkpoint"),
    ],
)
def test_layout_and_mode_errors_name_the_keys(overrides, world, needle):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        cfg = load_config(ROOT / "infra/runs/tiny.yaml", overrides, ignore_sections=("cluster",))
        cfg.check_world(world)
    assert needle in str(e.value)


def test_compile_without_a_compiler_fails_before_any_work(tmp_path, monkeypatch):
    from trainer.config import ConfigError
    from trainer.loop import setup

    on_cpu = ["parallel.ep=1", "train.compile=true", "train.device=cpu"]
    with pytest.raises(ConfigError, match=r"train.compile=true needs bf16 compute"):
        setup(_cfg(str(tmp_path / "fp32"), on_cpu))
    monkeypatch.setenv("PATH", str(tmp_path))  # no c++, g++ or clang++ to be found
    cfg = _cfg(str(tmp_path / "run"), [*on_cpu, "train.dtype=bf16"])
    with pytest.raises(ConfigError, match=r"train.compile=true on train.device=cpu needs a C\+\+"):
        setup(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp32").exists()


def test_compiled_blocks_train_as_eager_ones(tmp_path):
    """train.compile on the CPU (bf16 autocast, inductor): the same losses as eager, to bf16's
    precision. Compiling takes about half a minute on two cores."""
    from trainer.loop import run

    common = ["parallel.ep=1", "train.steps=2", "train.device=cpu", "train.dtype=bf16"]
    eager = run(_cfg(str(tmp_path / "eager"), common)).losses
    compiled = run(_cfg(str(tmp_path / "compiled"), [*common, "train.compile=true"])).losses
    assert compiled == pytest.approx(eager, rel=1e-3)
