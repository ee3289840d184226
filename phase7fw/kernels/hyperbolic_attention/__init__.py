"""The hyperbolic attention op: causal sliding-window attention with Poincare-ball distance
scores (docs/model.md). Everything of it is in this folder:

- :mod:`.reference`: :func:`hyperbolic_attention_reference` (blockwise, O(T W) memory, what the
  model runs by default) and :func:`dense_masked_hyperbolic_attention` (T x T, tests);
- :mod:`.geometry`: the Poincare-ball maths both forms are written with;
- :mod:`.kernel`: the fused Triton forward and backward (imported only when selected);
- :mod:`.verify`: its parity rows and the distance gate (``phase7fw doctor --verify``);
- :func:`register`: kind ``kernel``, ``"hyperbolic_attention:triton"``.

Components call :func:`hyperbolic_attention` and let kernel selection swap it.
"""

from __future__ import annotations

import attrs

from phase7fw.kernels import launch_check, triton_kernel
from phase7fw.recipe.options import option
from phase7fw.kernels.hyperbolic_attention import geometry
from phase7fw.kernels.hyperbolic_attention.reference import (
    SCORES,
    dense_masked_hyperbolic_attention,
    distance_scores,
    hyperbolic_attention_reference,
    sliding_window_mask,
)

__all__ = [
    "OP",
    "SCORES",
    "TritonConfig",
    "dense_masked_hyperbolic_attention",
    "distance_scores",
    "geometry",
    "hyperbolic_attention",
    "hyperbolic_attention_reference",
    "hyperbolic_attention_triton",
    "register",
    "sliding_window_mask",
]

OP = "hyperbolic_attention"


@attrs.frozen
class TritonConfig:
    """Tuning of the Triton kernels on a GPU, ``[kernels.hyperbolic_attention]`` (the
    interpreter uses 16 x 16 blocks). The defaults are the picks of ``benchmarks/kernels.py
    --sweep`` on an H200 (2026-11-29)."""

    fwd: tuple[int, int, int, int] = option(
        (64, 64, 4, 2), check=launch_check(2), help="forward: (query block, key block, num_warps, num_stages)")
    bwd: tuple[int, int, int, int] = option(
        (32, 32, 4, 1), check=launch_check(2),
        help="fused backward, one program per key block: (query block, key block, num_warps, num_stages)")
    bwd_pre: tuple[int, int, int] = option(
        (64, 4, 1), check=launch_check(1), help="backward's row pass (Delta, statistics): (rows, num_warps, num_stages)")
    grad_matmul_low_precision: bool = option(
        False, help="16-bit inputs: the dZ matmuls of the backward in the input dtype instead of TF32")


#: The op's public function (the torch reference); components call it and ``[kernels] hyperbolic_attention``
#: may swap it for :func:`hyperbolic_attention_triton` (same signature).
hyperbolic_attention = hyperbolic_attention_reference
hyperbolic_attention_triton, register = triton_kernel(
    OP, "phase7fw.kernels.hyperbolic_attention.kernel", "hyperbolic_attention_triton",
    "fused causal sliding-window Poincare attention, fwd + bwd (grads to q, k, v, c, tau), O(T) memory",
    TritonConfig)
