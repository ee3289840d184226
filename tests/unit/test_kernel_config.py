"""[kernels] is built from the registered ops; a kernel's tuning (tile sizes, precision) is
configuration: validated, recorded in the resolved recipe (and so in every checkpoint), and
handed to the kernel. The plain string form of old recipes and checkpoints still loads."""

import os

import attrs
import pytest
import torch

from phase7fw import hookimpl
from phase7fw.errors import RecipeError
from phase7fw.kernels import KernelImpl, select
from phase7fw.kernels.ar_ssm_scan import TritonConfig as SsmConfig
from phase7fw.kernels.hyperbolic_attention import TritonConfig as AttnConfig
from phase7fw.plugins import load_plugins
from phase7fw.recipe import KernelChoice, load_recipe, recipe_to_dict, recipe_to_toml
from tests.conftest import RECIPES

TINY = RECIPES / "phase7_tiny.toml"


def _errors(exc) -> str:
    return str(exc.value)


def test_every_registered_op_has_an_entry_in_registration_order():
    recipe = load_recipe(TINY)
    assert list(recipe.kernels) == list(load_plugins().registry.kernel_ops())
    assert list(recipe.kernels)[:2] == ["hyperbolic_attention", "ar_ssm_scan"]
    assert all(c == KernelChoice("reference") for c in recipe.kernels.values())
    assert recipe_to_dict(recipe)["kernels"]["rmsnorm"] == "reference"  # a plain string, as before


def test_a_string_selects_the_kernel_with_its_default_tuning_and_the_resolved_recipe_records_it(tmp_path):
    recipe = load_recipe(TINY, {"kernels.ar_ssm_scan": "triton", "kernels.rmsnorm": "auto"})
    assert recipe.kernels["ar_ssm_scan"] == KernelChoice("triton", SsmConfig())
    raw = recipe_to_dict(recipe)["kernels"]
    assert raw["ar_ssm_scan"] == {"impl": "triton", "gpu": [32, 64, 4, 1], "precision": "tf32", "schedule": "auto",
                                  "scan": [64, 4, 1]}
    assert raw["rmsnorm"] == "auto"  # no tuning options: still a string
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe))
    assert "[kernels.ar_ssm_scan]" in path.read_text()
    assert load_recipe(path) == recipe


def test_the_table_form_sets_tuning_fields():
    recipe = load_recipe(TINY, {"kernels.hyperbolic_attention": {"impl": "auto", "fwd": [128, 64, 8, 3],
                                                                "grad_matmul_low_precision": True}})
    choice = recipe.kernels["hyperbolic_attention"]
    assert choice.impl == "auto"
    assert choice.config == attrs.evolve(AttnConfig(), fwd=(128, 64, 8, 3), grad_matmul_low_precision=True)


@pytest.mark.parametrize("value, message", [
    ({"impl": "triton", "gpu": [48, 64, 4, 1]}, "kernels.ar_ssm_scan.gpu: block sizes must be powers of two >= 16, got [48, 64]"),
    ({"impl": "triton", "gpu": [32, 64, 3, 1]}, "kernels.ar_ssm_scan.gpu: num_warps must be 1, 2, 4, 8 or 16, got 3"),
    ({"impl": "triton", "precison": "tf32"}, "kernels.ar_ssm_scan.precison: unknown key; did you mean 'precision'?"),
    ({"impl": "triton", "precision": "tf32x3"}, "kernels.ar_ssm_scan.precision: expected one of 'ieee', 'tf32', got 'tf32x3'"),
    ({"impl": "triton", "schedule": "chunk"}, "kernels.ar_ssm_scan.schedule: expected one of 'auto', 'rows', 'chunks', got 'chunk'"),
    ({"impl": "triton", "scan": [48, 4, 1]}, "kernels.ar_ssm_scan.scan: block sizes must be powers of two >= 16, got [48]"),
    ({"gpu": [32, 64, 4, 1]}, 'kernels.ar_ssm_scan: gpu: tuning options of a kernel, but impl is "reference"'),
    ("cuda", "kernels.ar_ssm_scan: expected one of 'triton', 'fla', 'reference', 'auto', got 'cuda'"),
    ({"impl": 3}, "kernels.ar_ssm_scan.impl: expected one of 'triton', 'fla', 'reference', 'auto', got int 3"),
])
def test_bad_tuning_is_named_with_its_key(value, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, {"kernels.ar_ssm_scan": value})
    assert message in _errors(err)


