"""Fine-tuning: ``train.init_from`` starts a new run from trained weights, ``train.freeze``
keeps parameters fixed.

The source is a checkpoint file, a run folder (its best > final > latest checkpoint), a
sharded (FSDP) checkpoint folder, or a folder exported by ``phase7fw export``. Only tensors
and plain data are read from it (weights-only loading; never unpickled code). The new run
starts at step 0 with a fresh optimizer, LR schedule and data position; what it takes from
the source:

- the model weights (the recipe's ``[model]`` must equal the source's, checked key by key);
- the tokenizer, state included (a trained BPE is not retrained on the new data); a recipe
  whose ``[data.tokenizer]`` differs from the source's is an error;
- the curvature schedule's position: kappa continues from the source's last step
  (:class:`ShiftedCurvature`), so the first fine-tuning step sees the geometry the
  weights were trained in.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import attrs

from phase7fw.errors import CheckpointError, Phase7Error


@attrs.define
class InitSource:
    """What a fine-tuning run takes from its source (see the module docstring)."""

    path: str
    recipe: object  # the source's Recipe
    tokenizer_state: dict | None
    tokenizer_fingerprint: str | None
    step: int
    tokens_seen: int
    curvature_offset: int  # the source's own offset: it may be a fine-tuned model itself
    lineage: list  # earlier sources, oldest first
    #: tensors keyed by this framework's parameter names, or a function of the built model
    #: giving them (an exported folder's names are converted by the model that reads them)
    weights: object
    metrics: dict = attrs.Factory(dict)  # best/last validation of the source (kept by import-hf)
    init_from: dict | None = None  # the source's own source, if it was fine-tuned

    def model_state(self, model) -> dict:
        return self.weights(model) if callable(self.weights) else self.weights

    def record(self) -> dict:
        """How checkpoints of the new run name their source (model cards show it)."""
        return {"path": self.path, "step": self.step, "tokens_seen": self.tokens_seen,
                "model_name": self.recipe.model.name, "lineage": list(self.lineage)}


def load_source(path: str, plugins) -> InitSource:
    """Read ``train.init_from``: every failure is one :class:`CheckpointError`."""
    from phase7fw.core.checkpoint import consolidate, load_checkpoint
    from phase7fw.recipe import load_recipe

    target = Path(path).expanduser()
    if not target.exists():
        raise CheckpointError(f"train.init_from: no such file or folder {path!r}")
    if target.is_dir() and (target / "config.json").is_file():
        return read_exported(target, plugins)
    if target.is_dir() and not (target / "extra.pt").is_file():
        from phase7fw.core.checkpoint import checkpoint_in_run

        found = checkpoint_in_run(target)
        if found is None:
            raise CheckpointError(f"train.init_from: {path} holds no checkpoint (*_best.pt, *_final.pt,"
                                  " *_step_N.pt) and is not a folder exported by phase7fw export")
        target = found
    state = load_checkpoint(target, mmap=True)
    if state.get("sharded"):  # one file of it first (no process group needed)
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            state = load_checkpoint(consolidate(target, Path(tmp) / "full.pt"))  # read fully before tmp goes
    if not isinstance(state.get("recipe"), str) or "model" not in state:
        raise CheckpointError(f"train.init_from: {target} holds no recipe or no model; it was not written by phase7fw")
    recipe = load_recipe(tomllib.loads(state["recipe"]), plugins=plugins, checkpoint=True)
    metrics = state.get("metrics") or {}
    before = state.get("init_from") or {}
    return InitSource(
        path=str(target), recipe=recipe, tokenizer_state=state.get("tokenizer"),
        tokenizer_fingerprint=state.get("tokenizer_fingerprint"), step=int(state.get("step", 0)),
        tokens_seen=int(metrics.get("tokens_seen", 0)), curvature_offset=int(state.get("curvature_offset", 0)),
        lineage=[*before.get("lineage", []), {k: v for k, v in before.items() if k != "lineage"}] if before else [],
        weights=state["model"], metrics=metrics, init_from=before or None,
    )


# ----------------------------------------------------------------------------- exported folders
#: What ``phase7fw export`` writes (phase7fw/export/hf.py) and ``train.init_from`` reads back.
FORMAT = "phase7fw-hf-export"
FORMAT_VERSION = 1


def safetensors_module():
    try:
        import safetensors.torch
    except ImportError:
        raise Phase7Error("export needs the safetensors library: pip install 'phase7fw[export]'") from None
    return safetensors.torch


def read_meta(folder: Path) -> tuple[dict, dict]:
    meta_path, config_path = folder / "phase7fw.json", folder / "config.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{folder} has no phase7fw.json: it was not exported by phase7fw export (only such"
                              " folders can be read back)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: cannot read phase7fw.json / config.json: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a phase7fw export description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was exported by a newer phase7fw (format {meta['format_version']}); upgrade")
    return meta, config


def read_exported(folder, plugins):
    """An exported folder as a fine-tuning source (:class:`phase7fw.core.finetune.InitSource`); its
    tensors are converted to phase7fw's names by the model that reads them."""
    from phase7fw.recipe import load_recipe

    folder = Path(folder)
    meta, config = read_meta(folder)
    weights_path = folder / "model.safetensors"
    if not weights_path.is_file():
        raise CheckpointError(f"{folder} has no model.safetensors")
    try:
        tensors = safetensors_module().load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - the library raises its own error types for bad files
        raise CheckpointError(f"{weights_path} is corrupt or not a safetensors file: {exc}") from None
    recipe = load_recipe(tomllib.loads(meta["recipe"]), plugins=plugins, checkpoint=True)
    metrics = meta.get("metrics") or {}
    before = meta.get("init_from") or {}
    converted = {}

    def weights(model):
        if "state" not in converted:
            converted["state"] = model.hf_import(tensors, config)
        return converted["state"]

    return InitSource(
        path=str(folder), recipe=recipe, tokenizer_state=meta.get("tokenizer"),
        tokenizer_fingerprint=meta.get("tokenizer_fingerprint"), step=int(meta.get("step", 0)),
        tokens_seen=int(meta.get("tokens_seen", 0)), curvature_offset=int(meta.get("curvature_offset", 0)),
        lineage=[*before.get("lineage", []), {k: v for k, v in before.items() if k != "lineage"}] if before else [],
        weights=weights, metrics=metrics, init_from=before or None,
    )


