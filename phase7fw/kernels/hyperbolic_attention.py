"""Fused hyperbolic (Poincare-distance) causal sliding-window attention in Triton.

Same contract as :func:`phase7fw.components.phase7.attention.hyperbolic_attention_reference`:
``hyperbolic_attention_triton(q, k, v, c, tau, window) -> o`` with q, k, v of shape
(B, H, T, D) (q, k already rotated), c a scalar or (H,), tau (H,), window W >= 1 (W >= T: full
causal). Scores s_ij = -tau_h d_c(expmap0(q_i), expmap0(k_j)) for i - W < j <= i.

How it is split (MODEL.md, geometry.py):

* Per-row scalars, in torch, fp32, differentiable (O(T) memory): n = max(|u|, 1e-15),
  a = min(sqrt(c) n, MAX_TANGENT_ATANH), f = sinh(2a) / n, for q and for k.
* The kernels (flash-style, online softmax, O(T) extra memory: the row log-sum-exp) form the
  only T x T product <q_i, k_j> on tensor cores and evaluate per pair

      gap = max(n_q n_k - <q,k>, 0)
      sh  = sinh(a_q - a_k) = (e^{a_q} e^{-a_k} - e^{-a_q} e^{a_k}) / 2   (no transcendental per pair)
      z   = max(2 sh^2 + f_q f_k gap, eps32^2)                             (= 2Z of geometry.py)
      d   = log1p(z + sqrt(z (z + 2))) / sqrt(c)

  in fp32 whatever the input dtype; softmax statistics are fp32 (base-2 internally).
* Backward: two kernels that recompute the scores (one per key block: dk, dv and key-row
  sums; one per query block: dq and query-row sums), no atomics, deterministic. They return
  the gradients of the per-row scalars (n, a, f) and the row sums R_i = sum_j d_ij dS_ij,
  from which torch autograd finishes the chain to q, k, c (through a and the 1/sqrt(c)
  factor) and tau: dL/dtau_h = -sum R, dL/dsqrt(c)_h = tau_h / sqrt(c_h) sum R.

Key blocks wholly outside the window are skipped (the loops cover only blocks that
intersect i - W < j <= i), so the cost is O(T W) for W < T.

The core is registered as ``torch.ops.phase7fw.hyperbolic_attention_fwd`` / ``..._bwd``
(``torch.library.custom_op`` with fake and autograd registrations), so torch.compile traces
through it as one opaque op. Inputs in bf16/fp16 keep their dtype in memory; fp32 inputs use
IEEE fp32 dot products (used by the CPU interpreter tests).
"""

from __future__ import annotations

import torch

from phase7fw import geometry
from phase7fw.kernels._triton import require, tl, triton

