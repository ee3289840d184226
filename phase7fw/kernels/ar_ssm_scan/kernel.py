"""Chunked AR-SSM scan (SSD form) in Triton, forward and backward, two schedules.

Same contract as :func:`.reference.ar_ssm_scan_reference`:
``ar_ssm_scan_triton(x, B, C, log_decay, chunk_size=64) -> y`` with x (b, h, T, dv), B and C
(b, h, T, r), log_decay (b, h, T) <= 0, y_t = C_t^T S_t, S_t = exp(log_decay_t) S_{t-1} + B_t x_t^T.

Per chunk of Q tokens, with cum the in-chunk cumulative log-decay, total = cum_Q and
L_ij = exp(cum_i - cum_j) for i >= j (else 0), and S_in the r x dv state entering the chunk:

    y     = ((C B^T) * L) x + exp(cum) * (C S_in)          three small matmuls (tensor cores)
    S_out = exp(total) S_in + U,   U = (B * exp(total - cum))^T x

The state entering every chunk is written out (fp32, (b, h, n_chunks, r, dv), O(T r dv / Q)
memory) for the backward, which carries dS (dL/d(the state leaving the chunk)) in reverse:

    dC = ((dy x^T) * L) B + exp(cum) * (dy S_in^T)
    dB = ((dy x^T) * L)^T C + exp(total - cum) * (x dS^T)
    dx = ((C B^T) * L)^T dy + (B * exp(total - cum)) dS
    dS_out[c-1] = exp(total_c) dS_out[c] + V_c,   V_c = (C * exp(cum))^T dy   (dS_out[n-1] = 0)

``[kernels.ar_ssm_scan] schedule`` picks how the chunks are walked (the per-chunk maths above
is the same ``@triton.jit`` helpers in both, and so are the saved states, so the backward of
either schedule reads the states of either forward):

- "rows": one program per (dv tile, batch x head) walks the chunks in order,
  the r x dv_tile state in fp32 registers; the backward walks them in reverse carrying dS.
  Two launches per step, but only batch x heads x dv tiles programs: at long sequences with
  small batches the grid collapses (batch 1 x 8 heads x 1 tile = 8 programs on a 132-SM GPU).
- "chunks": chunk-parallel, the grid (chunks x dv tiles, batch x head) grows with T. Forward,
  three launches: ``_ssm_local_kernel`` writes each chunk's U and total log-decay;
  :func:`phase7fw.kernels._chunked.chunk_scan` (shared with the hyperbolic linear attention;
  one program per (batch x head, slice of ``[kernels.ar_ssm_scan] scan`` state elements),
  16 chunks per step, fp32) turns them in place into S_in; ``_ssm_fwd_out_kernel`` computes
  y. Backward, the same in reverse: each chunk's V_c, the reverse scan gives dS_out (a second
  buffer the size of the states, held while the backward runs), then one program per chunk
  writes dx and its dv tile's share of dB and dC.
- "auto" (the default, :func:`pick_schedule`): "chunks" where the "rows" grid has fewer
  programs than the GPU has SMs, "rows" otherwise (H100, benchmarks/RESULTS.md: "chunks" is
  1.3x slower than "rows" with 256 programs at T=1024 and 2.4-5.9x faster with 8-32 programs
  at T=16k-32k).

The decay gradient needs no kernel: y depends on the cumulative log-decay only through
cum_t - cum_s, so dL/dcum_t = C_t . dC_t - B_t . dB_t and dL/dlog_decay_t is its reverse
cumulative sum over t' >= t (done in torch, O(T r)).

All exponents are <= 0 (log_decay <= 0, masked entries use -inf; the scan's exponents are sums
of chunk totals, never differences), so nothing overflows; offsets of (batch x head) rows are
int64. The per-chunk matmuls use TF32 tensor cores by default (``[kernels.ar_ssm_scan]
precision``; "ieee": fp32 FMA, and always in the interpreter); the scan stays fp32. "tf32x3" miscomputed dx and
faulted on an H200 with Triton 3.6 (2026-11-28): it is not offered.
"""

