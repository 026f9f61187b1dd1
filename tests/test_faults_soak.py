"""The short soak: random crashes and preemptions over a small CPU run; the report shows the
faults, the restarts, no sample lost or repeated, and the fault-free run's final loss."""

from __future__ import annotations

import json

from cluster.soak import main
from tests.test_checkpoint import SMALL

STEPS = 24
MB = 2  # SMALL's micro_batch_size


def test_short_soak_loses_nothing_and_matches_fault_free(tmp_path, capsys) -> None:
    out = tmp_path / "soak"
    rc = main(
        [
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--faults",
            "crash,preempt",
            "--mean-gap",
            "4",
            "--seed",
            "3",
            "--json",
            *SMALL,
            "checkpoint.every=4",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "soak-report.json").read_text())
    assert json.loads(printed[printed.index("{\n") :])["restarts"] == report["restarts"]
    assert sum(report["faults"].values()) >= 2 and report["restarts"] >= 2
    assert report["steps"] == STEPS
    assert report["samples_consumed"] == STEPS * MB
    assert report["samples_repeated"] == 0 and report["samples_skipped"] == 0
    assert report["final_loss"] == report["reference_loss"]
    assert report["rss_peak_mib"] > 0 and len(report["rss_samples"]) >= STEPS


def test_soak_rejects_bad_arguments(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path / "a"), "--steps", "5", "--faults", "meteor"]) == 2
    assert "unknown kind(s) ['meteor']" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "b")]) == 2
    assert "exactly one of --minutes and --steps" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "c"), "--steps", "5", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
