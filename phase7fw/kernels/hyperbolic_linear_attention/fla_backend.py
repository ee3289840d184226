"""The hyperbolic linear attention through flash-linear-attention's ``chunk_simple_gla``
(``[kernels] hyperbolic_linear_attention = "fla"``; optional package ``fla-core``).

The op is one scalar-decay gated linear attention on its feature vectors (package docstring):
with phi_q = feature_map(q, c, query=True), phi_k = feature_map(k, c) (both D + 1 wide, fp32)
and the values extended with a column of ones, [v, 1] (Dv + 1 wide),

    o_ext = GLA(phi_q, phi_k, [v, 1], g = log_decay, scale = 1)
    out   = o_ext[..., :Dv] / max(o_ext[..., Dv], DEN_EPS)

The feature map stays in torch (fp32), where autograd takes its gradients to q, k and c;
fla's kernels give the gradients to the features, the values and the log-decays. Same
signature as :func:`.kernel.hyperbolic_linear_attention_triton` (no starting state).

fla runs its Triton kernels on a CUDA GPU only: Triton's CPU interpreter cannot run them
(its autotuner needs a GPU driver, and a kernel body fails on the interpreter's integer loop
counter; fla-core 0.6.0, Triton 3.9). So the CPU tests check :func:`gla_form` with a small
torch GLA standing in for fla's, and tests/gpu checks fla itself. Nothing here imports fla
before a recipe selects it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

from phase7fw.errors import Phase7Error
from phase7fw.kernels.hyperbolic_linear_attention.reference import DEN_EPS, feature_map

__all__ = ["INSTALL_HINT", "FlaUnavailable", "factory", "fla_status", "gla_form", "hyperbolic_linear_attention_fla",
           "load_gla"]

INSTALL_HINT = "pip install fla-core einops (or pip install 'phase7fw[fla]')"


class FlaUnavailable(Phase7Error):
    """The fla backend was selected where flash-linear-attention cannot run; ``reason``: why,
    in one phrase."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@functools.cache
def load_gla() -> Callable:
    """fla's ``chunk_simple_gla``; :class:`FlaUnavailable` with the install hint when fla
    cannot be imported (missing, or broken against this torch/Triton)."""
    try:
        # fla's import on a machine without a GPU warns that it "rolls back to CPU", which its
        # GLA kernels cannot do (the calls below refuse CPU tensors)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
            from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - missing or broken: either way it cannot run
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        raise FlaUnavailable(
            "kernels.hyperbolic_linear_attention = \"fla\" needs flash-linear-attention (the fla-core"
            f" package), which cannot be imported here ({reason}); install it with: {INSTALL_HINT},"
            " or select \"triton\", \"reference\" or \"auto\"", reason) from None
    return chunk_simple_gla


def fla_status() -> tuple[bool, str]:
    """Whether fla's GLA can be imported here, and the version or the reason (one phrase)."""
    try:
        load_gla()
    except FlaUnavailable as exc:
        return False, exc.reason
    from importlib.metadata import PackageNotFoundError, version

    try:
        return True, f"fla-core {version('fla-core')}"
    except PackageNotFoundError:  # importable from a source checkout
        return True, "fla (no package metadata)"


def gla_form(gla: Callable, q, k, v, c, log_decay=None, focus_power: float = 1.0, chunk_size: int = 64):
    """The op through ``gla``, a scalar-decay GLA called as fla's ``chunk_simple_gla``:
    ``gla(q, k, v, g, scale=, chunk_size=) -> (o, final_state)`` on (B, T, H, *) tensors, g
    (B, T, H) the natural-log decay of each token (None: no decay), o_t = sum_{s <= t}
    exp(g_{s+1} + ... + g_t) (scale q_t . k_s) v_s. Inputs and output as
    :func:`.reference.hyperbolic_linear_attention_chunked` (the features in fp32, fp64 for fp64
    inputs); the output in v's dtype."""
    B, H, T, _ = q.shape
    Dv = v.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        fq = feature_map(q, c, focus_power, query=True)  # (B, H, T, D + 1), differentiable
        fk = feature_map(k, c, focus_power)
        dt = fq.dtype
        # fla's layout is (B, T, H, *): the component's q, k, v are (B, T, H, D) views already
        vt = v.transpose(1, 2).to(dt)
        v_ext = torch.cat([vt, vt.new_ones(B, T, H, 1)], dim=-1)  # last column: the normalizer
        g = None if log_decay is None else log_decay.to(dt).transpose(1, 2).contiguous()
        o_ext, _ = gla(fq.transpose(1, 2).contiguous(), fk.transpose(1, 2).contiguous(), v_ext, g,
                       scale=1.0, chunk_size=chunk_size)
        o_ext = o_ext.transpose(1, 2)  # (B, H, T, Dv + 1)
        out = o_ext[..., :Dv] / o_ext[..., Dv:].clamp_min(DEN_EPS)
    return out.to(v.dtype)


def _cpu_refusal(what: str) -> FlaUnavailable:
    return FlaUnavailable(
        f"kernels.hyperbolic_linear_attention = \"fla\" runs flash-linear-attention's Triton kernels, which need"
        f" a CUDA GPU ({what}; Triton's CPU interpreter cannot run them); select \"reference\" or \"auto\" here")


def hyperbolic_linear_attention_fla(q, k, v, c, log_decay=None, focus_power: float = 1.0, chunk_size: int = 64):
    """Drop-in for ``hyperbolic_linear_attention_chunked`` (no starting state) on a CUDA GPU:
    q, k (B, H, T, D), v (B, H, T, Dv) in fp32/bf16/fp16, c scalar or (H,), log_decay
    (B, H, T) or None; ``chunk_size`` a power of two (fla's chunk). Returns o in v's dtype."""
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        raise ValueError("the fla hyperbolic linear attention takes fp32/bf16/fp16 inputs, not fp64")
    if q.device.type != "cuda":
        raise _cpu_refusal(f"got a {q.device.type} tensor")
    return gla_form(load_gla(), q, k, v, c, log_decay, focus_power, chunk_size)


def factory(config, **context):
    """The ``"hyperbolic_linear_attention:fla"`` kernel: checks, when a recipe selects it and
    before any step runs, that fla imports (one clear error with the install hint otherwise)
    and that this machine has a CUDA GPU (a run on the CPU of a GPU machine is refused at its
    first call)."""
    load_gla()
    if not torch.cuda.is_available():
        raise _cpu_refusal("this machine has none")
    return hyperbolic_linear_attention_fla
