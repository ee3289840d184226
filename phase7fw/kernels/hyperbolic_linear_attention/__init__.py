"""Hyperbolic linear attention (Phase 8): causal attention in O(T) time and O(1) state.

One op, three forms that agree to 1e-5 in fp32 (tests/unit/test_hyperbolic_linear_attention.py):

- :func:`hyperbolic_linear_attention_chunked` -- chunked parallel form for training (the
  torch reference of the Triton kernel in :mod:`.kernel`, selected by ``[kernels]
  hyperbolic_linear_attention = "triton"``, and of flash-linear-attention's GLA kernel in
  :mod:`.fla_backend`, ``= "fla"``, optional package fla-core);
- :func:`hyperbolic_linear_attention_step` -- the recurrence, one token at a time, for
  cached decoding (state (B, H, D+1, Dv+1) fp32, no growth with the context);
- :func:`hyperbolic_linear_attention_quadratic` -- the T x T masked form, tests only.

What it computes, per head with curvature c > 0 (docs/model.md, "Phase 8"): queries and keys
are tangent vectors at the origin of the Poincare ball, mapped into the ball by expmap0
(a = sqrt(c)|u| clamped so the points stay within Euclidean radius 0.905/sqrt(c)) and lifted
to the hyperboloid of the Lorentz model. Keys use their Lorentz point, queries the same
point divided by its time coordinate (the Beltrami-Klein point (1, kappa), |kappa| <= 0.995):

    phi_k(k) = (cosh 2b, sinh 2b * f(k/|k|))       phi_q(q) = (1, tanh 2a * f(q/|q|))

(f: optional focusing of the direction, identity by default). The weight of a pair,
phi_q . phi_k = cosh 2b (1 + kappa_q . kappa_k), is the ambient inner product of the two
points of the upper sheet divided by the query's time coordinate, a per-query factor that
the normalization cancels. It is >= 1 - 0.995^2 ~ 0.01 > 0 for any q, k, so, with a
per-token decay lambda_t = exp(log_decay_t) in (0, 1],

    S_t = lambda_t S_{t-1} + phi_k(k_t) [v_t, 1]^T        o_t = phi_q(q_t) S_t[:, :Dv] / phi_q(q_t) S_t[:, Dv]

The normalizer includes the token's own weight (>= 0.01, with decay factor 1), so the
division never sees zero (it is still clamped at 1e-6); o_t is a convex combination of the
values. Gradients flow to q, k, v, the decay and the curvature.

Layout: :mod:`.reference` (torch forms), :mod:`.kernel` (Triton, imported lazily),
:mod:`.fla_backend` (the op through fla's ``chunk_simple_gla``, fla imported when selected),
:mod:`.verify` (the parity rows of ``phase7fw doctor``), :func:`register` (kind ``kernel``,
``"hyperbolic_linear_attention:triton"`` and ``"hyperbolic_linear_attention:fla"``). Nothing
here imports a component, Triton or fla.
"""

from __future__ import annotations

from typing import Literal

import attrs

from phase7fw.kernels import launch_check, lazy, precision_option, triton_kernel
from phase7fw.kernels.hyperbolic_linear_attention.reference import (
    DEN_EPS,
    MAX_ATANH,
    MAX_KLEIN_RADIUS,
    empty_state,
    feature_map,
    hyperbolic_linear_attention_chunked,
    hyperbolic_linear_attention_quadratic,
    hyperbolic_linear_attention_step,
)
from phase7fw.recipe.options import option

__all__ = [
    "DEN_EPS",
    "MAX_ATANH",
    "MAX_KLEIN_RADIUS",
    "TritonConfig",
    "empty_state",
    "feature_map",
    "hyperbolic_linear_attention",
    "hyperbolic_linear_attention_chunked",
    "hyperbolic_linear_attention_fla",
    "hyperbolic_linear_attention_quadratic",
    "hyperbolic_linear_attention_step",
    "hyperbolic_linear_attention_triton",
    "register",
]

OP = "hyperbolic_linear_attention"


@attrs.frozen
class TritonConfig:
    """Tuning of the Triton kernel on a GPU, ``[kernels.hyperbolic_linear_attention]`` (the
    interpreter uses 32-wide value tiles and 64-element scan tiles in fp32). Not tuned yet (the
    first GPU run, H100 2026-12-07, used these defaults): ``gpu`` launches the per-chunk
    kernels, 8 warps because the backward's program holds two D x BV fp32 states and the
    chunk's Q x D query and key tiles (D = 128, BV = 64, Q = 64: ~130 fp32 registers per thread
    for these alone at 8 warps, twice that at 4); ``scan`` launches the inter-chunk scan, memory-bound (each program
    reads and writes its columns of every chunk's state, 16 chunks per step)."""

    gpu: tuple[int, int, int] = option((64, 8, 1), check=launch_check(1),
                                       help="(value tile, num_warps, num_stages) of the per-chunk kernels on a GPU")
    scan: tuple[int, int, int] = option((256, 4, 1), check=launch_check(1),
                                        help="(state elements per program, num_warps, num_stages) of the inter-chunk"
                                        " scan on a GPU")
    precision: Literal["ieee", "tf32"] = precision_option("tf32")


#: The op's public function (the chunked torch form); components call this one and kernel
#: selection may replace it with :func:`hyperbolic_linear_attention_triton` (same signature).
hyperbolic_linear_attention = hyperbolic_linear_attention_chunked
hyperbolic_linear_attention_triton, _register_triton = triton_kernel(
    OP, "phase7fw.kernels.hyperbolic_linear_attention.kernel", "hyperbolic_linear_attention_triton",
    "chunked O(T) hyperbolic (Lorentz feature map) linear attention, fp32 state, fwd + bwd (grads to q, k, v, c, decay)",
    TritonConfig)
_FLA = "phase7fw.kernels.hyperbolic_linear_attention.fla_backend"
#: the op through flash-linear-attention's chunk_simple_gla (CUDA only; fla imported on first call)
hyperbolic_linear_attention_fla = lazy(_FLA, "hyperbolic_linear_attention_fla")


def register(register) -> None:
    """Register the op's kernels: our Triton kernel (``"hyperbolic_linear_attention:triton"``,
    what "auto" picks) and flash-linear-attention's GLA (``"hyperbolic_linear_attention:fla"``,
    optional package fla-core, checked when a recipe selects it)."""
    _register_triton(register)
    register("kernel", f"{OP}:fla", lazy(_FLA, "factory"),
             description="the same op through flash-linear-attention's chunk_simple_gla (optional: pip install"
             " fla-core einops) on the fp32 Lorentz features (D+1) and [v, 1] (Dv+1), feature map in torch;"
             " fwd + bwd (grads to q, k, v, c, decay), CUDA only")