from __future__ import annotations

import os
import warnings

import torch

from phase7fw.kernels._chunked import (
    causal_decay,
    chunk_log_decay,
    chunk_scan,
    chunk_tiles,
    load_rows,
    program_tiles,
    row_ptrs,
    store_total,
)
from phase7fw.kernels._triton import require, tl, triton
from phase7fw.kernels.ar_ssm_scan import SCHEDULES, TritonConfig

if "PHASE7FW_SSM_PRECISION" in os.environ:  # read until 2026-12: say it no longer acts
    warnings.warn("PHASE7FW_SSM_PRECISION is no longer read; set the scan's precision in the recipe: "
                  f"[kernels.ar_ssm_scan] impl = \"triton\", precision = \"{os.environ['PHASE7FW_SSM_PRECISION']}\"",
                  UserWarning, stacklevel=2)

__all__ = ["ar_ssm_scan_triton"]


@triton.jit
def _load_chunk(X, Bm, Cm, LD, bh, t, offs_r, offs_v, r_ok, v_ok, T, R, DV):
    """A chunk's tokens ``t`` of row ``bh``: x (tokens x dv tile), B and C (tokens x rank), in
    fp32 and 0 where out of range, the in-chunk running log-decay and the chunk's total, and the
    masks of the (tokens x dv tile) and (tokens x rank) tiles."""
    t_ok = t < T
    xv_mask = t_ok[:, None] & v_ok[None, :]
    xr_mask = t_ok[:, None] & r_ok[None, :]
    x = load_rows(X, bh, t, offs_v, T, DV, xv_mask)
    b = load_rows(Bm, bh, t, offs_r, T, R, xr_mask)
    cm = load_rows(Cm, bh, t, offs_r, T, R, xr_mask)
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    return x, b, cm, cum, total, xv_mask, xr_mask


@triton.jit
def _state_ptrs(S, row, offs_r, offs_v, R, DV):
    """Pointers to this program's (rank x dv tile) part of chunk ``row`` (= bh * n + c) of a
    contiguous (b*h, n, R, DV) state."""
    return S + row * R * DV + offs_r[:, None] * DV + offs_v[None, :]


@triton.jit
def _chunk_y(x, b, cm, cum, s_in, causal, PREC: tl.constexpr):
    """y = ((C B^T) * L) x + exp(cum) * (C S_in): the chunk's output from its tokens and the state entering it."""
    g = tl.dot(cm, tl.trans(b), input_precision=PREC) * causal_decay(cum, causal)
    y = tl.dot(g, x, input_precision=PREC)
    return y + tl.dot(cm * tl.exp(cum)[:, None], s_in, input_precision=PREC)


@triton.jit
def _chunk_own(f, v, w, PREC: tl.constexpr):
    """(f * w)^T v, a chunk's own contribution: to the state leaving it with f = B, v = x,
    w = exp(total - cum) (S_out = exp(total) S_in + this); to dL/d(the state entering it) with
    f = C, v = dy, w = exp(cum) (dS_out[c-1] = exp(total_c) dS_out[c] + this)."""
    return tl.dot(tl.trans(f * w[:, None]), v, input_precision=PREC)


@triton.jit
def _chunk_grads(x, dy, b, cm, cum, total, s_in, ds, offs_q, PREC: tl.constexpr):
    """dx, dB, dC of a chunk from its tokens, the state entering it (s_in) and dL/d(the state
    leaving it) (ds). The transposed pair matrices are transposes of computed tiles
    (``tl.trans``), not products of their own: one Q x dv x Q matmul less per chunk, and
    fewer live tiles (H100, 2026-12-07: the "rows" backward 0.920 -> 0.704 ms at
    (8, 16, 1024, 128, r 16); benchmarks/RESULTS.md)."""
    lmat = causal_decay(cum, offs_q[:, None] >= offs_q[None, :])  # [i, j]
    ecum = tl.exp(cum)
    to_end = tl.exp(total - cum)
    m = tl.dot(dy, tl.trans(x), input_precision=PREC) * lmat  # [i, j] = (dy_i . x_j) L_ij
    dc = tl.dot(m, b, input_precision=PREC) + ecum[:, None] * tl.dot(dy, tl.trans(s_in), input_precision=PREC)
    db = tl.dot(tl.trans(m), cm, input_precision=PREC) + to_end[:, None] * tl.dot(x, tl.trans(ds), input_precision=PREC)
    g = tl.dot(cm, tl.trans(b), input_precision=PREC) * lmat  # [i, j] = (C_i . B_j) L_ij
    dx = tl.dot(tl.trans(g), dy, input_precision=PREC) + tl.dot(b * to_end[:, None], ds, input_precision=PREC)
    return dx, db, dc


