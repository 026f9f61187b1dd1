"""Loss faults injected by configuration (`faults.*`), to rehearse the loss guard.

An operator lists steps in `faults.nonfinite_loss_steps` or `faults.loss_spike_steps` (a
preset or `key=value` overrides, on any launcher); on those steps the training loop
multiplies the step's language-model loss by NaN or by `faults.loss_spike_factor` on every
rank, before the backward pass, so the gradients follow and the loss guard sees what a real
divergence would show it. Each injection prints one line on rank 0 saying it came from the
configuration, and is counted (`faults_injected` in the metrics and in `summary.json`).

A step is injected on its first pass only. The loss guard's rollback re-trains from the
checkpoint (steps after it get the same numbers again, on later data), and a restarted run
(a crash, an abort, a launcher's automatic restart) re-trains the steps after its newest
checkpoint; injecting those again would turn a rehearsal of one bad step into a run that
can never get past it. So the steps already injected are kept in memory (a rollback) and in
`faults_injected.json` in `run.output_dir` (a restart: every rank reads it at the first step
with faults configured, when `checkpoint.resume` is on; a run that does not resume starts a
new record). Rank 0 writes it after the step's all-reduce, so every rank has read it before
it changes.

The loop asks `take(step)` once per step: with no fault configured it is a check of two
empty lists (no device work, no sync). The lists are read at every step, so a harness (the
soak, `cluster/soak_local.py`) can add a step to the running config while the run goes on.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from trainer.config import FaultsConfig

RECORD = "faults_injected.json"


class LossFaults:
    """The `faults.*` loss injections of one run, on one rank."""

    def __init__(self, cfg: FaultsConfig, *, output_dir: str, rank: int, resume: bool) -> None:
        self.cfg = cfg
        self.url = f"{output_dir.rstrip('/')}/{RECORD}"
        self.rank = rank
        # {"step": N, "kind": "nonfinite_loss" | "loss_spike"}, in the order injected.
        self.injected: list[dict[str, Any]] = []
        self._done: set[int] = set()
        self._unsaved = False
        # The record is read at the first step with faults configured (not at all in a run
        # without), before any rank can inject, so before rank 0 can rewrite it.
        self._to_read = resume

    @property
    def count(self) -> int:
        return len(self.injected)

    @property
    def active(self) -> bool:
        """Whether this run has faults configured or injected (its metrics report them)."""
        return bool(self.cfg.nonfinite_loss_steps or self.cfg.loss_spike_steps or self.injected)

    def _read(self) -> None:
        self._to_read = False
        self.injected = read_record(self.url) + self.injected
        self._done |= {int(r["step"]) for r in self.injected}

    def take(self, step: int) -> float | None:
        """The factor to multiply step `step`'s loss by, or None; marks the step injected."""
        cfg = self.cfg
        if not (cfg.nonfinite_loss_steps or cfg.loss_spike_steps):
            return None
        if self._to_read:
            self._read()
        if step in self._done:
            return None
        if step in cfg.nonfinite_loss_steps:
            kind, factor, key = "nonfinite_loss", float("nan"), "faults.nonfinite_loss_steps"
            what = "loss made non-finite (x NaN)"
        elif step in cfg.loss_spike_steps:
            kind, factor, key = "loss_spike", cfg.loss_spike_factor, "faults.loss_spike_steps"
            what = f"loss multiplied by faults.loss_spike_factor ({cfg.loss_spike_factor:g})"
        else:
            return None
        self._done.add(step)
        self.injected.append({"step": step, "kind": kind})
        self._unsaved = True
        if self.rank == 0:
            print(
                f"fault injected by config at step {step}: {what}, as {key} asks; a rehearsal, "
                "not a real divergence",
                flush=True,
            )
        return factor

    def save(self) -> None:
        """Rank 0 writes the record if a step was injected since the last save. Call it after
        the step's all-reduce (every rank has read the record by then)."""
        if not self._unsaved:
            return
        self._unsaved = False
        if self.rank != 0:
            return
        fs, path = fsspec.core.url_to_fs(self.url)
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "w") as f:
            json.dump({"injected": self.injected}, f, indent=1)


def read_record(url: str) -> list[dict[str, Any]]:
    """The injections a run recorded at `url` (empty when there is no record)."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "r") as f:
            data = json.load(f)
        return [{"step": int(r["step"]), "kind": str(r["kind"])} for r in data["injected"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as e:
        # Cut short by a crash mid-write, or edited by hand: the worst outcome of starting a
        # new record is one more injection of a step already injected.
        print(f"warning: ignoring {url} (not a fault record: {e!r}); starting a new one")
        return []
