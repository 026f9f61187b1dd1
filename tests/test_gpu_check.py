"""bench/gpu_check.py's CPU-checkable parts: the profile classifier, the table printer, the
arguments, and the whole script run small on the CPU (`--cpu-smoke`), so that it arrives on
a GPU machine working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


@pytest.mark.parametrize(
    ("chain", "kind"),
    [
        (["aten::_grouped_mm", "aten::to"], "expert GEMMs"),
        (
            ["aten::_grouped_mm", "GroupedMmBackward0", "autograd::engine::evaluate_function: X"],
            "expert GEMMs",
        ),
        (["aten::mm", "aten::linear", "## forward ##"], "other GEMMs"),
        (["aten::addmm", "AddmmBackward0"], "other GEMMs"),
        (
            ["aten::_scaled_dot_product_flash_attention", "aten::scaled_dot_product_attention"],
            "attention",
        ),
        (
            ["aten::_efficient_attention_backward", "ScaledDotProductEfficientAttentionBackward0"],
            "attention",
        ),
        (["aten::index_select", "aten::embedding_bag"], "permutation and combine"),
        (["aten::sort", "aten::argsort"], "permutation and combine"),
        (["aten::copy_", "aten::scatter_add_"], "permutation and combine"),
        (["moeyard::ep_dispatch"], "permutation and combine"),
        (["_combine_fwd_kernel", "moeyard::combine"], "permutation and combine"),
        (["aten::index_select", "moeyard::combine_backward"], "permutation and combine"),
        (["_swiglu_fwd_kernel", "moeyard::swiglu"], "the rest"),
        (["aten::_fused_adamw_", "Optimizer.step#AdamW.step"], "optimizer"),
        (["aten::mul_", "aten::_foreach_mul_"], "optimizer"),
        # A context owns what runs in it, GEMM-like or not.
        (
            ["aten::copy_", "FSDP::all_gather_copy_out", "FSDP::pre_forward"],
            "weight casts, FSDP copies and collectives",
        ),
        (["aten::mm", "FSDP::post_backward_reduce"], "weight casts, FSDP copies and collectives"),
        (["ncclDevKernel_ReduceScatter_Sum_f32"], "weight casts, FSDP copies and collectives"),
        (["aten::_foreach_copy_"], "weight casts, FSDP copies and collectives"),
        (["aten::silu", "aten::mul"], "the rest"),
        (["aten::add_"], "the rest"),
    ],
)
def test_classifier(chain, kind):
    assert gpu_check.classify(chain) == kind


def test_breakdown_counts_each_events_own_time_once_under_its_parents_kind():
    root = SimpleNamespace(
        name="Optimizer.step#AdamW.step", cpu_parent=None, self_device_time_total=0.0
    )
    opt = SimpleNamespace(name="aten::_fused_adamw_", cpu_parent=root, self_device_time_total=50.0)
    lin = SimpleNamespace(name="aten::linear", cpu_parent=None, self_device_time_total=0.0)
    mm = SimpleNamespace(name="aten::mm", cpu_parent=lin, self_device_time_total=30.0)
    cast = SimpleNamespace(name="aten::copy_", cpu_parent=lin, self_device_time_total=5.0)
    lone = SimpleNamespace(
        name="void elementwise_kernel", cpu_parent=None, self_device_time_total=7.0
    )
    out = gpu_check.breakdown([root, opt, lin, mm, cast, lone], time_attr="self_device_time_total")
    assert set(out) == set(gpu_check.KINDS)
    assert out["optimizer"] == 50.0 and out["other GEMMs"] == 30.0 and out["the rest"] == 12.0
    assert sum(out.values()) == 92.0


def test_table_printer():
    text = gpu_check.format_table(
        ["run", "ms", "ok"],
        [{"run": "a", "ms": 1234.5678, "ok": True}, {"run": "longer name", "ms": 0.012345}],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["run", "ms", "ok"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a", "1235", "yes"]
    assert lines[3].split() == ["longer", "name", "0.0123", "-"]
    assert len({len(line.rstrip()) <= len(lines[1]) for line in lines}) == 1


def test_arguments(capsys, monkeypatch):
    monkeypatch.setenv("OUT", "/somewhere")
    args = gpu_check.parse_args([])
    assert args.parts == list(gpu_check.PARTS) and args.out == "/somewhere"
    args = gpu_check.parse_args(["--parts", "steps, profile", "--out", "x"])
    assert args.parts == ["steps", "profile"] and args.out == "x"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "steps,speed"])
    assert "--parts: speed not among" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "0"])


def test_no_gpu_exits_with_a_message(tmp_path, capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_step_specs_cover_what_the_issue_asks():
    specs = gpu_check.STEP_SPECS
    for preset, layers in ((gpu_check.MIXTRAL, 2), (gpu_check.DSV2L, 4)):
        assert {s.ac for s in specs if s.preset == preset and s.layers == layers} == {
            "none",
            "selective",
            "full",
        }
        assert any(s.compile for s in specs if s.preset == preset)
    assert {s.fsdp for s in specs if s.preset == gpu_check.MIXTRAL} == {True, False}
    assert any(s.preset == gpu_check.M100 for s in specs)
    # The headline runs come first, before the budget can stop the list.
    assert specs[0] == gpu_check.StepSpec(gpu_check.MIXTRAL, 2, True, "selective", syncs=True)


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--cpu-smoke",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in res["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    assert "gpu_check --cpu-smoke" in (tmp_path / "gpu_check.log").read_text()
    (profile,) = res["parts"]["profile"]["tables"].values()
    ms = {row["kind"]: row["ms"] for row in profile["rows"]}
    # A real profile of an FSDP step: every kind but the catch-all is found in it.
    for kind in gpu_check.KINDS:
        assert ms[kind] > 0, (kind, ms)
    (steps,) = res["parts"]["steps"]["tables"].values()
    assert len(steps["rows"]) == len(gpu_check.SMOKE_SPECS)
    assert all(row.get("tokens/s", 0) > 0 and "error" not in row for row in steps["rows"])
    layer_rows = [t["rows"] for t in res["parts"]["moe_layer"]["tables"].values()]
    assert len(layer_rows) == 2
    for rows in layer_rows:
        names = {row["layer"] for row in rows}
        assert {
            "dense-active",
            "moeyard",
            "moeyard, legacy layer",
            "transformers Mixtral block",
        } <= names


@pytest.mark.parametrize(
    ("message", "counted"),
    [
        ("called a synchronizing CUDA operation", True),
        # Said once per process by the first set_sync_debug_mode call: no sync, and the one
        # "first-call sync" the first H200 run counted.
        (
            "Synchronization debug mode is a prototype feature and does not yet detect all "
            "synchronizing operations",
            False,
        ),
        ("some other warning", False),
    ],
)
def test_only_sync_debug_modes_report_counts_as_a_sync(message, counted):
    assert gpu_check.is_sync_warning(message) is counted
