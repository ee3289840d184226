"""Fused RMSNorm in Triton, forward and backward.

Same contract as :func:`.reference.rmsnorm_reference`:
``rmsnorm_triton(x, weight, eps) -> y`` with y = x / sqrt(mean(x^2) + eps) * weight over the
last dim, any leading shape, x in fp32/bf16/fp16, statistics in fp32, y in x's dtype.

With r = rsqrt(mean(x^2) + eps) per row and g = dy * weight:

    y  = x * r * weight                           (forward; r is saved: one fp32 per row)
    dx = r * g - r^3 * x * mean(g * x)            (per row, recomputed from x, dy, weight, r)
    dw = sum over rows of dy * x * r

A program handles a tile of BLOCK_M rows x the whole row (BLOCK_N = next power of two of the
hidden size, at most MAX_HIDDEN). In the backward each program walks a contiguous run of row
tiles and keeps its share of dw in fp32 registers; the (programs, hidden) partial sums are
added in torch, so no atomics and a deterministic result.
"""

from __future__ import annotations

import torch

from phase7fw.errors import Phase7Error
from phase7fw.kernels._triton import require, tl, triton

__all__ = ["rmsnorm_triton", "MAX_HIDDEN"]

#: widest row kept in registers in one piece (a row of 8192 fp32 is 32 KiB per program)
MAX_HIDDEN = 8192


@triton.jit
def _rmsnorm_fwd_kernel(X, W, Y, RSTD, M, N, stride_x, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + r64 * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rmsnorm_bwd_kernel(
    X, W, DY, RSTD, DX, DW_PART, M, N, stride_x, stride_dy, TILES_PER_PROG,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, TILES_PER_PROG):
        rows = (pid * TILES_PER_PROG + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        r64 = rows.to(tl.int64)[:, None]
        # masked rows and columns load as 0 and so add nothing to dw
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        g = dy * w[None, :]
        c = tl.sum(g * x, axis=1) / N
        dx = rstd[:, None] * g - (rstd * rstd * rstd * c)[:, None] * x
        tl.store(DX + r64 * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * x * rstd[:, None], axis=0)
    tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)


# ---------------------------------------------------------------------------------------


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): about 4096 elements per program, whole rows."""
    if n > MAX_HIDDEN:
        raise Phase7Error(
            f"the Triton RMSNorm keeps a row in registers and takes hidden sizes up to {MAX_HIDDEN},"
            f" got {n}; use kernels.rmsnorm = \"reference\""
        )
    block_n = triton.next_power_of_2(max(n, 1))
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, min(16, max(4, block_m * block_n // 512))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, n) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def _fwd_impl(x, weight, eps):
    require(x, weight)
    n = x.shape[-1]
    block_m, block_n, nw = _tiles(n)
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if m and n:
        _rmsnorm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, weight, y, rstd, m, n, x2.stride(0), eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=nw
        )
    return y, rstd


def _programs(x: torch.Tensor, tiles: int) -> int:
    """Backward programs: enough to fill the GPU, few enough that the dw partials stay small."""
    if x.device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 4  # the interpreter runs programs one after another
    return max(1, min(tiles, target))


def _bwd_impl(x, weight, rstd, dy):
    require(x, weight)
    n = x.shape[-1]
    block_m, block_n, nw = _tiles(n)
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return dx, torch.zeros_like(weight)
    tiles = triton.cdiv(m, block_m)
    per_prog = triton.cdiv(tiles, _programs(x, tiles))
    grid = triton.cdiv(tiles, per_prog)
    dw_part = torch.empty((grid, n), device=x.device, dtype=torch.float32)
    _rmsnorm_bwd_kernel[(grid,)](
        x2, weight, dy2, rstd.reshape(-1), dx, dw_part, m, n, x2.stride(0), dy2.stride(0), per_prog,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=nw,
    )
    return dx, dw_part.sum(0).to(weight.dtype)


@torch.library.custom_op("phase7fw::rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y in x's dtype, rstd (x.shape[:-1]) fp32)."""
    return _fwd_impl(x, weight, eps)


@rmsnorm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("phase7fw::rmsnorm_bwd", mutates_args=())
def rmsnorm_bwd(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight in weight's dtype)."""
    return _bwd_impl(x, weight, rstd, dy)


@rmsnorm_bwd.register_fake
def _(x, weight, rstd, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # rstd gets no gradient: do not fill one with zeros


def _backward(ctx, dy, drstd):
    if dy is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.phase7fw.rmsnorm_bwd(x, weight, rstd, dy)
    return dx, dw, None


rmsnorm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Drop-in for ``rmsnorm_reference(x, weight, eps)``."""
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if torch.float64 in (x.dtype, weight.dtype):
        raise ValueError("the Triton RMSNorm takes fp32/bf16/fp16 inputs, not fp64")
    # no autocast guard needed: autocast passes custom ops their inputs unchanged
    return torch.ops.phase7fw.rmsnorm_fwd(x, weight, float(eps))[0]
