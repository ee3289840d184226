"""Plugin manager: built-in components and third-party plugins, loaded the same way.

Built-ins are the modules in :data:`DEFAULT_PLUGINS`; third-party plugins are entry points
of the group ``phase7fw``. Each one is loaded on its own: a plugin that fails to import is
recorded in :data:`load_errors` (``distribution==version: error``) and the others still load,
unless ``PHASE7FW_STRICT_PLUGINS=1``. ``PHASE7FW_DISABLE_PLUGINS=name,...`` blocks plugins by
name (entry-point name, distribution name or built-in module name).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

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


class PluginError(Phase7Error):
    """A plugin failed to load (strict mode) or misbehaved while registering."""


class PluginLoadError:
    """One plugin that could not be loaded."""

    def __init__(self, name: str, dist: str, error: BaseException):
        self.name, self.dist, self.error = name, dist, error

    def __str__(self) -> str:
        return f"{self.dist}: {type(self.error).__name__}: {self.error}"


class Plugins:
    """A loaded set of plugins and the registry they filled."""

    def __init__(self, pm: pluggy.PluginManager, registry: Registry, errors: list[PluginLoadError], info: dict):
        self.pm = pm
        self.registry = registry
        self.load_errors = errors
        self._info = info  # plugin name -> {"version", "dist", "builtin"}

    @property
    def hook(self):
        return self.pm.hook

    def describe(self) -> list[dict]:
        """Name, version and registered components of every loaded plugin."""
        rows = []
        for name, info in self._info.items():
            comps = [f"{e.kind}:{e.name}" for e in self.registry.entries() if e.plugin == name]
            rows.append({"name": name, **info, "components": comps})
        return rows


def _disabled() -> set[str]:
    raw = os.environ.get("PHASE7FW_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.split(",") if p.strip()}


def _strict() -> bool:
    return os.environ.get("PHASE7FW_STRICT_PLUGINS", "").strip().lower() in ("1", "true", "yes")


def load_plugins(extra: list | tuple = ()) -> Plugins:
    """Load built-in and installed plugins into a fresh plugin manager and registry.

    ``extra`` are plugin objects (modules or instances with hookimpls) registered after the
    others; tests and the Engine API use it to add components without installing anything.
    """
    from phase7fw import __version__

    pm = pluggy.PluginManager("phase7fw")
    pm.add_hookspecs(hookspecs)
    disabled = _disabled()
    errors: list[PluginLoadError] = []
    info: dict[str, dict] = {}

    def add(obj, name: str, dist: str, version: str, builtin: bool):
        pm.register(obj, name=name)
        info[name] = {"version": version, "dist": dist, "builtin": builtin}

    def failed(name: str, dist: str, exc: BaseException):
        err = PluginLoadError(name, dist, exc)
        if _strict():
            raise PluginError(f"plugin {name} failed to load ({err}); PHASE7FW_STRICT_PLUGINS is set") from exc
        errors.append(err)

    for modname in DEFAULT_PLUGINS:
        if modname in disabled or modname.rsplit(".", 1)[-1] in disabled:
            continue
        try:
            add(importlib.import_module(modname), modname, f"phase7fw=={__version__}", __version__, True)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the rest
            failed(modname, f"phase7fw=={__version__}", exc)

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist_name = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        if {ep.name, dist_name} & disabled or pm.has_plugin(ep.name):
            continue
        try:
            add(ep.load(), ep.name, f"{dist_name}=={version}", version, False)
        except Exception as exc:  # noqa: BLE001
            failed(ep.name, f"{dist_name}=={version}", exc)

    for obj in extra:
        name = getattr(obj, "__name__", None) or type(obj).__name__
        add(obj, name, "<in-process>", "", False)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc

    registry = Registry()
    for impl in pm.hook.register_components.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(kind, name, factory, config_cls=None, description="", _p=plugin_name):
            registry.register(kind, name, factory, config_cls, description, plugin=_p)

        try:
            impl.function(register=register)
        except Phase7Error:
            raise
        except Exception as exc:  # noqa: BLE001
            dist = info.get(plugin_name, {}).get("dist", plugin_name)
            failed(plugin_name, dist, exc)
    return Plugins(pm, registry, errors, info)
