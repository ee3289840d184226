"""Plugin manager: built-in components and third-party plugins, loaded the same way.

Built-ins are the modules in :data:`DEFAULT_PLUGINS`; third-party plugins are entry points
of the group ``phase7fw``. Every hook is called through pluggy (so ``tryfirst``/``trylast``,
hook wrappers and ordering work), with each plugin's implementations guarded: a third-party
plugin that fails -- to import (``sys.exit`` included), with a hook the spec does not know,
in ``register_components`` (a broken config class, a duplicate name), in
``register_commands``, ``run_start`` or any other hook -- is disabled and recorded in
:attr:`Plugins.load_errors` as ``distribution==version: error``, reported as a
:class:`PluginWarning` (or to the ``report`` callable given), and everything else goes on.
``PHASE7FW_STRICT_PLUGINS=1`` makes any such failure an error instead. A built-in that fails
is always an error (the installation is broken). ``PHASE7FW_DISABLE_PLUGINS=name,...``
blocks plugins by name (entry-point name, distribution name or built-in module name).
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.metadata
import os
import warnings
from typing import Callable

import pluggy

from phase7fw import hookspecs
from phase7fw.errors import Phase7Error
from phase7fw.registry import Registry

ENTRY_POINT_GROUP = "phase7fw"

#: Built-in components, registered exactly like third-party plugins.
DEFAULT_PLUGINS = (
    "phase7fw.components.llama",
    "phase7fw.components.sampling",
    "phase7fw.components.optimizers",
    "phase7fw.components.lowmem",
    "phase7fw.components.lr_schedulers",
    "phase7fw.components.data_sources",
    "phase7fw.components.tokenizers",
    "phase7fw.components.trackers",
    "phase7fw.components.callbacks",
    "phase7fw.components.phase7.embedding",
    "phase7fw.components.phase7.attention",
    "phase7fw.components.phase7.ssm",
    "phase7fw.components.phase7.curvature",
    "phase7fw.components.phase7.model",
    "phase7fw.components.phase8.attention",
    "phase7fw.kernels.plugin",
)

#: The plugin whose hook implementation is running (set by the guard): ``register`` and
#: the CLI use it to know who registers what.
CURRENT_PLUGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("phase7fw_plugin", default=None)


class PluginError(Phase7Error):
    """A plugin failed (strict mode, or a built-in)."""


class PluginWarning(UserWarning):
    """A third-party plugin failed and was disabled; the rest works."""


class PluginLoadError:
    """One plugin that failed: while loading, or later in ``hook``."""

    def __init__(self, name: str, dist: str, error: BaseException, hook: str | None = None):
        self.name, self.dist, self.error, self.hook = name, dist, error, hook

    @property
    def reason(self) -> str:
        if isinstance(self.error, SystemExit):
            return f"SystemExit: the plugin called sys.exit({self.error.code!r})"
        return f"{type(self.error).__name__}: {self.error}"

    def __str__(self) -> str:
        where = f" (in its {self.hook} hook)" if self.hook else ""
        return f"{self.dist}: {self.reason}{where}"


class Plugins:
    """A loaded set of plugins and the registry they filled."""

    def __init__(self, pm: pluggy.PluginManager, registry: Registry, errors: list[PluginLoadError], info: dict,
                 report: Callable[[PluginLoadError], None] | None = None):
        self.pm = pm
        self.registry = registry
        self.load_errors = errors
        self._info = info  # plugin name -> {"version", "dist", "builtin"}
        #: called with each failure (default: a PluginWarning); the CLI prints it instead
        self.report = report

    @property
    def hook(self):
        return self.pm.hook

    def call(self, hook: str, **kwargs) -> list:
        """Call ``hook`` through pluggy. A third-party plugin failing in it is disabled and
        reported (strict mode: :class:`PluginError`); the results of the others are returned."""
        failures: list = []
        token = _FAILURES.set(failures)
        try:
            results = getattr(self.pm.hook, hook)(**kwargs)
        finally:
            _FAILURES.reset(token)
        for name, exc in failures:
            self._failed(name, exc, hook)
        return results

    def _failed(self, name: str, exc: BaseException, hook: str | None) -> None:
        info = self._info.get(name, {})
        err = PluginLoadError(name, info.get("dist", name), exc, hook)
        if info.get("builtin") or _strict():
            why = "a built-in plugin failed, the installation is broken" if info.get("builtin") else (
                "PHASE7FW_STRICT_PLUGINS is set")
            raise PluginError(f"plugin {name} failed ({err}); {why}") from exc
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.registry.remove_plugin(name)
        self._info.pop(name, None)
        self.load_errors.append(err)
        if self.report is not None:
            self.report(err)
        else:
            warnings.warn(f"phase7fw plugin {name} failed and is disabled: {err}", PluginWarning, stacklevel=3)

    def describe(self) -> list[dict]:
        """Name, version and registered components of every loaded plugin."""
        rows = []
        for name, info in self._info.items():
            comps = [f"{e.kind}:{e.name}" for e in self.registry.entries() if e.plugin == name]
            rows.append({"name": name, **info, "components": comps})
        return rows


_FAILURES: contextvars.ContextVar[list | None] = contextvars.ContextVar("phase7fw_plugin_failures", default=None)


def _guard(function, plugin_name: str):
    """``function`` (one hook implementation of ``plugin_name``) as pluggy calls it, with
    its failure recorded for :meth:`Plugins.call` instead of raised (unless nobody records)."""

    def guarded(*args, **kwargs):
        token = CURRENT_PLUGIN.set(plugin_name)
        try:
            return function(*args, **kwargs)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin must not take down the rest
            failures = _FAILURES.get()
            if failures is None:  # called outside Plugins.call (pm.hook directly): raise as before
                raise
            failures.append((plugin_name, exc))
            return None
        finally:
            CURRENT_PLUGIN.reset(token)

    guarded.__wrapped__ = function
    return guarded


def _disabled() -> set[str]:
    raw = os.environ.get("PHASE7FW_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def _strict() -> bool:
    return os.environ.get("PHASE7FW_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes")


def load_plugins(extra: list | tuple = (), *, report: Callable[[PluginLoadError], None] | None = None) -> Plugins:
    """Load built-in and installed plugins into a fresh plugin manager and registry.

    ``extra`` are plugin objects (modules or instances with hookimpls) registered after the
    others; tests and the Engine API use it to add components without installing anything.
    ``report(error)`` is called for each plugin that fails (default: a :class:`PluginWarning`).
    """
    from phase7fw import __version__

    pm = pluggy.PluginManager("phase7fw")
    pm.add_hookspecs(hookspecs)
    disabled = _disabled()
    plugins = Plugins(pm, Registry(), [], {}, report)

    def add(load, name: str, dist: str, version: str, builtin: bool):
        try:
            obj = load()
            pm.register(obj, name=name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - import errors, sys.exit at import, ...
            plugins._failed(name, exc, None)
            return
        for caller in pm.get_hookcallers(obj) or ():
            if not caller.has_spec():  # a misspelled hook: this plugin would silently do nothing
                plugins._failed(name, pluggy.PluginValidationError(
                    obj, f"implements {caller.name!r}, which is not a phase7fw hook"
                         f" (hooks: {', '.join(sorted(_hook_names()))})"), None)
                return
            for impl in caller.get_hookimpls():
                if impl.plugin is obj and not (impl.hookwrapper or impl.wrapper):
                    impl.function = _guard(impl.function, name)

    todo = []  # (load, name, dist, version, builtin): built-ins, then installed, then in-process
    for modname in DEFAULT_PLUGINS:
        if modname in disabled or modname.rsplit(".", 1)[-1] in disabled:
            continue
        todo.append((lambda m=modname: importlib.import_module(m), modname, f"phase7fw=={__version__}", __version__,
                     True))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if {ep.name, dist_name} & disabled or any(ep.name == t[1] for t in todo):
            continue
        todo.append((ep.load, ep.name, f"{dist_name}=={version}", version, False))
    for obj in extra:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        todo.append((lambda o=obj: o, name, "<in-process>", "", False))
    for _, name, dist, version, builtin in todo:  # describe() lists them in this order
        plugins._info[name] = {"version": version, "dist": dist, "builtin": builtin}
    # pluggy calls the last registered first: register in reverse so hooks run in the order
    # above (built-ins register their components first; a later duplicate is the culprit).
    for item in reversed(todo):
        add(*item)

    def register(kind, name, factory, config_cls=None, description=""):
        plugins.registry.register(kind, name, factory, config_cls, description, plugin=CURRENT_PLUGIN.get() or "?")

    plugins.call("register_components", register=register)
    return plugins


def _hook_names() -> set[str]:
    return {n for n in dir(hookspecs) if not n.startswith("_") and callable(getattr(hookspecs, n))
            and hasattr(getattr(hookspecs, n), "phase7fw_spec")}
