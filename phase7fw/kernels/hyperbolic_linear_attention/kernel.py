"""The chunked hyperbolic linear attention in Triton, forward and backward.

Same contract as :func:`.reference.hyperbolic_linear_attention_chunked` (without a starting
state): ``hyperbolic_linear_attention_triton(q, k, v, c, log_decay, focus_power, chunk_size)``.
The feature map (:func:`.reference.feature_parts`: elementwise, fp32) stays in torch, where
autograd takes its gradients to q, k and c; the kernels compute, from the fp32 features'
time-like columns phi_0 and space-like parts phi_1: (two tensors each, so that the feature
tiles load from aligned rows), the normalized decayed linear attention.

The state is fp32: per value tile S (D x BV) and S0 (BV) for the values, and the normalizer
Z (D), Z0 (scalar) -- the extended value column of 1s, kept once per chunk (value tile 0
writes it, every tile reads it). Per chunk, with cum the running log-decay within the chunk
and L_ij = exp(cum_i - cum_j) for i >= j (else 0), and S_in the state entering the chunk:

    W   = (phi_q phi_k^T + phi_q0 phi_k0^T) * L                 (Q x Q)
    num = W v + exp(cum) * (phi_q S_in + phi_q0 S0_in)        den = rowsum(W) + exp(cum) * (phi_q Z_in + phi_q0 Z0_in)
    o   = num / max(den, eps)                                 (den >= 0.01 by construction)
    S_in[c+1] = exp(total_c) S_in[c] + U_c,   U_c = (phi_k * exp(total_c - cum))^T v   (S0, Z, Z0 alike)

Chunk-parallel, in three launches, so that the grid grows with T (walking the chunks in one
program per (batch x head, value tile) left 8 programs for a 132-SM GPU at T = 16k with 32k
tokens per step):

1. ``_hla_fwd_local_kernel``, one program per (chunk, value tile, b*h): the chunk's own U_c
   (and, tile 0, its normalizer part and its total log-decay) into STATES / ZSTATES;
2. the inter-chunk scan (:func:`phase7fw.kernels._chunked.chunk_scan`, shared with the AR-SSM
   scan), one program per (b*h, slice of the state's (D+1) x Dv elements or of its normalizer
   column): walks the n chunks, 16 per step (their loads issued together),
   turning U_c in place into S_in[c] (elementwise, memory-bound, fp32 FMA whatever the
   ``precision``; exponents are sums of log-decays, never differences of long sums);
3. ``_hla_fwd_out_kernel``, one program per (chunk, value tile, b*h): o and den from W and S_in.

STATES / ZSTATES (fp32, O(T D Dv / Q)) keep the states entering every chunk for the backward,
which runs the same three phases in reverse with dN = dO / den and dden = -(dO . o) / den
(computed in torch: a sum over all value tiles): each chunk's own contribution to dL/d(the
state leaving the chunk before it), V_c = (phi_q * exp(cum))^T dN (and, tile 0, the normalizer
part with dden), the reverse scan dS_out[c-1] = exp(total_c) dS_out[c] + V_c (dS_out[n-1] = 0),
then one program per (chunk, value tile, b*h) writes the chunk's dv and its tile's share of
d phi_q, d phi_k (in the features' two parts) and dL/dG (summed over the tiles in torch) from W, S_in and dS_out (a second buffer the size of STATES, held while the backward
runs). The decay gradient needs no pass of its own: the output depends on the running
log-decay G only through G_t - G_s, so dL/dG_t = phi_q,t . dphi_q,t - phi_k,t . dphi_k,t, and
dlog_decay is its reverse cumulative sum (torch, O(T)).

Every exponent is <= 0 (masked entries are -inf before exp), so nothing overflows; query
features are <= 1 and key features <= 10, and every pair weight is >= 0.01 (the feature
map's Klein-radius clamp), so tf32 dot products (error ~1e-3) keep every weight positive.
Dot precision and launch configuration on the GPU: :class:`TritonConfig` (``[kernels.hyperbolic_linear_attention]``).
"""

from __future__ import annotations

import torch

