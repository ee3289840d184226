"""Every shipped model kind trains under DDP and FSDP2 (2 CPU processes, gloo) with the loss
curve of one process, and an FSDP checkpoint consolidates into a file that loads in one process.

A model kind is a model with its components (``model.name`` and the names of the nested
``[model.*]`` components: a phase7 model with another attention is another kind), found in the
shipped recipes: a new model, or a new component that gets a recipe, is covered without
editing this file. The ablations of MODEL.md (ABLATIONS) run as well.
"""

import json
import math
import os
import subprocess
import sys

import attrs
import pytest
import torch

from phase7fw.core.checkpoint import consolidate
from phase7fw.core.engine import Engine
from phase7fw.core.build import build_model
from phase7fw.plugins import load_plugins
from phase7fw.recipe import load_recipe
from phase7fw.recipe.options import Component
from tests.conftest import RECIPES, ROOT

pytestmark = pytest.mark.slow

STEPS = 3
#: shrink whatever of these a model has (tiny runs; every shipped model has them today)
SHRINK = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "ffn_hidden": 64}
STRATEGIES = ("ddp", "fsdp")
#: variants of the kind of this recipe that change which parameters exist (the ablations of
#: MODEL.md), and the strategies each trains under (tied embeddings and FSDP: refused, see the
#: last test)
ABLATION_BASE = "phase7_tiny.toml"
ABLATIONS = {
    "attention_only": ({"model.mixer": "attention"}, STRATEGIES),
    "ssm_only": ({"model.mixer": "ssm"}, STRATEGIES),
    "sdpa": ({"model.attention": {"name": "sdpa"}}, STRATEGIES),
    "tied": ({"model.tie_embeddings": True}, ("ddp",)),
}


def kind_of(recipe) -> str:
    """``llama``, ``phase7:htt/hyperbolic/ar_ssm/hybrid``: the model and its component names."""
    def names(config):
        for field in attrs.fields(type(config)):
            value = getattr(config, field.name)
            if isinstance(value, Component):
                yield value.name
                yield from names(value.config)

    parts = list(names(recipe.model.config))
    return recipe.model.name + (":" + "/".join(parts) if parts else "")


def shipped_model_kinds() -> dict[str, list]:
    """kind -> the shipped recipes of that kind (read at collection: no model is built here,
    so no kernel module is imported before tests/kernels sets TRITON_INTERPRET)."""
    plugins, kinds = load_plugins(), {}
    for path in sorted(RECIPES.glob("*.toml")):
        recipe = load_recipe(path, plugins=plugins)
        if recipe.train.init_from:  # a fine-tuning example needs its source run: not a model kind
            continue
        kinds.setdefault(kind_of(recipe), []).append(path)
    return kinds


KINDS = shipped_model_kinds()


def smallest_recipe(kind: str):
    """The recipe of ``kind`` with the fewest parameters (counted on the meta device)."""
    plugins = load_plugins()

    def size(path):
        model = build_model(load_recipe(path, plugins=plugins), "meta", plugins=plugins, vocab_size=256)
        return sum(p.numel() for p in model.parameters())

    return min(KINDS[kind], key=size)


ABLATED = next((k for k, paths in KINDS.items() if RECIPES / ABLATION_BASE in paths), None)
VARIANTS = [(kind, "base", {}, STRATEGIES) for kind in KINDS] + [
    (ABLATED, name, over, strategies) for name, (over, strategies) in ABLATIONS.items() if ABLATED]
RUNS = [(kind, name, extra, strategy) for kind, name, extra, strategies in VARIANTS for strategy in strategies]
FSDP = [(kind, name, extra) for kind, name, extra, strategy in RUNS if strategy == "fsdp"]


def folder(kind: str, name: str, what: str) -> str:
    return f"{kind.replace(':', '-').replace('/', '_')}-{name}-{what}"


def overrides(recipe_path, extra: dict, out, batch_size: int, strategy: str) -> dict:
    recipe = load_recipe(recipe_path)
    fields = {f for f in dir(recipe.model.config) if not f.startswith("_")}
    over = {f"model.{k}": v for k, v in SHRINK.items() if k in fields}
    over.update({"run.output_dir": str(out), "train.max_steps": STEPS, "train.log_every": 1, "train.eval_every": 0,
                 "train.eval_batches": 1, "train.save_every": 0, "train.batch_size": batch_size,
                 "parallel.strategy": strategy, **extra})
    return over


def rows(out, split="train"):
    lines = (out / "training_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every variant: one process with batch 4 (here), and 2 ranks x batch 2 under DDP and
    FSDP (one torchrun launch)."""
    root = tmp_path_factory.mktemp("models")
    spec = []
    chosen = {kind: smallest_recipe(kind) for kind in KINDS}
    for kind, name, extra, strategies in VARIANTS:
        single = root / folder(kind, name, "single")
        Engine.from_recipe(chosen[kind], overrides(chosen[kind], extra, single, 4, "none"), dummy_data=True,
                           resume="never", quiet=True).fit()
        for strategy in strategies:
            spec.append({"recipe": str(chosen[kind]),
                         "overrides": overrides(chosen[kind], extra, root / folder(kind, name, strategy), 2, strategy)})
    (root / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "integration" / "dist_worker.py"), str(root / "spec.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def test_the_shipped_recipes_have_the_expected_model_kinds():
    assert {"llama", "phase7:htt/hyperbolic/ar_ssm/hybrid"} <= set(KINDS) and ABLATED is not None


@pytest.mark.parametrize("kind,name,extra,strategy", RUNS, ids=[f"{k}-{n}-{s}" for k, n, _, s in RUNS])
def test_two_ranks_follow_the_loss_curve_of_one_process(runs, kind, name, extra, strategy):
    one, two = rows(runs / folder(kind, name, "single")), rows(runs / folder(kind, name, strategy))
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert math.isfinite(b["loss"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    val_one, val_two = rows(runs / folder(kind, name, "single"), "val"), rows(runs / folder(kind, name, strategy), "val")
    assert len(val_two) == 1 and val_two[0]["loss"] == pytest.approx(val_one[0]["loss"], rel=1e-5)


@pytest.mark.parametrize("kind,name,extra", FSDP, ids=[f"{k}-{n}" for k, n, _ in FSDP])
def test_an_fsdp_checkpoint_consolidates_and_loads_in_one_process(runs, tmp_path, kind, name, extra):
    model_name = kind.split(":")[0]
    sharded = runs / folder(kind, name, "fsdp") / f"{model_name}_final.pt"
    assert sharded.is_dir()
    merged = consolidate(sharded, tmp_path / "merged.pt")
    engine = Engine.from_checkpoint(merged, device="cpu")
    reference = torch.load(runs / folder(kind, name, "single") / f"{model_name}_final.pt", weights_only=True)["model"]
    loaded = engine.model.state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert engine.step == STEPS


def test_tied_embeddings_under_fsdp_are_refused_before_any_work(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("run", RECIPES / "phase7_tiny.toml", "--dummy-data", "--set", "model.tie_embeddings=true", "--set",
                   'parallel.strategy="fsdp"', "--set", f"run.output_dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert 'model.tie_embeddings = true with parallel.strategy = "fsdp": not supported' in proc.stderr
