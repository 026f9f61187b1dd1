"""The MoE layer as it was before issue 22's layer half, kept verbatim as the reference the
new layer is tested against (tests/test_moe_fused.py): w1 and w3 as two stacked parameters
and two grouped GEMMs, SwiGLU by autograd, and the combine as K gathers multiply-added into an
fp32 [T, D] for bf16 rows (one `F.embedding_bag` for fp32 rows), cast to the output dtype
after.

`LegacyMoE` is the current `trainer.moe.MoE` (router, drops, losses, shared experts, the same
dispatch) with these experts and this combine swapped in.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import MoEConfig
from trainer.dispatch import DispatchMeta, LocalDispatcher, sort_pairs
from trainer.moe import MoE


def grouped_swiglu(x_RD: Tensor, counts_L: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU per expert over rows grouped by expert, as three grouped GEMMs.

    x_RD: rows sorted by local expert; counts_L: rows per local expert (rows past their sum
    are left unwritten); w1, w3: [L, D, F]; w2: [L, F, D]. Returns [R, D].
    """
    offs_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
    h_RF = F.silu(torch._grouped_mm(x_RD, w1, offs=offs_L)) * torch._grouped_mm(
        x_RD, w3, offs=offs_L
    )
    return torch._grouped_mm(h_RF, w2, offs=offs_L)


class GroupedExperts(nn.Module):
    """SwiGLU experts with weights stacked per layer: w1/w3 [L, D, F], w2 [L, F, D].

    In the state dict each expert is saved under its global id (`<prefix>.<id>.w1`), so a
    checkpoint written at one expert-parallel layout loads at another.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts  # E in the whole model
        self.expert_offset = 0  # global id of the first expert held here
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self._register_state_dict_hook(_experts_to_global_keys)
        self._register_load_state_dict_pre_hook(_experts_from_global_keys, with_module=True)

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def shard(self, *, expert_offset: int, num_local: int) -> None:
        """Keeps experts [expert_offset, expert_offset + num_local) (before materializing)."""
        for name in ("w1", "w3", "w2"):
            p = getattr(self, name)
            setattr(
                self,
                name,
                nn.Parameter(p[expert_offset : expert_offset + num_local].detach().clone()),
            )
        self.expert_offset = expert_offset

    def forward(self, x_RD: Tensor, counts_L: Tensor) -> Tensor:
        dtype = x_RD.dtype
        return grouped_swiglu(
            x_RD, counts_L, self.w1.to(dtype), self.w3.to(dtype), self.w2.to(dtype)
        )


_EXPERT_WEIGHTS = ("w1", "w3", "w2")


def expert_slice(stacked: Tensor, i: int) -> Tensor:
    """Local expert i of a stacked [L, ...] weight (or optimizer moment), sharing storage.

    Under FSDP the stacked tensor is a DTensor sharded on a dim other than 0 (see
    `trainer.parallelize`), so expert i is a DTensor of the expert's own shape, sharded on
    the dim one lower, whose local part is a view of this rank's shard.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(stacked, DTensor):
        return stacked[i]
    placements = []
    for pl in stacked.placements:
        if isinstance(pl, Shard):
            assert pl.dim > 0, "expert weights are never sharded on the expert dim"
            pl = Shard(pl.dim - 1)
        placements.append(pl)
    shape = stacked.shape[1:]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        stacked.to_local()[i],
        stacked.device_mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=stride,
    )


