"""Fused kernels of the MoE layer, each a custom op with a Triton kernel and a plain-torch twin.

Shape legend: R rows (token, expert pairs) in expert-sorted order, F expert hidden, T tokens,
K top-k, D model dim.

- `swiglu(h_R2F)`: silu(gate) * up over the [R, 2F] output of the experts' one grouped GEMM
  for w1 and w3 (gate half, then up half). Forward reads h once and writes [R, F]; backward
  reads h and the gradient once and writes [R, 2F]. Unfused, autograd makes four passes
  forward (silu, mul, two slices' reads) and more backward.
- `combine(...)`: out[t] = sum over k of w[t, k] * y[pos[t, k]], fp32 weights and fp32
  accumulation, written once in the output dtype: the K expert rows of a token are read once
  each and nothing [T, K, D] is materialized. Backward: one pass over the expert-sorted rows
  giving grad_y[s] = w[s] * g[token of s] and the dot <y[s], g[token of s]> for the weights.

Each is a `torch.library.custom_op` (so `torch.compile` sees one opaque op, and selective
activation checkpointing one op to keep or recompute) whose backward is another custom op.
`backend`: "triton" runs the Triton kernel (on CUDA; on a CPU through Triton's interpreter,
`TRITON_INTERPRET=1` set before triton is imported, which is how the tests check the
kernels), "torch" the twin, "auto" Triton on CUDA when it is installed and the twin
elsewhere. The twin computes the same function; it is the reference in tests.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are optional: the twins run everywhere
    triton = None

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """Whether Triton is importable here."""
    return triton is not None


def _use_triton(t: Tensor, backend: str) -> bool:
    """Resolves `backend` for a tensor on t's device (see the module docstring).

    Raises:
        ValueError: an unknown backend; "triton" without triton installed, or on a CPU
            tensor without Triton's interpreter.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return t.is_cuda and triton is not None
    if triton is None:
        raise ValueError("kernel backend 'triton' asked for, but triton is not installed")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kernel backend 'triton' on a {t.device.type} tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return True


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, out_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        a = tl.load(h_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        out = a * tl.sigmoid(a) * b
        tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, h_ptr, dh_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(g_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(h_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        da = g * b * s * (1.0 + a * (1.0 - s))
        db = g * a * s
        ty = dh_ptr.dtype.element_ty
        tl.store(dh_ptr + row * 2 * n + cols, da.to(ty), mask=mask)
        tl.store(dh_ptr + row * 2 * n + n + cols, db.to(ty), mask=mask)

    @triton.jit
    def _combine_fwd_kernel(  # type: ignore[no-untyped-def]
        y_ptr, pos_ptr, w_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            p = tl.load(pos_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            y = tl.load(y_ptr + p * D + cols, mask=mask, other=0.0).to(tl.float32)
            acc += w * y
        tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(  # type: ignore[no-untyped-def]
        g_ptr, y_ptr, tok_ptr, w_ptr, dy_ptr, dot_ptr, D: tl.constexpr, BLOCK: tl.constexpr
    ):
        # D (the model's width) is a compile-time constant: the column loop's bounds are then
        # constants, and Triton 3.6's interpreter cannot loop over a runtime bound.
        s = tl.program_id(0).to(tl.int64)
        t = tl.load(tok_ptr + s).to(tl.int64)
        w = tl.load(w_ptr + s).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            g = tl.load(g_ptr + t * D + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + s * D + cols, mask=mask, other=0.0).to(tl.float32)
            dot += y * g
            tl.store(dy_ptr + s * D + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dot_ptr + s, tl.sum(dot, axis=0))


def _block(n: int) -> int:
    """Columns per Triton program: a power of two, at most 1024, covering n where it can."""
    return min(1024, max(16, triton.next_power_of_2(n)))


# --- SwiGLU -----------------------------------------------------------------------------


def _swiglu_torch(h_R2F: Tensor) -> Tensor:
    a, b = h_R2F.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(h_R2F.dtype)


def _swiglu_backward_torch(g_RF: Tensor, h_R2F: Tensor) -> Tensor:
    if h_R2F.dtype in (torch.float32, torch.float64):
        # Written straight into the two halves of the gradient: ATen's fused silu backward
        # for the gate, one multiply for the up half (no concatenation, few temporaries).
        a, b = h_R2F.chunk(2, dim=-1)
        dh = torch.empty_like(h_R2F)
        da, db = dh.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(g_RF * b, a, grad_input=da)
        torch.mul(g_RF, F.silu(a), out=db)
        return dh
    # Below fp32: in fp32, rounded once, as the Triton kernel does.
    a, b = h_R2F.float().chunk(2, dim=-1)
    g = g_RF.float()
    s = torch.sigmoid(a)
    da = g * b * s * (1.0 + a * (1.0 - s))
    return torch.cat([da, g * a * s], dim=-1).to(h_R2F.dtype)


@torch.library.custom_op("moeyard::swiglu", mutates_args=())
def _swiglu_op(h_R2F: Tensor, backend: str) -> Tensor:
    if not _use_triton(h_R2F, backend):
        return _swiglu_torch(h_R2F)
    h = h_R2F.contiguous()
    R, F2 = h.shape
    out = h.new_empty(R, F2 // 2)
    if R and F2:
        block = _block(F2 // 2)
        _swiglu_fwd_kernel[(R, triton.cdiv(F2 // 2, block))](h, out, F2 // 2, BLOCK=block)
    return out


@_swiglu_op.register_fake
def _(h_R2F: Tensor, backend: str) -> Tensor:
    return h_R2F.new_empty(h_R2F.shape[0], h_R2F.shape[1] // 2)


@torch.library.custom_op("moeyard::swiglu_backward", mutates_args=())
def _swiglu_backward_op(g_RF: Tensor, h_R2F: Tensor, backend: str) -> Tensor:
    if not _use_triton(h_R2F, backend):
        return _swiglu_backward_torch(g_RF, h_R2F)
    g, h = g_RF.contiguous(), h_R2F.contiguous()
    R, F2 = h.shape
    dh = torch.empty_like(h)
    if R and F2:
        block = _block(F2 // 2)
        _swiglu_bwd_kernel[(R, triton.cdiv(F2 // 2, block))](g, h, dh, F2 // 2, BLOCK=block)
    return dh


@_swiglu_backward_op.register_fake
def _(g_RF: Tensor, h_R2F: Tensor, backend: str) -> Tensor:
    return torch.empty_like(h_R2F)


def _swiglu_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    h_R2F, ctx.backend = inputs
    ctx.save_for_backward(h_R2F)


def _swiglu_backward(ctx: Any, g_RF: Tensor) -> tuple[Tensor | None, None]:
    (h_R2F,) = ctx.saved_tensors
    return _swiglu_backward_op(g_RF, h_R2F, ctx.backend), None


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(h_R2F: Tensor, backend: str = "auto") -> Tensor:
    """silu(gate) * up for h_R2F = [gate | up] ([R, 2F] -> [R, F]), computed in fp32 and
    rounded once to h's dtype; backward in one pass. backend: "auto", "triton" or "torch"
    (see the module docstring).

    Raises:
        ValueError: an odd last dim, or a backend that cannot run here.
    """
    if h_R2F.ndim != 2 or h_R2F.shape[1] % 2:
        raise ValueError(f"swiglu takes [R, 2F], got shape {tuple(h_R2F.shape)}")
    _use_triton(h_R2F, backend)  # validates before the op is traced or run
    return _swiglu_op(h_R2F, backend)


# --- combine ----------------------------------------------------------------------------


def _combine_torch(y_SD: Tensor, pos_TK: Tensor, w_TK: Tensor, out_dtype: torch.dtype) -> Tensor:
    T, K = pos_TK.shape
    if y_SD.dtype in (torch.float32, torch.float64):
        # One fused weighted gather-sum.
        out = F.embedding_bag(pos_TK, y_SD, mode="sum", per_sample_weights=w_TK.to(y_SD.dtype))
        return out.to(out_dtype)
    # Low precision: one gather of every pair's row, summed with fp32 weights into fp32.
    rows_TKD = y_SD.index_select(0, pos_TK.reshape(-1)).view(T, K, -1)
    out_TD = torch.zeros(T, y_SD.shape[1], dtype=torch.float32, device=y_SD.device)
    for k in range(K):
        out_TD.addcmul_(rows_TKD[:, k], w_TK[:, k : k + 1])
    return out_TD.to(out_dtype)


def _combine_backward_torch(
    g_TD: Tensor, y_SD: Tensor, token_R: Tensor, w_R: Tensor
) -> tuple[Tensor, Tensor]:
    T = g_TD.shape[0]
    acc = torch.promote_types(y_SD.dtype, torch.float32)  # fp32, or fp64 for fp64 rows
    g_RD = g_TD.to(acc).index_select(0, token_R)
    # <y[s], g[s]> in row chunks of T: no [R, D] fp32 product at once.
    dot_R = torch.cat(
        [
            torch.linalg.vecdot(y_c.to(acc), g_c)
            for y_c, g_c in zip(y_SD.split(T), g_RD.split(T), strict=True)
        ]
    )
    return g_RD.mul_(w_R.to(acc).unsqueeze(1)).to(y_SD.dtype), dot_R


@torch.library.custom_op("moeyard::combine", mutates_args=())
def _combine_op(
    y_SD: Tensor,
    w_TK: Tensor,
    token_S: Tensor,
    order_S: Tensor,
    pos_TK: Tensor,
    keep_TK: Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    if not _use_triton(y_SD, backend):
        return _combine_torch(y_SD, pos_TK, w_TK, out_dtype)
    y, pos, w = y_SD.contiguous(), pos_TK.contiguous(), w_TK.float().contiguous()
    T, K = pos.shape
    D = y.shape[1]
    out = torch.empty(T, D, dtype=out_dtype, device=y.device)
    if T and D:
        block = _block(D)
        _combine_fwd_kernel[(T, triton.cdiv(D, block))](y, pos, w, out, D, K=K, BLOCK=block)
    return out


@_combine_op.register_fake
def _(
    y_SD: Tensor,
    w_TK: Tensor,
    token_S: Tensor,
    order_S: Tensor,
    pos_TK: Tensor,
    keep_TK: Tensor | None,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    return y_SD.new_empty(pos_TK.shape[0], y_SD.shape[1], dtype=out_dtype)


@torch.library.custom_op("moeyard::combine_backward", mutates_args=())
def _combine_backward_op(
    g_TD: Tensor, y_SD: Tensor, token_R: Tensor, w_R: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    if not _use_triton(y_SD, backend):
        return _combine_backward_torch(g_TD, y_SD, token_R, w_R)
    g, y = g_TD.contiguous(), y_SD.contiguous()
    R, D = y.shape
    dy = torch.empty_like(y)
    dot = torch.empty(R, dtype=torch.float32, device=y.device)
    if R:
        _combine_bwd_kernel[(R,)](
            g, y, token_R.contiguous(), w_R.float().contiguous(), dy, dot, D=D, BLOCK=_block(D)
        )
    return dy, dot


@_combine_backward_op.register_fake
def _(
    g_TD: Tensor, y_SD: Tensor, token_R: Tensor, w_R: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(y_SD), y_SD.new_empty(y_SD.shape[0], dtype=torch.float32)


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    y_SD, w_TK, token_S, order_S, pos_TK, keep_TK, _, ctx.backend = inputs
    ctx.save_for_backward(y_SD, w_TK, token_S, order_S, pos_TK, keep_TK)


def _combine_backward(ctx: Any, g_TD: Tensor) -> tuple[Tensor | None, ...]:
    y_SD, w_TK, token_S, order_S, pos_TK, keep_TK = ctx.saved_tensors
    R = y_SD.shape[0]
    # Only the rows present: at EP>1 the kept pairs' (a prefix of the sorted order).
    w_R = w_TK.reshape(-1).index_select(0, order_S[:R])
    grad_y, dot_R = _combine_backward_op(g_TD, y_SD, token_S[:R], w_R, ctx.backend)
    grad_w = dot_R.index_select(0, pos_TK.reshape(-1)).view_as(w_TK)
    if keep_TK is not None:
        # masked_fill, not a multiply: a dropped pair read a kept row (row 0) with weight 0.
        grad_w = grad_w.masked_fill(~keep_TK, 0)
    return grad_y, grad_w.to(w_TK.dtype), None, None, None, None, None, None


_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine(
    y_SD: Tensor,
    w_TK: Tensor,
    *,
    token_S: Tensor,
    order_S: Tensor,
    pos_TK: Tensor,
    keep_TK: Tensor | None,
    out_dtype: torch.dtype,
    backend: str = "auto",
) -> Tensor:
    """out[t] = sum over k of w_TK[t, k] * y_SD[pos_TK[t, k]] in fp32, as out_dtype [T, D].

    y_SD: expert outputs in expert-sorted order, at least every row pos_TK points at (rows
    past them are never read); w_TK: fp32 weights, 0 for dropped pairs; token_S / order_S:
    the token / the pair of each sorted row; pos_TK: the sorted row of each pair, dropped
    pairs pointed at a kept row; keep_TK: kept pairs, or None when none can be dropped
    (their weight gradient is then 0). Gradients flow to y_SD and w_TK.
    """
    _use_triton(y_SD, backend)
    return _combine_op(y_SD, w_TK, token_S, order_S, pos_TK, keep_TK, out_dtype, backend)
