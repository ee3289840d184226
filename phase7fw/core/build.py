"""Building the parts of a run that the Engine, the preflight and the tools share: the
device, the tokenizer and the model (on the meta device, or materialized on a real one).
The model comes from the registry; :func:`build_model` checks it against the model contract
(:class:`phase7fw.interfaces.ModelContract`).
"""

from __future__ import annotations

import os

import attrs
import torch

from phase7fw.errors import Phase7Error
from phase7fw.interfaces import check_model
from phase7fw.kernels import KernelImpl
from phase7fw.plugins import Plugins, load_plugins
from phase7fw.recipe import Recipe, load_recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise Phase7Error(f"train.device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Phase7Error(f"train.device is {name!r} but CUDA is not available on this machine")
    return device


def resolve_precision(recipe: Recipe, device: torch.device) -> Recipe:
    """``train.precision = "auto"``: bf16 autocast on a GPU that supports it, fp32 elsewhere
    (a CPU without bf16 matrix units gains nothing from bf16 autocast, and some lose a lot);
    bf16 whenever the weights are bf16 (``train.param_dtype``), which needs bf16 autocast."""
    t = recipe.train
    if t.precision != "auto":
        return recipe
    bf16 = t.param_dtype == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    return attrs.evolve(recipe, train=attrs.evolve(t, precision="bf16" if bf16 else "fp32"))


def build_tokenizer(recipe: Recipe, plugins: Plugins, state: dict | None = None):
    spec = recipe.data.tokenizer
    return plugins.registry.build("tokenizer", spec.name, spec.config, cache_dir=cache_dir(recipe), state=state)


def cache_dir(recipe: Recipe) -> str:
    """``data.cache_dir``, else ``$PHASE7FW_CACHE_DIR``, else ``$XDG_CACHE_HOME/phase7fw`` (~/.cache)."""
    return recipe.data.cache_dir or os.environ.get("PHASE7FW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "phase7fw"
    )


def model_vocab_size(recipe: Recipe, tokenizer) -> int:
    """The model's vocabulary: the recipe's ``model.vocab_size`` or else the tokenizer's."""
    configured = getattr(recipe.model.config, "vocab_size", 0) or 0
    if configured and configured < tokenizer.vocab_size:
        raise Phase7Error(
            f"model.vocab_size = {configured} is smaller than the tokenizer's vocabulary"
            f" ({tokenizer.vocab_size}); raise it or set it to 0 to follow the tokenizer"
        )
    return configured or tokenizer.vocab_size


def with_tuning(kernels: dict | None, recipe: Recipe) -> dict:
    """{op: :class:`KernelImpl`}: each chosen kernel with the recipe's tuning options for it
    (``[kernels.<op>]``, for that implementation or "auto"), unless it carries its own."""
    out = {}
    for op, impl in (kernels or {}).items():
        config = getattr(impl, "config", None)
        choice = recipe.kernels.get(op)
        if config is None and impl != "reference" and choice is not None and choice.impl in (impl, "auto"):
            config = choice.config
        out[op] = KernelImpl(impl, config)
    return out


def build_model(recipe: Recipe | str, device: str | torch.device = "meta", *, plugins: Plugins | None = None,
                vocab_size: int | None = None, kernels: dict | None = None):
    """Build the recipe's model. On ``device="meta"`` no memory is used (count parameters,
    inspect shapes); on a real device the parameters are allocated and initialized.
    ``kernels``: {op: implementation} (default: every op's reference; the Engine resolves the
    recipe's ``[kernels]``); a kernel gets the recipe's tuning options for it (``[kernels.<op>]``)
    unless the implementation carries its own (:class:`phase7fw.kernels.KernelImpl`)."""
    plugins = plugins or load_plugins()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, plugins=plugins)
    if vocab_size is None:
        vocab_size = model_vocab_size(recipe, build_tokenizer(recipe, plugins))
    spec = recipe.model
    with torch.device("meta"):
        model = plugins.registry.build(
            "model", spec.name, spec.config, vocab_size=vocab_size, registry=plugins.registry,
            kernels=with_tuning(kernels, recipe),
        )
    check_model(model, spec.name)  # a clear error naming what a plugin model lacks, before any memory is used
    if str(device) != "meta":
        materialize(model, torch.device(device))
    return model


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
