"""The built-in kernels plugin: registers every built-in op's Triton implementation (kind
``kernel``, ``"<op>:triton"``) through the op's own ``register`` function
(``phase7fw/kernels/<op>/__init__.py``). A kernel factory is called as ``factory(config)`` and
returns the implementation: a callable with the same signature as the op's public function.
The kernel modules are imported only when a factory runs, so loading this plugin never
imports Triton.
"""

from __future__ import annotations

from phase7fw.hookspecs import hookimpl
from phase7fw.kernels import ar_ssm_scan, cross_entropy, htt_embedding, hyperbolic_attention, hyperbolic_linear_attention
from phase7fw.kernels import causal_conv, rmsnorm, swiglu

#: The built-in ops (their folders), in registration order.
OPS = (hyperbolic_attention, ar_ssm_scan, htt_embedding, rmsnorm, swiglu, cross_entropy, hyperbolic_linear_attention,
       causal_conv)


@hookimpl
def register_components(register):
    for op in OPS:
        op.register(register)
