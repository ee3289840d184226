"""The model's hot ops, one folder each (see docs/kernels.md, docs/architecture.md).

``phase7fw/kernels/<op>/`` holds everything of an op: its torch reference (``reference.py``,
what the model runs by default), its Triton implementation (``kernel.py``), its parity checks
(``verify.py``, run by ``phase7fw doctor``) and, in ``__init__.py``, its public function and
its registration as kind ``kernel`` under ``"<op>:triton"`` (done by the built-in plugin
:mod:`phase7fw.kernels.plugin`; a third-party plugin registers its own ops the same way).
The recipe's ``[kernels]`` table picks one implementation per registered op ("triton" |
"reference" | "auto"); the engine resolves it (:meth:`Engine._select_kernels`) and hands the
map to the model factories as the ``kernels`` context key; a component calls the op's public
function, swapped with :func:`select`. No kernel module imports a component, and nothing
here imports Triton at import time.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import attrs

from phase7fw.recipe.options import option

__all__ = ["KernelImpl", "launch_check", "lazy", "precision_option", "select", "triton_factory", "triton_kernel", "triton_usable"]


def lazy(module: str, attr: str) -> Callable:
    """A function that calls ``module.attr``, importing ``module`` (and Triton) on its first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr
    call.__doc__ = f"``{module}.{attr}`` (imported on first use)."
    return call


def triton_factory(module: str, attr: str) -> Callable:
    """A ``kernel`` factory returning ``module.attr``: the module (and Triton) is imported only
    when a recipe selects the kernel, so registering it costs nothing. A config with tuning
    fields (``[kernels.<op>]``) is bound as the implementation's ``tuning`` argument."""

    def factory(config, **context):
        impl = getattr(importlib.import_module(module), attr)
        if config is None or not attrs.has(type(config)) or not attrs.fields(type(config)):
            return impl
        return functools.update_wrapper(functools.partial(impl, tuning=config), impl)

    return factory


def triton_kernel(op: str, module: str, attr: str, description: str, config_cls: type | None = None):
    """What an op's folder needs for its Triton implementation ``module.attr``: the function
    (importing the module and Triton on its first call) and the op's ``register(register)``,
    which registers it as kind ``kernel``, ``"<op>:triton"``, with its tuning options
    ``config_cls`` (``[kernels.<op>]``)."""

    def register(register) -> None:
        register("kernel", f"{op}:triton", triton_factory(module, attr), config_cls, description=description)

    register.__doc__ = f"Register the ``{op}`` op's Triton implementation (kind ``kernel``, ``\"{op}:triton\"``)."
    return lazy(module, attr), register


def precision_option(default: str):
    """The ``precision`` tuning option of a kernel whose dot products may use tensor cores:
    "ieee" (fp32 FMA) or "tf32" (faster, ~1e-3 relative)."""
    return option(default, help='dot products: "ieee" (fp32 FMA) or "tf32" (tensor cores, faster, ~1e-3 relative)')


def launch_check(n_blocks: int) -> Callable:
    """Range check of a launch configuration ``(block, ..., num_warps, num_stages)`` with
    ``n_blocks`` block sizes (powers of two >= 16, as ``tl.dot`` needs), 1 to 16 warps (a
    power of two) and at least one stage."""

    def check(value) -> str | None:
        blocks, (warps, stages) = value[:n_blocks], value[n_blocks:]
        if any(b < 16 or b & (b - 1) for b in blocks):
            return f"block sizes must be powers of two >= 16, got {list(blocks)}"
        if warps not in (1, 2, 4, 8, 16):
            return f"num_warps must be 1, 2, 4, 8 or 16, got {warps}"
        if stages < 1:
            return f"num_stages must be >= 1, got {stages}"
        return None

    return check


class KernelImpl(str):
    """The implementation chosen for an op ("reference", "triton", ...), as the ``kernels``
    context of the factories holds it: a string that also carries the kernel's tuning config
    (``[kernels.<op>]``; None: the kernel's defaults)."""

    config: object = None

    def __new__(cls, impl: str, config=None):
        obj = super().__new__(cls, impl)
        obj.config = config
        return obj


def select(context: dict, op: str, reference: Callable) -> Callable:
    """The implementation of ``op`` chosen in ``context["kernels"]`` ({op: impl}, absent ops:
    "reference"): ``reference`` itself, or the registered kernel ``"<op>:<impl>"`` (from
    ``context["registry"]``) built with its tuning config (the :class:`KernelImpl`'s, else the
    kernel's defaults). The choice never changes parameters or buffers, so checkpoints do not
    depend on it."""
    choice = (context.get("kernels") or {}).get(op, "reference")
    if choice == "reference":
        return reference
    registry = context.get("registry")
    if registry is None:
        from phase7fw.errors import Phase7Error

        raise Phase7Error(f"kernels.{op} = \"{choice}\" but the factory got no registry in its context")
    entry = registry.get("kernel", f"{op}:{choice}")
    config = getattr(choice, "config", None)
    return entry.factory(config if config is not None else entry.config_cls())


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
