"""Strict structuring of raw recipe tables into attrs classes, collecting every error.

Leaf values go through a cattrs converter with strict hooks (``"3"`` is not an int, ``10.7``
is not an int, ``1`` is not a bool); tables are walked here so that unknown keys, missing
keys, range checks and nested components are all reported together, each with its key path.
"""

from __future__ import annotations

import contextvars
import difflib
import math
import typing
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import ClassValidationError, IterableValidationError

from phase7fw.recipe.options import Component, KernelChoice
from phase7fw.registry import Registry, RegistryError


def _describe(v) -> str:
    return f"{type(v).__name__} {v!r}" if not isinstance(v, dict) else "table"


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def strict(name, ok, cast=lambda v: v):
        def hook(v, _tp):
            if not ok(v):
                raise TypeError(f"expected {name}, got {_describe(v)}")
            return cast(v)

        return hook

    conv.register_structure_hook(int, strict("int", lambda v: type(v) is int))
    # TOML has inf and nan: no option of a training recipe means either (an inf learning rate
    # would save NaN weights), so every float must be finite.
    def finite_float(v, _tp):
        if type(v) not in (int, float):
            raise TypeError(f"expected float, got {_describe(v)}")
        if not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return float(v)

    conv.register_structure_hook(float, finite_float)
    conv.register_structure_hook(str, strict("str", lambda v: type(v) is str))
    conv.register_structure_hook(bool, strict("bool", lambda v: type(v) is bool))

    def literal_hook(v, tp):
        allowed = typing.get_args(tp)
        if v not in allowed or type(v) is not type(allowed[0]):
            raise ValueError(f"expected one of {', '.join(repr(a) for a in allowed)}, got {v!r}")
        return v

    conv.register_structure_hook_func(lambda tp: typing.get_origin(tp) is Literal, literal_hook)
    return conv


_CONVERTER = _make_converter()


