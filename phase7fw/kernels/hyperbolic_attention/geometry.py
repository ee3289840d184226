"""Poincare-ball operations for curvature -c (c > 0), as plain functions of tensors.

The ball is {x : c |x|^2 < 1}. Every function takes ``c`` as a Python float or a tensor
(gradients flow into it). Conventions:

* Vectors live in the last dim. For the point-wise ops (``expmap0``, ``logmap0``,
  ``mobius_add``, ``dist``, ``project``, ``poincare_dist_from_tangent``) ``c`` broadcasts
  against the input shape *without* that last dim: for x of shape (B, H, T, D) a per-head
  curvature is ``c.view(H, 1)``. For ``pairwise_dist`` / ``pairwise_poincare_dist_from_tangent``
  (output (..., N, M)) ``c`` is a scalar or of shape (..., 1, 1), e.g. ``c.view(H, 1, 1)``.
* bf16/fp16 inputs are upcast and the result is fp32; fp32 and fp64 are computed in their own
  precision. Half precision cannot represent points near the boundary (1 - 1e-3 is already
  the last bf16 step below 1), which is why nothing here runs in it.
* Stability: fp32 is accurate up to Euclidean radius 0.999/sqrt(c). Distances use
  arcosh(1 + z) = log1p(z + sqrt(z (z + 2))) which has no cancellation for small z, artanh
  arguments are clamped below 1, norms are clamped away from 0 so gradients at the origin are
  finite. From tangent vectors, 1 - c|x|^2 is 1/cosh(a)^2 and never formed by subtraction.

These functions are the readable reference that the Triton kernels are tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "MAX_TANGENT_ATANH",
    "TangentStats",
    "dist",
    "dist_from_tangent_stats",
    "expmap0",
    "logmap0",
    "mobius_add",
    "pairwise_dist",
    "pairwise_poincare_dist_from_tangent",
    "poincare_dist_from_tangent",
    "project",
    "tangent_stats",
]

#: Largest sqrt(c)|u| used by the tangent-space distance helpers: artanh(0.999) ~= 3.8002,
#: i.e. tangent vectors are mapped no further out than Euclidean radius 0.999/sqrt(c), the
#: radius up to which fp32 is accurate. It also keeps sinh/cosh(2a) <= ~1000 (no overflow).
MAX_TANGENT_ATANH = math.atanh(0.999)

# Norms are clamped to this before dividing by them: gradients stay finite at the origin.
_MIN_NORM = 1e-15


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32  # bf16 / fp16 (and integer) inputs are computed in fp32
    return dtype


def _prep(tensors, c):
    """Upcast the inputs to the compute dtype and turn ``c`` into a tensor of that dtype."""
    dtype = _compute_dtype(*tensors)
    device = tensors[0].device
    out = [t.to(dtype) for t in tensors]
    if isinstance(c, torch.Tensor):
        c = c.to(device=device, dtype=dtype)  # differentiable: gradients reach a learned c
    else:
        c = torch.tensor(float(c), dtype=dtype, device=device)  # no fp32 detour for floats
    return out, c


def _expand_c(c: torch.Tensor) -> torch.Tensor:
    # c broadcasts against shape[:-1]; add the vector dim so it multiplies (..., 1) norms.
    return c.unsqueeze(-1) if c.dim() > 0 else c


def _pairwise_row_c(c: torch.Tensor) -> torch.Tensor:
    # Pairwise ops take c broadcasting against (..., N, M) but constant over N and M (a
    # curvature belongs to a space, not a pair); drop one of the size-1 dims for row terms.
    if c.dim() == 0:
        return c
    if c.dim() < 2 or c.shape[-2:] != (1, 1):
        raise ValueError(f"pairwise ops need a scalar c or c of shape (..., 1, 1), got {tuple(c.shape)}")
    return c.squeeze(-1)


def _min_z(dtype: torch.dtype) -> float:
    # Floor on the arcosh1p argument: keeps d/dz = 1/sqrt(z(z+2)) finite when two points
    # coincide. eps^2 puts the distance floor (~sqrt(2) eps) below rounding noise.
    return torch.finfo(dtype).eps ** 2


def _arcosh1p(z: torch.Tensor) -> torch.Tensor:
    """arcosh(1 + z) for z >= 0 without forming 1 + z (accurate for small z)."""
    z = z.clamp_min(_min_z(z.dtype))
    return torch.log1p(z + torch.sqrt(z * (z + 2.0)))


def _one_minus_cx2(x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # For points given on the ball this subtraction cannot be avoided; the clamp keeps points
    # on (or, by rounding, just outside) the boundary finite instead of NaN.
    return (1.0 - c * x2).clamp_min(torch.finfo(x2.dtype).eps)


def expmap0(v: torch.Tensor, c) -> torch.Tensor:
    """Exponential map at the origin: tanh(sqrt(c)|v|) v / (sqrt(c)|v|). No projection."""
    (v,), c = _prep((v,), c)
    sc = _expand_c(c).sqrt()
    n = v.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return torch.tanh(sc * n) / (sc * n) * v


def logmap0(x: torch.Tensor, c) -> torch.Tensor:
    """Logarithmic map at the origin: artanh(sqrt(c)|x|) x / (sqrt(c)|x|)."""
    (x,), c = _prep((x,), c)
    sc = _expand_c(c).sqrt()
    n = x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    r = (sc * n).clamp_max(1.0 - torch.finfo(x.dtype).eps)  # artanh(1) = inf
    return torch.atanh(r) / (sc * n) * x


def mobius_add(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Mobius addition x (+) y on the ball of curvature -c."""
    (x, y), c = _prep((x, y), c)
    c = _expand_c(c)
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1, keepdim=True)
    xy = (x * y).sum(-1, keepdim=True)
    num = (1.0 + 2.0 * c * xy + c * y2) * x + (1.0 - c * x2) * y
    # The denominator is >= (1 - sqrt(c x2 c y2))^2 > 0 inside the ball.
    den = (1.0 + 2.0 * c * xy + c * c * x2 * y2).clamp_min(_MIN_NORM)
    return num / den


