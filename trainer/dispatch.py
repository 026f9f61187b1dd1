"""Token dispatch: how (token, expert) pairs reach their experts and come back.

Shape legend: T tokens on this rank, D model dim, K top-k, E experts in total, L experts on
this rank (E / ep), P = T * K (token, expert) pairs of this rank (token-major: pair
p = t * K + k), S the same pairs sorted by expert, R rows received by this rank's experts.

Two implementations behind one interface. `LocalDispatcher` (EP=1) sorts the pairs by expert
and hands them to the grouped GEMM. `AllToAllDispatcher` (EP>1) sorts by global expert,
exchanges per-expert counts, sends each rank the rows of its experts and returns their outputs
the same way. Model code calls a dispatcher and never holds a process group itself.

The token rows are copied once on the way in (one gather from tokens to expert-sorted rows)
and read once on the way out: the combine (`trainer.kernels.combine`) reads each token's K
expert rows once, multiplies them by fp32 weights, sums in fp32 and writes the token once in
the output dtype (a Triton kernel on CUDA; its twin, one fused `F.embedding_bag` for fp32
rows, elsewhere); there is no [T * K, D] weighted or fp32 copy. The indices both directions
need (the token of each sorted row, the sorted row of each pair) are derived once per layer
in `DispatchMeta` and reused by the backward. Each direction's backward is again a gather
(or a gather-sum) through the inverse permutation, so neither direction scatters with
`index_add_`: the whole path is deterministic on CUDA, forward and backward, and needs no
`train.deterministic` switch.

Between ranks (`parallel.ep_exchange`):
- `p2p` sends every (rank, local expert) chunk of rows straight to its place: the receiver
  gets them already grouped by local expert, the grouped GEMM's order, and the outputs go
  back into the sender's expert-sorted order. No regroup copy on either side; ep x L
  point-to-point messages per direction. On the way in the gather and the send are one op
  (`ep_dispatch`): the rows for other ranks are gathered and sent, then this rank's own
  rows are gathered straight into place while the messages travel. The way back is
  `ep_exchange`. Both are custom ops with their own backward.
- `all_to_all` moves each rank's rows with one `all_to_all_single` per direction, then
  regroups the received rows by local expert and back (two more row copies). One collective
  per direction, the usual shape on NCCL, where a copy at HBM speed costs a fraction of the
  transfer.
- `auto` (default): `p2p` on gloo, where every copy runs on the cores the transfer needs,
  `all_to_all` on NCCL.

Dropped pairs (capacity) carry the id E and sort last. Their rows are zeros in the forward
and are never sent; the combine reads a kept row in their place with weight 0 (capacity keeps
at least one pair per rank, and that pair sorts first), and their gradients are masked to
zero in the backward, so the rows the grouped GEMM leaves unwritten past its last offset
(uninitialised memory) never reach a token or its gradient.

Host syncs: none at EP=1; one per layer at EP>1 (the split sizes, both directions, in one
copy). `tests/test_moe_sync.py` counts them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

from trainer.kernels import combine


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs from dispatch, handed over explicitly.

    order_S: pair index of each expert-sorted row; pos_P: sorted row of each pair (its
        inverse).
    weights_TK: fp32 combine weights, 0 for dropped pairs.
    keep_P: token-major mask of kept pairs; None when no pair can have been dropped.
    send_SL / recv_SL: rows sent to each EP rank for each of its local experts / received
        from each EP rank for each local expert, flattened [ep * L] (EP>1 only).
    regroup_R / ungroup_R: source-major received rows -> local-expert-major and back
        (`all_to_all` exchange only).

    Derived once per layer, here, and read by both directions' forward and backward:
    token_S: the token of each sorted row (order_S // K); pos_TK: the sorted row of each
        pair, a dropped pair pointed at row 0 (see `_safe_pos`); keep_TK: keep_P as [T, K].
    """

    order_S: Tensor
    pos_P: Tensor
    weights_TK: Tensor
    keep_P: Tensor | None
    send_SL: list[int] | None = None
    recv_SL: list[int] | None = None
    regroup_R: Tensor | None = None
    ungroup_R: Tensor | None = None
    token_S: Tensor = dataclasses.field(init=False, repr=False)
    pos_TK: Tensor = dataclasses.field(init=False, repr=False)
    keep_TK: Tensor | None = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        T, K = self.weights_TK.shape
        keep_TK = None if self.keep_P is None else self.keep_P.view(T, K)
        object.__setattr__(self, "token_S", self.order_S // K)
        object.__setattr__(self, "pos_TK", _safe_pos(self.pos_P, self.keep_P).view(T, K))
        object.__setattr__(self, "keep_TK", keep_TK)

    def evolve(self, **changes: Any) -> DispatchMeta:
        """A copy with the exchange fields in `changes` set (send_SL, recv_SL, regroup_R,
        ungroup_R); the derived indices are kept, not computed again."""
        assert set(changes) <= {"send_SL", "recv_SL", "regroup_R", "ungroup_R"}, changes
        new = copy.copy(self)
        for k, v in changes.items():
            object.__setattr__(new, k, v)
        return new

    @property
    def num_tokens(self) -> int:
        return self.weights_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.weights_TK.shape[1]


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
    """rows_S[s] = x_TD[token_S[s]], zero for dropped pairs.

    Backward: grad_x[t] = sum over k of grad_rows[pos_TK[t, k]], one fused gather-sum
    (`F.embedding_bag`, no scatter and no [T * K, D] temporary); a dropped pair reads a kept
    row with weight 0, so a gradient row the grouped GEMM left unwritten never enters the sum.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x_TD: Tensor,
        token_S: Tensor,
        order_S: Tensor,
        pos_TK: Tensor,
        keep_P: Tensor | None,
    ) -> Tensor:
        rows_SD = x_TD.index_select(0, token_S)
        if keep_P is not None:
            # Out of place: under torch.compile, torch 2.11's dynamo gives a wrong input
            # gradient for an autograd.Function whose forward mutates, in place, the tensor
            # it returns (2.13 does not; tests/test_moe_fused.py holds the compiled layer
            # with drops to eager). The extra [R, D] lives only until the forward returns.
            rows_SD = rows_SD.masked_fill(~keep_P[order_S].unsqueeze(1), 0)
        ctx.save_for_backward(pos_TK, keep_P)
        return rows_SD

    @staticmethod
    def backward(ctx: Any, grad_SD: Tensor) -> tuple[Tensor | None, ...]:
        pos_TK, keep_P = ctx.saved_tensors
        keep_w = None if keep_P is None else keep_P.view_as(pos_TK).to(grad_SD.dtype)
        grad_TD = F.embedding_bag(pos_TK, grad_SD, mode="sum", per_sample_weights=keep_w)
        return grad_TD, None, None, None, None


def _safe_pos(pos_P: Tensor, keep_P: Tensor | None) -> Tensor:
    """pos_P with every dropped pair pointed at sorted row 0, a kept pair's row (kept pairs
    sort first, and capacity keeps at least one), so that reading it is always in range and
    finite; the caller gives those reads weight 0."""
    if keep_P is None:
        return pos_P
    return torch.where(keep_P, pos_P, 0)


class _PermuteRows(torch.autograd.Function):
    """out[i] = x[idx[i]] for a permutation idx; backward gathers through the inverse
    permutation inv_idx."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, idx: Tensor, inv_idx: Tensor) -> Tensor:
        ctx.save_for_backward(inv_idx)
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        (inv_idx,) = ctx.saved_tensors
        return grad.index_select(0, inv_idx), None, None


