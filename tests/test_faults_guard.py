"""The loss guard, rehearsed through the `faults.*` config hook (trainer/fault_hook.py): an
injected non-finite or spiking loss is skipped (no update) and counted; max_bad_steps of them
in a row stop the run naming why, or (`train.on_bad_steps=rollback`) reload the newest
checkpoint and go on with the data after the bad batches. The sample ledger shows the skipped
samples as what they are, nothing repeated, nothing lost; a step is injected on its first pass
only, so a rollback or a restart gets past it. Bad `faults.*` values are ConfigErrors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.loop as loop
from ops.sinks import read_metrics
from tests.distributed import run_ranks
from tests.test_checkpoint import PRESET, small_cfg
from trainer.config import ConfigError, load_config
from trainer.fault_hook import RECORD
from trainer.guard import TrainingDiverged

MB = 2  # samples per step: micro_batch_size 2, grad_accum 1, one rank
COMMON = (
    "parallel.ep=1",
    "train.steps=12",
    "train.max_bad_steps=2",
    "train.on_bad_steps=rollback",
    "checkpoint.async_save=false",
)
INJECTED = "fault injected by config at step {}"


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# --- skip -----------------------------------------------------------------------------------


def test_one_injected_nan_step_is_skipped_without_an_update(tmp_path) -> None:
    cfg = small_cfg(str(tmp_path / "step"), "parallel.ep=1", "faults.nonfinite_loss_steps=[3]")
    state = loop.setup(cfg)
    for _ in range(2):
        assert not bool(loop.train_step(state)["skipped"])
    before, opt_steps = _params(state.model), state.optimizer.state_dict()["state"][0]["step"]
    lr_before = state.scheduler.get_last_lr()
    m = loop.train_step(state)  # step 3: injected
    assert bool(m["skipped"]) and not torch.isfinite(m["lm_loss"])
    after = _params(state.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step updated weights"
    assert state.optimizer.state_dict()["state"][0]["step"] == opt_steps
    assert state.scheduler.get_last_lr() == lr_before
    assert state.faults is not None and state.faults.count == 1
    m = loop.train_step(state)  # step 4 trains again
    assert not bool(m["skipped"]) and torch.isfinite(m["lm_loss"])
    assert not all(torch.equal(after[k], v) for k, v in _params(state.model).items())
    state.source.close()


def test_skipped_step_is_counted_logged_and_accounted(tmp_path, capsys) -> None:
    out = tmp_path / "skip"
    s = loop.run(small_cfg(str(out), *COMMON, "faults.nonfinite_loss_steps=[5]"))
    said = capsys.readouterr().out
    assert said.count("fault injected by config") == 1
    assert INJECTED.format(5) + ": loss made non-finite" in said
    assert "a rehearsal, not a real divergence" in said
    assert "warning: step 5 skipped: non-finite loss (nan)" in said
    assert s.steps == 12 and s.faults_injected == 1
    # The skipped step read its samples (8-9): a guard skip, not a loss, not a repeat.
    assert s.samples_guard_skipped == MB and s.accounting["guard_skipped_steps"] == [5]
    assert (s.samples_repeated, s.samples_skipped, s.samples_policy_skipped) == (0, 0, 0)
    assert s.samples_consumed == 12 * MB == s.accounting["samples_end"]
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [r["step"] for r in records if r["step_skipped"]] == [5]
    assert [r["faults_injected"] for r in records] == [0] * 4 + [1] * 8
    assert json.loads((out / "summary.json").read_text())["faults_injected"] == 1
    assert json.loads((out / RECORD).read_text()) == {
        "injected": [{"step": 5, "kind": "nonfinite_loss"}]
    }


def test_injected_spike_is_caught_by_the_spike_check(tmp_path, capsys) -> None:
    s = loop.run(
        small_cfg(
            str(tmp_path / "spike"),
            *COMMON,
            "train.spike_factor=3",
            "faults.loss_spike_steps=[4]",
            "faults.loss_spike_factor=20",
        )
    )
    said = capsys.readouterr().out
    assert INJECTED.format(4) + ": loss multiplied by faults.loss_spike_factor (20)" in said
    assert "warning: step 4 skipped: loss" in said and "x its running mean" in said
    assert s.steps == 12 and s.faults_injected == 1 and s.samples_guard_skipped == MB
    assert s.losses[3] > 10 * s.losses[2]  # the logged loss shows the spike


def test_runs_without_faults_report_none(tmp_path) -> None:
    out = tmp_path / "clean"
    s = loop.run(small_cfg(str(out), *COMMON, "train.steps=3"))
    assert s.faults_injected == 0 and not (out / RECORD).exists()
    assert all("faults_injected" not in r for r in read_metrics(str(out / "metrics.jsonl")))


# --- abort, and the restart that gets past the injected steps ------------------------------


def test_abort_after_max_bad_steps_then_restart_is_not_injected_again(tmp_path, capsys) -> None:
    out = str(tmp_path / "abort")
    args = (
        "parallel.ep=1",
        "train.steps=10",
        "train.max_bad_steps=3",
        "checkpoint.every=4",
        "checkpoint.async_save=false",
        "faults.nonfinite_loss_steps=[5,6,7]",
    )
    with pytest.raises(TrainingDiverged) as e:
        loop.run(small_cfg(out, *args))
    assert "3 steps in a row were skipped (last at step 7: non-finite loss" in str(e.value)
    assert "train.on_bad_steps=rollback" in str(e.value)  # what to do about it
    said = capsys.readouterr().out
    assert [said.count(INJECTED.format(n)) for n in (5, 6, 7)] == [1, 1, 1]
    # The same command again (as a launcher's restart would run it): it resumes from step 4
    # and trains steps 5-7 again, this time without injection.
    s = loop.run(small_cfg(out, *args))
    said = capsys.readouterr().out
    assert "fault injected by config" not in said and "skipped" not in said
    assert s.steps == 10 and s.resumes == 1 and s.accounting["resumed_at_steps"] == [4]
    assert s.faults_injected == 3  # the record counts the first attempt's injections
    # The first attempt's steps 5-7 died with it: re-training them is resume, not a repeat.
    assert (s.samples_repeated, s.samples_skipped, s.samples_guard_skipped) == (0, 0, 0)
    assert s.samples_consumed == 10 * MB == s.accounting["samples_end"]


# --- rollback -------------------------------------------------------------------------------


def test_rollback_skips_the_bad_batches_and_reports_them(tmp_path, capsys) -> None:
    s = loop.run(
        small_cfg(
            str(tmp_path / "rb"), *COMMON, "checkpoint.every=4", "faults.nonfinite_loss_steps=[6,7]"
        )
    )
    said = capsys.readouterr().out
    assert "rollback 1/3" in said and "back to the checkpoint of step 4" in said
    # Steps 6 and 7 come again after the rollback, on later data, and are not injected again.
    assert [said.count(INJECTED.format(n)) for n in (6, 7)] == [1, 1]
    assert s.steps == 12 and s.resumes == 1 and s.faults_injected == 2
    # Steps 1-4 (samples 0-7) survive; 5-7 of the first pass (samples 8-13) are passed
    # over; steps 5-12 of the second pass train samples 14-29.
    assert s.samples_policy_skipped == 3 * MB
    assert s.accounting["samples_end"] == 15 * MB
    assert s.samples_consumed == 12 * MB
    assert (s.samples_repeated, s.samples_skipped, s.samples_guard_skipped) == (0, 0, 0)
    assert all(x == x for x in s.losses[-8:])  # finite after the rollback


def test_rollback_without_checkpoint_fails_clearly(tmp_path) -> None:
    with pytest.raises(TrainingDiverged, match="found no complete checkpoint to roll back to"):
        loop.run(
            small_cfg(
                str(tmp_path / "none"),
                *COMMON,
                "checkpoint.every=0",
                "faults.nonfinite_loss_steps=[3,4]",
            )
        )


# --- two ranks ------------------------------------------------------------------------------


def _two_rank_weights(rank: int, world: int, out: str) -> dict[str, Any]:
    # Two replicas (dp_replicate 2: each rank holds the whole model), so that their weights
    # can be compared.
    cfg = small_cfg(
        out,
        "parallel.ep=1",
        "parallel.dp_replicate=2",
        "train.steps=6",
        "faults.nonfinite_loss_steps=[3]",
    )
    said = io.StringIO()
    seen: list[bool] = []
    real = loop.train_step

    def step(state: loop.RunState) -> dict[str, torch.Tensor]:
        m = real(state)
        seen.append(bool(m["skipped"]))
        if state.step == cfg.train.steps:
            box["weights"] = [
                p.to_local().detach().double().sum().item() for p in state.model.parameters()
            ]
        return m

    box: dict[str, Any] = {}
    # Observes each step's decision on this rank; a spawned process: nothing else runs here.
    loop.train_step = step
    with contextlib.redirect_stdout(said):
        s = loop.run(cfg)
    return {"summary": s.to_dict(), "said": said.getvalue(), "skipped": seen, **box}


def test_two_ranks_skip_the_injected_step_together(tmp_path) -> None:
    r0, r1 = run_ranks(_two_rank_weights, 2, str(tmp_path / "two"))
    assert r0["skipped"] == r1["skipped"] == [False, False, True, False, False, False]
    assert r0["weights"] == r1["weights"]  # replicas stayed identical: both skipped, or none
    for r in (r0, r1):
        s = r["summary"]
        assert s["steps"] == 6 and s["faults_injected"] == 1 and s["world_size"] == 2
        # One step of both ranks' samples is a guard skip; nothing lost or repeated.
        assert s["samples_guard_skipped"] == 2 * MB
        assert (s["samples_repeated"], s["samples_skipped"]) == (0, 0)
    assert r0["said"].count(INJECTED.format(3)) == 1  # one line, from rank 0
    assert "fault injected" not in r1["said"]


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("faults.nonfinite_loss_steps=[0]", "faults.nonfinite_loss_steps ([0]) holds 0"),
        ("faults.loss_spike_steps=[-3]", "faults.loss_spike_steps ([-3]) holds -3"),
        (
            "faults.nonfinite_loss_steps=[51]",
            "faults.nonfinite_loss_steps holds step(s) [51] beyond train.steps (50)",
        ),
        ("faults.nonfinite_loss_steps=[4,4]", "holds step 4, which is already in"),
        ("faults.loss_spike_factor=1", "faults.loss_spike_factor (1.0) must be"),
        ("faults.nonfinite_loss_steps=7", "faults.nonfinite_loss_steps"),
        ("faults.nonfinite_loss_steps=[two]", "faults.nonfinite_loss_steps"),
        ("faults.nonfinite_loss_steps={a: 1}", "'faults.nonfinite_loss_steps={a: 1}': a value"),
    ],
)
def test_bad_fault_values_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(PRESET, [override], ignore_sections=("cluster",))
    assert message in str(e.value)


def test_one_step_in_both_lists_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"step 3, which is already in faults.nonfinite_loss"):
        load_config(
            PRESET,
            ["faults.nonfinite_loss_steps=[3]", "faults.loss_spike_steps=[3]"],
            ignore_sections=("cluster",),
        )


def test_faults_load_from_a_preset_and_on_the_cluster_launcher(tmp_path: Path) -> None:
    from cluster.config import load_launch_config

    preset = tmp_path / "rehearse.yaml"
    preset.write_text(
        Path(PRESET).read_text() + "faults:\n  nonfinite_loss_steps: [10, 11]\n"
        "  loss_spike_steps: [20]\n  loss_spike_factor: 5\n"
    )
    cfg = load_config(preset, ignore_sections=("cluster",))
    assert (cfg.faults.nonfinite_loss_steps, cfg.faults.loss_spike_steps) == ([10, 11], [20])
    assert cfg.faults.loss_spike_factor == 5.0
    launch = load_launch_config(preset, ["faults.nonfinite_loss_steps=[30]"])
    assert launch.faults.nonfinite_loss_steps == [30] and launch.faults.loss_spike_steps == [20]
    with pytest.raises(
        ConfigError,
        match=r"faults.nonfinite_loss_steps holds step\(s\) \[10, 11\] beyond train.steps \(8\)",
    ):
        load_launch_config(preset, ["train.steps=8"])


# --- the soak's `nan` faults go through the same hook ---------------------------------------


def test_soak_nan_faults_use_the_config_hook(tmp_path, capsys) -> None:
    from cluster.soak import main
    from tests.test_checkpoint import SMALL

    out = tmp_path / "soak"
    argv = ["--out", str(out), "--steps", "10", "--faults", "nan", "--mean-gap", "2"]
    assert main([*argv, "--seed", "2", "--json", *SMALL, "checkpoint.every=5"]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "soak-report.json").read_text())
    steps = [r["step"] for r in json.loads((out / "soak" / RECORD).read_text())["injected"]]
    assert report["faults"]["nan"] >= len(steps) >= 2  # the last may fall after step 10
    assert said.count("fault injected by config") == len(steps)
    assert report["samples_guard_skipped"] == len(steps) * MB
    assert (report["samples_repeated"], report["samples_skipped"]) == (0, 0)
    assert loop.F.cross_entropy is torch.nn.functional.cross_entropy  # nothing patched