def _structure_leaf(value, tp, path: str, errors: list[str]):
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected an array, got {_describe(value)}")
            return None
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            errors.append(f"{path}: expected {len(args)} values, got {len(value)}")
            return None
    if origin in (list, tuple) and not isinstance(value, (list, tuple)):
        errors.append(f"{path}: expected an array, got {_describe(value)}")
        return None
    try:
        return _CONVERTER.structure(value, tp)
    except (ClassValidationError, IterableValidationError) as exc:
        for line in cattrs.transform_error(exc, path=path, format_exception=lambda e, t: str(e)):
            msg, _, where = line.rpartition(" @ ")
            errors.append(f"{where.replace('$.', '')}: {msg}")
    except (TypeError, ValueError) as exc:
        errors.append(f"{path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - unexpected types become messages, not tracebacks
        errors.append(f"{path}: cannot read {_describe(value)} as {tp}: {exc}")
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


#: True while structuring a recipe stored in a checkpoint: absent options take their
#: ``legacy`` value (see :func:`phase7fw.recipe.options.option`).
CHECKPOINT_RECIPE: contextvars.ContextVar[bool] = contextvars.ContextVar("checkpoint_recipe", default=False)


def structure(raw: Any, cls: type, registry: Registry, path: str, errors: list[str]):
    """Structure ``raw`` into attrs class ``cls``; append problems to ``errors``."""
    if not isinstance(raw, dict):
        errors.append(f"{path or '<recipe>'}: expected a table, got {_describe(raw)}")
        return None
    attrs.resolve_types(cls)  # config classes may use `from __future__ import annotations`
    fields = {f.name: f for f in attrs.fields(cls)}
    for key in raw:
        if key not in fields:
            msg = f"{_join(path, key)}: unknown key"
            close = difflib.get_close_matches(key, list(fields), n=1)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            elif fields:
                msg += f" (allowed: {', '.join(fields)})"
            errors.append(msg)
    n_errors = len(errors)
    kwargs = {}
    for name, f in fields.items():
        where = _join(path, name)
        if f.metadata.get("kernels"):
            kwargs[name] = structure_kernels(raw.get(name, {}), registry, where, errors)
            continue
        kind = f.metadata.get("component")
        if kind is not None:
            kwargs[name] = _structure_component_field(raw.get(name), f, kind, registry, where, errors)
            continue
        if attrs.has(f.type):  # a sub-table; absent means all its defaults (components too)
            kwargs[name] = structure(raw.get(name, {}), f.type, registry, where, errors)
            continue
        if name not in raw:
            if CHECKPOINT_RECIPE.get() and "legacy" in f.metadata:
                kwargs[name] = f.metadata["legacy"]
            elif f.default is attrs.NOTHING:
                errors.append(f"{where}: required")
            continue
        value = raw[name]
        if f.metadata.get("one_or_many") and not isinstance(value, (list, tuple)):
            (item,) = typing.get_args(f.type)[:1] or (str,)
            try:
                value = [_CONVERTER.structure(value, item)]  # "a.txt" is ["a.txt"]
            except (TypeError, ValueError):
                errors.append(f"{where}: expected a {item.__name__} or an array of them, got {_describe(value)}")
                continue
        before = len(errors)
        result = _structure_leaf(value, f.type, where, errors)
        if len(errors) == before:
            check = f.metadata.get("check")
            msg = check(result) if check is not None and result is not None else None
            if msg:
                errors.append(f"{where}: {msg}")
            kwargs[name] = result
    if len(errors) > n_errors:
        return None
    return cls(**kwargs)


def structure_kernels(raw, registry: Registry, path: str, errors: list[str]) -> dict:
    """``[kernels]``: one :class:`KernelChoice` per op the registry has kernels for, in
    registration order (absent ops: "reference"). An op is ``"impl"`` or a table with ``impl``
    and the tuning options of that kernel (its ``config_cls``; for "auto", the Triton one's)."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {_describe(raw)}")
        return {}
    ops = registry.kernel_ops()
    for key in raw:
        if key not in ops:
            close = difflib.get_close_matches(key, list(ops), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (ops with kernels: {', '.join(ops) or 'none'})"
            errors.append(f"{_join(path, key)}: unknown op{hint}")
    out = {}
    for op, impls in ops.items():
        where = _join(path, op)
        value = raw.get(op, "reference")
        if isinstance(value, dict):
            options = dict(value)
            impl = options.pop("impl", "reference")
        else:
            impl, options = value, {}
        allowed = [*impls, "reference", "auto"]
        if not isinstance(impl, str) or impl not in allowed:
            shown = f"{_describe(impl)}" if not isinstance(impl, str) else repr(impl)
            errors.append(f"{where}{'.impl' if isinstance(value, dict) else ''}: expected one of"
                          f" {', '.join(repr(a) for a in allowed)}, got {shown}")
            continue
        if impl == "reference":
            if options:
                errors.append(f"{where}: {', '.join(options)}: tuning options of a kernel, but impl is \"reference\""
                              " (set impl = \"triton\" or \"auto\")")
                continue
            out[op] = KernelChoice("reference", None)
            continue
        kernel = impl if impl != "auto" else ("triton" if "triton" in impls else impls[0])
        config = structure(options, registry.get("kernel", f"{op}:{kernel}").config_cls, registry, where, errors)
        out[op] = KernelChoice(impl, config)
    return out


def _structure_component_field(value, f, kind, registry, path, errors):
    if f.metadata["many"]:
        if value is None:
            return []
        if not isinstance(value, list):
            errors.append(f"{path}: expected an array of tables ([[{path}]]), got {_describe(value)}")
            return []
        return [structure_component(v, kind, registry, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    default = f.metadata["raw_default"]
    if value is None:
        if default is None:
            return None
        value = default
    elif isinstance(value, dict) and "name" not in value and default:
        value = {**default, **value}  # a table that only sets options keeps the default component
    return structure_component(value, kind, registry, path, errors)


def structure_component(raw, kind: str, registry: Registry, path: str, errors: list[str]):
    """Structure a component table ``{name = ..., **options}`` of ``kind``."""
    if not isinstance(raw, dict):
        errors.append(f"{path}: expected a table, got {_describe(raw)}")
        return None
    name = raw.get("name")
    if name is None:
        errors.append(f"{path}.name: required; registered {kind}s: {', '.join(registry.names(kind))}")
        return None
    if not isinstance(name, str):
        errors.append(f"{path}.name: expected str, got {_describe(name)}")
        return None
    try:
        entry = registry.get(kind, name)
    except RegistryError as exc:
        errors.append(f"{path}.name: {exc}")
        return None
    options = {k: v for k, v in raw.items() if k != "name"}
    weight = 1.0
    if kind == "data_source" and "weight" in options:
        n_before = len(errors)
        weight = _structure_leaf(options.pop("weight"), float, f"{path}.weight", errors)
        if len(errors) > n_before:
            weight = None
        elif not weight > 0:
            errors.append(f"{path}.weight: must be > 0, got {weight!r}")
            weight = None
    config = structure(options, entry.config_cls, registry, path, errors)
    if config is None or weight is None:
        return None
    return Component(name, config, weight)
