"""Token dispatch: how (token, expert) pairs reach their experts and come back.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts in total, L experts on
this rank (E / ep), P kept (token, expert) pairs sent by this rank, R pairs received by this
rank's experts.

Two implementations behind one interface. `LocalDispatcher` (EP=1) sorts the pairs by expert
and hands them to the grouped GEMM. `AllToAllDispatcher` (EP>1) sorts by global expert,
exchanges per-expert counts, moves the rows with `all_to_all_single` through autograd-aware
functional collectives, regroups them by local expert, and reverses all of it on the way
back. Both combine in fp32, weighted by the routing scores. Model code calls a dispatcher and
never holds a process group itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs from dispatch, handed over explicitly.

    token_idx_P: source token of each kept pair, in expert-sorted order.
    weights_P: fp32 combine weight of each kept pair, same order.
    num_tokens: T, the rows of the output.
    send_splits / recv_splits: rows sent to / received from each EP rank (all-to-all only).
    regroup_P: permutation from source-major received rows to local-expert-major rows.
    """

    token_idx_P: Tensor
    weights_P: Tensor
    num_tokens: int
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup_R: Tensor | None = None


def sort_pairs(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the flattened (token, k) pairs by expert id.

    Dropped pairs carry the id `num_experts` and sort last. Returns the pair order, the source
    token of each sorted pair, and per-expert counts (dropped pairs not counted).
    """
    flat_P = ids_TK.reshape(-1)
    order_P = torch.argsort(flat_P, stable=True)
    token_idx_P = order_P // ids_TK.shape[1]
    counts_E = torch.bincount(flat_P, minlength=num_experts + 1)[:num_experts]
    return order_P, token_idx_P, counts_E


def weighted_combine(y_PD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
    """out[t] = sum over t's pairs of weight * expert output, accumulated in fp32."""
    y_PD = y_PD.float() * meta.weights_P.unsqueeze(1)
    out_TD = y_PD.new_zeros(meta.num_tokens, y_PD.shape[1])
    out_TD.index_add_(0, meta.token_idx_P, y_PD)
    return out_TD.to(out_dtype)


class TokenDispatcher:
    """Interface: dispatch rows to this rank's experts, combine their outputs back."""

    num_experts: int
    num_local_experts: int
    expert_offset: int  # global id of this rank's first expert

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        """Returns rows grouped by local expert [R, D], rows per local expert [L], and meta.

        ids_TK holds global expert ids; a pair with id num_experts is dropped.
        """
        raise NotImplementedError

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        """Expert outputs [R, D] back to the tokens: [T, D]."""
        raise NotImplementedError

    def sum_over_batch(self, t: Tensor) -> Tensor:
        """Sum of `t` over every rank that holds a part of the global batch (no grad)."""
        raise NotImplementedError


class LocalDispatcher(TokenDispatcher):
    """EP=1: every expert is local. `batch_group` spans the data-parallel ranks (or None)."""

    def __init__(self, num_experts: int, *, batch_group: dist.ProcessGroup | None = None) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.expert_offset = 0
        self.batch_group = batch_group

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        order_P, token_idx_P, counts_E = sort_pairs(ids_TK, self.num_experts)
        weights_P = weights_TK.reshape(-1)[order_P].float()
        # Dropped pairs sort last; their rows are gathered but get no expert and weight 0,
        # so no host sync is needed to find how many were kept.
        kept_P = ids_TK.reshape(-1)[order_P] < self.num_experts
        weights_P = torch.where(kept_P, weights_P, 0.0)
        meta = DispatchMeta(token_idx_P=token_idx_P, weights_P=weights_P, num_tokens=x_TD.shape[0])
        return x_TD[token_idx_P], counts_E, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        # Rows past the last expert's offset are not written by the grouped GEMM: mask them
        # rather than multiply, since uninitialised memory may hold NaN.
        y_RD = torch.where(meta.weights_P.unsqueeze(1) != 0, y_RD, 0.0)
        return weighted_combine(y_RD, meta, out_dtype)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        if self.batch_group is None:
            return t
        t = t.detach().clone()
        dist.all_reduce(t, group=self.batch_group)
        return t


class AllToAllDispatcher(TokenDispatcher):
    """EP>1: experts are split over the ranks of `ep_group`, consecutive global ids per rank."""

    def __init__(
        self,
        num_experts: int,
        *,
        ep_group: dist.ProcessGroup,
        batch_group: dist.ProcessGroup | None,
    ) -> None:
        self.ep_group = ep_group
        self.batch_group = batch_group
        self.ep = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({self.ep})")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep
        self.expert_offset = self.ep_rank * self.num_local_experts

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep, L = self.ep, self.num_local_experts
        order_P, token_idx_P, counts_E = sort_pairs(ids_TK, self.num_experts)
        send_counts_EL = counts_E.view(ep, L)
        recv_counts_EL = torch.empty_like(send_counts_EL)
        dist.all_to_all_single(recv_counts_EL, send_counts_EL, group=self.ep_group)
        # Device-to-host sync: the split sizes of the all-to-all must be known on the host.
        send_splits = send_counts_EL.sum(1).tolist()
        recv_splits = recv_counts_EL.sum(1).tolist()
        num_kept = sum(send_splits)
        token_idx_P = token_idx_P[:num_kept]
        weights_P = weights_TK.reshape(-1)[order_P[:num_kept]].float()

        x_recv_RD = all_to_all_single_autograd(
            x_TD[token_idx_P], recv_splits, send_splits, group=self.ep_group
        )
        # Received rows are source-major ([src][local expert]); the grouped GEMM wants them
        # local-expert-major ([local expert][src]).
        chunk_R = torch.repeat_interleave(
            torch.arange(ep * L, device=x_TD.device), recv_counts_EL.reshape(-1)
        )
        src_R, local_R = chunk_R // L, chunk_R % L
        regroup_R = torch.argsort(local_R * ep + src_R, stable=True)
        meta = DispatchMeta(
            token_idx_P=token_idx_P,
            weights_P=weights_P,
            num_tokens=x_TD.shape[0],
            send_splits=send_splits,
            recv_splits=recv_splits,
            regroup_R=regroup_R,
        )
        return x_recv_RD[regroup_R], recv_counts_EL.sum(0), meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        assert meta.regroup_R is not None and meta.send_splits is not None
        # Back to source-major order: one gather through the inverse permutation.
        inverse_R = torch.empty_like(meta.regroup_R)
        inverse_R[meta.regroup_R] = torch.arange(len(inverse_R), device=inverse_R.device)
        y_src_RD = y_RD[inverse_R]
        y_PD = all_to_all_single_autograd(
            y_src_RD, meta.send_splits, meta.recv_splits, group=self.ep_group
        )
        return weighted_combine(y_PD, meta, out_dtype)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        t = t.detach().clone()
        if self.batch_group is not None:
            dist.all_reduce(t, group=self.batch_group)
        return t
