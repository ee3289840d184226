"""The chunked hyperbolic linear attention in Triton, forward and backward.

Same contract as :func:`.reference.hyperbolic_linear_attention_chunked` (without a starting
state): ``hyperbolic_linear_attention_triton(q, k, v, c, log_decay, focus_power, chunk_size)``.
The feature map (:func:`.reference.feature_map`: elementwise, fp32) stays in torch, where
autograd takes its gradients to q, k and c; the kernels compute, from fp32 features split
into their time-like column (phi_0) and space-like part (phi_1:), the normalized decayed
linear attention.

One program per (batch x head, value tile) walks the chunks of Q tokens in order, keeping
the state of its value tile in fp32 registers: S (D x BV) and S0 (BV) for the values, and
the normalizer Z (D), Z0 (scalar) -- the extended value column of 1s, recomputed by every
tile (a row sum), so no tile needs another's. Per chunk, with cum the running log-decay
within the chunk and L_ij = exp(cum_i - cum_j) for i >= j (else 0):

    W   = (phi_q phi_k^T + phi_q0 phi_k0^T) * L                 (Q x Q)
    num = W v + exp(cum) * (phi_q S + phi_q0 S0)              den = rowsum(W) + exp(cum) * (phi_q Z + phi_q0 Z0)
    o   = num / max(den, eps)                                 (den >= 0.01 by construction)
    S  <- exp(cum_Q) S + (phi_k * exp(cum_Q - cum))^T v       (and S0, Z, Z0 alike)

The state entering every chunk is stored (fp32, O(T D Dv / Q)) for the backward, which walks
the chunks in reverse carrying dS (and dZ for the normalizer column), with
dN = dO / den and dden = -(dO . o) / den (computed in torch: a sum over all value tiles).
Each tile writes its share of d phi_q and d phi_k (summed in torch) and its own dv. The
decay gradient needs no kernel: the output depends on the running log-decay G only through
G_t - G_s, so dL/dG_t = phi_q,t . dphi_q,t - phi_k,t . dphi_k,t and dlog_decay is its
reverse cumulative sum.

Every exponent is <= 0 (masked entries are -inf before exp), so nothing overflows; query
features are <= 1 and key features <= 10, and every pair weight is >= 0.01 (the feature
map's Klein-radius clamp), so tf32 dot products (error ~1e-3) keep every weight positive.
Dot precision and launch configuration on the GPU: :class:`TritonConfig` (``[kernels.hyperbolic_linear_attention]``).
"""

from __future__ import annotations

import torch

from phase7fw.kernels._chunked import causal_decay, chunk_log_decay, load_rows, program_tiles, row_ptrs
from phase7fw.kernels._triton import require, tl, triton
from phase7fw.kernels.hyperbolic_linear_attention import TritonConfig
from phase7fw.kernels.hyperbolic_linear_attention.reference import DEN_EPS, feature_map

__all__ = ["hyperbolic_linear_attention_triton"]


