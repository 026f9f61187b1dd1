"""Applies parallelism to a model built on the meta device, and syncs its gradients.

`parallelize` runs in a fixed order, before `materialize`:
  1. expert parallelism: each MoE layer keeps the experts of its EP rank and gets the
     all-to-all dispatcher (EP > 1) or the local one (EP = 1);
  (activation checkpointing and FSDP would come next, in that order.)

Gradient scale: each rank's loss is the mean over its own tokens, and the training loss is
the mean over ranks. A dense gradient is therefore averaged over the world. An expert's
gradient already sums the contributions of every rank in its EP group (the all-to-all
backward brings them home), so it is summed over the ranks that hold the same expert (the
`dp` axis) and divided by the world size, not by dp; dividing by dp is the classic bug that
makes EP>1 gradients ep times too large.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainer.dispatch import AllToAllDispatcher, LocalDispatcher
from trainer.mesh import Mesh
from trainer.model import Transformer
from trainer.moe import GroupedExperts


def parallelize(model: Transformer, mesh: Mesh) -> Transformer:
    """Applies expert parallelism in place (see the module docstring for the order)."""
    world = mesh.group("world") if mesh.world_size > 1 else None
    for moe in model.moe_layers():
        E = moe.cfg.num_experts
        if mesh.ep > 1:
            ep_group = mesh.group("ep")
            assert ep_group is not None, "EP > 1 needs an initialized process group"
            dispatcher = AllToAllDispatcher(E, ep_group=ep_group, batch_group=world)
            moe.experts.shard(
                expert_offset=dispatcher.expert_offset, num_local=dispatcher.num_local_experts
            )
            moe.dispatcher = dispatcher
        else:
            moe.dispatcher = LocalDispatcher(E, batch_group=world)
    return model


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, expert parameters), each in a stable order."""
    expert_ids = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    dense, experts = [], []
    for p in model.parameters():
        if p.requires_grad:
            (experts if id(p) in expert_ids else dense).append(p)
    return dense, experts


def _all_reduce_(params: list[nn.Parameter], group: dist.ProcessGroup | None, scale: float) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def sync_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Dense grads averaged over the world; expert grads summed over dp, divided by world."""
    if mesh.world_size == 1:
        return
    dense, experts = split_params(model)
    _all_reduce_(dense, mesh.group("world"), 1.0 / mesh.world_size)
    _all_reduce_(experts, mesh.group("dp") if mesh.dp > 1 else None, 1.0 / mesh.world_size)


def clip_grad_norm_(model: nn.Module, mesh: Mesh, max_norm: float) -> Tensor:
    """Clips by the global norm over dense and expert gradients; returns the norm (fp32).

    After `sync_gradients` dense grads are the same on every rank and each expert lives on
    one rank of its EP group, so the global square norm is the dense part plus the EP-group
    sum of the expert parts.
    """
    dense, experts = split_params(model)

    def sq(params: list[nn.Parameter]) -> Tensor:
        norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        if not norms:
            return torch.zeros((), device=next(model.parameters()).device)
        return torch.stack(norms).square().sum()

    expert_sq = sq(experts)
    if mesh.ep > 1:
        dist.all_reduce(expert_sq, group=mesh.group("ep"))
    total = (sq(dense) + expert_sq).sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in dense + experts:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
