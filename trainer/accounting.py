"""Exactly-once sample accounting: which global samples reached the final model, and how often.

A data source owns a global order of samples and a cursor counted in global samples
(dataloader/source.py): one optimizer step, all ranks and all micro-steps together, trains
on the contiguous range `[cursor before the step, cursor after it)`. The `SampleLedger`
records that range for every step, and travels inside each checkpoint with the data cursor
(`AccountedSource` adds it to the source's `state_dict`), so a resumed run restores the
ledger of exactly the steps its checkpoint holds.

Definitions (what `summary.json` reports):

- **lineage**: the steps whose optimizer update reaches the final weights. A run that resumes
  from the checkpoint at step S keeps steps 1..S of the attempt that wrote it; the steps that
  attempt ran after S died with it (their updates never reached the checkpoint), and the
  resumed run trains those samples again. Re-training after a restart is what resume must
  do, and is not a repeat. Because the ledger is restored from the checkpoint, the ledger at
  the end of a run is the lineage of its final model.
- **consumed**: samples of the lineage's steps, counted once per step that read them.
- **repeated**: sample ids whose gradient reaches the final model more than once: ids in the
  range of more than one lineage step (counted once per extra time). A step the loss guard
  skipped still counts as reading its ids, so a later step reading them again is a repeat.
- **skipped**: sample ids below the highest id the lineage read that no lineage step read (a
  gap in the order: data lost), excluding ids an explicit policy left out.
- **guard_skipped**: samples of steps the loss guard skipped (read, gradient discarded on
  purpose, `train.loss_guard`); reported as such, not as skipped.
- **policy_skipped**: samples passed over on purpose: after a loss-guard rollback
  (`train.on_bad_steps=rollback`) the model goes back to the last checkpoint but the data
  does not, so the samples between that checkpoint and the bad steps are not trained again.
- **substituted**: rows the reader served from another row group because theirs was bad
  (`data.on_bad_shard=skip`, the source's `data_substituted_rows`, counted by the reader of
  this attempt since it started); reported as such.
- **resumes**: checkpoint loads in the lineage (each checkpoint the final model descends
  from), with the step and cursor each resumed at.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import torch

from dataloader.source import TokenSource

# Ranges kept for a report of where repeats or guard skips happened (counts are exact).
_MAX_EXAMPLES = 16


@dataclass
class SampleLedger:
    """The global sample ranges the lineage's steps trained on.

    `intervals` is the union of every range read (sorted, disjoint, half-open, merged when
    touching): a run that loses nothing and repeats nothing has exactly one, `[0, cursor)`.
    """

    intervals: list[list[int]] = field(default_factory=list)
    steps: int = 0
    consumed: int = 0
    repeated: int = 0
    guard_skipped: int = 0
    policy_skipped: int = 0
    policy_skips: list[list[Any]] = field(default_factory=list)  # [start, end, reason]
    repeated_ranges: list[list[int]] = field(default_factory=list)
    guard_skipped_steps: list[int] = field(default_factory=list)
    resumes: list[dict[str, int]] = field(default_factory=list)
    # Set when a checkpoint without a ledger was resumed: samples below it are assumed to
    # have been read once (unverified).
    unverified_below: int = 0

    def record(self, *, step: int, start: int, end: int, trained: bool = True) -> None:
        """Adds the range `[start, end)` one step read. `trained=False`: the loss guard
        skipped the step (its samples are counted in guard_skipped, not in the coverage)."""
        assert 0 <= start <= end, (start, end)
        self.steps += 1
        n = end - start
        self.consumed += n
        if not trained:
            self.guard_skipped += n
            if len(self.guard_skipped_steps) < _MAX_EXAMPLES:
                self.guard_skipped_steps.append(step)
        overlap = self._add(start, end)
        if overlap:
            self.repeated += overlap
            if len(self.repeated_ranges) < _MAX_EXAMPLES:
                self.repeated_ranges.append([step, start, end])

    def _add(self, start: int, end: int) -> int:
        """Merges `[start, end)` into `intervals`; returns how many ids were already in it."""
        if start == end:
            return 0
        iv = self.intervals
        # Fast path: the next step's range continues the last interval.
        if iv and iv[-1][1] == start:
            iv[-1][1] = end
            return 0
        if not iv or iv[-1][1] < start:
            iv.append([start, end])
            return 0
        i = bisect.bisect_left(iv, [start, start])
        if i > 0 and iv[i - 1][1] >= start:
            i -= 1
        j, overlap, lo, hi = i, 0, start, end
        while j < len(iv) and iv[j][0] <= end:
            overlap += max(0, min(end, iv[j][1]) - max(start, iv[j][0]))
            lo, hi = min(lo, iv[j][0]), max(hi, iv[j][1])
            j += 1
        iv[i:j] = [[lo, hi]]
        return overlap

    def skip_on_purpose(self, *, start: int, end: int, reason: str) -> None:
        """Marks `[start, end)` as passed over by a policy (not a loss of data)."""
        if end <= start:
            return
        self.policy_skipped += end - start
        if len(self.policy_skips) < _MAX_EXAMPLES:
            self.policy_skips.append([start, end, reason])
        self._add(start, end)

    @property
    def end(self) -> int:
        """One past the highest sample id read."""
        return self.intervals[-1][1] if self.intervals else 0

    @property
    def skipped(self) -> int:
        """Ids below `end` that no step read and no policy passed over (gaps between
        intervals, and before the first)."""
        covered = sum(b - a for a, b in self.intervals)
        return self.end - covered

    def note_resume(self, *, step: int, cursor: int) -> None:
        self.resumes.append({"step": step, "cursor": cursor})

    def summary(self, *, substituted: int = 0) -> dict[str, Any]:
        """The figures `summary.json` reports (see the module docstring)."""
        return {
            "samples_consumed": self.consumed,
            "samples_repeated": self.repeated,
            "samples_skipped": self.skipped,
            "samples_guard_skipped": self.guard_skipped,
            "samples_policy_skipped": self.policy_skipped,
            "samples_substituted": substituted,
            "samples_end": self.end,
            "resumes": len(self.resumes),
            "resumed_at_steps": [r["step"] for r in self.resumes],
            "repeated_examples": [list(r) for r in self.repeated_ranges],
            "guard_skipped_steps": list(self.guard_skipped_steps),
            "policy_skips": [list(r) for r in self.policy_skips],
            "unverified_below": self.unverified_below,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "intervals": [list(r) for r in self.intervals],
            "steps": self.steps,
            "consumed": self.consumed,
            "repeated": self.repeated,
            "guard_skipped": self.guard_skipped,
            "policy_skipped": self.policy_skipped,
            "policy_skips": [list(r) for r in self.policy_skips],
            "repeated_ranges": [list(r) for r in self.repeated_ranges],
            "guard_skipped_steps": list(self.guard_skipped_steps),
            "resumes": [dict(r) for r in self.resumes],
            "unverified_below": self.unverified_below,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SampleLedger:
        return cls(
            intervals=[list(map(int, r)) for r in state.get("intervals", [])],
            steps=int(state.get("steps", 0)),
            consumed=int(state.get("consumed", 0)),
            repeated=int(state.get("repeated", 0)),
            guard_skipped=int(state.get("guard_skipped", 0)),
            policy_skipped=int(state.get("policy_skipped", 0)),
            policy_skips=[list(r) for r in state.get("policy_skips", [])],
            repeated_ranges=[list(r) for r in state.get("repeated_ranges", [])],
            guard_skipped_steps=[int(s) for s in state.get("guard_skipped_steps", [])],
            resumes=[dict(r) for r in state.get("resumes", [])],
            unverified_below=int(state.get("unverified_below", 0)),
        )


class AccountedSource:
    """A TokenSource that carries the run's SampleLedger in its state dict.

    The ledger is saved and restored with the data cursor (`meta.data` of a checkpoint), so
    it can never disagree with the cursor about which checkpoint it belongs to. Everything
    else passes through to the wrapped source.
    """

    LEDGER_KEY = "sample_ledger"

    def __init__(self, inner: TokenSource) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.ledger = SampleLedger()

    def cursor(self) -> int:
        """Global samples consumed so far (the source's cursor)."""
        # The sources keep it as an attribute; state_dict() may do more work (a reader
        # fingerprints its dataset), and this is called twice per step.
        c = getattr(self.inner, "cursor", None)
        return c if isinstance(c, int) else int(self.inner.state_dict()["cursor"])

    def next_batch(self) -> torch.Tensor:
        return self.inner.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), self.LEDGER_KEY: self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop(self.LEDGER_KEY, None)
        self.inner.load_state_dict(state)
        cursor = int(state["cursor"])
        if saved is None:
            # A checkpoint written before accounting existed: take its cursor on trust.
            self.ledger = SampleLedger(
                intervals=[[0, cursor]] if cursor else [],
                consumed=cursor,
                unverified_below=cursor,
            )
        else:
            self.ledger = SampleLedger.from_state_dict(saved)
        self.ledger.note_resume(step=self.ledger.steps, cursor=cursor)

    def metrics(self) -> dict[str, Any]:
        return self.inner.metrics()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        # Attributes a caller may want from the concrete source (e.g. a reader's counters).
        if name == "inner":  # not set yet (during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
