"""Resident memory of processes, sampled for the soak's leak check.

`rss_bytes` reads this process (the in-process soak); `proc_memory` reads another one by
pid (the Ray soak's workers). A worker group that restarts brings new processes, so growth
is judged within each process's lifetime (`WorkerLife`, `rss_verdict`): the first- against
the last-quarter median of its samples while its group trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 2**20


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def proc_memory(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of a live process in bytes, from /proc/PID/status; None when the
    process is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("State", "VmRSS", "VmHWM"):
            fields[key] = value.split()
    if fields.get("State", ["Z"])[0] in ("Z", "X") or not fields.get("VmRSS"):
        return None
    rss = int(fields["VmRSS"][0]) * 1024
    hwm = int(fields.get("VmHWM", fields["VmRSS"])[0]) * 1024
    return rss, hwm


def _median(xs: list[int]) -> float:
    s = sorted(xs)
    n = len(s)
    return float(s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def _slope_mib_per_min(points: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute (0 with fewer than 2 points)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mt) * (r - mr) for t, r in points)
    return cov / var * 60 / MIB


@dataclass
class RssSample:
    t: float  # seconds since the soak's run started
    step: int  # the newest step the run had logged
    lineage: int  # the run's restart count at that time
    rss: int
    hwm: int


@dataclass
class WorkerLife:
    """One worker process (a world rank and a pid): its RSS from its first sample to its
    death. A restarted worker group has new processes, so each lifetime is judged alone."""

    rank: int
    pid: int
    group: int  # which worker group (0: the first; n: after n restarts)
    samples: list[RssSample] = field(default_factory=list)

    def summary(self, *, min_samples: int) -> dict[str, Any]:
        """First- and last-quarter medians of RSS, taken over the samples after its group
        logged its first step (setup, model build and data load come before), the peak
        (VmHWM, over its whole life) and the slope over the second half."""
        train = [s for s in self.samples if s.lineage >= self.group] or self.samples
        rss = [s.rss for s in train]
        q = max(1, len(rss) // 4)
        first, last = _median(rss[:q]), _median(rss[-q:])
        half = train[len(train) // 2 :]
        return {
            "rank": self.rank,
            "pid": self.pid,
            "group": self.group,
            "start_s": round(self.samples[0].t, 1),
            "end_s": round(self.samples[-1].t, 1),
            "lifetime_s": round(self.samples[-1].t - self.samples[0].t, 1),
            "steps": [train[0].step, train[-1].step],
            "samples": len(self.samples),
            "samples_training": len(train),
            "judged": len(train) >= min_samples,
            "rss_first_quarter_mib": round(first / MIB, 1),
            "rss_last_quarter_mib": round(last / MIB, 1),
            "growth_mib": round((last - first) / MIB, 1),
            "growth_pct": round((last - first) / first * 100, 2) if first else 0.0,
            "slope_second_half_mib_per_min": round(
                _slope_mib_per_min([(s.t, s.rss) for s in half]), 2
            ),
            "rss_peak_mib": round(max(s.hwm for s in self.samples) / MIB, 1),
        }


def rss_verdict(
    lives: list[WorkerLife], *, min_samples: int, tolerance_pct: float
) -> dict[str, Any]:
    """Per worker lifetime figures and the verdict: the largest growth within one lifetime
    (among those with at least `min_samples` samples while training) against
    `tolerance_pct`."""
    rows = [w.summary(min_samples=min_samples) for w in lives if w.samples]
    judged = [r for r in rows if r["judged"]]
    verdict: dict[str, Any] = {
        "lifetimes": len(rows),
        "judged_lifetimes": len(judged),
        "min_samples": min_samples,
        "tolerance_pct": tolerance_pct,
        "rss_peak_mib": max((r["rss_peak_mib"] for r in rows), default=0.0),
    }
    if judged:
        worst = max(judged, key=lambda r: r["growth_pct"])
        longest = max(judged, key=lambda r: r["lifetime_s"])
        verdict |= {
            "max_growth_mib": worst["growth_mib"],
            "max_growth_pct": worst["growth_pct"],
            "max_growth_worker": {"rank": worst["rank"], "pid": worst["pid"]},
            "longest_lifetime": {
                k: longest[k]
                for k in (
                    "rank",
                    "pid",
                    "lifetime_s",
                    "growth_mib",
                    "growth_pct",
                    "slope_second_half_mib_per_min",
                    "rss_peak_mib",
                )
            },
            "growth": worst["growth_pct"] > tolerance_pct,
        }
    else:
        verdict["growth"] = None  # no lifetime long enough to tell
    return {"verdict": verdict, "workers": rows}
