"""Helpers to declare recipe options on attrs config classes.

``option(default, check=positive, help="...")`` declares a field whose value is range-checked
when a recipe is validated (all errors reported at once, with their key paths), and
``component("embedding", default={"name": "htt"})`` declares a nested component table
(``[model.embedding]``) that is looked up in the registry and structured into that
component's own config class.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Component:
    """A component chosen in a recipe: its registered ``name`` and structured ``config``."""

    name: str
    config: object
    weight: float = 1.0  # only data sources carry a weight (the share of the data mix)


@attrs.frozen
class KernelChoice:
    """An op's implementation chosen in ``[kernels]``: ``impl`` ("reference", "auto" or a
    registered implementation such as "triton") and the tuning options of the kernel it names
    (the ``config_cls`` of ``"<op>:triton"`` for "auto"; None for "reference")."""

    impl: str = "reference"
    config: object = None


def option(default=attrs.NOTHING, *, check=None, help: str = "", factory=None,  # noqa: A002
           legacy=attrs.NOTHING, one_or_many: bool = False):
    """A recipe option. ``legacy``: the value that reproduces the behaviour from before the
    option existed; a checkpoint's stored recipe (which names every option of its version)
    that lacks the key gets it instead of ``default`` (``load_recipe(..., checkpoint=True)``),
    so changing a default never changes what an old checkpoint computes. ``one_or_many``: a
    list option that also accepts a single value (``"a.txt"`` means ``["a.txt"]``), as Hugging
    Face's ``data_files`` does."""
    meta = {"help": help}
    if check is not None:
        meta["check"] = check
    if legacy is not attrs.NOTHING:
        meta["legacy"] = legacy
    if one_or_many:
        meta["one_or_many"] = True
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)


def component(kind: str, default: dict | None = None, *, many: bool = False, help: str = ""):  # noqa: A002
    """A nested component table (or array of tables with ``many=True``) of ``kind``.

    ``default`` is the raw table used when the recipe leaves it out (``None``: optional,
    absent means no component; for ``many`` the default is an empty list).
    """
    meta = {"component": kind, "many": many, "raw_default": default, "help": help}
    if many:
        return attrs.field(factory=list, metadata=meta)
    return attrs.field(default=None, metadata=meta)


# Range checks: each returns an error message or None.
def positive(v):
    return None if v > 0 else f"must be > 0, got {v!r}"


def non_negative(v):
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def in_range(lo, hi, *, lo_open=False, hi_open=False):
    def check(v):
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        return f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, got {v!r}"

    return check


def each(check):
    """Apply ``check`` to every element of a sequence."""

    def run(values):
        for i, v in enumerate(values):
            msg = check(v)
            if msg:
                return f"element {i} {msg}"
        return None

    return run


def to_raw(obj) -> Any:
    """The inverse of :func:`phase7fw.recipe.convert.structure`: plain dicts/lists for TOML, ``None`` left out."""
    if isinstance(obj, KernelChoice):  # a plain string unless there are tuning options to record
        options = to_raw(obj.config) if obj.config is not None else {}
        return {"impl": obj.impl, **options} if options else obj.impl
    if isinstance(obj, Component):
        head = {"name": obj.name}
        if obj.weight != 1.0:
            head["weight"] = obj.weight
        return {**head, **to_raw(obj.config)}
    if attrs.has(type(obj)):
        out = {}
        for f in attrs.fields(type(obj)):
            v = getattr(obj, f.name)
            if v is not None:
                out[f.name] = to_raw(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_raw(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_raw(v) for k, v in obj.items() if v is not None}
    return obj
