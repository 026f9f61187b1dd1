"""Router health: what the per-step expert load does not show, per MoE layer, at each logged
step; and the collapse warning.

Shape legend: L MoE layers, E experts, W steps in the logging window.

Definitions (a "window" is the steps since the previous logged step, the logged one
included; every figure is per MoE layer and added to that layer's entry of the step
record's `moe` list):

- `entropy`: mean over the window's training tokens on this rank of the routing
  distribution's entropy, H(p) = -sum_e p_e ln p_e in nats, where p is the token's softmax
  scores (sigmoid scores normalized to sum 1). ln E means uniform; 0 means certain of one.
  `entropy_norm` is entropy / ln E.
- `churn`: the share of a fixed probe's tokens whose top-1 expert changed over the window.
  The probe is the router inputs of the first `model.moe.churn_probe_tokens` tokens of the
  window's first training forward on this rank, with their top-1 expert (by selection
  score: bias and group limits included) under the router of that moment, i.e. the router
  as the previous logged step left it. At the logged step the same inputs are routed again
  by the router as it is now. Only the router moves in between, never the inputs, so churn
  measures routing drift and not a change of batch. A window that had no training forward
  (or `churn_probe_tokens` = 0) reports no churn.
- `max_over_mean_p50` / `_p90` / `_max`: percentiles over the window's steps of the
  busiest expert's global load over the mean load (every rank's tokens, as the step's
  all-reduce sums them).
- `idle_logs`: the longest run of consecutive logged windows, over the layer's experts, in
  which one expert received no token at all (global).
- `window_cv`: coefficient of variation of the window's summed global load per expert.
- `collapse`: after the first `model.moe.collapse_warmup_steps` training steps (a fresh
  router over small windows is uneven without being collapsed), `idle_logs` >=
  `model.moe.collapse_idle_logs` (when > 0) or `window_cv` > `model.moe.collapse_cv` (when
  > 0). Idle runs are counted from the start, so an expert starved since step 1 is named at
  the first logged step after the warm-up. When a layer enters collapse, rank 0 prints one line
  to the job log naming the layer, the experts and the numbers; it is exported to
  Prometheus as `moeyard_router_collapse` (alert `MoeyardRouterCollapse`, runbook
  `runbooks/expert-load-collapse.md`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.config import MoEConfig

HEALTH_KEY = "router_health"


@dataclass
class RouterHealth:
    """Window accumulators of one run (lives in `RunState.extra[HEALTH_KEY]`)."""

    cfg: MoEConfig
    ratio_WL: list[Tensor] = field(default_factory=list)  # max/mean per step, device
    load_LE: Tensor | None = None  # summed global load over the window, device
    idle_logs_LE: Tensor | None = None  # consecutive idle logged windows, host
    collapsed_L: list[bool] = field(default_factory=list)

    def observe(self, load_LE: Tensor) -> None:
        """One step's global load per layer and expert [L, E] (device; no host sync)."""
        mean_L = load_LE.mean(dim=1).clamp_min(1e-12)
        self.ratio_WL.append(load_LE.amax(dim=1) / mean_L)
        self.load_LE = load_LE.clone() if self.load_LE is None else self.load_LE + load_LE

    def window(self, moes: list[Any], step: int) -> list[dict[str, Any]]:
        """The window's figures per layer (host syncs: a logged step only), then a new window.

        `step` is the training step the window ends at (the collapse test waits for
        `collapse_warmup_steps`). Returns one dict per layer with the keys of the module
        docstring and `warning` (the job-log line, or None when the layer did not enter
        collapse at this logged step).
        """
        cfg = self.cfg
        out: list[dict[str, Any]] = []
        if self.load_LE is None:
            return out
        ratio_WL = torch.stack(self.ratio_WL).float().cpu()
        load_LE = self.load_LE.float().cpu()
        L, E = load_LE.shape
        idle_LE = load_LE == 0
        if self.idle_logs_LE is None:
            self.idle_logs_LE = torch.zeros(L, E, dtype=torch.int64)
            self.collapsed_L = [False] * L
        self.idle_logs_LE = torch.where(idle_LE, self.idle_logs_LE + 1, 0)
        q_3L = torch.quantile(ratio_WL, torch.tensor([0.5, 0.9, 1.0]), dim=0)
        for i in range(L):
            mean = load_LE[i].mean().item()
            cv = load_LE[i].std(unbiased=False).item() / mean if mean > 0 else 0.0
            idle_logs = int(self.idle_logs_LE[i].max())
            reasons = []
            if cfg.collapse_idle_logs > 0 and idle_logs >= cfg.collapse_idle_logs:
                idle = torch.nonzero(self.idle_logs_LE[i] >= cfg.collapse_idle_logs).flatten()
                reasons.append(
                    f"expert(s) {idle.tolist()} got no token for {idle_logs} logged steps "
                    f"(model.moe.collapse_idle_logs = {cfg.collapse_idle_logs})"
                )
            if cfg.collapse_cv > 0 and cv > cfg.collapse_cv:
                reasons.append(
                    f"load CV over the window {cv:.2f} > model.moe.collapse_cv ({cfg.collapse_cv:g})"
                )
            collapse = bool(reasons) and step > cfg.collapse_warmup_steps
            warning = None
            if collapse and not self.collapsed_L[i]:
                warning = f"router collapse: MoE layer {i}: " + "; ".join(reasons)
            self.collapsed_L[i] = collapse
            rec: dict[str, Any] = {
                "max_over_mean_p50": q_3L[0, i].item(),
                "max_over_mean_p90": q_3L[1, i].item(),
                "max_over_mean_max": q_3L[2, i].item(),
                "window_cv": cv,
                "idle_logs": idle_logs,
                "collapse": collapse,
                "warning": warning,
            }
            if i < len(moes):
                rec.update(moes[i].pop_health())
            out.append(rec)
        self.ratio_WL, self.load_LE = [], None
        return out


def observe(state: Any, load_LE: Tensor) -> None:
    """Called by the loop with each step's global load [L, E] (no host sync)."""
    health = state.extra.get(HEALTH_KEY)
    if health is None:
        health = state.extra[HEALTH_KEY] = RouterHealth(state.cfg.model.moe)
    health.observe(load_LE)


def extend(state: Any, layers: list[dict[str, Any]], moes: list[Any]) -> None:
    """Adds the window's router-health figures to the step record's per-layer entries and
    prints the collapse warnings (rank 0)."""
    health: RouterHealth | None = state.extra.get(HEALTH_KEY)
    if health is None:
        return
    for entry, rec in zip(layers, health.window(moes, state.step), strict=False):
        warning = rec.pop("warning")
        entry.update(rec)
        if warning is not None and state.mesh.rank == 0:
            print(f"step {state.step}: {warning}; see runbooks/expert-load-collapse.md", flush=True)
