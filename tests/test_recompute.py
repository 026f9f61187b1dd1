"""Forward-only bookkeeping under activation checkpointing (trainer/recompute.py): it runs once
per forward, never in the recompute, and its ops never shift selective checkpointing's saved
outputs; and it is the only code that asks which pass is running."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trainer.parallelize import _selective_context
from trainer.recompute import forward_only

ROOT = Path(__file__).resolve().parents[1]


class _Probed(nn.Module):
    """Two matmuls with a forward-only matmul between them: the shape of the MoE block whose
    churn probe shifted the shared experts' saved outputs. The probe's output has the second
    matmul's shape, so a shifted recompute would go wrong silently, not with a shape error."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6, bias=False)
        self.b = nn.Linear(6, 4, bias=False)
        self.probe = nn.Linear(8, 4, bias=False)
        self.calls = 0
        self.seen: Tensor | None = None

    @forward_only
    def _bookkeep(self, x: Tensor) -> None:
        self.calls += 1
        self.seen = self.probe(x)  # an mm, on selective checkpointing's save list

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        self._bookkeep(x)
        return torch.tanh(self.b(h))  # tanh's backward needs b's output, recomputed


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_forward_only_runs_once_and_leaves_the_gradients_alone(mode):
    torch.manual_seed(0)
    ref = _Probed()
    x = torch.randn(5, 8)
    ref(x).square().sum().backward()
    want = [p.grad.clone() for p in (ref.a.weight, ref.b.weight)]

    m = _Probed()
    m.load_state_dict(ref.state_dict())
    if mode == "none":
        out = m(x)
    elif mode == "full":
        out = checkpoint(m, x, use_reentrant=False)
    else:
        out = checkpoint(m, x, use_reentrant=False, context_fn=_selective_context)
    out.square().sum().backward()
    assert m.calls == 1, f"{mode}: bookkeeping ran {m.calls} times for one forward"
    assert m.seen is not None and not m.seen.requires_grad
    assert m.probe.weight.grad is None
    for got, exp in zip((m.a.weight.grad, m.b.weight.grad), want, strict=True):
        assert torch.equal(got, exp), mode


def test_only_recompute_asks_which_pass_is_running():
    """A branch on the pass anywhere else would make the recompute's ops differ from the
    forward's; such work goes through `forward_only`."""
    pattern = re.compile(r"_current_graph_task_id|is_recompute")
    found = []
    for pkg in ("trainer", "cluster", "dataloader", "ops"):
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name != "recompute.py" and pattern.search(path.read_text()):
                found.append(str(path.relative_to(ROOT)))
    assert not found, f"ask trainer.recompute instead: {found}"
