"""Registers the Triton kernels as components of kind ``kernel``, named ``"<op>:triton"``.

A kernel factory is called as ``factory(config)`` and returns the implementation: a callable
with the same signature as the op's torch reference (``hyperbolic_attention_reference``,
``ar_ssm_scan_reference``, ...). The kernel modules are imported only when a factory runs, so
loading this plugin never imports Triton.
"""

from __future__ import annotations

from phase7fw.hookspecs import hookimpl


def _hyperbolic_attention(config, **context):
    from phase7fw.kernels.hyperbolic_attention import hyperbolic_attention_triton

    return hyperbolic_attention_triton


def _ar_ssm_scan(config, **context):
    from phase7fw.kernels.ar_ssm_scan import ar_ssm_scan_triton

    return ar_ssm_scan_triton


def _htt_embedding(config, **context):
    from phase7fw.kernels.htt_embedding import htt_embedding_triton

    return htt_embedding_triton


def _rmsnorm(config, **context):
    from phase7fw.kernels.rmsnorm import rmsnorm_triton

    return rmsnorm_triton


def _swiglu(config, **context):
    from phase7fw.kernels.swiglu import swiglu_triton

    return swiglu_triton


def _cross_entropy(config, **context):
    from phase7fw.kernels.linear_cross_entropy import linear_cross_entropy_triton

    return linear_cross_entropy_triton


#: (op, factory, description) of every kernel this plugin provides.
KERNELS = [
    ("hyperbolic_attention", _hyperbolic_attention,
     "fused causal sliding-window Poincare attention, fwd + bwd (grads to q, k, v, c, tau), O(T) memory"),
    ("ar_ssm_scan", _ar_ssm_scan,
     "chunked SSD scan, fp32 state, fwd + bwd (grads to x, B, C, log_decay)"),
    ("htt_embedding", _htt_embedding,
     "fused tensor-train gather-and-contract, fwd + bwd (atomic adds into the cores), 2 or 3 cores"),
    ("rmsnorm", _rmsnorm, "fused RMSNorm, fp32 statistics, fwd + bwd (grads to x and weight)"),
    ("swiglu", _swiglu, "fused silu(gate) * up, fwd + bwd recomputing silu"),
    ("cross_entropy", _cross_entropy,
     "chunked linear cross-entropy: logits one chunk at a time, grads computed in forward"),
]


@hookimpl
def register_components(register):
    for op, factory, description in KERNELS:
        register("kernel", f"{op}:triton", factory, description=description)