def permute_rows(x: Tensor, idx: Tensor, inv_idx: Tensor) -> Tensor:
    """x[idx] for a permutation `idx` whose inverse is `inv_idx`. The backward is a gather,
    not a scatter."""
    return _PermuteRows.apply(x, idx, inv_idx)


def replicate_rows(x_TD: Tensor, meta: DispatchMeta) -> Tensor:
    """Each token's row once per pair, in expert-sorted order: [T * K, D] (see _ReplicateRows)."""
    return _ReplicateRows.apply(x_TD, meta.token_S, meta.order_S, meta.pos_TK, meta.keep_P)


def weighted_combine(
    y_SD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype, *, backend: str = "auto"
) -> Tensor:
    """out[t] = sum over t's pairs of weight * expert output, accumulated in fp32, as
    out_dtype.

    y_SD: expert outputs in expert-sorted order, at least the kept pairs' rows (rows of
    dropped pairs, where present, may hold anything, NaN included: they are never read).
    One pass over the K rows of each token (`trainer.kernels.combine`: a Triton kernel on
    CUDA, its twin elsewhere, chosen by `backend`); the backward is one pass over the rows.
    """
    # A dropped pair reads row 0: its weight must be 0, whatever the caller passed.
    w_TK = meta.weights_TK
    if meta.keep_TK is not None:
        w_TK = w_TK.masked_fill(~meta.keep_TK, 0)
    return combine(
        y_SD,
        w_TK,
        token_S=meta.token_S,
        order_S=meta.order_S,
        pos_TK=meta.pos_TK,
        keep_TK=meta.keep_TK,
        out_dtype=out_dtype,
        backend=backend,
    )


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
    kernel_backend = "auto"  # the combine's (`trainer.kernels`); tests pick "torch"/"triton"

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
        meta = DispatchMeta(order_S=order_S, pos_P=pos_P, weights_TK=w_TK, keep_P=keep_P)
        # Dropped pairs sort last: their rows stay in the buffer past the last offset, as
        # zeros, so the count of kept pairs never has to reach the host.
        return replicate_rows(x_TD, meta), counts_E, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        return weighted_combine(y_RD, meta, out_dtype, backend=self.kernel_backend)

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


