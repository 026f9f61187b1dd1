"""Runs a function on N gloo ranks in separate processes, rendezvous through a file store.

`run_ranks(fn, world_size, *args)` calls `fn(rank, world_size, *args)` in each rank with the
default process group initialized and returns the list of the ranks' return values (which
must pickle). An exception in any rank is re-raised here with that rank's traceback.

Ranks are forked from a fork server that imported torch once for the session: a spawned
interpreter imports torch (and torch.distributed's FSDP, DTensor, dynamo) again, seconds of
CPU per rank on a 2-core machine. A rank starts as a spawned one would: in the caller's
environment, working directory and sys.path at the call, writing to the caller's stdout and
stderr (pytest's capture of the test); the test's module is imported in the rank after its
environment is set.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# Imported once, in the fork server. None of them reads a variable that a test sets between
# calls; the modules of the project and of the tests are imported fresh in each rank.
PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch._dynamo",
    "torch.export",
]
_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(PRELOAD)


class _CallerFd:
    """One of the caller's file descriptors, handed to the rank as it starts (a rank forked
    by the server would otherwise write to the server's stdout: the test that started it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        from multiprocessing.reduction import DupFd

        return (_inherited, (DupFd(self.fd),))


def _inherited(dup: Any) -> int:
    return dup.detach()


def _entry(
    rank: int,
    world_size: int,
    store_path: str,
    call: bytes,
    env: dict[str, str],
    fds: tuple[int, int],
    queue,
) -> None:
    for fd, std in zip(fds, (1, 2), strict=True):
        os.dup2(fd, std)
        os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world_size)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        fn, args = pickle.loads(call)  # imports the test's module, in this environment
        dist.init_process_group(
            "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size
        )
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; the queue's own pickler would share memory that
        # vanishes when this process exits before the parent reads it.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300
) -> list[Any]:
    queue = _CTX.Queue()
    call = pickle.dumps((fn, args))
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [
            _CTX.Process(
                target=_entry,
                args=(r, world_size, store, call, env, (_CallerFd(1), _CallerFd(2)), queue),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size and not errors:
            try:
                rank, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and queue.empty():
                    errors.append(
                        f"ranks {dead} exited without a result (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    )
                elif time.monotonic() > deadline:
                    errors.append(f"no result after {timeout_s}s")
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank}:\n{payload}")
        for p in procs:
            p.join(timeout=5 if errors else timeout_s)
            if p.is_alive():
                p.kill()
        if errors:
            raise RuntimeError("a rank failed:\n" + "\n".join(errors))
        return [results[r] for r in range(world_size)]
