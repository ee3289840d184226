"""Chunked AR-SSM scan (SSD form) in Triton, forward and backward.

Same contract as :func:`.reference.ar_ssm_scan_reference`:
``ar_ssm_scan_triton(x, B, C, log_decay, chunk_size=64) -> y`` with x (b, h, T, dv), B and C
(b, h, T, r), log_decay (b, h, T) <= 0, y_t = C_t^T S_t, S_t = exp(log_decay_t) S_{t-1} + B_t x_t^T.

One program per (batch, head, dv tile) walks the chunks of Q tokens in order, keeping the
r x dv_tile state in fp32 registers. Per chunk, with cum the in-chunk cumulative log-decay
and L_ij = exp(cum_i - cum_j) for i >= j (else 0):

    y     = ((C B^T) * L) x + exp(cum) * (C S_in)          three small matmuls (tensor cores)
    S_out = exp(cum_Q) S_in + (B * exp(cum_Q - cum))^T x

The state entering every chunk is written out (O(T r dv / Q) memory) for the backward, which
walks the chunks in reverse carrying dS (gradient of the state leaving the chunk):

    dC = ((dy x^T) * L) B + exp(cum) * (dy S_in^T)
    dB = ((dy x^T) * L)^T C + exp(cum_Q - cum) * (x dS^T)
    dx = ((C B^T) * L)^T dy + (B * exp(cum_Q - cum)) dS
    dS <- exp(cum_Q) dS + (C * exp(cum))^T dy

The decay gradient needs no kernel: y depends on the cumulative log-decay only through
cum_t - cum_s, so dL/dcum_t = C_t . dC_t - B_t . dB_t and dL/dlog_decay_t is its reverse
cumulative sum over t' >= t (done in torch, O(T r)).

All exponents are <= 0 (log_decay <= 0, masked entries use -inf), so nothing overflows.
Matmuls run in fp32 ("ieee"). ``[kernels.ar_ssm_scan] precision = "tf32"`` selects TF32 tensor
cores; "tf32x3" miscomputed dx and faulted on an H200 with Triton 3.6 (2026-11-28): it is not
offered.
"""

from __future__ import annotations

import os
import warnings

import torch

from phase7fw.kernels._chunked import causal_decay, chunk_log_decay, load_rows, program_tiles, row_ptrs
from phase7fw.kernels._triton import require, tl, triton
from phase7fw.kernels.ar_ssm_scan import TritonConfig

if "PHASE7FW_SSM_PRECISION" in os.environ:  # read until 2026-12: say it no longer acts
    warnings.warn("PHASE7FW_SSM_PRECISION is no longer read; set the scan's precision in the recipe: "
                  f"[kernels.ar_ssm_scan] impl = \"triton\", precision = \"{os.environ['PHASE7FW_SSM_PRECISION']}\"",
                  UserWarning, stacklevel=2)

__all__ = ["ar_ssm_scan_triton"]


