"""Module paths from before the layers became folders (docs/architecture.md, "Moved modules").

``import phase7fw.engine`` (or ``from phase7fw.decoding import ...``) still works for code
written against the old flat layout, e.g. a third-party plugin: it gets the module at its new
path, the same module object, with a :class:`DeprecationWarning` naming the new path (a
module whose contents were split gets a stand-in that looks names up in each new module).
The package itself imports only the new paths (tests/unit/test_layers.py checks it).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import types
import warnings

#: old module path -> new module path (or paths, when its contents were split)
MOVED = {
    "phase7fw.engine": "phase7fw.core.engine",
    "phase7fw.trainer": "phase7fw.core.trainer",
    "phase7fw.checkpoint": "phase7fw.core.checkpoint",
    "phase7fw.distributed": "phase7fw.core.distributed",
    "phase7fw.memory": "phase7fw.core.memory",
    "phase7fw.optim_groups": "phase7fw.core.optim_groups",
    "phase7fw.finetune": "phase7fw.core.finetune",
    "phase7fw.preflight": "phase7fw.core.preflight",
    "phase7fw.run_lock": "phase7fw.core.run_lock",
    "phase7fw.dcp_safe": "phase7fw.core.dcp_safe",
    "phase7fw.threads": "phase7fw.core.threads",
    "phase7fw.console": "phase7fw.core.console",
    "phase7fw.decoding": ("phase7fw.inference.decoding", "phase7fw.components.caches"),
    "phase7fw.static_decoding": ("phase7fw.components.caches", "phase7fw.inference.decoding"),
    "phase7fw.generation": "phase7fw.inference.generation",
    "phase7fw.chat": "phase7fw.inference.chat",
    "phase7fw.lm_harness": "phase7fw.inference.lm_harness",
    "phase7fw.doctor": "phase7fw.cli.doctor",
    "phase7fw.bench": "phase7fw.cli.benchmark",
    "phase7fw.wizard": "phase7fw.cli.wizard",
    "phase7fw.data_cache": "phase7fw.data.cache",
    "phase7fw.hf_export": "phase7fw.export.hf",
    "phase7fw.geometry": "phase7fw.kernels.hyperbolic_attention.geometry",
    "phase7fw.kernels.linear_cross_entropy": ("phase7fw.kernels.cross_entropy.kernel", "phase7fw.kernels.cross_entropy"),
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder placed after the regular ones: it answers only for the old paths (files that no
    longer exist), loading the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        targets = (new,) if isinstance(new, str) else new
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; import it from there (the old path will be"
                      " removed)", DeprecationWarning, stacklevel=2)
        modules = [importlib.import_module(name) for name in targets]
        if len(modules) == 1:
            self._spec = modules[0].__spec__  # the import system overwrites __spec__ with the old name's
            return modules[0]
        self._spec = None
        return _SplitModule(spec.name, modules)

    def exec_module(self, module) -> None:
        if self._spec is not None:
            module.__spec__ = self._spec  # already executed under its new name; keep its own spec


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, modules: list):
        super().__init__(name, f"moved to {', '.join(m.__name__ for m in modules)}")
        self._modules = modules

    def __getattr__(self, attr):
        for module in self.__dict__.get("_modules", ()):
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved) has no attribute {attr!r}")


def install() -> None:
    import sys

    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
