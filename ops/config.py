"""The `ops` section of the job config: telemetry and metric export."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OpsConfig:
    stdout: bool = True  # print one line per logged step on rank 0
    jsonl: bool = True  # write run.output_dir/metrics.jsonl

    def __post_init__(self) -> None:
        pass
