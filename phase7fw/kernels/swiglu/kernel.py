"""Fused SwiGLU activation in Triton, forward and backward.

Same contract as :func:`.reference.swiglu_reference`:
``swiglu_triton(gate, up) -> silu(gate) * up``, elementwise, any shape, computed in fp32 and
stored in the inputs' dtype. With s = sigmoid(gate):

    y     = gate * s * up
    dgate = dy * up * s * (1 + gate * (1 - s))
    dup   = dy * gate * s

The backward recomputes s from the saved inputs, so nothing but gate and up is kept (the
torch reference also keeps silu(gate)). One pass reads gate and up and writes y; the backward
reads gate, up, dy and writes both gradients. gate and up may be strided row views (the two
halves of one fused gate/up projection): rows are addressed with their own stride, no copy.
"""

from __future__ import annotations

import torch

from phase7fw.kernels._triton import require, tl, triton

__all__ = ["swiglu_triton"]


@triton.jit
def _block(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M x BLOCK_N) block of the (M, N) problem: int64 row offsets as a
    column (rows * stride overflows int32 on large batches), column offsets, in-range mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None], cols, mask


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, M, N, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r64, cols, mask = _block(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + r64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    G, U, DY, DG, DU, M, N, stride_g, stride_u, stride_dy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    r64, cols, mask = _block(M, N, BLOCK_M, BLOCK_N)
    g = tl.load(G + r64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dy * u * (s + silu * (1.0 - s))
    tl.store(DG + r64 * N + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + r64 * N + cols[None, :], (dy * silu).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 2048-element tiles, up to 1024 columns wide."""
    block_n = min(1024, triton.next_power_of_2(max(n, 1)))
    return max(1, 2048 // block_n), block_n, 4


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, n) with unit column stride: a view for a chunk of a fused projection."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _fwd_impl(gate, up):
    require(gate, up)
    n = gate.shape[-1]
    g2, u2 = _rows(gate, n), _rows(up, n)
    m = g2.shape[0]
    y = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    if m and n:
        bm, bn, nw = _tiles(n)
        _swiglu_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            g2, u2, y, m, n, g2.stride(0), u2.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=nw
        )
    return y


def _bwd_impl(gate, up, dy):
    require(gate, up, dy)
    n = gate.shape[-1]
    g2, u2, dy2 = _rows(gate, n), _rows(up, n), _rows(dy, n)
    m = g2.shape[0]
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty(up.shape, device=up.device, dtype=up.dtype)
    if m and n:
        bm, bn, nw = _tiles(n)
        _swiglu_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            g2, u2, dy2, dg, du, m, n, g2.stride(0), u2.stride(0), dy2.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    return dg, du


@torch.library.custom_op("phase7fw::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (gate and up of one shape and dtype), contiguous."""
    return _fwd_impl(gate, up)


@swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("phase7fw::swiglu_bwd", mutates_args=())
def swiglu_bwd(gate: torch.Tensor, up: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup)."""
    return _bwd_impl(gate, up, dy)


@swiglu_bwd.register_fake
def _(gate, up, dy):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return torch.ops.phase7fw.swiglu_bwd(gate, up, dy)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``swiglu_reference(gate, up)`` = ``F.silu(gate) * up``."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    dt = torch.promote_types(gate.dtype, up.dtype)
    if dt == torch.float64:
        raise ValueError("the Triton SwiGLU takes fp32/bf16/fp16 inputs, not fp64")
    # no autocast guard needed: autocast passes custom ops their inputs unchanged
    return torch.ops.phase7fw.swiglu_fwd(gate.to(dt), up.to(dt))
