"""Recipes: TOML files structured strictly into attrs classes."""

from phase7fw.recipe.loader import (
    apply_overrides,
    deep_merge,
    load_recipe,
    parse_set,
    read_toml,
    recipe_to_dict,
    recipe_to_toml,
)
from phase7fw.recipe.options import Component, KernelChoice, component, each, in_range, non_negative, option, positive
from phase7fw.recipe.schema import Recipe

__all__ = [
    "Component",
    "KernelChoice",
    "Recipe",
    "apply_overrides",
    "component",
    "deep_merge",
    "each",
    "in_range",
    "load_recipe",
    "non_negative",
    "option",
    "parse_set",
    "positive",
    "read_toml",
    "recipe_to_dict",
    "recipe_to_toml",
]