def _chunk_starts(counts_SL: list[int], ep: int, L: int, *, expert_major: bool) -> list[int]:
    """Start row of chunk (rank p, local expert j), at index p * L + j, in a buffer ordered
    rank-major ([p][j], the expert-sorted order of the sender) or expert-major ([j][p], the
    grouped GEMM's order of the receiver)."""
    if expert_major:
        order = [(p, j) for j in range(L) for p in range(ep)]
    else:
        order = [(p, j) for p in range(ep) for j in range(L)]
    starts = [0] * (ep * L)
    row = 0
    for p, j in order:
        starts[p * L + j] = row
        row += counts_SL[p * L + j]
    return starts


def _ep_group(group_name: str, counts_SL: list[int]) -> tuple[dist.ProcessGroup, int, int, int]:
    """(group, ep, this rank in it, local experts per rank) for chunk sizes [ep * L]."""
    group = dist.distributed_c10d._resolve_process_group(group_name)  # type: ignore[arg-type]
    ep = dist.get_world_size(group)
    return group, ep, dist.get_rank(group), len(counts_SL) // ep


def _post_chunks(
    group: dist.ProcessGroup,
    send_ND: Tensor,
    send_starts: list[int],
    send_counts: list[int],
    out_ND: Tensor,
    out_starts: list[int],
    out_counts: list[int],
) -> list[Any]:
    """Posts the chunk (p, j) of send_ND to rank p and the chunk (p, j) of out_ND from rank p,
    for every other rank p of `group` and local expert j (tag j; empty chunks skipped, which
    both sides agree on). Returns the works to wait for."""
    ep, me = dist.get_world_size(group), dist.get_rank(group)
    L = len(send_counts) // ep
    ops = []
    for p in range(ep):
        if p == me:
            continue
        peer = dist.get_global_rank(group, p)
        for j in range(L):
            c = p * L + j
            if send_counts[c]:
                chunk = send_ND[send_starts[c] : send_starts[c] + send_counts[c]]
                ops.append(dist.P2POp(dist.isend, chunk, peer, group, tag=j))
            if out_counts[c]:
                chunk = out_ND[out_starts[c] : out_starts[c] + out_counts[c]]
                ops.append(dist.P2POp(dist.irecv, chunk, peer, group, tag=j))
    return dist.batch_isend_irecv(ops) if ops else []


def _exchange(
    x_ND: Tensor, send_SL: list[int], recv_SL: list[int], group_name: str, to_experts: bool
) -> Tensor:
    group, ep, me, L = _ep_group(group_name, send_SL)
    # to_experts: send rank-major chunks of send_SL, receive expert-major chunks of recv_SL.
    # Back: send expert-major chunks of recv_SL, receive rank-major chunks of send_SL.
    out_counts, in_counts = (recv_SL, send_SL) if to_experts else (send_SL, recv_SL)
    in_starts = _chunk_starts(in_counts, ep, L, expert_major=not to_experts)
    out_starts = _chunk_starts(out_counts, ep, L, expert_major=to_experts)
    out_ND = x_ND.new_empty(sum(out_counts), x_ND.shape[1])
    works = _post_chunks(group, x_ND, in_starts, in_counts, out_ND, out_starts, out_counts)
    # This rank's own chunks move while the messages travel.
    for j in range(L):
        c = me * L + j
        n = in_counts[c]
        out_ND[out_starts[c] : out_starts[c] + n].copy_(x_ND[in_starts[c] : in_starts[c] + n])
    for w in works:
        w.wait()
    return out_ND


