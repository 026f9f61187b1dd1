"""bf16 compute in one process: bf16 copies of the weights made once per optimizer step.

Under FSDP the parameters are gathered in bf16 (`MixedPrecisionPolicy`) and the master
weights, gradients and optimizer state stay fp32. One process has no FSDP; autocast would
cast every fp32 weight to bf16 at every forward of every micro-batch (and again in an
activation-checkpoint recompute) and cast each weight gradient back. `ComputeCopies` does
what FSDP's policy does instead, in place, for the span of one step's forwards and backwards:

- `begin()` (before the first micro-batch) casts every fp32 parameter into a persistent bf16
  buffer, one foreach copy, and points the parameter's data at it; the fp32 master stays
  aside. The model then runs in bf16 throughout, as it does under FSDP;
- each micro-batch's bf16 weight gradient is added into an fp32 accumulator as soon as
  autograd has it (a post-accumulate-grad hook), and the bf16 gradient is dropped, so
  accumulation over micro-batches is fp32 as under FSDP's fp32 reduction;
- `end()` (after the last backward) points every parameter back at its fp32 master and
  hands it the fp32 gradient: clipping, the optimizer, checkpoints and evaluation see fp32
  parameters and gradients, as without this class.

The bf16 copies are refreshed at every `begin()`, so they are never stale after an optimizer
step, a checkpoint load or a rollback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class ComputeCopies:
    """bf16 compute copies of a model's fp32 parameters for the forwards and backwards of
    one optimizer step (see the module docstring).

    Args:
        model: a materialized model whose parameters are plain (not DTensor) fp32 tensors.
        dtype: the compute dtype (bf16).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self.params = [p for p in model.parameters() if p.dtype == torch.float32]
        self._copies: list[Tensor] | None = None
        self._masters: list[Tensor] = []
        self._grads: list[Tensor | None] = [None] * len(self.params)
        self.active = False
        self.casts = 0  # fp32 -> compute-dtype casts of the whole model, for tests
        for i, p in enumerate(self.params):
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulator(i))

    def _accumulator(self, i: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if not self.active or p.grad is None:
                return
            g = p.grad
            p.grad = None
            acc = self._grads[i]
            if acc is None:
                self._grads[i] = g.to(torch.float32)
            else:
                acc.add_(g)

        return hook

    @torch.no_grad()
    def begin(self) -> None:
        """Points every parameter at a fresh compute-dtype copy of its fp32 value."""
        assert not self.active, "ComputeCopies.begin() twice without end()"
        if self._copies is None:
            self._copies = [torch.empty_like(p, dtype=self.dtype) for p in self.params]
        self._masters = [p.data for p in self.params]
        torch._foreach_copy_(self._copies, self._masters)  # the one cast of this step
        self.casts += 1
        for i, (p, c) in enumerate(zip(self.params, self._copies, strict=True)):
            if p.grad is not None:
                # A gradient left from outside the step joins the fp32 accumulation.
                self._grads[i] = p.grad.to(torch.float32)
                p.grad = None
            p.data = c
        self.active = True

    @torch.no_grad()
    def end(self, *, keep_grads: bool = True) -> None:
        """Points every parameter back at its fp32 master, with its fp32 gradient (none
        when `keep_grads` is false: a step that stopped half-way)."""
        assert self.active, "ComputeCopies.end() without begin()"
        self.active = False
        for i, (p, m) in enumerate(zip(self.params, self._masters, strict=True)):
            p.data = m
            p.grad = self._grads[i] if keep_grads else None
            self._grads[i] = None
        self._masters = []
