"""Fused hyperbolic (Poincare-distance) causal sliding-window attention in Triton: row
statistics, Delta and the chain rule inside the kernels, a one-pass backward with atomic dq.
Verified against the fp64 reference on an H200 (tests/gpu) and timed in benchmarks/RESULTS.md.

Same contract as :func:`.reference.hyperbolic_attention_reference`:
``hyperbolic_attention_triton(q, k, v, c, tau, window) -> o`` with q, k, v of shape
(B, H, T, D) (q, k already rotated), c a scalar or (H,), tau (H,), window W >= 1 (W >= T: full
causal). Scores for i - W < j <= i, by ``score``:

    "distance"          s_ij = -tau_h d_ij              (the model's default)
    "squared_distance"  s_ij = -tau_h d_ij^2
    "dot_distance"      s_ij = <q_i, k_j> / sqrt(D) - tau_h d_ij

with d_ij = d_c(expmap0(q_i), expmap0(k_j)) (MODEL.md; docs/model.md, "Quality").

How it is split (MODEL.md, geometry.py): three kernels, no torch maths on (B, H, T) or
larger tensors except one dtype cast of dq and one sum of per-program partials.

* Per-row scalars n = max(|u|, 1e-15), a = min(sqrt(c) n, MAX_TANGENT_ATANH), f = sinh(2a)/n
  are computed in registers (fp32) from the q/k tiles the kernels load, sqrt(c) from c.
* Forward, one program per query block (flash-style online softmax in base 2, O(T) extra
  memory: the row log-sum-exp): the only T x T product <q_i, k_j> goes to tensor cores and
  per pair

      gap = max(n_q n_k - <q,k>, 0)
      sh  = sqrt(2) sinh(a_q - a_k) = e^{a_q}/sqrt(2) e^{-a_k} - e^{-a_q}/sqrt(2) e^{a_k}
      z   = max(sh^2 + f_q f_k gap, eps32^2)                              (= 2Z of geometry.py)
      s log2(e) = -(tau/sqrt(c)) log2(1 + z + sqrt(z (z + 2)))            (m = 1)
                = -(tau/c) ln2 log2(1 + z + sqrt(z (z + 2)))^2             (m = 2)

  in fp32 whatever the input dtype. It writes O in the input dtype and, for 16-bit inputs,
  an fp32 copy of O (P @ V uses a hi/lo split of P, so that copy is fp32-accurate).
* Backward: a row pass (Delta = dO . O32, the q statistics, zeroing the fp32 dq buffer), then
  one program per key block that recomputes the scores of the query blocks in its window
  once and produces dk, dv (registers), dq (fp32 atomics, dot part and radial part), and its
  partial sums of d(c) and d(tau). The chain rule from the row statistics to q, k, c is
  finished in the kernel: with g = dL/dz (for m = 2 it carries the extra factor 2 arcosh(1+z)
  of d(d^2) = 2 d dd, and tau/sqrt(c) becomes tau/c), dz/d<q,k> = -f_q f_k [gap > 0],
  dz/dn_q = f_q f_k n_k [gap > 0], dz/da_q = -dz/da_k = 4 sinh cosh(a_q - a_k),
  dz/df_q = f_k gap, then da/dn = sqrt(c) [a unclamped], df/dn|_a = -f/n,
  df/da = 2 cosh(2a)/n, dn/du = u/n; dL/dtau = -sum d dS, dL/dsqrt(c) = tau/sqrt(c) sum d dS
  + sum_rows n [a unclamped] dL/da.

Only blocks that intersect the window i - W < j <= i are visited (O(T W) for W < T), and
only blocks on the diagonal, the window edge or the end of the sequence are masked.

Launches: forward 1 kernel; backward 2 kernels + the dq cast (16-bit inputs) + one (2, H)
sum. The kernel-level FLOP and byte counts per pair are in the kernels' docstrings.

The core is registered as ``torch.ops.phase7fw.hyperbolic_attention_fwd`` / ``..._bwd``
(``torch.library.custom_op`` with fake and autograd registrations), so torch.compile traces
through it as one opaque op. Inputs in bf16/fp16 keep their dtype in memory; fp32 inputs use
IEEE fp32 dot products (used by the CPU interpreter tests). The dq atomics make dq (and so
d(q) of the model) not bitwise deterministic run to run.
"""

from __future__ import annotations

import torch

from phase7fw.kernels.hyperbolic_attention import TritonConfig, geometry
from phase7fw.kernels.hyperbolic_attention.reference import SCORES
from phase7fw.kernels._triton import require, tl, triton