@torch.library.custom_op("moeyard::ep_exchange", mutates_args=())
def ep_exchange(
    x_ND: Tensor, send_SL: list[int], recv_SL: list[int], group_name: str, to_experts: bool
) -> Tensor:
    """Moves token rows between the EP ranks of `group_name`, chunk by chunk, straight to
    where they belong.

    to_experts=True: x_ND is this rank's kept rows in expert-sorted order (rank-major chunks
    of send_SL); returns the rows of this rank's experts grouped by local expert
    (expert-major chunks of recv_SL: [local expert][source rank]). to_experts=False is the
    way back (and the adjoint: each direction's backward is the other one). send_SL[p * L + j]
    rows go from this rank to rank p's local expert j; recv_SL[p * L + j] come from rank p
    for this rank's local expert j. A custom op, so that selective activation checkpointing
    can keep its output and `torch.compile` treats it as one opaque call.
    """
    x_ND = x_ND.contiguous()
    return _exchange(x_ND, send_SL, recv_SL, group_name, to_experts)


@ep_exchange.register_fake
def _(
    x_ND: Tensor, send_SL: list[int], recv_SL: list[int], group_name: str, to_experts: bool
) -> Tensor:
    return x_ND.new_empty(sum(recv_SL if to_experts else send_SL), x_ND.shape[1])


def _ep_exchange_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, ctx.send_SL, ctx.recv_SL, ctx.group_name, ctx.to_experts = inputs


def _ep_exchange_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    back = ep_exchange(grad, ctx.send_SL, ctx.recv_SL, ctx.group_name, not ctx.to_experts)
    return back, None, None, None, None


ep_exchange.register_autograd(_ep_exchange_backward, setup_context=_ep_exchange_setup)


@torch.library.custom_op("moeyard::ep_dispatch", mutates_args=())
def ep_dispatch(
    x_TD: Tensor,
    token_S: Tensor,
    pos_TK: Tensor,
    keep_TK: Tensor | None,
    send_SL: list[int],
    recv_SL: list[int],
    group_name: str,
) -> Tensor:
    """The gather into expert order and `ep_exchange(..., to_experts=True)` in one op.

    token_S: the token of each kept row in this rank's expert-sorted order [num_kept]. The
    rows for other ranks are gathered into one send buffer and sent; this rank's own rows are
    then gathered straight into their place in the output while the messages travel (no copy
    of them through a send buffer). pos_TK (dropped pairs pointed at row 0) and keep_TK are
    for the backward: the way back, then one fused gather-sum per token, dropped pairs
    weighted 0.
    """
    group, ep, me, L = _ep_group(group_name, send_SL)
    x_TD = x_TD.contiguous()
    in_starts = _chunk_starts(send_SL, ep, L, expert_major=False)
    out_starts = _chunk_starts(recv_SL, ep, L, expert_major=True)
    own_a = in_starts[me * L]
    own_b = own_a + sum(send_SL[me * L : (me + 1) * L])
    # Rows for the other ranks, in send order with the own block cut out (chunks after it
    # start own_b - own_a rows earlier).
    send_ND = x_TD.index_select(0, torch.cat([token_S[:own_a], token_S[own_b:]]))
    send_starts = [a - (own_b - own_a if a >= own_b else 0) for a in in_starts]
    out_RD = x_TD.new_empty(sum(recv_SL), x_TD.shape[1])
    works = _post_chunks(group, send_ND, send_starts, send_SL, out_RD, out_starts, recv_SL)
    # This rank's own rows are gathered straight into place while the messages travel.
    for j in range(L):
        c = me * L + j
        n, a, b = send_SL[c], in_starts[c], out_starts[c]
        if n:
            torch.index_select(x_TD, 0, token_S[a : a + n], out=out_RD[b : b + n])
    for w in works:
        w.wait()
    return out_RD


@ep_dispatch.register_fake
def _(
    x_TD: Tensor,
    token_S: Tensor,
    pos_TK: Tensor,
    keep_TK: Tensor | None,
    send_SL: list[int],
    recv_SL: list[int],
    group_name: str,
) -> Tensor:
    return x_TD.new_empty(sum(recv_SL), x_TD.shape[1])


def _ep_dispatch_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    _, _, pos_TK, keep_TK, ctx.send_SL, ctx.recv_SL, ctx.group_name = inputs
    ctx.save_for_backward(pos_TK, keep_TK)


def _ep_dispatch_backward(ctx: Any, grad_RD: Tensor) -> tuple[Tensor | None, ...]:
    pos_TK, keep_TK = ctx.saved_tensors
    grad_SD = ep_exchange(grad_RD, ctx.send_SL, ctx.recv_SL, ctx.group_name, False)
    keep_w = None if keep_TK is None else keep_TK.to(grad_SD.dtype)
    grad_TD = F.embedding_bag(pos_TK, grad_SD, mode="sum", per_sample_weights=keep_w)
    return grad_TD, None, None, None, None, None, None


