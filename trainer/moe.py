"""The Mixture-of-Experts feed-forward block: router, grouped SwiGLU experts, load balance.

Shape legend: T tokens, D model dim, K top-k, E experts in total, L experts held here,
F expert hidden (2F: w1 and w3 side by side), R rows (token, expert pairs) grouped by local
expert, G expert groups.

The block runs on one device and holds no process group: the dispatcher it is given decides
where rows go (see `trainer/dispatch.py`); `parallelize` swaps in the all-to-all one and
slices the expert weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from trainer.config import MoEConfig
from trainer.dispatch import LocalDispatcher, TokenDispatcher, expert_counts
from trainer.kernels import swiglu
from trainer.recompute import forward_only


@dataclass(frozen=True)
class RouterOutput:
    ids_TK: Tensor  # chosen global expert ids
    weights_TK: Tensor  # fp32 combine weights
    scores_TK: Tensor  # fp32 scores of the chosen experts (the affinity capacity drops by)
    scores_TE: Tensor  # fp32 scores (softmax or sigmoid) of every expert
    logits_TE: Tensor  # fp32 gate logits


class Router(nn.Module):
    """fp32 gate, softmax or sigmoid scores, optional group-limited top-k, selection bias.

    The gate runs outside autocast: `F.linear` is on autocast's low-precision list, so under
    bf16 autocast even fp32 inputs would give bf16 logits, ties between experts would be
    broken by index and the aux-loss-free bias steps (1e-3) would vanish below bf16's
    resolution. Every tensor of `RouterOutput` is fp32 whatever the autocast state.
    """

    expert_bias: Tensor

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        # Auxiliary-loss-free balancing: the bias changes which experts are picked, never the
        # weights they are combined with. Saved in checkpoints, updated outside autograd.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))

    def forward(self, x_TD: Tensor) -> RouterOutput:
        cfg = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        select_TE = self._select(scores_TE.detach())
        ids_TK = torch.topk(select_TE, cfg.top_k, dim=-1, sorted=False).indices
        scores_TK = scores_TE.gather(1, ids_TK)
        weights_TK = scores_TK
        if cfg.norm_topk_prob and cfg.top_k > 1:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * cfg.route_scale
        return RouterOutput(ids_TK, weights_TK, scores_TK.detach(), scores_TE, logits_TE)

    def _select(self, scores_TE: Tensor) -> Tensor:
        """Selection scores: the scores plus the balancing bias, outside the chosen groups
        -inf."""
        # Always added: zero unless updated (bias_update_rate > 0) or loaded (a DeepSeek-V3
        # checkpoint's e_score_correction_bias, which a continued run may keep frozen).
        select_TE = scores_TE + self.expert_bias.float()
        if self.cfg.n_group > 1:
            select_TE = self._limit_groups(select_TE)
        return select_TE

    @torch.no_grad()
    def top1(self, x_TD: Tensor) -> Tensor:
        """Each token's first choice by selection score [T] (what routing churn compares)."""
        w: Tensor = self.weight
        if isinstance(w, DTensor):
            # Outside forward, FSDP leaves the weight sharded; every rank calls this at the
            # same logged step, so the all-gather is matched.
            w = w.full_tensor()
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), w.float())
        scores_TE = (
            logits_TE.softmax(-1) if self.cfg.score_func == "softmax" else logits_TE.sigmoid()
        )
        return self._select(scores_TE).argmax(dim=-1)

    def _limit_groups(self, select_TE: Tensor) -> Tensor:
        """Masks every expert outside each token's topk_group best groups."""
        cfg = self.cfg
        T = select_TE.shape[0]
        grouped_TGe = select_TE.view(T, cfg.n_group, -1)
        if cfg.score_func == "sigmoid" and grouped_TGe.shape[-1] >= 2:
            # DeepSeek-V3 ranks a group by the sum of its two best scores.
            group_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
        else:
            group_TG = grouped_TGe.amax(dim=-1)  # DeepSeek-V2
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(cfg.topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(T, -1)
        return select_TE.masked_fill(~keep_TE, float("-inf"))


def grouped_swiglu(
    x_RD: Tensor, counts_L: Tensor, w13: Tensor, w2: Tensor, *, backend: str = "auto"
) -> Tensor:
    """SwiGLU per expert over rows grouped by expert: two grouped GEMMs and one fused SwiGLU.

    x_RD: rows sorted by local expert; counts_L: rows per local expert (rows past their sum
    are left unwritten); w13: [L, D, 2F], the gate (w1) half then the up (w3) half; w2:
    [L, F, D]. One grouped GEMM gives both halves [R, 2F]; `swiglu` reads them once and
    writes silu(gate) * up [R, F] (backward: one pass too). backend: see
    `trainer.kernels.swiglu`. Returns [R, D].
    """
    offs_L = torch.cumsum(counts_L, dim=0, dtype=torch.int32)
    h_R2F = torch._grouped_mm(x_RD, w13, offs=offs_L)
    return torch._grouped_mm(swiglu(h_R2F, backend), w2, offs=offs_L)


# The stacked parameters of GroupedExperts and the per-expert weights each is saved as: the
# saved name and, for a parameter that holds several, which (j, n): the j-th of n equal parts
# of its last dim. w13 [L, D, 2F] holds w1 (the gate) and w3 (the up projection), each [D, F]
# per expert in checkpoints, exports and imports.
EXPERT_PARTS: dict[str, tuple[tuple[str, tuple[int, int] | None], ...]] = {
    "w13": (("w1", (0, 2)), ("w3", (1, 2))),
    "w2": (("w2", None),),
}


class GroupedExperts(nn.Module):
    """SwiGLU experts with weights stacked per layer: w13 [L, D, 2F] (w1 then w3), w2 [L, F, D].

    In the state dict each expert is saved under its global id, its w1 and w3 apart
    (`<prefix>.<id>.w1`, `.w3` [D, F], `.w2` [F, D]), so a checkpoint written at one
    expert-parallel layout loads at another, and checkpoints from before w1 and w3 were one
    parameter load as they are. `w1` and `w3` are views of w13's halves (no gradients of
    their own: read `w13.grad`).
    """

    backend = "auto"  # trainer.kernels.swiglu's; tests pick "torch" or "triton"

    def __init__(self, dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts  # E in the whole model
        self.expert_offset = 0  # global id of the first expert held here
        self.hidden = hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self._register_state_dict_hook(_experts_to_global_keys)
        self._register_load_state_dict_pre_hook(_experts_from_global_keys, with_module=True)

    @property
    def w1(self) -> Tensor:
        """The gate weights [L, D, F]: a view of w13."""
        return self.w13[..., : self.hidden]

    @property
    def w3(self) -> Tensor:
        """The up-projection weights [L, D, F]: a view of w13."""
        return self.w13[..., self.hidden :]

    @property
    def num_local_experts(self) -> int:
        return self.w13.shape[0]

    def shard(self, *, expert_offset: int, num_local: int) -> None:
        """Keeps experts [expert_offset, expert_offset + num_local) (before materializing)."""
        for name in EXPERT_PARTS:
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
            x_RD, counts_L, self.w13.to(dtype), self.w2.to(dtype), backend=self.backend
        )


def expert_slice(stacked: Tensor, i: int, part: tuple[int, int] | None = None) -> Tensor:
    """Local expert i of a stacked [L, ...] weight (or optimizer moment), sharing storage;
    with part (j, n), the j-th of n equal parts of its last dim (w13's w1 or w3 half).

    Under FSDP the stacked tensor is a DTensor sharded on a dim other than 0 and the last
    (see `trainer.parallelize`), so expert i is a DTensor of the expert's own shape, sharded
    on the dim one lower, whose local part is a view of this rank's shard.
    """
    from torch.distributed.tensor import DTensor, Shard

    def narrow(t: Tensor) -> Tensor:
        if part is None:
            return t
        j, n = part
        width = t.shape[-1] // n
        return t.narrow(-1, j * width, width)

    if not isinstance(stacked, DTensor):
        return narrow(stacked[i])
    placements = []
    for pl in stacked.placements:
        if isinstance(pl, Shard):
            assert pl.dim > 0, "expert weights are never sharded on the expert dim"
            assert part is None or pl.dim < stacked.ndim - 1, "w13 is never split on its halves"
            pl = Shard(pl.dim - 1)
        placements.append(pl)
    shape = narrow(torch.empty(stacked.shape[1:], device="meta")).shape
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        narrow(stacked.to_local()[i]),
        stacked.device_mesh,
        placements,
        run_check=False,
        shape=shape,
        stride=stride,
    )


