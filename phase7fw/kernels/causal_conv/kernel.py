"""The causal depthwise convolution in Triton, forward and backward, on the (b, t, d) layout.

Same contract as :func:`.reference.causal_conv_reference`: ``causal_conv_triton(u, weight,
bias)`` with u (b, t, d), weight (d, 1, K), bias (d), K-1 zeros on the left only:

    y[t, c]     = bias[c] + sum_k w[c, k] u[t - K + 1 + k, c]
    du[s, c]    = sum_k w[c, k] dy[s + K - 1 - k, c]
    dw[c, k]    = sum_{b, t} dy[t, c] u[t - K + 1 + k, c],   dbias[c] = sum_{b, t} dy[t, c]

Why: the reference transposes u to (b, d, t), pads it and runs ``F.conv1d(groups=d)``, which
cuDNN serves with its slow depthwise conv2d path, then transposes back: at the 1.5B model's
B = 8 that is ~10.7 ms of a 237 ms step on an H200 (benchmarks/RESULTS.md), for work that only
needs to stream u and dy a few times. Here a program owns a (BT x BD) tile of one sequence,
reads its K shifted rows straight from u's layout (no copies) and sums in fp32; the backward
writes each tile's share of dw and dbias to an fp32 buffer that torch sums (no atomics,
deterministic). Outputs are stored in u's dtype.
"""

from __future__ import annotations

import torch

from phase7fw.kernels._triton import require, tl, triton

__all__ = ["causal_conv_triton"]

BT, BD, WARPS = 32, 128, 4  # a 32 x 128 tile: 256-byte rows in bf16


@triton.jit
def _tile(T, D, BT: tl.constexpr, BD: tl.constexpr):
    """This program's sequence (int64), time offsets and channel offsets with the channel mask."""
    ts = tl.program_id(0) * BT + tl.arange(0, BT)
    cs = tl.program_id(1) * BD + tl.arange(0, BD)
    return tl.program_id(2).to(tl.int64), ts, cs, cs < D


