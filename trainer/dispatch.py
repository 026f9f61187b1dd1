"""Token dispatch: how (token, expert) pairs reach their experts and come back.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts in total, L experts on
this rank (E / ep), P = T * K (token, expert) pairs of this rank (token-major: pair
p = t * K + k), S the same pairs sorted by expert, R rows received by this rank's experts.

Two implementations behind one interface. `LocalDispatcher` (EP=1) sorts the pairs by expert
and hands them to the grouped GEMM. `AllToAllDispatcher` (EP>1) sorts by global expert,
exchanges per-expert counts, moves the rows with `all_to_all_single` through autograd-aware
functional collectives, regroups them by local expert, and reverses all of it on the way
back. Model code calls a dispatcher and never holds a process group itself.

The token rows are copied once on the way in (one gather from tokens to expert-sorted rows)
and read once on the way out (K gathers of [T, D], one per k, multiply-added into an fp32
[T, D]: no [T * K, D] weighted or fp32 copy). Each gather is a custom autograd function
whose backward is again a gather through the inverse permutation, so neither direction
scatters with `index_add_`: the whole path is deterministic on CUDA, forward and backward,
and needs no `train.deterministic` switch.

Dropped pairs (capacity) carry the id E, sort last, and their rows are zeros in the forward;
their gradients are masked to zero in the backward, so the rows the grouped GEMM leaves
unwritten past its last offset (uninitialised memory) never reach a token's gradient.

Host syncs: none at EP=1; one per layer at EP>1 (the split sizes, both directions, in one
copy). `tests/test_moe_sync.py` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs from dispatch, handed over explicitly.

    order_S: pair index of each expert-sorted row; pos_P: sorted row of each pair (its
        inverse).
    weights_TK: fp32 combine weights, 0 for dropped pairs.
    keep_P: token-major mask of kept pairs; None when no pair can have been dropped.
    send_splits / recv_splits: rows sent to / received from each EP rank (all-to-all only).
    regroup_R / ungroup_R: source-major received rows -> local-expert-major and back.
    """

    order_S: Tensor
    pos_P: Tensor
    weights_TK: Tensor
    keep_P: Tensor | None
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    regroup_R: Tensor | None = None
    ungroup_R: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.weights_TK.shape[0]


def expert_counts(ids_TK: Tensor, num_bins: int) -> Tensor:
    """Pairs per expert id in [0, num_bins) as int64 [num_bins], without a host sync.

    `torch.bincount` sizes its output from the largest id, which costs a device-to-host copy
    on CUDA; a scatter-add into a fixed-size tensor does not (and integer adds are exact in
    any order).
    """
    flat_P = ids_TK.reshape(-1)
    counts = torch.zeros(num_bins, dtype=torch.int64, device=flat_P.device)
    return counts.scatter_add_(0, flat_P, torch.ones_like(flat_P))