def _experts_to_global_keys(
    module: GroupedExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for name, parts in EXPERT_PARTS.items():
        stacked = state_dict.pop(prefix + name)
        for i in range(stacked.shape[0]):
            gid = module.expert_offset + i
            for saved, part in parts:
                state_dict[f"{prefix}{gid}.{saved}"] = expert_slice(stacked, i, part)


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
    ids = range(module.expert_offset, module.expert_offset + module.num_local_experts)
    for name, parts in EXPERT_PARTS.items():
        keys = [[f"{prefix}{gid}.{saved}" for gid in ids] for saved, _ in parts]
        if all(k in state_dict for ks in keys for k in ks):
            stacks = [torch.stack([state_dict.pop(k) for k in ks]) for ks in keys]
            state_dict[prefix + name] = stacks[0] if len(stacks) == 1 else torch.cat(stacks, -1)
    # Experts held by other ranks are not ours to load; drop them so strict loading passes.
    for key in [
        k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()
    ]:
        del state_dict[key]


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass(frozen=True)
class MoELosses:
    aux_loss: Tensor  # coefficient applied
    z_loss: Tensor  # coefficient applied


class MoE(nn.Module):
    """Routed experts (plus optional shared experts) in place of a dense feed-forward."""

    routed_E: Tensor
    dropped: Tensor

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(dim, cfg.expert_hidden, cfg.num_experts)
        self.shared = (
            SwiGLU(dim, cfg.expert_hidden * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts)
        # Load since the last `pop_load`: pairs routed to each expert (before capacity drops)
        # and pairs dropped, on this rank. Not saved.
        self.register_buffer("routed_E", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("dropped", torch.zeros(()), persistent=False)
        # Router health since the last `pop_health` (training forwards only, this rank; see
        # trainer/router_health.py). Plain attributes, made on first use on the right device.
        self._entropy_sum: Tensor | None = None
        self._entropy_tokens = 0
        self._probe: tuple[Tensor, Tensor] | None = None  # router inputs, their top-1
        self._want_probe = True

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, MoELosses]:
        """x_BSD [B, S, D] -> (output [B, S, D], losses).

        May run twice per step under activation checkpointing (recompute inside backward);
        the load counters `routed_E` and `dropped` count the first forward only. No
        device-to-host sync at EP=1; the all-to-all dispatcher makes one (its split sizes).
        """
        cfg = self.cfg
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        T = x_TD.shape[0]
        r = self.router(x_TD)
        counts_E = expert_counts(r.ids_TK, cfg.num_experts)
        ids_TK = r.ids_TK
        drops = cfg.capacity_factor > 0
        if drops:
            ids_TK = drop_overflow(
                ids_TK,
                cfg.num_experts,
                capacity(T, cfg),
                scores_TK=r.scores_TK if cfg.drop_policy == "score" else None,
            )
        self._count(counts_E, ids_TK if drops else None, x_TD, r.scores_TE)

        zero = x_TD.new_zeros((), dtype=torch.float32)
        aux = zero
        if self.training and cfg.aux_loss_coef > 0:
            probs_TE = r.scores_TE
            if cfg.score_func == "sigmoid":
                probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)
            if cfg.aux_loss_scope == "sequence":
                aux = self._sequence_aux(r.ids_TK, probs_TE, x_BSD.shape[0])
            else:
                # Global-batch balance: the load fractions come from every rank's tokens;
                # the mean scores are this rank's, so the mean of the ranks' losses is the
                # loss of the global batch.
                load_E = self.dispatcher.sum_over_batch(counts_E.float())
                frac_E = load_E / load_E.sum()
                aux = cfg.aux_loss_coef * cfg.num_experts * (frac_E * probs_TE.mean(dim=0)).sum()
        z = zero
        if self.training and cfg.z_loss_coef > 0:
            z = cfg.z_loss_coef * torch.logsumexp(r.logits_TE, dim=-1).square().mean()

        # Under autocast the rows travel and meet the experts in the autocast dtype (bf16 on
        # GPU): half the all-to-all bytes, and the grouped GEMM runs on the tensor cores.
        dev = x_TD.device.type
        if torch.is_autocast_enabled(dev):
            x_TD = x_TD.to(torch.get_autocast_dtype(dev))
        x_RD, counts_L, meta = self.dispatcher.dispatch(x_TD, ids_TK, r.weights_TK, may_drop=drops)
        y_RD = self.experts(x_RD, counts_L)
        out_TD = self.dispatcher.combine(y_RD, meta, x_BSD.dtype)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view(x_BSD.shape), MoELosses(aux, z)

    @forward_only
    def _count(
        self, counts_E: Tensor, kept_ids_TK: Tensor | None, x_TD: Tensor, scores_TE: Tensor
    ) -> None:
        """Load counters and router health, on the first forward only (`forward_only`: a
        recompute would count the same tokens twice, and the probe's matmul must stay out of
        selective checkpointing's saved ops)."""
        self.routed_E += counts_E
        if kept_ids_TK is not None:
            self.dropped += (kept_ids_TK == self.cfg.num_experts).sum()
        if self.training:
            self._observe_health(x_TD, scores_TE)

    def _sequence_aux(self, ids_TK: Tensor, probs_TE: Tensor, num_seqs: int) -> Tensor:
        """DeepSeek-V3's sequence-wise balance loss: per sequence, coef * sum_e f_e P_e with
        f_e = E / (K S) x pairs of the sequence routed to e and P_e the sequence's mean
        score of e; the mean over the sequences (no collective: each sequence is local)."""
        cfg = self.cfg
        E = cfg.num_experts
        ids_BP = ids_TK.reshape(num_seqs, -1)  # P = K x S pairs per sequence
        counts_BE = torch.zeros(num_seqs, E, device=ids_TK.device).scatter_add_(
            1, ids_BP, torch.ones_like(ids_BP, dtype=torch.float32)
        )
        f_BE = counts_BE * (E / ids_BP.shape[1])
        P_BE = probs_TE.view(num_seqs, -1, E).mean(dim=1)
        return cfg.aux_loss_coef * (f_BE * P_BE).sum(dim=1).mean()

    @torch.no_grad()
    def _observe_health(self, x_TD: Tensor, scores_TE: Tensor) -> None:
        """Entropy of this forward's routing distributions; the churn probe when one is due."""
        p_TE = (
            scores_TE
            if self.cfg.score_func == "softmax"
            else scores_TE / scores_TE.sum(-1, keepdim=True)
        )
        h = torch.special.entr(p_TE).sum()
        self._entropy_sum = h if self._entropy_sum is None else self._entropy_sum + h
        self._entropy_tokens += p_TE.shape[0]
        n = self.cfg.churn_probe_tokens
        if self._want_probe and n > 0:
            probe_ND = x_TD[:n].detach().clone()
            self._probe = (probe_ND, self.router.top1(probe_ND))
            self._want_probe = False

    def pop_health(self) -> dict[str, float]:
        """Router entropy over the training forwards since the last call and routing churn
        of the probe (see trainer/router_health.py); host syncs. A new window starts."""
        out: dict[str, float] = {}
        if self._entropy_sum is not None and self._entropy_tokens:
            h = self._entropy_sum.item() / self._entropy_tokens
            out["entropy"] = h
            out["entropy_norm"] = (
                h / math.log(self.cfg.num_experts) if self.cfg.num_experts > 1 else 0.0
            )
        if self._probe is not None and not self._want_probe:
            probe_ND, top1_N = self._probe
            out["churn"] = (self.router.top1(probe_ND) != top1_N).float().mean().item()
        self._entropy_sum, self._entropy_tokens = None, 0
        self._probe, self._want_probe = None, True
        return out

    @torch.no_grad()
    def update_bias(self, load_E: Tensor) -> None:
        """DeepSeek-V3 bias step from the global per-expert load of the last step."""
        if self.cfg.bias_update_rate > 0:
            self.router.expert_bias += self.cfg.bias_update_rate * torch.sign(
                load_E.mean() - load_E
            )


def capacity(num_tokens: int, cfg: MoEConfig) -> int:
    """Pairs one expert takes from one rank's tokens: ceil(cf * T * K / E)."""
    return math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)


