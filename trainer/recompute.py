"""What may differ between a block's forward and its activation-checkpoint recompute: nothing
but bookkeeping, and that only through `forward_only`.

Activation checkpointing runs a block's forward a second time inside backward. Selective
checkpointing (`trainer/parallelize.py`) hands the recompute the outputs it kept from the
forward by counting each op's calls: the recompute's n-th `mm` receives the forward's n-th
`mm` output. So the recompute must issue exactly the forward's sequence of ops. Work that
must happen once per step (load counters, router health, its probe's matmul) is the one thing
that differs, and it goes through `forward_only`: skipped in the recompute, and in the forward
run with the dispatch modes switched off, so that selective checkpointing never sees its ops
and never counts them. A forward-only branch written any other way shifts every later saved
output of its block (the recompute then gets a wrong tensor, or a shape error at best);
`tests/test_recompute.py` keeps this function the only place that asks which pass is running.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec

import torch
from torch.utils._python_dispatch import _disable_current_modes

P = ParamSpec("P")


def in_recompute() -> bool:
    """Whether this code runs inside a backward pass (an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


def forward_only(fn: Callable[P, None]) -> Callable[P, None]:
    """Decorates bookkeeping that must run on a block's first forward only.

    The wrapped function is skipped inside backward (a recompute would count the same tokens
    twice), runs without gradients, outside compiled graphs (it mutates Python state), and
    with the dispatch modes off: activation checkpointing's caching mode does not see its ops,
    so the forward's sequence of saved ops is the recompute's.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        if in_recompute():
            return
        with torch.no_grad(), _disable_current_modes():
            fn(*args, **kwargs)

    return torch.compiler.disable(wrapper)