def differences(mine, theirs, prefix: str) -> list[str]:
    """``key: source X, recipe Y`` for every leaf where two nested dicts differ, in order."""
    out = []
    keys = list(theirs) + [k for k in mine if k not in theirs] if isinstance(theirs, dict) else []
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return [] if mine == theirs else [f"{prefix}: source {theirs!r}, recipe {mine!r}"]
    for key in keys:
        if key not in mine or key not in theirs:
            side = "recipe" if key in mine else "source"
            out.append(f"{prefix}.{key}: only in the {side}")
        else:
            out += differences(mine[key], theirs[key], f"{prefix}.{key}")
    return out


def check_recipe(recipe, source: InitSource, shown: int = 5) -> None:
    """The recipe's model and tokenizer must be the source's: one error naming the first
    differing keys."""
    from phase7fw.recipe import recipe_to_dict

    where = f"train.init_from = {source.path!r}"
    mine, theirs = recipe_to_dict(recipe), recipe_to_dict(source.recipe)
    if mine["model"].get("name") != theirs["model"].get("name"):
        raise CheckpointError(f"{where} holds a {theirs['model'].get('name')!r} model, the recipe builds"
                              f" {mine['model'].get('name')!r}")
    for section, hint in (("model", "the model section must equal the source's to load its weights"),
                          ("tokenizer", "the tokenizer is taken from the source; name the same one or leave the"
                                        " source's recipe's [data.tokenizer] in place")):
        a = mine["model"] if section == "model" else mine["data"]["tokenizer"]
        b = theirs["model"] if section == "model" else theirs["data"]["tokenizer"]
        diff = differences(a, b, "model" if section == "model" else "data.tokenizer")
        if diff:
            more = f" (and {len(diff) - shown} more)" if len(diff) > shown else ""
            raise CheckpointError(f"{where} does not match the recipe: {'; '.join(diff[:shown])}{more}; {hint}"
                                  " (use extends = \"<the source's recipe>\" in the fine-tuning recipe)")


def check_weights(model, weights: dict, where: str, shown: int = 5) -> None:
    """Same parameter names and shapes as the built model (meta is fine), else one error."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"{k}: source {given[k]}, model {own[k]}" for k in own if k in given and given[k] != own[k]]
    problems += [f"{k}: missing in the source" for k in own if k not in given]
    problems += [f"{k}: not in the model" for k in given if k not in own]
    if problems:
        more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
        raise CheckpointError(f"{where}: its weights do not fit the model: {'; '.join(problems[:shown])}{more}")


def freeze(model, patterns: list[str]) -> tuple[int, int]:
    """``requires_grad = False`` for parameters whose name matches a pattern (fnmatch, e.g.
    ``embedding.*``, ``blocks.0.*``, ``*.norm1.weight``). Returns (frozen, total) counts."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            example = ", ".join(names[:4])
            raise Phase7Error(f"train.freeze: {pattern!r} matches no parameter; names look like {example}, ..."
                              " (phase7fw/core/finetune.py: fnmatch patterns)")
    frozen = total = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == total:
        raise Phase7Error(f"train.freeze = {patterns} freezes every parameter; nothing would train")
    return frozen, total


class ShiftedCurvature:
    """A curvature schedule continued ``offset`` steps into it: kappa(t) = inner(t + offset).
    Its state is the inner schedule's (the offset is saved by the engine)."""

    def __init__(self, inner, offset: int):
        self.inner, self.offset = inner, int(offset)

    def value(self, step: int) -> float:
        return self.inner.value(step + self.offset)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"{self.inner!r} from step {self.offset}"


def load_weights_into(engine, source: InitSource) -> None:
    """Copy the source's weights into the built (materialized, possibly wrapped) model."""
    # load_state_dict copies into the parameters, casting (a bf16 export into an fp32 run).
    weights = source.model_state(engine.model)
    engine._load_model_and_optimizer({"model": weights}, f"train.init_from = {source.path!r}", full=False)
