"""The SwiGLU op (silu(gate) * up). Everything of it is in this folder: :mod:`.reference`
(torch, what the model runs by default), :mod:`.kernel` (fused Triton forward and backward,
imported only when selected), :mod:`.verify` (its parity rows) and :func:`register` (kind
``kernel``, ``"swiglu:triton"``). Components call :func:`swiglu` and let kernel selection swap it.
"""

from __future__ import annotations

from phase7fw.kernels import triton_kernel
from phase7fw.kernels.swiglu.reference import swiglu_reference

__all__ = [
    "OP",
    "register",
    "swiglu",
    "swiglu_reference",
    "swiglu_triton",
]

OP = "swiglu"


#: The op's public function (the torch reference); components call it and ``[kernels] swiglu``
#: may swap it for :func:`swiglu_triton` (same signature).
swiglu = swiglu_reference
swiglu_triton, register = triton_kernel(
    OP, "phase7fw.kernels.swiglu.kernel", "swiglu_triton",
    "fused silu(gate) * up, fwd + bwd recomputing silu")
