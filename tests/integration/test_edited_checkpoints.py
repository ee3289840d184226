"""Hand-edited or damaged checkpoints: a field of the wrong type is one message naming it,
exit 2, whichever command reads the file."""

import pytest

from phase7fw import Engine
from phase7fw.core.checkpoint import load_checkpoint, save_checkpoint
from phase7fw.cli import main
from tests.conftest import RECIPES, tiny_overrides

TINY = RECIPES / "llama_tiny.toml"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    Engine.from_recipe(TINY, tiny_overrides(out, **{"train.max_steps": 2, "train.save_every": 0,
                                                    "train.eval_every": 0}), dummy_data=True, quiet=True).fit()
    return out / "run" / "llama_final.pt"


EDITS = {
    "recipe": (123, "'recipe' must be the TOML text of a recipe, it is a int (123)"),
    "model": ("weights", "'model' must be a table of named tensors, it is a str ('weights')"),
    "model_values": ({"embedding.weight": [1, 2]}, "'model' must be a table of named tensors, it is a dict"),
    "step": ("7", "'step' must be an integer >= 0, it is a str ('7')"),
    "negative_step": (-3, "'step' must be an integer >= 0, it is a int (-3)"),
    "metrics": ({"best_val_loss": "low"}, "'metrics' must be a table of numbers"),
    "rng": ({"torch": "seed"}, "'rng' must be RNG states (uint8 tensors)"),
    "data": ({"position": "x", "seed": 0}, "'data' must be a sampler position"),
    "optimizer": ([1, 2], "'optimizer' must be an optimizer state"),
}


def edited(good, tmp_path, field, value):
    state = {k: v for k, v in load_checkpoint(good).items() if not k.startswith("format")}
    state[field.replace("_values", "").replace("negative_", "")] = value
    return save_checkpoint(tmp_path / "edited.pt", state)


@pytest.mark.parametrize("field", list(EDITS))
def test_a_field_of_the_wrong_type_is_one_message(good, tmp_path, capsys, field):
    value, message = EDITS[field]
    path = edited(good, tmp_path, field, value)
    for args in (["eval", path], ["generate", path, "--prompt", "x", "--max-new-tokens", "1"],
                 ["run", TINY, "--dummy-data", "--resume", path, "--set", f"run.output_dir={tmp_path / 'run'}"]):
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert f"error: {path} is damaged or was edited by hand: {message}" in err


def test_a_recipe_that_is_not_toml_or_not_valid(good, tmp_path, capsys):
    path = edited(good, tmp_path, "recipe", "[train\nmax_steps = ")
    assert main(["eval", str(path)]) == 2
    assert f"error: the recipe stored in {path} is not valid TOML" in capsys.readouterr().err
    text = load_checkpoint(good)["recipe"].replace("[train]", "[train]\nmax_stepz = 3")
    path = edited(good, tmp_path, "recipe", text)
    assert main(["eval", str(path)]) == 2
    assert f"invalid recipe stored in {path}:\n  train.max_stepz: unknown key" in capsys.readouterr().err


def test_a_scheduler_state_with_wrong_values_is_refused_at_resume(good, tmp_path):
    from phase7fw.errors import CheckpointError

    state = load_checkpoint(good)
    path = edited(good, tmp_path, "lr_scheduler", {**state["lr_scheduler"], "last_epoch": "two"})
    with pytest.raises(CheckpointError, match="scheduler state does not fit this recipe"):
        Engine.from_recipe(TINY, tiny_overrides(tmp_path), dummy_data=True, resume=str(path), quiet=True)
