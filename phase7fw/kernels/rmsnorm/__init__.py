"""The RMSNorm op. Everything of it is in this folder: :mod:`.reference` (torch, what the
model runs by default), :mod:`.kernel` (fused Triton forward and backward, imported only when
selected), :mod:`.verify` (its parity rows) and :func:`register` (kind ``kernel``,
``"rmsnorm:triton"``). Components call :func:`rmsnorm` and let kernel selection swap it.
"""

from __future__ import annotations

from phase7fw.kernels import triton_kernel
from phase7fw.kernels.rmsnorm.reference import rmsnorm_reference

__all__ = [
    "OP",
    "register",
    "rmsnorm",
    "rmsnorm_reference",
    "rmsnorm_triton",
]

OP = "rmsnorm"


#: The op's public function (the torch reference); components call it and ``[kernels] rmsnorm``
#: may swap it for :func:`rmsnorm_triton` (same signature).
rmsnorm = rmsnorm_reference
rmsnorm_triton, register = triton_kernel(
    OP, "phase7fw.kernels.rmsnorm.kernel", "rmsnorm_triton",
    "fused RMSNorm, fp32 statistics, fwd + bwd (grads to x and weight)")