from phase7fw.kernels._chunked import (
    causal_decay,
    chunk_log_decay,
    chunk_scan,
    chunk_tiles,
    load_rows,
    row_ptrs,
    store_total,
)
from phase7fw.kernels._triton import require, tl, triton
from phase7fw.kernels.hyperbolic_linear_attention import TritonConfig
from phase7fw.kernels.hyperbolic_linear_attention.reference import DEN_EPS, feature_parts

__all__ = ["hyperbolic_linear_attention_triton"]


@triton.jit
def _features(F, F0, bh, t, offs_d, T, D, t_ok, d_ok):
    """A chunk's space-like features (tokens x BD, of the (b*h, T, D) part) and time-like
    column (of the (b*h, T) part), 0 where out of range."""
    f = load_rows(F, bh, t, offs_d, T, D, t_ok[:, None] & d_ok[None, :])
    return f, tl.load(F0 + bh * T + t, mask=t_ok, other=0.0)


@triton.jit
def _store_features(F, F0, row, t, offs_d, T, D, f, f0, t_ok, d_ok):
    """Store a chunk's (tokens x BD) space-like and time-like gradients into row ``row`` of a
    (rows, T, D) and a (rows, T) tensor, laid out like the features' parts."""
    tl.store(row_ptrs(F, row, t, offs_d, T, D), f, mask=t_ok[:, None] & d_ok[None, :])
    tl.store(F0 + row * T + t, f0, mask=t_ok)


@triton.jit
def _pair_weights(fq, fq0, fk, fk0, lmat, PREC: tl.constexpr):
    """W_ij = (phi_q,i . phi_k,j) L_ij within the chunk."""
    return (tl.dot(fq, tl.trans(fk), input_precision=PREC) + fq0[:, None] * fk0[None, :]) * lmat


@triton.jit
def _load_state(SP, ZP, row, offs_d, offs_v, d_ok, v_ok, D, DV):
    """Chunk ``row`` (= bh * n + c) of a (b*h, n, D+1, DV) state and its (b*h, n, D+1)
    normalizer column: (time-like row s0, rows 1..D s, z0, z)."""
    sp = SP + row * (D + 1) * DV
    s0 = tl.load(sp + offs_v, mask=v_ok, other=0.0)
    s = tl.load(sp + (1 + offs_d)[:, None] * DV + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :], other=0.0)
    zp = ZP + row * (D + 1)
    z0 = tl.sum(tl.load(zp + offs_d * 0, mask=offs_d == 0, other=0.0), 0)
    return s0, s, z0, tl.load(zp + 1 + offs_d, mask=d_ok, other=0.0)


@triton.jit
def _store_local(SP, ZP, TOT, row, total, f, f0, w, x, r, offs_d, offs_v, d_ok, v_ok, first, D, DV,
                 PREC: tl.constexpr):
    """One chunk's own contribution to the state at its end (forward: f = phi_k, w = exp(cum_Q -
    cum), x = v, r = 1) or at its start (backward: f = phi_q, w = exp(cum), x = dN, r = dden),
    written where the scan turns it into the running state: rows 1..D (f w)^T x, row 0
    (f0 w)^T x; in value tile 0 only (``first``, a vector mask: a scalar condition in a mask is
    not supported everywhere) the normalizer column (f w)^T r, (f0 w) . r and the chunk's total
    log-decay (TOT, (b*h, n))."""
    fw = f * w[:, None]
    f0w = f0 * w
    sp = SP + row * (D + 1) * DV
    tl.store(sp + offs_v, tl.sum(f0w[:, None] * x, 0), mask=v_ok)
    tl.store(sp + (1 + offs_d)[:, None] * DV + offs_v[None, :], tl.dot(tl.trans(fw), x, input_precision=PREC),
             mask=d_ok[:, None] & v_ok[None, :])
    zp = ZP + row * (D + 1)
    tl.store(zp + offs_d * 0, tl.sum(f0w * r, 0) + offs_d * 0.0, mask=(offs_d == 0) & first)
    tl.store(zp + 1 + offs_d, tl.sum(fw * r[:, None], 0), mask=d_ok & first)
    store_total(TOT, row, total, offs_d, first)