def dist(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Geodesic distance, broadcasting x and y, reducing the last dim.

    d = arcosh(1 + 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2))) / sqrt(c). The difference x - y is
    formed explicitly (not |x|^2 + |y|^2 - 2<x,y>), so close points keep their precision.
    """
    (x, y), c = _prep((x, y), c)
    diff2 = (x - y).pow(2).sum(-1)
    den = _one_minus_cx2(x.pow(2).sum(-1), c) * _one_minus_cx2(y.pow(2).sum(-1), c)
    return _arcosh1p(2.0 * c * diff2 / den) / c.sqrt()


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, c) -> torch.Tensor:
    """Distances between all rows: x (..., N, D), y (..., M, D) -> (..., N, M).

    Reference implementation: it forms the (..., N, M, D) differences explicitly, so memory
    is O(N M D). ``c`` is a scalar or has shape (..., 1, 1) (one curvature per batch/head).
    """
    (x, y), c = _prep((x, y), c)
    c_row = _pairwise_row_c(c)
    diff2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    den_x = _one_minus_cx2(x.pow(2).sum(-1), c_row).unsqueeze(-1)
    den_y = _one_minus_cx2(y.pow(2).sum(-1), c_row).unsqueeze(-2)
    return _arcosh1p(2.0 * c * diff2 / (den_x * den_y)) / c.sqrt()


def project(x: torch.Tensor, c, eps: float | None = None) -> torch.Tensor:
    """Scale points with |x| > (1 - eps)/sqrt(c) back onto that radius; others are unchanged.

    ``eps`` defaults to 1e-3 in fp32 (radius 0.999/sqrt(c), the fp32 accuracy limit) and 1e-5
    in fp64 (geoopt's fp64 default).
    """
    (x,), c = _prep((x,), c)
    if eps is None:
        eps = 1e-5 if x.dtype == torch.float64 else 1e-3
    maxnorm = (1.0 - eps) / _expand_c(c).sqrt()
    n = x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return torch.where(n > maxnorm, x / n * maxnorm, x)


# ---------------------------------------------------------------------------------------
# Distances between expmap0 images computed from tangent vectors (used by attention).
#
# For a tangent vector u with n = |u| and a = sqrt(c) n, the point x = expmap0(u) has
# |x|^2 = tanh(a)^2 / c and 1 - c|x|^2 = 1 / cosh(a)^2. For points x = expmap0(q),
# y = expmap0(k) (a for q, b for k, angle theta between q and k) the arcosh argument
#     1 + 2 c|x-y|^2 cosh(a)^2 cosh(b)^2 = 1 + 2 Z
# with, after expanding |x-y|^2 = |x|^2 + |y|^2 - 2 tanh(a) tanh(b) <q,k> / (c |q||k|),
#     Z = sinh(a - b)^2 + 1/2 sinh(2a) sinh(2b) (1 - cos theta)
#       = sinh(a - b)^2 + 1/2 f_q f_k (|q||k| - <q,k>),    f = sinh(2a) / n.
# Both terms are >= 0, so nothing cancels except gap = |q||k| - <q,k>. That one is inherent
# when only the dot product is known: gap carries an error of ~eps |q||k|, which Z amplifies
# by sinh(2a) sinh(2b) / 2, so near-parallel q, k near the boundary get an absolute distance
# error of about sinh(2a) sqrt(2 eps) / sqrt(c) (up to ~1/sqrt(c) in fp32 at the clamp; far
# below what bf16 inputs resolve there). f is smooth at n = 0 (-> 2 sqrt(c)): no 1/|q| blow-up.
# The only T x T inputs are <q,k>; n, a, f are per-row scalars.
# ---------------------------------------------------------------------------------------


class TangentStats(NamedTuple):
    """Per-row scalars of tangent vectors u (shape (...)): |u|, a = min(sqrt(c)|u|, max),
    and f = sinh(2a)/|u|."""

    norm: torch.Tensor
    atanh: torch.Tensor
    sinh2_over_norm: torch.Tensor


def tangent_stats(u: torch.Tensor, c: torch.Tensor, max_atanh: float = MAX_TANGENT_ATANH) -> TangentStats:
    """Row statistics of ``u`` (..., D) for curvature ``c`` (tensor broadcasting against
    (...)), computed in u's dtype (call with fp32/fp64 tensors)."""
    n = u.norm(dim=-1).clamp_min(_MIN_NORM)
    # Clamping a maps every tangent vector inside radius tanh(max_atanh)/sqrt(c).
    a = (c.sqrt() * n).clamp_max(max_atanh)
    return TangentStats(n, a, torch.sinh(2.0 * a) / n)


def dist_from_tangent_stats(
    dot: torch.Tensor, sq: TangentStats, sk: TangentStats, c: torch.Tensor
) -> torch.Tensor:
    """Distance between expmap0(q) and expmap0(k) from <q,k> and broadcastable row stats."""
    # Cauchy-Schwarz makes |q||k| - <q,k> >= 0; rounding can push it slightly below.
    gap = (sq.norm * sk.norm - dot).clamp_min(0.0)
    z = torch.sinh(sq.atanh - sk.atanh).pow(2) + 0.5 * sq.sinh2_over_norm * sk.sinh2_over_norm * gap
    return _arcosh1p(2.0 * z) / c.sqrt()


def poincare_dist_from_tangent(
    q: torch.Tensor, k: torch.Tensor, c, max_atanh: float = MAX_TANGENT_ATANH
) -> torch.Tensor:
    """d_c(expmap0(q), expmap0(k)) elementwise over broadcast q, k (reducing the last dim),
    using only <q,k> and row norms. Tangent norms beyond max_atanh/sqrt(c) are clamped
    (equivalently, the points are projected to radius tanh(max_atanh)/sqrt(c) = 0.999/sqrt(c))."""
    (q, k), c = _prep((q, k), c)
    dot = (q * k).sum(-1)
    return dist_from_tangent_stats(dot, tangent_stats(q, c, max_atanh), tangent_stats(k, c, max_atanh), c)


def pairwise_poincare_dist_from_tangent(
    q: torch.Tensor, k: torch.Tensor, c, max_atanh: float = MAX_TANGENT_ATANH
) -> torch.Tensor:
    """Like :func:`poincare_dist_from_tangent` for all pairs: q (..., N, D), k (..., M, D)
    -> (..., N, M) with one matmul; ``c`` is a scalar or of shape (..., 1, 1)."""
    (q, k), c = _prep((q, k), c)
    c_row = _pairwise_row_c(c)
    sq = TangentStats(*(t.unsqueeze(-1) for t in tangent_stats(q, c_row, max_atanh)))
    sk = TangentStats(*(t.unsqueeze(-2) for t in tangent_stats(k, c_row, max_atanh)))
    return dist_from_tangent_stats(q @ k.transpose(-1, -2), sq, sk, c)