ep_dispatch.register_autograd(_ep_dispatch_backward, setup_context=_ep_dispatch_setup)

EXCHANGES = ("auto", "p2p", "all_to_all")


class AllToAllDispatcher(TokenDispatcher):
    """EP>1: experts are split over the ranks of `ep_group`, consecutive global ids per rank.

    exchange: how rows move between the ranks (see the module docstring): `p2p`,
    `all_to_all`, or `auto` (`p2p` on gloo, `all_to_all` otherwise).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        ep_group: dist.ProcessGroup,
        batch_group: dist.ProcessGroup | None,
        exchange: str = "auto",
    ) -> None:
        self.ep_group = ep_group
        self.batch_group = batch_group
        self.ep = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({self.ep})")
        if exchange not in EXCHANGES:
            raise ValueError(f"parallel.ep_exchange ({exchange!r}) must be one of {EXCHANGES}")
        if exchange == "auto":
            exchange = "p2p" if dist.get_backend(ep_group) == "gloo" else "all_to_all"
        self.exchange = exchange
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
        meta = DispatchMeta(order_S=order_S, pos_P=pos_P, weights_TK=w_TK, keep_P=keep_P)
        p2p = self.exchange == "p2p"
        if not p2p:
            # The rows are gathered while the counts travel (the wait orders streams on NCCL;
            # it is not a host sync).
            rows_SD = replicate_rows(x_TD, meta)
        recv_counts_SL = funcol.wait_tensor(recv_pending)
        # The one device-to-host sync of the layer: both directions' chunk sizes in one copy.
        counts = torch.cat([send_counts_SL.reshape(-1), recv_counts_SL.reshape(-1)])
        host = counts.to("cpu", copy=True).tolist()
        send_SL, recv_SL = host[: ep * L], host[ep * L :]
        num_kept = sum(send_SL)
        meta = meta.evolve(send_SL=send_SL, recv_SL=recv_SL)
        counts_L = recv_counts_SL.sum(0)
        if p2p:
            # Gathered and sent in one op: the kept rows (a prefix of the sorted order) are
            # all that travels, and this rank's own rows go straight into place.
            token_S = meta.token_S[:num_kept]
            group_name = self.ep_group.group_name
            x_RD = ep_dispatch(
                x_TD, token_S, meta.pos_TK, meta.keep_TK, send_SL, recv_SL, group_name
            )
            return x_RD, counts_L, meta
        # Kept rows are a prefix of the sorted buffer: the view costs no copy.
        send_SD = rows_SD if num_kept == rows_SD.shape[0] else rows_SD[:num_kept]
        send_splits, recv_splits = _per_rank(send_SL, ep), _per_rank(recv_SL, ep)
        x_recv_RD = all_to_all_single_autograd(
            send_SD, recv_splits, send_splits, group=self.ep_group
        )
        regroup_R, ungroup_R = regroup_indices(recv_counts_SL, sum(recv_splits))
        meta = meta.evolve(regroup_R=regroup_R, ungroup_R=ungroup_R)
        return permute_rows(x_recv_RD, regroup_R, ungroup_R), counts_L, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        assert meta.send_SL is not None and meta.recv_SL is not None
        # Back in this rank's expert-sorted order: the kept pairs' rows (dropped pairs were
        # not sent; the combine never reads their rows).
        if self.exchange == "p2p":
            group_name = self.ep_group.group_name
            y_SD = ep_exchange(y_RD, meta.send_SL, meta.recv_SL, group_name, False)
        else:
            assert meta.regroup_R is not None and meta.ungroup_R is not None
            y_src_RD = permute_rows(y_RD, meta.ungroup_R, meta.regroup_R)
            y_SD = all_to_all_single_autograd(
                y_src_RD,
                _per_rank(meta.send_SL, self.ep),
                _per_rank(meta.recv_SL, self.ep),
                group=self.ep_group,
            )
        return weighted_combine(y_SD, meta, out_dtype, backend=self.kernel_backend)

    def sum_over_batch(self, t: Tensor) -> Tensor:
        if self.batch_group is None:
            return t.detach().clone()
        return funcol.all_reduce(t.detach(), "sum", group=self.batch_group).wait()


def _per_rank(counts_SL: list[int], ep: int) -> list[int]:
    """Rows per rank from the flattened [ep * L] chunk sizes."""
    L = len(counts_SL) // ep
    return [sum(counts_SL[p * L : (p + 1) * L]) for p in range(ep)]
