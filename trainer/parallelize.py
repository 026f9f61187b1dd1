"""Applies parallelism to a model built on the meta device; clips its gradients.

`parallelize` runs before `materialize`, in this fixed order:
  1. expert parallelism: each MoE layer keeps the experts of its EP rank and gets the
     all-to-all dispatcher (EP > 1) or the local one (EP = 1);
  2. activation checkpointing per transformer block (`train.activation_checkpoint`), the
     MTP modules' blocks included;
  3. `torch.compile` per block (`train.compile`), the MTP modules' blocks included;
  4. FSDP2 (`fully_shard`): each MoE layer's experts over `efsdp` (HSDP: x dp_replicate;
     at EP = 1 they stay in their block's unit), then each block and each MTP module (its
     norms, projection and block; multi-token prediction), the embedding and the output
     head over `dp_shard` (HSDP: x dp_replicate), then the root. The MTP modules share the
     embedding and head units with the main model: the head runs once more per depth, and
     FSDP reduces its gradient over both uses. Parameters become DTensors; gradients are
     reduce-scattered in backward, overlapped with it.

Gradient scale: each rank's loss is the mean over its own tokens, and the training loss is
the mean over ranks. A dense gradient is therefore the average over the world, which is what
FSDP's reduce-scatter over (dp_replicate, dp_shard) = the world computes. An expert's
gradient already sums the contributions of every rank in its EP group (the all-to-all
backward brings them home), so its reduction over the world / ep ranks that hold the same
expert must divide by the world size, not by the world / ep ranks it reduces over: dividing
by the group (FSDP's default) is the classic bug that makes EP>1 expert gradients ep times
too large. `set_gradient_divide_factor(world)` on the expert modules keeps any layout equal
to one process.

Mixed precision (GPU): bf16 parameters in forward and backward, gradients reduced in fp32,
fp32 master weights and optimizer state (FSDP's `MixedPrecisionPolicy`). On CPU everything
stays fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from trainer.config import ConfigError
from trainer.dispatch import AllToAllDispatcher, LocalDispatcher
from trainer.mesh import Mesh
from trainer.model import Block, Transformer
from trainer.moe import GroupedExperts

ACMode = Literal["none", "full", "selective"]


def parallelize(
    model: Transformer,
    mesh: Mesh,
    *,
    activation_checkpoint: ACMode = "none",
    compile: bool = False,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: str = "default",
    ep_exchange: str = "auto",
) -> Transformer:
    """Applies EP, activation checkpointing, compile and FSDP in place, in that order.

    Args:
        model: built on the meta device (`build_model`), not yet materialized.
        mesh: the layout; FSDP is applied when it spans more than one rank.
        activation_checkpoint: `train.activation_checkpoint`.
        compile: `train.compile`.
        param_dtype: FSDP's compute dtype for parameters (bf16 on GPU), None = as stored.
        reshard_after_forward: `parallel.reshard_after_forward`.
        ep_exchange: `parallel.ep_exchange`.

    Raises:
        ConfigError: an activation-checkpoint mode that does not exist.
    """
    apply_ep(model, mesh, exchange=ep_exchange)
    apply_activation_checkpoint(model, activation_checkpoint)
    if compile:
        apply_compile(model)
    if mesh.fsdp:
        apply_fsdp(
            model, mesh, param_dtype=param_dtype, reshard_after_forward=reshard_after_forward
        )
    return model


def apply_ep(model: Transformer, mesh: Mesh, *, exchange: str = "auto") -> None:
    """Each MoE layer keeps its EP rank's experts and gets its dispatcher (`exchange`:
    `parallel.ep_exchange`)."""
    world = mesh.group("world") if mesh.world_size > 1 else None
    for moe in model.moe_layers():
        E = moe.cfg.num_experts
        if mesh.ep > 1:
            ep_group = mesh.group("ep")
            assert ep_group is not None, "EP > 1 needs an initialized process group"
            dispatcher = AllToAllDispatcher(
                E, ep_group=ep_group, batch_group=world, exchange=exchange
            )
            moe.experts.shard(
                expert_offset=dispatcher.expert_offset, num_local=dispatcher.num_local_experts
            )
            moe.dispatcher = dispatcher
        else:
            moe.dispatcher = LocalDispatcher(E, batch_group=world)


# What selective checkpointing keeps from the forward: the matmuls (the expensive part to
# recompute), the collectives (a recompute must never issue one again: its peers are not
# there for it) and the routing decisions (top-k and the sorts that follow it), so a
# recomputed block routes every token exactly as the forward did.
def _save_ops() -> set[Any]:
    aten, ops = torch.ops.aten, set()
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "topk",
        "sort",
        "argsort",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    funcol = torch.ops._c10d_functional
    for name in (
        "all_to_all_single",
        "all_reduce",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "wait_tensor",
    ):
        if hasattr(funcol, name):
            ops.add(getattr(funcol, name).default)
    # The autograd-aware all-to-all of the token rows.
    autograd_ops = getattr(torch.ops, "_c10d_functional_autograd", None)
    if autograd_ops is not None and hasattr(autograd_ops, "all_to_all_single"):
        ops.add(autograd_ops.all_to_all_single.default)
    # The dispatcher's point-to-point row exchanges (registered by trainer/dispatch.py).
    ops.add(torch.ops.moeyard.ep_exchange.default)
    ops.add(torch.ops.moeyard.ep_dispatch.default)
    # Collectives that write into their argument: a recompute must not repeat them either.
    c10d = torch.ops.c10d
    for name in ("alltoall_base_", "allreduce_", "allgather_", "broadcast_"):
        if hasattr(c10d, name):
            ops.add(getattr(c10d, name).default)
    return ops


_SAVE_OPS: set[Any] | None = None


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    assert _SAVE_OPS is not None
    if op in _SAVE_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context() -> Any:
    global _SAVE_OPS
    if _SAVE_OPS is None:
        _SAVE_OPS = _save_ops()
        # FSDP's hooks on the experts run inside the checkpointed block and mark their work
        # with profiler ranges, a different number of times in the forward and in the
        # recompute; the ranges compute nothing, so selective checkpointing passes them by.
        import torch.utils.checkpoint as ckpt

        for name in ("_record_function_enter_new", "_record_function_exit"):
            op = getattr(torch.ops.profiler, name, None)
            if op is not None:
                ckpt.SAC_IGNORED_OPS.update(getattr(op, o) for o in op.overloads())
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpoint(model: Transformer, mode: str) -> None:
    """Wraps every block in non-reentrant activation checkpointing (`full` or `selective`).

    Raises:
        ConfigError: a mode other than none, full and selective.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ConfigError(
            f"train.activation_checkpoint ({mode!r}) must be one of 'none', 'full', 'selective'"
        )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    kw: dict[str, Any] = {"checkpoint_impl": CheckpointImpl.NO_REENTRANT}
    if mode == "selective":
        kw["context_fn"] = _selective_context
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kw)
    for mtp in model.mtp_modules():  # the MTP modules' blocks, like the main ones
        mtp.block = checkpoint_wrapper(mtp.block, preserve_rng_state=False, **kw)


