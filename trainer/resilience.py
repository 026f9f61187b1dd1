"""Preemption (SIGTERM) and the collective watchdog: the loop stops on purpose, never hangs.

Preemption: a SIGTERM sets a flag (the handler does nothing else: no I/O inside a signal
handler). The loop finishes the step it is in, agrees with the other ranks that someone was
told to stop (the flag rides in the step's one all-reduce), writes a checkpoint synchronously
and returns. A timer started by the signal bounds all of that by `train.preempt_grace_s`:
when it runs out first, the process says so and exits with 143 (128 + SIGTERM), leaving at
most an incomplete checkpoint directory, which resume ignores. The handler can only be
installed from the main thread; elsewhere (Ray Train runs the loop in a worker thread) the
launcher's own shutdown applies, and that is logged once.

Collective watchdog: the loop names each phase that holds a collective (`phase(name, ...)`)
and records, in the process group's key-value store, which phase of which step each rank
entered last. A phase that lasts longer than `parallel.timeout_s` means a peer stopped
answering. If the backend raises its own timeout first (gloo does, on groups created with the
timeout), the error is re-raised as `CollectiveTimeout` naming the phase, the step, the group
and the ranks that never entered it. If nothing raises (a group with the backend's default
timeout, or a collective a backend does not time out in the calling thread), a monitor thread
prints the same message at `parallel.timeout_s` + a margin and ends the process with exit
code 124: a blocked collective cannot be interrupted from Python, and waiting forever is the
one outcome not allowed.

What a phase name proves depends on the backend. gloo runs a collective in the calling
thread, so the phase where the host blocked is the phase of the hung collective. NCCL only
enqueues a collective on a stream and returns; the host blocks later, at the next sync (a
split-size copy, `.item()`, the next phase's wait), so the phase named is where the host
waited, and the collective that hung may have been launched in an earlier one. On NCCL the
message says so and points at NCCL's own watchdog (it times out the collective itself at
the group's timeout) and its flight recorder (`TORCH_NCCL_TRACE_BUFFER_SIZE` > 0 records the
last collectives, dumped on a timeout), which name the collective and its sequence number.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

PREEMPT_EXIT_CODE = 128 + signal.SIGTERM
WATCHDOG_EXIT_CODE = 124
_KEY = "moeyard/progress/"
_TIMED_OUT = "moeyard/timedout/"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within parallel.timeout_s. Pickles (message only)."""


