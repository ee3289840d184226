"""Optional Triton implementations of the model's hot ops (see docs/kernels.md).

Each op has a torch reference inside its component and, here, a Triton implementation
registered as kind ``kernel`` under ``"<op>:triton"`` by :mod:`phase7fw.kernels.plugin`.
The recipe's ``[kernels]`` table picks one per op ("triton" | "reference" | "auto"); the
engine resolves it (:meth:`Engine._select_kernels`) and hands the map to the model factories
as the ``kernels`` context key; a component swaps its implementation with :func:`select`.
Nothing here imports Triton at import time.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["select"]


def select(context: dict, op: str, reference: Callable) -> Callable:
    """The implementation of ``op`` chosen in ``context["kernels"]``: ``reference`` unless the
    choice is "triton", in which case the registered ``"<op>:triton"`` kernel (from
    ``context["registry"]``) is returned. The choice never changes parameters or buffers, so
    checkpoints do not depend on it."""
    choice = (context.get("kernels") or {}).get(op, "reference")
    if choice != "triton":
        return reference
    registry = context.get("registry")
    if registry is None:
        from phase7fw.errors import Phase7Error

        raise Phase7Error(f"kernels.{op} = \"triton\" but the factory got no registry in its context")
    entry = registry.get("kernel", f"{op}:triton")
    return entry.factory(entry.config_cls())


def triton_usable(device_type: str) -> tuple[bool, str]:
    """Whether Triton kernels can run on ``device_type`` here, and why (one phrase)."""
    import os

    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device_type != "cuda" and not (device_type == "cpu" and interp):
        return False, f"device is {device_type}, Triton needs CUDA (or TRITON_INTERPRET=1 on the CPU)"
    from phase7fw.kernels._triton import TRITON_IMPORT_ERROR

    if TRITON_IMPORT_ERROR is not None:
        return False, f"triton cannot be imported ({TRITON_IMPORT_ERROR})"
    import triton

    where = "interpreter" if device_type == "cpu" else "CUDA"
    return True, f"triton {triton.__version__} on {where}"
