"""The HTT embedding op: rows of a tensor-train factorized table, gathered per token.
Everything of it is in this folder:

- :mod:`.reference`: :func:`htt_embedding_reference` (what the model runs by default), the
  table layout (:func:`balanced_factors`) and :func:`htt_full_table`;
- :mod:`.kernel`: the fused Triton gather-and-contract, forward and backward (imported only
  when selected);
- :mod:`.verify`: its parity rows (``phase7fw doctor --verify``);
- :func:`register`: kind ``kernel``, ``"htt_embedding:triton"``.

Components call :func:`htt_embedding` and let kernel selection swap it.
"""

from __future__ import annotations

from phase7fw.kernels import triton_kernel
from phase7fw.kernels.htt_embedding.reference import balanced_factors, htt_embedding_reference, htt_full_table

__all__ = [
    "OP",
    "balanced_factors",
    "htt_embedding",
    "htt_embedding_reference",
    "htt_embedding_triton",
    "htt_full_table",
    "register",
]

OP = "htt_embedding"


#: The op's public function (the torch reference); components call it and ``[kernels] htt_embedding``
#: may swap it for :func:`htt_embedding_triton` (same signature).
htt_embedding = htt_embedding_reference
htt_embedding_triton, register = triton_kernel(
    OP, "phase7fw.kernels.htt_embedding.kernel", "htt_embedding_triton",
    "fused tensor-train gather-and-contract, fwd + bwd (atomic adds into the cores), 2 or 3 cores")