__all__ = ["hyperbolic_attention_triton", "hyperbolic_attention_core"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_TINY = float(torch.finfo(torch.float32).eps) ** 2  # geometry._min_z(float32)
_MIN_NORM = 1e-15


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _pair_terms(dot, nq, eq, ieq, fq, nk, ek, iek, fk, TINY: tl.constexpr):
    """Per-pair distance terms from <q,k> (BM, BN) and row scalars (BM,) / (BN,)."""
    gap_raw = nq[:, None] * nk[None, :] - dot
    gap = tl.maximum(gap_raw, 0.0)
    sh = 0.5 * (eq[:, None] * iek[None, :] - ieq[:, None] * ek[None, :])
    ffk = fq[:, None] * fk[None, :]
    z_raw = 2.0 * sh * sh + ffk * gap
    z = tl.maximum(z_raw, TINY)
    rr = z * (z + 2.0)
    r = tl.sqrt(rr)
    w = z + r
    # ln(1 + w) accurately: a short series for small w, log2 otherwise (relative error
    # <= ~1e-5 at w = 1e-2, far below what the softmax resolves).
    series = w * (1.0 - w * (0.5 - w * (0.3333333333333333 - w * 0.25)))
    ln1p = tl.where(w < 1e-2, series, tl.log2(1.0 + w) * 0.6931471805599453)
    return gap_raw, gap, sh, ffk, z_raw, r, ln1p


@triton.jit
def _hyp_attn_fwd_kernel(
    Q, K, V, O, LSE,
    NQ, AQ, FQ, NK, AK, FK, SC, TAU,
    H, T, W,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, TINY: tl.constexpr, SPLIT_P: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    sc = tl.load(SC + h)
    tau = tl.load(TAU + h)
    coef = tau / sc  # s_ij = -coef * ln1p_ij ;  log2-domain: s * log2(e)
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    nq = tl.load(NQ + rbase + offs_m, mask=m_ok, other=1.0)
    aq = tl.load(AQ + rbase + offs_m, mask=m_ok, other=0.0)
    fq = tl.load(FQ + rbase + offs_m, mask=m_ok, other=1.0)
    eq = tl.exp(aq)
    ieq = tl.exp(-aq)

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)

    lo = tl.maximum(pid_m * BM - W + 1, 0)
    lo = (lo // BN) * BN
    hi = tl.minimum((pid_m + 1) * BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_ok = offs_n < T
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        nk = tl.load(NK + rbase + offs_n, mask=n_ok, other=1.0)
        ak = tl.load(AK + rbase + offs_n, mask=n_ok, other=0.0)
        fk = tl.load(FK + rbase + offs_n, mask=n_ok, other=1.0)
        ek = tl.exp(ak)
        iek = tl.exp(-ak)

        dot = tl.dot(q, tl.trans(k), input_precision=PREC)
        gap_raw, gap, sh, ffk, z_raw, r, ln1p = _pair_terms(dot, nq, eq, ieq, fq, nk, ek, iek, fk, TINY)
        s2 = -(coef * 1.4426950408889634) * ln1p
        allowed = (n_ok[None, :] & m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
                   & (offs_m[:, None] - offs_n[None, :] < W))
        s2 = tl.where(allowed, s2, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SPLIT_P:
            # p = hi + lo in two 16-bit parts: O keeps ~fp32 accuracy (the backward's
            # Delta = dO . O must match sum_j P dP; a bf16 P biases d(tau), d(c) ~1e-2).
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(p_hi, v) + tl.dot(p_lo, v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rbase + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _hyp_attn_bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA,
    NQ, AQ, FQ, NK, AK, FK, SC, TAU,
    DK, DV, GNK, GAK, GFK,
    H, T, W,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr, GRAD_FP32: tl.constexpr, TINY: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    sc = tl.load(SC + h)
    tau = tl.load(TAU + h)
    coef = tau / sc
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T

    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    n_ok = offs_n < T
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    nk = tl.load(NK + rbase + offs_n, mask=n_ok, other=1.0)
    ak = tl.load(AK + rbase + offs_n, mask=n_ok, other=0.0)
    fk = tl.load(FK + rbase + offs_n, mask=n_ok, other=1.0)
    ek = tl.exp(ak)
    iek = tl.exp(-ak)

    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    g_nk = tl.zeros((BN,), tl.float32)
    g_ak = tl.zeros((BN,), tl.float32)
    g_fk = tl.zeros((BN,), tl.float32)

    lo = ((pid_n * BN) // BM) * BM
    hi = tl.minimum(pid_n * BN + BN + W - 1, T)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        m_ok = offs_m < T
        qd_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
        nq = tl.load(NQ + rbase + offs_m, mask=m_ok, other=1.0)
        aq = tl.load(AQ + rbase + offs_m, mask=m_ok, other=0.0)
        fq = tl.load(FQ + rbase + offs_m, mask=m_ok, other=1.0)
        lse = tl.load(LSE + rbase + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + rbase + offs_m, mask=m_ok, other=0.0)
        eq = tl.exp(aq)
        ieq = tl.exp(-aq)

        dot = tl.dot(q, tl.trans(k), input_precision=PREC)
        gap_raw, gap, sh, ffk, z_raw, r, ln1p = _pair_terms(dot, nq, eq, ieq, fq, nk, ek, iek, fk, TINY)
        s2 = -(coef * 1.4426950408889634) * ln1p
        allowed = (n_ok[None, :] & m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
                   & (offs_m[:, None] - offs_n[None, :] < W))
        p = tl.where(allowed, tl.exp2(s2 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)

        # g = dL/dz = -tau/sqrt(c) * dS / sqrt(z (z+2))   (0 where z was clamped)
        g = tl.where(z_raw > TINY, -coef * ds / r, 0.0)
        ch = 0.5 * (eq[:, None] * iek[None, :] + ieq[:, None] * ek[None, :])
        g_ak += tl.sum(-4.0 * g * sh * ch, 0)
        g_fk += tl.sum(g * fq[:, None] * gap, 0)
        gg = tl.where(gap_raw > 0.0, g * ffk, 0.0)
        g_nk += tl.sum(gg * nq[:, None], 0)
        if GRAD_FP32:
            dk -= tl.dot(tl.trans(gg), q.to(tl.float32), input_precision=GPREC)
        else:
            dk -= tl.dot(tl.trans(gg.to(q.dtype)), q, input_precision=GPREC)

    tl.store(DK + base + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + base + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)
    tl.store(GNK + rbase + offs_n, g_nk, mask=n_ok)
    tl.store(GAK + rbase + offs_n, g_ak, mask=n_ok)
    tl.store(GFK + rbase + offs_n, g_fk, mask=n_ok)


@triton.jit
def _hyp_attn_bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA,
    NQ, AQ, FQ, NK, AK, FK, SC, TAU,
    DQ, GNQ, GAQ, GFQ, RSUM,
    H, T, W,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr, GRAD_FP32: tl.constexpr, TINY: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    sc = tl.load(SC + h)
    tau = tl.load(TAU + h)
    coef = tau / sc
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < T
    d_ok = offs_d < D
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    nq = tl.load(NQ + rbase + offs_m, mask=m_ok, other=1.0)
    aq = tl.load(AQ + rbase + offs_m, mask=m_ok, other=0.0)
    fq = tl.load(FQ + rbase + offs_m, mask=m_ok, other=1.0)
    lse = tl.load(LSE + rbase + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + rbase + offs_m, mask=m_ok, other=0.0)
    eq = tl.exp(aq)
    ieq = tl.exp(-aq)

    dq = tl.zeros((BM, BD), tl.float32)
    g_nq = tl.zeros((BM,), tl.float32)
    g_aq = tl.zeros((BM,), tl.float32)
    g_fq = tl.zeros((BM,), tl.float32)
    rsum = tl.zeros((BM,), tl.float32)

    lo = tl.maximum(pid_m * BM - W + 1, 0)
    lo = (lo // BN) * BN
    hi = tl.minimum((pid_m + 1) * BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        n_ok = offs_n < T
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        nk = tl.load(NK + rbase + offs_n, mask=n_ok, other=1.0)
        ak = tl.load(AK + rbase + offs_n, mask=n_ok, other=0.0)
        fk = tl.load(FK + rbase + offs_n, mask=n_ok, other=1.0)
        ek = tl.exp(ak)
        iek = tl.exp(-ak)

        dot = tl.dot(q, tl.trans(k), input_precision=PREC)
        gap_raw, gap, sh, ffk, z_raw, r, ln1p = _pair_terms(dot, nq, eq, ieq, fq, nk, ek, iek, fk, TINY)
        s2 = -(coef * 1.4426950408889634) * ln1p
        allowed = (n_ok[None, :] & m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
                   & (offs_m[:, None] - offs_n[None, :] < W))
        p = tl.where(allowed, tl.exp2(s2 - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        rsum += tl.sum(ln1p * ds, 1)

        g = tl.where(z_raw > TINY, -coef * ds / r, 0.0)
        ch = 0.5 * (eq[:, None] * iek[None, :] + ieq[:, None] * ek[None, :])
        g_aq += tl.sum(4.0 * g * sh * ch, 1)
        g_fq += tl.sum(g * fk[None, :] * gap, 1)
        gg = tl.where(gap_raw > 0.0, g * ffk, 0.0)
        g_nq += tl.sum(gg * nk[None, :], 1)
        if GRAD_FP32:
            dq -= tl.dot(gg, k.to(tl.float32), input_precision=GPREC)
        else:
            dq -= tl.dot(gg.to(k.dtype), k, input_precision=GPREC)

    tl.store(DQ + base + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)
    tl.store(GNQ + rbase + offs_m, g_nq, mask=m_ok)
    tl.store(GAQ + rbase + offs_m, g_aq, mask=m_ok)
    tl.store(GFQ + rbase + offs_m, g_fq, mask=m_ok)
    tl.store(RSUM + rbase + offs_m, rsum / sc, mask=m_ok)  # sum_j d_ij dS_ij


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

#: Block sizes per pass, (BM, BN, num_warps, num_stages): the fastest of a sweep on an H200
#: at (8, 16, 1024, 128) bf16 (benchmarks/kernels.py --sweep, 2026-11-28; larger tiles spill
#: the per-pair fp32 temporaries). The interpreter uses 16 x 16 blocks.
GPU_CONFIG = {
    "fwd": (64, 32, 4, 2),
    "bwd_kv": (32, 32, 4, 2),
    "bwd_q": (32, 32, 4, 2),
}
#: Set True to cast dZ to the input dtype (bf16) for the dq/dk matmuls instead of tf32.
GRAD_MATMUL_LOW_PRECISION = False


def _config(pass_name: str, device: torch.device):
    if device.type != "cuda":
        return 16, 16, 4, 1
    return GPU_CONFIG[pass_name]


def _precisions(dtype: torch.dtype):
    """(PREC for q.k / p.v, GPREC for the dZ matmuls, GRAD_FP32)."""
    if dtype == torch.float32:
        return "ieee", "ieee", True
    if GRAD_MATMUL_LOW_PRECISION:
        return None, None, False
    return None, "tf32", True


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _fwd_impl(q, k, v, nq, aq, fq, nk, ak, fk, sc, tau, window):
    require(q, k, v)
    B, H, T, D = q.shape
    # fp32 output: the backward's Delta_i = dO_i . O_i must use the unrounded O (a bf16 O
    # biases the curvature/temperature gradients by ~3e-2 relative); callers round it.
    o = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    BM, BN, nw, ns = _config("fwd", q.device)
    prec, _, _ = _precisions(q.dtype)
    grid = (triton.cdiv(T, BM), B * H)
    _hyp_attn_fwd_kernel[grid](
        q, k, v, o, lse, nq, aq, fq, nk, ak, fk, sc, tau, H, T, window,
        D=D, BD=_block_d(D), BM=BM, BN=BN, PREC=prec, TINY=_TINY, SPLIT_P=q.dtype != torch.float32,
        num_warps=nw, num_stages=ns,
    )
    return o, lse


def _bwd_impl(q, k, v, o, lse, do, nq, aq, fq, nk, ak, fk, sc, tau, window):
    require(q, k, v)
    B, H, T, D = q.shape
    do = do.to(v.dtype).contiguous()  # the upstream gradient arrives in fp32 (o is fp32)
    delta = (do.float() * o).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rows = [torch.empty((B, H, T), device=q.device, dtype=torch.float32) for _ in range(7)]
    g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, rsum = rows
    if T == 0:
        return dq, dk, dv, g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, rsum
    prec, gprec, gfp32 = _precisions(q.dtype)
    BD = _block_d(D)
    BM, BN, nw, ns = _config("bwd_kv", q.device)
    _hyp_attn_bwd_kv_kernel[(triton.cdiv(T, BN), B * H)](
        q, k, v, do, lse, delta, nq, aq, fq, nk, ak, fk, sc, tau,
        dk, dv, g_nk, g_ak, g_fk, H, T, window,
        D=D, BD=BD, BM=BM, BN=BN, PREC=prec, GPREC=gprec, GRAD_FP32=gfp32, TINY=_TINY,
        num_warps=nw, num_stages=ns,
    )
    BM, BN, nw, ns = _config("bwd_q", q.device)
    _hyp_attn_bwd_q_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, do, lse, delta, nq, aq, fq, nk, ak, fk, sc, tau,
        dq, g_nq, g_aq, g_fq, rsum, H, T, window,
        D=D, BD=BD, BM=BM, BN=BN, PREC=prec, GPREC=gprec, GRAD_FP32=gfp32, TINY=_TINY,
        num_warps=nw, num_stages=ns,
    )
    return dq, dk, dv, g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, rsum


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("phase7fw::hyperbolic_attention_fwd", mutates_args=())
def hyperbolic_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    nq: torch.Tensor, aq: torch.Tensor, fq: torch.Tensor,
    nk: torch.Tensor, ak: torch.Tensor, fk: torch.Tensor,
    sc: torch.Tensor, tau: torch.Tensor, window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel core: (o, lse2), both fp32. q, k, v contiguous (B, H, T, D); row stats (B, H, T)
    fp32; sc = sqrt(c) and tau of shape (H,) fp32; lse2 is the row log-sum-exp in base 2."""
    return _fwd_impl(q, k, v, nq, aq, fq, nk, ak, fk, sc, tau, window)


@hyperbolic_attention_fwd.register_fake
def _(q, k, v, nq, aq, fq, nk, ak, fk, sc, tau, window):
    B, H, T, _ = q.shape
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("phase7fw::hyperbolic_attention_bwd", mutates_args=())
def hyperbolic_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    nq: torch.Tensor, aq: torch.Tensor, fq: torch.Tensor,
    nk: torch.Tensor, ak: torch.Tensor, fk: torch.Tensor,
    sc: torch.Tensor, tau: torch.Tensor, window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq_dot, dk_dot, dv, g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, R)."""
    return _bwd_impl(q, k, v, o, lse, do, nq, aq, fq, nk, ak, fk, sc, tau, window)


@hyperbolic_attention_bwd.register_fake
def _(q, k, v, o, lse, do, nq, aq, fq, nk, ak, fk, sc, tau, window):
    rows = [lse.new_empty(lse.shape) for _ in range(7)]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), *rows)


def _setup_context(ctx, inputs, output):
    q, k, v, nq, aq, fq, nk, ak, fk, sc, tau, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, nq, aq, fq, nk, ak, fk, sc, tau)
    ctx.window = window


def _backward(ctx, do, dlse):
    q, k, v, o, lse, nq, aq, fq, nk, ak, fk, sc, tau = ctx.saved_tensors
    dq, dk, dv, g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, rsum = torch.ops.phase7fw.hyperbolic_attention_bwd(
        q, k, v, o, lse, do, nq, aq, fq, nk, ak, fk, sc, tau, ctx.window
    )
    rs = rsum.sum(dim=(0, 2))  # (H,)
    d_sc = tau * rs / sc
    d_tau = -rs
    return dq, dk, dv, g_nq, g_aq, g_fq, g_nk, g_ak, g_fk, d_sc, d_tau, None


hyperbolic_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def _row_stats(u: torch.Tensor, sc_rows: torch.Tensor):
    """(n, a, f) of geometry.tangent_stats in fp32, differentiable, computed from the values
    the kernel sees (u in its storage dtype)."""
    n = u.float().norm(dim=-1).clamp_min(_MIN_NORM)
    a = (sc_rows * n).clamp_max(geometry.MAX_TANGENT_ATANH)
    return n, a, torch.sinh(2.0 * a) / n


def hyperbolic_attention_core(q, k, v, c, tau, window: int) -> torch.Tensor:
    """Like :func:`hyperbolic_attention_triton` but q, k are used in the dtype given."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, H, T, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton hyperbolic attention takes fp32, bf16 or fp16 inputs, got {q.dtype}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        c = c if isinstance(c, torch.Tensor) else torch.tensor(float(c), device=q.device)
        c = c.to(device=q.device, dtype=torch.float32)
        c = c.expand(H) if c.dim() == 0 else c
        tau = tau if isinstance(tau, torch.Tensor) else torch.tensor(float(tau), device=q.device)
        tau = tau.to(device=q.device, dtype=torch.float32)
        tau = tau.expand(H) if tau.dim() == 0 else tau
        if c.shape != (H,) or tau.shape != (H,):
            raise ValueError(f"c and tau must be scalars or of shape ({H},)")
        sc = c.sqrt()
        sc_rows = sc.view(1, H, 1)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        nq, aq, fq = _row_stats(q, sc_rows)
        nk, ak, fk = _row_stats(k, sc_rows)
        o, _ = torch.ops.phase7fw.hyperbolic_attention_fwd(
            q, k, v, nq, aq, fq, nk, ak, fk, sc.contiguous(), tau.contiguous(), int(min(window, max(T, 1)))
        )
    return o.to(v.dtype)


def hyperbolic_attention_triton(q, k, v, c, tau, window: int) -> torch.Tensor:
    """Drop-in for ``hyperbolic_attention_reference`` (same arguments, output in v's dtype).

    q, k are rounded to v's dtype when v is bf16/fp16 (the model's RoPE returns fp32 q, k;
    the kernel reads them in the storage dtype and does all distance maths in fp32).
    """
    dtype = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return hyperbolic_attention_core(q.to(dtype), k.to(dtype), v.to(dtype), c, tau, window).to(v.dtype)


def flops_per_call(B: int, H: int, T: int, D: int, window: int, backward: bool = True) -> float:
    """Matmul FLOPs the kernels do (causal pairs only): 2 in the forward, 5 more in the backward."""
    W = min(window, T)
    pairs = B * H * (W * (W + 1) / 2 + (T - W) * W)
    return pairs * 2 * D * (2 + (5 if backward else 0))

