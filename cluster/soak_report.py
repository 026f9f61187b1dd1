"""What a soak reports: the in-process soak's figures (`SoakReport`), the Ray soak's table,
and the loss-curve comparison of a faulty run's final lineage against the fault-free run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SoakReport:
    steps: int
    wall_s: float
    faults: dict[str, int]
    restarts: int
    samples_consumed: int
    samples_repeated: int
    samples_skipped: int
    samples_guard_skipped: int
    final_loss: float
    reference_loss: float
    rss_first_quarter_mib: float
    rss_last_quarter_mib: float
    rss_peak_mib: float
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "rss_samples"}

    def table(self) -> str:
        diff = abs(self.final_loss - self.reference_loss)
        rows = [
            ("steps", f"{self.steps}"),
            ("wall time", f"{self.wall_s / 60:.1f} min"),
            ("faults injected", ", ".join(f"{k} {v}" for k, v in self.faults.items()) or "none"),
            ("restarts (resumes)", f"{self.restarts}"),
            ("samples consumed", f"{self.samples_consumed}"),
            ("samples repeated", f"{self.samples_repeated}"),
            ("samples skipped (lost)", f"{self.samples_skipped}"),
            ("samples skipped by the loss guard", f"{self.samples_guard_skipped}"),
            (
                "RSS first quarter / last quarter",
                f"{self.rss_first_quarter_mib:.0f} MiB / {self.rss_last_quarter_mib:.0f} MiB",
            ),
            ("RSS peak", f"{self.rss_peak_mib:.0f} MiB"),
            ("final loss (soak)", f"{self.final_loss:.6f}"),
            ("final loss (fault-free, same seed)", f"{self.reference_loss:.6f}"),
            ("difference", f"{diff:.3g}"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def final_lineage(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Step -> the record of the attempt the final model descends from. An attempt after a
    restart logs again the steps after the checkpoint it resumed from, so the last record
    of each step (in file order) is the one that counts."""
    return {int(r["step"]): r for r in records if "step" in r}


def compare_losses(
    run: dict[int, dict[str, Any]], reference: dict[int, dict[str, Any]], key: str = "lm_loss"
) -> dict[str, Any]:
    """Per-step `key` of two lineages: the steps both logged, the largest |difference| and
    whether every value is bit-identical."""
    steps = sorted(set(run) & set(reference))
    diffs = [abs(float(run[s][key]) - float(reference[s][key])) for s in steps]
    return {
        "key": key,
        "steps_compared": len(steps),
        "steps_run": len(run),
        "steps_reference": len(reference),
        "max_abs_diff": max(diffs, default=0.0),
        "bit_identical": bool(steps) and all(run[s][key] == reference[s][key] for s in steps),
    }


def ray_report_table(r: dict[str, Any]) -> str:
    loss, rss = r["loss_curve"], r["rss"]["verdict"]
    faults = ", ".join(f"{k} {v}" for k, v in r["faults"].items()) or "none"
    rows = [
        ("mode", f"Ray, {r['workers']} workers, seed {r['seed']}"),
        ("faulty run", f"{r['minutes']:.1f} min, {r['steps']} steps"),
        ("fault-free run", f"{r['reference_minutes']:.1f} min"),
        ("faults injected", faults),
        ("restarts (worker groups started again)", f"{r['restarts']}"),
        (
            "faults between checkpoints",
            f"{r['faults_between_checkpoints']} ({r['steps_trained_again']} steps trained again)",
        ),
        ("samples consumed", f"{r['samples_consumed']}"),
        ("samples repeated", f"{r['samples_repeated']}"),
        ("samples skipped (lost)", f"{r['samples_skipped']}"),
        ("final loss (soak)", f"{r['final_loss']:.6f}"),
        ("final loss (fault-free, same seed)", f"{r['reference_loss']:.6f}"),
        (
            f"{loss['key']} per step vs fault-free",
            f"{loss['steps_compared']} steps, max |diff| {loss['max_abs_diff']:.3g}, "
            f"bit-identical: {loss['bit_identical']}",
        ),
        (
            "worker lifetimes (judged)",
            f"{rss['lifetimes']} ({rss['judged_lifetimes']} with >= {rss['min_samples']} "
            "samples while training)",
        ),
        ("RSS peak (VmHWM), any worker", f"{rss['rss_peak_mib']:.0f} MiB"),
    ]
    if rss["judged_lifetimes"]:
        lg = rss["longest_lifetime"]
        rows += [
            (
                "RSS growth within a lifetime, max",
                f"{rss['max_growth_mib']:+.1f} MiB ({rss['max_growth_pct']:+.2f} %); "
                f"growth over {rss['tolerance_pct']:g} %: {rss['growth']}",
            ),
            (
                "longest lifetime",
                f"rank {lg['rank']} pid {lg['pid']}: {lg['lifetime_s'] / 60:.1f} min, "
                f"{lg['growth_mib']:+.1f} MiB ({lg['growth_pct']:+.2f} %), second half "
                f"{lg['slope_second_half_mib_per_min']:+.2f} MiB/min, peak {lg['rss_peak_mib']:.0f} MiB",
            ),
        ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("per worker lifetime (group rank pid: minutes, RSS q1 -> q4 median, peak):")
    lines += [
        f"  {x['group']} {x['rank']} {x['pid']}: {x['lifetime_s'] / 60:.1f} min, "
        f"{x['rss_first_quarter_mib']:.0f} -> {x['rss_last_quarter_mib']:.0f} MiB "
        f"({x['growth_mib']:+.1f}), peak {x['rss_peak_mib']:.0f} MiB"
        + ("" if x["judged"] else " (too short to judge)")
        for x in r["rss"]["workers"]
    ]
    return "\n".join(lines)