@triton.jit
def _hla_fwd_kernel(
    FQ, FQ0, FK, FK0, V, LD, O, DEN, STATES, ZSTATES,
    T, D, DV, NCHUNK, EPS,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh, offs_q, offs_d, offs_v, d_ok, v_ok = program_tiles(Q, BD, BV, D, DV)
    # tile 0 stores what every tile computes alike (den, Z): masks as vectors (a scalar
    # condition in a mask is not supported everywhere)
    first_d = (offs_d * 0 + pid_v) == 0
    first_q = (offs_q * 0 + pid_v) == 0
    causal = offs_q[:, None] >= offs_q[None, :]
    s = tl.zeros((BD, BV), tl.float32)
    s0 = tl.zeros((BV,), tl.float32)
    z = tl.zeros((BD,), tl.float32)
    z0 = tl.sum(tl.zeros((BD,), tl.float32), 0)
    for c in range(0, NCHUNK):
        t = c * Q + offs_q
        t_ok = t < T
        fd_mask = t_ok[:, None] & d_ok[None, :]
        fv_mask = t_ok[:, None] & v_ok[None, :]
        fq = load_rows(FQ, bh, t, offs_d, T, D, fd_mask)
        fk = load_rows(FK, bh, t, offs_d, T, D, fd_mask)
        fq0 = tl.load(FQ0 + bh * T + t, mask=t_ok, other=0.0)
        fk0 = tl.load(FK0 + bh * T + t, mask=t_ok, other=0.0)
        v = load_rows(V, bh, t, offs_v, T, DV, fv_mask)
        cum, total = chunk_log_decay(LD, bh, t, t_ok, T)

        # the state entering this chunk, for the backward: row 0 time-like, rows 1..D space-like
        sp = STATES + (bh * NCHUNK + c) * (D + 1) * DV
        tl.store(sp + offs_v, s0, mask=v_ok)
        tl.store(sp + (1 + offs_d)[:, None] * DV + offs_v[None, :], s, mask=d_ok[:, None] & v_ok[None, :])
        zp = ZSTATES + (bh * NCHUNK + c) * (D + 1)
        tl.store(zp + offs_d * 0, z0 + offs_d * 0.0, mask=(offs_d == 0) & first_d)
        tl.store(zp + 1 + offs_d, z, mask=d_ok & first_d)

        lmat = causal_decay(cum, causal)
        w = (tl.dot(fq, tl.trans(fk), input_precision=PREC) + fq0[:, None] * fk0[None, :]) * lmat
        ec = tl.exp(cum)
        num = tl.dot(w, v, input_precision=PREC)
        num += ec[:, None] * (tl.dot(fq, s, input_precision=PREC) + fq0[:, None] * s0[None, :])
        den = tl.sum(w, 1) + ec * (tl.sum(fq * z[None, :], 1) + fq0 * z0)
        den = tl.maximum(den, EPS)
        tl.store(row_ptrs(O, bh, t, offs_v, T, DV), num / den[:, None], mask=fv_mask)
        tl.store(DEN + bh * T + t, den, mask=t_ok & first_q)

        to_end = tl.exp(total - cum)
        fk_end = fk * to_end[:, None]
        fk0_end = fk0 * to_end
        decay = tl.exp(total)
        s = s * decay + tl.dot(tl.trans(fk_end), v, input_precision=PREC)
        s0 = s0 * decay + tl.sum(fk0_end[:, None] * v, 0)
        z = z * decay + tl.sum(fk_end, 0)
        z0 = z0 * decay + tl.sum(fk0_end, 0)


@triton.jit
def _hla_bwd_kernel(
    FQ, FQ0, FK, FK0, V, LD, DEN, DO, DDEN, STATES, ZSTATES,
    DFQ, DFQ0, DFK, DFK0, DV_,
    T, D, DV, NCHUNK, BH,
    Q: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    pid_v, bh, offs_q, offs_d, offs_v, d_ok, v_ok = program_tiles(Q, BD, BV, D, DV)
    # the normalizer column belongs to tile 0: its terms are added there only
    first = (pid_v == 0).to(tl.float32)
    causal = offs_q[:, None] >= offs_q[None, :]
    ds = tl.zeros((BD, BV), tl.float32)  # dL/d(state leaving the chunk)
    ds0 = tl.zeros((BV,), tl.float32)
    dz = tl.zeros((BD,), tl.float32)
    dz0 = tl.sum(tl.zeros((BD,), tl.float32), 0)
    part = pid_v * BH + bh  # this tile's row of the partial feature gradients: (n_tiles * BH, T, ...)
    for cc in range(0, NCHUNK):
        c = NCHUNK - 1 - cc
        t = c * Q + offs_q
        t_ok = t < T
        fd_mask = t_ok[:, None] & d_ok[None, :]
        fv_mask = t_ok[:, None] & v_ok[None, :]
        fq = load_rows(FQ, bh, t, offs_d, T, D, fd_mask)
        fk = load_rows(FK, bh, t, offs_d, T, D, fd_mask)
        fq0 = tl.load(FQ0 + bh * T + t, mask=t_ok, other=0.0)
        fk0 = tl.load(FK0 + bh * T + t, mask=t_ok, other=0.0)
        v = load_rows(V, bh, t, offs_v, T, DV, fv_mask)
        do = load_rows(DO, bh, t, offs_v, T, DV, fv_mask)
        den = tl.load(DEN + bh * T + t, mask=t_ok, other=1.0)
        dden = tl.load(DDEN + bh * T + t, mask=t_ok, other=0.0)
        cum, total = chunk_log_decay(LD, bh, t, t_ok, T)
        sp = STATES + (bh * NCHUNK + c) * (D + 1) * DV
        s0_in = tl.load(sp + offs_v, mask=v_ok, other=0.0)
        s_in = tl.load(sp + (1 + offs_d)[:, None] * DV + offs_v[None, :], mask=d_ok[:, None] & v_ok[None, :],
                       other=0.0)
        zp = ZSTATES + (bh * NCHUNK + c) * (D + 1)
        z0_in = tl.sum(tl.load(zp + offs_d * 0, mask=offs_d == 0, other=0.0), 0)
        z_in = tl.load(zp + 1 + offs_d, mask=d_ok, other=0.0)

        lmat = causal_decay(cum, causal)  # [i, j]
        ec = tl.exp(cum)
        to_end = tl.exp(total - cum)
        decay = tl.exp(total)
        dn = do / den[:, None]
        g0 = dden * first  # upstream of the normalizer column, in tile 0 only
        # m_ij = dN'_i . v'_j over this tile's columns (+ the normalizer column in tile 0)
        m = (tl.dot(dn, tl.trans(v), input_precision=PREC) + g0[:, None]) * lmat
        w = (tl.dot(fq, tl.trans(fk), input_precision=PREC) + fq0[:, None] * fk0[None, :]) * lmat

        dfq = tl.dot(m, fk, input_precision=PREC) + ec[:, None] * (
            tl.dot(dn, tl.trans(s_in), input_precision=PREC) + g0[:, None] * z_in[None, :])
        dfq0 = tl.sum(m * fk0[None, :], 1) + ec * (tl.sum(dn * s0_in[None, :], 1) + g0 * z0_in)
        dfk = tl.dot(tl.trans(m), fq, input_precision=PREC) + to_end[:, None] * (
            tl.dot(v, tl.trans(ds), input_precision=PREC) + first * dz[None, :])
        dfk0 = tl.sum(m * fq0[:, None], 0) + to_end * (tl.sum(v * ds0[None, :], 1) + first * dz0)
        dv = tl.dot(tl.trans(w), dn, input_precision=PREC) + to_end[:, None] * (
            tl.dot(fk, ds, input_precision=PREC) + fk0[:, None] * ds0[None, :])

        fq_e = fq * ec[:, None]
        fq0_e = fq0 * ec
        ds = ds * decay + tl.dot(tl.trans(fq_e), dn, input_precision=PREC)
        ds0 = ds0 * decay + tl.sum(fq0_e[:, None] * dn, 0)
        dz = dz * decay + tl.sum(fq_e * dden[:, None], 0)
        dz0 = dz0 * decay + tl.sum(fq0_e * dden, 0)

        tl.store(row_ptrs(DV_, bh, t, offs_v, T, DV), dv, mask=fv_mask)
        tl.store(row_ptrs(DFQ, part, t, offs_d, T, D), dfq, mask=fd_mask)
        tl.store(row_ptrs(DFK, part, t, offs_d, T, D), dfk, mask=fd_mask)
        tl.store(DFQ0 + part * T + t, dfq0, mask=t_ok)
        tl.store(DFK0 + part * T + t, dfk0, mask=t_ok)


# ---------------------------------------------------------------------------------------

def _launch_cfg(x: torch.Tensor, dv: int, gpu, precision: str):
    """(value tile, num_warps, num_stages, dot precision): ``gpu`` and ``precision`` on a GPU
    (:class:`TritonConfig`, ``[kernels.hyperbolic_linear_attention]``); fp32 in the interpreter."""
    if x.device.type == "cuda":
        bv, nw, ns = gpu
        prec = precision
    else:
        bv, nw, ns, prec = 32, 4, 1, "ieee"
    return min(bv, max(16, triton.next_power_of_2(dv))), nw, ns, prec


def _check_chunk(chunk_size: int) -> int:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton hyperbolic linear attention needs chunk_size a power of two >= 16,"
                         f" got {chunk_size}")
    return chunk_size


def _split(f: torch.Tensor):
    return f[..., 1:].contiguous(), f[..., 0].contiguous()


def _fwd_impl(fq, fk, v, ld, chunk_size, gpu, precision):
    require(fq, fk, v, ld)
    B, H, T, F1 = fq.shape
    D, DV = F1 - 1, v.shape[-1]
    Q = _check_chunk(chunk_size)
    BV, nw, ns, prec = _launch_cfg(v, DV, gpu, precision)
    n = triton.cdiv(T, Q) if T else 0
    o = torch.empty(B, H, T, DV, device=v.device, dtype=torch.float32)
    den = torch.empty(B, H, T, device=v.device, dtype=torch.float32)
    states = torch.empty(B, H, n, D + 1, DV, device=v.device, dtype=torch.float32)
    zstates = torch.empty(B, H, n, D + 1, device=v.device, dtype=torch.float32)
    if T:
        (fqs, fq0), (fks, fk0) = _split(fq), _split(fk)
        _hla_fwd_kernel[(triton.cdiv(DV, BV), B * H)](
            fqs, fq0, fks, fk0, v, ld, o, den, states, zstates, T, D, DV, n, DEN_EPS,
            Q=Q, BD=max(16, triton.next_power_of_2(D)), BV=BV, PREC=prec, num_warps=nw, num_stages=ns)
    return o, den, states, zstates


def _bwd_impl(fq, fk, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision):
    require(fq, fk, v, ld)
    B, H, T, F1 = fq.shape
    D, DV = F1 - 1, v.shape[-1]
    Q = _check_chunk(chunk_size)
    BV, nw, ns, prec = _launch_cfg(v, DV, gpu, precision)
    tiles = triton.cdiv(DV, BV)
    do = do.float().contiguous()
    # d(den): the clamp passes no gradient where it acted
    dden = torch.where(den > DEN_EPS, -(do * o).sum(-1) / den, torch.zeros_like(den)).contiguous()
    dv = torch.empty(B, H, T, DV, device=v.device, dtype=torch.float32)
    dfq = torch.zeros(tiles, B, H, T, D, device=v.device, dtype=torch.float32)
    dfk = torch.zeros_like(dfq)
    dfq0 = torch.zeros(tiles, B, H, T, device=v.device, dtype=torch.float32)
    dfk0 = torch.zeros_like(dfq0)
    if T:
        (fqs, fq0), (fks, fk0) = _split(fq), _split(fk)
        _hla_bwd_kernel[(tiles, B * H)](
            fqs, fq0, fks, fk0, v, ld, den, do, dden, states, zstates, dfq, dfq0, dfk, dfk0, dv,
            T, D, DV, states.shape[2], B * H,
            Q=Q, BD=max(16, triton.next_power_of_2(D)), BV=BV, PREC=prec, num_warps=nw, num_stages=ns)
    dfq = torch.cat([dfq0.sum(0).unsqueeze(-1), dfq.sum(0)], dim=-1)
    dfk = torch.cat([dfk0.sum(0).unsqueeze(-1), dfk.sum(0)], dim=-1)
    # dL/dG_t = phi_q,t . dphi_q,t - phi_k,t . dphi_k,t; dlog_decay_s = sum_{t >= s} dL/dG_t
    dG = (fq * dfq).sum(-1) - (fk * dfk).sum(-1)
    dld = dG.flip(-1).cumsum(-1).flip(-1)
    return dfq, dfk, dv.to(v.dtype), dld


@torch.library.custom_op("phase7fw::hyperbolic_linear_attention_fwd", mutates_args=())
def hla_fwd(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, ld: torch.Tensor, chunk_size: int, gpu: list[int],
            precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel core on fp32 features: (o fp32, den, states and normalizer states entering each
    chunk); ``gpu``, ``precision``: the launch configuration on a GPU (:class:`TritonConfig`)."""
    return _fwd_impl(fq, fk, v, ld, chunk_size, gpu, precision)


@hla_fwd.register_fake
def _(fq, fk, v, ld, chunk_size, gpu, precision):
    B, H, T, F1 = fq.shape
    n = -(-T // chunk_size)
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(B, H, T, v.shape[-1], **f32), v.new_empty(B, H, T, **f32),
            v.new_empty(B, H, n, F1, v.shape[-1], **f32), v.new_empty(B, H, n, F1, **f32))


@torch.library.custom_op("phase7fw::hyperbolic_linear_attention_bwd", mutates_args=())
def hla_bwd(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, ld: torch.Tensor, o: torch.Tensor,
            den: torch.Tensor, states: torch.Tensor, zstates: torch.Tensor, do: torch.Tensor, chunk_size: int,
            gpu: list[int], precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d fq, d fk, dv, d log_decay)."""
    return _bwd_impl(fq, fk, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision)


@hla_bwd.register_fake
def _(fq, fk, v, ld, o, den, states, zstates, do, chunk_size, gpu, precision):
    return torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v), torch.empty_like(ld)


def _setup_context(ctx, inputs, output):
    fq, fk, v, ld, chunk_size, gpu, precision = inputs
    o, den, states, zstates = output
    ctx.chunk_size, ctx.gpu, ctx.precision = chunk_size, gpu, precision
    ctx.save_for_backward(fq, fk, v, ld, o, den, states, zstates)


def _backward(ctx, do, dden, dstates, dzstates):
    fq, fk, v, ld, o, den, states, zstates = ctx.saved_tensors
    grads = torch.ops.phase7fw.hyperbolic_linear_attention_bwd(fq, fk, v, ld, o, den, states, zstates, do,
                                                               ctx.chunk_size, ctx.gpu, ctx.precision)
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
        fq = feature_map(q, c, focus_power, query=True)  # fp32, differentiable
        fk = feature_map(k, c, focus_power)
        ld = q.new_zeros(B, H, T, dtype=torch.float32) if log_decay is None else log_decay.float()
        o, _, _, _ = torch.ops.phase7fw.hyperbolic_linear_attention_fwd(
            fq.contiguous(), fk.contiguous(), v.contiguous(), ld.contiguous(), _check_chunk(chunk_size),
            list(tuning.gpu), tuning.precision)
    return o.to(v.dtype)
