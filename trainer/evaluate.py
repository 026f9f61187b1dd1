"""Validation: the model's loss on the evaluation set (`eval.*`), at any parallel layout.

`val_loss` is the mean next-token cross-entropy over every target token of the `eval.steps`
fixed batches (dataloader/evalset.py), summed over the ranks before the division, so it is
the same number at world size 1, 2 or 4 and at any expert-parallel degree, within float
tolerance; `val_ppl` is exp(val_loss).

The model runs in eval mode (`model.eval()`): the multi-token prediction modules do not run
(they are training-only; `val_loss` is the main model's), the MoE layers add no auxiliary
or z-loss, and capacity drops happen only where `model.moe.capacity_factor` asks for them,
as in training. The per-expert load counters the auxiliary-loss-free bias update reads after the
next training step are put back as they were, so an evaluation never moves the bias.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dataloader.evalset import EvalSet
from trainer.config import ConfigError, JobConfig
from trainer.mesh import Mesh
from trainer.model import Transformer
from trainer.run_state import RunState


def autocast_for(cfg: JobConfig, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The autocast context training uses (bf16 on GPU under train.dtype auto), or none."""
    use_bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Evaluator:
    """Holds this rank's part of the evaluation set and evaluates a model on it.

    Raises (from the constructor):
        ConfigError: the evaluation set cannot serve `eval.steps` x `eval.batch_size` rows
            over these ranks, or its vocabulary exceeds `model.vocab_size`.
    """

    def __init__(self, cfg: JobConfig, *, mesh: Mesh, device: torch.device) -> None:
        ev = cfg.eval
        self.every = ev.every
        self.cfg = cfg
        self.mesh = mesh
        self.device = device
        try:
            self.evalset = EvalSet(
                cfg.data,
                path=ev.path,
                steps=ev.steps,
                batch_size=ev.batch_size,
                seq_len=cfg.train.seq_len,
                rank=mesh.rank,
                world_size=mesh.world_size,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.evalset.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
                f"eval.path {ev.path} ({self.evalset.vocab_size})"
            )

    def due(self, step: int) -> bool:
        """Whether the step just completed (1-based) is an evaluation step."""
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def evaluate(self, model: Transformer) -> dict[str, float]:
        """{"val_loss", "val_ppl", "val_tokens"} of `model`, the same on every rank.

        Every rank must call it at the same step (the forward passes hold collectives under
        expert parallelism, and the sums are all-reduced).
        """
        was_training = model.training
        moes = model.moe_layers()
        saved = [(m.get_buffer("routed_E").clone(), m.get_buffer("dropped").clone()) for m in moes]
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for rows_cpu in self.evalset.batches:
                rows = rows_cpu.to(self.device, non_blocking=True)
                inputs, targets = rows[:, :-1], rows[:, 1:]
                with autocast_for(self.cfg, self.device):
                    logits = model(inputs).logits
                ce = F.cross_entropy(
                    logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
                )
                sums[0] += ce.double()
                sums[1] += targets.numel()
        finally:
            for m, (routed, dropped) in zip(moes, saved, strict=True):
                m.get_buffer("routed_E").copy_(routed)
                m.get_buffer("dropped").copy_(dropped)
            model.train(was_training)
        if self.mesh.world_size > 1:
            dist.all_reduce(sums, group=self.mesh.group("world"))
        total, count = sums.tolist()  # device-to-host sync, once per evaluation
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(count)}


EVALUATOR_KEY = "evaluator"  # where `attach` keeps the Evaluator in RunState.extra


def attach(state: RunState) -> None:
    """Builds the Evaluator of `eval.*` into `state.extra` (nothing when eval.every is 0)."""
    if state.cfg.eval.every:
        state.extra[EVALUATOR_KEY] = Evaluator(state.cfg, mesh=state.mesh, device=state.device)


def maybe_evaluate(state: RunState) -> dict[str, float] | None:
    """After the step `state.step`: the validation figures when it is an evaluation step,
    with `val_time_s` (the seconds it took, kept out of the step time), else None."""
    ev = state.extra.get(EVALUATOR_KEY)
    if ev is None or not ev.due(state.step):
        return None
    t0 = time.perf_counter()
    out: dict[str, float] = ev.evaluate(state.model)
    out["val_time_s"] = time.perf_counter() - t0
    return out
