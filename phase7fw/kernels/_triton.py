"""Guarded Triton import shared by the kernel modules.

Kernel modules do ``from phase7fw.kernels._triton import triton, tl, TRITON_IMPORT_ERROR``.
When Triton is missing or broken, ``triton.jit`` is an identity decorator and ``tl.constexpr``
a placeholder, so the module still imports (on a CPU machine, without Triton); launching a
kernel then raises :class:`TritonUnavailable` with the reason (see :func:`require`).

``TRITON_INTERPRET=1`` must be set before this module is first imported for the kernels to
run in Triton's CPU interpreter (fp32 only is faithful there).
"""

from __future__ import annotations

import os

from phase7fw.errors import Phase7Error

__all__ = ["TRITON_IMPORT_ERROR", "TritonUnavailable", "interpreting", "require", "tl", "triton"]


class TritonUnavailable(Phase7Error):
    """A Triton kernel was asked for where Triton cannot run."""


class _Placeholder:
    """Stands in for ``triton`` / ``triton.language`` when Triton cannot be imported."""

    constexpr = object

    @staticmethod
    def jit(fn=None, **kwargs):
        return fn if fn is not None else (lambda f: f)

    def __getattr__(self, name):
        raise TritonUnavailable(f"triton is not usable here ({TRITON_IMPORT_ERROR}); cannot use triton.{name}")


TRITON_IMPORT_ERROR: str | None = None
try:  # noqa: SIM105 - any failure (missing, broken CUDA libs, version clash) is reported later
    import triton  # type: ignore[no-redef]
    import triton.language as tl  # type: ignore[no-redef]
except Exception as exc:  # noqa: BLE001
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0]
    triton = _Placeholder()  # type: ignore[assignment]
    tl = _Placeholder()  # type: ignore[assignment]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def require(*tensors) -> None:
    """Raise :class:`TritonUnavailable` unless Triton can launch kernels on these tensors:
    CUDA tensors with a working Triton, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if TRITON_IMPORT_ERROR is not None:
        raise TritonUnavailable(f"Triton kernel requested but triton cannot be imported: {TRITON_IMPORT_ERROR}")
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise TritonUnavailable(
            f"Triton kernel requested for a {t.device.type} tensor: Triton runs on CUDA GPUs (or on the CPU"
            " only in its interpreter, TRITON_INTERPRET=1 set before triton is imported); select the"
            " \"reference\" implementation instead"
        )
