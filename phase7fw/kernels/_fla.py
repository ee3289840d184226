"""What the ops' flash-linear-attention backends share (``[kernels] <op> = "fla"``; optional
package ``fla-core``): importing fla's ``chunk_simple_gla`` (a scalar-decay gated linear
attention, GLA), the one error a recipe gets where it cannot run, and the checks of its
inputs. Used by :mod:`phase7fw.kernels.hyperbolic_linear_attention.fla_backend` and
:mod:`phase7fw.kernels.ar_ssm_scan.fla_backend`. Nothing here imports fla before a recipe
selects it.

fla runs its Triton kernels on a CUDA GPU only: Triton's CPU interpreter cannot run them (its
autotuner needs a GPU driver, and a kernel body fails on the interpreter's integer loop
counter; fla-core 0.6.0, Triton 3.9).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable

import torch

from phase7fw.errors import Phase7Error

__all__ = ["INSTALL_HINT", "FlaUnavailable", "check_inputs", "factory", "fla_status", "gated_backward_refusal",
           "import_gla", "left_out_note", "load_gla", "with_fla"]

INSTALL_HINT = "pip install fla-core einops (or pip install 'phase7fw[fla]')"


class FlaUnavailable(Phase7Error):
    """An fla backend was selected where flash-linear-attention cannot run; ``reason``: why,
    in one phrase."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


@functools.cache
def import_gla() -> Callable:
    """fla's ``chunk_simple_gla``, imported once; :class:`FlaUnavailable` (its ``reason``: the
    import's error in one phrase) when fla is missing or broken against this torch/Triton."""
    try:
        # fla's import on a machine without a GPU warns that it "rolls back to CPU", which its
        # GLA kernels cannot do (the backends refuse CPU tensors)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
            from fla.ops.simple_gla import chunk_simple_gla
    except Exception as exc:  # noqa: BLE001 - missing or broken: either way it cannot run
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        raise FlaUnavailable(reason, reason) from None
    return chunk_simple_gla


def load_gla(op: str) -> Callable:
    """fla's ``chunk_simple_gla`` for ``[kernels] op = "fla"``; where it cannot be imported, one
    :class:`FlaUnavailable` naming the recipe key, the reason and the install hint."""
    try:
        return import_gla()
    except FlaUnavailable as exc:
        raise FlaUnavailable(
            f"kernels.{op} = \"fla\" needs flash-linear-attention (the fla-core package), which cannot be"
            f" imported here ({exc.reason}); install it with: {INSTALL_HINT}, or select \"triton\","
            " \"reference\" or \"auto\"", exc.reason) from None


def fla_status() -> tuple[bool, str]:
    """Whether fla's GLA can be imported here, and the version or the reason (one phrase)."""
    try:
        import_gla()
    except FlaUnavailable as exc:
        return False, exc.reason
    from importlib.metadata import PackageNotFoundError, version

    try:
        return True, f"fla-core {version('fla-core')}"
    except PackageNotFoundError:  # importable from a source checkout
        return True, "fla (no package metadata)"


def left_out_note() -> str | None:
    """None where fla's GLA imports; else the note that a verification table puts in its first
    row when it leaves the fla rows out (the reason and the install hint)."""
    ok, why = fla_status()
    return None if ok else f"rows left out: fla cannot be imported ({why}); {INSTALL_HINT}"


def with_fla(impls: dict, device: torch.device, fla_impl: Callable) -> tuple[dict, str | None]:
    """A verification table's implementations on ``device``: ``impls`` (ours), and ``fla_impl``
    as "fla" on a GPU where fla imports; with the note for the table when fla is left out.
    On the CPU ``impls`` alone and no note: fla runs on CUDA only (not in Triton's interpreter)."""
    if device.type != "cuda":
        return impls, None
    note = left_out_note()
    if note is None:
        impls["fla"] = fla_impl
    return impls, note


def _cpu_refusal(op: str, what: str) -> FlaUnavailable:
    return FlaUnavailable(
        f"kernels.{op} = \"fla\" runs flash-linear-attention's Triton kernels, which need a CUDA GPU"
        f" ({what}; Triton's CPU interpreter cannot run them); select \"reference\" or \"auto\" here")


def gated_backward_refusal() -> str | None:
    """Why fla refuses the backward of its gated (decayed) kernels on this GPU, or None. fla-core
    guards Hopper GPUs under Triton >= 3.4 and < 3.7.1, whose code for that backward gives wrong
    gradients there (fla's issue #640), unless tilelang is installed; the condition is read from
    fla's own flags (an fla without them has no such guard)."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return None
    if not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1):
        return None
    if importlib.util.find_spec("tilelang") is not None:
        return None  # fla takes its tilelang kernel for that backward
    import triton

    return (f"fla-core refuses the backward of its decayed kernels on Hopper GPUs with Triton {triton.__version__}"
            " (>= 3.4 and < 3.7.1 give wrong gradients there, fla's issue #640)")


def check_inputs(op: str, *tensors: torch.Tensor, gate: torch.Tensor | None = None) -> None:
    """fla's kernels take fp32/bf16/fp16 tensors on a CUDA device: a ValueError for fp64, one
    :class:`FlaUnavailable` where fla would refuse the backward of a decayed call (``gate``
    given, gradients wanted: :func:`gated_backward_refusal`), one for a tensor on another device."""
    if any(t.dtype == torch.float64 for t in tensors):
        raise ValueError(f"the fla {op.replace('_', ' ')} takes fp32/bf16/fp16 inputs, not fp64")
    gated = () if gate is None else (gate,)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *gated))
    if gated and wants_grad and (reason := gated_backward_refusal()):
        # refused here, before the forward, rather than by fla in the middle of a backward
        raise FlaUnavailable(
            f"kernels.{op} = \"fla\" cannot train here: {reason}; upgrade Triton to >= 3.7.1 or install"
            " tilelang (pip install tilelang), or select \"triton\" or \"auto\"", reason)
    device = tensors[0].device
    if device.type != "cuda":
        raise _cpu_refusal(op, f"got a {device.type} tensor")


def factory(op: str, implementation: Callable) -> Callable:
    """The ``"<op>:fla"`` kernel factory returning ``implementation``: it checks, when a recipe
    selects the backend and before any step runs, that fla imports (one clear error with the
    install hint otherwise) and that this machine has a CUDA GPU (a run on the CPU of a GPU
    machine is refused at its first call)."""

    def make(config, **context):
        load_gla(op)
        if not torch.cuda.is_available():
            raise _cpu_refusal(op, "this machine has none")
        return implementation

    return make
