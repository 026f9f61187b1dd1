"""The loss guard's rollback option: N bad steps in a row reload the newest checkpoint and go
on with the data after the bad batches. The sample ledger shows the passed-over samples as a
policy skip, nothing repeated, nothing lost; without a checkpoint the run stops naming why."""

from __future__ import annotations

import pytest
import torch

import trainer.loop as loop
from tests.test_checkpoint import small_cfg
from trainer.guard import TrainingDiverged

MB = 2
COMMON = (
    "parallel.ep=1",
    "train.steps=12",
    "train.max_bad_steps=2",
    "train.on_bad_steps=rollback",
    "checkpoint.async_save=false",
)


def poison(monkeypatch, calls_to_poison: set[int]) -> None:
    """Makes the loss of the given forward passes (1-based, one per step here) NaN."""
    real = loop.F.cross_entropy
    n = {"calls": 0}

    def poisoned(*args, **kwargs):
        n["calls"] += 1
        out = real(*args, **kwargs)
        return out * torch.nan if n["calls"] in calls_to_poison else out

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)


def test_rollback_skips_the_bad_batches_and_reports_them(tmp_path, monkeypatch, capsys) -> None:
    poison(monkeypatch, {6, 7})  # steps 6 and 7 of the first pass
    s = loop.run(small_cfg(str(tmp_path / "rb"), *COMMON, "checkpoint.every=4"))
    said = capsys.readouterr().out
    assert "rollback 1/3" in said and "back to the checkpoint of step 4" in said
    assert s.steps == 12 and s.resumes == 1
    # Steps 1-4 (samples 0-7) survive; 5-7 of the first pass (samples 8-13) are passed
    # over; steps 5-12 of the second pass train samples 14-29.
    assert s.samples_policy_skipped == 3 * MB
    assert s.accounting["samples_end"] == 15 * MB
    assert s.samples_consumed == 12 * MB
    assert (s.samples_repeated, s.samples_skipped, s.samples_guard_skipped) == (0, 0, 0)
    assert all(x == x for x in s.losses[-8:])  # finite after the rollback


def test_rollback_without_checkpoint_fails_clearly(tmp_path, monkeypatch) -> None:
    poison(monkeypatch, {3, 4})
    with pytest.raises(TrainingDiverged, match="found no complete checkpoint to roll back to"):
        loop.run(small_cfg(str(tmp_path / "none"), *COMMON, "checkpoint.every=0"))
