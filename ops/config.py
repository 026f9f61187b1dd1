"""The `ops` section of the job config: telemetry and metric export."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Literal


class OpsConfigError(ValueError):
    """An `ops.*` setting a user can fix; the message names the key and the value."""


@dataclass
class OpsConfig:
    stdout: bool = True  # print one line per logged step on rank 0
    jsonl: bool = True  # write run.output_dir/metrics.jsonl
    # Sample this rank's GPU through NVML and (local rank 0) the node's CPU package energy
    # through RAPL at every logged step. Values that cannot be measured are absent.
    telemetry: bool = True
    rapl_root: str = "/sys/class/powercap"
    # Per-device peak dense bf16 TFLOP/s for MFU. 0 = look the device up in the table of
    # known peaks (ops.metrics.PEAK_TFLOPS); on a device not in the table (a CPU) MFU is
    # absent unless this is set.
    peak_tflops: float = 0.0
    # Prometheus export: "off"; "client" = a prometheus_client HTTP endpoint in each rank
    # (rank r listens on prometheus_port + its local rank); "ray" = Ray's metrics agent
    # (the Ray launcher sets this).
    prometheus: Literal["off", "client", "ray"] = "off"
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9464
    # Keep the client endpoint up this long after the last step so a scrape can collect the
    # final values of a short run.
    prometheus_linger_s: float = 0.0
    # TensorBoard event files under run.output_dir/tensorboard/ (rank 0): every scalar of the
    # record, a histogram of each MoE layer's expert load, the resolved config as text.
    # Needs the `trackers` extra (tensorboard, google-crc32c).
    tensorboard: bool = False
    # A Weights & Biases run (rank 0): the same scalars, the resolved config as the run config,
    # the expert-load heat map as an image. Needs the `trackers` extra (wandb). The API key
    # comes from the environment (WANDB_API_KEY) only.
    wandb: bool = False
    wandb_project: str = "moeyard"
    wandb_entity: str = ""  # "" = the API key's default entity
    # "online" streams to the W&B server; "offline" writes the run's files locally only (no
    # network; upload them later with `wandb sync`).
    wandb_mode: Literal["online", "offline"] = "online"
    # Local folder for W&B's files. "" = run.output_dir when that is a local path, else a
    # folder under the system's temporary directory (the path is printed at start).
    wandb_dir: str = ""
    # The expert-load heat map image: at every evaluation step and every this many logged
    # steps; 0 = at evaluation steps only.
    wandb_image_every: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.prometheus_port <= 65535:
            raise OpsConfigError(
                f"ops.prometheus_port ({self.prometheus_port}) must be between 1 and 65535"
            )
        if self.prometheus_linger_s < 0:
            raise OpsConfigError(
                f"ops.prometheus_linger_s ({self.prometheus_linger_s}) must be >= 0"
            )
        if self.peak_tflops < 0:
            raise OpsConfigError(f"ops.peak_tflops ({self.peak_tflops}) must be >= 0")
        if not self.prometheus_host:
            raise OpsConfigError("ops.prometheus_host must not be empty")
        if self.wandb_image_every < 0:
            raise OpsConfigError(f"ops.wandb_image_every ({self.wandb_image_every}) must be >= 0")
        if self.wandb and not self.wandb_project:
            raise OpsConfigError("ops.wandb_project must not be empty when ops.wandb is true")
        defaults = {f.name: f.default for f in fields(OpsConfig)}

        def ignored(keys: tuple[str, ...], why: str) -> None:
            for key in keys:
                if getattr(self, key) != defaults[key]:
                    warnings.warn(
                        f"ops.{key} ({getattr(self, key)!r}) is ignored: {why}", stacklevel=3
                    )

        if self.prometheus == "off":
            ignored(
                ("prometheus_host", "prometheus_port", "prometheus_linger_s"),
                "ops.prometheus is 'off'",
            )
        elif self.prometheus == "ray":
            ignored(("prometheus_host", "prometheus_port"), "ops.prometheus is 'ray'")
        if not self.telemetry:
            ignored(("rapl_root",), "ops.telemetry is false")
        if not self.wandb:
            ignored(
                (
                    "wandb_project",
                    "wandb_entity",
                    "wandb_mode",
                    "wandb_dir",
                    "wandb_image_every",
                ),
                "ops.wandb is false",
            )