@triton.jit
def _hla_fwd_local_kernel(
    FK, FK0, V, LD, STATES, ZSTATES, TOT,
    T, D, DV, NCHUNK,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_d, offs_v, t_ok, d_ok, v_ok = chunk_tiles(Q, BD, BV, D, DV, T)
    fk, fk0 = _features(FK, FK0, bh, t, offs_d, T, D, t_ok, d_ok)
    v = load_rows(V, bh, t, offs_v, T, DV, t_ok[:, None] & v_ok[None, :])
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    _store_local(STATES, ZSTATES, TOT, bh * NCHUNK + c, total, fk, fk0, tl.exp(total - cum), v,
                 t_ok.to(tl.float32), offs_d, offs_v, d_ok, v_ok, (offs_d * 0 + pid_v) == 0, D, DV, PREC)


@triton.jit
def _hla_fwd_out_kernel(
    FQ, FQ0, FK, FK0, V, LD, O, DEN, STATES, ZSTATES,
    T, D, DV, NCHUNK, EPS,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_d, offs_v, t_ok, d_ok, v_ok = chunk_tiles(Q, BD, BV, D, DV, T)
    fv_mask = t_ok[:, None] & v_ok[None, :]
    fq, fq0 = _features(FQ, FQ0, bh, t, offs_d, T, D, t_ok, d_ok)
    fk, fk0 = _features(FK, FK0, bh, t, offs_d, T, D, t_ok, d_ok)
    v = load_rows(V, bh, t, offs_v, T, DV, fv_mask)
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    s0, s, z0, z = _load_state(STATES, ZSTATES, bh * NCHUNK + c, offs_d, offs_v, d_ok, v_ok, D, DV)

    w = _pair_weights(fq, fq0, fk, fk0, causal_decay(cum, offs_q[:, None] >= offs_q[None, :]), PREC)
    ec = tl.exp(cum)
    num = tl.dot(w, v, input_precision=PREC)
    num += ec[:, None] * (tl.dot(fq, s, input_precision=PREC) + fq0[:, None] * s0[None, :])
    den = tl.sum(w, 1) + ec * (tl.sum(fq * z[None, :], 1) + fq0 * z0)
    den = tl.maximum(den, EPS)
    tl.store(row_ptrs(O, bh, t, offs_v, T, DV), num / den[:, None], mask=fv_mask)
    # tile 0 stores what every tile computes alike
    tl.store(DEN + bh * T + t, den, mask=t_ok & ((offs_q * 0 + pid_v) == 0))


@triton.jit
def _upstream(DO, DEN, DDEN, bh, t, offs_v, T, DV, fv_mask, t_ok):
    """dN = dO / den (tokens x value tile) and dden of a chunk's tokens, 0 where out of range."""
    do = load_rows(DO, bh, t, offs_v, T, DV, fv_mask)
    den = tl.load(DEN + bh * T + t, mask=t_ok, other=1.0)
    return do / den[:, None], tl.load(DDEN + bh * T + t, mask=t_ok, other=0.0)


@triton.jit
def _hla_bwd_local_kernel(
    FQ, FQ0, LD, DEN, DO, DDEN, DSTATES, DZSTATES, TOT,
    T, D, DV, NCHUNK,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_d, offs_v, t_ok, d_ok, v_ok = chunk_tiles(Q, BD, BV, D, DV, T)
    fq, fq0 = _features(FQ, FQ0, bh, t, offs_d, T, D, t_ok, d_ok)
    dn, dden = _upstream(DO, DEN, DDEN, bh, t, offs_v, T, DV, t_ok[:, None] & v_ok[None, :], t_ok)
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    _store_local(DSTATES, DZSTATES, TOT, bh * NCHUNK + c, total, fq, fq0, tl.exp(cum), dn, dden,
                 offs_d, offs_v, d_ok, v_ok, (offs_d * 0 + pid_v) == 0, D, DV, PREC)


@triton.jit
def _hla_bwd_kernel(
    FQ, FQ0, FK, FK0, V, LD, DEN, DO, DDEN, STATES, ZSTATES, DSTATES, DZSTATES, DFQ, DFQ0, DFK, DFK0, DG, DV_,
    T, D, DV, NCHUNK, BH,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    c, pid_v, bh, offs_q, t, offs_d, offs_v, t_ok, d_ok, v_ok = chunk_tiles(Q, BD, BV, D, DV, T)
    fv_mask = t_ok[:, None] & v_ok[None, :]
    # the normalizer column belongs to tile 0: its terms are added there only
    first = (pid_v == 0).to(tl.float32)
    fq, fq0 = _features(FQ, FQ0, bh, t, offs_d, T, D, t_ok, d_ok)
    fk, fk0 = _features(FK, FK0, bh, t, offs_d, T, D, t_ok, d_ok)
    v = load_rows(V, bh, t, offs_v, T, DV, fv_mask)
    dn, dden = _upstream(DO, DEN, DDEN, bh, t, offs_v, T, DV, fv_mask, t_ok)
    cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
    lmat = causal_decay(cum, offs_q[:, None] >= offs_q[None, :])  # [i, j]
    ec = tl.exp(cum)
    to_end = tl.exp(total - cum)
    g0 = dden * first  # upstream of the normalizer column, in tile 0 only
    # m_ij = dN'_i . v'_j over this tile's columns (+ the normalizer column in tile 0)
    m = (tl.dot(dn, tl.trans(v), input_precision=PREC) + g0[:, None]) * lmat
    part = pid_v * BH + bh  # this tile's row of the partial gradients: (n_tiles * BH, T, ...)
    row = bh * NCHUNK + c
    # each gradient is stored once computed, and each state loaded where first needed (fewer live registers)
    s0_in, s_in, z0_in, z_in = _load_state(STATES, ZSTATES, row, offs_d, offs_v, d_ok, v_ok, D, DV)  # entering
    dfq = tl.dot(m, fk, input_precision=PREC) + ec[:, None] * (
        tl.dot(dn, tl.trans(s_in), input_precision=PREC) + g0[:, None] * z_in[None, :])
    dfq0 = tl.sum(m * fk0[None, :], 1) + ec * (tl.sum(dn * s0_in[None, :], 1) + g0 * z0_in)
    _store_features(DFQ, DFQ0, part, t, offs_d, T, D, dfq, dfq0, t_ok, d_ok)
    # this tile's share of dL/dG_t = phi_q,t . dphi_q,t - phi_k,t . dphi_k,t (module docstring)
    dg = tl.sum(fq * dfq, 1) + fq0 * dfq0

    ds0, ds, dz0, dz = _load_state(DSTATES, DZSTATES, row, offs_d, offs_v, d_ok, v_ok, D, DV)  # dL/d(leaving)
    dfk = tl.dot(tl.trans(m), fq, input_precision=PREC) + to_end[:, None] * (
        tl.dot(v, tl.trans(ds), input_precision=PREC) + first * dz[None, :])
    dfk0 = tl.sum(m * fq0[:, None], 0) + to_end * (tl.sum(v * ds0[None, :], 1) + first * dz0)
    _store_features(DFK, DFK0, part, t, offs_d, T, D, dfk, dfk0, t_ok, d_ok)
    tl.store(DG + part * T + t, dg - tl.sum(fk * dfk, 1) - fk0 * dfk0, mask=t_ok)
    w = _pair_weights(fq, fq0, fk, fk0, lmat, PREC)
    dv = tl.dot(tl.trans(w), dn, input_precision=PREC) + to_end[:, None] * (
        tl.dot(fk, ds, input_precision=PREC) + fk0[:, None] * ds0[None, :])
    tl.store(row_ptrs(DV_, bh, t, offs_v, T, DV), dv.to(DV_.dtype.element_ty), mask=fv_mask)


# ---------------------------------------------------------------------------------------

def _launch_cfg(x: torch.Tensor, dv: int, gpu, precision: str):
    """(value tile, num_warps, num_stages, dot precision, scan launch) on a GPU: ``gpu`` is
    :class:`TritonConfig`'s ``gpu`` followed by its ``scan`` (elements per program, num_warps,
    num_stages; the default scan launch where only the three ``gpu`` numbers are given) and
    ``precision`` (``[kernels.hyperbolic_linear_attention]``); in the interpreter fp32, 32-wide
    value tiles and 64-element scan tiles (several per state even in small tests)."""
    if x.device.type == "cuda":
        bv, nw, ns = gpu[:3]
        scan = tuple(gpu[3:6]) or TritonConfig().scan
        prec = precision
    else:
        bv, nw, ns, prec, scan = 32, 4, 1, "ieee", (64, 1, 1)
    return min(bv, max(16, triton.next_power_of_2(dv))), nw, ns, prec, scan


def _check_chunk(chunk_size: int) -> int:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton hyperbolic linear attention needs chunk_size a power of two >= 16,"
                         f" got {chunk_size}")
    return chunk_size


def _launch(fq, v, chunk_size, gpu, precision):
    """(B, H, T, D, DV, number of chunks n, value tiles, the per-chunk kernels' meta-parameters,
    the scan launch) of both passes; ``fq`` the space-like part of the query features."""
    B, H, T, D = fq.shape
    DV = v.shape[-1]
    Q = _check_chunk(chunk_size)
    BV, nw, ns, prec, scan = _launch_cfg(v, DV, gpu, precision)
    n = triton.cdiv(T, Q) if T else 0
    meta = dict(Q=Q, BD=max(16, triton.next_power_of_2(D)), BV=BV, PREC=prec, num_warps=nw, num_stages=ns)
    return B, H, T, D, DV, n, triton.cdiv(DV, BV), meta, scan


def _fwd_impl(fq, fq0, fk, fk0, v, ld, chunk_size, gpu, precision):
    require(fq, fq0, fk, fk0, v, ld)
    B, H, T, D, DV, n, tiles, meta, scan = _launch(fq, v, chunk_size, gpu, precision)
    o = torch.empty(B, H, T, DV, device=v.device, dtype=torch.float32)
    den = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    states = torch.empty(B, H, n, D + 1, DV, device=v.device, dtype=torch.float32)
    zstates = torch.empty(B, H, n, D + 1, device=v.device, dtype=torch.float32)
    if T:
        totals = torch.empty(B * H, n, device=v.device, dtype=torch.float32)
        grid = (n * tiles, B * H)
        _hla_fwd_local_kernel[grid](fk, fk0, v, ld, states, zstates, totals, T, D, DV, n, **meta)
        # phase 2: the chunks' own contributions become, in place, the state entering each chunk
        chunk_scan(totals, (states, zstates), scan, reverse=False)
        _hla_fwd_out_kernel[grid](fq, fq0, fk, fk0, v, ld, o, den, states, zstates, T, D, DV, n, DEN_EPS, **meta)
    return o, den, states, zstates


def _bwd_impl(fq, fq0, fk, fk0, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision):
    require(fq, fq0, fk, fk0, v, ld)
    B, H, T, D, DV, n, tiles, meta, scan = _launch(fq, v, chunk_size, gpu, precision)
    do = do.contiguous()  # fp32, as o (the kernels read any float dtype)
    # d(den): the clamp passes no gradient where it acted
    dden = torch.where(den > DEN_EPS, -(do * o).sum(-1) / den, torch.zeros_like(den)).contiguous()
    dv = torch.empty_like(v)
    # each value tile's share of the feature parts' gradients and of dL/dG (every element written)
    f32 = dict(device=v.device, dtype=torch.float32)
    dfq, dfk = torch.empty(tiles, B, H, T, D, **f32), torch.empty(tiles, B, H, T, D, **f32)
    dfq0, dfk0, dg = (torch.empty(tiles, B, H, T, **f32) for _ in range(3))
    if T:
        # dL/d(the state leaving each chunk) and its normalizer column: the chunks' own
        # contributions first, turned into the sums over the later chunks by the reverse scan
        dstates, dzstates = torch.empty_like(states), torch.empty_like(zstates)
        totals = torch.empty(B * H, n, **f32)
        grid = (n * tiles, B * H)
        _hla_bwd_local_kernel[grid](fq, fq0, ld, den, do, dden, dstates, dzstates, totals, T, D, DV, n, **meta)
        chunk_scan(totals, (dstates, dzstates), scan, reverse=True)
        _hla_bwd_kernel[grid](
            fq, fq0, fk, fk0, v, ld, den, do, dden, states, zstates, dstates, dzstates, dfq, dfq0, dfk, dfk0, dg, dv,
            T, D, DV, n, B * H, **meta)
    dfq, dfq0, dfk, dfk0, dg = (x[0] if tiles == 1 else x.sum(0) for x in (dfq, dfq0, dfk, dfk0, dg))
    # dlog_decay_s = sum_{t >= s} dL/dG_t
    return dfq, dfq0, dfk, dfk0, dv, dg.flip(-1).cumsum(-1).flip(-1)


@torch.library.custom_op("phase7fw::hyperbolic_linear_attention_fwd", mutates_args=())
def hla_fwd(fq: torch.Tensor, fq0: torch.Tensor, fk: torch.Tensor, fk0: torch.Tensor, v: torch.Tensor,
            ld: torch.Tensor, chunk_size: int, gpu: list[int],
            precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel core on the fp32 features' space-like parts (B, H, T, D) and time-like columns
    (B, H, T): (o fp32, den, states and normalizer states entering each chunk); ``gpu``
    (:class:`TritonConfig`'s ``gpu``, then optionally its ``scan``), ``precision``: the launch
    configuration on a GPU."""
    return _fwd_impl(fq, fq0, fk, fk0, v, ld, chunk_size, gpu, precision)


@hla_fwd.register_fake
def _(fq, fq0, fk, fk0, v, ld, chunk_size, gpu, precision):
    B, H, T, D = fq.shape
    n = -(-T // chunk_size)
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(B, H, T, v.shape[-1], **f32), v.new_empty(B, H, T, **f32),
            v.new_empty(B, H, n, D + 1, v.shape[-1], **f32), v.new_empty(B, H, n, D + 1, **f32))


@torch.library.custom_op("phase7fw::hyperbolic_linear_attention_bwd", mutates_args=())
def hla_bwd(fq: torch.Tensor, fq0: torch.Tensor, fk: torch.Tensor, fk0: torch.Tensor, v: torch.Tensor,
            ld: torch.Tensor, o: torch.Tensor, den: torch.Tensor, states: torch.Tensor, zstates: torch.Tensor,
            do: torch.Tensor, chunk_size: int, gpu: list[int], precision: str
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d fq, d fq0, d fk, d fk0, dv, d log_decay)."""
    return _bwd_impl(fq, fq0, fk, fk0, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision)


@hla_bwd.register_fake
def _(fq, fq0, fk, fk0, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision):
    return tuple(torch.empty_like(x) for x in (fq, fq0, fk, fk0, v, ld))


def _setup_context(ctx, inputs, output):
    *tensors, chunk_size, gpu, precision = inputs
    o, den, states, zstates = output
    ctx.chunk_size, ctx.gpu, ctx.precision = chunk_size, gpu, precision
    ctx.save_for_backward(*tensors, o, den, states, zstates)


def _backward(ctx, do, dden, dstates, dzstates):
    grads = torch.ops.phase7fw.hyperbolic_linear_attention_bwd(*ctx.saved_tensors, do, ctx.chunk_size, ctx.gpu,
                                                               ctx.precision)
    return (*grads, None, None, None)


hla_fwd.register_autograd(_backward, setup_context=_setup_context)


def hyperbolic_linear_attention_triton(q, k, v, c, log_decay=None, focus_power: float = 1.0, chunk_size: int = 64,
                                       *, tuning: TritonConfig | None = None):
    """Drop-in for ``hyperbolic_linear_attention_chunked`` (no starting state): q, k (B, H, T, D),
    v (B, H, T, Dv) in any float dtype but fp64, c scalar or (H,), log_decay (B, H, T) or None.
    ``chunk_size`` must be a power of two >= 16. Returns o in v's dtype. ``tuning``: the launch
    configuration (``[kernels.hyperbolic_linear_attention]``; None: the defaults)."""
    tuning = tuning or TritonConfig()
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        raise ValueError("the Triton hyperbolic linear attention takes fp32/bf16/fp16 inputs, not fp64")
    B, H, T, _ = q.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        fq0, fq = feature_parts(q, c, focus_power, query=True)  # fp32, differentiable
        fk0, fk = feature_parts(k, c, focus_power)
        ld = q.new_zeros(B, H, T, dtype=torch.float32) if log_decay is None else log_decay.float()
        o, _, _, _ = torch.ops.phase7fw.hyperbolic_linear_attention_fwd(
            *(x.contiguous() for x in (fq, fq0, fk, fk0, v, ld)), _check_chunk(chunk_size),
            [*tuning.gpu, *tuning.scan], tuning.precision)
    return o.to(v.dtype)