@triton.jit
def _rows(P, b, stride_b, stride_t, t, cs, cmask, T):
    """The fp32 (len(t) x BD) block of rows t of sequence b (zeros outside 0 <= t < T)."""
    m = ((t >= 0) & (t < T))[:, None] & cmask[None, :]
    return tl.load(P + b * stride_b + t.to(tl.int64)[:, None] * stride_t + cs[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_fwd_kernel(U, W, BIAS, Y, T, D, stride_ub, stride_ut,
                     K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    b, ts, cs, cmask = _tile(T, D, BT, BD)
    acc = tl.zeros((BT, BD), tl.float32) + tl.load(BIAS + cs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(W + cs * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += _rows(U, b, stride_ub, stride_ut, ts - (K - 1) + k, cs, cmask, T) * w[None, :]
    m = (ts < T)[:, None] & cmask[None, :]
    tl.store(Y + b * T * D + ts.to(tl.int64)[:, None] * D + cs[None, :], acc.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd_kernel(U, W, DY, DU, DW_PART, DB_PART, T, D, stride_ub, stride_ut, stride_gb, stride_gt,
                     K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    b, ts, cs, cmask = _tile(T, D, BT, BD)
    part = b * tl.num_programs(0) + tl.program_id(0)  # this tile's row of the partial sums
    gy = _rows(DY, b, stride_gb, stride_gt, ts, cs, cmask, T)
    tl.store(DB_PART + part * D + cs, tl.sum(gy, axis=0), mask=cmask)
    du = tl.zeros((BT, BD), tl.float32)
    for k in tl.static_range(K):
        w = tl.load(W + cs * K + k, mask=cmask, other=0.0).to(tl.float32)
        du += _rows(DY, b, stride_gb, stride_gt, ts + (K - 1) - k, cs, cmask, T) * w[None, :]
        u_k = _rows(U, b, stride_ub, stride_ut, ts - (K - 1) + k, cs, cmask, T)
        tl.store(DW_PART + (part * K + k) * D + cs, tl.sum(gy * u_k, axis=0), mask=cmask)
    m = (ts < T)[:, None] & cmask[None, :]
    tl.store(DU + b * T * D + ts.to(tl.int64)[:, None] * D + cs[None, :], du.to(DU.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------


def _seq(t: torch.Tensor) -> torch.Tensor:
    """``t`` (b, t, d) with unit channel stride (a view when it already has one)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(b: int, T: int, D: int) -> tuple[int, int, int]:
    return triton.cdiv(T, BT), triton.cdiv(D, BD), b


@torch.library.custom_op("phase7fw::causal_conv_fwd", mutates_args=())
def causal_conv_fwd(u: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y (b, t, d) contiguous from u (b, t, d), w (d, K) contiguous and bias (d), one dtype."""
    require(u, w, bias)
    u = _seq(u)
    b, T, D = u.shape
    y = torch.empty((b, T, D), device=u.device, dtype=u.dtype)
    if b and T and D:
        _conv_fwd_kernel[_grid(b, T, D)](u, w, bias, y, T, D, u.stride(0), u.stride(1),
                                         K=w.shape[1], BT=BT, BD=BD, num_warps=WARPS)
    return y


@causal_conv_fwd.register_fake
def _(u, w, bias):
    return torch.empty(u.shape, device=u.device, dtype=u.dtype)


@torch.library.custom_op("phase7fw::causal_conv_bwd", mutates_args=())
def causal_conv_bwd(u: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du (b, t, d) in u's dtype, dw (d, K) and dbias (d) in fp32)."""
    require(u, w, dy)
    u, dy = _seq(u), _seq(dy)
    b, T, D = u.shape
    K = w.shape[1]
    du = torch.empty((b, T, D), device=u.device, dtype=u.dtype)
    grid = _grid(b, T, D)
    parts = b * grid[0]
    # every (tile, k, channel) is written by one program: no zero fill needed
    dw_part = torch.empty((parts, K, D), device=u.device, dtype=torch.float32)
    db_part = torch.empty((parts, D), device=u.device, dtype=torch.float32)
    if b and T and D:
        _conv_bwd_kernel[grid](u, w, dy, du, dw_part, db_part, T, D, u.stride(0), u.stride(1),
                               dy.stride(0), dy.stride(1), K=K, BT=BT, BD=BD, num_warps=WARPS)
    return du, dw_part.sum(0).t().contiguous(), db_part.sum(0)


@causal_conv_bwd.register_fake
def _(u, w, dy):
    return (torch.empty(u.shape, device=u.device, dtype=u.dtype),
            torch.empty(w.shape, device=u.device, dtype=torch.float32),
            torch.empty(w.shape[:1], device=u.device, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    u, w, bias = inputs
    ctx.save_for_backward(u, w)
    ctx.w_dtype, ctx.b_dtype = w.dtype, bias.dtype


def _backward(ctx, dy):
    u, w = ctx.saved_tensors
    du, dw, db = torch.ops.phase7fw.causal_conv_bwd(u, w, dy)
    return du, dw.to(ctx.w_dtype), db.to(ctx.b_dtype)


causal_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv_triton(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``causal_conv_reference(u, weight, bias)``: u (b, t, d), weight (d, 1, K),
    bias (d). Under autocast the inputs are cast to its dtype first, as ``F.conv1d`` is."""
    if u.dim() != 3 or weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] != u.shape[-1] \
            or bias.shape != weight.shape[:1]:
        raise ValueError(f"causal_conv: expected u (b, t, d), weight (d, 1, K), bias (d), got u {tuple(u.shape)},"
                         f" weight {tuple(weight.shape)}, bias {tuple(bias.shape)}")
    if torch.is_autocast_enabled(u.device.type):
        dt = torch.get_autocast_dtype(u.device.type)
    else:
        dt = torch.promote_types(torch.promote_types(u.dtype, weight.dtype), bias.dtype)
    if dt == torch.float64:
        raise ValueError("the Triton causal_conv takes fp32/bf16/fp16 inputs, not fp64")
    w = weight.to(dt).reshape(weight.shape[0], weight.shape[-1]).contiguous()
    return torch.ops.phase7fw.causal_conv_fwd(u.to(dt), w, bias.to(dt))
