"""The AR-SSM scan through flash-linear-attention's ``chunk_simple_gla`` (``[kernels]
ar_ssm_scan = "fla"``; optional package ``fla-core``).

The scan is a scalar-decay gated linear attention (GLA), Mamba-2's SSD duality: with G_t the
running sum of the log-decays,

    y_t = C_t^T S_t = sum_{s <= t} exp(G_t - G_s) (C_t . B_s) x_s

which is fla's GLA with query C, key B, value x, log-decay g = log_decay and scale 1, in its
(b, t, h, *) layout. One call; fla's kernels give the gradients to x, B, C and the decays.
Inputs go to fla in fp32 (fla keeps the per-chunk states it stores for the backward in its
inputs' dtype; ours are fp32 like the reference's), the output comes back in x's dtype. fla
walks 64-token chunks whatever the model's ``chunk_size`` (the result does not depend on it,
as with our Triton kernel).

fla runs on a CUDA GPU only (:mod:`phase7fw.kernels._fla`), so the CPU tests check
:func:`scan_gla_form` with a small torch GLA standing in for fla's, and tests/gpu checks fla
itself. Nothing here imports fla before a recipe selects it.
"""

from __future__ import annotations

from typing import Callable

import torch

from phase7fw.kernels import _fla
from phase7fw.kernels.ar_ssm_scan.reference import _check_scan_shapes

__all__ = ["FLA_CHUNK", "ar_ssm_scan_fla", "factory", "load_gla", "scan_gla_form"]

OP = "ar_ssm_scan"
#: fla's chunk length (its default; a power of two, as fla requires)
FLA_CHUNK = 64


def load_gla() -> Callable:
    """fla's ``chunk_simple_gla`` (:func:`phase7fw.kernels._fla.load_gla`: one clear error
    naming this op's recipe key where fla cannot be imported)."""
    return _fla.load_gla(OP)


def scan_gla_form(gla: Callable, x, B, C, log_decay):
    """The scan through ``gla``, called as fla's ``chunk_simple_gla`` (``gla(q, k, v, g, scale=,
    chunk_size=) -> (o, final_state)`` on (b, t, h, *) tensors, g the natural-log decays):
    shapes and result as :func:`.reference.ar_ssm_scan_reference` (computed in fp32, fp64 for
    fp64 inputs; y in x's dtype)."""
    _check_scan_shapes(x, B, C, log_decay)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        q, k, v = (t.to(dt).transpose(1, 2).contiguous() for t in (C, B, x))
        g = log_decay.to(dt).transpose(1, 2).contiguous()
        y, _ = gla(q, k, v, g, scale=1.0, chunk_size=FLA_CHUNK)
    return y.transpose(1, 2).to(x.dtype)


def ar_ssm_scan_fla(x, B, C, log_decay, chunk_size: int = 64):
    """Drop-in for ``ar_ssm_scan_reference`` on a CUDA GPU: x (b, h, T, dv), B and C (b, h, T,
    r), log_decay (b, h, T), fp32/bf16/fp16. ``chunk_size`` is accepted for the signature (fla
    uses :data:`FLA_CHUNK`). Returns y in x's dtype."""
    _fla.check_inputs(OP, x, B, C, gate=log_decay)
    return scan_gla_form(load_gla(), x, B, C, log_decay)


#: The ``"ar_ssm_scan:fla"`` kernel: checks, when a recipe selects it, that fla imports and
#: that this machine has a CUDA GPU (:func:`phase7fw.kernels._fla.factory`).
factory = _fla.factory(OP, ar_ssm_scan_fla)