__all__ = ["hyperbolic_attention_triton", "hyperbolic_attention_core"]

_TINY = float(torch.finfo(torch.float32).eps) ** 2  # geometry._min_z(float32)
_MIN_NORM = 1e-15


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_stats(u, sc, MAXA: tl.constexpr, MIN_NORM: tl.constexpr):
    """(n, a, f) of the rows of u (R, BD) fp32 (geometry.tangent_stats): n = max(|u|, 1e-15),
    a = min(sqrt(c) n, MAXA), f = sinh(2a) / n (a series below 2a = 0.5: no cancellation)."""
    n = tl.maximum(tl.sqrt(tl.sum(u * u, 1)), MIN_NORM)
    a = tl.minimum(sc * n, MAXA)
    x = 2.0 * a
    x2 = x * x
    series = x * (1.0 + x2 * (0.16666666666666666 + x2 * (0.008333333333333333
                                                            + x2 * (1.984126984126984e-4 + x2 * 2.7557319223985893e-6))))
    ex = tl.exp(x)
    sinh2a = tl.where(x < 0.5, series, 0.5 * (ex - 1.0 / ex))
    return n, a, sinh2a / n


@triton.jit
def _load_tile(P, offs_r, offs_d, T, D: tl.constexpr, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows offs_r of a (T, D) matrix as a (R, BD) tile; masks only what may be out of range."""
    ptrs = P + offs_r[:, None] * D + offs_d[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            t = tl.load(ptrs, mask=(offs_r < T)[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=(offs_r < T)[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            t = tl.load(ptrs)
        else:
            t = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return t


@triton.jit
def _fwd_block(acc, m_i, l_i, q, nq, eqs, ieqs, fq, offs_m, start_n, K, V, T, W, sc, coef2, offs_d,
               D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, TINY: tl.constexpr,
               MAXA: tl.constexpr, MIN_NORM: tl.constexpr, SPLIT_P: tl.constexpr,
               EVEN_D: tl.constexpr, MASK: tl.constexpr, SQUARED: tl.constexpr, DOT: tl.constexpr,
               ISD: tl.constexpr):
    """One key block of the forward: online-softmax update of (acc, m_i, l_i)."""
    offs_n = start_n + tl.arange(0, BN)
    k = _load_tile(K, offs_n, offs_d, T, D, MASK, EVEN_D)
    v = _load_tile(V, offs_n, offs_d, T, D, MASK, EVEN_D)
    nk, ak, fk = _row_stats(k.to(tl.float32), sc, MAXA, MIN_NORM)
    ek = tl.exp(ak)
    iek = 1.0 / ek

    dot = tl.dot(q, tl.trans(k), input_precision=PREC)
    # gap = n_q n_k - <q,k> (>= 0 up to rounding); sh = sqrt(2) sinh(a_q - a_k) from the
    # per-row e^{+-a} (eqs, ieqs carry the 1/sqrt(2)); z = 2 sinh^2 + f_q f_k gap = 2Z.
    gap = tl.maximum(nq[:, None] * nk[None, :] - dot, 0.0)
    sh = eqs[:, None] * iek[None, :] - ieqs[:, None] * ek[None, :]
    z = tl.maximum(sh * sh + (gap * fq[:, None]) * fk[None, :], TINY)
    # log2 of 1 + z + sqrt(z (z+2)) = arcosh(1+z) log2(e): scores in base 2, s2 = s log2(e)
    lg = tl.log2(1.0 + z + tl.sqrt(z * (z + 2.0)))
    if SQUARED:
        s2 = -coef2 * (lg * lg)  # coef2 = (tau/c) ln2
    else:
        s2 = -coef2 * lg  # coef2 = tau/sqrt(c)
    if DOT:
        s2 += dot * (ISD * 1.4426950408889634)  # + <q,k>/sqrt(D), in base 2
    if MASK:
        allowed = ((offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < W)
                   & (offs_n < T)[None, :])
        s2 = tl.where(allowed, s2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    m_sub = m_new
    if MASK:
        # A row with no key yet keeps m = -inf (so the first real scores, which can be far
        # below 0, set it later); only the subtraction uses 0 there, avoiding -inf - -inf.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_sub)
    p = tl.exp2(s2 - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if SPLIT_P:
        # p = hi + lo in two 16-bit parts: O keeps ~fp32 accuracy (the backward's
        # Delta = dO . O must match sum_j P dP; a bf16 P biases d(tau), d(c) ~1e-2).
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p_hi, v) + tl.dot(p_lo, v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _hyp_attn_fwd_kernel(
    Q, K, V, O, O32, LSE, C, TAU,
    H, T, W,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, TINY: tl.constexpr, MAXA: tl.constexpr, MIN_NORM: tl.constexpr,
    SPLIT_P: tl.constexpr, EVEN_D: tl.constexpr, SQUARED: tl.constexpr, DOT: tl.constexpr, ISD: tl.constexpr,
):
    """One program per (query block, batch*head). Per pair (D = head dim): 4D matmul FLOPs
    (QK^T, PV; 6D with the split P of bf16/fp16), ~20 fp32 ops and 3 MUFU (sqrt, log2, exp2);
    the row statistics of each visited key block cost ~3D/BM more per pair. Bytes: each
    visited key block reads K, V once (4D/BM bytes per pair in bf16), O(T) writes."""
    # the last query blocks see the most keys (causal): launch them first (shorter tail)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    sc = tl.sqrt(tl.load(C + h))
    coef2 = tl.load(TAU + h) / sc  # s log2(e) = -(tau/sqrt(c)) log2(1 + w)
    if SQUARED:
        coef2 = coef2 / sc * 0.6931471805599453  # s log2(e) = -(tau/c) ln2 log2(1 + w)^2
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T
    Qb, Kb, Vb = Q + base, K + base, V + base

    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _load_tile(Qb, offs_m, offs_d, T, D, True, EVEN_D)
    nq, aq, fq = _row_stats(q.to(tl.float32), sc, MAXA, MIN_NORM)
    eq = tl.exp(aq)
    eqs = eq * 0.7071067811865476
    ieqs = 0.7071067811865476 / eq

    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BD), tl.float32)

    # key blocks [lo, hi) intersect the window of some row; those in [full_lo, full_hi) lie
    # wholly inside every row's window (n0 >= m0 + BM - W, n0 + BN <= m0 + 1) and skip masks.
    lo = (tl.maximum(m0 - W + 1, 0) // BN) * BN
    hi = tl.minimum(m0 + BM, T)
    full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(tl.maximum(m0 + BM - W, 0), BN) * BN), hi)
    full_hi = tl.where(m0 + BM > T, full_lo, ((m0 + 1) // BN) * BN)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    for start_n in range(lo, full_lo, BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, nq, eqs, ieqs, fq, offs_m, start_n, Kb, Vb, T, W, sc, coef2,
                                   offs_d, D, BN, PREC, TINY, MAXA, MIN_NORM, SPLIT_P, EVEN_D, True, SQUARED, DOT, ISD)
    for start_n in range(full_lo, full_hi, BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, nq, eqs, ieqs, fq, offs_m, start_n, Kb, Vb, T, W, sc, coef2,
                                   offs_d, D, BN, PREC, TINY, MAXA, MIN_NORM, SPLIT_P, EVEN_D, False, SQUARED, DOT, ISD)
    for start_n in range(full_hi, hi, BN):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, nq, eqs, ieqs, fq, offs_m, start_n, Kb, Vb, T, W, sc, coef2,
                                   offs_d, D, BN, PREC, TINY, MAXA, MIN_NORM, SPLIT_P, EVEN_D, True, SQUARED, DOT, ISD)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    m_ok = offs_m < T
    o_mask = m_ok[:, None] & (offs_d < D)[None, :]
    o_off = base + offs_m[:, None] * D + offs_d[None, :]
    tl.store(O + o_off, o.to(O.dtype.element_ty), mask=o_mask)
    if SPLIT_P:
        # fp32 copy for the backward's Delta = dO . O (a bf16 O biases d(c), d(tau) ~3e-2)
        tl.store(O32 + o_off, o, mask=o_mask)
    tl.store(LSE + rbase + offs_m, m_i + tl.log2(l_safe), mask=m_ok)


@triton.jit
def _hyp_attn_bwd_pre_kernel(
    Q, O32, DO, C, DQ32, NQ, AQ, FQ, DELTA,
    H, T,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    MAXA: tl.constexpr, MIN_NORM: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Per query row: Delta = dO . O (fp32 O), the statistics (n, a, f) of q, and zeros in
    the fp32 dq accumulator. Reads q, O (fp32), dO once; writes dq (fp32) once."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    sc = tl.sqrt(tl.load(C + bh % H))
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    m_ok = offs_m < T
    q = _load_tile(Q + base, offs_m, offs_d, T, D, True, EVEN_D).to(tl.float32)
    o = _load_tile(O32 + base, offs_m, offs_d, T, D, True, EVEN_D).to(tl.float32)
    do = _load_tile(DO + base, offs_m, offs_d, T, D, True, EVEN_D).to(tl.float32)
    nq, aq, fq = _row_stats(q, sc, MAXA, MIN_NORM)
    tl.store(NQ + rbase + offs_m, nq, mask=m_ok)
    tl.store(AQ + rbase + offs_m, aq, mask=m_ok)
    tl.store(FQ + rbase + offs_m, fq, mask=m_ok)
    tl.store(DELTA + rbase + offs_m, tl.sum(o * do, 1), mask=m_ok)
    tl.store(DQ32 + base + offs_m[:, None] * D + offs_d[None, :], tl.zeros((BM, BD), tl.float32),
             mask=m_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _bwd_block(dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc,
               k, kf, v, nk, ek, iek, fk, offs_n, start_m,
               Q, DO, DQ32, LSE, DELTA, NQ, AQ, FQ, T, W, sc, coef, offs_d,
               D: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, GPREC: tl.constexpr,
               GRAD_FP32: tl.constexpr, TINY: tl.constexpr, MAXA: tl.constexpr, MIN_NORM: tl.constexpr,
               EVEN_D: tl.constexpr, MASK: tl.constexpr, SQUARED: tl.constexpr, DOT: tl.constexpr,
               ISD: tl.constexpr):
    """One query block against the program's key block: dk, dv and the key-side sums
    accumulate in registers; dq (dot part + this block's share of the radial part) is added
    to the fp32 dq buffer with atomics. The g below is dL/dz divided by -coef (coef = tau/sqrt(c),
    or tau/c for squared scores); the matmul operand gk = coef g f_q f_k [gap > 0] (+ dS/sqrt(D)
    for the dot term of "dot_distance") is dL/d<q,k>."""
    offs_m = start_m + tl.arange(0, BM)
    q = _load_tile(Q, offs_m, offs_d, T, D, MASK, EVEN_D)
    do = _load_tile(DO, offs_m, offs_d, T, D, MASK, EVEN_D)
    if MASK:
        m_ok = offs_m < T
        nq = tl.load(NQ + offs_m, mask=m_ok, other=1.0)
        aq = tl.load(AQ + offs_m, mask=m_ok, other=0.0)
        fq = tl.load(FQ + offs_m, mask=m_ok, other=1.0)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)
    else:
        nq = tl.load(NQ + offs_m)
        aq = tl.load(AQ + offs_m)
        fq = tl.load(FQ + offs_m)
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    eq = tl.exp(aq)
    eqs = eq * 0.7071067811865476
    ieqs = 0.7071067811865476 / eq

    # Order chosen for short live ranges: dP first (one array alive through the score maths);
    # after the scores only fm, zg, shc, rinv, lg, p (then ds) stay alive per pair; g, ga, gz,
    # gg are consumed by reductions / matmuls as soon as formed.
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    x = nq[:, None] * nk[None, :] - qk  # gap, unclamped
    fm = tl.where(x > 0.0, fq[:, None] * fk[None, :], 0.0)  # f_q f_k [gap > 0] = -dz/d<q,k>
    zg = x * fm  # f_q f_k max(gap, 0)
    p1 = eqs[:, None] * iek[None, :]
    p2 = ieqs[:, None] * ek[None, :]
    sh = p1 - p2  # sqrt(2) sinh(a_q - a_k); p1 + p2 = sqrt(2) cosh(a_q - a_k)
    shc = sh * (p1 + p2)  # 2 sinh cosh = dz/da_q / 2
    z = sh * sh + zg
    zc = tl.maximum(z, TINY)
    rr = zc * (zc + 2.0)
    rinv = tl.rsqrt(rr)  # d arcosh(1+z) / dz
    lg = tl.log2(1.0 + zc + rr * rinv)  # arcosh(1+z) log2(e)
    rinv = tl.where(z > TINY, rinv, 0.0)  # no gradient where z was clamped
    if SQUARED:
        s2 = -coef * 0.6931471805599453 * (lg * lg)
    else:
        s2 = -coef * lg
    if DOT:
        s2 += qk * (ISD * 1.4426950408889634)
    p = tl.exp2(s2 - lse[:, None])
    if MASK:
        allowed = ((offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] - offs_n[None, :] < W)
                   & (offs_m < T)[:, None] & (offs_n < T)[None, :])
        p = tl.where(allowed, p, 0.0)
    ds = p * (dp - delta[:, None])  # dL/ds
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    if SQUARED:
        r_acc += tl.sum(ds * (lg * lg), 0)  # sum dS arcosh^2, up to the factor ln2^2
        g = ds * rinv * (1.3862943611198906 * lg)  # d(arcosh^2)/dz = 2 ln2 lg rinv
    else:
        r_acc += tl.sum(ds * lg, 0)  # sum dS arcosh, up to the factor ln2
        g = ds * rinv
    ga = g * shc  # half of g dz/da_q  (dz/da_k = -dz/da_q)
    gz = g * zg  # g f_q f_k gap: gives dz/df through 1/f
    gg = g * fm  # g * -dz/d<q,k>
    t_ga += tl.sum(ga, 0)
    t_gz += tl.sum(gz, 0)
    t_gn += tl.sum(gg * nq[:, None], 0)
    gk = coef * gg  # dL/d<q,k> of the distance term
    if DOT:
        gk += ds * ISD
    if GRAD_FP32:
        dk += tl.dot(tl.trans(gk), q.to(tl.float32), input_precision=GPREC)
        dq_dot = tl.dot(gk, kf, input_precision=GPREC)
    else:
        dk += tl.dot(tl.trans(gk.to(q.dtype)), q, input_precision=GPREC)
        dq_dot = tl.dot(gk.to(kf.dtype), kf, input_precision=GPREC)

    # chain rule to q for this block's pairs (linear: the shares of all key blocks add up).
    # n, a, f of q: da/dn = sqrt(c) [a unclamped], df/dn = -f/n, df/da = 2 cosh(2a)/n.
    s_gz = tl.sum(gz, 1)
    g_n = tl.sum(gg * nk[None, :], 1) - s_gz / nq  # dz/dn_q (+ f's 1/n)
    e2 = eq * eq
    g_a = 2.0 * tl.sum(ga, 1) + s_gz * (e2 + 1.0 / e2) / (fq * nq)  # total through a
    unclamped = sc * nq <= MAXA
    g_t = g_n + tl.where(unclamped, g_a * sc, 0.0)
    radial = tl.where(nq > MIN_NORM, g_t / nq, 0.0)
    sc_acc += tl.where(unclamped, g_a * nq, 0.0)
    dq = dq_dot - coef * radial[:, None] * q.to(tl.float32)
    dq_ptrs = DQ32 + offs_m[:, None] * D + offs_d[None, :]
    if MASK:
        if EVEN_D:
            tl.atomic_add(dq_ptrs, dq, mask=(offs_m < T)[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=(offs_m < T)[:, None] & (offs_d < D)[None, :], sem="relaxed")
    else:
        if EVEN_D:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, mask=(offs_d < D)[None, :], sem="relaxed")
    return dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc


@triton.jit
def _hyp_attn_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, NQ, AQ, FQ, C, TAU,
    DQ32, DK, DV, PART,
    H, T, W, NB, PART_STRIDE,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    PREC: tl.constexpr, GPREC: tl.constexpr, GRAD_FP32: tl.constexpr, TINY: tl.constexpr,
    MAXA: tl.constexpr, MIN_NORM: tl.constexpr, EVEN_D: tl.constexpr, SQUARED: tl.constexpr,
    DOT: tl.constexpr, ISD: tl.constexpr,
):
    """One program per (key block, batch*head): recomputes the scores of the query blocks in
    the window once and produces dk, dv, its atomic share of dq and its partial sums of
    d(c), d(tau). Per pair: 10D matmul FLOPs (QK^T, dO V^T, P^T dO, G^T Q, G K), ~45 fp32 ops
    and 3 MUFU (rsqrt, log2, exp2); 6 row/column reductions. Bytes per pair: q, dO tiles
    (4D/BN in bf16) and 20/BN of row scalars read, 4D/BN of fp32 atomic adds to dq."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    sc = tl.sqrt(tl.load(C + h))
    tau = tl.load(TAU + h)
    coef = tau / sc
    if SQUARED:
        coef = coef / sc  # s = -(tau/c) arcosh^2
    base = bh.to(tl.int64) * T * D
    rbase = bh.to(tl.int64) * T

    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    n_ok = offs_n < T
    k = _load_tile(K + base, offs_n, offs_d, T, D, True, EVEN_D)
    v = _load_tile(V + base, offs_n, offs_d, T, D, True, EVEN_D)
    nk, ak, fk = _row_stats(k.to(tl.float32), sc, MAXA, MIN_NORM)
    ek = tl.exp(ak)
    iek = 1.0 / ek
    if GRAD_FP32:
        kf = k.to(tl.float32)
    else:
        kf = k

    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BD), tl.float32)
    t_ga = tl.zeros((BN,), tl.float32)
    t_gz = tl.zeros((BN,), tl.float32)
    t_gn = tl.zeros((BN,), tl.float32)
    r_acc = tl.zeros((BN,), tl.float32)
    sc_acc = tl.zeros((BM,), tl.float32)

    # query blocks [lo, hi) see some key of this block; [full_lo, full_hi) see all of them
    # (m0 >= n0 + BN - 1, m0 + BM <= n0 + W, m0 + BM <= T, n0 + BN <= T): no masks there.
    lo = (n0 // BM) * BM
    hi = tl.minimum(n0 + BN + W - 1, T)
    full_lo = tl.minimum(tl.maximum(lo, tl.cdiv(n0 + BN - 1, BM) * BM), hi)
    full_hi = tl.minimum(((n0 + W) // BM) * BM, (T // BM) * BM)
    full_hi = tl.where(n0 + BN > T, full_lo, full_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    Qb, DOb, DQb = Q + base, DO + base, DQ32 + base
    LSEb, DELb, NQb, AQb, FQb = LSE + rbase, DELTA + rbase, NQ + rbase, AQ + rbase, FQ + rbase
    for start_m in range(lo, full_lo, BM):
        dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc = _bwd_block(
            dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc, k, kf, v, nk, ek, iek, fk, offs_n, start_m,
            Qb, DOb, DQb, LSEb, DELb, NQb, AQb, FQb, T, W, sc, coef, offs_d,
            D, BM, PREC, GPREC, GRAD_FP32, TINY, MAXA, MIN_NORM, EVEN_D, True, SQUARED, DOT, ISD)
    for start_m in range(full_lo, full_hi, BM):
        dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc = _bwd_block(
            dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc, k, kf, v, nk, ek, iek, fk, offs_n, start_m,
            Qb, DOb, DQb, LSEb, DELb, NQb, AQb, FQb, T, W, sc, coef, offs_d,
            D, BM, PREC, GPREC, GRAD_FP32, TINY, MAXA, MIN_NORM, EVEN_D, False, SQUARED, DOT, ISD)
    for start_m in range(full_hi, hi, BM):
        dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc = _bwd_block(
            dk, dv, t_ga, t_gz, t_gn, r_acc, sc_acc, k, kf, v, nk, ek, iek, fk, offs_n, start_m,
            Qb, DOb, DQb, LSEb, DELb, NQb, AQb, FQb, T, W, sc, coef, offs_d,
            D, BM, PREC, GPREC, GRAD_FP32, TINY, MAXA, MIN_NORM, EVEN_D, True, SQUARED, DOT, ISD)

    # chain rule to k (complete sums for these keys); dz/da_k = -dz/da_q
    g_n = t_gn - t_gz / nk
    e2 = ek * ek
    g_a = -2.0 * t_ga + t_gz * (e2 + 1.0 / e2) / (fk * nk)
    unclamped = (sc * nk <= MAXA) & n_ok
    g_t = g_n + tl.where(unclamped, g_a * sc, 0.0)
    radial = tl.where(nk > MIN_NORM, g_t / nk, 0.0)
    dk = dk - coef * radial[:, None] * k.to(tl.float32)
    kv_mask = n_ok[:, None] & (offs_d < D)[None, :]
    kv_off = base + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    # per-program shares of d(c) and d(tau): s = -tau F / sqrt(c)^m with F = arcosh (m = 1) or
    # arcosh^2 (m = 2) and r = sum dS F, so dL/dtau = -r / sqrt(c)^m and
    # dL/dsqrt(c) = m coef r / sqrt(c) - coef sum g_a n [unclamped] (the second term through a)
    r = tl.sum(r_acc, 0) * 0.6931471805599453
    if SQUARED:
        r = r * 0.6931471805599453
        d_sc = 2.0 * coef / sc * r
    else:
        d_sc = coef / sc * r
    s_a = tl.sum(sc_acc, 0) + tl.sum(tl.where(unclamped, g_a * nk, 0.0), 0)
    d_sc = d_sc - coef * s_a
    slot = bh * NB + pid_n
    tl.store(PART + slot, d_sc / (2.0 * sc))  # d(c) = d(sqrt c) / (2 sqrt c)
    if SQUARED:
        tl.store(PART + PART_STRIDE + slot, -r / (sc * sc))
    else:
        tl.store(PART + PART_STRIDE + slot, -r / sc)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------

def gpu_tiles(tuning: TritonConfig) -> list[int]:
    """The launch configuration of :class:`TritonConfig` as the custom ops take it (11 ints)."""
    return [*tuning.fwd, *tuning.bwd, *tuning.bwd_pre]


def _config(pass_name: str, device: torch.device, gpu: list[int]):
    """(BM, BN, num_warps, num_stages) of a pass: from ``gpu`` (:func:`gpu_tiles`) on a GPU,
    16 x 16 blocks in the interpreter. "bwd_pre" has rows per program and no BN (0)."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if pass_name == "fwd":
        return tuple(gpu[0:4])
    if pass_name == "bwd":
        return tuple(gpu[4:8])
    rows, warps, stages = gpu[8:11]
    return rows, 0, warps, stages


def _precisions(dtype: torch.dtype, grad_low_precision: bool):
    """(PREC for q.k / p.v, GPREC for the dZ matmuls, GRAD_FP32)."""
    if dtype == torch.float32:
        return "ieee", "ieee", True
    if grad_low_precision:
        return None, None, False
    return None, "tf32", True


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


_CONSTS = dict(TINY=_TINY, MAXA=geometry.MAX_TANGENT_ATANH, MIN_NORM=_MIN_NORM)


def _score_flags(score: str, D: int) -> dict:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
    return dict(SQUARED=score == "squared_distance", DOT=score == "dot_distance", ISD=float(D) ** -0.5)


def _fwd_impl(q, k, v, c, tau, window, score, gpu, grad_low_precision=False):
    require(q, k, v)
    B, H, T, D = q.shape
    low = q.dtype != torch.float32
    o = torch.empty_like(v)
    # fp32 copy of O for 16-bit inputs: the backward's Delta_i = dO_i . O_i must use the
    # unrounded O (a bf16 O biases the curvature/temperature gradients by ~3e-2 relative)
    o32 = torch.empty(q.shape, device=q.device, dtype=torch.float32) if low else o.new_empty((0,))
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if T == 0:
        return o, o32, lse
    BM, BN, nw, ns = _config("fwd", q.device, gpu)
    prec, _, _ = _precisions(q.dtype, grad_low_precision)
    BD = _block_d(D)
    _hyp_attn_fwd_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, o, o32 if low else o, lse, c, tau, H, T, window,
        D=D, BD=BD, BM=BM, BN=BN, PREC=prec, SPLIT_P=low, EVEN_D=BD == D, **_score_flags(score, D), **_CONSTS,
        num_warps=nw, num_stages=ns,
    )
    return o, o32, lse


def _bwd_impl(q, k, v, o, o32, lse, do, c, tau, window, score, gpu, grad_low_precision):
    require(q, k, v)
    B, H, T, D = q.shape
    low = q.dtype != torch.float32
    do = do.to(v.dtype).contiguous()
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if T == 0:
        return torch.zeros_like(q), dk, dv, torch.zeros((2, H), device=q.device, dtype=torch.float32)
    dq32 = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    rows = torch.empty((4, B, H, T), device=q.device, dtype=torch.float32)
    nq, aq, fq, delta = rows.unbind(0)
    prec, gprec, gfp32 = _precisions(q.dtype, grad_low_precision)
    BD = _block_d(D)
    even_d = BD == D
    BMp, _, nw, ns = _config("bwd_pre", q.device, gpu)
    _hyp_attn_bwd_pre_kernel[(triton.cdiv(T, BMp), B * H)](
        q, o32 if low else o, do, c, dq32, nq, aq, fq, delta, H, T,
        D=D, BD=BD, BM=BMp, MAXA=_CONSTS["MAXA"], MIN_NORM=_MIN_NORM, EVEN_D=even_d,
        num_warps=nw, num_stages=ns,
    )
    BM, BN, nw, ns = _config("bwd", q.device, gpu)
    NB = triton.cdiv(T, BN)
    part = torch.empty((2, B, H, NB), device=q.device, dtype=torch.float32)
    _hyp_attn_bwd_kernel[(NB, B * H)](
        q, k, v, do, lse, delta, nq, aq, fq, c, tau, dq32, dk, dv, part, H, T, window, NB, B * H * NB,
        D=D, BD=BD, BM=BM, BN=BN, PREC=prec, GPREC=gprec, GRAD_FP32=gfp32, EVEN_D=even_d,
        **_score_flags(score, D), **_CONSTS,
        num_warps=nw, num_stages=ns,
    )
    dq = dq32.to(q.dtype) if low else dq32
    return dq, dk, dv, part.sum(dim=(1, 3))


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("phase7fw::hyperbolic_attention_fwd", mutates_args=())
def hyperbolic_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, window: int,
    score: str, gpu: list[int], grad_low_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel core: (o in v's dtype, o32 (fp32 O for 16-bit inputs, empty for fp32), lse2).
    q, k, v contiguous (B, H, T, D) of one dtype; c and tau contiguous (H,) fp32; window
    in [1, T]; lse2 is the row log-sum-exp of the scores in base 2; ``score``: see the module;
    ``gpu``, ``grad_low_precision``: the launch configuration (:func:`gpu_tiles`), kept for the
    backward."""
    return _fwd_impl(q, k, v, c, tau, window, score, gpu, grad_low_precision)


@hyperbolic_attention_fwd.register_fake
def _(q, k, v, c, tau, window, score, gpu, grad_low_precision):
    B, H, T, _ = q.shape
    o32 = q.new_empty(q.shape if q.dtype != torch.float32 else (0,), dtype=torch.float32)
    return torch.empty_like(v), o32, q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("phase7fw::hyperbolic_attention_bwd", mutates_args=())
def hyperbolic_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, o32: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, c: torch.Tensor, tau: torch.Tensor, window: int, score: str, gpu: list[int],
    grad_low_precision: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv, d_c_tau) with d_c_tau of shape (2, H): rows d(c), d(tau)."""
    return _bwd_impl(q, k, v, o, o32, lse, do, c, tau, window, score, gpu, grad_low_precision)


@hyperbolic_attention_bwd.register_fake
def _(q, k, v, o, o32, lse, do, c, tau, window, score, gpu, grad_low_precision):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), c.new_empty((2, c.shape[0]))


def _setup_context(ctx, inputs, output):
    q, k, v, c, tau, window, score, gpu, grad_low_precision = inputs
    o, o32, lse = output
    ctx.mark_non_differentiable(o32, lse)
    ctx.save_for_backward(q, k, v, o, o32, lse, c, tau)
    ctx.window, ctx.score, ctx.gpu, ctx.grad_low_precision = window, score, gpu, grad_low_precision


def _backward(ctx, do, do32, dlse):
    q, k, v, o, o32, lse, c, tau = ctx.saved_tensors
    dq, dk, dv, dct = torch.ops.phase7fw.hyperbolic_attention_bwd(q, k, v, o, o32, lse, do, c, tau, ctx.window,
                                                                   ctx.score, ctx.gpu, ctx.grad_low_precision)
    return dq, dk, dv, dct[0], dct[1], None, None, None, None


hyperbolic_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def hyperbolic_attention_core(q, k, v, c, tau, window: int, score: str = "distance", *,
                              tuning: TritonConfig | None = None) -> torch.Tensor:
    """Like :func:`hyperbolic_attention_triton` but q, k are used in the dtype given."""
    tuning = tuning or TritonConfig()
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    _score_flags(score, 1)  # a clear error for an unknown score before any launch
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
        o, _, _ = torch.ops.phase7fw.hyperbolic_attention_fwd(
            q.contiguous(), k.contiguous(), v.contiguous(), c.contiguous(), tau.contiguous(),
            int(min(window, max(T, 1))), score, gpu_tiles(tuning), tuning.grad_matmul_low_precision,
        )
    return o


def hyperbolic_attention_triton(q, k, v, c, tau, window: int, score: str = "distance", *,
                                tuning: TritonConfig | None = None) -> torch.Tensor:
    """Drop-in for ``hyperbolic_attention_reference`` (same arguments, output in v's dtype).

    q, k are rounded to v's dtype when v is bf16/fp16 (the model's RoPE returns fp32 q, k;
    the kernel reads them in the storage dtype and does all distance maths in fp32).
    ``tuning``: the launch configuration (``[kernels.hyperbolic_attention]``; None: defaults).
    """
    dtype = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return hyperbolic_attention_core(q.to(dtype), k.to(dtype), v.to(dtype), c, tau, window, score,
                                     tuning=tuning).to(v.dtype)


def flops_per_call(B: int, H: int, T: int, D: int, window: int, backward: bool = True) -> float:
    """Matmul FLOPs the kernels do (causal pairs only): 2 in the forward, 5 more in the backward."""
    W = min(window, T)
    pairs = B * H * (W * (W + 1) / 2 + (T - W) * W)
    return pairs * 2 * D * (2 + (5 if backward else 0))

