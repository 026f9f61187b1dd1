"""The loss guard: a step whose loss or gradient norm is not finite, or whose loss spikes far
above the recent ones, is skipped (no optimizer update, no router-bias update), counted and
logged; too many bad steps in a row end the run with a clear error.

Checking needs the step's global loss and gradient norm on the host: one device-to-host sync
per step while the guard is on (`train.loss_guard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """Too many consecutive bad steps. Pickles (message only), so it crosses Ray actors."""


@dataclass
class LossGuard:
    spike_factor: float  # 0 = no spike check
    max_bad_steps: int
    ema_decay: float = 0.9
    ema: float | None = None  # running mean of the good steps' losses
    consecutive: int = 0
    skipped: int = 0

    def is_bad(self, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this step, or None. Updates the running mean on good steps."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss ({loss}) or gradient norm ({grad_norm})"
        if self.spike_factor > 0 and self.ema is not None and loss > self.spike_factor * self.ema:
            return f"loss {loss:.4f} is over {self.spike_factor} x its running mean {self.ema:.4f}"
        self.ema = (
            loss if self.ema is None else self.ema_decay * self.ema + (1 - self.ema_decay) * loss
        )
        return None

    def record(self, reason: str | None, *, step: int) -> None:
        """Counts a step; raises TrainingDiverged after max_bad_steps bad ones in a row."""
        if reason is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        print(f"warning: step {step} skipped: {reason}", flush=True)
        if self.consecutive >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.consecutive} steps in a row were skipped (last at step {step}: {reason}); "
                "the run stops here. Resume from the last complete checkpoint with a lower "
                "train.lr, raise train.max_bad_steps, or set train.on_bad_steps=rollback"
            )

    def state_dict(self) -> dict[str, float | int | None]:
        return {"ema": self.ema, "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.ema = state.get("ema")
        self.consecutive = int(state.get("consecutive") or 0)
        self.skipped = int(state.get("skipped") or 0)