class Preemption:
    """SIGTERM -> finish the step, checkpoint, stop, within `grace_s`."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested = False
        self.received_at: float | None = None
        self._timer: threading.Timer | None = None
        self._previous: Any = None
        self._installed = False

    def install(self, *, announce: bool = True) -> bool:
        """Installs the handler (main thread only). Returns whether it did; says why not
        when `announce` (rank 0)."""
        if threading.current_thread() is not threading.main_thread():
            if not announce:
                return False
            print(
                "preemption: the loop does not run in the main thread; SIGTERM is left to "
                "the launcher (no checkpoint on preemption from the loop)",
                flush=True,
            )
            return False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        self._installed = True
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        self.received_at = time.monotonic()
        self._timer = threading.Timer(self.grace_s, self._expired)
        self._timer.daemon = True
        self._timer.start()

    def _expired(self) -> None:
        print(
            f"preemption: train.preempt_grace_s ({self.grace_s:g} s) ran out before the "
            "checkpoint was complete; exiting without it (resume uses the previous one)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PREEMPT_EXIT_CODE)

    def elapsed(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at

    def uninstall(self) -> None:
        """Cancels the grace timer and puts the previous handler back."""
        if self._timer is not None:
            self._timer.cancel()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False


def _default_store() -> Any:
    """The default process group's key-value store, or None (no group, or a torch without
    the accessor)."""
    if not dist.is_initialized():
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a private accessor: without it the message lacks peers' progress
        return None


class CollectiveWatch:
    """Names the collective phases of the loop and ends the run when one hangs."""

    def __init__(
        self, *, rank: int, world_size: int, timeout_s: float, backend: str | None = None
    ) -> None:
        """backend: the default group's backend (read from it when None, "" without one);
        it decides whether a phase name locates the hung collective (see the module doc)."""
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        if backend is None:
            backend = str(dist.get_backend()) if dist.is_initialized() else ""
        # "nccl", or "cpu:gloo,cuda:nccl" for a group with both
        self.async_launch = "nccl" in backend.lower()
        # The backend's own timeout (if any) fires at timeout_s; the watchdog a bit later,
        # so that a raised error (which can be caught and reported) wins when there is one.
        self.margin_s = min(10.0, max(1.0, 0.2 * timeout_s))
        self.store = _default_store() if world_size > 1 else None
        self._seq = 0
        self._armed: tuple[float, str, int, list[int]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if world_size > 1:
            self._thread = threading.Thread(target=self._monitor, daemon=True, name="collwatch")
            self._thread.start()

    @contextlib.contextmanager
    def phase(self, name: str, *, step: int, ranks: list[int] | None = None) -> Iterator[None]:
        """Wraps the collectives of one phase of step `step` over the world ranks `ranks`
        (default: all)."""
        if self.world_size == 1:
            yield
            return
        group = list(range(self.world_size)) if ranks is None else ranks
        self._seq += 1
        self._publish(f"{step}:{self._seq}:{name}")
        with self._lock:
            self._armed = (time.monotonic(), name, step, group)
        try:
            yield
        except Exception as e:
            with self._lock:
                self._armed = None  # reported here: the watchdog must not fire meanwhile
            if _looks_like_timeout(e):
                raise CollectiveTimeout(
                    self.describe(name, step, group, cause=str(e), raised=True)
                ) from None
            raise
        finally:
            with self._lock:
                self._armed = None

    def _publish(self, value: str) -> None:
        if self.store is None:
            return
        with contextlib.suppress(Exception):  # progress is for the message only
            self.store.set(f"{_KEY}{self.rank}", value)

    def _read(self, prefix: str, ranks: list[int], default: str) -> dict[int, str] | None:
        """`prefix<rank>` of each rank, or None when the store does not answer in time (the
        store's own timeout may be long: the read runs in a thread we stop waiting for)."""
        if self.store is None:
            return None
        box: dict[int, str] = {}
        store = self.store

        def read() -> None:
            for r in ranks:
                try:
                    if store.check([f"{prefix}{r}"]):
                        box[r] = store.get(f"{prefix}{r}").decode()
                    else:
                        box[r] = default
                except Exception:
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout=5.0)
        return box if len(box) == len(ranks) else None

    def _suspects(self, peers: list[int], *, raised: bool) -> tuple[list[str], bool]:
        """Peers that did not arrive at this phase, or arrived but were not seen waiting in
        its collective: (descriptions, whether the store answered).

        A rank whose backend raised a timeout in this phase was provably blocked in the
        collective, waiting for someone else; it marks itself so (`raised`). A watchdog that
        fires proves nothing about its own rank (a rank stalled in Python before the
        collective fires its watchdog too), so its mark does not clear it.
        """
        mine = self._seq
        mark = f"{mine}" if raised else f"{mine}:watchdog"
        with contextlib.suppress(Exception):
            assert self.store is not None
            self.store.set(f"{_TIMED_OUT}{self.rank}", mark)
        progress = self._read(_KEY, peers, "0:0:start")
        if progress is None:
            return [], False
        out = []
        at_phase = []
        for r, v in sorted(progress.items()):
            s, seq, what = v.split(":", 2)
            if int(seq) < mine:
                out.append(f"rank {r} (last entered the {what} at step {s})")
            else:
                at_phase.append(r)
        # Peers blocked in this collective get their backend's timeout too, and say so;
        # give them a moment (only a backend that raises marks anyone).
        deadline = time.monotonic() + (min(3.0, self.timeout_s) if raised else 0.0)
        silent = at_phase
        while silent:
            marks = self._read(_TIMED_OUT, silent, "-1")
            if marks is None:
                break
            silent = [r for r in silent if marks[r] != str(mine)]
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        out += [f"rank {r} (entered it and stopped answering in it)" for r in silent]
        return out, True

    def describe(
        self, name: str, step: int, group: list[int], *, cause: str = "", raised: bool = False
    ) -> str:
        """The error message: which collective, which step, which ranks did not arrive."""
        if self.async_launch:
            msg = (
                f"collective timeout: rank {self.rank}'s host waited over parallel.timeout_s "
                f"({self.timeout_s:g} s) in the {name} at step {step} (group ranks {group}); "
                "NCCL launches collectives asynchronously, so the collective that hung may "
                "have been launched in an earlier phase: NCCL's watchdog error and its flight "
                "recorder dump (set TORCH_NCCL_TRACE_BUFFER_SIZE, e.g. 2000) name it"
            )
        else:
            msg = (
                f"collective timeout: rank {self.rank} waited over parallel.timeout_s "
                f"({self.timeout_s:g} s) in the {name} at step {step} (group ranks {group})"
            )
        suspects, answered = self._suspects([r for r in group if r != self.rank], raised=raised)
        if not answered:
            msg += (
                "; the rendezvous store does not answer either, so the rank hosting it "
                "(rank 0) is likely the one stopped"
            )
        elif suspects:
            msg += "; not answering: " + ", ".join(suspects)
        else:
            msg += "; every peer timed out in it too (a network or backend failure)"
        if cause:
            msg += f". Backend error: {cause.splitlines()[0][:300]}"
        return msg + ". The run stops; resume restarts from the newest checkpoint."

    def _monitor(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            with self._lock:
                armed = self._armed
            if armed is None:
                continue
            since, name, step, group = armed
            if time.monotonic() - since < self.timeout_s + self.margin_s:
                continue
            with self._lock:
                if self._armed is not armed:  # the phase ended while we looked
                    continue
            print(self.describe(name, step, group), file=sys.stderr, flush=True)
            os._exit(WATCHDOG_EXIT_CODE)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def _looks_like_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text