def _experts_to_global_keys(
    module: GroupedExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for name in _EXPERT_WEIGHTS:
        stacked = state_dict.pop(prefix + name)
        for i in range(stacked.shape[0]):
            state_dict[f"{prefix}{module.expert_offset + i}.{name}"] = expert_slice(stacked, i)


def _experts_from_global_keys(
    module: GroupedExperts,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing: list[str],
    unexpected: list[str],
    errors: list[str],
) -> None:
    for name in _EXPERT_WEIGHTS:
        keys = [
            f"{prefix}{module.expert_offset + i}.{name}" for i in range(module.num_local_experts)
        ]
        if all(k in state_dict for k in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
    # Experts held by other ranks are not ours to load; drop them so strict loading passes.
    for key in [
        k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()
    ]:
        del state_dict[key]


class _ReplicateRows(torch.autograd.Function):
    """rows_S[s] = x_TD[order_S[s] // K], zero for dropped pairs.

    Backward: grad_x[t] = sum over k of grad_rows[pos_P[t * K + k]], one fused gather-sum
    (`F.embedding_bag`, no scatter and no [T * K, D] temporary); a dropped pair reads a kept
    row with weight 0, so a gradient row the grouped GEMM left unwritten never enters the sum.
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
        pos_TK = _safe_pos(pos_P, keep_P).view(-1, ctx.top_k)
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


class _Combine(torch.autograd.Function):
    """out[t] = sum over k of w[t, k] * y[pos[t, k]], accumulated in fp32.

    y_SD holds the expert outputs of the kept pairs (a prefix of the expert-sorted order) and
    may hold more rows (the dropped pairs' rows at EP=1, never read). Forward: for fp32 rows
    one fused weighted gather-sum (`F.embedding_bag`); for bf16 rows K gathers of [T, D]
    multiply-added into one fp32 [T, D] (no fp32 copy of the rows). Backward: one gather
    g[s] = grad_out[token of s]; then grad_w[s] = <y[s], g[s]> (row chunks of T) and
    grad_y[s] = w[s] * g[s] in place. No scatter.
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
        pos_TK = _safe_pos(pos_P, keep_P).view(T, K)
        # A dropped pair reads row 0: its weight must be 0, whatever the caller passed.
        w_TK = weights_TK if keep_P is None else weights_TK.masked_fill(~keep_P.view(T, K), 0)
        if y_SD.dtype in (torch.float32, torch.float64):
            out_TD = F.embedding_bag(
                pos_TK, y_SD, mode="sum", per_sample_weights=w_TK.to(y_SD.dtype)
            )
        else:
            out_TD = torch.zeros(T, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
            for k in range(K):
                out_TD.addcmul_(y_SD.index_select(0, pos_TK[:, k]), w_TK[:, k : k + 1])
        ctx.save_for_backward(y_SD, w_TK, order_S, pos_TK, keep_P)
        return out_TD

    @staticmethod
    def backward(ctx: Any, grad_TD: Tensor) -> tuple[Tensor | None, ...]:
        y_SD, weights_TK, order_S, pos_TK, keep_P = ctx.saved_tensors
        T, K = weights_TK.shape
        R = y_SD.shape[0]
        order_R = order_S[:R]
        # g_R[s] = grad_out[token of s]: one gather serves both gradients.
        g_RD = grad_TD.index_select(0, order_R // K)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # <y[s], grad_out[token of s]> in row chunks: no [T * K, D] product at once.
            dot_R = torch.cat(
                [
                    torch.linalg.vecdot(y_c.to(g_c.dtype), g_c)
                    for y_c, g_c in zip(y_SD.split(T), g_RD.split(T), strict=True)
                ]
            )
            grad_w = dot_R.index_select(0, pos_TK.reshape(-1)).view(T, K)
            if keep_P is not None:
                # masked_fill, not a multiply: a dropped row may hold NaN, and a dropped
                # pair read row 0 in the forward with weight 0.
                grad_w.masked_fill_(~keep_P.view(T, K), 0)
        grad_y = None
        if ctx.needs_input_grad[0]:
            # Dropped pairs have weight 0, so their rows get a zero gradient.
            w_R = weights_TK.reshape(-1).index_select(0, order_R).unsqueeze(1)
            grad_y = g_RD.mul_(w_R).to(y_SD.dtype)
        return grad_y, grad_w, None, None, None


class LegacyDispatcher(LocalDispatcher):
    """EP=1 dispatch and combine as they were: indices derived inside each autograd function."""

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, *, may_drop: bool = True
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        order_S, pos_P, counts_E = sort_pairs(ids_TK, self.num_experts)
        keep_P = ids_TK.reshape(-1) < self.num_experts
        w_TK = torch.where(keep_P.view_as(ids_TK), weights_TK.float(), 0.0)
        keep = keep_P if may_drop else None
        rows_SD = _ReplicateRows.apply(x_TD, order_S, pos_P, keep, ids_TK.shape[1])
        meta = DispatchMeta(order_S=order_S, pos_P=pos_P, weights_TK=w_TK, keep_P=keep)
        return rows_SD, counts_E, meta

    def combine(self, y_RD: Tensor, meta: DispatchMeta, out_dtype: torch.dtype) -> Tensor:
        out_TD = _Combine.apply(y_RD, meta.weights_TK, meta.order_S, meta.pos_P, meta.keep_P)
        return out_TD.to(out_dtype)


class LegacyMoE(MoE):
    """`trainer.moe.MoE` with the legacy experts and dispatcher (EP=1)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__(dim, cfg)
        self.experts = GroupedExperts(dim, cfg.expert_hidden, cfg.num_experts)  # type: ignore[assignment]
        self.dispatcher = LegacyDispatcher(cfg.num_experts)

    def load_from(self, new: MoE) -> None:
        """Copies the new layer's weights (w13 split into w1 and w3) into this one."""
        with torch.no_grad():
            self.router.weight.copy_(new.router.weight)
            self.router.expert_bias.copy_(new.router.expert_bias)
            self.experts.w1.copy_(new.experts.w1)
            self.experts.w3.copy_(new.experts.w3)
            self.experts.w2.copy_(new.experts.w2)
            if self.shared is not None:
                assert new.shared is not None
                self.shared.load_state_dict(new.shared.state_dict())