@triton.jit
def _ssm_fwd_kernel(
    X, Bm, Cm, LD, Y, STATES,
    T, R, DV, NCHUNK,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh, offs_q, offs_r, offs_v, r_ok, v_ok = program_tiles(Q, BR, BDV, R, DV)
    causal = offs_q[:, None] >= offs_q[None, :]
    state = tl.zeros((BR, BDV), tl.float32)
    for c in range(0, NCHUNK):
        t = c * Q + offs_q
        t_ok = t < T
        xv_mask = t_ok[:, None] & v_ok[None, :]
        xr_mask = t_ok[:, None] & r_ok[None, :]
        x = load_rows(X, bh, t, offs_v, T, DV, xv_mask)
        b = load_rows(Bm, bh, t, offs_r, T, R, xr_mask)
        cm = load_rows(Cm, bh, t, offs_r, T, R, xr_mask)
        cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
        # state entering this chunk, for the backward
        sptr = STATES + (bh * NCHUNK + c) * R * DV + offs_r[:, None] * DV + offs_v[None, :]
        tl.store(sptr, state, mask=r_ok[:, None] & v_ok[None, :])

        lmat = causal_decay(cum, causal)
        g = tl.dot(cm, tl.trans(b), input_precision=PREC) * lmat
        y = tl.dot(g, x, input_precision=PREC)
        y += tl.dot(cm * tl.exp(cum)[:, None], state, input_precision=PREC)
        tl.store(row_ptrs(Y, bh, t, offs_v, T, DV), y.to(Y.dtype.element_ty), mask=xv_mask)
        to_end = tl.exp(total - cum)
        state = state * tl.exp(total) + tl.dot(tl.trans(b * to_end[:, None]), x, input_precision=PREC)


@triton.jit
def _ssm_bwd_kernel(
    X, Bm, Cm, LD, DY, STATES, DX, DB, DC,
    T, R, DV, NCHUNK, BH,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh, offs_q, offs_r, offs_v, r_ok, v_ok = program_tiles(Q, BR, BDV, R, DV)
    causal = offs_q[:, None] >= offs_q[None, :]
    causal_t = offs_q[:, None] <= offs_q[None, :]
    ds = tl.zeros((BR, BDV), tl.float32)  # dL/d(state leaving the chunk)
    part = pid_v * BH + bh  # this tile's row of the partial dB, dC: (n_tiles * BH, T, R)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        t = c * Q + offs_q
        t_ok = t < T
        xv_mask = t_ok[:, None] & v_ok[None, :]
        xr_mask = t_ok[:, None] & r_ok[None, :]
        x = load_rows(X, bh, t, offs_v, T, DV, xv_mask)
        dy = load_rows(DY, bh, t, offs_v, T, DV, xv_mask)
        b = load_rows(Bm, bh, t, offs_r, T, R, xr_mask)
        cm = load_rows(Cm, bh, t, offs_r, T, R, xr_mask)
        cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
        s_in = tl.load(STATES + (bh * NCHUNK + c) * R * DV + offs_r[:, None] * DV + offs_v[None, :],
                       mask=r_ok[:, None] & v_ok[None, :], other=0.0)

        lmat = causal_decay(cum, causal)  # [i, j]
        lmat_t = tl.exp(tl.where(causal_t, cum[None, :] - cum[:, None], float("-inf")))  # [j, i]
        ecum = tl.exp(cum)
        to_end = tl.exp(total - cum)
        # Transposed products are formed from the loaded tiles, never by transposing a
        # computed tile (one more small matmul, but no register-layout transposes).
        m = tl.dot(dy, tl.trans(x), input_precision=PREC) * lmat  # [i, j] = (dy_i . x_j) L_ij
        m_t = tl.dot(x, tl.trans(dy), input_precision=PREC) * lmat_t  # [j, i]
        dc = tl.dot(m, b, input_precision=PREC) + ecum[:, None] * tl.dot(dy, tl.trans(s_in), input_precision=PREC)
        db = tl.dot(m_t, cm, input_precision=PREC) + to_end[:, None] * tl.dot(x, tl.trans(ds), input_precision=PREC)
        g_t = tl.dot(b, tl.trans(cm), input_precision=PREC) * lmat_t  # [j, i] = (B_j . C_i) L_ij
        dx = tl.dot(g_t, dy, input_precision=PREC) + tl.dot(b * to_end[:, None], ds, input_precision=PREC)
        ds = ds * tl.exp(total) + tl.dot(tl.trans(cm * ecum[:, None]), dy, input_precision=PREC)

        tl.store(row_ptrs(DX, bh, t, offs_v, T, DV), dx.to(DX.dtype.element_ty), mask=xv_mask)
        tl.store(row_ptrs(DB, part, t, offs_r, T, R), db, mask=xr_mask)
        tl.store(row_ptrs(DC, part, t, offs_r, T, R), dc, mask=xr_mask)


# ---------------------------------------------------------------------------------------

def _cfg(x: torch.Tensor, dv: int, gpu, precision: str):
    """Launch configuration: ``gpu`` = (chunk Q, dv tile, num_warps, num_stages) and the dot
    ``precision`` on a GPU (``[kernels.ar_ssm_scan]``, :class:`TritonConfig`); fixed small
    tiles in fp32 in the interpreter."""
    if x.device.type == "cuda":
        Q, bdv, nw, ns = gpu
        prec = precision
    else:
        Q, bdv, nw, ns = 16, 32, 4, 1
        prec = "ieee"
    bdv = min(bdv, max(16, triton.next_power_of_2(dv)))
    return Q, bdv, nw, ns, prec


def _fwd_impl(x, B, C, log_decay, gpu, precision):
    require(x, B, C, log_decay)
    b, h, T, dv = x.shape
    r = B.shape[-1]
    Q, BDV, nw, ns, prec = _cfg(x, dv, gpu, precision)
    n = triton.cdiv(T, Q) if T else 0
    y = torch.empty_like(x)
    states = torch.empty((b, h, n, r, dv), device=x.device, dtype=torch.float32)
    if T == 0:
        return y, states
    BR = max(16, triton.next_power_of_2(r))
    _ssm_fwd_kernel[(triton.cdiv(dv, BDV), b * h)](
        x, B, C, log_decay, y, states, T, r, dv, n, Q=Q, BR=BR, BDV=BDV, PREC=prec, num_warps=nw, num_stages=ns
    )
    return y, states


def _bwd_impl(x, B, C, log_decay, states, dy, gpu, precision):
    require(x, B, C, log_decay)
    b, h, T, dv = x.shape
    r = B.shape[-1]
    Q, BDV, nw, ns, prec = _cfg(x, dv, gpu, precision)
    n = states.shape[2]
    tiles = triton.cdiv(dv, BDV)
    dx = torch.empty_like(x)
    dB = torch.empty((tiles, b, h, T, r), device=x.device, dtype=torch.float32)
    dC = torch.empty_like(dB)
    if T:
        BR = max(16, triton.next_power_of_2(r))
        _ssm_bwd_kernel[(tiles, b * h)](
            x, B, C, log_decay, dy.contiguous(), states, dx, dB, dC, T, r, dv, n, b * h,
            Q=Q, BR=BR, BDV=BDV, PREC=prec, num_warps=nw, num_stages=ns,
        )
    dB, dC = dB.sum(0), dC.sum(0)
    # dL/dcum_t = C_t . dC_t - B_t . dB_t ; dlog_decay_t = sum_{t' >= t} dL/dcum_t'
    dcum = (C.float() * dC).sum(-1) - (B.float() * dB).sum(-1)
    dld = dcum.flip(-1).cumsum(-1).flip(-1)
    return dx, dB.to(B.dtype), dC.to(C.dtype), dld.to(log_decay.dtype)


@torch.library.custom_op("phase7fw::ar_ssm_scan_fwd", mutates_args=())
def ar_ssm_scan_fwd(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor, gpu: list[int],
                    precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel core: (y, states entering each chunk (b, h, n_chunks, r, dv) fp32); ``gpu`` and
    ``precision``: the launch configuration on a GPU (:class:`TritonConfig`)."""
    return _fwd_impl(x, B, C, log_decay, gpu, precision)


@ar_ssm_scan_fwd.register_fake
def _(x, B, C, log_decay, gpu, precision):
    b, h, T, dv = x.shape
    Q = gpu[0] if x.device.type == "cuda" else 16
    n = -(-T // Q)
    return torch.empty_like(x), x.new_empty((b, h, n, B.shape[-1], dv), dtype=torch.float32)


@torch.library.custom_op("phase7fw::ar_ssm_scan_bwd", mutates_args=())
def ar_ssm_scan_bwd(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor,
                    states: torch.Tensor, dy: torch.Tensor, gpu: list[int], precision: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dB, dC, dlog_decay)."""
    return _bwd_impl(x, B, C, log_decay, states, dy, gpu, precision)


@ar_ssm_scan_bwd.register_fake
def _(x, B, C, log_decay, states, dy, gpu, precision):
    return torch.empty_like(x), torch.empty_like(B), torch.empty_like(C), torch.empty_like(log_decay)


def _setup_context(ctx, inputs, output):
    x, B, C, log_decay, gpu, precision = inputs
    ctx.save_for_backward(x, B, C, log_decay, output[1])
    ctx.gpu, ctx.precision = gpu, precision


def _backward(ctx, dy, dstates):
    x, B, C, log_decay, states = ctx.saved_tensors
    grads = torch.ops.phase7fw.ar_ssm_scan_bwd(x, B, C, log_decay, states, dy, ctx.gpu, ctx.precision)
    return (*grads, None, None)


ar_ssm_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def ar_ssm_scan_triton(x, B, C, log_decay, chunk_size: int = 64, *, tuning: TritonConfig | None = None):
    """Drop-in for ``ar_ssm_scan_reference``. ``chunk_size`` is accepted for the signature; the
    kernel uses its own chunk length, ``tuning.gpu[0]`` on a GPU (the result does not depend on
    it). x keeps its dtype (bf16 in memory is fine); B, C, log_decay are read as given and
    computed in fp32. ``tuning``: the launch configuration (``[kernels.ar_ssm_scan]``; None: the
    defaults)."""
    tuning = tuning or TritonConfig()
    b, h, T, dv = x.shape
    if B.shape[:3] != (b, h, T) or C.shape != B.shape or log_decay.shape != (b, h, T):
        raise ValueError(
            f"ar_ssm scan: expected x (b,h,t,dv), B and C (b,h,t,r), log_decay (b,h,t); got"
            f" x {tuple(x.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, log_decay {tuple(log_decay.shape)}"
        )
    if x.dtype == torch.float64:
        raise ValueError("the Triton AR-SSM scan takes fp32/bf16/fp16 inputs, not fp64")
    with torch.autocast(device_type=x.device.type, enabled=False):
        y, _ = torch.ops.phase7fw.ar_ssm_scan_fwd(x.contiguous(), B.contiguous(), C.contiguous(),
                                                  log_decay.float().contiguous(), list(tuning.gpu), tuning.precision)
    return y
