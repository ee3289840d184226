"""The linear cross-entropy op: the LM head and its loss, mean over non-ignored targets.
Everything of it is in this folder:

- :mod:`.reference`: :func:`linear_cross_entropy` (full logits, or checkpointed chunks of
  ``chunk_tokens`` with :func:`chunked_cross_entropy`: ``train.ce_chunk_tokens``);
- :mod:`.kernel`: the fused chunked Triton kernel, gradients made in the forward (imported
  only when selected);
- :mod:`.verify`: its parity rows (``phase7fw doctor --verify``);
- :func:`register`: kind ``kernel``, ``"cross_entropy:triton"``.

Models call :func:`linear_cross_entropy` (``LanguageModel.cross_entropy``) and let kernel
selection swap it.
"""

from __future__ import annotations

import attrs

from phase7fw.kernels import triton_kernel
from phase7fw.kernels.cross_entropy.reference import chunked_cross_entropy, linear_cross_entropy
from phase7fw.recipe.options import option, positive

__all__ = [
    "OP",
    "TritonConfig",
    "chunked_cross_entropy",
    "linear_cross_entropy",
    "linear_cross_entropy_triton",
    "register",
]

OP = "cross_entropy"


@attrs.frozen
class TritonConfig:
    """Tuning of the fused kernel, ``[kernels.cross_entropy]``."""

    chunk_mib: int = option(256, check=positive, help="logits of one chunk, in MiB, when train.ce_chunk_tokens is 0"
                                                      " (the chunk is the largest multiple of 256 tokens that fits)")
linear_cross_entropy_triton, register = triton_kernel(
    OP, "phase7fw.kernels.cross_entropy.kernel", "linear_cross_entropy_triton",
    "chunked linear cross-entropy: logits one chunk at a time, grads computed in forward",
    TritonConfig)
