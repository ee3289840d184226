"""Kernel checks behind ``phase7fw doctor`` (smoke test) and ``phase7fw doctor --verify``.

``smoke(device)``: every op's kernel compiles and runs forward + backward on a tiny input.
``verify(device)``: every op's kernel against its torch reference evaluated in float64 on the
same (bf16-rounded) fresh random inputs, forward and every gradient, at real shapes, with the
numerics gate of :mod:`phase7fw.kernels.checks` (and, for the hyperbolic attention, the
distance gate: p99 relative error <= 1e-2 for points up to radius 0.999/sqrt(c)). Each op's
cases live in its own folder (``phase7fw/kernels/<op>/verify.py``: ``smoke_rows(device)`` and
``verify_cases(device, quick)``); timings of the kernel (and of SDPA or the torch reference at
the same shape) are reported next to each row. Nothing here imports Triton before it is called.
"""

from __future__ import annotations

import importlib

import torch

from phase7fw.kernels.checks import GATE, Row, _collect, gated_row  # noqa: F401 - Row, GATE, gated_row: the API

__all__ = ["GATE", "ORDER", "OPS", "Row", "format_table", "gated_row", "smoke", "verify"]

#: The built-in ops, in the order ``smoke`` reports them.
OPS = ("hyperbolic_attention", "ar_ssm_scan", "rmsnorm", "swiglu", "cross_entropy", "htt_embedding",
       "hyperbolic_linear_attention", "causal_conv")

#: ``verify``'s cases in a fixed order, (op, the op's case number): tests/gpu runs them one by
#: one by index (0-2 attention full / window / odd T, 3 the distance gate, 4-5 the SSM, 6-10
#: RMSNorm, SwiGLU, cross-entropy, HTT, linear attention, each possibly several rows, 11-12
#: attention with the squared_distance and dot_distance scores, 13 the SSM at long sequences
#: with batch 1, 14 the SSM's causal convolution). Every SSM case gives a row per ``[kernels.ar_ssm_scan] schedule``.
ORDER = [("hyperbolic_attention", 0), ("hyperbolic_attention", 1), ("hyperbolic_attention", 2),
         ("hyperbolic_attention", 3), ("ar_ssm_scan", 0), ("ar_ssm_scan", 1), ("rmsnorm", 0), ("swiglu", 0),
         ("cross_entropy", 0), ("htt_embedding", 0), ("hyperbolic_linear_attention", 0),
         ("hyperbolic_attention", 4), ("hyperbolic_attention", 5), ("ar_ssm_scan", 2),
         ("causal_conv", 0)]


def _module(op: str):
    """The op's checks (``phase7fw/kernels/<op>/verify.py``), imported when needed."""
    return importlib.import_module(f"phase7fw.kernels.{op}.verify")


def smoke(device: torch.device) -> list[Row]:
    """Compile and run each op's kernel on a tiny input, forward and backward."""
    rows = []
    for op in OPS:
        rows += _collect(op, "tiny", lambda op=op: _module(op).smoke_rows(device), first_call=True)
    return rows


def verify(device: torch.device, quick: bool = False, only: list[int] | None = None) -> list[Row]:
    """Every op's kernel against its fp64 reference at real shapes in bf16, with timings."""
    rows = []
    for i, (op, n) in enumerate(ORDER):
        if only is not None and i not in only:
            continue
        rows += _collect(op, "?", lambda op=op, n=n: _module(op).verify_cases(device, quick)[n]())
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(rows: list[Row]) -> str:
    lines = ["| op | case | result | errors (rel. to fp64) | ms |", "|---|---|---|---|---|"]
    for r in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r.errors.items())
        ms = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.ms.items())
        lines.append(f"| {r.op} | {r.case} | {'PASS' if r.ok else 'FAIL'} {r.detail} | {errs} | {ms} |")
    return "\n".join(lines)
