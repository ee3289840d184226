"""What every op's parity checks share (each op's ``verify.py`` uses it): the result
:class:`Row`, the numerics gate (relative error ||x - x_ref|| / ||x_ref|| <= :data:`GATE` for
outputs and gradients against a float64 reference, zero NaN/Inf), timers, and
:func:`guarded`, which turns a check that raises into one failed row naming the error.
Nothing here imports Triton before it is called.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["GATE", "Row", "gated_row", "gpu_time_ms", "guarded", "peak_extra_mib"]

GATE = 1e-2


@dataclass
class Row:
    op: str
    case: str
    ok: bool
    detail: str = ""
    errors: dict = field(default_factory=dict)
    ms: dict = field(default_factory=dict)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _finite(*ts) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def gated_row(op: str, case: str, errors: dict, outputs, ok: bool = True) -> "Row":
    """The row of a parity check: it passes when every output is finite, every error is
    within GATE and ``ok`` (a check's extra condition) holds."""
    finite = _finite(*outputs)
    return Row(op, case, finite and ok and all(e <= GATE for e in errors.values()),
               "" if finite else "NaN/Inf", errors)


def _bench(fn, device) -> float:
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def gpu_time_ms(fn, reps: int = 20) -> float:
    """GPU time of ``fn`` in ms, without the Python and launch overhead that the wall-clock
    numbers carry at small sizes (a training step hides it behind other GPU work): the GPU is
    kept busy while the CPU queues all the reps, then the reps are timed with CUDA events.
    (Not a CUDA-graph replay: capturing the checks' autograd calls left torch 2.11's CUDA RNG
    refusing later random draws.)"""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning: longer than queueing the reps takes
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def peak_extra_mib(fn, device=None) -> float:
    """Peak CUDA memory that ``fn`` allocates above what is allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def _collect(op: str, case: str, produce, *, first_call: bool = False) -> list[Row]:
    """The rows of ``produce()`` (a Row or a list of them), or one failed Row naming the
    exception: every kernel gets reported, one failure never hides the others. ``first_call``
    adds the wall time including Triton's compilation (the smoke test's number)."""
    t0 = time.perf_counter()
    try:
        got = produce()
        rows = got if isinstance(got, list) else [got]
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot run is a failed row
        rows = [Row(op, case, False, _error(exc))]
    if first_call:
        for row in rows:
            row.ms.setdefault("first_call_incl_compile", (time.perf_counter() - t0) * 1e3)
    return rows


def guarded(op: str, case: str, check, *, first_call: bool = False) -> Row:
    """``check()`` -> Row, or a failed Row naming the exception (see :func:`_collect`)."""
    return _collect(op, case, check, first_call=first_call)[0]
