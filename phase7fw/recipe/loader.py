"""Reading recipes: TOML files, ``extends`` chains, ``--set`` overrides, validation."""

from __future__ import annotations

import copy
import os
import tomllib
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w

from phase7fw.errors import RecipeError
from phase7fw.recipe.convert import CHECKPOINT_RECIPE, structure
from phase7fw.recipe.options import to_raw
from phase7fw.recipe.schema import Recipe, combination_errors


def deep_merge(base: dict, top: Mapping) -> dict:
    """Tables merge key by key; scalars and arrays in ``top`` replace those in ``base``."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_toml(path: str | os.PathLike, _chain: tuple = ()) -> dict:
    """Read a recipe file and resolve its ``extends`` chain (relative to the file)."""
    path = Path(path).expanduser().resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError([f"extends: cycle {cycle}"], source=str(_chain[0]))
    if not path.is_file():
        where = f" (extended by {_chain[-1]})" if _chain else ""
        raise RecipeError([f"file not found: {path}{where}"], source=str(path))
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([f"invalid TOML: {exc}"], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([f"cannot read: {exc}"], source=str(path)) from None
    base_ref = raw.pop("extends", None)
    if base_ref is None:
        return raw
    if not isinstance(base_ref, str):
        raise RecipeError([f"extends: expected a file name (str), got {base_ref!r}"], source=str(path))
    base_path = (path.parent / base_ref).resolve()
    if not base_path.is_file():
        raise RecipeError([f"extends: file not found: {base_ref!r} (looked at {base_path})"], source=str(path))
    return deep_merge(read_toml(base_path, (*_chain, path)), raw)


def parse_set(assignment: str) -> tuple[str, Any]:
    """Parse one ``--set key.path=VALUE``; VALUE is a TOML value, a bare word is a string."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError([f"--set {assignment!r}: expected key.path=VALUE"])
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | Iterable[str] | None) -> dict:
    """Set dotted keys (``train.max_steps``, ``data.sources.0.weight``) in a raw recipe."""
    if not overrides:
        return raw
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_set(s) for s in overrides)
    out = copy.deepcopy(raw)
    errors = []
    for key, value in items:
        parts = key.split(".")
        node: Any = out
        try:
            for i, part in enumerate(parts[:-1]):
                if isinstance(node, list):
                    node = node[int(part)]
                else:
                    node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise TypeError(f"{'.'.join(parts[: i + 1])} is not a table")
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError) as exc:
            errors.append(f"--set {key}: cannot set this key ({exc})")
    if errors:
        raise RecipeError(errors)
    return out


def load_recipe(source, overrides=None, *, plugins=None, checkpoint: bool = False) -> Recipe:
    """Load and validate a recipe.

    ``source`` is a path to a TOML file or a dict of raw tables; ``overrides`` is a mapping
    ``{"train.max_steps": 20}`` or an iterable of ``"key=VALUE"`` strings. Every problem is
    reported at once in a :class:`~phase7fw.errors.RecipeError`. ``checkpoint=True``: the
    recipe stored in a checkpoint, whose absent options take their legacy values.
    """
    if plugins is None:
        from phase7fw.plugins import load_plugins

        plugins = load_plugins()
    if isinstance(source, Mapping):
        raw, label = copy.deepcopy(dict(source)), "<dict>"
        raw.pop("extends", None)
    else:
        raw, label = read_toml(source), str(source)
    raw = apply_overrides(raw, overrides)
    errors: list[str] = []
    token = CHECKPOINT_RECIPE.set(checkpoint)
    try:
        recipe = structure(raw, Recipe, plugins.registry, "", errors)
    finally:
        CHECKPOINT_RECIPE.reset(token)
    if errors:
        raise RecipeError(errors, source=label)
    errors = combination_errors(recipe)
    if errors:
        raise RecipeError(errors, source=label)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    return to_raw(recipe)


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe (every default filled in) as TOML; loading it gives ``recipe``."""
    return tomli_w.dumps(recipe_to_dict(recipe))
