"""The next-token loss from the final hidden states, without the whole micro-batch's logits.

Shape legend: T tokens (flattened batch x sequence), D model dim, V vocabulary, C tokens
in one chunk.

`linear_cross_entropy(hidden_TD, weight_VD, targets_T)` is the mean cross-entropy of
`hidden_TD @ weight_VD.T` against `targets_T`, the function `F.cross_entropy` computes from
the logits, with three ways to get it (`train.loss_chunk_tokens`, `train.loss_kernel`):

- `chunk_tokens=0`, kernel `torch`: the logits of every token at once, then
  `F.cross_entropy` on their fp32 copy (the reference; it holds T x V logits in the compute
  dtype, their fp32 copy and the fp32 log-softmax autograd saves);
- `chunk_tokens=C`, kernel `torch`: C tokens at a time. The gradients are computed in the
  forward, chunk by chunk (softmax minus the one-hot target, times the head weight and times
  the hidden states), so nothing of size C x V outlives its chunk and no logit is computed
  twice; what waits for backward is the gradient of the hidden states [T, D] and of the
  weight [V, D] in fp32, scaled by the incoming gradient there;
- kernel `liger`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA only), an optional
  dependency imported only when asked for.

Each way computes the logits in the compute dtype (the autocast dtype when autocast is on,
else the weight's), rounds them to it as the unchunked model does, and takes the softmax in
fp32: the loss and the gradients equal the reference's to float rounding (1e-6 relative in
fp32). Targets equal to `ignore_index` count for nothing, as in `F.cross_entropy`.

The function takes the head weight as an argument so that any head call can reuse it (a
multi-token-prediction loss calls it on other hidden states). Under FSDP it must run inside
the head module's forward, where the weight is gathered (`trainer.model.OutputHead`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import ConfigError

LossKernel = Literal["torch", "liger"]
IGNORE_INDEX = -100


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the weight's."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def linear_cross_entropy(
    hidden_TD: Tensor,
    weight_VD: Tensor,
    targets_T: Tensor,
    *,
    chunk_tokens: int = 0,
    kernel: LossKernel = "torch",
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean cross-entropy of the logits `hidden_TD @ weight_VD.T` against `targets_T`.

    Args:
        hidden_TD: final hidden states [T, D] (any leading shape is flattened).
        weight_VD: the output head's weight [V, D].
        targets_T: target token ids [T] (int64); `ignore_index` entries are left out.
        chunk_tokens: tokens per chunk; 0 = all at once (`train.loss_chunk_tokens`).
        kernel: `torch` or `liger` (`train.loss_kernel`).

    Returns:
        The fp32 scalar loss: the sum over the kept targets divided by their number.

    Raises:
        ConfigError: kernel `liger` without the package or without a CUDA device.
    """
    hidden_TD = hidden_TD.reshape(-1, hidden_TD.shape[-1])
    targets_T = targets_T.reshape(-1)
    if kernel == "liger":
        return _liger(hidden_TD, weight_VD, targets_T, ignore_index=ignore_index)
    if kernel != "torch":
        raise ConfigError(f"train.loss_kernel ({kernel!r}) must be 'torch' or 'liger'")
    cd = compute_dtype(hidden_TD, weight_VD)
    if chunk_tokens <= 0 or chunk_tokens >= hidden_TD.shape[0]:
        # The reference: what the model computed before the loss was chunked.
        logits_TV = F.linear(hidden_TD.to(cd), weight_VD.to(cd))
        return F.cross_entropy(logits_TV.float(), targets_T, ignore_index=ignore_index)
    if not torch.is_grad_enabled() or not (hidden_TD.requires_grad or weight_VD.requires_grad):
        return _chunked_loss_only(hidden_TD, weight_VD, targets_T, chunk_tokens, cd, ignore_index)
    out: Tensor = _ChunkedLinearCE.apply(
        hidden_TD, weight_VD, targets_T, chunk_tokens, cd, ignore_index
    )
    return out


def _chunk_logits(h_CD: Tensor, w_VD: Tensor) -> Tensor:
    """fp32 logits of one chunk, rounded to the compute dtype first as the reference is."""
    return (h_CD @ w_VD.t()).float()