def apply_compile(model: Transformer) -> None:
    """torch.compile per block (the blocks repeat, so one compiled graph serves them all).

    Raises:
        ConfigError: torch.compile cannot run on this platform or Python.
    """
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "train.compile=true, but torch.compile is not supported on this platform or "
            "Python version; set train.compile=false"
        )
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(block, fullgraph=False)  # type: ignore[assignment]
    for mtp in model.mtp_modules():
        mtp.block = torch.compile(mtp.block, fullgraph=False)  # type: ignore[assignment]


def _expert_placement(param: nn.Parameter) -> Shard:
    # Never dim 0: an expert's slice `stacked[i]` stays a shard of that expert alone (see
    # GroupedExperts' state-dict hook), whatever efsdp is. Never the last dim either: w13
    # [L, D, 2F] is split there into w1 and w3, which must stay views of the local shard
    # (dim 1 is D for w13 and F for w2).
    return Shard(1)


def _block_placement(experts: Any) -> Any:
    """Shard experts kept in the block's unit (EP = 1) on dim 1 too; the rest by default."""
    if not isinstance(experts, GroupedExperts):
        return None
    ids = {id(p) for p in experts.parameters()}

    def place(param: nn.Parameter) -> Shard | None:
        return Shard(1) if id(param) in ids else None

    return place


def apply_fsdp(
    model: Transformer,
    mesh: Mesh,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: str = "default",
) -> None:
    """FSDP2 over the mesh: experts over (dp_replicate, efsdp), the rest over
    (dp_replicate, dp_shard), with the expert-gradient divide factor of the module docstring."""
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    dense_mesh = mesh.dense_fsdp_mesh()
    expert_mesh = mesh.expert_fsdp_mesh()
    # Units in forward order: the blocks, then the MTP modules (each with its block).
    units: list[tuple[nn.Module, Block]] = [(b, _unwrap(b)) for b in model.layers]
    units += [(mtp, _unwrap(mtp.block)) for mtp in model.mtp_modules()]
    last = len(units) - 1
    for i, (unit, inner) in enumerate(units):
        # The last unit's backward comes right after its forward: gathering it again would
        # only cost an all-gather (unless always is asked for).
        reshard = {"always": True, "never": False}.get(reshard_after_forward, i != last)
        ffn = inner.ffn
        experts = getattr(ffn, "experts", None)
        # At EP = 1 the experts are sharded like every other weight (efsdp = dp_shard, and the
        # world is their gradients' divide factor anyway): they stay in the block's unit, one
        # all-gather and one reduce-scatter fewer per block.
        if isinstance(experts, GroupedExperts) and mesh.ep > 1:
            fully_shard(
                experts,
                mesh=expert_mesh,
                mp_policy=mp,
                shard_placement_fn=_expert_placement,
                reshard_after_forward=reshard,
            )
            assert isinstance(experts, FSDPModule)
            experts.set_gradient_divide_factor(float(mesh.world_size))
        fully_shard(
            unit,
            mesh=dense_mesh,
            mp_policy=mp,
            reshard_after_forward=reshard,
            shard_placement_fn=_block_placement(experts),
        )
    if not model.cfg.tie_embeddings:
        # Their own units: the largest dense tensors, gathered only while in use. (Tied, they
        # share one parameter and stay in the root's unit.)
        fully_shard(model.embed, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model.head, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False)
    if dist.get_backend() == "gloo":
        # Gloo has neither AVG nor PREMUL_SUM: reduce with SUM and divide after. Not for
        # experts sharded over one rank (efsdp 1): there FSDP skips the reduce-scatter and
        # divides by the custom factor, and with forced sums would divide by it once more.
        for m in model.modules():
            if isinstance(m, FSDPModule) and not (
                isinstance(m, GroupedExperts) and mesh.efsdp == 1
            ):
                m.set_force_sum_reduction_for_comms(True)


