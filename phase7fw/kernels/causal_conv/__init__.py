"""The AR-SSM's causal depthwise convolution over time. Everything of it is in this folder:
:mod:`.reference` (torch's ``F.conv1d``, what the model runs by default), :mod:`.kernel` (Triton
forward and backward on the (batch, time, channels) layout, imported only when selected),
:mod:`.verify` (its parity rows) and :func:`register` (kind ``kernel``, ``"causal_conv:triton"``).
Components call :func:`causal_conv` and let kernel selection swap it.
"""

from __future__ import annotations

from phase7fw.kernels import triton_kernel
from phase7fw.kernels.causal_conv.reference import causal_conv_reference

__all__ = [
    "OP",
    "causal_conv",
    "causal_conv_reference",
    "causal_conv_triton",
    "register",
]

OP = "causal_conv"


#: The op's public function (the torch reference); components call it and ``[kernels]
#: causal_conv`` may swap it for :func:`causal_conv_triton` (same signature).
causal_conv = causal_conv_reference
causal_conv_triton, register = triton_kernel(
    OP, "phase7fw.kernels.causal_conv.kernel", "causal_conv_triton",
    "causal depthwise conv over time on (b, t, d), no transposes or padding copies, fwd + bwd")
