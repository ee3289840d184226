"""The hyperbolic linear attention through flash-linear-attention's ``chunk_simple_gla``
(``[kernels] hyperbolic_linear_attention = "fla"``; optional package ``fla-core``).

The op is a scalar-decay gated linear attention (GLA) on its feature vectors (package
docstring): phi_q = (1, kappa_q) (query=True) and phi_k = (cosh 2b, space part) from
feature_parts (time-like column, space-like part), fp32. fla's tiles are powers of two, so
D + 1 = 129 features and Dv + 1 = 129 value columns (the normalizer's column of ones) would
fill a last tile with one column; instead the pair weight is split, phi_q . phi_k = cosh 2b_s + kappa_q . space_s:

    pair = GLA(kappa_q, space_k, v)                           D wide, Dv values
    sums = GLA(e_1, e_1, [cosh 2b v, cosh 2b, space_k])       the running sums (decayed)
    out  = (pair + sums[:Dv]) / max(sums[Dv] + kappa_q . sums[Dv+1:], DEN_EPS)

The first term does not depend on the query, so it (and the normalizer) is a decayed running
sum, which the same GLA takes with a one-hot query and key of :data:`SUMS_WIDTH` columns
(the narrowest tensor-core tile). Not timed on a GPU yet, in this form or in the single
D + 1 wide call it replaced (docs/kernels.md).

The feature map stays in torch (fp32), where autograd takes its gradients to q, k and c;
fla's kernels give the gradients to the features, the values and the log-decays. Same
signature as :func:`.kernel.hyperbolic_linear_attention_triton` (no starting state).

fla runs on a CUDA GPU only (:mod:`phase7fw.kernels._fla`), so the CPU tests check
:func:`gla_form` with a small torch GLA standing in for fla's, and tests/gpu checks fla
itself. Nothing here imports fla before a recipe selects it.
"""

from __future__ import annotations

from typing import Callable

import torch

from phase7fw.kernels import _fla
from phase7fw.kernels._fla import INSTALL_HINT, FlaUnavailable, fla_status
from phase7fw.kernels.hyperbolic_linear_attention.reference import DEN_EPS, feature_parts

__all__ = ["INSTALL_HINT", "SUMS_WIDTH", "FlaUnavailable", "factory", "fla_status", "gla_form",
           "hyperbolic_linear_attention_fla", "load_gla"]

OP = "hyperbolic_linear_attention"
#: width of the one-hot query and key of the running-sums GLA call
SUMS_WIDTH = 16


def load_gla() -> Callable:
    """fla's ``chunk_simple_gla`` (:func:`phase7fw.kernels._fla.load_gla`: one clear error
    naming this op's recipe key where fla cannot be imported)."""
    return _fla.load_gla(OP)


def gla_form(gla: Callable, q, k, v, c, log_decay=None, focus_power: float = 1.0, chunk_size: int = 64):
    """The op through ``gla``, a scalar-decay GLA called as fla's ``chunk_simple_gla``:
    ``gla(q, k, v, g, scale=, chunk_size=) -> (o, final_state)`` on (B, T, H, *) tensors, g
    (B, T, H) the natural-log decay of each token (None: no decay), o_t = sum_{s <= t}
    exp(g_{s+1} + ... + g_t) (scale q_t . k_s) v_s. Inputs and output as
    :func:`.reference.hyperbolic_linear_attention_chunked` (the features in fp32, fp64 for fp64
    inputs); the output in v's dtype. Two GLA calls (module docstring): the D-wide one on
    (kappa_q, the keys' space part, v), and the running sums on a one-hot query and key."""
    B, H, T, _ = q.shape
    Dv = v.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        _, kappa = feature_parts(q, c, focus_power, query=True)  # (1, kappa_q): differentiable, fp32
        k_time, k_space = feature_parts(k, c, focus_power)  # (cosh 2b, space part)
        k_time = k_time.unsqueeze(-1)
        dt = kappa.dtype
        vt = v.to(dt)
        g = None if log_decay is None else log_decay.to(dt).transpose(1, 2).contiguous()

        def run(qq, kk, vv):  # fla's layout is (B, T, H, *)
            o, _ = gla(*(x.transpose(1, 2).contiguous() for x in (qq, kk, vv)), g, scale=1.0, chunk_size=chunk_size)
            return o.transpose(1, 2)

        pair = run(kappa, k_space, vt)  # sum Lambda (kappa_q . space_s) v_s: (B, H, T, Dv)
        one = torch.zeros(SUMS_WIDTH, dtype=dt, device=q.device)
        one[0] = 1.0
        one = one.expand(B, H, T, SUMS_WIDTH)  # materialized once, in fla's layout, by run()
        # sum Lambda x_s for x = [cosh 2b_s v_s, cosh 2b_s, space_s]: (B, H, T, Dv + 1 + D)
        sums = run(one, one, torch.cat([k_time * vt, k_time, k_space], dim=-1))
        num = pair + sums[..., :Dv]
        den = sums[..., Dv] + (kappa * sums[..., Dv + 1 :]).sum(-1)
        out = num / den.clamp_min(DEN_EPS)[..., None]
    return out.to(v.dtype)


def hyperbolic_linear_attention_fla(q, k, v, c, log_decay=None, focus_power: float = 1.0, chunk_size: int = 64):
    """Drop-in for ``hyperbolic_linear_attention_chunked`` (no starting state) on a CUDA GPU:
    q, k (B, H, T, D), v (B, H, T, Dv) in fp32/bf16/fp16, c scalar or (H,), log_decay
    (B, H, T) or None; ``chunk_size`` a power of two (fla's chunk). Returns o in v's dtype."""
    _fla.check_inputs(OP, q, k, v, gate=log_decay)
    return gla_form(load_gla(), q, k, v, c, log_decay, focus_power, chunk_size)


#: The ``"hyperbolic_linear_attention:fla"`` kernel: checks, when a recipe selects it, that fla
#: imports and that this machine has a CUDA GPU (:func:`phase7fw.kernels._fla.factory`).
factory = _fla.factory(OP, hyperbolic_linear_attention_fla)