@triton.jit
def _store_grads(DX, DB, DC, bh, part, t, offs_r, offs_v, T, R, DV, dx, db, dc, xv_mask, xr_mask):
    """dx into row ``bh``; this dv tile's share of dB and dC into row ``part`` = tile * b*h + bh
    of the (n_tiles * b*h, T, R) partial sums."""
    tl.store(row_ptrs(DX, bh, t, offs_v, T, DV), dx.to(DX.dtype.element_ty), mask=xv_mask)
    tl.store(row_ptrs(DB, part, t, offs_r, T, R), db, mask=xr_mask)
    tl.store(row_ptrs(DC, part, t, offs_r, T, R), dc, mask=xr_mask)


# schedule "rows": one program per (dv tile, b*h) walks the chunks ------------------------

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
        x, b, cm, cum, total, xv_mask, xr_mask = _load_chunk(X, Bm, Cm, LD, bh, t, offs_r, offs_v, r_ok, v_ok,
                                                              T, R, DV)
        # state entering this chunk, for the backward
        tl.store(_state_ptrs(STATES, bh * NCHUNK + c, offs_r, offs_v, R, DV), state,
                 mask=r_ok[:, None] & v_ok[None, :])
        y = _chunk_y(x, b, cm, cum, state, causal, PREC)
        tl.store(row_ptrs(Y, bh, t, offs_v, T, DV), y.to(Y.dtype.element_ty), mask=xv_mask)
        state = state * tl.exp(total) + _chunk_own(b, x, tl.exp(total - cum), PREC)


