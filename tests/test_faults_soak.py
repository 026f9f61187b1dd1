"""The short soaks: random crashes and preemptions over a small CPU run in this process, and
random SIGKILLs of the workers of a real Ray run (`--ray`, the launcher on a local Ray
cluster the soak starts and stops); each report shows the faults, the restarts, no sample
lost or repeated, and the fault-free run's final loss."""

from __future__ import annotations

import json
import os

import pytest

from cluster.rss import RssSample, WorkerLife, proc_memory, rss_verdict
from cluster.soak import main
from cluster.soak_report import compare_losses, final_lineage
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


RAY_STEPS = 18
RAY_MB = 4  # the tiny preset's micro_batch_size


@pytest.mark.slow
def test_ray_soak_kills_workers_and_matches_fault_free(tmp_path, capsys) -> None:
    out = tmp_path / "ray"
    rc = main(
        [
            "--ray",
            "--out",
            str(out),
            "--steps",
            str(RAY_STEPS),
            "--workers",
            "2",
            "--faults",
            "kill",
            "--mean-gap",
            "1",
            "--max-faults",
            "2",
            "--seed",
            "1",
            "--rss-every",
            "0.5",
            # The fault-free run goes at the same time, on CPUs of its own.
            "--reference",
            "alongside",
            "data.corpus_max_bytes=100000",
            "checkpoint.every=3",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    report = json.loads((out / "soak_report.json").read_text())
    assert "faults injected" in printed.out and "kill" in printed.out

    kills = report["faults"].get("kill", 0)
    assert kills > 0 and set(report["faults"]) == {"kill"}
    assert report["restarts"] == kills
    assert report["steps"] == RAY_STEPS
    assert report["samples_consumed"] == RAY_STEPS * RAY_MB * 2
    assert report["samples_repeated"] == 0 and report["samples_skipped"] == 0
    assert report["final_loss"] == pytest.approx(report["reference_loss"], rel=1e-6)
    assert report["loss_curve"]["steps_compared"] == RAY_STEPS

    # Each fault killed a worker of a different group, by the pid in placement.json, and
    # each group was sampled under its own pids: kills + 1 groups of 2 workers.
    killed = [f["pid"] for f in report["fault_log"]]
    assert len(set(killed)) == kills
    assert [f["lineage"] for f in report["fault_log"]] == list(range(kills))
    workers = report["rss"]["workers"]
    assert {w["group"] for w in workers} == set(range(kills + 1))
    assert {(w["group"], w["rank"]) for w in workers} == {
        (g, r) for g in range(kills + 1) for r in (0, 1)
    }
    assert set(killed) <= {w["pid"] for w in workers}
    assert os.getpid() not in {w["pid"] for w in workers}
    assert all(w["rss_peak_mib"] >= w["rss_last_quarter_mib"] > 0 for w in workers)
    lines = (out / "rss_samples.jsonl").read_text().splitlines()
    assert len(lines) == sum(w["samples"] for w in workers) + sum(
        w["samples"] for w in report["rss_reference"]["workers"]
    )


def test_ray_soak_rejects_in_process_kinds(tmp_path, capsys) -> None:
    assert main(["--ray", "--out", str(tmp_path / "a"), "--steps", "5", "--faults", "crash"]) == 2
    assert "unknown kind(s) ['crash']" in capsys.readouterr().err
    assert main(["--ray", "--out", str(tmp_path / "b"), "--steps", "5", "--workers", "0"]) == 2
    assert "--workers (0) must be >= 1" in capsys.readouterr().err
    rc = main(["--ray", "--out", str(tmp_path / "c"), "--steps", "5", "checkpoint.every=0"])
    assert rc == 2
    assert "checkpoint.every must be > 0" in capsys.readouterr().err


def test_final_lineage_keeps_each_steps_last_attempt() -> None:
    # Attempt 0 logged steps 1-5 and died; attempt 1 resumed from the checkpoint at 3.
    records = [{"step": s, "restarts": 0, "lm_loss": 10.0 - s} for s in range(1, 6)]
    records += [{"step": s, "restarts": 1, "lm_loss": 20.0 - s} for s in range(4, 7)]
    lineage = final_lineage(records)
    assert [lineage[s]["restarts"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    reference = {s: {"lm_loss": 10.0 - s} for s in range(1, 7)}
    cmp = compare_losses(lineage, reference)
    assert cmp["steps_compared"] == 6 and not cmp["bit_identical"]
    assert cmp["max_abs_diff"] == 10.0
    same = compare_losses(final_lineage(records[:3]), reference)
    assert same["bit_identical"] and same["max_abs_diff"] == 0.0 and same["steps_compared"] == 3


def _life(group: int, rss_mib: list[float], *, lineage: int | None = None) -> WorkerLife:
    mib = 2**20
    life = WorkerLife(rank=0, pid=100 + group, group=group)
    for i, r in enumerate(rss_mib):
        life.samples.append(
            RssSample(
                t=60.0 * i,
                step=i,
                lineage=group if lineage is None else lineage,
                rss=int(r * mib),
                hwm=int(max(rss_mib[: i + 1]) * mib),
            )
        )
    return life


def test_rss_verdict_judges_growth_within_each_worker_lifetime() -> None:
    flat = _life(0, [500, 500, 501, 500, 500, 501, 500, 501])
    # 8 samples a minute apart: quarters of 2, medians 400 and 440: +40 MiB (+10 %); the
    # second half (420, 430, 440, 440) rises by 7 MiB a minute (least squares).
    leak = _life(1, [400, 400, 410, 420, 420, 430, 440, 440])
    short = _life(2, [300, 900])  # too few samples to judge, but its peak counts
    report = rss_verdict([flat, leak, short], min_samples=8, tolerance_pct=5.0)
    rows = {w["group"]: w for w in report["workers"]}
    assert rows[1]["rss_first_quarter_mib"] == 400 and rows[1]["rss_last_quarter_mib"] == 440
    assert rows[1]["growth_mib"] == 40 and rows[1]["growth_pct"] == 10.0
    assert rows[1]["slope_second_half_mib_per_min"] == pytest.approx(7.0)
    assert rows[0]["growth_mib"] == 0.5 and rows[0]["judged"] and not rows[2]["judged"]
    v = report["verdict"]
    assert v["growth"] is True and v["max_growth_worker"]["pid"] == leak.pid
    assert (v["max_growth_mib"], v["max_growth_pct"]) == (40, 10.0)
    assert v["rss_peak_mib"] == 900 and v["judged_lifetimes"] == 2
    assert rss_verdict([flat], min_samples=8, tolerance_pct=5.0)["verdict"]["growth"] is False
    assert rss_verdict([short], min_samples=8, tolerance_pct=5.0)["verdict"]["growth"] is None
    # Samples taken before the worker's group logged a step (setup) are left out.
    setup = _life(3, [100, 100, 100], lineage=2)
    setup.samples += _life(3, [500] * 8).samples
    assert rss_verdict([setup], min_samples=8, tolerance_pct=5.0)["workers"][0]["growth_mib"] == 0


def test_proc_memory_reads_this_process_and_none_for_a_dead_one() -> None:
    rss, hwm = proc_memory(os.getpid())
    assert 0 < rss <= hwm
    assert proc_memory(2**22 + 1) is None  # above the kernel's pid limit