def sort_pairs(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable sort of the flattened (token, k) pairs by expert id.

    Dropped pairs carry the id `num_experts` and sort last. Returns order_S (pair of each
    sorted row), pos_P (sorted row of each pair) and per-expert counts [E] (dropped pairs not
    counted). No host sync.
    """
    flat_P = ids_TK.reshape(-1)
    order_S = torch.argsort(flat_P, stable=True)
    pos_P = torch.empty_like(order_S)
    pos_P[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    counts_E = expert_counts(ids_TK, num_experts + 1)[:num_experts]
    return order_S, pos_P, counts_E


class _ReplicateRows(torch.autograd.Function):
    """rows_S[s] = x_TD[order_S[s] // K], zero for dropped pairs.

    Backward: grad_x[t] = sum over k of grad_rows[pos_P[t * K + k]], K gathers of [T, D]
    summed in place (no scatter, and no [T * K, D] temporary), the dropped pairs' gradient
    rows masked out first.
    """

    @staticmethod
    def forward(
        ctx: Any, x_TD: Tensor, order_S: Tensor, pos_P: Tensor, keep_P: Tensor | None, top_k: int
    ) -> Tensor:
        rows_SD = x_TD.index_select(0, order_S // top_k)
        if keep_P is not None:
            rows_SD.masked_fill_(~keep_P[order_S].unsqueeze(1), 0)
        ctx.save_for_backward(pos_P, keep_P)
        ctx.top_k = top_k
        return rows_SD

    @staticmethod
    def backward(ctx: Any, grad_SD: Tensor) -> tuple[Tensor | None, ...]:
        pos_P, keep_P = ctx.saved_tensors
        pos_TK = pos_P.view(-1, ctx.top_k)
        keep_TK = None if keep_P is None else keep_P.view(-1, ctx.top_k)
        grad_TD = _gather_pairs(grad_SD, pos_TK, keep_TK, 0)
        for k in range(1, ctx.top_k):
            grad_TD += _gather_pairs(grad_SD, pos_TK, keep_TK, k)
        return grad_TD, None, None, None, None


def _gather_pairs(rows_SD: Tensor, pos_TK: Tensor, keep_TK: Tensor | None, k: int) -> Tensor:
    """The sorted row of every token's k-th pair: [T, D], zero where that pair was dropped
    (masked_fill, not a multiply: rows the grouped GEMM left unwritten may hold NaN)."""
    out_TD = rows_SD.index_select(0, pos_TK[:, k])
    if keep_TK is not None:
        out_TD.masked_fill_(~keep_TK[:, k : k + 1], 0)
    return out_TD


class _Combine(torch.autograd.Function):
    """out[t] = sum over k of w[t, k] * y[pos[t, k]], accumulated in fp32.

    Forward: K gathers of [T, D], multiply-added into one fp32 [T, D] (no [T * K, D] copy,
    no fp32 copy of bf16 rows). Backward: one gather g[s] = grad_out[token of s]; then
    grad_w[s] = <y[s], g[s]> (row chunks of T) and grad_y[s] = w[s] * g[s] in place. No
    scatter.
    """

    @staticmethod
    def forward(
        ctx: Any,
        y_SD: Tensor,
        weights_TK: Tensor,
        order_S: Tensor,
        pos_P: Tensor,
        keep_P: Tensor | None,
    ) -> Tensor:
        T, K = weights_TK.shape
        pos_TK = pos_P.view(T, K)
        keep_TK = None if keep_P is None else keep_P.view(T, K)
        out_TD = torch.zeros(T, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
        for k in range(K):
            out_TD.addcmul_(_gather_pairs(y_SD, pos_TK, keep_TK, k), weights_TK[:, k : k + 1])
        ctx.save_for_backward(y_SD, weights_TK, order_S, pos_P, keep_P)
        return out_TD

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor | None, ...]:
        y_SD, weights_TK, order_S, pos_P, keep_P = ctx.saved_tensors
        T, K = weights_TK.shape
        # g_S[s] = grad_out[token of s]: one gather serves both gradients.
        g_SD = grad_TD.index_select(0, order_S // K)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # <y[s], grad_out[token of s]> in row chunks: no [T * K, D] product at once.
            dot_S = torch.cat(
                [
                    torch.linalg.vecdot(y_c.to(g_c.dtype), g_c)
                    for y_c, g_c in zip(y_SD.split(T), g_SD.split(T), strict=True)
                ]
            )
            if keep_P is not None:
                # masked_fill, not a multiply: dropped rows may hold NaN.
                dot_S.masked_fill_(~keep_P.index_select(0, order_S), 0)
            grad_w = dot_S.index_select(0, pos_P).view(T, K)
        grad_y = None
        if ctx.needs_input_grad[0]:
            # Dropped pairs have weight 0, so their rows get a zero gradient.
            w_S = weights_TK.reshape(-1).index_select(0, order_S).unsqueeze(1)
            grad_y = g_SD.mul_(w_S).to(y_SD.dtype)
        return grad_y, grad_w, None, None, None


class _PermuteRows(torch.autograd.Function):
    """out[i] = x[idx[i]] for a permutation idx, rows outside keep zeroed; backward gathers
    through the inverse permutation inv_idx."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, idx: Tensor, inv_idx: Tensor, keep: Tensor | None) -> Tensor:
        out = x.index_select(0, idx)
        if keep is not None:
            out.masked_fill_(~keep.unsqueeze(1), 0)
        ctx.save_for_backward(inv_idx, keep)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        inv_idx, keep = ctx.saved_tensors
        if keep is not None:
            grad = grad.masked_fill(~keep.unsqueeze(1), 0)
        return grad.index_select(0, inv_idx), None, None, None


def permute_rows(x: Tensor, idx: Tensor, inv_idx: Tensor, keep: Tensor | None = None) -> Tensor:
    """x[idx] for a permutation `idx` whose inverse is `inv_idx`; rows where `keep` is False
    are zeros (and get no gradient). The backward is a gather, not a scatter."""
    return _PermuteRows.apply(x, idx, inv_idx, keep)


def replicate_rows(
    x_TD: Tensor, order_S: Tensor, pos_P: Tensor, keep_P: Tensor | None, top_k: int
) -> Tensor:
    """Each token's row once per pair, in expert-sorted order: [T * K, D] (see _ReplicateRows)."""
    return _ReplicateRows.apply(x_TD, order_S, pos_P, keep_P, top_k)


def weighted_combine(y_SD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
    """out[t] = sum over t's pairs of weight * expert output, accumulated in fp32.

    y_SD: expert outputs of all T * K pairs in expert-sorted order (rows of dropped pairs may
    hold anything, NaN included: they are masked, never multiplied). See `_Combine`.
    """
    out_TD = _Combine.apply(y_SD, meta.weights_TK, meta.order_S, meta.pos_P, meta.keep_P)
    return out_TD.to(out_dtype)


def _pairs(
    ids_TK: Tensor, weights_TK: Tensor, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Sort the pairs; the keep mask is None when no id marks a drop (decided by the caller's
    knowledge of capacity, never by reading the ids on the host)."""
    order_S, pos_P, counts_E = sort_pairs(ids_TK, num_experts)
    keep_P = ids_TK.reshape(-1) < num_experts
    weights_TK = torch.where(keep_P.view_as(ids_TK), weights_TK.float(), 0.0)
    return order_S, pos_P, counts_E, keep_P, weights_TK


class TokenDispatcher:
    """Interface: dispatch rows to this rank's experts, combine their outputs back."""

    num_experts: int
    num_local_experts: int
    expert_offset: int  # global id of this rank's first expert

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, *, may_drop: bool = True
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        """Returns rows grouped by local expert [R, D], rows per local expert [L], and meta.

        ids_TK holds global expert ids; a pair with id num_experts is dropped (zero row, no
        gradient). may_drop=False promises that no id is num_experts (dropless routing) and
        skips the masks.
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
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, *, may_drop: bool = True
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        order_S, pos_P, counts_E, keep_P, w_TK = _pairs(ids_TK, weights_TK, self.num_experts)
        keep_P = keep_P if may_drop else None
        # Dropped pairs sort last: their rows stay in the buffer past the last offset, as
        # zeros, so the count of kept pairs never has to reach the host.
        rows_SD = replicate_rows(x_TD, order_S, pos_P, keep_P, ids_TK.shape[1])
        meta = DispatchMeta(order_S=order_S, pos_P=pos_P, weights_TK=w_TK, keep_P=keep_P)
        return rows_SD, counts_E, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        return weighted_combine(y_RD, meta, out_dtype)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        if self.batch_group is None:
            return t
        return funcol.all_reduce(t.detach(), "sum", group=self.batch_group).wait()


def regroup_indices(recv_counts_SL: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Permutations between source-major received rows ([src][local expert]) and the
    local-expert-major order the grouped GEMM wants ([local expert][src]).

    recv_counts_SL: rows received from each source rank for each local expert [ep, L];
    num_rows: their sum, known on the host (so `repeat_interleave` needs no sync). Returns
    (regroup_R, ungroup_R): local_major = recv[regroup_R], recv = local_major[ungroup_R].
    """
    ep, L = recv_counts_SL.shape
    dev = recv_counts_SL.device
    flat_C = recv_counts_SL.reshape(-1)
    src_start_C = torch.cumsum(flat_C, 0) - flat_C
    counts_LS = recv_counts_SL.t().reshape(-1)
    dst_start_C = (torch.cumsum(counts_LS, 0) - counts_LS).view(L, ep).t().reshape(-1)
    chunk_R = torch.repeat_interleave(
        torch.arange(ep * L, device=dev), flat_C, output_size=num_rows
    )
    # Received row r of chunk c lands at the same offset inside c's local-expert-major slot.
    ungroup_R = torch.arange(num_rows, device=dev) - src_start_C[chunk_R] + dst_start_C[chunk_R]
    regroup_R = torch.empty_like(ungroup_R)
    regroup_R[ungroup_R] = torch.arange(num_rows, device=dev)
    return regroup_R, ungroup_R


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
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, *, may_drop: bool = True
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep, L = self.ep, self.num_local_experts
        order_S, pos_P, counts_E, keep_P, w_TK = _pairs(ids_TK, weights_TK, self.num_experts)
        keep_P = keep_P if may_drop else None
        send_counts_SL = counts_E.view(ep, L)
        # Functional (out-of-place) collectives here and in sum_over_batch: selective
        # activation checkpointing keeps their outputs, and a recompute reuses them instead
        # of issuing the collective again; an in-place one would leave its buffer unwritten.
        recv_pending = funcol.all_to_all_single(send_counts_SL, None, None, group=self.ep_group)
        # The rows are gathered while the counts travel (the wait orders streams on NCCL; it
        # is not a host sync).
        rows_SD = replicate_rows(x_TD, order_S, pos_P, keep_P, ids_TK.shape[1])
        recv_counts_SL = funcol.wait_tensor(recv_pending)
        # The one device-to-host sync of the layer: both directions' split sizes in one copy.
        splits = (
            torch.cat([send_counts_SL.sum(1), recv_counts_SL.sum(1)]).to("cpu", copy=True).tolist()
        )
        send_splits, recv_splits = splits[:ep], splits[ep:]
        num_kept = sum(send_splits)
        # Kept rows are a prefix of the sorted buffer: the view costs no copy.
        send_SD = rows_SD if num_kept == rows_SD.shape[0] else rows_SD[:num_kept]
        x_recv_RD = all_to_all_single_autograd(
            send_SD, recv_splits, send_splits, group=self.ep_group
        )
        regroup_R, ungroup_R = regroup_indices(recv_counts_SL, sum(recv_splits))
        meta = DispatchMeta(
            order_S=order_S,
            pos_P=pos_P,
            weights_TK=w_TK,
            keep_P=keep_P,
            send_splits=send_splits,
            recv_splits=recv_splits,
            regroup_R=regroup_R,
            ungroup_R=ungroup_R,
        )
        return permute_rows(x_recv_RD, regroup_R, ungroup_R), recv_counts_SL.sum(0), meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        assert meta.regroup_R is not None and meta.ungroup_R is not None
        assert meta.send_splits is not None and meta.recv_splits is not None
        y_src_RD = permute_rows(y_RD, meta.ungroup_R, meta.regroup_R)
        y_SD = all_to_all_single_autograd(
            y_src_RD, meta.send_splits, meta.recv_splits, group=self.ep_group
        )
        num_pairs = meta.pos_P.shape[0]
        if y_SD.shape[0] < num_pairs:
            # Dropped pairs were not sent; their rows come back as zeros (masked anyway).
            y_SD = torch.cat([y_SD, y_SD.new_zeros(num_pairs - y_SD.shape[0], y_SD.shape[1])])
        return weighted_combine(y_SD, meta, out_dtype)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        if self.batch_group is None:
            return t.detach().clone()
        return funcol.all_reduce(t.detach(), "sum", group=self.batch_group).wait()