@torch.no_grad()
def _chunked_loss_only(
    hidden_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, chunk: int, cd: Any, ignore: int
) -> Tensor:
    w = weight_VD.to(cd)
    total = hidden_TD.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden_TD.shape[0], chunk):
        logits_CV = _chunk_logits(hidden_TD[s : s + chunk].to(cd), w)
        total += F.cross_entropy(
            logits_CV, targets_T[s : s + chunk], ignore_index=ignore, reduction="sum"
        )
    return total / (targets_T != ignore).sum()


class _ChunkedLinearCE(torch.autograd.Function):
    """The chunked loss with its gradients computed in the forward (see the module
    docstring); backward scales them by the incoming gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden_TD: Tensor,
        weight_VD: Tensor,
        targets_T: Tensor,
        chunk: int,
        cd: torch.dtype,
        ignore: int,
    ) -> Tensor:
        dev = hidden_TD.device.type
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        T = hidden_TD.shape[0]
        with torch.autocast(dev, enabled=False):
            w = weight_VD.to(cd)
            keep_T = targets_T != ignore
            # No host sync: the count stays on the device and divides there.
            inv_n = 1.0 / keep_T.sum().clamp(min=1).float()
            total = hidden_TD.new_zeros((), dtype=torch.float32)
            grad_h_TD = torch.empty_like(hidden_TD) if need_h else None
            grad_w_VD = torch.zeros_like(weight_VD, dtype=torch.float32) if need_w else None
            for s in range(0, T, chunk):
                h_CD = hidden_TD[s : s + chunk].to(cd)
                tgt_C = targets_T[s : s + chunk]
                keep_C = keep_T[s : s + chunk]
                logits_CV = _chunk_logits(h_CD, w)
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                safe_C = tgt_C.clamp(min=0).unsqueeze(1)
                picked_C = logits_CV.gather(1, safe_C).squeeze(1)
                total += torch.where(keep_C, lse_C - picked_C, 0.0).sum()
                # d(mean loss)/d(logits) = (softmax - one_hot) / n, zero for ignored targets;
                # computed in place over the chunk's fp32 logits.
                g_CV = logits_CV.sub_(lse_C.unsqueeze(1)).exp_()
                g_CV.scatter_add_(1, safe_C, torch.full_like(picked_C, -1.0).unsqueeze(1))
                g_CV.mul_((keep_C.float() * inv_n).unsqueeze(1))
                g_CV = g_CV.to(cd)
                if grad_h_TD is not None:
                    grad_h_TD[s : s + chunk] = g_CV @ w
                if grad_w_VD is not None:
                    if g_CV.dtype == grad_w_VD.dtype:
                        grad_w_VD.addmm_(g_CV.t(), h_CD)  # no [V, D] temporary
                    else:
                        grad_w_VD.add_(g_CV.t() @ h_CD)
        ctx.grads = (grad_h_TD, grad_w_VD)
        ctx.weight_dtype = weight_VD.dtype
        return total * inv_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grad_h_TD, grad_w_VD = ctx.grads
        ctx.grads = None  # the buffers go with this backward
        if grad_h_TD is not None:
            grad_h_TD = grad_h_TD.mul_(grad_out.to(grad_h_TD.dtype))
        if grad_w_VD is not None:
            grad_w_VD = grad_w_VD.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h_TD, grad_w_VD, None, None, None, None


def _liger(hidden_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, *, ignore_index: int) -> Tensor:
    """Liger-Kernel's fused linear cross-entropy (imported here, only when asked for)."""
    if hidden_TD.device.type != "cuda":
        raise ConfigError(
            f"train.loss_kernel='liger' needs a CUDA device (the loss runs on "
            f"{hidden_TD.device.type}); set train.loss_kernel=torch"
        )
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise ConfigError(
            f"train.loss_kernel='liger' needs the liger-kernel package ({e}); install "
            "moeyard's `gpu` extra (pip install .[gpu]) or set train.loss_kernel=torch"
        ) from None
    cd = compute_dtype(hidden_TD, weight_VD)
    with torch.autocast("cuda", enabled=False):
        loss = liger_fused_linear_cross_entropy(
            hidden_TD.to(cd), weight_VD.to(cd), targets_T, ignore_index=ignore_index
        )
    out: Tensor = loss[0] if isinstance(loss, tuple) else loss
    return out.float()
