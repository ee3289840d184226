"""Registers the Triton kernels as components of kind ``kernel``, named ``"<op>:triton"``.

A kernel factory is called as ``factory(config)`` and returns the implementation: a callable
with the same signature as the op's torch reference (``hyperbolic_attention_reference``,
``ar_ssm_scan_reference``, ...). The kernel modules are imported only when a factory runs, so
loading this plugin never imports Triton.
"""

from __future__ import annotations

import importlib

from phase7fw.hookspecs import hookimpl


def _lazy(module: str, attr: str):
    """A kernel factory that imports ``phase7fw.kernels.<module>`` (and Triton) only when called."""

    def factory(config, **context):
        return getattr(importlib.import_module(f"phase7fw.kernels.{module}"), attr)

    return factory


#: (op, module, implementation, description) of every kernel this plugin provides.
KERNELS = [
    ("hyperbolic_attention", "hyperbolic_attention", "hyperbolic_attention_triton",
     "fused causal sliding-window Poincare attention, fwd + bwd (grads to q, k, v, c, tau), O(T) memory"),
    ("ar_ssm_scan", "ar_ssm_scan", "ar_ssm_scan_triton",
     "chunked SSD scan, fp32 state, fwd + bwd (grads to x, B, C, log_decay)"),
    ("htt_embedding", "htt_embedding", "htt_embedding_triton",
     "fused tensor-train gather-and-contract, fwd + bwd (atomic adds into the cores), 2 or 3 cores"),
    ("rmsnorm", "rmsnorm", "rmsnorm_triton", "fused RMSNorm, fp32 statistics, fwd + bwd (grads to x and weight)"),
    ("swiglu", "swiglu", "swiglu_triton", "fused silu(gate) * up, fwd + bwd recomputing silu"),
    ("cross_entropy", "linear_cross_entropy", "linear_cross_entropy_triton",
     "chunked linear cross-entropy: logits one chunk at a time, grads computed in forward"),
    ("hyperbolic_linear_attention", "hyperbolic_linear_attention.kernel", "hyperbolic_linear_attention_triton",
     "chunked O(T) hyperbolic (Lorentz feature map) linear attention, fp32 state, fwd + bwd"
     " (grads to q, k, v, c, decay)"),
]


@hookimpl
def register_components(register):
    for op, module, attr, description in KERNELS:
        register("kernel", f"{op}:triton", _lazy(module, attr), description=description)
