"""The AR-SSM scan op: the chunked (SSD) scan of the adaptive-rank SSM, y_t = C_t^T S_t with
S_t = exp(log_decay_t) S_{t-1} + B_t x_t^T. Everything of it is in this folder:

- :mod:`.reference`: :func:`ar_ssm_scan_reference` (chunked, what the model runs by default)
  and :func:`ar_ssm_scan_sequential` (the plain recurrence, the test oracle);
- :mod:`.kernel`: the Triton forward and backward (imported only when selected);
- :mod:`.verify`: its parity rows (``phase7fw doctor --verify``);
- :func:`register`: kind ``kernel``, ``"ar_ssm_scan:triton"``.

Components call :func:`ar_ssm_scan` and let kernel selection swap it.
"""

from __future__ import annotations

from typing import Literal

import attrs

from phase7fw.kernels import launch_check, precision_option, triton_kernel
from phase7fw.recipe.options import option
from phase7fw.kernels.ar_ssm_scan.reference import ar_ssm_scan_reference, ar_ssm_scan_sequential

__all__ = [
    "OP",
    "TritonConfig",
    "ar_ssm_scan",
    "ar_ssm_scan_reference",
    "ar_ssm_scan_sequential",
    "ar_ssm_scan_triton",
    "register",
]

OP = "ar_ssm_scan"


@attrs.frozen
class TritonConfig:
    """Tuning of the Triton scan on a GPU, ``[kernels.ar_ssm_scan]`` (the interpreter uses
    16-token chunks, 32-wide tiles, fp32). The default is the fastest of a sweep on an H200 at
    (b=8, h=8, T=1024, dv=256, r=16) (benchmarks/kernels.py --sweep, 2026-11-28)."""

    gpu: tuple[int, int, int, int] = option(
        (32, 64, 4, 1), check=launch_check(2), help="(chunk Q, dv tile, num_warps, num_stages) on a GPU")
    precision: Literal["ieee", "tf32"] = precision_option("ieee")


#: The op's public function (the torch reference); components call it and ``[kernels] ar_ssm_scan``
#: may swap it for :func:`ar_ssm_scan_triton` (same signature).
ar_ssm_scan = ar_ssm_scan_reference
ar_ssm_scan_triton, register = triton_kernel(
    OP, "phase7fw.kernels.ar_ssm_scan.kernel", "ar_ssm_scan_triton",
    "chunked SSD scan, fp32 state, fwd + bwd (grads to x, B, C, log_decay)",
    TritonConfig)