def drop_overflow(
    ids_TK: Tensor, num_experts: int, cap: int, *, scores_TK: Tensor | None = None
) -> Tensor:
    """Marks the pairs beyond each expert's capacity `cap` with the id num_experts.

    With scores_TK (the routing score of each pair) an expert keeps its `cap` highest-scoring
    pairs and drops the lowest-affinity ones, as DeepSeek and Megatron do; ties keep token
    order. Without scores it keeps the first `cap` pairs in token order
    (`model.moe.drop_policy: token_order`). No host sync.
    """
    flat_P = ids_TK.reshape(-1)
    if scores_TK is None:
        order_P = torch.argsort(flat_P, stable=True)
    else:
        # Two stable sorts make a lexicographic one: by expert, then by descending score.
        by_score_P = torch.argsort(scores_TK.reshape(-1), descending=True, stable=True)
        order_P = by_score_P[torch.argsort(flat_P[by_score_P], stable=True)]
    sorted_P = flat_P[order_P]
    counts_E = expert_counts(flat_P, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_P = torch.arange(flat_P.numel(), device=flat_P.device) - starts_E[sorted_P]
    dropped_P = torch.empty_like(flat_P, dtype=torch.bool)
    dropped_P[order_P] = rank_P >= cap
    return torch.where(dropped_P, num_experts, flat_P).view_as(ids_TK)
