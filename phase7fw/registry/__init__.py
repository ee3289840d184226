"""The component registry: (kind, name) -> factory + config class, with clear errors."""

from __future__ import annotations

import difflib
from typing import Any, Callable

import attrs

from phase7fw.errors import Phase7Error

#: The component kinds, pinned by ARCHITECTURE.md.
KINDS = (
    "model",
    "embedding",
    "attention",
    "ssm",
    "block",
    "optimizer",
    "lr_scheduler",
    "curvature_scheduler",
    "data_source",
    "tokenizer",
    "tracker",
    "callback",
    "kernel",
)


@attrs.frozen
class EmptyConfig:
    """Config of a component that takes no options."""


class RegistryError(Phase7Error):
    """A registration or lookup failed."""


@attrs.frozen
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    config_cls: type
    description: str
    plugin: str

    def config_fields(self) -> list[dict]:
        """The recipe keys this component accepts, with types and defaults."""
        rows = []
        for f in attrs.fields(self.config_cls):
            if f.default is attrs.NOTHING:
                default = "required"
            elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
                default = repr(f.default.factory())
            else:
                default = repr(f.default)
            rows.append(
                {
                    "name": f.name,
                    "type": _type_name(f.type),
                    "default": default,
                    "help": f.metadata.get("help", ""),
                }
            )
        return rows


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


class Registry:
    """All registered components, keyed by (kind, name)."""

    def __init__(self):
        self._entries: dict[tuple[str, str], Entry] = {}

    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        config_cls: type | None = None,
        description: str = "",
        *,
        plugin: str = "<direct>",
    ) -> Entry:
        if kind not in KINDS:
            raise RegistryError(
                f"plugin {plugin} registers {name!r} under unknown kind {kind!r};"
                f" kinds are: {', '.join(KINDS)}"
            )
        if not isinstance(name, str) or not name:
            raise RegistryError(f"plugin {plugin} registers a {kind} with an empty or non-string name")
        if not callable(factory):
            raise RegistryError(f"plugin {plugin}: factory of {kind} {name!r} is not callable")
        if kind == "kernel":
            op, _, impl = name.partition(":")
            if not op or not impl or impl in ("reference", "auto"):
                raise RegistryError(f"plugin {plugin} registers kernel {name!r}: a kernel is named \"<op>:<impl>\""
                                    " (e.g. \"rmsnorm:triton\"; \"reference\" and \"auto\" are reserved)")
        config_cls = config_cls or EmptyConfig
        if not attrs.has(config_cls):
            raise RegistryError(
                f"plugin {plugin}: config_cls of {kind} {name!r} must be an attrs class,"
                f" got {config_cls!r}"
            )
        try:  # field types are read when recipes are validated: a broken annotation fails here
            attrs.resolve_types(config_cls)
        except Exception as exc:  # noqa: BLE001 - NameError, TypeError, ... from the plugin's module
            raise RegistryError(f"plugin {plugin}: config_cls {config_cls.__name__} of {kind} {name!r} has an"
                                f" annotation that cannot be resolved ({type(exc).__name__}: {exc})") from None
        old = self._entries.get((kind, name))
        if old is not None:
            raise RegistryError(
                f"{kind} {name!r} is registered twice: by plugin {old.plugin} and by plugin {plugin}"
            )
        entry = Entry(kind, name, factory, config_cls, description, plugin)
        self._entries[(kind, name)] = entry
        return entry

    def remove_plugin(self, plugin: str) -> None:
        """Forget every component ``plugin`` registered (it failed and is disabled)."""
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise RegistryError(f"unknown component kind {kind!r}; kinds are: {', '.join(KINDS)}")
        entry = self._entries.get((kind, name))
        if entry is None:
            raise RegistryError(unknown_name_message(kind, name, self.names(kind)))
        return entry

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._entries if k == kind)

    def entries(self, kind: str | None = None) -> list[Entry]:
        return sorted(
            (e for e in self._entries.values() if kind is None or e.kind == kind),
            key=lambda e: (KINDS.index(e.kind), e.name),
        )

    def kernel_ops(self) -> dict[str, list[str]]:
        """The ops that ``kernel`` entries (named ``"<op>:<impl>"``) implement, in registration
        order, each with its implementations: what a recipe's ``[kernels]`` table may hold."""
        ops: dict[str, list[str]] = {}
        for kind, name in self._entries:
            if kind == "kernel":
                op, _, impl = name.partition(":")
                ops.setdefault(op, []).append(impl)
        return ops

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._entries

    def build(self, kind: str, name: str, config, **context):
        """Call the factory of (kind, name) with an already structured config."""
        return self.get(kind, name).factory(config, **context)


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(str(name), known, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    msg += f" Registered {kind}s: {', '.join(known) if known else '(none)'}"
    return msg
