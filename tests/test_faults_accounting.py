"""Exactly-once sample accounting: the ledger's arithmetic by hand, and a run that crashes
between checkpoints and resumes reports every sample consumed once, none repeated, none
skipped, and the fault-free run's losses. A resume that puts the cursor back in the wrong
place is caught as repeated or skipped samples."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dataloader.source import CorpusSource
from tests.test_checkpoint import small_cfg
from trainer.accounting import SampleLedger
from trainer.loop import run

COMMON = ("parallel.ep=1", "train.steps=12", "checkpoint.every=5", "checkpoint.async_save=false")
MB = 2  # train.micro_batch_size of small_cfg


class Crash(Exception):
    """Raised by a sink to end a run mid-way (a process dying between checkpoints)."""


class CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step == self.step:
            raise Crash(f"crash at step {step}")

    def close(self) -> None:
        pass


def test_ledger_by_hand() -> None:
    led = SampleLedger()
    for step, (a, b) in enumerate([(0, 4), (4, 8), (8, 12)], start=1):
        led.record(step=step, start=a, end=b)
    assert led.intervals == [[0, 12]] and (led.consumed, led.repeated, led.skipped) == (12, 0, 0)
    led.record(step=4, start=6, end=10)  # ids 6..9 again
    assert (led.consumed, led.repeated, led.skipped) == (16, 4, 0)
    assert led.repeated_ranges == [[4, 6, 10]]
    led.record(step=5, start=20, end=24)  # ids 12..19 never read
    assert led.intervals == [[0, 12], [20, 24]] and led.skipped == 8
    led.record(step=6, start=10, end=22)  # fills the gap, overlaps both sides by 2 each
    assert led.intervals == [[0, 24]] and led.skipped == 0 and led.repeated == 8
    led.record(step=7, start=24, end=28, trained=False)
    s = led.summary(substituted=3)
    assert s["samples_guard_skipped"] == 4 and s["guard_skipped_steps"] == [7]
    assert s["samples_substituted"] == 3 and s["samples_consumed"] == 36
    back = SampleLedger.from_state_dict(json.loads(json.dumps(led.state_dict())))
    assert back == led


def test_crash_between_checkpoints_resumes_exactly_once(tmp_path) -> None:
    straight = run(small_cfg(str(tmp_path / "straight"), *COMMON))
    assert (straight.samples_consumed, straight.samples_repeated, straight.samples_skipped) == (
        12 * MB,
        0,
        0,
    )
    out = str(tmp_path / "split")
    # Dies at step 8: steps 6..8 trained, but the newest checkpoint is step 5.
    with pytest.raises(Crash):
        run(small_cfg(out, *COMMON), sinks=[CrashAt(8)])
    resumed = run(small_cfg(out, *COMMON))
    assert resumed.losses == straight.losses[5:]  # steps 6..12, bit-identical
    assert resumed.resumes == 1 and resumed.accounting["resumed_at_steps"] == [5]
    assert resumed.samples_consumed == 12 * MB
    assert resumed.samples_repeated == 0 and resumed.samples_skipped == 0
    assert resumed.accounting["samples_end"] == 12 * MB
    written = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert written["samples_consumed"] == 12 * MB and written["samples_repeated"] == 0
    assert written["samples_skipped"] == 0 and written["resumes"] == 1


@pytest.mark.parametrize(
    ("shift", "field"), [(-3 * MB, "samples_repeated"), (2 * MB, "samples_skipped")]
)
def test_misplaced_cursor_on_resume_is_caught(
    tmp_path, monkeypatch, shift: int, field: str
) -> None:
    out = str(tmp_path / "run")
    with pytest.raises(Crash):
        run(small_cfg(out, *COMMON), sinks=[CrashAt(7)])
    real = CorpusSource.load_state_dict

    def broken(self: CorpusSource, state: dict[str, Any]) -> None:
        real(self, state)
        self.cursor += shift  # a resume bug: the cursor lands before or after the checkpoint's

    monkeypatch.setattr(CorpusSource, "load_state_dict", broken)
    summary = run(small_cfg(out, *COMMON))
    assert summary.to_dict()[field] == abs(shift)
    other = "samples_skipped" if field == "samples_repeated" else "samples_repeated"
    assert summary.to_dict()[other] == 0
