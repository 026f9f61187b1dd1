"""The run's state: what the loop holds, what a checkpoint saves and a resume restores.

The loop (`trainer/loop.py`) builds and advances it; the checkpointer
(`trainer/checkpoint.py`) reads and restores it. Both stand on this module, neither on the
other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dataloader.source import TokenSource
from trainer.config import JobConfig
from trainer.fault_hook import LossFaults
from trainer.guard import LossGuard
from trainer.mesh import Mesh
from trainer.model import Transformer
from trainer.resilience import CollectiveWatch, Preemption


@dataclass
class RunState:
    """Everything the loop holds; what a checkpoint saves and a resume restores."""

    cfg: JobConfig
    mesh: Mesh
    device: torch.device
    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    source: TokenSource
    guard: LossGuard | None = None
    preempt: Preemption | None = None  # SIGTERM seen by this rank (run() installs it)
    watch: CollectiveWatch | None = None  # names a hung collective (run() starts it)
    faults: LossFaults | None = None  # faults.* injections (trainer/fault_hook.py)
    step: int = 0  # steps completed (a step the loss guard skipped counts, its data is used)
    tokens: int = 0  # global tokens trained on
    extra: dict[str, Any] = field(default_factory=dict)