def test_an_unknown_op_is_named_with_a_suggestion():
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, {"kernels.rmsnrom": "triton"})
    assert "kernels.rmsnrom: unknown op; did you mean 'rmsnorm'?" in _errors(err)


def test_an_old_checkpoint_recipe_with_strings_loads():
    raw = recipe_to_dict(load_recipe(TINY))
    raw["kernels"] = {"hyperbolic_attention": "triton", "ar_ssm_scan": "auto", "rmsnorm": "reference"}
    recipe = load_recipe(raw, checkpoint=True)
    assert recipe.kernels["hyperbolic_attention"] == KernelChoice("triton", AttnConfig())
    assert recipe.kernels["ar_ssm_scan"] == KernelChoice("auto", SsmConfig())


@attrs.frozen
class DoubleCfg:
    factor: float = 2.0


class _DoubleOp:
    """A plugin op: "double" with a reference (x * 2) and a registered "fast" implementation."""

    @hookimpl
    def register_components(self, register):
        register("kernel", "double:fast", lambda config, **context: (lambda x: x * config.factor), DoubleCfg)


def test_a_plugin_adds_an_op_that_a_recipe_selects_and_tunes():
    plugins = load_plugins(extra=[_DoubleOp()])
    assert plugins.registry.kernel_ops()["double"] == ["fast"]
    recipe = load_recipe(TINY, {"kernels.double": {"impl": "fast", "factor": 3.0}}, plugins=plugins)
    choice = recipe.kernels["double"]
    context = {"registry": plugins.registry, "kernels": {"double": KernelImpl(choice.impl, choice.config)}}
    impl = select(context, "double", lambda x: x * 2)
    assert impl(torch.tensor(1.0)).item() == 3.0
    assert select({"kernels": {}}, "double", lambda x: x * 2)(torch.tensor(1.0)).item() == 2.0  # not chosen
    with pytest.raises(RecipeError, match="kernels.double: unknown op"):
        load_recipe(TINY, {"kernels.double": "fast"})  # without the plugin


def test_the_tuning_reaches_the_kernel():
    """select binds the config as the kernel's ``tuning``; the launcher reads it on a GPU."""
    from phase7fw.kernels.hyperbolic_attention import kernel as A

    cfg = attrs.evolve(AttnConfig(), fwd=(128, 32, 8, 3), bwd_pre=(32, 2, 2))
    impl = select({"registry": load_plugins().registry, "kernels": {"hyperbolic_attention": KernelImpl("triton", cfg)}},
                  "hyperbolic_attention", None)
    assert impl.keywords == {"tuning": cfg} and impl.__wrapped__ is A.hyperbolic_attention_triton
    tiles, cuda = A.gpu_tiles(cfg), torch.device("cuda")
    assert A._config("fwd", cuda, tiles) == (128, 32, 8, 3)
    assert A._config("bwd_pre", cuda, tiles) == (32, 0, 2, 2)
    assert A._config("fwd", torch.device("cpu"), tiles) == (16, 16, 4, 1)  # the interpreter's own tiles


def test_the_retired_scan_precision_variable_is_not_silently_ignored():
    import subprocess
    import sys

    env = dict(os.environ, PHASE7FW_SSM_PRECISION="tf32", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", "import phase7fw.kernels.ar_ssm_scan.kernel"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PHASE7FW_SSM_PRECISION is no longer read" in done.stderr
    assert 'precision = "tf32"' in done.stderr
