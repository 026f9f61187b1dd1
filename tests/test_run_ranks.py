"""tests/distributed.py's `run_ranks`: ranks forked from a fork server that imported torch once
start as spawned ones would, in the caller's environment, working directory and stdout at
the call, and a rank that fails or dies fails the call with what it said."""

from __future__ import annotations

import os
import sys

import pytest

from tests.distributed import run_ranks


def _where(rank: int, world: int) -> tuple[str | None, str, str, str]:
    print(f"rank {rank} of {world} on stdout", flush=True)
    print(f"rank {rank} on stderr", file=sys.stderr, flush=True)
    return os.environ.get("MOEYARD_RUN_RANKS"), os.getcwd(), os.environ["RANK"], str(world)


def _nothing(rank: int, world: int) -> None:
    return None


def test_ranks_take_the_callers_environment_and_output(monkeypatch, tmp_path, capfd) -> None:
    with capfd.disabled():
        # The fork server is up, started (if by this call) outside this test's capture: the
        # ranks below reach the capture only through the descriptors they are handed.
        run_ranks(_nothing, 1)
    monkeypatch.setenv("MOEYARD_RUN_RANKS", "first")
    monkeypatch.chdir(tmp_path)
    assert run_ranks(_where, 2) == [
        ("first", str(tmp_path), "0", "2"),
        ("first", str(tmp_path), "1", "2"),
    ]
    out, err = capfd.readouterr()
    assert "rank 0 of 2 on stdout" in out and "rank 1 of 2 on stdout" in out
    assert "rank 1 on stderr" in err
    # The next call sees the environment as it is then, not as the fork server started.
    monkeypatch.setenv("MOEYARD_RUN_RANKS", "second")
    monkeypatch.chdir(tmp_path.parent)
    assert run_ranks(_where, 1) == [("second", str(tmp_path.parent), "0", "1")]


def _rank_one_raises(rank: int, world: int) -> int:
    if rank == 1:
        raise ValueError("rank one went wrong")
    return rank


def _exits(rank: int, world: int) -> None:
    os._exit(3)


def test_a_failing_rank_fails_the_call_with_its_traceback() -> None:
    with pytest.raises(RuntimeError, match=r"rank 1:\n(.|\n)*ValueError: rank one went wrong"):
        run_ranks(_rank_one_raises, 2)
    with pytest.raises(
        RuntimeError, match=r"ranks \[0\] exited without a result \(exit codes \[3\]\)"
    ):
        run_ranks(_exits, 1)