def _unwrap(block: nn.Module) -> Block:
    """The Block inside an activation-checkpoint or compile wrapper."""
    inner: Any = block
    while not isinstance(inner, Block):
        inner = getattr(inner, "_checkpoint_wrapped_module", None) or getattr(
            inner, "_orig_mod", None
        )
        assert inner is not None, f"no Block inside {type(block).__name__}"
    return inner


def blocks(model: Transformer) -> Iterator[Block]:
    """The model's transformer blocks, whatever wraps them."""
    for block in model.layers:
        yield _unwrap(block)


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense parameters, expert parameters), each in a stable order."""
    expert_ids = {
        id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()
    }
    dense: list[nn.Parameter] = []
    experts: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (experts if id(p) in expert_ids else dense).append(p)
    return dense, experts


def local(t: Tensor) -> Tensor:
    """This rank's part of `t`: the local shard of a DTensor, `t` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm_(
    model: nn.Module,
    mesh: Mesh,
    max_norm: float,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> Tensor:
    """Clips by the global norm over dense and expert gradients; returns the norm (fp32).

    Every element of every parameter is held exactly once by the ranks of one `dp_shard`
    group: dense parameters are sharded over it, and expert parameters are split over its
    `ep` ranks and sharded over its `efsdp` ranks (padding is not in the local shards). So
    the global square norm is one all-reduce over dp_shard of each rank's local sum of
    squares, for dense and expert gradients alike, on their own meshes or none.

    One pass reads the gradients: a single foreach norm over every local gradient, in fp32
    (gradients of another dtype are upcast inside the kernel, none is copied). The scaling
    is a second pass, unless `optimizer` is a fused Adam or AdamW (CUDA): then the clip
    coefficient goes to the optimizer as its gradient scale, which its fused kernel divides
    each gradient by as it reads it, and the gradients are left as they are. No host sync.
    """
    grads = [local(p.grad).detach() for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), device=local(next(model.parameters())).device, dtype=torch.float32)
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        sq = torch.stack(norms).square().sum()
    if mesh.world_size > 1:
        dist.all_reduce(sq, group=mesh.group("dp_shard"))
    total = sq.sqrt()
    fused = optimizer is not None and any(g.get("fused") for g in optimizer.param_groups)
    if fused:
        assert optimizer is not None
        # Set or cleared at every step: a stale scale must never reach the next step.
        optimizer.grad_scale = None  # type: ignore[attr-defined]
    if max_norm > 0 and grads:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if fused:
            optimizer.grad_scale = coef.reciprocal()  # type: ignore[union-attr]
        else:
            torch._foreach_mul_(grads, coef)
    return total


def check_compile(compile: bool, device: torch.device, *, bf16: bool) -> None:
    """Fails before any work when train.compile cannot work here.

    Raises:
        ConfigError: compile with fp32 compute (torch.compile's grouped GEMM, the experts'
            kernel, takes only bf16 inputs, where eager fp32 on the CPU runs), or on a CPU
            without a C++ compiler for inductor.
    """
    if not compile:
        return
    if not bf16:
        raise ConfigError(
            "train.compile=true needs bf16 compute (train.dtype=bf16, or auto on a GPU): "
            "compiled, the experts' grouped GEMM (torch._grouped_mm) takes only bf16 inputs; "
            "set train.dtype=bf16 or train.compile=false"
        )
    if device.type != "cpu":
        return
    import shutil

    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise ConfigError(
            "train.compile=true on train.device=cpu needs a C++ compiler (c++, g++ or clang++) "
            "for torch.compile's CPU backend; none is on PATH. Install one or set "
            "train.compile=false"
        )