@triton.jit
def _ssm_bwd_kernel(
    X, Bm, Cm, LD, DY, STATES, DX, DB, DC,
    T, R, DV, NCHUNK, BH,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh, offs_q, offs_r, offs_v, r_ok, v_ok = program_tiles(Q, BR, BDV, R, DV)
    ds = tl.zeros((BR, BDV), tl.float32)  # dL/d(state leaving the chunk)
    part = pid_v * BH + bh  # this tile's row of the partial dB, dC: (n_tiles * BH, T, R)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        t = c * Q + offs_q
        x, b, cm, cum, total, xv_mask, xr_mask = _load_chunk(X, Bm, Cm, LD, bh, t, offs_r, offs_v, r_ok, v_ok,
                                                              T, R, DV)
        dy = load_rows(DY, bh, t, offs_v, T, DV, xv_mask)
        s_in = tl.load(_state_ptrs(STATES, bh * NCHUNK + c, offs_r, offs_v, R, DV),
                       mask=r_ok[:, None] & v_ok[None, :], other=0.0)
        dx, db, dc = _chunk_grads(x, dy, b, cm, cum, total, s_in, ds, offs_q, PREC)
        ds = ds * tl.exp(total) + _chunk_own(cm, dy, tl.exp(cum), PREC)
        _store_grads(DX, DB, DC, bh, part, t, offs_r, offs_v, T, R, DV, dx, db, dc, xv_mask, xr_mask)


# schedule "chunks": per-chunk kernels, grid (chunks x dv tiles, b*h), and chunk_scan -------

@triton.jit
def _ssm_local_kernel(
    F, V, LD, OUT, TOT,
    T, R, DV, NCHUNK,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr, FORWARD: tl.constexpr,
):
    """Each chunk's own contribution (:func:`_chunk_own`) into its row of OUT, and its total
    log-decay into TOT (value tile 0): forward F = B, V = x; backward F = C, V = dy."""
    c, pid_v, bh, offs_q, t, offs_r, offs_v, t_ok, r_ok, v_ok = chunk_tiles(Q, BR, BDV, R, DV, T)
    v = load_rows(V, bh, t, offs_v, T, DV, t_ok[:, None] & v_ok[None, :])
    f = load_rows(F, bh, t, offs_r, T, R, t_ok[:, None] & r_ok[None, :])
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    if FORWARD:
        w = tl.exp(total - cum)
    else:
        w = tl.exp(cum)
    row = bh * NCHUNK + c
    tl.store(_state_ptrs(OUT, row, offs_r, offs_v, R, DV), _chunk_own(f, v, w, PREC),
             mask=r_ok[:, None] & v_ok[None, :])
    store_total(TOT, row, total, offs_q, (offs_q * 0 + pid_v) == 0)


@triton.jit
def _ssm_fwd_out_kernel(
    X, Bm, Cm, LD, Y, STATES,
    T, R, DV, NCHUNK,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_r, offs_v, t_ok, r_ok, v_ok = chunk_tiles(Q, BR, BDV, R, DV, T)
    x, b, cm, cum, total, xv_mask, xr_mask = _load_chunk(X, Bm, Cm, LD, bh, t, offs_r, offs_v, r_ok, v_ok, T, R, DV)
    s_in = tl.load(_state_ptrs(STATES, bh * NCHUNK + c, offs_r, offs_v, R, DV),
                   mask=r_ok[:, None] & v_ok[None, :], other=0.0)
    y = _chunk_y(x, b, cm, cum, s_in, offs_q[:, None] >= offs_q[None, :], PREC)
    tl.store(row_ptrs(Y, bh, t, offs_v, T, DV), y.to(Y.dtype.element_ty), mask=xv_mask)


@triton.jit
def _ssm_bwd_chunk_kernel(
    X, Bm, Cm, LD, DY, STATES, DSTATES, DX, DB, DC,
    T, R, DV, NCHUNK, BH,
    Q: tl.constexpr, BR: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_r, offs_v, t_ok, r_ok, v_ok = chunk_tiles(Q, BR, BDV, R, DV, T)
    x, b, cm, cum, total, xv_mask, xr_mask = _load_chunk(X, Bm, Cm, LD, bh, t, offs_r, offs_v, r_ok, v_ok, T, R, DV)
    dy = load_rows(DY, bh, t, offs_v, T, DV, xv_mask)
    row = bh * NCHUNK + c
    s_mask = r_ok[:, None] & v_ok[None, :]
    s_in = tl.load(_state_ptrs(STATES, row, offs_r, offs_v, R, DV), mask=s_mask, other=0.0)
    ds = tl.load(_state_ptrs(DSTATES, row, offs_r, offs_v, R, DV), mask=s_mask, other=0.0)
    dx, db, dc = _chunk_grads(x, dy, b, cm, cum, total, s_in, ds, offs_q, PREC)
    _store_grads(DX, DB, DC, bh, pid_v * BH + bh, t, offs_r, offs_v, T, R, DV, dx, db, dc, xv_mask, xr_mask)


# ---------------------------------------------------------------------------------------

def _cfg(x: torch.Tensor, dv: int, gpu, precision: str):
    """Launch configuration: ``gpu`` = (chunk Q, dv tile, num_warps, num_stages), optionally
    followed by the inter-chunk scan's (elements per program, num_warps, num_stages) (schedule
    "chunks"; :class:`TritonConfig`'s ``scan`` where absent), and the dot ``precision`` on a GPU
    (``[kernels.ar_ssm_scan]``); fixed small tiles in fp32 in the interpreter (64-element scan
    slices: several per state even in small tests)."""
    if x.device.type == "cuda":
        Q, bdv, nw, ns = gpu[:4]
        scan = tuple(gpu[4:7]) or TritonConfig().scan
        prec = precision
    else:
        Q, bdv, nw, ns, scan = 16, 32, 4, 1, (64, 1, 1)
        prec = "ieee"
    bdv = min(bdv, max(16, triton.next_power_of_2(dv)))
    return Q, bdv, nw, ns, prec, scan


def pick_schedule(schedule: str, programs: int, sms: int | None) -> str:
    """The schedule to run: ``schedule`` itself unless it is "auto", which takes "chunks" where
    the "rows" grid (``programs`` = dv tiles x batch x heads) would leave SMs idle (``sms``: the
    GPU's multiprocessor count; None in the interpreter, which takes "rows")."""
    if schedule not in ("auto", *SCHEDULES):
        raise ValueError(f"[kernels.ar_ssm_scan] schedule: expected one of 'auto', {', '.join(map(repr, SCHEDULES))},"
                         f" got {schedule!r}")
    if schedule != "auto":
        return schedule
    return "chunks" if sms is not None and programs < sms else "rows"


def _schedule(schedule: str, x: torch.Tensor, programs: int) -> str:
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else None
    return pick_schedule(schedule, programs, sms)


def _launch(x, B, gpu, precision):
    """(b, h, T, dv, r, chunk Q, number of chunks n, dv tiles, kernel meta-parameters, scan launch)."""
    b, h, T, dv = x.shape
    r = B.shape[-1]
    Q, BDV, nw, ns, prec, scan = _cfg(x, dv, gpu, precision)
    n = triton.cdiv(T, Q) if T else 0
    meta = dict(Q=Q, BR=max(16, triton.next_power_of_2(r)), BDV=BDV, PREC=prec, num_warps=nw, num_stages=ns)
    return b, h, T, dv, r, n, triton.cdiv(dv, BDV), meta, scan


def _fwd_impl(x, B, C, log_decay, gpu, precision, schedule):
    require(x, B, C, log_decay)
    b, h, T, dv, r, n, tiles, meta, scan = _launch(x, B, gpu, precision)
    schedule = _schedule(schedule, x, tiles * b * h)
    y = torch.empty_like(x)
    states = torch.empty((b, h, n, r, dv), device=x.device, dtype=torch.float32)
    if T == 0:
        return y, states
    if schedule == "rows":
        _ssm_fwd_kernel[(tiles, b * h)](x, B, C, log_decay, y, states, T, r, dv, n, **meta)
        return y, states
    # "chunks": each chunk's own contribution, turned in place into the state entering it
    totals = torch.empty((b * h, n), device=x.device, dtype=torch.float32)
    grid = (n * tiles, b * h)
    _ssm_local_kernel[grid](B, x, log_decay, states, totals, T, r, dv, n, FORWARD=True, **meta)
    chunk_scan(totals, (states,), scan, reverse=False)
    _ssm_fwd_out_kernel[grid](x, B, C, log_decay, y, states, T, r, dv, n, **meta)
    return y, states


def _bwd_impl(x, B, C, log_decay, states, dy, gpu, precision, schedule):
    require(x, B, C, log_decay)
    b, h, T, dv, r, n, tiles, meta, scan = _launch(x, B, gpu, precision)
    schedule = _schedule(schedule, x, tiles * b * h)
    dx = torch.empty_like(x)
    dB = torch.empty((tiles, b, h, T, r), device=x.device, dtype=torch.float32)
    dC = torch.empty_like(dB)
    dy = dy.contiguous()
    if T and schedule == "rows":
        _ssm_bwd_kernel[(tiles, b * h)](x, B, C, log_decay, dy, states, dx, dB, dC, T, r, dv, n, b * h, **meta)
    elif T:
        # "chunks": dL/d(the state leaving each chunk), from the chunks' own contributions by
        # the reverse scan (a second buffer the size of the states, held while this runs)
        dstates = torch.empty_like(states)
        totals = torch.empty((b * h, n), device=x.device, dtype=torch.float32)
        grid = (n * tiles, b * h)
        _ssm_local_kernel[grid](C, dy, log_decay, dstates, totals, T, r, dv, n, FORWARD=False, **meta)
        chunk_scan(totals, (dstates,), scan, reverse=True)
        _ssm_bwd_chunk_kernel[grid](x, B, C, log_decay, dy, states, dstates, dx, dB, dC, T, r, dv, n, b * h, **meta)
    dB, dC = dB.sum(0), dC.sum(0)
    # dL/dcum_t = C_t . dC_t - B_t . dB_t ; dlog_decay_t = sum_{t' >= t} dL/dcum_t'
    dcum = (C.float() * dC).sum(-1) - (B.float() * dB).sum(-1)
    dld = dcum.flip(-1).cumsum(-1).flip(-1)
    return dx, dB.to(B.dtype), dC.to(C.dtype), dld.to(log_decay.dtype)


@torch.library.custom_op("phase7fw::ar_ssm_scan_fwd", mutates_args=())
def ar_ssm_scan_fwd(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor, gpu: list[int],
                    precision: str, schedule: str = "rows") -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel core: (y, states entering each chunk (b, h, n_chunks, r, dv) fp32, the same for
    both schedules); ``gpu`` (:class:`TritonConfig`'s ``gpu``, then optionally its ``scan``),
    ``precision``: the launch configuration on a GPU; ``schedule``: "auto", "rows" or "chunks"
    (:func:`pick_schedule`)."""
    return _fwd_impl(x, B, C, log_decay, gpu, precision, schedule)


@ar_ssm_scan_fwd.register_fake
def _(x, B, C, log_decay, gpu, precision, schedule="rows"):
    b, h, T, dv = x.shape
    Q = gpu[0] if x.device.type == "cuda" else 16
    n = -(-T // Q)
    return torch.empty_like(x), x.new_empty((b, h, n, B.shape[-1], dv), dtype=torch.float32)


@torch.library.custom_op("phase7fw::ar_ssm_scan_bwd", mutates_args=())
def ar_ssm_scan_bwd(x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, log_decay: torch.Tensor,
                    states: torch.Tensor, dy: torch.Tensor, gpu: list[int], precision: str, schedule: str = "rows"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dB, dC, dlog_decay)."""
    return _bwd_impl(x, B, C, log_decay, states, dy, gpu, precision, schedule)


@ar_ssm_scan_bwd.register_fake
def _(x, B, C, log_decay, states, dy, gpu, precision, schedule="rows"):
    return torch.empty_like(x), torch.empty_like(B), torch.empty_like(C), torch.empty_like(log_decay)


def _setup_context(ctx, inputs, output):
    x, B, C, log_decay, gpu, precision, schedule = inputs
    ctx.save_for_backward(x, B, C, log_decay, output[1])
    ctx.gpu, ctx.precision, ctx.schedule = gpu, precision, schedule


def _backward(ctx, dy, dstates):
    x, B, C, log_decay, states = ctx.saved_tensors
    grads = torch.ops.phase7fw.ar_ssm_scan_bwd(x, B, C, log_decay, states, dy, ctx.gpu, ctx.precision, ctx.schedule)
    return (*grads, None, None, None)


ar_ssm_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def ar_ssm_scan_triton(x, B, C, log_decay, chunk_size: int = 64, *, tuning: TritonConfig | None = None):
    """Drop-in for ``ar_ssm_scan_reference``. ``chunk_size`` is accepted for the signature; the
    kernel uses its own chunk length, ``tuning.gpu[0]`` on a GPU (the result does not depend on
    it). x keeps its dtype (bf16 in memory is fine); B, C, log_decay are read as given and
    computed in fp32. ``tuning``: the launch configuration and schedule (``[kernels.ar_ssm_scan]``;
    None: the defaults)."""
    tuning = tuning or TritonConfig()
    pick_schedule(tuning.schedule, 0, None)  # an unknown schedule fails here, naming the key
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
                                                  log_decay.float().contiguous(), [*tuning.gpu, *tuning.scan],
                                                  tuning.precision, tuning.schedule)
    return y
