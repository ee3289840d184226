"""The AR-SSM scan op: the chunked (SSD) scan of the adaptive-rank SSM, y_t = C_t^T S_t with
S_t = exp(log_decay_t) S_{t-1} + B_t x_t^T. Everything of it is in this folder:

- :mod:`.reference`: :func:`ar_ssm_scan_reference` (chunked, what the model runs by default)
  and :func:`ar_ssm_scan_sequential` (the plain recurrence, the test oracle);
- :mod:`.kernel`: the Triton forward and backward, two schedules (``[kernels.ar_ssm_scan]
  schedule``: "auto", "rows" or "chunks"; imported only when selected);
- :mod:`.fla_backend`: the scan through flash-linear-attention's GLA (``[kernels] ar_ssm_scan
  = "fla"``, optional package fla-core, CUDA only; fla imported when selected);
- :mod:`.verify`: its parity rows (``phase7fw doctor --verify``);
- :func:`register`: kind ``kernel``, ``"ar_ssm_scan:triton"`` and ``"ar_ssm_scan:fla"``.

Components call :func:`ar_ssm_scan` and let kernel selection swap it.
"""

from __future__ import annotations

from typing import Literal, get_args

import attrs

from phase7fw.kernels import launch_check, lazy, precision_option, triton_kernel
from phase7fw.recipe.options import option
from phase7fw.kernels.ar_ssm_scan.reference import ar_ssm_scan_reference, ar_ssm_scan_sequential

__all__ = [
    "OP",
    "SCHEDULES",
    "TritonConfig",
    "ar_ssm_scan",
    "ar_ssm_scan_fla",
    "ar_ssm_scan_reference",
    "ar_ssm_scan_sequential",
    "ar_ssm_scan_triton",
    "register",
]

OP = "ar_ssm_scan"


#: ``[kernels.ar_ssm_scan] schedule``: "auto" picks one of the kernel's two walks, SCHEDULES
Schedule = Literal["auto", "rows", "chunks"]
SCHEDULES = get_args(Schedule)[1:]


@attrs.frozen
class TritonConfig:
    """Tuning of the Triton scan on a GPU, ``[kernels.ar_ssm_scan]`` (the interpreter uses
    16-token chunks, 32-wide tiles, 64-element scan slices, fp32). ``gpu``'s default is the
    fastest of a sweep on an H200 at (b=8, h=8, T=1024, dv=256, r=16) (benchmarks/kernels.py
    --sweep, 2026-11-28), measured with the "rows" schedule. ``schedule``: "rows" walks the
    chunks of each (batch x head) row in one program per value tile (few programs when batch x
    heads is small, as at long sequences); "chunks" gives every chunk its own programs (per-chunk
    kernels and an inter-chunk scan launched with ``scan``, not tuned yet); "auto" takes "chunks"
    where "rows" would start fewer programs than the GPU has SMs (:func:`.kernel.pick_schedule`;
    H100, 2026-12-07: "chunks" 1.3x slower with 256 programs at T=1024, 2.4-5.9x faster with 8-32
    at T=16k-32k). ``precision`` "tf32" (the default since 2026-12-08: the 1.5B step 4.7% faster
    on an H100, a 300-step loss curve within 0.12%, benchmarks/RESULTS.md) or "ieee"."""

    gpu: tuple[int, int, int, int] = option(
        (32, 64, 4, 1), check=launch_check(2),
        help="(chunk Q, dv tile, num_warps, num_stages) on a GPU (both schedules)")
    precision: Literal["ieee", "tf32"] = precision_option("tf32")
    schedule: Schedule = option(
        "auto", help='"rows": one program per (batch x head, dv tile) walks the chunks; "chunks": chunk-parallel'
        ' (more launches, a grid that grows with the sequence); "auto": "chunks" where "rows" has fewer programs'
        " than the GPU has SMs, else \"rows\"")
    scan: tuple[int, int, int] = option(
        (64, 4, 1), check=launch_check(1),
        help='(state elements per program, num_warps, num_stages) of the inter-chunk scan, schedule "chunks"')


#: The op's public function (the torch reference); components call it and ``[kernels] ar_ssm_scan``
#: may swap it for :func:`ar_ssm_scan_triton` (same signature).
ar_ssm_scan = ar_ssm_scan_reference
ar_ssm_scan_triton, _register_triton = triton_kernel(
    OP, "phase7fw.kernels.ar_ssm_scan.kernel", "ar_ssm_scan_triton",
    "chunked SSD scan, fp32 state, fwd + bwd (grads to x, B, C, log_decay)",
    TritonConfig)
_FLA = "phase7fw.kernels.ar_ssm_scan.fla_backend"
#: the scan through flash-linear-attention's chunk_simple_gla (CUDA only; fla imported on first call)
ar_ssm_scan_fla = lazy(_FLA, "ar_ssm_scan_fla")


def register(register) -> None:
    """Register the op's kernels: our Triton scan (``"ar_ssm_scan:triton"``, what "auto" picks)
    and flash-linear-attention's GLA (``"ar_ssm_scan:fla"``, optional package fla-core, checked
    when a recipe selects it)."""
    _register_triton(register)
    register("kernel", f"{OP}:fla", lazy(_FLA, "factory"),
             description="the same scan through flash-linear-attention's chunk_simple_gla (optional: pip install"
             " fla-core einops; q = C, k = B, v = x, fp32), fwd + bwd (grads to x, B, C, log_decay), CUDA only")
